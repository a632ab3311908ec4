"""The cluster under faults (docs/operations.md, "Durability"; deploy/cluster/README.md).

Three nodes with R3 state, in one module (the cluster is started once):

1. an acknowledged member change is in the Raft log, fsynced, of at least two
   nodes before its ``201`` leaves (strace on every nats-server and on the
   serving membershipd);
2. while three admins make membership changes and signed reads through the
   nodes, a random node is killed (-9), paused (SIGSTOP/SIGCONT) or restarted,
   one at a time, for ``UNIBUS_FAULT_ROUNDS`` rounds (20, the least the fault test may run) with a seeded RNG
   (``UNIBUS_FAULT_SEED``, printed). Afterwards every acknowledged change is on
   every node, no removed member can sign a request or log in to the bus, and
   the membership log is the same everywhere and replays to the state;
3. every node killed at once: nothing acknowledged is lost, and a request
   accepted before the crash cannot be replayed after it (the nonce bucket,
   in memory, is empty: the nonce epoch rule).

The test asserts invariants, not timings; it prints what it saw (rounds,
changes acknowledged, lost, the longest time no client got an answer).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from clusters import FORM_TIMEOUT, Cluster, eventually, signed_ok
from straced import SENDS, WRITES, Tracer, can_trace, first, synced_after

from helpers import require_tool, service_js, whole_log
from unibus.client import ApiError, ServerUnreachable, UnibusClient
from unibus.client.keys import Identity, generate_identity
from unibus.memberlog import LogState
from unibus.signing import sign_request
from unibus.testing import MembershipdProcess

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("UNIBUS_FAULT_ROUNDS", "20"))
SEED = int(os.environ.get("UNIBUS_FAULT_SEED", str(random.SystemRandom().randrange(1, 2**31))))
CONVERGE_TIMEOUT = 90.0
STREAMS = ("KV_unibus_state", "KV_unibus_nonces")
FAULTS = ("kill -9", "pause", "restart")
FAULT_WEIGHTS = (0.3, 0.5, 0.2)  # a pause is the cheapest to recover from: more of them keep the test short


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("faults"), generate_identity("alice"))
    try:
        c.start()
        c.migrate()
        yield c
    finally:
        c.stop()


# -- helpers --------------------------------------------------------------------------------------


async def streams_current(cluster: Cluster) -> bool:
    """Every node healthy, and the state and nonce streams each with a leader and 2/2 current followers."""
    for node in cluster.nodes:
        try:
            if node.healthz(timeout=2)[0] != 200:
                return False
        except OSError:
            return False
    try:
        async with service_js(cluster.nodes[0]) as js:
            for name in STREAMS:
                info = await js.stream_info(name)
                replicas = info.cluster.replicas or []
                if not info.cluster.leader or len(replicas) != 2 or not all(r.current and not r.offline
                                                                            for r in replicas):
                    return False
    except Exception:
        return False
    return True


async def converge(cluster: Cluster) -> None:
    assert await eventually(lambda: streams_current(cluster), CONVERGE_TIMEOUT), "the cluster did not reconverge"


async def everyone_knows(cluster: Cluster, identity: Identity) -> None:
    for node in cluster.nodes:
        assert await eventually(lambda n=node: signed_ok(n, identity), 30), f"{node.base_url} does not know {identity.handle}"


async def full_log(node: MembershipdProcess, identity: Identity) -> list[dict[str, Any]]:
    async with UnibusClient(node.base_url, identity, timeout=15) as client:
        return await whole_log(client)


async def handles_on(node: MembershipdProcess, identity: Identity) -> set[str]:
    async with UnibusClient(node.base_url, identity, timeout=15) as client:
        return {m["handle"] for m in await client.list_members()}


async def bus_login(node: MembershipdProcess, identity: Identity) -> bool:
    try:
        nc = await nats.connect(node.nats_url, nkeys_seed_str=identity.bus_nkey_seed(), allow_reconnect=False,
                                max_reconnect_attempts=0, connect_timeout=3)
    except Exception:
        return False
    await nc.close()
    return True


async def raw_me(node: MembershipdProcess, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as s, s.get(node.base_url + "/v1/me", headers=headers) as r:
        await r.read()
        return r.status


# -- 1. fsync before the acknowledgement, on a quorum -----------------------------------------------


async def test_an_acknowledged_change_is_fsynced_on_a_quorum_before_its_201(cluster, tmp_path):
    reason = can_trace()
    # Without strace the configuration is checked all the same (tests/core/test_durability.py checks /varz).
    require_tool(f"strace cannot run here: {reason}" if reason else None)
    await converge(cluster)
    alice = cluster.identity
    await everyone_knows(cluster, alice)
    serving = cluster.nodes[0]
    handle = "durable" + os.urandom(4).hex()
    who = generate_identity(handle)
    nats_pids = [n.nats_pid() for n in cluster.nodes]
    assert all(nats_pids)
    async with UnibusClient(serving.base_url, alice, timeout=30) as a:
        await a.me()  # the session is open: the traced window holds the change alone
        with Tracer([serving.pid, *nats_pids], tmp_path / "trace") as tracer:
            await a.add_member(handle, who.sign_pub_b64, who.enc_pub_b64, bus_pub=who.bus_pub)
    reply = first(tracer.calls(serving.pid), lambda c: c.name in SENDS and "HTTP/1.1 201" in c.args)
    assert reply is not None, "membershipd's 201 is not in its trace"
    synced_before = []
    for node, pid in zip(cluster.nodes, nats_pids):
        calls = tracer.calls(pid)
        # the Raft log of the state stream's group: <store>/jetstream/$SYS/_js_/S-R3F-…/msgs/N.blk
        wal = first(calls, lambda c: c.name in WRITES and "/_js_/" in c.path and handle in c.args)
        sync = synced_after(calls, wal) if wal is not None else None
        print(f"{node.data_dir.name}: raft log write {'yes' if wal else 'no'}, fsync "
              f"{'ended %+.1f ms from the 201' % ((sync.end - reply.start) * 1e3) if sync else 'none'}")
        if sync is not None and sync.end <= reply.start:
            synced_before.append(node.data_dir.name)
    assert len(synced_before) >= 2, f"fsynced before the 201 only on {synced_before}: not a quorum"


# -- 2. faults ---------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the clients were told, and what they could not know."""

    identities: dict[str, Identity] = field(default_factory=dict)
    added: set[str] = field(default_factory=set)  # 201
    deleted: set[str] = field(default_factory=set)  # 204
    unsure: set[str] = field(default_factory=set)  # no 2xx, maybe applied (503, timeout): either state is fine
    reads: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # why a request got no 2xx
    unexpected: list[str] = field(default_factory=list)  # a 4xx nobody should get
    successes: list[list[float]] = field(default_factory=list)  # per worker: monotonic times of 2xx


class Worker:
    """An admin that changes the membership through the nodes, moving on to the next node when one fails."""

    def __init__(self, index: int, identity: Identity, cluster: Cluster, ledger: Ledger, rng: random.Random) -> None:
        self.index, self.identity, self.cluster, self.ledger, self.rng = index, identity, cluster, ledger, rng
        self.node = index
        self.mine: list[str] = []  # acknowledged adds not yet deleted
        self.times: list[float] = []
        ledger.successes.append(self.times)
        self.counter = 0

    async def call(self, what: str, fn: Callable[[UnibusClient], Any]) -> tuple[bool, Any]:
        """(True, result) on a 2xx; (False, None) when the node failed us (move to the next)."""
        node = self.cluster.nodes[self.node]
        try:
            async with UnibusClient(node.base_url, self.identity, timeout=4) as client:
                result = await fn(client)
        except ApiError as e:
            kind = str(e.problem.get("type", "")).rsplit("/", 1)[-1] or str(e.status)
            self.ledger.refused[kind] = self.ledger.refused.get(kind, 0) + 1
            if e.status != 503:
                self.ledger.unexpected.append(f"{what} via {node.data_dir.name}: {e.status} {e.problem}")
            self.node = (self.node + 1) % 3
            return False, None
        except ServerUnreachable:
            self.ledger.refused["unreachable"] = self.ledger.refused.get("unreachable", 0) + 1
            self.node = (self.node + 1) % 3
            return False, None
        self.times.append(time.monotonic())
        return True, result

    async def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.45 or not self.mine:
            self.counter += 1
            handle = f"w{self.index}m{self.counter}"
            who = generate_identity(handle)
            self.ledger.identities[handle] = who
            ok, _ = await self.call(f"add {handle}", lambda c: c.add_member(
                handle, who.sign_pub_b64, who.enc_pub_b64, bus_pub=who.bus_pub))
            if ok:
                self.ledger.added.add(handle)
                self.mine.append(handle)
            else:
                self.ledger.unsure.add(handle)
        elif roll < 0.7:
            handle = self.mine.pop(self.rng.randrange(len(self.mine)))
            ok, _ = await self.call(f"delete {handle}", lambda c: c.remove_member(handle))
            (self.ledger.deleted if ok else self.ledger.unsure).add(handle)
        else:
            target = self.rng.choice(self.mine)
            ok, record = await self.call(f"read {target}", lambda c: c.get_member(target))
            if ok:
                assert record["handle"] == target
                self.ledger.reads += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.step()
            await asyncio.sleep(0.25)  # busy, not saturated: the restarts share the machine's two cores


def tail(node: MembershipdProcess, lines: int = 60) -> str:
    """The last ``lines`` of the daemon's own log (nats-server's lines left out)."""
    return "\n".join([line for line in node.log_text().splitlines() if "unibus.nats:" not in line][-lines:])


async def fault(cluster: Cluster, rng: random.Random, n: int, kind: str) -> str:
    node = cluster.nodes[n]
    t0 = time.monotonic()
    if kind == "kill -9":
        cluster.kill(n)
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        cluster.restart(n)
    elif kind == "pause":
        pids = cluster.pause(n)
        try:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
        finally:
            cluster.resume(pids)
    else:  # a clean restart (SIGTERM)
        rc = await asyncio.to_thread(node.stop)
        log = tail(node) if rc != 0 else ""
        cluster.restart(n)  # first: the module's next test gets a whole cluster either way
        assert rc == 0, f"n{n + 1} did not stop within 15 s of SIGTERM (exit {rc}); its log ends:\n{log}"
    t1 = time.monotonic()
    await asyncio.to_thread(cluster.nodes[n].wait_healthy, FORM_TIMEOUT)
    return f"fault {t1 - t0:.1f} s, healthy after {time.monotonic() - t1:.1f} s"


def longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *sorted(times), end]
    return max(b - a for a, b in zip(points, points[1:]))


async def test_membership_survives_faults_of_one_node_at_a_time(cluster):
    print(f"\nfault test: seed {SEED} (UNIBUS_FAULT_SEED={SEED} repeats it), {ROUNDS} rounds")
    rng = random.Random(SEED)
    await converge(cluster)
    alice = cluster.identity
    await everyone_knows(cluster, alice)
    admins = [generate_identity(f"admin{i}") for i in range(3)]
    async with UnibusClient(cluster.nodes[0].base_url, alice, timeout=15) as a:
        for who in admins:
            await a.add_member(who.handle, who.sign_pub_b64, who.enc_pub_b64, role="admin", bus_pub=who.bus_pub)
    for who in admins:
        await everyone_knows(cluster, who)

    ledger = Ledger()
    workers = [Worker(i, who, cluster, ledger, random.Random(rng.random())) for i, who in enumerate(admins)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    faults: dict[str, int] = {}
    t0 = time.monotonic()
    try:
        for r in range(ROUNDS):
            n, kind = rng.randrange(3), rng.choices(FAULTS, FAULT_WEIGHTS)[0]
            faults[kind] = faults.get(kind, 0) + 1
            tc = time.monotonic()
            await converge(cluster)
            tf = time.monotonic()
            took = await fault(cluster, rng, n, kind)
            print(f"{tf - t0:6.1f} s  round {r + 1}: {kind} n{n + 1} (converged in {tf - tc:.1f} s; {took})")
            await asyncio.sleep(rng.uniform(0.2, 0.8))  # the clients work on the whole cluster for a while
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    t1 = time.monotonic()
    for t in tasks:
        t.result()  # a worker's own assertion
    await converge(cluster)

    # every acknowledged change is on every node (once they agree)
    expected_in = ledger.added - ledger.deleted - ledger.unsure
    expected_out = ledger.deleted

    async def agreed() -> bool:
        views = [await handles_on(node, alice) for node in cluster.nodes]
        return all(v == views[0] for v in views)

    assert await eventually(agreed, 30), "the nodes do not agree on the members"
    views = [await handles_on(node, alice) for node in cluster.nodes]
    lost = (expected_in - views[0]) | (expected_out & views[0])
    gap_any = longest_gap([t for ts in ledger.successes for t in ts], t0, t1)
    gap_worker = max(longest_gap(ts, t0, t1) for ts in ledger.successes)
    print(f"faults {faults}; changes acknowledged: {len(ledger.added)} adds, {len(ledger.deleted)} deletes; "
          f"unacknowledged (either outcome allowed): {len(ledger.unsure)}; signed reads {ledger.reads}; "
          f"lost: {len(lost)}; refused without 2xx: {ledger.refused}")
    print(f"longest time without any answer: {gap_any:.1f} s (cluster), {gap_worker:.1f} s (one admin, "
          f"moving to the next node on failure); {t1 - t0:.0f} s of faults")
    assert not lost, f"acknowledged changes lost: {sorted(lost)}"
    assert not ledger.unexpected, ledger.unexpected[:10]
    assert len(ledger.added) > ROUNDS and ledger.deleted and ledger.reads  # the clients really worked

    # the membership log: identical on every node, and it replays to the members
    logs = [await full_log(node, alice) for node in cluster.nodes]
    assert all(log == logs[0] for log in logs), "the nodes serve different membership logs"
    state = LogState(skew=60)
    for entry in logs[0]:
        state.apply(entry)
    assert set(state.members) == views[0]
    assert state.head[0] == logs[0][-1]["seq"]

    # removed members: no signed request, no bus login, on any node (a member that stays: both)
    gone = sorted(h for h in ledger.identities if h not in views[0])
    assert set(expected_out) <= set(gone)
    staying = next(iter(sorted(expected_in)))
    for node in cluster.nodes:
        # a login whose callout answer is late is refused like any other (clusters.connect_member)
        assert await eventually(lambda n=node: bus_login(n, ledger.identities[staying]), 15), \
            "a member cannot log in: the check proves nothing"
        assert await raw_me(node, signed_headers(ledger.identities[staying])) == 200
    for handle in rng.sample(gone, min(8, len(gone))):
        who = ledger.identities[handle]
        for node in cluster.nodes:
            assert await raw_me(node, signed_headers(who)) == 401, f"{handle} still signs on {node.base_url}"
            assert not await bus_login(node, who), f"{handle} still logs in to the bus on {node.base_url}"


def signed_headers(identity: Identity) -> dict[str, str]:
    return sign_request("GET", "/v1/me", None, keyid=identity.handle, private_key=identity.sign_key)


# -- 3. every node at once ------------------------------------------------------------------------------


async def test_a_crash_of_every_node_loses_nothing_acknowledged_and_replays_nothing(cluster):
    await converge(cluster)
    alice = cluster.identity
    await everyone_knows(cluster, alice)
    async with UnibusClient(cluster.nodes[1].base_url, alice, timeout=15) as a:
        last = generate_identity("beforecrash")
        await a.add_member(last.handle, last.sign_pub_b64, last.enc_pub_b64, bus_pub=last.bus_pub)  # acknowledged
    accepted = signed_headers(alice)
    assert await raw_me(cluster.nodes[0], accepted) == 200
    before = [await handles_on(node, alice) for node in cluster.nodes]
    assert all(b == before[0] for b in before) and last.handle in before[0]
    head = (await full_log(cluster.nodes[0], alice))[-1]

    pids = [pid for i in range(3) for pid in reversed(cluster.pids(i))]  # nats-servers first
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for node in cluster.nodes:
        node.wait(10)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for i in range(3):
        cluster.restart(i)
    for node in cluster.nodes:
        await asyncio.to_thread(node.wait_healthy, FORM_TIMEOUT)

    # the accepted request's nonce went with every node's memory: it must not be served again; it was
    # signed before the new bucket's epoch, so it is refused as a replay is (401 nonce-lost)
    for node in cluster.nodes:
        status = await raw_me(node, accepted)
        assert status == 401, f"{node.base_url}: a request accepted before the crash got {status} after it"
    await everyone_knows(cluster, alice)  # a fresh one is served (after the floor, seconds)
    after = [await handles_on(node, alice) for node in cluster.nodes]
    assert all(a == before[0] for a in after), "acknowledged members lost in the crash"
    for node in cluster.nodes:
        assert (await full_log(node, alice))[-1] == head
    assert any("nonce bucket: new epoch, written here" in node.log_text() for node in cluster.nodes)
    print("every node killed at once: members and log unchanged; the replay refused on every node")
