"""A cluster as production runs one: HTTPS and a TLS NATS listener on every node, with the test kit.

Marked slow: run in CI, skip locally with -m "not slow".
"""

from __future__ import annotations

import asyncio
import ssl
import time

import nats
import pytest

from unibus.client import UnibusClient
from unibus.client.keys import generate_identity
from unibus.testing import Cluster, make_test_pki

pytestmark = pytest.mark.slow


@pytest.fixture
def tls_cluster(tmp_path):
    pki = make_test_pki(tmp_path / "pki")
    c = Cluster(tmp_path / "c", generate_identity("alice"), args=pki.serve_args(), tls_ca=pki.ca[0], metrics=False)
    try:
        c.form()
        yield c, pki
    finally:
        c.stop()


def test_a_tls_cluster_needs_the_ca_of_its_listeners(tmp_path):
    """The kit says what is missing before anything starts (migrate-to-kv would not verify node 1)."""
    pki = make_test_pki(tmp_path / "pki")
    with pytest.raises(ValueError, match="tls_ca"):
        Cluster(tmp_path / "c", generate_identity("alice"), args=pki.serve_args(http=False), metrics=False)


async def test_members_talk_across_nodes_over_tls_listeners(tls_cluster):
    cluster, pki = tls_cluster
    context = ssl.create_default_context(cafile=str(pki.ca[0]))
    for node in cluster.nodes:  # every node: HTTPS, a TLS bus, and the cluster gate passed
        assert node.base_url.startswith("https://") and node.nats_url.startswith("tls://")
        status, body = node.healthz()
        assert status == 200 and body["posture"]["summary"] == "enforce+acl+tls"
    bob = cluster.member("bob")
    for i in range(3):
        cluster.wait_member(i, bob)

    async with UnibusClient(cluster.nodes[1].base_url, cluster.identity, ssl=context) as alice_c, \
            UnibusClient(cluster.nodes[2].base_url, bob, ssl=context) as bob_c:
        room = (await alice_c.create_room("over-tls"))["room_id"]
        await alice_c.add_room_member(room, "bob")
        await alice_c.rekey(room)
        async with bob_c.bus() as bob_bus, bob_bus.listen(room) as messages, alice_c.bus() as alice_bus:
            assert bob_bus.nc.connected_url.port == cluster.nodes[2].nats_port  # bob on n3, alice on n2
            assert alice_bus.nc.connected_url.port == cluster.nodes[1].nats_port
            # bob's subscription is on n3 once his listener starts, and reaches n2 over the route a
            # moment later (a review): send until one is heard
            deadline = time.monotonic() + 15
            while True:
                await alice_bus.send(room, "chat", b"through the routes")
                try:
                    msg = await asyncio.wait_for(messages.__anext__(), 0.5)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "nothing crossed the routes"
            assert msg.ok and msg.sender == "alice" and msg.plaintext == b"through the routes"

    # a NATS client that does not start with TLS is never served: not even INFO in clear
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.nodes[0].nats_port)
    try:
        writer.write(b"CONNECT {}\r\nPING\r\n")
        await writer.drain()
        first = await asyncio.wait_for(reader.read(64), 3)
    except (TimeoutError, ConnectionError):
        first = b""
    finally:
        writer.close()
    assert not first.startswith((b"INFO", b"PONG", b"+OK"))
    # and a TLS client that trusts another CA is refused at the handshake
    other = make_test_pki(cluster.directory / "other")
    with pytest.raises((nats.errors.Error, OSError, TimeoutError, ssl.SSLError)):
        await nats.connect(cluster.nodes[0].nats_url, tls=ssl.create_default_context(cafile=str(other.ca[0])),
                           tls_handshake_first=True, nkeys_seed_str=bob.bus_nkey_seed(), connect_timeout=3,
                           allow_reconnect=False, max_reconnect_attempts=0)
