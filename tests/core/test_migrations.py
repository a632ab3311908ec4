"""Migrations: the recorded head, the fast path, and a store that only moves forward."""

from __future__ import annotations

import sqlite3
import sys
import subprocess

from unibus.migrations import HEAD_REVISION
from unibus.store.db import head_revision, migrate, stored_revision


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
