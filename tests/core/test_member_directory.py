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


async def test_concurrent_lookups_on_a_cold_cache_find_the_member(tmp_path):
    """A cold cache: every concurrent lookup finds the member, none answers from an empty table."""
    store = await sqlite_store(tmp_path)
    try:
        await store.add_member(member("alice", "admin"))
        directory = MemberDirectory(store)
        found = await asyncio.gather(*(directory.get("alice") for _ in range(50)))
        assert all(f is not None and f[0].handle == "alice" for f in found)
    finally:
        await store.close()


async def test_offline_changes_are_seen_at_once_and_a_reload_drops_the_cache(tmp_path):
    store = await sqlite_store(tmp_path)
    try:
        await store.add_member(member("alice", "admin"))
        directory = MemberDirectory(store)
        assert await directory.get("alice") is not None
        offline = SqliteStore(tmp_path / "state.db")  # as `membershipd member add` does, behind the daemon's back
        await offline.add_member(member("carol"))
        found = await asyncio.gather(*(directory.get("carol") for _ in range(50)))  # not cached while unknown
        assert all(f is not None for f in found)
        await offline.delete_member("carol")  # cached: still there until the daemon hears of it
        await offline.close()
        assert await directory.get("carol") is not None
        await store.reload()  # SIGHUP: the cache is dropped
        assert len(directory) == 0 and await directory.get("carol") is None
    finally:
        await store.close()


async def test_a_read_that_spans_a_change_is_not_cached(tmp_path):
    """A lookup whose store read started before a deletion may answer with the
    member (the request was in flight before it), but never caches it."""
    store = await sqlite_store(tmp_path)
    try:
        await store.add_member(member("bob"))
        directory = MemberDirectory(store)
        lookup = asyncio.ensure_future(directory.get("bob"))
        await asyncio.sleep(0)  # the lookup is now awaiting its read
        await store.delete_member("bob")
        await lookup
        assert "bob" not in directory._members
        assert await directory.get("bob") is None
    finally:
        await store.close()


async def test_unknown_handles_cost_no_memory(tmp_path):
    store = await sqlite_store(tmp_path)
    try:
        directory = MemberDirectory(store)
        assert [await directory.get(f"nobody{i}") for i in range(100)] == [None] * 100
        assert len(directory) == 0
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
