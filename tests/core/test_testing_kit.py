"""unibus.testing itself: tracked restarts, PID-safe teardown (docs/plugins.md, "Testing")."""

from __future__ import annotations

import socket
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from unibus.testing import Cluster, MembershipdProcess, freeze, nats_server_pids, signal_pidfd, wait_stopped


def test_restarts_are_tracked_and_all_stopped(tmp_path):
    first = MembershipdProcess(tmp_path / "d", ["--bus-auth", "off"]).start()
    try:
        second = first.restart()
        assert second.healthz()[0] == 200
        third = second.again()  # made, never started: nothing to stop
        assert first.family == [first, second, third] and first.restarts == 1
        assert second.family is first.family
    finally:
        for p in first.family:
            p.stop()
    assert not nats_server_pids(tmp_path)


SPINNERS = """
import sys, threading
def spin():
    while True:
        pass
for _ in range(6):
    threading.Thread(target=spin, daemon=True).start()
print("spinning", flush=True)
threading.Event().wait()
"""


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _thread_states(pid: int) -> list[str]:
    return [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
            for t in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.parametrize("through", ["pid", "pidfd"])
def test_freeze_returns_once_no_thread_runs(through):
    """SIGSTOP is taken by one thread, which then stops the others: a test that went on at once
    got PONGs from a nats-server it had just frozen (CI, twice). freeze waits for every thread."""
    child = subprocess.Popen([sys.executable, "-c", SPINNERS], stdout=subprocess.PIPE)
    fd = os.pidfd_open(child.pid)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"spinning\n"
        assert len(_thread_states(child.pid)) == 7
        freeze(child.pid, pidfd=fd if through == "pidfd" else None)
        assert set(_thread_states(child.pid)) == {"T"}
        ticks = _cpu_ticks(child.pid)
        select.select([], [], [], 0.2)
        assert _cpu_ticks(child.pid) == ticks  # six spinning threads, and not one tick more
        os.kill(child.pid, signal.SIGCONT)
        with pytest.raises(TimeoutError, match=f"process {child.pid} did not stop within 0.05 s"):
            wait_stopped(child.pid, timeout=0.05)  # running again: never taken for stopped
    finally:
        child.kill()
        child.wait()
    wait_stopped(child.pid, pidfd=fd, timeout=1)  # exited: nothing left to run (the pid may be another's now)
    freeze(child.pid, pidfd=fd)  # through its pidfd, an exited process is not an error
    os.close(fd)


def test_a_pidfd_never_signals_a_reused_pid(tmp_path):
    daemon = MembershipdProcess(tmp_path / "d", ["--bus-auth", "off"]).start()
    try:
        fd = daemon.nats_handle()
        assert fd is not None
        try:
            assert signal_pidfd(fd, signal.SIGKILL)  # the nats-server it names: killed (the supervisor restarts one)
            readable, _, _ = select.select([fd], [], [], 10)  # a pidfd is readable once its process exited
            assert readable == [fd]
            new_fd = None
            for _ in range(200):  # the supervisor reaped it and started another (bounded wait)
                new_fd = daemon.nats_handle()
                if new_fd is not None:
                    break
                select.select([], [], [], 0.05)
            assert new_fd is not None
            os.close(new_fd)
            # whatever process now has that pid, the descriptor still names the dead one
            assert signal_pidfd(fd, signal.SIGKILL) is False
        finally:
            os.close(fd)
        assert daemon.wait_healthy()["nats"]["restarts"] >= 1
    finally:
        daemon.stop()
    assert daemon.nats_handle() is None and daemon.nats_pid() is None  # nothing to signal once it exited
    assert not nats_server_pids(tmp_path)


INNER_PLUGIN = '''
from unibus import hookimpl

PLUGIN_NAME = "probe"


@hookimpl
def healthz_fields(app):
    return {"loaded": True}
'''

INNER_CLUSTER_TEST = '''
import json, os
from pathlib import Path


def test_a_plugin_authors_cluster(cluster_factory):
    cluster = cluster_factory(plugins=["probe_plugin"])  # not installed: loaded with --plugin on every node
    n1, n2, n3 = cluster.nodes
    assert all(node.healthz()[1]["probe"] == {"loaded": True} for node in cluster.nodes)
    bob = cluster.member("bob")  # added through node 1
    cluster.wait_member(2, bob)  # and served by node 3, from the replicated store
    status, me = cluster.client(2, bob).get("/v1/me")
    assert (status, me["handle"]) == (200, "bob")
    pids = [p for i in range(3) for p in cluster.pids(i)]
    cluster.kill(1)  # a crash of node 2 ...
    again = cluster.restart(1, wait=True)  # ... and the same node again, tracked
    assert again is cluster.nodes[1] and again.restarts == 1 and n2.family == [n2, again]
    cluster.wait_member(1, bob)
    pids += cluster.pids(1)
    Path(os.environ["CLUSTER_PIDS"]).write_text(json.dumps(pids))
'''


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose argv or environment mentions ``text`` (a test's temporary directory)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_the_cluster_fixture_forms_replicates_restarts_and_leaves_nothing(tmp_path):
    """The cluster fixtures as a plugin author gets them: from the pytest11 entry point, in a fresh pytest,
    with a plugin that is not installed."""
    (tmp_path / "test_inner.py").write_text(INNER_CLUSTER_TEST)
    (tmp_path / "probe_plugin.py").write_text(INNER_PLUGIN)
    pids_file, basetemp = tmp_path / "pids.json", tmp_path / "inner-tmp"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(basetemp), str(tmp_path / "test_inner.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "CLUSTER_PIDS": str(pids_file)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
    pids = json.loads(pids_file.read_text())
    assert len(pids) == 3 * 2 + 2  # membershipd and nats-server of each node, and node 2's again
    assert not _processes_mentioning(str(basetemp)), "the cluster fixture left processes behind"
    assert not nats_server_pids(basetemp)
    for pid in pids:  # gone, or reused by something that is not ours
        with contextlib.suppress(OSError):
            assert str(basetemp).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_cluster_nodes_get_the_cluster_flags_and_a_private_route_password(tmp_path):
    c = Cluster(tmp_path / "c", args=["--disable-plugin", "blobstore"], plugins=["my_plugin"], metrics=False)
    assert [n.args[n.args.index("--server-name") + 1] for n in c.nodes] == ["n1", "n2", "n3"]
    for i, node in enumerate(c.nodes):
        routes = node.args[node.args.index("--routes") + 1].split(",")
        assert sorted(routes) == sorted(f"nats://127.0.0.1:{p}" for j, p in enumerate(c.route_ports) if j != i)
        assert node.args[-4:] == ["--plugin", "my_plugin", "--disable-plugin", "blobstore"]
        assert "--metrics-addr" not in node.args and "--route-tls-ca" in node.args
        assert node.env["PYTHONPATH"].split(os.pathsep)[:3] == [p for p in sys.path if p][:3]  # for --plugin
        assert c.secret not in " ".join(node.argv)  # the password is in a file, never in argv
    assert c.pass_file.stat().st_mode & 0o777 == 0o600
    assert c.pass_file.read_text() == c.secret + "\n"
    c.stop()  # nothing was started: nothing to stop, no error


class WhoAmI:
    """A client plugin for the test below: ``unibus my-role`` prints the caller's handle and role."""

    from unibus import hookimpl

    @hookimpl
    def client_commands(self):
        from unibus.client.plugins import ClientCommand

        async def run(ctx, client):
            me = await client.request("GET", "/v1/me")
            print(json.dumps(me) if ctx.json else f"{me['handle']} {me['role']}")
            return 0

        return [ClientCommand("my-role", "print this identity's handle and role", run)]


def test_unibus_app_runs_a_client_command_and_reads_a_metric(unibus_app):
    app = unibus_app()
    assert app.metric("unibus_store_writes_total", {"kind": "member_added"}) == 0
    bob = app.member("bob")
    assert app.metric("unibus_store_writes_total", {"kind": "member_added"}) == 1
    assert app.metric("unibus_no_such_metric") is None

    assert app.client_command(bob, "my-role", plugins=[WhoAmI()]) == (0, "bob member\n")
    code, out = app.client_command(app.admin, "my-role", "--json", plugins=[WhoAmI()])
    assert code == 0 and json.loads(out)["role"] == "admin"
    # a core command, and argparse's refusal as an exit code rather than an exception
    assert app.client_command(bob, "rooms", "list")[0] == 0
    assert app.client_command(bob, "my-role", "--no-such-flag", plugins=[WhoAmI()])[0] == 2
    with pytest.raises(ValueError, match="signed client"):
        app.client_command(app.anonymous, "my-role")
    identity = app.data_dir / "test-identities" / "bob.json"
    assert identity.stat().st_mode & 0o777 == 0o600



def test_free_port_is_below_the_ephemeral_range_and_free():
    """An outgoing connection can never take a port free_port hands out between the pick and
    the bind: it lies below the kernel's ephemeral range (where the kernel picks local ports)."""
    from unibus.testing import _ephemeral_start, free_port

    ports = {free_port() for _ in range(20)}
    assert all(1024 < p < _ephemeral_start() for p in ports), ports
    for port in ports:  # free when handed out (nothing here binds them)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_free_port_never_hands_out_a_port_twice():
    """Nothing holds a port between the pick and its bind, so a cluster's picks (its nodes'
    route ports) must differ by construction: a CI run once gave two nodes the same one."""
    from unibus.testing import free_port

    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_xdist_workers_pick_ports_from_disjoint_slices(monkeypatch):
    from unibus.testing import _worker_slice

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert _worker_slice(20000, 32767) == (20000, 32767)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    slices = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        slices.append(_worker_slice(20000, 32767))
    (a0, a1), (b0, b1) = slices
    assert a0 == 20000 and a1 < b0 and b1 <= 32767 and b1 - b0 == a1 - a0


def test_bootstrap_member_takes_a_str_path_too(tmp_path):
    """The example's tests passed a str, and got a TypeError (a plugin author's walkthrough)."""
    import sqlite3

    from unibus.client.keys import generate_identity
    from unibus.testing import bootstrap_member

    bootstrap_member(str(tmp_path / "d"), generate_identity("alice"), "admin")
    with sqlite3.connect(tmp_path / "d" / "membershipd.db") as conn:
        assert conn.execute("select handle, role from members").fetchall() == [("alice", "admin")]
