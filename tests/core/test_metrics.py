"""Prometheus metrics (docs/operations.md, "Metrics"): a real daemon scraped on --metrics-addr.

One daemon for the module: signed requests, refused signatures, a replay,
member and room changes, a member's NATS login (the auth callout) and a kick
are made against it, then its /metrics is read and parsed with
prometheus-client's own parser. Then the attacker's side: labels stay bounded
whatever paths and methods a client sends, no handle, room id or key ever
appears in the exposition, an exposed metrics listener without TLS is refused,
and a metrics listener that asks for client certificates refuses a scraper
without one. The registry rules for plugins are tested on their own at the end.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from unibus.client import UnibusClient
from unibus.client.keys import generate_identity
from unibus.metrics import (
    NONCE_RESULTS,
    SIGNATURE_REJECTION_REASONS,
    UNMATCHED_ROUTE,
    Metrics,
    StateCounts,
    http_method_label,
)
from unibus.signing import sign_request
from unibus.testing import (
    MembershipdProcess,
    bootstrap_member,
    free_port,
    make_plugin_manager,
    make_test_pki,
    member_connections,
    run_membershipd,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, context: ssl.SSLContext | None = None) -> tuple[str, Samples]:
    """GET /metrics: the text and ``{(sample name, sorted labels): value}``."""
    with urllib.request.urlopen(url, timeout=10, context=context) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


class World:
    def __init__(self, daemon: MembershipdProcess, alice, metrics_url: str) -> None:
        self.daemon = daemon
        self.alice = alice
        self.metrics_url = metrics_url


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("metrics")
    alice = generate_identity("alice")
    bootstrap_member(root / "data", alice, "admin")
    port = free_port()
    daemon = MembershipdProcess(root / "data", ["--metrics-addr", f"127.0.0.1:{port}"]).start()
    try:
        yield World(daemon, alice, f"http://127.0.0.1:{port}/metrics")
    finally:
        daemon.stop()


async def signed(session: aiohttp.ClientSession, base: str, identity, method: str, path: str,
                 body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """One signed request; returns the status and the headers it was signed with (to replay them)."""
    sig = headers or sign_request(method, path, body, keyid=identity.handle, private_key=identity.sign_key)
    async with session.request(method, base + path, data=body, headers=sig) as r:
        await r.read()
        return r.status, sig


async def test_a_scrape_after_requests_rejections_changes_a_callout_and_a_kick(world):
    d, alice = world.daemon, world.alice
    _, before = scrape(world.metrics_url)
    assert value(before, "unibus_members") == 1  # the bootstrap admin
    assert value(before, "unibus_log_entries") == 1  # its bootstrap entry

    bob = generate_identity("bob")
    async with UnibusClient(d.base_url, alice) as admin:
        await admin.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
        room = (await admin.create_room("metrics"))["room_id"]
        await admin.add_room_member(room, "bob")
        await admin.get_room(room)
    # bob logs in to NATS (the auth callout answers), subscribes to the room...
    nc = await nats.connect(d.nats_url, nkeys_seed_str=bob.bus_nkey_seed(), allow_reconnect=False,
                            connect_timeout=3)
    try:
        await nc.subscribe(f"unibus.room.{room}.>")
        await nc.flush()
        for _ in range(100):  # nats-server reports the connection to the enforcer asynchronously
            if await member_connections(d, "bob"):
                break
            await asyncio.sleep(0.05)
        # ...and is removed from the room: its connection is kicked before the 2xx
        async with UnibusClient(d.base_url, alice) as admin:
            await admin.remove_room_member(room, "bob")
    finally:
        await nc.close()

    async with aiohttp.ClientSession() as s:
        assert (await signed(s, d.base_url, alice, "GET", "/v1/me"))[0] == 200
        status, sig = await signed(s, d.base_url, alice, "GET", "/v1/members")
        assert status == 200
        assert (await signed(s, d.base_url, alice, "GET", "/v1/members", headers=sig))[0] == 401  # a replay
        async with s.get(d.base_url + "/v1/me") as r:  # no signature at all
            assert r.status == 401
        eve = generate_identity("eve")  # an unknown keyid
        assert (await signed(s, d.base_url, eve, "GET", "/v1/me"))[0] == 401
        forged = sign_request("GET", "/v1/me", None, keyid="alice", private_key=eve.sign_key)
        assert (await signed(s, d.base_url, alice, "GET", "/v1/me", headers=forged))[0] == 401
        stale = sign_request("GET", "/v1/me", None, keyid="alice", private_key=alice.sign_key, created=1000)
        assert (await signed(s, d.base_url, alice, "GET", "/v1/me", headers=stale))[0] == 401
        body = b'{"name": "x"}'
        wrong = sign_request("POST", "/v1/rooms", b'{"name": "y"}', keyid="alice", private_key=alice.sign_key)
        assert (await signed(s, d.base_url, alice, "POST", "/v1/rooms", body=body, headers=wrong))[0] == 401

    text, m = scrape(world.metrics_url)
    # requests, by route template, method and status
    assert value(m, "unibus_http_requests_total", route="/v1/rooms/{room_id}", method="GET", status="200") == 1
    assert value(m, "unibus_http_requests_total", route="/v1/rooms/{room_id}/members/{handle}", method="PUT",
                 status="200") == 1
    assert value(m, "unibus_http_requests_total", route="/v1/rooms/{room_id}/members/{handle}", method="DELETE",
                 status="204") == 1
    assert value(m, "unibus_http_requests_total", route="/v1/members", method="POST", status="201") == 1
    assert value(m, "unibus_http_requests_total", route="/v1/me", method="GET", status="401") == 4
    assert value(m, "unibus_http_requests_total", route="/v1/members", method="GET", status="401") == 1
    assert value(m, "unibus_http_requests_total", route="/v1/rooms", method="POST", status="401") == 1
    assert value(m, "unibus_http_request_duration_seconds_count", route="/v1/me") == 5
    assert value(m, "unibus_http_request_duration_seconds_bucket", route="/v1/me", le="+Inf") == 5
    # refused signatures, by reason (never the free-text detail)
    rejections = {labels["reason"]: m[("unibus_signature_rejections_total", tuple(labels.items()))]
                  for labels in series(m, "unibus_signature_rejections_total")}
    assert set(rejections) == set(SIGNATURE_REJECTION_REASONS)
    assert rejections["missing"] == 1 and rejections["replay"] == 1 and rejections["expired"] == 1
    assert rejections["bad_signature"] == 2  # the unknown keyid and the forgery: one reason, as one 401 detail
    assert rejections["digest"] == 1
    # nonce claims: every signed request that got past its signature claimed one; the replay did not
    assert value(m, "unibus_nonce_claims_total", result="claimed") >= 8
    assert value(m, "unibus_nonce_claims_total", result="replay") == 1
    assert value(m, "unibus_nonce_claims_total", result="unavailable") == 0
    # the store: writes by kind, counts kept from its changes, the membership log
    assert value(m, "unibus_store_writes_total", kind="member_added") == 1
    assert value(m, "unibus_store_writes_total", kind="room_created") == 1
    assert value(m, "unibus_store_writes_total", kind="room_member_removed") == 1
    assert value(m, "unibus_members") == 2 and value(m, "unibus_rooms") == 1
    assert value(m, "unibus_log_entries") == 5  # bootstrap, bob, the room, bob in, bob out
    # bus authorization: the callout answered bob, the removal kicked his connection
    assert value(m, "unibus_bus_auth_callouts_total", result="authorized") >= 1
    assert value(m, "unibus_bus_auth_kicks_total") >= 1
    assert value(m, "unibus_bus_auth_changes_total") >= 3  # bob added, bob in the room, bob out of it
    assert value(m, "unibus_bus_auth_change_duration_seconds_count") == value(m, "unibus_bus_auth_changes_total")
    assert value(m, "unibus_bus_auth_kicks_pending") == 0
    assert value(m, "unibus_bus_auth_changes_unconfirmed_total") == 0
    # NATS, health, posture, blobs, the process
    assert value(m, "unibus_nats_connected") == 1 and value(m, "unibus_healthy") == 1
    assert value(m, "unibus_nats_server_restarts_total") == 0
    assert value(m, "unibus_posture_secure") == 1
    assert value(m, "unibus_blobs") == 0 and value(m, "unibus_blob_bytes") == 0
    assert value(m, "unibus_info", version="0.12.0", node=d.healthz()[1]["node"]) == 1
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "unibus_plugin_hook_errors_total", plugin="auth_enforce", hook="healthz_fields") == 0
    # nothing that names a member, a room or a key
    for word in ("bob", "eve", "alice", room):
        assert not re.search(rf"\b{word}\b", text), word
    for secret in (bob.bus_pub, alice.sign_pub_b64, sig["Signature"], sig["Signature-Input"]):
        assert secret not in text


async def test_labels_stay_bounded_whatever_a_client_sends(world):
    d = world.daemon
    async with aiohttp.ClientSession() as s:
        for i in range(30):
            async with s.get(f"{d.base_url}/nothing/{i}/here") as r:
                assert r.status == 404
            async with s.request("PROPFIND", f"{d.base_url}/healthz") as r:
                assert r.status == 405
        async with s.request("MKCOL", f"{d.base_url}/v1/me") as r:  # unsigned: 401 before any 405
            assert r.status == 401
    text, m = scrape(world.metrics_url)
    routes = {labels["route"] for labels in series(m, "unibus_http_requests_total")}
    methods = {labels["method"] for labels in series(m, "unibus_http_requests_total")}
    assert UNMATCHED_ROUTE in routes and not any("nothing" in r for r in routes)
    assert all(r == UNMATCHED_ROUTE or r.startswith("/") for r in routes)
    assert methods <= {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other"}
    assert value(m, "unibus_http_requests_total", route=UNMATCHED_ROUTE, method="GET", status="404") >= 30
    assert value(m, "unibus_http_requests_total", route=UNMATCHED_ROUTE, method="other", status="405") >= 30
    assert "PROPFIND" not in text and "MKCOL" not in text


def test_the_metrics_listener_serves_only_get_metrics(world):
    base = world.metrics_url.rsplit("/", 1)[0]
    for method, path in (("GET", "/"), ("GET", "/healthz"), ("POST", "/metrics"), ("GET", "/metrics/x")):
        req = urllib.request.Request(base + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code in (404, 405)
        assert e.value.headers["Content-Type"].startswith("application/problem+json")
    # OpenMetrics for a scraper that asks for it
    req = urllib.request.Request(world.metrics_url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert r.read().decode().rstrip().endswith("# EOF")


def test_the_posture_names_the_metrics_listener(world):
    assert world.daemon.healthz()[1]["posture"]["listeners"]["metrics"] == "loopback"


# -- exposure: an exposed metrics listener needs TLS, like every other listener ------------------------


def test_an_exposed_metrics_listener_without_tls_is_refused(tmp_path):
    r = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), "--metrics-addr", f"0.0.0.0:{free_port()}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert "--metrics-addr 0.0.0.0:" in lines[-1] and "--metrics-tls-cert and --metrics-tls-key" in lines[-1]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_metrics_posture_states_and_flag_rules(tmp_path):
    from unibus.cli import load_settings
    from unibus.errors import ConfigError
    from unibus.posture import startup_posture
    from unibus.settings import insecure_plaintext_warnings

    pki = make_test_pki(tmp_path / "pki")
    cert, key = (str(p) for p in pki.server)

    def posture(*args: str):
        settings, plugins = load_settings("posture", ["--data-dir", str(tmp_path / "d"), *args], env={})
        return startup_posture(settings, plugins), insecure_plaintext_warnings(settings)

    doc, _ = posture("--metrics-addr", "0.0.0.0:9470", "--metrics-tls-cert", cert, "--metrics-tls-key", key)
    assert doc["listeners"]["metrics"] == "tls" and doc["summary"] == "enforce+acl+tls"
    doc, _ = posture("--metrics-addr", "0.0.0.0:9470", "--metrics-tls-cert", cert, "--metrics-tls-key", key,
                     "--metrics-tls-ca", str(pki.ca[0]))
    assert doc["listeners"]["metrics"] == "mtls"
    doc, warnings = posture("--metrics-addr", "0.0.0.0:9470", "--insecure-plaintext")
    assert doc["listeners"]["metrics"] == "plaintext" and doc["tls"] is False and doc["summary"] == "enforce+acl"
    assert any("--metrics-addr 0.0.0.0:9470 is exposed without TLS" in w for w in warnings)
    assert posture("--metrics-addr", "localhost:9470")[0]["listeners"]["metrics"] == "loopback"
    assert posture()[0]["listeners"]["metrics"] == "none"  # off by default
    for args, needle in (
        (["--metrics-tls-cert", cert, "--metrics-tls-key", key], "needs --metrics-addr"),
        (["--metrics-addr", "127.0.0.1:9470", "--metrics-tls-cert", cert], "go together"),
        (["--metrics-addr", "127.0.0.1:9470", "--metrics-tls-ca", str(pki.ca[0])], "--metrics-tls-ca"),
        (["--metrics-addr", "127.0.0.1:8470"], "same port"),
        (["--metrics-addr", "0.0.0.0:4250"], "same port"),
        (["--metrics-addr", "127.0.0.1:9470", "--nats-addr", "0.0.0.0:9470"], "same port"),
        (["--metrics-addr", "nonsense"], "--metrics-addr"),
        (["--metrics-addr", "192.0.2.1:9470"], "--metrics-tls-cert and --metrics-tls-key"),
        (["--metrics-addr", "127.0.0.1:9470", "--metrics-tls-cert", cert, "--metrics-tls-key", str(pki.client[1])],
         "--metrics-tls-key"),
        (["--metrics-addr", "127.0.0.1:9470", "--metrics-tls-cert", cert, "--metrics-tls-key", key,
          "--metrics-tls-ca", cert + ".missing"], "--metrics-tls-ca"),
    ):
        with pytest.raises(ConfigError) as e:
            posture(*args)
        assert needle in str(e.value) and "\n" not in str(e.value), (args, str(e.value))


def test_a_metrics_listener_with_a_client_ca_refuses_a_scraper_without_a_certificate(tmp_path):
    pki = make_test_pki(tmp_path / "pki")
    port = free_port()
    daemon = MembershipdProcess(tmp_path / "data", [
        "--metrics-addr", f"127.0.0.1:{port}", "--metrics-tls-cert", str(pki.server[0]),
        "--metrics-tls-key", str(pki.server[1]), "--metrics-tls-ca", str(pki.ca[0])]).start()
    try:
        url = f"https://127.0.0.1:{port}/metrics"
        anonymous = ssl.create_default_context(cafile=str(pki.ca[0]))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            scrape(url, anonymous)
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            scrape(f"http://127.0.0.1:{port}/metrics")  # no plaintext on a TLS listener
        scraper = ssl.create_default_context(cafile=str(pki.ca[0]))
        scraper.load_cert_chain(str(pki.client[0]), str(pki.client[1]))
        _, m = scrape(url, scraper)
        assert value(m, "unibus_healthy") == 1
        assert daemon.healthz()[1]["posture"]["listeners"]["metrics"] == "mtls"
    finally:
        daemon.stop()



async def test_a_scraper_with_a_certificate_is_not_pushed_out_by_connections_without_one(tmp_path):
    """A red team: with a client CA, a flood of bare TCP connects (no certificate, no TLS) pushed
    out the oldest connections, a scraper's too, mid-scrape or kept between two scrapes (32% of
    scrapes failed). A connection past its handshake showed a certificate of the CA: kept."""
    from unibus.connlimits import METRICS_MAX_CONNECTIONS
    from unibus.metrics import MetricsServer
    from unibus.tls import server_context

    pki = make_test_pki(tmp_path / "pki")
    ctx = server_context(pki.server[0], pki.server[1])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(pki.ca[0]))
    port = free_port()
    server = MetricsServer(Metrics(node="n"), "127.0.0.1", port, ctx)
    await server.start()
    flood: list[asyncio.StreamWriter] = []
    try:
        scraper = ssl.create_default_context(cafile=str(pki.ca[0]))
        scraper.load_cert_chain(str(pki.client[0]), str(pki.client[1]))
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=scraper)

        async def scrape() -> bytes:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: n\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            body = await asyncio.wait_for(reader.readexactly(length), 10)
            assert head.startswith(b"HTTP/1.1 200") and b"unibus_info{" in body
            return body

        await scrape()
        for _ in range(3 * METRICS_MAX_CONNECTIONS):  # bare TCP: no handshake, no certificate
            flood.append((await asyncio.open_connection("127.0.0.1", port))[1])
            await asyncio.sleep(0.005)  # accepted, one at a time
        assert server.limiter.evicted >= 2 * METRICS_MAX_CONNECTIONS  # the flood pushed out its own
        await scrape()  # on the connection kept since the first scrape: the code before had closed it
        assert len(server.limiter) <= METRICS_MAX_CONNECTIONS
        # A review: one holder of a certificate keeping every connection idle locked the others out.
        # When all showed one, the oldest idle one makes room.
        for _ in range(METRICS_MAX_CONNECTIONS):
            flood.append((await asyncio.open_connection("127.0.0.1", port, ssl=scraper))[1])
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=scraper)
        await scrape()
    finally:
        for w in [*flood, writer]:
            w.close()
        await server.stop()


# -- the registry: one per daemon, plugins in their own namespace ------------------------------------------


def test_each_daemon_has_its_own_registry_and_plugins_their_namespace():
    a, b = Metrics(node="a"), Metrics(node="b")
    a.observe_request("/v1/me", "GET", 200, 0.01)
    hello = a.plugin("hello")
    assert hello is a.plugin("hello")
    greetings = hello.counter("greetings_total", "greetings", ["lang"])
    assert hello.counter("greetings_total", "greetings", ["lang"]) is greetings  # the same again
    greetings.labels("en").inc()
    b.plugin("hello").counter("greetings_total", "greetings", ["lang"])  # no clash across daemons
    with pytest.raises(ValueError, match="core"):
        hello.gauge("unibus_members", "a core name")
    with pytest.raises(ValueError, match="auth_enforce"):
        hello.counter("unibus_bus_auth_kicks_total", "another plugin's name")
    with pytest.raises(ValueError, match="exists already"):
        hello.gauge("greetings_total", "a gauge where a counter is")
    with pytest.raises(ValueError):
        hello.counter("bad name", "x")
    assert a.plugin("blobstore").gauge("unibus_blobs", "owned", function=lambda: 3).collect()[0].samples[0].value == 3

    async def render(m: Metrics) -> str:
        return (await m.render())[0].decode()

    text_a, text_b = asyncio.run(render(a)), asyncio.run(render(b))
    assert 'unibus_hello_greetings_total{lang="en"} 1.0' in text_a
    assert 'unibus_hello_greetings_total{lang="en"}' not in text_b
    assert 'unibus_http_requests_total{method="GET",route="/v1/me",status="200"} 1.0' in text_a
    assert "unibus_http_requests_total{" not in text_b
    assert 'unibus_info{node="a"' in text_a and 'unibus_info{node="b"' in text_b
    assert http_method_label("PROPFIND") == "other" and http_method_label("GET") == "GET"
    for result in NONCE_RESULTS:
        assert f'unibus_nonce_claims_total{{result="{result}"}} 0.0' in text_b


def test_methods_a_client_invents_cost_one_series_and_one_cache_entry():
    """An attacker can send any token as a method: the labels and the per-request cache
    behind them stay bounded (one ``other`` entry), however many tokens it sends."""
    m = Metrics(process=False)
    for i in range(500):
        m.observe_request("unmatched", f"X-METHOD-{i}", 405, 0.001)
    m.observe_request("unmatched", "GET", 404, 0.001)
    assert len(m._request_children) == 2  # noqa: SLF001 - the cache is what would grow
    text = asyncio.run(m.render())[0].decode()
    assert 'unibus_http_requests_total{method="other",route="unmatched",status="405"} 500.0' in text
    assert "X-METHOD" not in text


class BrokenHealthz:
    from unibus import hookimpl

    @hookimpl
    def healthz_fields(self, app):
        raise RuntimeError("broken on purpose")


async def test_a_failing_hook_is_counted():
    pm = make_plugin_manager()
    pm.register(BrokenHealthz(), "brittle")
    metrics = Metrics(process=False)
    metrics.plugins = pm
    text = (await metrics.render())[0].decode()
    assert 'unibus_plugin_hook_errors_total{hook="healthz_fields",plugin="brittle"} 0.0' in text
    pm.call_each_safe("healthz_fields", app=None)
    pm.call_each_safe("healthz_fields", app=None)
    text = (await metrics.render())[0].decode()
    assert 'unibus_plugin_hook_errors_total{hook="healthz_fields",plugin="brittle"} 2.0' in text


async def test_counts_follow_changes_without_rescanning(tmp_path: Path):
    """StateCounts: local changes need no I/O, another node's keys one read each, a reload one full read."""
    from unibus.store.base import Change
    from unibus.store.db import migrate
    from unibus.store.sqlite import SqliteStore, new_member

    migrate(tmp_path / "m.db")
    store = SqliteStore(tmp_path / "m.db")
    reads: list[str] = []
    real_membership, real_bus_member = store.membership, store.bus_member

    async def membership():
        reads.append("membership")
        return await real_membership()

    async def bus_member(handle):
        reads.append(f"member {handle}")
        return await real_bus_member(handle)

    store.membership, store.bus_member = membership, bus_member  # type: ignore[method-assign]
    try:
        counts = StateCounts(store)
        store.add_listener(counts.on_change)
        await counts.refresh()
        assert (len(counts.members), len(counts.rooms), counts.log_entries) == (0, 0, 0)
        ann = generate_identity("ann")
        await store.add_member(new_member("ann", "admin", ann.sign_pub, ann.enc_pub, ann.enc_suite, ann.bus_pub))
        room = await store.create_room("r", "ann")
        await counts.refresh()
        assert (counts.members, counts.rooms) == ({"ann"}, {room.room_id})
        assert reads == ["membership"]  # the start-up load only
        counts.on_change(Change("reloaded", origin="remote", keys=("member.ann", "member.zed")))
        await counts.refresh()
        assert counts.members == {"ann"}  # zed is no member: re-read, not added
        assert sorted(reads[1:]) == ["member ann", "member zed"]  # one read per key, in any order
        await store.delete_room(room.room_id)
        await store.reload()  # SIGHUP: one full read
        await counts.refresh()
        await counts.refresh()  # nothing changed since: no read at all
        assert counts.rooms == set() and reads.count("membership") == 2
    finally:
        await store.close()


async def test_bus_auth_metrics_have_one_shape_enforced_or_not(tmp_path):
    """--bus-auth off: auth_enforce's metrics exist all the same, at 0 (dashboards and alerts see one shape)."""
    from unibus.app import METRICS, make_app
    from unibus.bus import Bus
    from unibus.plugins import auth_enforce
    from unibus.settings import HostPort, Settings

    settings = Settings(data_dir=tmp_path, http_addr=HostPort("127.0.0.1", free_port()), server_name="t",
                        bus_auth="off")
    app = make_app(settings, make_plugin_manager(auth_enforce), Bus("nats://127.0.0.1:1"), None)
    await auth_enforce.startup(app)
    text = (await app[METRICS].render())[0].decode()
    for line in ("unibus_bus_auth_changes_total 0.0", "unibus_bus_auth_change_duration_seconds_count 0.0",
                 "unibus_bus_auth_kicks_total 0.0", "unibus_bus_auth_kicks_pending 0.0",
                 'unibus_bus_auth_callouts_total{result="authorized"} 0.0'):
        assert line in text, line


def test_a_plugin_cannot_make_or_reach_another_owners_metric():
    """Plugin ``http`` asking for ``requests_total`` got the core's own unibus_http_requests_total and
    could write to it; plugin ``bus`` could take auth_enforce's unibus_bus_auth_changes_total; plugins
    ``a-b`` and ``a_b`` shared one prefix (red team)."""
    from unibus.metrics import Metrics

    m = Metrics(process=False)
    with pytest.raises(ValueError, match="belongs to the core"):
        m.plugin("http").counter("requests_total", "x", ["route", "method", "status"])
    with pytest.raises(ValueError, match="belongs to the auth_enforce plugin"):
        m.plugin("bus").counter("auth_changes_total", "x")
    mine = m.plugin("a-b").counter("events_total", "x")
    assert m.plugin("a-b").counter("events_total", "x") is mine  # its own, asked again
    with pytest.raises(ValueError, match="belongs to plugin a-b, not to plugin a_b"):
        m.plugin("a_b").counter("events_total", "x")
