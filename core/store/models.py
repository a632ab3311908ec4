"""SQLAlchemy models of the membershipd store (SQLAlchemy 2.0 style).

Every schema change here comes with an alembic revision in migrations/versions.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the store itself (created_at, node that created it)."""

    __tablename__ = "unibus_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Member(Base):
    """A member: its handle, role and public keys (never a private key)."""

    __tablename__ = "members"

    handle: Mapped[str] = mapped_column(String(32), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    sign_pub: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    enc_pub: Mapped[bytes] = mapped_column(LargeBinary(2048))
    enc_suite: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: The bus key, a NATS user nkey (``U…``, 56 characters); NULL until set
    #: (members upgraded from 0.11). Unique where set (revision 0003).
    bus_pub: Mapped[str | None] = mapped_column(String(56), nullable=True, unique=True, index=True)


class Room(Base):
    __tablename__ = "rooms"

    room_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(32))
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    rekey_required: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RoomMember(Base):
    __tablename__ = "room_members"

    room_id: Mapped[str] = mapped_column(ForeignKey("rooms.room_id", ondelete="CASCADE"), primary_key=True)
    handle: Mapped[str] = mapped_column(ForeignKey("members.handle", ondelete="CASCADE"), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SealedKey(Base):
    """A room key of one epoch, sealed (HPKE) to one member; opaque to the server."""

    __tablename__ = "sealed_keys"

    room_id: Mapped[str] = mapped_column(ForeignKey("rooms.room_id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    handle: Mapped[str] = mapped_column(ForeignKey("members.handle", ondelete="CASCADE"), primary_key=True)
    sealed: Mapped[bytes] = mapped_column(LargeBinary(4096))
    #: The sealer's Ed25519 signature of this member's key package (64 bytes;
    #: docs/formats.md); NULL for keys sealed before 0.12 (revision 0004).
    sig: Mapped[bytes | None] = mapped_column(LargeBinary(64), nullable=True)


class RoomEpoch(Base):
    """Who sealed an epoch of a room, at which membership-log head (revision 0004)."""

    __tablename__ = "room_epochs"

    room_id: Mapped[str] = mapped_column(ForeignKey("rooms.room_id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    sealer: Mapped[str] = mapped_column(String(32))
    log_seq: Mapped[int] = mapped_column(Integer)
    log_hash: Mapped[str] = mapped_column(String(64))


class LogEntry(Base):
    """One entry of the membership log: its RFC 8785 canonical JSON text and its hash (revision 0004)."""

    __tablename__ = "log_entries"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(Text)
    entry: Mapped[str] = mapped_column(Text)


class LogNonce(Base):
    """Every (keyid, nonce) of a request in the membership log: each may be there once (revision 0004)."""

    __tablename__ = "log_nonces"

    keyid: Mapped[str] = mapped_column(String(128), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
