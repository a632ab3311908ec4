"""The SQLite store: one file, one writer thread, transactions for every change.

All database work runs on a single dedicated thread, so writes are serialised
in the order they arrive and the event loop never blocks on SQLite. Each
mutation is one transaction: a crash mid-write leaves the previous state.

A logged change (``logged=``) appends its membership-log entry in that same
transaction: the transaction first takes SQLite's write lock (so an offline
``membershipd member add`` in another process cannot interleave), reads the
head, checks the request against the log, applies the effect, and inserts the
entry; an error anywhere rolls all of it back (docs/store.md, "The membership log").
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..memberlog import bootstrap_entry, snapshot_entry
from ..wire import KeyFormatError, nkey_from_sign_pub, sign_pub_from_nkey
from . import models as m
from .base import (
    Conflict,
    KeyPackage,
    LogRecord,
    Member,
    Membership,
    NotFound,
    Room,
    Store,
    authority_room,
    check_appendable,
    check_authority,
    check_new_epoch,
    entry_text,
    room_state,
    snapshot_member,
    snapshot_room,
)
from .db import make_engine

T = TypeVar("T")


def new_room_id() -> str:
    """24 characters of [a-z2-7]: 120 random bits, matching ``^[a-z0-9]{1,40}$``."""
    return base64.b32encode(os.urandom(15)).decode("ascii").lower()


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _member(row: m.Member) -> Member:
    return Member(row.handle, row.role, bytes(row.sign_pub), bytes(row.enc_pub), row.enc_suite, _aware(row.created_at),
                  row.bus_pub)


class SqliteStore(Store):
    def __init__(self, db_path: Path) -> None:
        super().__init__()
        self.engine = make_engine(db_path)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unibus-sqlite")

    async def _run(self, fn: Callable[[Session], T]) -> T:
        def work() -> T:
            with self._sessions.begin() as session:
                return fn(session)

        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.dispose)
        self._executor.shutdown(wait=True)

    # -- members ---------------------------------------------------------------

    async def list_members(self) -> list[Member]:
        return await self._run(lambda s: [_member(r) for r in s.scalars(select(m.Member).order_by(m.Member.handle))])

    async def get_member(self, handle: str) -> Member | None:
        def q(s: Session) -> Member | None:
            row = s.get(m.Member, handle)
            return _member(row) if row else None

        return await self._run(q)

    async def _add_member(self, member: Member, logged: LogRecord | None) -> tuple[Member, int | None]:
        def q(s: Session) -> tuple[Member, int | None]:
            pos = log_begin(s, logged)
            added = add_member_sync(s, member)
            log_end(s, pos, logged, {})
            return added, _seq(pos)

        return await self._run(q)

    async def _set_bus_key(self, handle: str, bus_pub: str,
                           logged: LogRecord | None) -> tuple[Member, Member | None, int | None]:
        def q(s: Session) -> tuple[Member, Member | None, int | None]:
            pos = log_begin(s, logged)
            row = s.get(m.Member, handle)
            if row is None:
                raise NotFound(f"no member {handle!r}")
            if row.bus_pub == bus_pub:
                log_end(s, pos, logged, {})
                return _member(row), None, _seq(pos)
            before = _member(row)
            _check_bus_pub_free(s, bus_pub, handle)
            row.bus_pub = bus_pub
            try:
                s.flush()
            except IntegrityError:
                raise Conflict("another member already has this bus_pub") from None
            log_end(s, pos, logged, {})
            return _member(row), before, _seq(pos)

        return await self._run(q)

    async def _set_role(self, handle: str, role: str, logged: LogRecord | None) -> tuple[Member, Member, int | None]:
        def q(s: Session) -> tuple[Member, Member, int | None]:
            pos = log_begin(s, logged)
            row = s.get(m.Member, handle)
            if row is None:
                raise NotFound(f"no member {handle!r}")
            if row.role == "admin" and role != "admin" and _admin_count(s) <= 1:
                raise Conflict(f"{handle!r} is the last admin; make another member admin first")
            before = _member(row)
            row.role = role
            log_end(s, pos, logged, {})
            return _member(row), before, _seq(pos)

        return await self._run(q)

    async def _delete_member(self, handle: str, logged: LogRecord | None) -> tuple[list[str], Member, int | None]:
        def q(s: Session) -> tuple[list[str], Member, int | None]:
            pos = log_begin(s, logged)
            row = s.get(m.Member, handle)
            if row is None:
                raise NotFound(f"no member {handle!r}")
            if row.role == "admin" and _admin_count(s) <= 1:
                raise Conflict(f"{handle!r} is the last admin and cannot be deleted")
            rooms = list(s.scalars(select(m.RoomMember.room_id).where(m.RoomMember.handle == handle)))
            if rooms:
                s.execute(update(m.Room).where(m.Room.room_id.in_(rooms)).values(rekey_required=True))
            s.execute(delete(m.RoomMember).where(m.RoomMember.handle == handle))
            s.execute(delete(m.SealedKey).where(m.SealedKey.handle == handle))
            # Ownership dies with the member: a later member reusing the handle
            # must not inherit it. Admins manage ownerless rooms.
            s.execute(update(m.Room).where(m.Room.owner == handle).values(owner=""))
            before = _member(row)
            s.delete(row)
            log_end(s, pos, logged, {})
            return sorted(rooms), before, _seq(pos)

        return await self._run(q)

    # -- rooms -----------------------------------------------------------------

    def _room_members(self, s: Session, room_id: str) -> tuple[Member, ...]:
        # Plain columns, not ORM objects: a 1,000-member room is read on every
        # room request and rekey (measured: 2x faster than loading objects).
        rows = s.execute(
            select(m.Member.handle, m.Member.role, m.Member.sign_pub, m.Member.enc_pub, m.Member.enc_suite,
                   m.Member.created_at, m.Member.bus_pub)
            .join(m.RoomMember, m.RoomMember.handle == m.Member.handle)
            .where(m.RoomMember.room_id == room_id).order_by(m.Member.handle)
        )
        return tuple(Member(h, r, bytes(sp), bytes(ep), es, _aware(c), bp) for h, r, sp, ep, es, c, bp in rows)

    def _room(self, s: Session, row: m.Room) -> Room:
        return Room(row.room_id, row.name, row.owner, row.epoch, bool(row.rekey_required), _aware(row.created_at),
                    self._room_members(s, row.room_id))

    def _get_room_row(self, s: Session, room_id: str) -> m.Room:
        row = s.get(m.Room, room_id)
        if row is None:
            raise NotFound(f"no room {room_id!r}")
        return row

    async def _create_room(self, name: str, owner: str, logged: LogRecord | None) -> tuple[Room, int | None]:
        def q(s: Session) -> tuple[Room, int | None]:
            pos = log_begin(s, logged)
            if s.get(m.Member, owner) is None:
                raise NotFound(f"no member {owner!r}")
            now = _now()
            row = m.Room(room_id=new_room_id(), name=name, owner=owner, epoch=0, rekey_required=True, created_at=now)
            s.add(row)
            s.add(m.RoomMember(room_id=row.room_id, handle=owner, added_at=now))
            s.flush()
            log_end(s, pos, logged, {"room_id": row.room_id})
            return self._room(s, row), _seq(pos)

        return await self._run(q)

    async def list_rooms(self, handle: str | None = None) -> list[Room]:
        def q(s: Session) -> list[Room]:
            stmt = select(m.Room).order_by(m.Room.created_at, m.Room.room_id)
            if handle is not None:
                stmt = stmt.join(m.RoomMember, m.RoomMember.room_id == m.Room.room_id).where(m.RoomMember.handle == handle)
            return [self._room(s, r) for r in s.scalars(stmt)]

        return await self._run(q)

    async def get_room(self, room_id: str) -> Room | None:
        def q(s: Session) -> Room | None:
            row = s.get(m.Room, room_id)
            return self._room(s, row) if row else None

        return await self._run(q)

    async def _delete_room(self, room_id: str, logged: LogRecord | None) -> tuple[dict[str, Any], int | None]:
        def q(s: Session) -> tuple[dict[str, Any], int | None]:
            pos = log_begin(s, logged)
            row = self._get_room_row(s, room_id)
            before = _room_state(s, row)
            s.execute(delete(m.SealedKey).where(m.SealedKey.room_id == room_id))
            s.execute(delete(m.RoomEpoch).where(m.RoomEpoch.room_id == room_id))
            s.execute(delete(m.RoomMember).where(m.RoomMember.room_id == room_id))
            s.delete(row)
            log_end(s, pos, logged, {})
            return before, _seq(pos)

        return await self._run(q)

    async def _add_room_member(self, room_id: str, handle: str,
                               logged: LogRecord | None) -> tuple[Room, dict[str, Any] | None, int | None]:
        def q(s: Session) -> tuple[Room, dict[str, Any] | None, int | None]:
            pos = log_begin(s, logged)
            row = self._get_room_row(s, room_id)
            if s.get(m.Member, handle) is None:
                raise NotFound(f"no member {handle!r}")
            if s.get(m.RoomMember, (room_id, handle)) is not None:
                log_end(s, pos, logged, {})
                return self._room(s, row), None, _seq(pos)
            before = _room_state(s, row)
            s.add(m.RoomMember(room_id=room_id, handle=handle, added_at=_now()))
            row.rekey_required = True
            s.flush()
            log_end(s, pos, logged, {})
            return self._room(s, row), before, _seq(pos)

        return await self._run(q)

    async def _remove_room_member(self, room_id: str, handle: str,
                                  logged: LogRecord | None) -> tuple[Room, dict[str, Any], int | None]:
        def q(s: Session) -> tuple[Room, dict[str, Any], int | None]:
            pos = log_begin(s, logged)
            row = self._get_room_row(s, room_id)
            link = s.get(m.RoomMember, (room_id, handle))
            if link is None:
                raise NotFound(f"{handle!r} is not a member of room {room_id!r}")
            before = _room_state(s, row)
            s.delete(link)
            row.rekey_required = True
            s.flush()
            log_end(s, pos, logged, {})
            return self._room(s, row), before, _seq(pos)

        return await self._run(q)

    async def _put_keys(self, room_id: str, epoch: int, sealed: dict[str, bytes], sigs: dict[str, bytes] | None,
                        sealer: str | None, log_head: dict[str, Any] | None,
                        logged: LogRecord | None) -> tuple[Room, dict[str, Any], int | None]:
        sigs = sigs or {}

        def q(s: Session) -> tuple[Room, dict[str, Any], int | None]:
            pos = log_begin(s, logged)
            row = self._get_room_row(s, room_id)
            members = self._room_members(s, room_id)
            current = {mb.handle for mb in members}
            check_new_epoch(row.epoch, epoch, current, sealed)
            before = room_state(row.room_id, row.name, row.owner, row.epoch, bool(row.rekey_required), current)
            # Conditional on the epoch we read: of two racing writers, one wins.
            done = s.execute(update(m.Room).where(m.Room.room_id == room_id, m.Room.epoch == row.epoch)
                             .values(epoch=epoch, rekey_required=False))
            if done.rowcount != 1:
                raise Conflict("another rekey won the race; fetch the room and try again")
            s.execute(insert(m.SealedKey.__table__),
                      [{"room_id": room_id, "epoch": epoch, "handle": h, "sealed": v, "sig": sigs.get(h)}
                       for h, v in sealed.items()])
            if sealer is not None and log_head is not None:
                s.execute(insert(m.RoomEpoch.__table__).values(room_id=room_id, epoch=epoch, sealer=sealer,
                                                               log_seq=log_head["seq"], log_hash=log_head["hash"]))
            log_end(s, pos, logged, {"epoch": epoch})
            return (Room(row.room_id, row.name, row.owner, epoch, False, _aware(row.created_at), members), before,
                    _seq(pos))

        return await self._run(q)

    async def get_key_package(self, room_id: str, handle: str, epoch: int | None = None) -> KeyPackage | None:
        def q(s: Session) -> KeyPackage | None:
            k, e = m.SealedKey, m.RoomEpoch
            stmt = (select(k.epoch, k.sealed, k.sig, e.sealer, e.log_seq, e.log_hash)
                    .outerjoin(e, (e.room_id == k.room_id) & (e.epoch == k.epoch))
                    .where(k.room_id == room_id, k.handle == handle))
            stmt = stmt.where(k.epoch == epoch) if epoch is not None else stmt.order_by(k.epoch.desc())
            row = s.execute(stmt.limit(1)).first()
            if row is None:
                return None
            got, sealed, sig, sealer, log_seq, log_hash = row
            head = {"seq": log_seq, "hash": log_hash} if sealer is not None else None
            return KeyPackage(room_id, got, bytes(sealed), bytes(sig) if sig is not None else None,
                              sealer, head)

        return await self._run(q)

    async def membership(self) -> Membership:
        return await self._run(membership_sync)

    # -- the membership log ------------------------------------------------------

    async def log_head(self) -> tuple[int, str]:
        return await self._run(log_head_sync)

    async def log_entries(self, after: int = -1, limit: int = 500) -> list[str]:
        return await self._run(lambda s: list(s.scalars(
            select(m.LogEntry.entry).where(m.LogEntry.seq > after).order_by(m.LogEntry.seq).limit(limit))))

    async def log_hash_at(self, seq: int) -> str | None:
        return await self._run(lambda s: s.scalar(select(m.LogEntry.hash).where(m.LogEntry.seq == seq)))

    # -- replay protection's high-water mark ------------------------------------------

    async def nonce_high_water(self) -> int:
        def q(s: Session) -> int:
            row = s.get(m.Meta, HIGH_WATER_KEY)
            return int(row.value) if row is not None else 0

        return await self._run(q)

    async def raise_nonce_high_water(self, value: int) -> int:
        def q(s: Session) -> int:
            row = s.get(m.Meta, HIGH_WATER_KEY)
            current = int(row.value) if row is not None else 0
            if current >= value:
                return current
            if row is None:
                s.add(m.Meta(key=HIGH_WATER_KEY, value=str(value)))
            else:
                row.value = str(value)
            return value

        # One transaction, committed (WAL, synchronous=FULL: fsynced) before this returns.
        return await self._run(q)

    # -- nonces carried over from a 0.11 bucket (unibus.auth.CarriedNonces) ----------------

    async def carried_nonces(self) -> str | None:
        """The record of the nonces a moved nonce bucket carried over, None when there is none."""
        return await self._run(lambda s: s.scalar(select(m.Meta.value).where(m.Meta.key == CARRIED_NONCES_KEY)))

    async def keep_carried_nonces(self, record: str | None) -> None:
        """Store ``record`` durably before returning (None removes it)."""
        def q(s: Session) -> None:
            row = s.get(m.Meta, CARRIED_NONCES_KEY)
            if record is None:
                if row is not None:
                    s.delete(row)
            elif row is None:
                s.add(m.Meta(key=CARRIED_NONCES_KEY, value=record))
            else:
                row.value = record

        await self._run(q)

    async def log_export(self) -> tuple[list[str], list[tuple[str, str, int]], int]:
        """The whole log for ``migrate-to-kv``: entry texts in order, the (keyid, nonce, seq)
        of its requests, and the largest ``created`` of a request in it."""
        def q(s: Session) -> tuple[list[str], list[tuple[str, str, int]], int]:
            texts = list(s.scalars(select(m.LogEntry.entry).order_by(m.LogEntry.seq)))
            nonces = [(k, n, int(q)) for k, n, q in s.execute(select(m.LogNonce.keyid, m.LogNonce.nonce,
                                                                       m.LogNonce.seq))]
            max_created = int(s.scalar(select(m.Meta.value).where(m.Meta.key == MAX_CREATED_KEY)) or 0)
            return texts, nonces, max_created

        return await self._run(q)

    async def epoch_packages(self, room_id: str) -> dict[int, dict[str, Any]]:
        """Every sealed epoch of a room with its key packages (for ``migrate-to-kv``):
        ``{epoch: {"sealed": {handle: bytes}, "sigs": {handle: bytes}, "sealer", "log_head"}}``."""
        def q(s: Session) -> dict[int, dict[str, Any]]:
            out: dict[int, dict[str, Any]] = {}
            for row in s.scalars(select(m.SealedKey).where(m.SealedKey.room_id == room_id)):
                e = out.setdefault(row.epoch, {"sealed": {}, "sigs": {}, "sealer": None, "log_head": None})
                e["sealed"][row.handle] = bytes(row.sealed)
                if row.sig is not None:
                    e["sigs"][row.handle] = bytes(row.sig)
            for row in s.scalars(select(m.RoomEpoch).where(m.RoomEpoch.room_id == room_id)):
                if row.epoch in out:
                    out[row.epoch]["sealer"] = row.sealer
                    out[row.epoch]["log_head"] = {"seq": row.log_seq, "hash": row.log_hash}
            return out

        return await self._run(q)


# -- synchronous helpers shared with offline commands (membershipd member add) ----


def _admin_count(s: Session) -> int:
    return s.scalar(select(func.count()).select_from(m.Member).where(m.Member.role == "admin")) or 0


def _check_bus_pub_free(s: Session, bus_pub: str, handle: str) -> None:
    """Conflict unless ``bus_pub`` is nobody else's bus key and nobody's signing key as an nkey."""
    owner = s.scalar(select(m.Member.handle).where(m.Member.bus_pub == bus_pub))
    if owner is not None and owner != handle:
        raise Conflict("another member already has this bus_pub")
    try:
        raw = sign_pub_from_nkey(bus_pub)
    except KeyFormatError:
        return  # not an nkey at all: it cannot be anyone's signing key (the API refuses it first)
    if s.scalar(select(m.Member.handle).where(m.Member.sign_pub == raw)) is not None:
        raise Conflict("this bus_pub is the nkey of a member's sign_pub; a signing key never logs in to the bus")


def add_member_sync(s: Session, member: Member) -> Member:
    if s.get(m.Member, member.handle) is not None:
        raise Conflict(f"a member with handle {member.handle!r} already exists")
    if s.scalar(select(m.Member.handle).where(m.Member.sign_pub == member.sign_pub)) is not None:
        raise Conflict("another member already has this sign_pub")
    if s.scalar(select(m.Member.handle).where(m.Member.bus_pub == nkey_from_sign_pub(member.sign_pub))) is not None:
        raise Conflict("the nkey of this sign_pub is a member's bus_pub; a signing key never logs in to the bus")
    if member.bus_pub is not None:
        if member.bus_pub == nkey_from_sign_pub(member.sign_pub):
            raise Conflict("bus_pub is the nkey of the member's own sign_pub; the bus key must be a separate key")
        _check_bus_pub_free(s, member.bus_pub, member.handle)
    s.add(m.Member(handle=member.handle, role=member.role, sign_pub=member.sign_pub, enc_pub=member.enc_pub,
                   enc_suite=member.enc_suite, created_at=member.created_at, bus_pub=member.bus_pub))
    try:
        s.flush()
    except IntegrityError:
        raise Conflict(f"a member with handle {member.handle!r}, this sign_pub or this bus_pub already exists") from None
    return member


# -- the membership log, inside a write transaction (docs/store.md) ---------------------

#: unibus_meta key of the largest ``created`` of a request in the log.
MAX_CREATED_KEY = "log.max_created"
#: unibus_meta key of the signed requests' high-water mark (docs/operations.md, "Durability").
HIGH_WATER_KEY = "nonces.high_water"
#: ``{"skew": S, "nonces": [[key, claimed], ...]}``: the nonces carried over from a 0.11 (file)
#: nonce bucket, their claim times and the skew they were accepted under, kept until no skew
#: can make their requests fresh again (unibus.auth.NonceStore.carry_over).
CARRIED_NONCES_KEY = "nonces.carried"


@dataclass(frozen=True)
class LogPosition:
    """Where the next entry goes: ``seq`` after ``prev``; the log's largest ``created``."""

    seq: int
    prev: str
    max_created: int


def log_head_sync(s: Session) -> tuple[int, str]:
    last = s.execute(select(m.LogEntry.seq, m.LogEntry.hash).order_by(m.LogEntry.seq.desc()).limit(1)).first()
    return (int(last[0]), str(last[1])) if last is not None else (-1, "")


def _lock_for_write(s: Session) -> None:
    """Take SQLite's write lock now, before the log head is read: the head read
    and the append are then one serialised step, even against another process
    (``membershipd member add`` while the daemon runs), which waits its turn."""
    s.execute(text("UPDATE unibus_meta SET value = value WHERE key = :k"), {"k": MAX_CREATED_KEY})


def snapshot_sync(s: Session) -> dict[str, Any] | None:
    """The snapshot entry (seq 0) of the current state; None when there are no members."""
    members = [_member(r) for r in s.scalars(select(m.Member).order_by(m.Member.handle))]
    if not members:
        return None
    known = frozenset(mb.handle for mb in members)
    rosters: dict[str, set[str]] = {}
    for room_id, handle in s.execute(select(m.RoomMember.room_id, m.RoomMember.handle)):
        rosters.setdefault(room_id, set()).add(handle)
    unsigned: dict[str, list[tuple[int, str, bytes]]] = {}  # keys sealed before the log
    for k in s.scalars(select(m.SealedKey).where(m.SealedKey.sig.is_(None))):
        unsigned.setdefault(k.room_id, []).append((k.epoch, k.handle, k.sealed))
    rooms = [snapshot_room(r.room_id, r.name, r.owner, r.epoch, bool(r.rekey_required), rosters.get(r.room_id, set()),
                           known, unsigned.get(r.room_id, ())) for r in s.scalars(select(m.Room))]
    return snapshot_entry(int(_now().timestamp()), [snapshot_member(mb) for mb in members], rooms)


def ensure_root_sync(s: Session) -> tuple[int, str]:
    """The log's head, after writing entry 0 (a snapshot of the state) if the log is
    empty while there are members: a store filled before it had a log."""
    head = log_head_sync(s)
    if head[0] >= 0:
        return head
    entry = snapshot_sync(s)
    if entry is None:
        return head
    digest, body = entry_text(entry)
    s.add(m.LogEntry(seq=0, hash=digest, entry=body))
    s.flush()
    return 0, digest


def _seq(pos: LogPosition | None) -> int | None:
    """The log seq a logged write took (None: nothing was logged)."""
    return pos.seq if pos is not None else None


def _room_state(s: Session, row: m.Room) -> dict[str, Any]:
    """A room row as change events carry it (:func:`unibus.store.base.room_state`), read inside the write."""
    handles = s.scalars(select(m.RoomMember.handle).where(m.RoomMember.room_id == row.room_id))
    return room_state(row.room_id, row.name, row.owner, row.epoch, bool(row.rekey_required), handles)


def log_begin(s: Session, logged: LogRecord | None) -> LogPosition | None:
    """First step of a logged write: lock, read the head, check the request against the log.

    Runs before the effect, so a snapshot it may write (entry 0) is the state
    before it. :class:`unibus.store.base.LogRejected` when the log refuses the request.
    """
    if logged is None:
        return None
    _lock_for_write(s)
    seq, prev = ensure_root_sync(s)
    max_created = int(s.scalar(select(m.Meta.value).where(m.Meta.key == MAX_CREATED_KEY)) or 0)
    seen = s.get(m.LogNonce, (logged.keyid, logged.nonce)) is not None
    check_appendable(logged, max_created, seen)
    author = s.get(m.Member, logged.keyid)
    room_id = authority_room(logged)
    room = s.get(m.Room, room_id) if room_id is not None else None
    inside = room is not None and s.get(m.RoomMember, (room_id, logged.keyid)) is not None
    check_authority(logged, author.role if author is not None else None, room.owner if room is not None else None,
                    inside, bytes(author.sign_pub) if author is not None else None)
    return LogPosition(seq + 1, prev, max_created)


def log_end(s: Session, pos: LogPosition | None, logged: LogRecord | None, result: dict[str, Any]) -> None:
    """Last step of a logged write: the entry, its nonce and the log's largest ``created``."""
    if pos is None or logged is None:
        return
    digest, body = logged.entry(pos.seq, pos.prev, result)
    s.add(m.LogEntry(seq=pos.seq, hash=digest, entry=body))
    s.add(m.LogNonce(keyid=logged.keyid, nonce=logged.nonce, seq=pos.seq))
    meta = s.get(m.Meta, MAX_CREATED_KEY)
    if meta is None:
        s.add(m.Meta(key=MAX_CREATED_KEY, value=str(max(pos.max_created, logged.created))))
    else:
        meta.value = str(max(pos.max_created, logged.created))
    try:
        s.flush()
    except IntegrityError:  # another writer took this seq: impossible under the write lock, refused anyway
        raise Conflict("the membership log moved during this change; try again") from None


def append_bootstrap_sync(s: Session, member: Member) -> tuple[int, str]:
    """``membershipd member add``: the member and its ``bootstrap`` entry, in the caller's transaction.

    Returns ``(seq, hash)`` of the entry (its fingerprint).
    """
    _lock_for_write(s)
    seq, prev = ensure_root_sync(s)
    add_member_sync(s, member)
    digest, body = entry_text(bootstrap_entry(seq + 1, prev, int(_now().timestamp()), snapshot_member(member)))
    s.add(m.LogEntry(seq=seq + 1, hash=digest, entry=body))
    s.flush()
    return seq + 1, digest


def membership_sync(s: Session) -> Membership:
    members = tuple(_member(r) for r in s.scalars(select(m.Member).order_by(m.Member.handle)))
    rooms: dict[str, set[str]] = {r: set() for r in s.scalars(select(m.Room.room_id))}
    for room_id, handle in s.execute(select(m.RoomMember.room_id, m.RoomMember.handle)):
        rooms.setdefault(room_id, set()).add(handle)
    return Membership(members, {k: frozenset(v) for k, v in rooms.items()})


def new_member(handle: str, role: str, sign_pub: bytes, enc_pub: bytes, enc_suite: str,
               bus_pub: str | None = None) -> Member:
    return Member(handle, role, sign_pub, enc_pub, enc_suite, _now(), bus_pub)


def read_membership(db_path: Path) -> Membership:
    """A consistent snapshot of members and room memberships, read synchronously (offline tools, tests)."""
    engine = make_engine(db_path)
    try:
        with Session(engine) as session, session.begin():
            return membership_sync(session)
    finally:
        engine.dispose()
