"""Migrations: the recorded head, the fast path, and a store that only moves forward."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys

import pytest

from unibus.migrations import HEAD_REVISION
from unibus.store.base import Conflict
from unibus.store.db import head_revision, migrate, stored_revision
from unibus.store.sqlite import SqliteStore, read_membership
from unibus.wire import nkey_from_sign_pub


def test_head_revision_constant_matches_alembic():
    assert head_revision() == HEAD_REVISION


def test_migrate_creates_every_table_and_is_idempotent(tmp_path):
    db = tmp_path / "membershipd.db"
    assert migrate(db) == (None, HEAD_REVISION)
    assert stored_revision(db) == HEAD_REVISION
    assert migrate(db) == (HEAD_REVISION, HEAD_REVISION)
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
    assert {"members", "rooms", "room_members", "sealed_keys", "unibus_meta", "alembic_version"} <= tables
    with sqlite3.connect(db) as conn:  # bus keys: unique where set, any number of NULLs
        conn.execute("insert into members values ('a', 'member', x'01', x'01', 'X25519', '2026-01-01', NULL)")
        conn.execute("insert into members values ('b', 'member', x'02', x'02', 'X25519', '2026-01-01', NULL)")
        conn.execute("insert into members values ('c', 'member', x'03', x'03', 'X25519', '2026-01-01', 'UKEY')")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("insert into members values ('d', 'member', x'04', x'04', 'X25519', '2026-01-01', 'UKEY')")


def test_upgrade_from_the_first_revision(tmp_path):
    from alembic import command

    from unibus.store.db import alembic_config, make_engine

    db = tmp_path / "old.db"
    engine = make_engine(db)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    engine.dispose()
    assert stored_revision(db) == "0001"
    assert migrate(db) == ("0001", HEAD_REVISION)


def test_a_started_store_needs_no_alembic_import(tmp_path):
    db = tmp_path / "membershipd.db"
    migrate(db)
    code = ("import sys; from pathlib import Path; from unibus.store.db import migrate; "
            f"migrate(Path({str(db)!r})); print('alembic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def build_011_database(db, members, rooms=()) -> None:
    """A database as 0.11 left it: alembic revision 0002 and rows written with 0.11's columns.

    ``members``: ``(handle, role, sign_pub, enc_pub, enc_suite)``; ``rooms``:
    ``(room_id, name, owner, [handles])``.
    """
    from datetime import UTC, datetime

    from alembic import command

    from unibus.store.db import alembic_config, make_engine

    engine = make_engine(db)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    engine.dispose()
    now = datetime.now(UTC).isoformat()
    with sqlite3.connect(db) as conn:
        conn.executemany("insert into members (handle, role, sign_pub, enc_pub, enc_suite, created_at) "
                         "values (?, ?, ?, ?, ?, ?)", [(*m, now) for m in members])
        for room_id, name, owner, handles in rooms:
            conn.execute("insert into rooms (room_id, name, owner, epoch, rekey_required, created_at) "
                         "values (?, ?, ?, 0, 1, ?)", (room_id, name, owner, now))
            conn.executemany("insert into room_members (room_id, handle, added_at) values (?, ?, ?)",
                             [(room_id, h, now) for h in handles])


def test_a_011_database_upgrades_without_loss_and_without_bus_keys(tmp_path):
    db = tmp_path / "membershipd.db"
    rows = [("alice", "admin", os.urandom(32), os.urandom(32), "X25519"),
            ("bob", "member", os.urandom(32), os.urandom(1216), "MLKEM768_X25519")]
    build_011_database(db, rows, [("r0", "ops", "alice", ["alice", "bob"])])
    assert stored_revision(db) == "0002"
    assert migrate(db) == ("0002", HEAD_REVISION)
    membership = read_membership(db)
    assert [(m.handle, m.role, m.sign_pub, m.enc_pub, m.enc_suite, m.bus_pub) for m in membership.members] == [
        (*r, None) for r in rows]
    assert membership.rooms == {"r0": frozenset({"alice", "bob"})}

    async def two_keys() -> None:
        store = SqliteStore(db)
        try:  # the unique index allows any number of members without a key, and no two with the same one
            key = nkey_from_sign_pub(os.urandom(32))
            await store.set_bus_key("alice", key)
            with pytest.raises(Conflict):
                await store.set_bus_key("bob", key)
            assert (await store.get_member("bob")).bus_pub is None
        finally:
            await store.close()

    asyncio.run(two_keys())
