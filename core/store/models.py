"""SQLAlchemy models of the membershipd store (SQLAlchemy 2.0 style).

Every schema change here comes with an alembic revision in migrations/versions.
"""

from __future__ import annotations

from sqlalchemy import String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the store itself (created_at, node that created it)."""

    __tablename__ = "unibus_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
