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


async def test_unknown_handles_are_remembered_within_a_bound(tmp_path):
    """Adversary: a network attacker probing handles. A handle found to be no member's is not read
    from the store again (a probe asked twice took longer for a non-member: a timing oracle, and a
    store read per request for whoever sends them), and at most MAX_UNKNOWN of them are kept."""
    from unibus.auth import MAX_UNKNOWN

    store = await sqlite_store(tmp_path)
    closed = False
    try:
        directory = MemberDirectory(store)
        assert [await directory.get(f"nobody{i}") for i in range(MAX_UNKNOWN + 100)] == [None] * (MAX_UNKNOWN + 100)
        assert len(directory) == 0 and len(directory._unknown) == MAX_UNKNOWN
        assert "nobody0" not in directory._unknown and f"nobody{MAX_UNKNOWN + 99}" in directory._unknown
        await store.close()
        closed = True
        # the store is gone: an answer now comes from memory alone
        assert await directory.get(f"nobody{MAX_UNKNOWN + 99}") is None
        try:
            await directory.get("nobody0")  # forgotten: read again, and the closed store fails
        except Exception:
            pass
        else:
            raise AssertionError("a handle beyond the bound was answered without a store read")
    finally:
        if not closed:
            await store.close()


async def test_an_unknown_handle_becomes_a_member_when_one_is_added_or_on_a_reload(tmp_path):
    store = await sqlite_store(tmp_path)
    try:
        directory = MemberDirectory(store)
        assert await directory.get("dave") is None and await directory.get("erin") is None
        await store.add_member(member("dave"))  # through the daemon's store: its change drops "dave" at once
        assert (await directory.get("dave"))[0].handle == "dave"
        offline = SqliteStore(tmp_path / "state.db")  # `membershipd member add`: known after a SIGHUP
        await offline.add_member(member("erin"))
        await offline.close()
        assert await directory.get("erin") is None
        await store.reload()
        assert (await directory.get("erin"))[0].handle == "erin"
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


async def test_a_keyid_that_cannot_be_a_handle_is_refused_without_a_lookup(tmp_path):
    """Adversary: a network attacker. An 8,000-character keyid took 8 KB of the directory's memory of
    unknown handles, and 4,096 of them flushed it (red team). It is refused before the directory."""
    from unibus.auth import BAD_SIGNATURE, Authenticator
    from unibus.client.keys import generate_identity
    from unibus.problems import Problem
    from unibus.signing import sign_request

    store = await sqlite_store(tmp_path)
    try:
        directory = MemberDirectory(store)
        auth = Authenticator(directory, nonces=None, skew=60)  # the nonce claim comes after: not reached
        mallory = generate_identity("mallory")
        for keyid in ("K" * 3000, "Alice", "a b", "nobody"):  # (a longer one is refused as too long)
            headers = sign_request("GET", "/v1/me", b"", keyid=keyid, private_key=mallory.sign_key)
            try:
                await auth.verify("GET", "/v1/me", headers, b"")
            except Problem as e:
                assert e.status == 401 and e.detail == BAD_SIGNATURE
            else:
                raise AssertionError(f"{keyid[:20]!r} was accepted")
        assert list(directory._unknown) == ["nobody"]  # only a keyid that could be a handle is remembered
    finally:
        await store.close()
