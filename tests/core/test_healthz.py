"""/healthz reads state kept by a background prober, never NATS itself (docs/http-api.md, "GET /healthz").

A real daemon whose nats-server is frozen (SIGSTOP: its sockets stay open,
nothing answers) must still answer /healthz, degraded, and /metrics, while
signed requests fail closed; then come back. How fast /healthz answers is
measured in bench/bench_healthz.py, not asserted here. The prober's own rules
(a hung probe is a failure, an old result is a failure, a disconnect wakes
it) are tested with stand-ins for NATS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from unibus import hookimpl
from unibus.client.keys import generate_identity
from unibus.health import STALE_AFTER, HealthProber
from unibus.signing import sign_request
from unibus.testing import MembershipdProcess, bootstrap_member, free_port, make_plugin_manager


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
        os.kill(nats_pid, signal.SIGSTOP)
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


# -- the prober's rules, with stand-ins for NATS -----------------------------------------------


class FakeBus:
    def __init__(self) -> None:
        self.connected = True


class Nonces:
    """A nonce store whose availability check answers, fails, or hangs."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls = 0

    async def available(self, timeout: float = 1.0) -> bool:
        self.calls += 1
        if self.mode == "hang":
            await asyncio.sleep(3600)
        return self.mode == "ok"


class Supervisor:
    running = True
    restarts = 0


async def test_the_prober_reports_what_it_saw_and_never_waits_for_a_hung_probe():
    bus, nonces, sup = FakeBus(), Nonces(), Supervisor()
    now = [1000.0]
    prober = HealthProber(bus, nonces=nonces, supervisor=sup, timeout=0.05, clock=lambda: now[0])
    assert not prober.state().ok  # nothing probed yet: degraded, not a guess
    assert (await prober.probe_once()).ok
    nonces.mode = "hang"
    assert not (await prober.probe_once()).ok  # a probe that does not answer within its timeout fails
    nonces.mode = "ok"
    assert (await prober.probe_once()).ok
    bus.connected = False
    state = prober.state()  # the connection is read live
    assert not state.ok and not state.connected and not state.jetstream
    bus.connected = True
    sup.running = False
    assert not prober.state().ok and not prober.state().nats_running
    sup.running = True
    now[0] += STALE_AFTER + 1  # the prober stopped: its old "ok" is not kept alive
    assert not prober.state().ok
    assert (await prober.probe_once()).ok


async def test_the_prober_runs_in_the_background_and_a_disconnect_wakes_it():
    bus, nonces = FakeBus(), Nonces()
    prober = HealthProber(bus, nonces=nonces, interval=3600, timeout=0.5)
    prober.start()
    try:
        for _ in range(200):
            if prober.probes:
                break
            await asyncio.sleep(0.01)
        assert prober.probes == 1 and prober.state().ok
        nonces.mode = "down"
        prober.wake()  # what the bus's disconnect and reconnect callbacks do
        for _ in range(200):
            if prober.probes > 1:
                break
            await asyncio.sleep(0.01)
        assert prober.probes == 2 and not prober.state().ok
    finally:
        await prober.stop()


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
async def test_without_a_prober_healthz_is_degraded(tmp_path, connected):
    from unibus.app import health_state, make_app
    from unibus.settings import HostPort, Settings

    bus = FakeBus()
    bus.connected = connected
    settings = Settings(data_dir=tmp_path, http_addr=HostPort("127.0.0.1", free_port()), server_name="t")
    state = health_state(make_app(settings, make_plugin_manager(), bus, None))  # type: ignore[arg-type]
    assert not state.ok and state.connected is connected and state.jetstream is False
