"""MemberDirectory: the in-memory member cache of authentication, against a real SQLite store.

Each test races lookups against the store's own awaits (SQLite runs in an
executor thread), the way concurrent signed requests do.
"""

from __future__ import annotations

import asyncio
import os

from unibus.auth import MemberDirectory
from unibus.store.db import migrate
from unibus.store.sqlite import SqliteStore, new_member


def member(handle: str, role: str = "member"):
    return new_member(handle, role, os.urandom(32), os.urandom(32), "X25519")


async def sqlite_store(tmp_path) -> SqliteStore:
    await asyncio.to_thread(migrate, tmp_path / "state.db")
    return SqliteStore(tmp_path / "state.db")


async def test_lookups_during_the_first_load_wait_for_it(tmp_path):
    """A cold cache: every concurrent lookup sees the loaded table, none an empty one."""
    store = await sqlite_store(tmp_path)
    try:
        await store.add_member(member("alice", "admin"))
        directory = MemberDirectory(store)
        found = await asyncio.gather(*(directory.get("alice") for _ in range(50)))
        assert all(f is not None and f[0].handle == "alice" for f in found)
    finally:
        await store.close()


async def test_lookups_during_a_reload_wait_for_it(tmp_path):
    store = await sqlite_store(tmp_path)
    try:
        await store.add_member(member("alice", "admin"))
        directory = MemberDirectory(store)
        assert await directory.get("alice") is not None
        offline = SqliteStore(tmp_path / "state.db")  # as `membershipd member add` does, behind the daemon's back
        await offline.add_member(member("carol"))
        await offline.close()
        assert await directory.get("carol") is None
        await store.reload()  # SIGHUP: everything is re-read on the next lookup
        found = await asyncio.gather(*(directory.get("carol") for _ in range(50)))
        assert all(f is not None for f in found)
    finally:
        await store.close()


async def test_a_deleted_member_is_refused_by_every_concurrent_lookup(tmp_path):
    """While one lookup re-reads a changed handle, the others must not answer from the old table."""
    store = await sqlite_store(tmp_path)
    try:
        await store.add_member(member("alice", "admin"))
        await store.add_member(member("bob"))
        directory = MemberDirectory(store)
        assert await directory.get("bob") is not None
        await store.delete_member("bob")
        found = await asyncio.gather(*(directory.get("bob") for _ in range(50)))
        assert found == [None] * 50
        assert await directory.get("alice") is not None
    finally:
        await store.close()
