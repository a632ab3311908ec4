"""An answered write is on disk before its answer leaves (docs/operations.md, "Durability").

strace is attached to a running membershipd (every thread) around a member
change and a blob upload, and the order of the system calls is checked: the
fsync of what carries the change ends before membershipd sends its ``201``.
A page-cache-only write (SQLite with ``synchronous=OFF``, a blob store that
renames without syncing) would fail here. The cluster's version (the Raft log
on a quorum) is in test_cluster_faults.py. Without strace, only the
configuration is checked (tests/core/test_durability.py).
"""

from __future__ import annotations

import os
import re

import pytest
from helpers import require_tool
from straced import RENAMES, SENDS, SYNCS, WRITES, Tracer, can_trace, first, synced_after

from unibus.client import UnibusClient
from unibus.client.blobs import put_raw_blob
from unibus.client.keys import generate_identity
from unibus.testing import MembershipdProcess, bootstrap_member


@pytest.fixture(scope="module")
def traceable():
    reason = can_trace()
    require_tool(f"strace cannot run here: {reason}" if reason else None)


async def test_a_member_change_and_a_blob_are_fsynced_before_their_201(tmp_path, traceable):
    alice = generate_identity("alice")
    data_dir = tmp_path / "node"
    bootstrap_member(data_dir, alice, "admin")
    daemon = MembershipdProcess(data_dir).start()
    try:
        blob = tmp_path / "blob.bin"
        blob.write_bytes(os.urandom(300_000))
        handle = "durable" + os.urandom(4).hex()
        bob = generate_identity(handle)
        async with UnibusClient(daemon.base_url, alice) as a:
            room = (await a.create_room("fsync"))["room_id"]
            with Tracer([daemon.pid], tmp_path / "trace") as tracer:
                await a.add_member(handle, bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
                stored = await put_raw_blob(a, room, blob)
        calls = tracer.calls(daemon.pid)
        assert calls, "strace saw nothing"

        # the member change: its row goes into SQLite's WAL, which is fsynced before the 201
        wal = first(calls, lambda c: c.name in WRITES and c.path.endswith("/membershipd.db-wal") and handle in c.args)
        assert wal is not None, "the change never reached the WAL"
        sync = synced_after(calls, wal)
        reply = first(calls, lambda c: c.name in SENDS and "HTTP/1.1 201" in c.args, after=wal.start)
        assert sync is not None and reply is not None
        assert sync.end <= reply.start, f"201 sent at {reply.start}, WAL fsync ended at {sync.end}"

        # the blob: data and metadata synced, the staging directory synced, the rename, the room directory synced
        blob_id = stored  # put_raw_blob returns the blob id
        moved = first(calls, lambda c: c.name in RENAMES and f"/blobs/{room}/{blob_id}" in c.args)
        assert moved is not None, "the blob was never renamed into place"
        staging = re.search(r'"([^"]*/blobs/\.tmp/up-[0-9a-f]+)"', moved.args).group(1)
        reply = first(calls, lambda c: c.name in SENDS and "HTTP/1.1 201" in c.args, after=moved.start)
        assert reply is not None
        for path in (f"{staging}/data", f"{staging}/meta.json", staging):
            synced = first(calls, lambda c, p=path: c.name in SYNCS and c.path == p)
            assert synced is not None and synced.end <= moved.start, f"{path} not synced before the rename"
        room_synced = first(calls, lambda c: c.name in SYNCS and c.path.endswith(f"/blobs/{room}"),
                            after=moved.start)
        assert room_synced is not None and room_synced.end <= reply.start, "the rename was not synced before the 201"
    finally:
        daemon.stop()
