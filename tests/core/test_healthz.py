"""/healthz reads state kept by a background prober, never NATS itself (docs/http-api.md, "GET /healthz").

A real daemon whose nats-server is frozen (SIGSTOP: its sockets stay open,
nothing answers) must still answer /healthz, degraded, and /metrics, while
signed requests fail closed; then come back. How fast /healthz answers is
measured in bench/bench_healthz.py, not asserted here. The prober's own rules
(a hung probe is a failure, an old result is a failure, a disconnect wakes
it) are tested against a real nats-server that is frozen and killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from unibus import hookimpl
from unibus.client.keys import generate_identity
from unibus.app import PLUGINS
from unibus.auth import NonceStore
from unibus.bus import Bus
from unibus.health import STALE_AFTER, HealthProber, HealthState
from unibus.signing import sign_request
from unibus.testing import MembershipdProcess, NatsServer, bootstrap_member, free_port, freeze, make_plugin_manager


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


async def test_a_frozen_nats_server_makes_healthz_say_degraded_and_it_still_answers(tmp_path):
    alice = generate_identity("alice")
    bootstrap_member(tmp_path / "data", alice, "admin")
    port = free_port()
    daemon = MembershipdProcess(tmp_path / "data", ["--metrics-addr", f"127.0.0.1:{port}"]).start()
    metrics = f"http://127.0.0.1:{port}/metrics"
    try:
        nats_pid = daemon.nats_pid()
        assert nats_pid is not None
        freeze(nats_pid)
        try:
            body = daemon.wait_healthy(want=503, timeout=20)
            assert body["status"] == "degraded"
            assert body["nats"]["jetstream"] is False
            assert body["posture"]["summary"] == "enforce+acl+tls"  # the rest of the body is all there
            for _ in range(3):  # and it keeps answering, from what the prober last saw
                status, again = daemon.healthz(timeout=5)
                assert status == 503 and again["status"] == "degraded"
            assert _metric(metrics, "unibus_healthy") == 0
            assert _metric(metrics, "unibus_nats_jetstream_available") == 0
            # a signed request cannot claim its nonce: it fails closed, and the failure is counted
            async with aiohttp.ClientSession() as s:
                headers = sign_request("GET", "/v1/me", None, keyid="alice", private_key=alice.sign_key)
                async with s.get(daemon.base_url + "/v1/me", headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=15)) as r:
                    assert r.status == 503
                    assert (await r.json())["type"].endswith("/nonce-store-unavailable")
            with urllib.request.urlopen(metrics, timeout=10) as r:
                assert 'unibus_nonce_claims_total{result="unavailable"} 1.0' in r.read().decode()
        finally:
            os.kill(nats_pid, signal.SIGCONT)
        body = daemon.wait_healthy(want=200, timeout=30)
        assert body["nats"]["jetstream"] is True and body["nats"]["restarts"] == 0
        assert _metric(metrics, "unibus_healthy") == 1
    finally:
        daemon.stop()


# -- the prober's rules, against a real nats-server -------------------------------------------


async def _until(predicate, timeout: float = 20.0) -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


class Server(NatsServer):
    """A NatsServer that a test may stop itself (stopped once, whoever asks first)."""

    stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            super().stop()


@contextlib.asynccontextmanager
async def nats_with_nonces(tmp_path):
    """A real supervised nats-server, a Bus connected to it and the nonce store on it."""
    server = Server(tmp_path / "nats")
    bus = Bus(server.url)
    nonces = None
    try:
        await bus.connect()
        nonces = NonceStore(bus, skew=60, replicas=1, timeout=1.0)
        await nonces.ensure()
        await nonces.start()
        yield server, bus, nonces
    finally:
        pid = server.pid
        if pid is not None and not server.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # never leave a frozen server behind
        if nonces is not None:
            await nonces.close()
        await bus.close()
        server.stop()


async def test_the_prober_reports_what_it_saw_and_never_waits_for_a_hung_probe(tmp_path):
    async with nats_with_nonces(tmp_path) as (server, bus, nonces):
        now = [1000.0]
        prober = HealthProber(bus, nonces=nonces, supervisor=server.supervisor, timeout=0.3, clock=lambda: now[0])
        assert not prober.state().ok  # nothing probed yet: degraded, not a guess
        assert (await prober.probe_once()).ok
        freeze(server.pid)  # the server's socket stays open; nothing answers
        try:
            hung = await asyncio.wait_for(prober.probe_once(), 10)  # the probe gives up on its own
            assert not hung.ok and hung.connected and not hung.jetstream
        finally:
            os.kill(server.pid, signal.SIGCONT)
        for _ in range(50):  # bounded: the server answers again
            if (await prober.probe_once()).ok:
                break
            await asyncio.sleep(0.1)
        assert prober.state().ok
        now[0] += STALE_AFTER + 1  # the prober stopped: its old "ok" is not kept alive
        assert not prober.state().ok
        assert (await prober.probe_once()).ok
        await bus.close()  # the connection is read live, not from the last probe
        state = prober.state()
        assert not state.ok and not state.connected and not state.jetstream


async def test_the_prober_runs_in_the_background_and_a_disconnect_wakes_it(tmp_path):
    async with nats_with_nonces(tmp_path) as (server, bus, nonces):
        prober = HealthProber(bus, nonces=nonces, supervisor=server.supervisor, interval=3600, timeout=1.0)
        bus.state_listeners.append(prober.wake)  # as the daemon wires it
        seen: list[bool] = []
        probe_once = prober.probe_once

        async def recording() -> HealthState:
            state = await probe_once()
            seen.append(state.ok)
            return state

        prober.probe_once = recording  # type: ignore[method-assign]
        prober.start()
        try:
            await _until(lambda: prober.probes == 1)
            assert seen == [True]
            server.kill(signal.SIGKILL)  # the supervisor restarts it; the bus disconnects, then reconnects
            # with a 1 h interval, only the bus's disconnect and reconnect callbacks can make more probes
            await _until(lambda: prober.probes >= 3)
            assert False in seen[1:]  # the disconnect's probe saw the node down
            server.wait_running()
            await _until(lambda: bus.connected)
            for _ in range(100):  # bounded: JetStream is back after the restart
                if prober.state().ok:
                    break
                prober.wake()
                await asyncio.sleep(0.1)
            assert prober.state().ok
            assert server.restarts == 1
        finally:
            await prober.stop()
        # the supervisor's view is read live: a nats-server that is not running is degraded
        server.stop()
        assert not prober.state().ok and not prober.state().nats_running


class BrokenPosture:
    @hookimpl
    def posture(self, settings):
        raise RuntimeError("broken on purpose")


async def test_a_posture_hook_that_fails_while_serving_drops_its_facts_not_healthz(tmp_path):
    from unibus.app import healthz_body, make_app
    from unibus.bus import Bus
    from unibus.settings import HostPort, Settings

    pm = make_plugin_manager()
    pm.register(BrokenPosture(), "brittle")
    settings = Settings(data_dir=tmp_path, http_addr=HostPort("127.0.0.1", free_port()), server_name="t")
    app = make_app(settings, pm, Bus("nats://127.0.0.1:1"), None)
    body = await healthz_body(app)
    assert body["status"] == "degraded"  # nothing was probed: no NATS at all
    assert body["posture"]["summary"] == "tls" and body["posture"]["bus_auth"] == "off"  # facts gone
    assert pm.hook_errors == {("brittle", "posture"): 1}


@pytest.mark.parametrize("connected", [True, False])
async def test_without_a_prober_healthz_is_degraded(tmp_path, nats_server, connected):
    from unibus.app import health_state, make_app
    from unibus.settings import HostPort, Settings

    bus = Bus(nats_server.url if connected else "nats://127.0.0.1:1")
    if connected:
        await bus.connect()
    try:
        settings = Settings(data_dir=tmp_path, http_addr=HostPort("127.0.0.1", free_port()), server_name="t")
        state = health_state(make_app(settings, make_plugin_manager(), bus, None))
        assert not state.ok and state.connected is connected and state.jetstream is False
    finally:
        await bus.close()


class _Fields:
    def __init__(self, name, fields):
        self.PLUGIN_NAME = name
        self.fields = fields

    @hookimpl
    def healthz_fields(self, app):
        return self.fields


def test_fields_json_cannot_hold_are_left_out_not_a_500(tmp_path):
    """Adversary: anyone, through one plugin's mistake. A set in a plugin's healthz_fields made every
    /healthz a 500 (json_response failed after the hook returned): red team."""
    from unibus.testing import UnibusApp

    served = UnibusApp(tmp_path / "d", [_Fields("careless", {"since": {1, 2}}), _Fields("nan", {"x": float("nan")}),
                                        _Fields("fine", {"ok": True})]).start()
    try:
        status, body = served.anonymous.get("/healthz")
        assert status in (200, 503) and body["fine"] == {"ok": True}, body
        assert "careless" not in body and "nan" not in body
        hook_errors = served.app[PLUGINS].hook_errors
        assert hook_errors[("careless", "healthz_fields")] >= 1 and hook_errors[("nan", "healthz_fields")] >= 1
    finally:
        served.stop()


async def test_a_failed_claim_makes_healthz_degraded_at_once(nats_server):
    """A signed request was answered 503 (its nonce claim failed) while /healthz still said ok from
    the probe of a moment before (a black-box test of the contract, on a cluster that had just lost
    its quorum). The last claim's failure counts at once, until a claim succeeds again."""
    from helpers import fill_nonce_bucket, small_nonce_store

    async with small_nonce_store(nats_server.url) as (bus, nonces):
        prober = HealthProber(bus, nonces=nonces)
        assert (await prober.probe_once()).ok
        await fill_nonce_bucket(nonces)
        assert not prober.state().ok  # no probe since: the claim's failure is enough
        assert not (await prober.probe_once()).ok  # and the probe agrees: the bucket is full
