"""A cluster node whose routes never come up names why. It waited 120 s for a JetStream quorum
and said only "answers but JetStream does not"; a walk-through of the runbook (a wrong route
password, a certificate of another CA) found the cause in nats-server's lines alone. Real
nats-servers, routed to each other."""

from __future__ import annotations

import asyncio
import contextlib
import json

from unibus.daemon import with_route_problem
from unibus.supervisor import NatsSupervisor, find_nats_server
from unibus.testing import free_port, make_test_ca, make_test_cert

FAILURE = "NATS at tls://127.0.0.1:4250 answers but JetStream does not after 120 s"
PASSWORD_HINT = "is the route password (--cluster-pass-file) the same on every node?"
PEER_HINT = "are the other nodes up, and their addresses in --routes right?"
CA_HINT = "are every node's route certificates from the one route CA (--route-tls-ca)?"


@contextlib.asynccontextmanager
async def routed_node(tmp_path, name: str, port: int, peer: int, password: str, tls: dict | None = None):
    """A nats-server with a route listener on ``port`` and a route to ``peer`` (``tls``: its route
    TLS block), under the supervisor."""
    directory = tmp_path / name
    directory.mkdir()
    client_port = free_port()
    conf = directory / "nats.conf"
    conf.write_text(json.dumps({
        "server_name": name, "host": "127.0.0.1", "port": client_port,
        "cluster": {"name": "c", "host": "127.0.0.1", "port": port,
                    "authorization": {"user": "route", "password": password},
                    "routes": [f"nats-route://route:{password}@127.0.0.1:{peer}"],
                    **({"tls": tls} if tls else {})}}))
    supervisor = NatsSupervisor(find_nats_server(), conf, "127.0.0.1", client_port, backoff_initial=0.1)
    await supervisor.start()
    try:
        yield supervisor
    finally:
        await supervisor.stop()


async def route_problems(supervisor: NatsSupervisor, hint: str, timeout: float = 20.0) -> list[str]:
    """The route errors once the one quoted means ``hint`` (a peer not up yet comes first); the
    last seen if that never comes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    problems: list[str] = []
    while loop.time() < deadline:
        problems = supervisor.route_problems()
        if problems and with_route_problem(FAILURE, problems).endswith(f"({hint})"):
            break
        await asyncio.sleep(0.1)
    return problems


async def test_a_route_password_that_differs_is_named(tmp_path):
    a_port, b_port = free_port(), free_port()
    async with routed_node(tmp_path, "a", a_port, b_port, "the-first-route-password") as a, \
            routed_node(tmp_path, "b", b_port, a_port, "another-route-password") as b:
        seen = [await route_problems(node, PASSWORD_HINT) for node in (a, b)]
    for problems in seen:  # "authentication error - User "route"" and "Route Error 'Authorization Violation'"
        assert problems, seen
        for problem in problems:
            assert "route-password" not in problem and "[ERR]" not in problem and "/12/" not in problem, problem
        said = with_route_problem(FAILURE, problems)
        assert said.startswith(f"{FAILURE}; nats-server's route error: "), said
        assert said.endswith(f"({PASSWORD_HINT})"), said


async def test_a_peer_that_is_not_there_is_named(tmp_path):
    async with routed_node(tmp_path, "a", free_port(), free_port(), "the-only-route-password") as a:
        problems = await route_problems(a, PEER_HINT)
    assert problems and not any("route-password" in p for p in problems), problems
    assert with_route_problem(FAILURE, problems).endswith(f"({PEER_HINT})"), problems
    # The same error again is kept once (its attempt number aside): the window holds different ones.
    assert len(problems) == len({p.split("(attempt")[0] for p in problems}), problems


async def test_route_certificates_of_another_ca_are_named(tmp_path):
    def route_tls(name: str) -> dict:
        ca = make_test_ca(tmp_path / f"pki-{name}", f"route-ca-{name}")  # each node its own CA
        cert, key = make_test_cert(tmp_path / f"pki-{name}", name, ca)
        return {"cert_file": str(cert), "key_file": str(key), "ca_file": str(ca[0]), "verify": True}

    a_port, b_port = free_port(), free_port()
    async with routed_node(tmp_path, "a", a_port, b_port, "one-route-password", route_tls("a")) as a, \
            routed_node(tmp_path, "b", b_port, a_port, "one-route-password", route_tls("b")) as b:
        seen = [await route_problems(node, CA_HINT) for node in (a, b)]
    assert all(seen), seen
    assert all(with_route_problem(FAILURE, problems).endswith(f"({CA_HINT})") for problems in seen), seen


def test_the_error_that_names_a_cause_is_quoted_over_a_peer_that_went_away_after_it():
    """A review: a node with the right password quoted "connection refused", logged after a
    hundred refused logins, once the peer with the wrong one had given up."""
    problems = ["127.0.0.1:6250 - rid:5 - Route Error 'Authorization Violation'",
                "Error trying to connect to route (attempt 9): dial tcp 127.0.0.1:6250: connect: connection refused"]
    assert with_route_problem(FAILURE, problems).endswith(f"({PASSWORD_HINT})")
    assert with_route_problem(FAILURE, problems[1:]).endswith(f"({PEER_HINT})")
    # A host whose name holds "tls" that does not resolve is a dial error, not a certificate's.
    dns = "Error trying to connect to route: dial tcp: lookup tls-n2.example: no such host"
    assert with_route_problem(FAILURE, [dns]).endswith(f"({PEER_HINT})")


def test_without_a_route_error_the_failure_stands_alone():
    assert with_route_problem(FAILURE, []) == FAILURE
