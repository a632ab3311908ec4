"""Replacing a dead node of an R3 cluster (deploy/cluster/README.md, "Replacing a dead node").

A cluster walk-through found a node gone for good kept in the JetStream meta group for ever, and
check-r3-current.sh failing for ever, with nothing shipped to remove it. A formed 3-node cluster
with TLS listeners (as the units run) and some state (an admin, a room with a key, a blob): n3
hangs (remove-peer refuses it: not marked offline), then goes for good (stopped, its data
directory deleted). n4, a new --server-name, joins with --routes to n1 and n2 only; then
`membershipd remove-peer` on n1 removes n3, and nats-server places the R3 streams on n1, n2, n4 by
itself. Real nodes and nats-servers throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from unibus.client import UnibusClient
from unibus.client.blobs import get_blob, put_blob
from unibus.client.keys import generate_identity
from unibus.removepeer import peer_id
from unibus.testing import Cluster, MembershipdProcess, make_test_pki, run_membershipd

pytestmark = pytest.mark.slow

CHECK_R3 = Path(__file__).resolve().parents[2] / "deploy" / "cluster" / "check-r3-current.sh"
STREAMS = ("KV_unibus_state", "KV_unibus_nonces", "OBJ_unibus_blobs")


def monitor(node: MembershipdProcess, path: str) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}{path}", timeout=5) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as e:
        return json.load(e)


def meta_names(node: MembershipdProcess) -> set[str]:
    """The meta group as ``node`` sees it, itself included (a peer it never heard of by its id)."""
    meta = monitor(node, "/jsz").get("meta_cluster") or {}
    return {r["name"] for r in meta.get("replicas") or []} | {monitor(node, "/varz")["server_name"]}


def placements(nodes: list[MembershipdProcess]) -> dict[str, tuple[set[str], bool]]:
    """``{stream: (its peers, every replica current)}`` as each stream's leader reports it."""
    out = {}
    for node in nodes:
        me = monitor(node, "/varz")["server_name"]
        for account in monitor(node, "/jsz?accounts=true&streams=true").get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                cluster = stream.get("cluster") or {}
                if cluster.get("leader") == me:
                    replicas = cluster.get("replicas") or []
                    out[stream["name"]] = ({me} | {r["name"] for r in replicas},
                                           all(r.get("current") and not r.get("offline") for r in replicas))
    return out


def eventually(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError, KeyError) as e:  # a node between two states
            last = e
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout:g} s (last: {last!r})")


def remove_peer(node: MembershipdProcess, *args: str, ca: bool = True) -> subprocess.CompletedProcess[str]:
    """``membershipd remove-peer`` on ``node``, as the runbook runs it; no seed in what it says."""
    tls = ["--ca", str(node.ca)] if ca else []
    proc = run_membershipd("remove-peer", "--data-dir", str(node.data_dir), "--nats-url", node.nats_url, *tls,
                           *args, timeout=120)
    for seed_file in ("system.nkey", "service.nkey"):
        assert (node.data_dir / seed_file).read_text().strip() not in proc.stdout + proc.stderr
    return proc


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> bool:
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    return (proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1
            and all(n in errors[0] for n in needles))


@pytest.fixture
def cluster(tmp_path):
    pki = make_test_pki(tmp_path / "pki")
    c = Cluster(tmp_path / "c", generate_identity("alice"), args=pki.serve_args(), tls_ca=pki.ca[0],
                env={"UNIBUS_NATS_MONITOR": "1"})
    try:
        c.form()
        yield c
    finally:
        c.stop()


def test_peer_ids_are_nats_servers():
    """The id remove-peer sends is the one nats-server gives the name (its getHash), which the test
    below sees removed; a name's id is fixed, which is why a wiped node never takes its name again."""
    assert peer_id("n3") == "BXScrY9i"  # what nats-server 2.15.1 listed for n3
    assert len({peer_id(f"n{i}") for i in range(1, 100)}) == 99


async def test_a_dead_node_is_replaced_then_removed(cluster, tmp_path):
    alice = cluster.identity
    n1, n2, n3 = cluster.nodes
    source = tmp_path / "blob.src"
    source.write_bytes(os.urandom(200_000))
    async with UnibusClient(n1.base_url, alice, ssl=n1.ssl_context(), notice=lambda _t: None,
                            replica_root=tmp_path / "replica-n1") as a:
        room = (await a.create_room("ops"))["room_id"]
        await a.rekey(room)
        blob = await put_blob(a, room, source)

    # While every node is up: exit 2, one line that says what to change.
    assert refused(remove_peer(n1, "n3"), "n3 is online")
    assert refused(remove_peer(n1, "n9"), "n9 is not a peer of the JetStream meta group", "n1, n2, n3")
    assert refused(remove_peer(n1, "n1"), "n1 is this node")
    no_ca = remove_peer(n1, "n3", ca=False)
    assert no_ca.returncode == 1 and "(give --ca PATH, the CA of the node's NATS certificate" in no_ca.stderr, \
        no_ca.stderr

    # n3 answers nothing (SIGSTOP: a hung or cut-off node looks the same): refused until nats-server
    # marks it offline, at once after a clean stop, 150 to 240 s after a crash.
    fds = cluster.pause(2)
    try:
        eventually(lambda: refused(remove_peer(n1, "--dry-run", "n3"), "n3 answers nothing",
                                   "make sure it is gone for good"), 30, "a refusal of a silent n3")
    finally:
        cluster.resume(fds)

    # n3 is gone for good: stopped, its disk lost. The meta group keeps it; R3 is not whole.
    assert n3.stop() == 0
    shutil.rmtree(n3.data_dir)

    def gate_fails() -> bool:
        gate = subprocess.run(["sh", str(CHECK_R3), f"http://127.0.0.1:{n1.monitor_port}",
                               f"http://127.0.0.1:{n2.monitor_port}"], capture_output=True, text=True, timeout=30)
        return gate.returncode == 1 and "n3(current=False" in gate.stdout

    eventually(gate_fails, 30, "check-r3-current.sh failing on n3")
    # The runbook's order: the live nodes lead every stream and serve before anything joins.
    eventually(lambda: set(STREAMS) <= set(placements([n1, n2])), 60, "every stream led by n1 or n2")
    for i in (0, 1):
        cluster.wait_member(i, alice, 30)

    n4 = cluster.add_node("n4", [0, 1])
    n4.start(wait=False)
    n4.wait_healthy(timeout=120)
    eventually(lambda: "n4" in meta_names(n1) and "n4" in meta_names(n2), 30, "n4 in the meta group")
    assert "n3" in meta_names(n1)

    dry = remove_peer(n1, "--dry-run", "n3")
    assert dry.returncode == 0 and "dry run: would send" in dry.stdout and "n3" in meta_names(n1), dry.stderr
    done = remove_peer(n1, "--wait", "30", "n3")
    assert done.returncode == 0, done.stderr
    assert "n3 is gone from the meta group of every live node" in done.stdout, done.stdout
    live = [n1, n2, n4]
    for node in live:
        assert "n3" not in meta_names(node) and {"n1", "n2", "n4"} <= meta_names(node)

    # nats-server placed every R3 stream on n1, n2, n4 by itself, and they caught up.
    def whole():
        now = placements(live)
        return all(s in now and now[s] == ({"n1", "n2", "n4"}, True) for s in STREAMS) and now

    eventually(whole, 60, "R3 on n1, n2, n4")
    gate = subprocess.run(["sh", str(CHECK_R3), "--strict", "--wait", "60",
                           *(f"http://127.0.0.1:{node.monitor_port}" for node in live)],
                          capture_output=True, text=True, timeout=90)
    assert gate.returncode == 0, gate.stdout

    # The state is whole and served by every live node, the new one included; nothing restarted.
    for node in live:
        async with UnibusClient(node.base_url, alice, ssl=node.ssl_context(), notice=lambda _t: None,
                                replica_root=tmp_path / f"replica-{node.data_dir.name}") as a:
            assert (await a.me())["handle"] == "alice"
            await a.verify_log()
            await a.verified_room(room)
            out = tmp_path / f"blob.{node.data_dir.name}"
            await get_blob(a, room, blob, out)
            assert out.read_bytes() == source.read_bytes()
        assert node.healthz()[1]["nats"]["restarts"] == 0

    # Once removed, the name is no peer: a second run is refused.
    assert refused(remove_peer(n2, "n3"), "n3 is not a peer")
    # What the runbook forbids, started all the same: n3 again, under its old name. nats-server keeps
    # it out of the meta group (for five minutes); remove-peer names it (a review: it said only "not a
    # peer" of it), and refuses to change the membership while it runs.
    cluster.nodes[2] = ghost = n3.again()
    ghost.start(wait=False)
    eventually(lambda: refused(remove_peer(n1, "n3"), "n3 answers but is no peer of the meta group"), 60,
               "n3 named as a removed node started again")
