"""The membership log, and signed key packages.

- ``log_entries(seq, hash, entry)``: the hash-chained membership log, each entry
  as its RFC 8785 canonical JSON text; ``log_nonces(keyid, nonce, seq)``: every
  (keyid, nonce) of a logged request, each at most once.
- ``sealed_keys.sig`` (NULL for keys sealed before 0.12) and
  ``room_epochs(room_id, epoch, sealer, log_seq, log_hash)``: who sealed an
  epoch at which log head.
- A database that already has members (an upgrade from 0.11) gets entry 0 of
  kind ``snapshot``: its whole state at this moment (docs/formats.md, "The
  membership log"). A room whose owner is no longer a member is ownerless from
  here on (owner ``""``), as the snapshot says. Each room's ``legacy_keys`` record,
  per current member, the epochs of the keys sealed to it so far (the newest
  10,000) and one digest over them: they carry no signature, and entry 0 is
  what lets a client still open them to read what 0.11 stored.

Self-contained (plain SQL and the log's format functions), so that later
changes to the store code cannot change what this revision does.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

from unibus.memberlog import LEGACY_KEYS, canonical, entry_hash, legacy_keys_json, member_json, snapshot_entry

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "log_entries",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
    )
    op.create_table(
        "log_nonces",
        sa.Column("keyid", sa.String(128), primary_key=True),
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer(), nullable=False),
    )
    op.create_table(
        "room_epochs",
        sa.Column("room_id", sa.String(40), sa.ForeignKey("rooms.room_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("epoch", sa.Integer(), primary_key=True),
        sa.Column("sealer", sa.String(32), nullable=False),
        sa.Column("log_seq", sa.Integer(), nullable=False),
        sa.Column("log_hash", sa.String(64), nullable=False),
    )
    op.add_column("sealed_keys", sa.Column("sig", sa.LargeBinary(64), nullable=True))
    write_snapshot(op.get_bind())


def write_snapshot(conn: sa.Connection) -> None:
    """Entry 0 of kind snapshot, if the database has members and no log yet."""
    if conn.execute(sa.text("SELECT count(*) FROM log_entries")).scalar():
        return
    members = [member_json(h, r, bytes(sp), bytes(ep), es, bp) for h, r, sp, ep, es, bp in conn.execute(sa.text(
        "SELECT handle, role, sign_pub, enc_pub, enc_suite, bus_pub FROM members ORDER BY handle"))]
    if not members:
        return
    known = {m["handle"] for m in members}
    # Ownership dies with its member: say so in the rows too, as the snapshot does.
    conn.execute(sa.text("UPDATE rooms SET owner = '' WHERE owner NOT IN (SELECT handle FROM members)"))
    rosters: dict[str, list[str]] = {}
    for room_id, handle in conn.execute(sa.text("SELECT room_id, handle FROM room_members ORDER BY handle")):
        if handle in known:
            rosters.setdefault(room_id, []).append(handle)
    sealed: dict[str, list[tuple[int, str, bytes]]] = {}
    for room_id, epoch, handle, value in conn.execute(sa.text(
            "SELECT room_id, epoch, handle, sealed FROM sealed_keys WHERE sig IS NULL ORDER BY room_id, epoch, handle")):
        sealed.setdefault(room_id, []).append((int(epoch), handle, bytes(value)))
    rooms = []
    for rid, name, owner, epoch, rekey in conn.execute(sa.text(
            "SELECT room_id, name, owner, epoch, rekey_required FROM rooms ORDER BY room_id")):
        room = {"room_id": rid, "name": name, "owner": owner if owner in known else "", "epoch": int(epoch),
                "rekey_required": bool(rekey), "members": rosters.get(rid, [])}
        legacy = legacy_keys_json((e, h, v) for e, h, v in sealed.get(rid, ()) if h in known and 1 <= e <= int(epoch))
        if legacy:
            room[LEGACY_KEYS] = legacy
        rooms.append(room)
    entry = snapshot_entry(int(time.time()), members, rooms)
    conn.execute(sa.text("INSERT INTO log_entries (seq, hash, entry) VALUES (0, :hash, :entry)"),
                 {"hash": entry_hash(entry), "entry": canonical(entry).decode("utf-8")})


def downgrade() -> None:
    with op.batch_alter_table("sealed_keys") as batch:
        batch.drop_column("sig")
    op.drop_table("room_epochs")
    op.drop_table("log_nonces")
    op.drop_table("log_entries")
