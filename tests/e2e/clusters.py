"""A three-node membershipd cluster on loopback (mutual route TLS, R3), shared by the e2e tests.

``Cluster(tmp_path, admin)`` bootstraps ``admin`` on node 1 (then the test runs
``membershipd migrate-to-kv`` into the formed cluster); ``admin=None`` leaves
every node empty, for a cluster that receives a whole state from
``migrate-to-kv`` (a restored backup). Each test starts one cluster and stops it.

``pause``/``resume`` freeze a whole node (the fault test, test_cluster_faults.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from unibus.client import ApiError, UnibusClient
from unibus.testing import MembershipdProcess, bootstrap_member, free_port, make_test_ca, make_test_cert

SECRET = "route-secret-do-not-leak-7c1f"
FORM_TIMEOUT = 120


class Cluster:
    def __init__(self, tmp_path: Path, admin=None) -> None:
        self.tmp = tmp_path
        pki = tmp_path / "pki"
        ca = make_test_ca(pki, "route-ca")
        self.pass_file = tmp_path / "cluster.pass"
        self.pass_file.write_text(SECRET + "\n")
        self.pass_file.chmod(0o600)
        self.route_ports = [free_port() for _ in range(3)]
        self.metrics_ports = [free_port() for _ in range(3)]
        self.nodes: list[MembershipdProcess] = []
        for i in range(3):
            name = f"n{i + 1}"
            cert = make_test_cert(pki, name, ca)
            routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i)
            data = tmp_path / name
            if i == 0 and admin is not None:  # bootstrap on one node, then migrate-to-kv (docs/operations.md)
                bootstrap_member(data, admin, "admin")
            args = ["--server-name", name, "--cluster-name", "unibus-test",
                    "--cluster-addr", f"127.0.0.1:{self.route_ports[i]}", "--routes", routes,
                    "--cluster-pass-file", str(self.pass_file), "--kv-replicas", "3",
                    "--route-tls-cert", str(cert[0]), "--route-tls-key", str(cert[1]), "--route-tls-ca", str(ca[0]),
                    "--metrics-addr", f"127.0.0.1:{self.metrics_ports[i]}"]
            self.nodes.append(MembershipdProcess(data, args))

    def start(self, *indexes: int) -> None:
        for i in indexes:
            self.nodes[i].start(wait=False)
        for i in indexes:
            self.nodes[i].wait_healthy(timeout=FORM_TIMEOUT)

    def restart(self, i: int) -> None:
        self.nodes[i] = self.nodes[i].again()
        self.nodes[i].start(wait=False)

    def kill(self, i: int) -> None:
        """A real crash: nats-server first (SIGKILL, no graceful hand-over), then membershipd."""
        node = self.nodes[i]
        nats_pid = node.nats_pid()
        if nats_pid:
            os.kill(nats_pid, signal.SIGKILL)
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        if nats_pid:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{nats_pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    def pids(self, i: int) -> list[int]:
        """membershipd's pid and its nats-server's (when it has one) of node ``i``."""
        node = self.nodes[i]
        nats_pid = node.nats_pid()
        return [node.pid] + ([nats_pid] if nats_pid else [])

    def pause(self, i: int) -> list[int]:
        """SIGSTOP the whole node (membershipd and nats-server); returns the pids to resume."""
        pids = self.pids(i)
        for pid in reversed(pids):
            os.kill(pid, signal.SIGSTOP)
        return pids

    @staticmethod
    def resume(pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None:
                for pid in self.pids(self.nodes.index(n)):
                    try:  # a node left paused by a failed test stops too
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
            n.stop()


async def signed_ok(node: MembershipdProcess, identity) -> bool:
    async with UnibusClient(node.base_url, identity, timeout=5) as client:
        try:
            await client.me()
            return True
        except ApiError as e:
            if e.status in (401, 503):  # 401: this node has not seen the member yet (its KV watch)
                return False
            raise


async def eventually(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False
