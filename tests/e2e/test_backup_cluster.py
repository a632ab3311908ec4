"""Backups across the cluster boundary, both ways, through one cluster:

1. a single node's backup is restored and moved into a fresh (empty) cluster
   with ``migrate-to-kv``: the cluster serves the same state, blobs included;
2. that cluster, while writes go on through another node, is backed up and
   restored to a single node: the daemon serves exactly one instant of it.

Marked slow: run in CI, skip locally with -m "not slow".
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import nats
import pytest

from unibus.client import ApiError, UnibusClient
from unibus.client.blobs import get_raw_blob, put_raw_blob
from unibus.client.keys import generate_identity
from unibus.plugins.blobstore.objectstore import CHUNK_SIZE
from unibus.store.kv import KvStore
from unibus.testing import MembershipdProcess, bootstrap_member, run_membershipd

from clusters import Cluster
from helpers import whole_log
from storecheck import assert_rows_match_log, read_store, replay, stored_blobs

pytestmark = pytest.mark.slow


async def eventually_signed(node: MembershipdProcess, identity, timeout: float = 30) -> None:
    """Until ``identity`` is known on ``node`` (its KV watch) and quorum answers."""
    deadline = time.monotonic() + timeout
    while True:
        async with UnibusClient(node.base_url, identity, timeout=5) as client:
            try:
                await client.me()
                return
            except ApiError as e:
                if e.status not in (401, 503) or time.monotonic() > deadline:
                    raise
        await asyncio.sleep(0.2)


async def kv_log(node: MembershipdProcess) -> list[str]:
    """The cluster's membership log as stored (each entry's exact text), read through ``node``."""
    nc = await nats.connect(node.nats_url, nkeys_seed=str(node.data_dir / "service.nkey"))
    try:
        return await KvStore(nc.jetstream(timeout=5), timeout=5).log_entries(limit=100_000)
    finally:
        await nc.close()


async def single_node_backup(tmp_path, alice, bob) -> dict:
    """A single node's state and its backup archive."""
    source = tmp_path / "single"
    bootstrap_member(source, alice, "admin")
    daemon = MembershipdProcess(source).start()
    out: dict = {"blobs": {}}
    try:
        async with UnibusClient(daemon.base_url, alice) as a:
            await a.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
            room = out["room"] = (await a.create_room("ops"))["room_id"]
            await a.add_room_member(room, "bob")
            await a.rekey(room)
            await a.rekey(room)
            for size in (1, 300_000):
                data = os.urandom(size)
                (tmp_path / "blob").write_bytes(data)
                out["blobs"][(room, await put_raw_blob(a, room, tmp_path / "blob"))] = data
            out["packages"] = {e: await a.my_key(room, e) for e in (1, 2)}
            out["entries"] = await whole_log(a)
        out["archive"] = tmp_path / "single.tar"
        proc = await asyncio.to_thread(run_membershipd, "backup", "--out", str(out["archive"]), "--data-dir",
                                       str(source))
        assert proc.returncode == 0, proc.stderr
    finally:
        daemon.stop()
    out["log"] = [text for _s, _h, text in read_store(source / "membershipd.db")["log"]]
    return out


async def test_backups_cross_the_cluster_boundary_both_ways(tmp_path, membershipd_factory):
    alice, bob = generate_identity("alice"), generate_identity("bob")
    single = await single_node_backup(tmp_path, alice, bob)
    room = single["room"]
    blobs = dict(single["blobs"])
    moved = tmp_path / "moved"
    proc = await asyncio.to_thread(run_membershipd, "restore", "--in", str(single["archive"]), "--data-dir", str(moved))
    assert proc.returncode == 0, proc.stderr

    cluster = Cluster(tmp_path / "cluster")  # empty: it gets everything from migrate-to-kv
    try:
        cluster.start(0, 1, 2)
        n1, n2, n3 = cluster.nodes

        # 1. single -> restore -> migrate-to-kv into the fresh cluster: the same state.
        proc = await asyncio.to_thread(run_membershipd, "migrate-to-kv", "--data-dir", str(moved), "--nats-url",
                                       n1.nats_url, "--nkey-seed-file", str(n1.data_dir / "service.nkey"),
                                       "--kv-replicas", "3")
        assert proc.returncode == 0, proc.stderr
        assert "2 member(s), 1 room(s), 2 sealed epoch(s), 2 blob(s)" in proc.stdout
        assert await kv_log(n1) == single["log"]
        await eventually_signed(n2, alice)
        async with UnibusClient(n2.base_url, alice) as a:
            assert sorted(m["handle"] for m in await a.list_members()) == ["alice", "bob"]
            assert await whole_log(a) == single["entries"]
            for e in (1, 2):
                assert await a.my_key(room, e) == single["packages"][e]
        await eventually_signed(n3, bob)
        async with UnibusClient(n3.base_url, bob) as b:  # another node: the blobs are in the object store
            for (rid, blob_id), data in blobs.items():
                await get_raw_blob(b, rid, blob_id, tmp_path / "out")
                assert (tmp_path / "out").read_bytes() == data
        nc = await nats.connect(n1.nats_url, nkeys_seed=str(n1.data_dir / "service.nkey"))
        try:
            assert (await nc.jetstream().stream_info("OBJ_unibus_blobs")).config.num_replicas == 3
        finally:
            await nc.close()

        # 2. The cluster moves on, then is backed up through node 1 while node 3 takes writes.
        async with UnibusClient(n2.base_url, alice) as a:
            await a.remove_room_member(room, "bob")
            epoch = await a.rekey(room)
            (tmp_path / "blob").write_bytes(b"cluster-made")
            blobs[(room, await put_raw_blob(a, room, tmp_path / "blob"))] = b"cluster-made"
            doomed = (await a.create_room("doomed"))["room_id"]
            await put_raw_blob(a, doomed, tmp_path / "blob")
            await a.delete_room(doomed)
            package = await a.my_key(room, epoch)
        # Blobs of several full-size chunks (the largest the default max_payload takes), put
        # through every node and read through the next: whichever node leads the object store's
        # stream, the chunks replicate, and the backup below takes them.
        for i, node in enumerate(cluster.nodes):
            data = os.urandom(2 * CHUNK_SIZE + 12_345)
            (tmp_path / "blob").write_bytes(data)
            await eventually_signed(node, alice)
            async with UnibusClient(node.base_url, alice) as a:
                blob_id = await put_raw_blob(a, room, tmp_path / "blob")
            blobs[(room, blob_id)] = data
            async with UnibusClient(cluster.nodes[(i + 1) % 3].base_url, alice) as a:
                await get_raw_blob(a, room, blob_id, tmp_path / "out")
            assert (tmp_path / "out").read_bytes() == data
        stop = asyncio.Event()
        made: list[str] = []

        async def writer(node: MembershipdProcess) -> None:
            async with UnibusClient(node.base_url, alice) as w:
                await eventually_signed(node, alice)
                lost = 0  # in a row: every logged write is a compare-and-set on the log head
                while not stop.is_set():
                    try:
                        made.append((await w.create_room(f"busy {len(made)}"))["room_id"])
                        lost = 0
                    except ApiError as e:  # the documented answer when other nodes' writes win 12 times
                        if e.status != 409 or "try again" not in str(e.problem.get("detail")) or lost >= 20:
                            raise
                        lost += 1

        # A writer on every node, each in a tight loop: a read that waits for a moment without
        # writes starved for the whole budget under one (CI, 2 cores); backup must not need one.
        tasks = [asyncio.create_task(writer(node)) for node in (n1, n2, n3)]
        try:
            async def under_way() -> None:
                while len(made) < 9:
                    for task in tasks:
                        if task.done():
                            task.result()  # raises what stopped the writer
                            raise AssertionError("a writer stopped before they were under way")
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(under_way(), 120)
            before = list(made)
            archive = tmp_path / "cluster.tar.gz"
            backup = await asyncio.to_thread(run_membershipd, "backup", "--out", str(archive), "--data-dir",
                                             str(n1.data_dir), "--nats-url", n1.nats_url)
            during = len(made) - len(before)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        assert during > 0, "no write went on while backup ran"
        assert "disconnected" not in backup.stderr, backup.stderr  # its own close is no warning (red team)
        assert backup.returncode == 0, backup.stderr
        log = await kv_log(n1)
    finally:
        cluster.stop()
    assert archive.stat().st_mode & 0o777 == 0o600
    raw = archive.read_bytes()
    for node in cluster.nodes:  # no node's secret went into the archive
        for name in ("service.nkey", "system.nkey", "plugins/auth_enforce/issuer.nkey"):
            if (node.data_dir / name).exists():
                assert (node.data_dir / name).read_bytes().strip() not in raw

    # 3. cluster backup -> restore -> a single node serves one instant of it.
    restored_dir = tmp_path / "restored"
    proc = await asyncio.to_thread(run_membershipd, "restore", "--in", str(archive), "--data-dir", str(restored_dir))
    assert proc.returncode == 0, proc.stderr
    got = read_store(restored_dir / "membershipd.db")
    assert [text for _seq, _hash, text in got["log"]] == log[:len(got["log"])]  # a byte-identical prefix
    assert_rows_match_log(got, replay(got["log"]))  # rows and log: one instant
    assert set(before) <= set(got["rooms"]) <= set(made) | {room}
    assert stored_blobs(restored_dir) == blobs  # the doomed room's blob went with its room

    daemon = membershipd_factory(data_dir=restored_dir)
    async with UnibusClient(daemon.base_url, alice) as a:
        assert sorted(m["handle"] for m in await a.list_members()) == ["alice", "bob"]
        assert await whole_log(a) == [json.loads(text) for _s, _h, text in got["log"]]  # past one page
        assert await a.my_key(room, epoch) == package
        for e in (1, 2):
            assert await a.my_key(room, e) == single["packages"][e]
        for (rid, blob_id), data in blobs.items():
            await get_raw_blob(a, rid, blob_id, tmp_path / "out")
            assert (tmp_path / "out").read_bytes() == data
    async with UnibusClient(daemon.base_url, bob) as b:
        assert [r["room_id"] for r in await b.list_rooms()] == []  # removed from ops before the backup
