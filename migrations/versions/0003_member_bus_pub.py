"""Members' bus keys: a nullable, unique ``bus_pub`` (NATS user nkey).

Members of a 0.11 database keep every other field and get ``bus_pub`` NULL:
they have no bus access until they set a key (``PUT /v1/me/bus-key``,
docs/bus-auth.md). SQLite allows any number of NULLs in a unique index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("members", sa.Column("bus_pub", sa.String(56), nullable=True))
    op.create_index("ix_members_bus_pub", "members", ["bus_pub"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_members_bus_pub", table_name="members")
    with op.batch_alter_table("members") as batch:
        batch.drop_column("bus_pub")
