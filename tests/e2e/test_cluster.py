"""Three membershipd nodes on loopback: mutual route TLS, R3 state, failover, fail-closed.

Marked slow: run in CI, skip locally with -m "not slow".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import nats
import pytest
from clusters import FORM_TIMEOUT, SECRET, Cluster, connect_member, eventually, signed_ok

from unibus.client import ApiError, UnibusClient
from unibus.client.keys import generate_identity
from unibus.testing import MembershipdProcess, freeze, member_connections

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, generate_identity("alice"))
    try:
        c.start()
        for _ in range(2):  # the second run changes nothing
            proc = c.migrate()
        assert "nothing to do" in proc.stdout
        yield c
    finally:
        c.stop()


async def _degraded(node: MembershipdProcess) -> bool:
    status, body = node.healthz()
    return status == 503 and body["status"] == "degraded" and body["nats"]["jetstream"] is False


async def test_cluster_forms_fails_over_and_fails_closed(cluster):
    alice = cluster.identity
    # formed: every node enforce+acl+tls, routed to both peers, R3 nonce bucket
    for node in cluster.nodes:
        status, body = node.healthz()
        assert status == 200
        assert body["posture"]["summary"] == "enforce+acl+tls"
        assert body["nats"]["kv_replicas"] == 3
        assert body["nats"]["cluster"]["name"] == "unibus-test"
        assert await eventually(lambda n=node: _routes(n, 2), 30)
    # the same on /metrics (docs/operations.md, "Metrics"): a cluster node's route peers, its health
    for port in cluster.metrics_ports:
        assert await eventually(lambda p=port: _metric_is(p, "unibus_cluster_routes", 2), 10)
        assert _metric(port, "unibus_healthy") == 1 and _metric(port, "unibus_posture_secure") == 1
    nc = await nats.connect(cluster.nodes[0].nats_url, nkeys_seed=str(cluster.nodes[0].data_dir / "service.nkey"))
    try:
        info = await nc.jetstream().stream_info("KV_unibus_nonces")
        assert info.config.num_replicas == 3
    finally:
        await nc.close()

    # signed requests work through every node: the admin copied into KV reached all of them
    for node in cluster.nodes:
        assert await eventually(lambda n=node: signed_ok(n, alice), 10)

    # a member added through node 1 is known to node 3 (KV watch) and may use its bus
    bob = generate_identity("bob")
    async with UnibusClient(cluster.nodes[0].base_url, alice) as a1:
        await a1.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
        room = (await a1.create_room("ops"))["room_id"]
        await a1.add_room_member(room, "bob")
    t0 = time.monotonic()
    assert await eventually(lambda: signed_ok(cluster.nodes[2], bob), 10)

    async def bob_on_node3_bus() -> bool:
        try:
            nc = await nats.connect(cluster.nodes[2].nats_url, nkeys_seed_str=bob.bus_nkey_seed(), allow_reconnect=False,
                                    max_reconnect_attempts=0, connect_timeout=2)
        except Exception:
            return False
        await nc.close()
        return True

    assert await eventually(bob_on_node3_bus, 10)
    print(f"member added on node 1 usable on node 3 after {time.monotonic() - t0:.2f} s")

    # bob cannot reach the cluster's membership (KV state) with the 0.11 reply-subject trick, nor directly
    await reply_trick_reaches_nothing(cluster, bob, room, alice)

    # rights change on every node before the 2xx, and fail closed when a kick cannot be confirmed
    await removal_cuts_off_on_another_node(cluster, bob, room, alice)

    # one node down: signed writes keep working through the others (after an election)
    cluster.kill(0)
    for node in cluster.nodes[1:]:
        assert await eventually(lambda n=node: signed_ok(n, alice), 30)

    # two down: no quorum, a freshly signed request fails closed with 503, quickly
    cluster.kill(1)
    # an answer, not a hang: the client's own timeout would raise something else than ApiError
    async with UnibusClient(cluster.nodes[2].base_url, alice, timeout=15) as client:
        with pytest.raises(ApiError) as e:
            await client.me()
    assert e.value.status == 503
    # and /healthz says so: a replica still answered the stream's info without a leader, and it
    # said "ok" while every signed request was refused (a black-box test of the contract)
    assert await eventually(lambda: _degraded(cluster.nodes[2]), 15)

    # back: state converges, nothing written before is lost
    cluster.restart(0)
    cluster.restart(1)
    for node in cluster.nodes:
        node.wait_healthy(timeout=FORM_TIMEOUT)
    for node in cluster.nodes:
        assert await eventually(lambda n=node: signed_ok(n, alice), 60)
    async with UnibusClient(cluster.nodes[1].base_url, alice) as a2:
        rooms = await a2.list_rooms()
        assert [r["name"] for r in rooms] == ["ops"]  # written before the outage, still there
        assert {m["handle"] for m in rooms[0]["members"]} == {"alice", "bob"}


async def test_no_secret_in_argv_or_logs(cluster):
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert SECRET.encode() not in cmdline, f"route password in argv of pid {pid}"
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"nats-server" in cmdline:
            assert SECRET.encode() not in environ
    for node in cluster.nodes:
        # what /proc/PID/cmdline shows of a node started as a new interpreter (a forked one shows its zygote's)
        assert not any(SECRET in arg for arg in node.argv), node.argv
        assert SECRET not in node.log_text()
        conf = node.data_dir / "nats.conf"
        assert conf.stat().st_mode & 0o077 == 0
        assert SECRET in conf.read_text()  # the one place it belongs


async def reply_trick_reaches_nothing(cluster: Cluster, bob, room: str, alice) -> None:
    eve = generate_identity("eve")
    forged = json.dumps({"handle": "eve", "role": "admin", "sign_pub": eve.sign_pub_b64, "enc_pub": eve.enc_pub_b64,
                          "enc_suite": "X25519", "created_at": "2026-01-01T00:00:00+00:00",
                          "bus_pub": eve.bus_pub}).encode()
    targets = {"$KV.unibus_state.member.eve": forged, "$KV.unibus_state.meta.admins": b'{"admins":["eve"]}',
               "$JS.API.STREAM.PURGE.KV_unibus_state": b""}
    errors: list[str] = []

    async def error_cb(e: Exception) -> None:
        errors.append(str(e).lower())

    async def in_room_on_node3() -> bool:
        # node 3 applies the room membership from its KV watch: wait until bob's connection has it
        try:
            nc = await nats.connect(cluster.nodes[2].nats_url, nkeys_seed_str=bob.bus_nkey_seed(),
                                    allow_reconnect=False, connect_timeout=2, error_cb=error_cb)
        except (nats.errors.Error, OSError, TimeoutError):
            # a callout that no membershipd answered in time (a loaded machine) is
            # "Authorization Violation" too: try again, within the bound
            return False
        try:
            sub = await nc.subscribe(f"unibus.room.{room}.probe")
            await nc.flush()
            await nc.publish(f"unibus.room.{room}.probe", b"?")
            await sub.next_msg(timeout=0.5)
            return True
        except nats.errors.Error:
            return False
        finally:
            await nc.close()

    assert await eventually(in_room_on_node3, 10)

    async def try_every_target() -> bool:
        """One connection tries each target. False if it was closed on the way: a kick
        (rights re-authorized after a change still being confirmed) is not the trick working."""
        errors.clear()
        nc = await connect_member(cluster.nodes[2].nats_url, bob, inbox_prefix="_INBOX_bob", error_cb=error_cb,
                                  connect_timeout=2)
        try:
            own = await nc.subscribe(f"unibus.room.{room}.>")
            # twice: nats-py 2.16 writes the PING of a flush before a SUB still in its
            # pending buffer (unibus.client.api._barrier), and the bait must not beat the SUB
            await nc.flush()
            await nc.flush()
            for subject, payload in targets.items():
                await nc.publish(f"unibus.room.{room}.t", b"bait", reply=subject)
                try:
                    msg = await own.next_msg(timeout=5)
                except nats.errors.TimeoutError:
                    return False  # no bait, no trick tried: connect again (bounded below)
                await nc.publish(msg.reply, payload)
                await nc.publish(subject, payload)
                await nc.flush()

                async def refused(subject: str = subject) -> bool:
                    return any("permissions violation" in e and subject.lower() in e for e in errors)

                assert await eventually(refused, 5), subject
            return True
        except (nats.errors.ConnectionClosedError, nats.errors.TimeoutError):
            if nc.is_closed:
                return False
            raise
        finally:
            await nc.close()

    for _ in range(3):  # bounded: a kick can close at most a connection or two
        if await try_every_target():
            break
    else:
        raise AssertionError("bob's connection to node 3 was closed, or got no bait, three times in a row")
    async with UnibusClient(cluster.nodes[0].base_url, alice) as a1:
        assert {m["handle"] for m in await a1.list_members()} == {"alice", "bob"}
        assert [m["handle"] for m in await a1.list_members() if m["role"] == "admin"] == ["alice"]


async def removal_cuts_off_on_another_node(cluster: Cluster, bob, room: str, alice) -> None:
    n1, n3 = cluster.nodes[0], cluster.nodes[2]
    nc = await connect_member(n3.nats_url, bob)
    try:
        before = await member_connections(n1, "bob", servers=3)
        assert len(before) == 1
        async with UnibusClient(n1.base_url, alice) as a1:
            await a1.remove_room_member(room, "bob")  # served by node 1; bob is on node 3
            # the 204 is here: no server holds bob's connection any more
            assert not before & await member_connections(n1, "bob", servers=3)
            await a1.add_room_member(room, "bob")
    finally:
        await nc.close()

    # a node whose nats-server hangs (one that leads neither bucket, so writes go on):
    # a kick there cannot be confirmed, the change answers 503 (it is committed) and
    # is retried until it is confirmed
    hung, serving = await hang_candidate(cluster)
    nc = await connect_member(hung.nats_url, bob)
    nats_pid = hung.nats_pid()
    assert nats_pid is not None
    freeze(nats_pid)
    try:
        async with UnibusClient(serving.base_url, alice, timeout=20) as a:
            with pytest.raises(ApiError) as e:
                await a.remove_room_member(room, "bob")
            assert e.value.status == 503 and e.value.problem["type"].endswith("/change-not-enforced"), e.value
            assert serving.healthz()[1]["auth_enforce"]["kicks_pending"] == 1  # a count: /healthz answers anyone
            room_now = await a.get_room(room)
            assert "bob" not in {m["handle"] for m in room_now["members"]}  # the change itself is committed
    finally:
        os.kill(nats_pid, signal.SIGCONT)
    assert await eventually(lambda: _no_pending(serving), 30)
    assert await eventually(lambda: _true(nc.is_closed or not nc.is_connected), 10)
    await nc.close()
    async with UnibusClient(serving.base_url, alice) as a:
        await a.add_room_member(room, "bob")


async def hang_candidate(cluster: Cluster) -> tuple[MembershipdProcess, MembershipdProcess]:
    """``(node to hang, node to serve)``: the hung one leads neither the state nor the nonce bucket."""
    n1 = cluster.nodes[0]
    nc = await nats.connect(n1.nats_url, nkeys_seed=str(n1.data_dir / "service.nkey"))
    try:
        js = nc.jetstream()
        leaders = {(await js.stream_info(s)).cluster.leader for s in ("KV_unibus_state", "KV_unibus_nonces")}
    finally:
        await nc.close()
    names = {f"n{i + 1}": node for i, node in enumerate(cluster.nodes)}
    hung = next(node for name, node in names.items() if name not in leaders)
    serving = next(node for node in cluster.nodes if node is not hung)
    return hung, serving


async def _no_pending(node: MembershipdProcess) -> bool:
    return node.healthz()[1]["auth_enforce"]["kicks_pending"] == 0


async def _true(value: bool) -> bool:
    return value


def _metric(port: int, name: str) -> float | None:
    """A metric without labels from a node's /metrics, or None."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return None


async def _metric_is(port: int, name: str, want: float) -> bool:
    return _metric(port, name) == want


async def _routes(node: MembershipdProcess, want: int) -> bool:
    return node.healthz()[1]["nats"]["cluster"]["routes"] == want


async def test_a_hung_membershipd_does_not_keep_a_removed_member_in_the_room_elsewhere(cluster):
    """Adversary: a member removed from a room while one node's membershipd hangs (SIGSTOP; its
    nats-server and routes stay up). The removal is answered 503 (docs/bus-auth.md: it stays committed and
    is retried); meanwhile the member's connection on a healthy node must not keep receiving the room."""
    alice = cluster.identity
    for node in cluster.nodes:
        assert await eventually(lambda n=node: signed_ok(n, alice), 30)
    hung, serving = await hang_candidate(cluster)
    bob = generate_identity("bob")
    async with UnibusClient(serving.base_url, alice) as a:
        await a.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
        room = (await a.create_room("ops"))["room_id"]
        await a.add_room_member(room, "bob")

    live: list = []

    async def bob_in_the_room() -> bool:
        """bob and alice connected to the healthy node, with the room: right after the 2xx a callout may
        still be answered by a node whose KV watch has not delivered the change (grants send no apply)."""
        conns = []
        try:
            for who in (bob, alice):
                conns.append(await nats.connect(serving.nats_url, nkeys_seed_str=who.bus_nkey_seed(),
                                                allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3))
        except Exception:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
            return False
        conn, sender = conns
        sub = await conn.subscribe(f"unibus.room.{room}.>")
        await conn.flush()
        await conn.flush()
        await sender.publish(f"unibus.room.{room}.before", b"hello")
        await sender.flush()
        with contextlib.suppress(nats.errors.TimeoutError, nats.errors.ConnectionClosedError):
            if (await sub.next_msg(timeout=1)).data == b"hello":
                live.extend([conn, sub, sender])
                return True
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        return False

    assert await eventually(bob_in_the_room, 15)
    nc, sub, sender = live
    freeze(hung.pid)
    try:
        async with UnibusClient(serving.base_url, alice, timeout=20) as a:
            with pytest.raises(ApiError) as e:
                await a.remove_room_member(room, "bob")
            assert e.value.status == 503, e.value
        await asyncio.sleep(2)  # the background retry had a turn too
        received = None
        if not nc.is_closed and nc.is_connected:
            await sender.publish(f"unibus.room.{room}.after", b"for members only")
            await sender.flush()
            with contextlib.suppress(nats.errors.TimeoutError, nats.errors.ConnectionClosedError):
                received = (await sub.next_msg(timeout=1)).data
        assert received is None, "bob still receives the room he was removed from, on a healthy node"
    finally:
        os.kill(hung.pid, signal.SIGCONT)
        await sender.close()
        if not nc.is_closed:
            await nc.close()
    assert await eventually(lambda: _no_pending(serving), 30)
