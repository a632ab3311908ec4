"""Members, rooms, room members and sealed room keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "members",
        sa.Column("handle", sa.String(32), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("sign_pub", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("enc_pub", sa.LargeBinary(2048), nullable=False),
        sa.Column("enc_suite", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "rooms",
        sa.Column("room_id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(32), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("rekey_required", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "room_members",
        sa.Column("room_id", sa.String(40), sa.ForeignKey("rooms.room_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("handle", sa.String(32), sa.ForeignKey("members.handle", ondelete="CASCADE"), primary_key=True),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_room_members_handle", "room_members", ["handle"])
    op.create_table(
        "sealed_keys",
        sa.Column("room_id", sa.String(40), sa.ForeignKey("rooms.room_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("epoch", sa.Integer(), primary_key=True),
        sa.Column("handle", sa.String(32), sa.ForeignKey("members.handle", ondelete="CASCADE"), primary_key=True),
        sa.Column("sealed", sa.LargeBinary(4096), nullable=False),
    )
    op.create_index("ix_sealed_keys_handle", "sealed_keys", ["handle", "room_id"])


def downgrade() -> None:
    op.drop_table("sealed_keys")
    op.drop_table("room_members")
    op.drop_table("rooms")
    op.drop_table("members")
