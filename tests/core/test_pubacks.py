"""unibus.pubacks: the lean publish-and-await-reply connection, against real nats-servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import ssl

import nats
import nkeys
import pytest

from unibus.auth import CLAIM_HEADERS, NONCE_BUCKET, NonceStore, NonceStoreUnavailable
from unibus.bus import Bus, embedded_tls_context
from unibus.pubacks import PubAckClient, PubAckUnavailable, _Protocol
from unibus.settings import Secret
from unibus.signing import make_nonce
from unibus.testing import NatsServer, make_test_ca, make_test_cert

STREAM = "ACKS"


async def make_stream(url: str, **connect: object) -> None:
    nc = await nats.connect(url, **connect)
    try:
        await nc.jetstream().add_stream(name=STREAM, subjects=["acks.>"])
    finally:
        await nc.close()


async def ignore(msg) -> None:
    pass


@contextlib.contextmanager
def server(tmp_path, name="nats", hook=None):
    srv = NatsServer(tmp_path / name, config_hook=hook)
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.asynccontextmanager
async def client(url, **kw):
    c = PubAckClient(url, **kw)
    await c.connect()
    try:
        yield c
    finally:
        await c.close()


async def test_publish_gets_the_pub_ack_and_expected_sequence_is_enforced(nats_server):
    await make_stream(nats_server.url)
    async with client(nats_server.url) as c:
        status, data = await c.request("acks.one", b"", b"hello")
        assert status == 0
        assert json.loads(data) == {"stream": STREAM, "seq": 1}
        # The same header block a nonce claim sends: only the first write of a subject passes.
        first = await c.request("acks.key", CLAIM_HEADERS, b"1")
        again = await c.request("acks.key", CLAIM_HEADERS, b"1")
        assert json.loads(first[1])["seq"] == 2
        assert json.loads(again[1])["error"]["err_code"] == 10071
        # Many in flight at once: every reply reaches its own caller.
        results = await asyncio.gather(*(c.request(f"acks.many.{i}", b"", b"x") for i in range(500)))
        assert sorted(json.loads(d)["seq"] for _, d in results) == list(range(3, 503))
        assert c.requests == 503


async def test_no_responders_is_status_503(nats_server):
    async with client(nats_server.url) as c:
        assert await c.request("nobody.listens", b"", b"") == (503, b"")


async def test_reply_payloads_of_any_size_and_split_anywhere(nats_server):
    """Replies are parsed whatever way TCP cuts them (here: large ones, and every split of small ones)."""
    nc = await nats.connect(nats_server.url)

    async def echo(msg):
        await nc.publish(msg.reply, msg.data, headers=msg.headers)

    await nc.subscribe("echo", cb=echo)
    await nc.flush()
    try:
        async with client(nats_server.url) as c:
            for size in (0, 1, 4096, 200_000, 900_000):
                payload = bytes(i % 251 for i in range(size))
                assert await c.request("echo", b"", payload) == (0, payload)
                headers = b"NATS/1.0\r\nX-Test: yes\r\n\r\n"
                assert await c.request("echo", headers, payload) == (0, payload)
    finally:
        await nc.close()

    # The parser itself, fed one byte at a time and in two pieces at every offset
    # (its PONG goes out through a real socket pair).
    loop = asyncio.get_running_loop()
    stream = (b"PING\r\n+OK\r\nMSG _INBOX.x.1 1 5\r\nhello\r\n"
              b"HMSG _INBOX.x.2 1 24 27\r\nNATS/1.0 503\r\nX-A: b\r\n\r\nabc\r\n"
              b'INFO {"ldm":true}\r\nMSG _INBOX.x.3 1 0\r\n\r\n')
    for cuts in [list(range(1, len(stream)))] + [[k] for k in range(1, len(stream))]:
        c = PubAckClient("nats://127.0.0.1:1")
        c._inbox = b"_INBOX.x."
        waiters = {n: loop.create_future() for n in (1, 2, 3)}
        c._waiting = {n: (f, 0.0) for n, f in waiters.items()}
        ours, theirs = socket.socketpair()
        proto = _Protocol(c)
        transport, _ = await loop.create_connection(lambda: proto, sock=ours)  # noqa: B023
        try:
            proto.info.set_result({})
            for a, b in zip([0, *cuts], [*cuts, len(stream)]):
                proto.data_received(stream[a:b])
            assert [w.result() for w in waiters.values()] == [(0, b"hello"), (503, b"abc"), (0, b"")]
            assert c.server_info == {"ldm": True}
            theirs.settimeout(5)
            assert theirs.recv(100) == b"PONG\r\n"
        finally:
            transport.close()
            theirs.close()


async def test_nkey_authentication(tmp_path):
    kp = nkeys.from_seed(nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_USER))
    seed, public = kp.seed.decode(), kp.public_key.decode()
    other = nkeys.from_seed(nkeys.encode_seed(b"\x02" * 32, nkeys.PREFIX_BYTE_USER)).seed.decode()

    def hook(config):
        config["authorization"] = {"users": [{"nkey": public}]}

    with server(tmp_path, hook=hook) as srv:
        await make_stream(srv.url, nkeys_seed_str=seed)
        async with client(srv.url, seed=Secret(seed)) as c:
            assert (await c.request("acks.a", b"", b"1"))[0] == 0
        for bad in (None, Secret(other)):
            c = PubAckClient(srv.url, seed=bad)
            with pytest.raises(PubAckUnavailable, match="(?i)authorization violation"):
                await c.connect()
            assert not c.connected
            await c.close()


async def test_user_password_and_token_from_the_url(tmp_path):
    with server(tmp_path, "userpass", lambda cfg: cfg.update(authorization={"user": "svc", "password": "p@ss w"})) as srv:
        await make_stream(srv.url, user="svc", password="p@ss w")
        url = srv.url.replace("nats://", "nats://svc:p%40ss%20w@")
        async with client(url) as c:
            assert (await c.request("acks.a", b"", b"1"))[0] == 0
        with pytest.raises(PubAckUnavailable, match="(?i)authorization violation"):
            await PubAckClient(srv.url.replace("nats://", "nats://svc:wrong@")).connect()
    with server(tmp_path, "token", lambda cfg: cfg.update(authorization={"token": "s3cret"})) as srv:
        await make_stream(srv.url, token="s3cret")
        async with client(srv.url.replace("nats://", "nats://s3cret@")) as c:
            assert (await c.request("acks.a", b"", b"1"))[0] == 0


async def test_tls_first_with_the_embedded_servers_pinned_certificate(tmp_path):
    ca = make_test_ca(tmp_path, "ca")
    cert, key = make_test_cert(tmp_path, "server", ca)
    ctx = embedded_tls_context(cert, key, None)

    def tls_first(config):  # as the embedded listener is configured
        config["tls"] = {"cert_file": str(cert), "key_file": str(key), "handshake_first": True}

    def classic(config):
        config["tls"] = {"cert_file": str(cert), "key_file": str(key)}

    with server(tmp_path, "first", hook=tls_first) as srv:
        url = srv.url.replace("nats://", "tls://")
        await make_stream(url, tls=ctx, tls_handshake_first=True)
        async with client(url, tls=ctx) as c:  # tls:// starts with the handshake
            assert (await c.request("acks.a", b"", b"1"))[0] == 0
        # a certificate nobody trusts is refused
        with pytest.raises(PubAckUnavailable, match="(?i)certificate"):
            await PubAckClient(url, tls=ssl.create_default_context()).connect()
    with server(tmp_path, "classic", hook=classic) as srv:
        await make_stream(srv.url, tls=ctx)
        # plain nats:// to a server that requires TLS upgrades after its INFO
        async with client(srv.url, tls=ctx) as c:
            assert (await c.request("acks.b", b"", b"1"))[0] == 0


async def test_fails_closed_while_nats_is_down_and_reconnects(nats_server, caplog):
    await make_stream(nats_server.url)
    async with client(nats_server.url) as c:
        assert (await c.request("acks.a", b"", b"1"))[0] == 0
        first_pid = nats_server.pid
        with caplog.at_level(logging.WARNING, "unibus.pubacks"):
            nats_server.kill(signal.SIGKILL)
            async with asyncio.timeout(10):
                while c.connected:
                    await asyncio.sleep(0.01)
        assert "lost" in caplog.text
        with pytest.raises(PubAckUnavailable, match="not connected"):
            await c.request("acks.b", b"", b"1")
        # The supervisor restarts nats-server on the same port; the client finds it again.
        async with asyncio.timeout(20):
            while not c.connected:
                await asyncio.sleep(0.02)
        assert nats_server.pid != first_pid and c.reconnects == 1
        assert (await c.request("acks.c", b"", b"1"))[0] == 0


async def test_requests_in_flight_fail_when_the_connection_drops(nats_server):
    nc = await nats.connect(nats_server.url)
    await nc.subscribe("sink", cb=ignore)  # receives, never replies
    await nc.flush()
    try:
        async with client(nats_server.url) as c:
            pending = [asyncio.ensure_future(c.request("sink", b"", b"x")) for _ in range(5)]
            await asyncio.sleep(0.2)
            assert not any(p.done() for p in pending)
            nats_server.kill(signal.SIGKILL)
            for p in pending:
                with pytest.raises(PubAckUnavailable, match="connection to NATS lost"):
                    await asyncio.wait_for(p, 5)
    finally:
        await nc.close()


async def test_no_reply_in_time_is_an_error_not_a_hang(nats_server):
    nc = await nats.connect(nats_server.url)
    await nc.subscribe("sink", cb=ignore)
    await nc.flush()
    try:
        async with client(nats_server.url, timeout=0.4) as c:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(PubAckUnavailable, match="no reply from NATS in 0.4 s"):
                await c.request("sink", b"", b"x")
            assert 0.4 <= loop.time() - t0 < 5  # bounded: expired by the sweep, within a quarter of the timeout
            assert not c._waiting
            assert (await c.request("nobody", b"", b""))[0] == 503  # the connection itself is fine
    finally:
        await nc.close()


async def test_answers_server_pings(tmp_path):
    """nats-server closes a client that leaves its PINGs unanswered (here: 2 of them, 0.5 s apart;
    0.1 s apart, a stall of the test's event loop of a quarter of a second on a loaded machine
    would have dropped the client as stale: a review)."""
    with server(tmp_path, hook=lambda cfg: cfg.update(ping_interval="500ms", ping_max=2)) as srv:
        # The setting bites: a raw connection that never answers is dropped as stale.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        await reader.readline()  # INFO
        writer.write(b"CONNECT {}\r\nPING\r\n")
        async with asyncio.timeout(10):
            seen = await reader.read()  # until the server closes it
        writer.close()
        assert b"Stale Connection" in seen
        async with client(srv.url) as c:
            await asyncio.sleep(2.5)  # five of the server's PINGs
            assert c.connected and c.reconnects == 0
            assert (await c.request("nobody", b"", b""))[0] == 503


async def test_bad_arguments():
    with pytest.raises(ValueError, match="nats://HOST:PORT"):
        PubAckClient("http://127.0.0.1:4222")
    c = PubAckClient("nats://127.0.0.1:1")
    with pytest.raises(PubAckUnavailable, match="not connected"):
        await c.request("a", b"", b"")
    with pytest.raises(PubAckUnavailable, match="cannot connect"):
        await c.connect()


async def test_nonce_store_claims_over_the_lean_connection(nats_server):
    bus = Bus(nats_server.url)
    await bus.connect()
    store = NonceStore(bus, skew=60, replicas=1, timeout=1.0)
    try:
        await store.ensure()
        await store.start()
        assert await store.available()
        nonce = make_nonce()
        assert await store.claim("alice", nonce) is True
        assert await store.claim("alice", nonce) is False  # a replay
        assert await store.claim("bob", nonce) is True  # per handle
        assert (store.claims, store.replays) == (2, 1)
        info = await bus.js.stream_info(f"KV_{NONCE_BUCKET}")
        assert info.state.messages == 4  # the two nonces, the bucket's _epoch and available()'s own key
        await store.close()
        assert not await store.available()
        with pytest.raises(NonceStoreUnavailable, match="not connected"):
            await store.claim("alice", make_nonce())
    finally:
        await store.close()
        await bus.close()


async def test_a_full_nonce_bucket_is_not_available(nats_server):
    """A bucket at its size bound refuses every new claim, so no signed request is served. The
    health probe wrote one key of its own again and again, which the full bucket still took:
    ``/healthz`` said ``ok`` while every signed request was 503 (a review). It claims a new key."""
    from helpers import fill_nonce_bucket, small_nonce_store

    async with small_nonce_store(nats_server.url, max_bytes=8192) as (bus, store):
        assert await store.available()
        await fill_nonce_bucket(store)
        assert not await store.available()
        info = await bus.js.stream_info(f"KV_{NONCE_BUCKET}")
        assert info.state.bytes <= 8192


@contextlib.asynccontextmanager
async def responders(url):
    """``echo`` answers at once, ``slow`` after 0.3 s, ``sink`` never."""
    nc = await nats.connect(url)

    async def echo(msg):
        await nc.publish(msg.reply, msg.data)

    async def slow(msg):
        await asyncio.sleep(0.3)
        await nc.publish(msg.reply, b"slow")

    await nc.subscribe("echo", cb=echo)
    await nc.subscribe("slow", cb=slow)
    await nc.subscribe("sink", cb=ignore)
    await nc.flush()
    try:
        yield
    finally:
        await nc.close()


async def test_requests_gather_while_replies_are_awaited(nats_server):
    async with responders(nats_server.url), client(nats_server.url, timeout=30) as c:
        assert await c.request("echo", b"", b"a") == (0, b"a")
        assert c.writes == 1  # nothing was in flight: written at once
        slow = asyncio.ensure_future(c.request("slow", b"", b""))
        await asyncio.sleep(0.05)
        assert c.writes == 2
        held = [asyncio.ensure_future(c.request("echo", b"", str(i).encode())) for i in range(10)]
        await asyncio.sleep(0.1)
        assert not any(h.done() for h in held) and c.writes == 2  # held while the slow reply is awaited
        async with asyncio.timeout(10):
            assert await slow == (0, b"slow")
            assert [await h for h in held] == [(0, str(i).encode()) for i in range(10)]
        assert c.writes == 3  # the ten went out together


async def test_a_cancelled_request_does_not_hold_back_the_next(nats_server):
    async with responders(nats_server.url), client(nats_server.url, timeout=30) as c:
        # Cancelled after it was written ...
        lost = asyncio.ensure_future(c.request("sink", b"", b""))
        await asyncio.sleep(0.05)
        lost.cancel()
        async with asyncio.timeout(5):  # far less than the 30 s timeout: nothing waits for the sweep
            assert await c.request("echo", b"", b"x") == (0, b"x")
        # ... and cancelled while it was still held, then written anyway.
        slow = asyncio.ensure_future(c.request("slow", b"", b""))
        await asyncio.sleep(0.05)
        held = asyncio.ensure_future(c.request("sink", b"", b""))
        await asyncio.sleep(0)
        held.cancel()
        async with asyncio.timeout(5):
            await slow
            assert await c.request("echo", b"", b"y") == (0, b"y")
        assert not c._unreplied and not c._waiting
