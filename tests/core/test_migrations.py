"""Migrations: the recorded head, the fast path, and a store that only moves forward."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from unibus.client.keys import generate_identity
from unibus.errors import ConfigError
from unibus.memberlog import LogError, LogState, entry_hash
from unibus.migrations import HEAD_REVISION
from unibus.store.base import Conflict
from unibus.store.db import head_revision, migrate, stored_revision
from unibus.store.sqlite import SqliteStore, read_membership
from unibus.testing import run_membershipd
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


# -- the membership log: revision 0004, `migrate` and `member add` ------------------------------------


def log_rows(db):
    with sqlite3.connect(db) as conn:
        return [(seq, digest, json.loads(text)) for seq, digest, text in
                conn.execute("select seq, hash, entry from log_entries order by seq")]


def fingerprint_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("trust root fingerprint: ")]
    assert len(lines) == 1, stdout
    return lines[0].split()[3]


def test_a_011_database_gets_a_snapshot_that_replays_to_its_state(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    db = data_dir / "membershipd.db"
    people = {"alice": generate_identity("alice"), "bob": generate_identity("bob", "MLKEM768_X25519"),
              "carol": generate_identity("carol")}
    roles = {"alice": "admin", "bob": "member", "carol": "member"}
    build_011_database(db, [(h, roles[h], i.sign_pub, i.enc_pub, i.enc_suite) for h, i in people.items()],
                       [("r0", "ops", "alice", ["alice", "bob"]), ("r1", "orphans", "ghost", ["bob", "carol"])])
    with sqlite3.connect(db) as conn:  # r0 was keyed three times; its last key is still stored
        conn.execute("update rooms set epoch = 3, rekey_required = 0 where room_id = 'r0'")
        conn.execute("insert into sealed_keys values ('r0', 3, 'bob', x'0102')")
    proc = run_membershipd("migrate", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    root = fingerprint_line(proc.stdout)
    assert f"`unibus trust {root}`" in proc.stdout

    [(seq, digest, entry)] = log_rows(db)
    assert (seq, digest) == (0, root) and entry["kind"] == "snapshot" and entry_hash(entry) == root
    state = LogState(trust_root=root)
    state.apply(entry)
    assert {h: (m.role, m.sign_pub, m.enc_pub, m.enc_suite, m.bus_pub) for h, m in state.members.items()} == {
        h: (roles[h], i.sign_pub, i.enc_pub, i.enc_suite, None) for h, i in people.items()}
    assert {rid: r.as_json() for rid, r in state.rooms.items()} == {
        "r0": {"room_id": "r0", "name": "ops", "owner": "alice", "epoch": 3, "rekey_required": False,
               "members": ["alice", "bob"]},
        "r1": {"room_id": "r1", "name": "orphans", "owner": "", "epoch": 0, "rekey_required": True,
               "members": ["bob", "carol"]}}
    # the key 0.11 sealed carries no signature: entry 0 records it, so that bob can still open it to read
    # what was stored under it (and no other key the server might offer instead)
    assert [r.get("legacy_keys") for r in entry["state"]["rooms"]] == [
        {"bob": {"epochs": [[3, 3]], "sha256": hashlib.sha256(hashlib.sha256(b"\x01\x02").digest()).hexdigest()}},
        None]
    state.check_legacy_keys("r0", "bob", {3: b"\x01\x02"})

    async def check_store() -> None:
        store = SqliteStore(db)
        try:
            assert (await store.get_room("r1")).owner == ""  # the rows say what the snapshot says
            old = await store.get_key_package("r0", "bob")
            assert (old.epoch, old.sealed, old.sig, old.sealer, old.log_head) == (3, b"\x01\x02", None, None, None)
            assert old.as_json()["sig"] is None
            assert await store.log_head() == (0, root)
        finally:
            await store.close()

    asyncio.run(check_store())
    again = run_membershipd("migrate", "--data-dir", str(data_dir))
    assert again.returncode == 0 and "already at revision" in again.stdout
    assert fingerprint_line(again.stdout) == root and len(log_rows(db)) == 1


def test_an_empty_database_gets_no_snapshot(tmp_path):
    data_dir = tmp_path / "data"
    proc = run_membershipd("migrate", "--data-dir", str(data_dir))
    assert proc.returncode == 0 and "fingerprint" not in proc.stdout
    assert log_rows(data_dir / "membershipd.db") == []


def test_member_add_writes_a_bootstrap_entry_and_prints_its_fingerprint(tmp_path):
    data_dir = tmp_path / "data"
    alice, bob = generate_identity("alice"), generate_identity("bob")

    def add(i, role):
        return run_membershipd("member", "add", "--data-dir", str(data_dir), "--handle", i.handle, "--role", role,
                               "--sign-pub", i.sign_pub_b64, "--enc-pub", i.enc_pub_b64, "--bus-pub", i.bus_pub)

    first = add(alice, "admin")
    assert first.returncode == 0, first.stderr
    root = fingerprint_line(first.stdout)
    assert f"trust root fingerprint: {root} (members pin it with `unibus trust {root}`)" in first.stdout
    second = add(bob, "member")
    assert second.returncode == 0, second.stderr
    rows = log_rows(data_dir / "membershipd.db")
    assert [(s, e["kind"], e["member"]["handle"]) for s, _d, e in rows] == [(0, "bootstrap", "alice"),
                                                                            (1, "bootstrap", "bob")]
    later = rows[1][1]
    assert (f"recovery bootstrap at seq 1, fingerprint {later}: clients refuse it until each member runs "
            f"`unibus trust {later}`") in second.stdout
    assert add(bob, "member").returncode == 1  # the handle exists: no member, no entry
    assert len(log_rows(data_dir / "membershipd.db")) == 2

    pinned = LogState(trust_root=root)
    pinned.apply(rows[0][2])
    with pytest.raises(LogError):  # a later bootstrap is refused until re-trusted
        pinned.apply(rows[1][2])
    trusted = LogState(trust_root=root, accepted_bootstraps={later})
    for _seq, _digest, entry in rows:
        trusted.apply(entry)
    assert set(trusted.members) == {"alice", "bob"} and trusted.members["alice"].role == "admin"


def migrated_data_dir(tmp_path):
    """A data directory (0700) whose database is at the newest revision: ``(data_dir, db)``."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    db = data_dir / "membershipd.db"
    migrate(db)
    return data_dir, db


def test_a_database_of_a_newer_unibus_is_refused_with_exit_2_and_left_as_it_is(tmp_path):
    """A rollback to this version, or a data directory copied from a newer node: alembic's "Can't
    locate revision" was an exit 1, which the unit restarts 10 times, and `backup` archived it
    although `restore` refuses such an archive (an operations audit)."""
    data_dir, db = migrated_data_dir(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("update alembic_version set version_num = '0099'")
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the file itself holds it: compared below
    before = db.read_bytes()
    for argv in (["migrate", "--data-dir", str(data_dir)],
                 ["backup", "--data-dir", str(data_dir), "--out", str(tmp_path / "a.tar")]):
        proc = run_membershipd(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and "'0099'" in errors[0] and "a newer unibus made it" in errors[0], proc.stderr
    assert db.read_bytes() == before and not (tmp_path / "a.tar").exists()
    with pytest.raises(ConfigError, match="newer unibus"):
        migrate(db)


@pytest.mark.parametrize("rows", [[""], ["0004", "0099"], ["0099", "0004"]], ids=["blank", "two-known-first",
                                                                                 "two-unknown-first"])
def test_a_damaged_revision_table_is_refused_with_exit_2(tmp_path, rows):
    """The review of the check: a blank revision was a traceback from alembic, and of two rows only
    the first was read (0004 then 0099 passed)."""
    data_dir, db = migrated_data_dir(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("delete from alembic_version")
        conn.executemany("insert into alembic_version values (?)", [(r,) for r in rows])
    for argv in (["migrate", "--data-dir", str(data_dir)],  # and backup: restore would refuse its archive
                 ["backup", "--data-dir", str(data_dir), "--out", str(tmp_path / "a.tar")]):
        proc = run_membershipd(*argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert not (tmp_path / "a.tar").exists()
