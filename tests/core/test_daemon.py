"""membershipd serve, end to end: /healthz, errors, signals, restarts, sd_notify."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from helpers import plugin_modules, wait_gone

from unibus import hookimpl
from unibus.app import OPENAPI_DOC
from unibus.daemon import Daemon, _serve
from unibus.errors import RuntimeFailure
from unibus.pluginmanager import PluginManager
from unibus.settings import HostPort, Settings
from unibus.testing import free_port, freeze, http_json, nats_server_pids

HEALTHZ_KEYS = {"status", "version", "node", "posture", "nats"}
NATS_KEYS = {"mode", "url", "connected", "jetstream", "restarts", "kv_replicas", "cluster"}


def test_healthz_shape(membershipd):
    status, body = membershipd.healthz()
    assert status == 200
    assert HEALTHZ_KEYS <= set(body)
    assert body["status"] == "ok" and body["version"] == "0.12.0"
    assert set(body["nats"]) == NATS_KEYS
    assert body["nats"] == {
        "mode": "embedded", "url": membershipd.nats_url, "connected": True, "jetstream": True,
        "restarts": 0, "kv_replicas": 1, "cluster": None,
    }
    # the default single node: everything on loopback, so the full posture (docs/operations.md)
    assert body["posture"] == {
        "bus_auth": "enforce", "acl": True, "tls": True, "summary": "enforce+acl+tls",
        "listeners": {"http": "loopback", "nats": "loopback", "routes": "none", "metrics": "none"},
    }
    assert "warnings" not in body
    assert body["nats_monitor"] == {"enabled": False}


def test_errors_are_problem_json(membershipd):
    import urllib.request

    for method, path, code in (("GET", "/nope", 404), ("POST", "/healthz", 405), ("DELETE", "/openapi.json", 405)):
        req = urllib.request.Request(membershipd.base_url + path, method=method)
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("expected an error")
        except urllib.error.HTTPError as e:
            assert e.code == code
            assert e.headers["Content-Type"].startswith("application/problem+json")
            import json

            body = json.loads(e.read())
            assert {"type", "title", "status", "detail"} <= set(body) and body["status"] == code


def test_openapi_served(membershipd):
    status, doc = http_json("GET", membershipd.base_url + "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert "get" in doc["paths"]["/healthz"]


def test_files_are_private(membershipd):
    d = membershipd.data_dir
    for name in ("nats.conf", "service.nkey", "membershipd.db"):
        assert (d / name).stat().st_mode & 0o077 == 0, name
    seed = (d / "service.nkey").read_text().strip()
    assert seed.startswith("SU")
    assert seed not in membershipd.log_text()
    assert seed.encode() not in Path(f"/proc/{membershipd.nats_pid()}/cmdline").read_bytes()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_nats_server_leaves_one_cpu_to_membershipd(membershipd_factory):
    expected = str(max(1, len(os.sched_getaffinity(0)) - 1))
    default = membershipd_factory()
    assert _environ(default.nats_pid())["GOMAXPROCS"] == expected
    chosen = membershipd_factory(env={**os.environ, "GOMAXPROCS": "3", "UNIBUS_CLUSTER_PASS": "route-secret-1234567890"})
    env = _environ(chosen.nats_pid())
    assert env["GOMAXPROCS"] == "3"  # the operator's value wins
    assert "UNIBUS_CLUSTER_PASS" not in env


def test_nats_server_environment_rule():
    from unibus.supervisor import nats_server_environment

    assert [nats_server_environment({}, cpus=n)["GOMAXPROCS"] for n in (1, 2, 4, 64)] == ["1", "1", "3", "63"]
    assert nats_server_environment({"GOMAXPROCS": "8", "PATH": "/bin"}, cpus=2) == {"GOMAXPROCS": "8", "PATH": "/bin"}


def test_nats_crash_degrades_then_recovers(membershipd):
    pid = membershipd.nats_pid()
    assert pid
    conf = membershipd.data_dir / "nats.conf"
    good = conf.read_text()
    # Freeze membershipd, kill its nats-server and break the config, so every
    # restart fails until we mend it: the outage is ours to end, and no restart
    # can slip in before /healthz is looked at.
    freeze(membershipd.pid)
    try:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        conf.write_text("this is { not a nats config")
    finally:
        membershipd.send_signal(signal.SIGCONT)
    try:
        body = membershipd.wait_healthy(want=503, timeout=20)
        assert body["status"] == "degraded"
        assert body["nats"]["connected"] is False or body["nats"]["jetstream"] is False
    finally:
        conf.write_text(good)
    body = membershipd.wait_healthy(want=200, timeout=30)
    assert body["nats"]["restarts"] >= 1 and body["nats"]["connected"] and body["nats"]["jetstream"]
    assert membershipd.nats_pid() not in (None, pid)


def test_sigterm_stops_everything(membershipd):
    nats = membershipd.nats_pid()
    membershipd.send_signal(signal.SIGTERM)
    # within TimeoutStopSec=15 of deploy/unibus-membershipd.service: a bound, not a benchmark
    assert membershipd.wait(timeout=10) == 0
    assert not Path(f"/proc/{nats}").exists()
    assert "Traceback" not in membershipd.log_text()


def test_sighup_keeps_serving(membershipd):
    membershipd.send_signal(signal.SIGHUP)
    body = membershipd.wait_healthy()
    assert body["status"] == "ok"
    assert "SIGHUP" in membershipd.log_text()


SLOW_RELOAD = """
    import asyncio
    import logging
    from unibus import hookimpl

    PLUGIN_NAME = "slowreload"

    @hookimpl
    async def reloaded(app):
        await asyncio.sleep(0.2)  # a re-read that takes its time: the burst lands during it
        logging.getLogger("slowreload").warning("slow re-read done")
"""


def test_a_burst_of_sighups_is_read_as_a_few(membershipd_factory, tmp_path):
    """300 SIGHUPs 1 ms apart: one re-read at a time, the SIGHUPs during one asking for one more
    (docs/operations.md, "Signals"; tests/core/test_change_events.py counts them exactly), and the
    daemon serves throughout and after. Each re-read takes 0.2 s here (a plugin's ``reloaded``):
    with the store alone a re-read took about a millisecond, and on a busy machine, where 1 ms
    sleeps last longer, every SIGHUP could come after the last re-read had ended (a failure at
    stop 42, beside other tests' clusters)."""
    daemon = membershipd_factory("--plugin", "slow_reload_plugin",
                                 env=plugin_modules(tmp_path, {"slow_reload_plugin": SLOW_RELOAD}))
    began = time.monotonic()
    for _ in range(300):
        daemon.send_signal(signal.SIGHUP)
        time.sleep(0.001)
    burst = time.monotonic() - began
    assert daemon.wait_healthy()["status"] == "ok"
    deadline = time.monotonic() + 30
    while True:  # until every re-read begun has ended (bounded)
        log = daemon.log_text()
        begun, ended = log.count("SIGHUP: re-reading the store"), log.count("slow re-read done")
        if begun and begun == ended or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert 1 <= begun == ended
    # one at a time, each 0.2 s at least: those begun during the burst, and after it one for the
    # SIGHUPs the loop had not handled yet and one more for those that came during that one
    assert begun <= 3 + burst / 0.2, (begun, burst)
    assert "Traceback" not in log


CLOSES_ITS_BUS = """
    from aiohttp import web
    from unibus import hookimpl
    from unibus.app import BUS, add_route

    PLUGIN_NAME = "closesbus"

    @hookimpl
    def startup(app):
        async def close_it(request):
            nc = app[BUS].nc
            # Within nats-py's check (the payload alone), past nats-server's (headers and payload):
            # the server answers -ERR and closes, and nats-py does not reconnect after that.
            await nc.publish("unibus.test.big", b"x" * nc.max_payload, headers={"X-Pad": "y" * 64})
            return web.json_response({"sent": True})

        add_route(app, "GET", "/close-bus", close_it, summary="close", responses={200: "sent"}, signed=False,
                  namespaced=False)
"""


def test_a_nats_connection_that_ends_for_good_stops_membershipd_with_exit_1(membershipd_factory, tmp_path):
    """A review: nats-py closes a connection that is up for good, with no reconnect, after most
    of the server's -ERR answers (a message past max_payload, a control line too long, an invalid
    subject). membershipd's connection then stayed closed, every request that needs NATS failed,
    and the process went on as if degraded for ever. It stops now, with exit 1 and the reason,
    for systemd's ``Restart=on-failure`` to start it again."""
    daemon = membershipd_factory("--plugin", "closes_its_bus",
                                 env=plugin_modules(tmp_path, {"closes_its_bus": CLOSES_ITS_BUS}))
    nats = daemon.nats_pid()
    assert http_json("GET", daemon.base_url + "/close-bus")[0] == 200
    assert daemon.wait(30) == 1
    log = daemon.log_text()
    assert "the connection membershipd to NATS at" in log and "ended for good" in log, log[-3000:]
    assert "membershipd stops, to be started again" in log
    wait_gone(nats)


def test_in_process_a_connection_that_ends_for_good_is_the_stops_error(tmp_path, caplog):
    """The test kit's daemon (``UnibusApp``) stops serving the same way, and its ``stop()`` raises the
    failure, where ``membershipd serve`` exits 1 (a review: a test saw nothing, and the stop, counted
    from the loss, warned of a budget overrun for a stop of no time)."""
    from unibus.testing import UnibusApp

    app = UnibusApp(tmp_path / "d", []).start()
    stopped = False
    try:
        async def past_max_payload() -> None:
            nc = app.daemon.bus.nc
            await nc.publish("unibus.test.big", b"x" * nc.max_payload, headers={"X-Pad": "y" * 64})

        app.run(past_max_payload())
        deadline = time.monotonic() + 10
        while app.daemon.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.daemon.failure is not None
        stopped = True
        with pytest.raises(RuntimeFailure, match="the connection membershipd to NATS at .* ended for good"):
            app.stop()
    finally:
        if not stopped:
            app.stop()
    assert not [r for r in caplog.records if r.getMessage().startswith("stopped in") and r.levelname == "WARNING"]


def test_kill_9_leaves_no_nats_server(membershipd):
    nats = membershipd.nats_pid()
    membershipd.send_signal(signal.SIGKILL)
    membershipd.wait(10)
    wait_gone(nats)


def test_a_second_serve_on_the_same_data_dir_stops_before_touching_it(membershipd):
    """Adversary: an operator's mistake (a second unit, a foreground run). The second ``serve``,
    on other ports, rewrote nats.conf under the first and emptied its uploads in progress; the
    first's nats-server then restarted from the other's config. It stops first now [1], naming
    the pid that serves the directory; the lock dies with its holder, even by SIGKILL."""
    from unibus.testing import run_membershipd

    d = membershipd.data_dir
    conf = (d / "nats.conf").read_bytes()
    upload = d / "blobs" / ".tmp" / "in-progress"
    upload.parent.mkdir(parents=True, exist_ok=True)
    upload.write_bytes(b"half an upload")
    argv = ["serve", "--data-dir", str(d), "--http-addr", f"127.0.0.1:{free_port()}",
            "--nats-addr", f"127.0.0.1:{free_port()}", "--nats-monitor-port", str(free_port())]
    second = run_membershipd(*argv)
    assert second.returncode == 1, second.stderr
    errors = [line for line in second.stderr.splitlines() if "another membershipd serves it" in line]
    assert len(errors) == 1 and f"(pid {membershipd.pid})" in errors[0], second.stderr
    assert (d / "nats.conf").read_bytes() == conf and upload.read_bytes() == b"half an upload"
    assert (d / "membershipd.lock").stat().st_mode & 0o077 == 0
    status, body = http_json("GET", membershipd.base_url + "/healthz")
    assert status == 200 and body["status"] == "ok"

    # nats-server holds the lock too: a hung one keeps a second serve out after membershipd is gone
    held = {os.readlink(f) for f in Path(f"/proc/{membershipd.nats_pid()}/fd").iterdir()}
    assert str(d / "membershipd.lock") in held
    nats = membershipd.nats_pid()
    membershipd.send_signal(signal.SIGKILL)
    membershipd.wait(10)
    wait_gone(nats)
    again = membershipd.again().start()  # the kernel let go of the lock
    status, body = http_json("GET", again.base_url + "/healthz")
    assert status == 200 and body["status"] == "ok"


def test_sd_notify_ready(tmp_path, membershipd_factory):
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        proc = membershipd_factory(env={"NOTIFY_SOCKET": str(sock_path)}, wait=False)
        msg = sock.recv(1024)
        assert msg == b"READY=1"
        status, _ = proc.healthz()  # READY is sent only once HTTP is open
        assert status == 200


def test_external_nats_starts_no_server(nats_server, membershipd_factory):
    proc = membershipd_factory("--nats-url", nats_server.url)
    status, body = proc.healthz()
    assert status == 200
    assert body["nats"]["mode"] == "external" and body["nats"]["url"] == nats_server.url
    assert proc.nats_pid() is None
    assert not (proc.data_dir / "nats.conf").exists()


# -- in-process: plugins that misbehave ------------------------------------------


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "d", http_addr=HostPort("127.0.0.1", free_port()),
                    nats_addr=HostPort("127.0.0.1", free_port()), server_name="t", bus_auth="off")


class FailingStartup:
    @hookimpl
    def startup(self, app):
        raise ValueError("kaboom")


async def test_failing_startup_hook_names_the_plugin_and_stops_nats(tmp_path):
    pm = PluginManager(load_entry_points=False)
    pm.register(FailingStartup(), "broken_plugin")
    with pytest.raises(RuntimeFailure, match="plugin broken_plugin: startup failed: ValueError: kaboom"):
        await _serve(_settings(tmp_path), pm)
    assert not nats_server_pids(tmp_path)


def test_a_sighup_before_the_daemons_handler_is_remembered_not_fatal():
    """A review: a SIGHUP in the first few tenths of a second of ``membershipd serve``, before the
    event loop's handler was set, ended the process (the default action, which systemd takes as a
    clean stop). ``cmd_serve`` remembers it from its first line."""
    from unibus.cli import EarlySighups

    before = signal.getsignal(signal.SIGHUP)
    try:
        early = EarlySighups()
        assert not early.seen
        os.kill(os.getpid(), signal.SIGHUP)  # handled between two bytecodes of this thread
        for _ in range(100):
            if early.seen:
                break
            time.sleep(0.01)
        assert early.seen
    finally:
        signal.signal(signal.SIGHUP, before)


class StopOnReload:
    def __init__(self) -> None:
        self.reloads = 0

    @hookimpl
    def reloaded(self, app):
        self.reloads += 1
        os.kill(os.getpid(), signal.SIGINT)  # _serve's own handler (put back after it): stop


async def test_a_sighup_before_the_daemons_handler_is_read_once_the_start_is_done(tmp_path):
    recorder = StopOnReload()
    pm = PluginManager(load_entry_points=False)
    pm.register(recorder, "stop_on_reload")
    await asyncio.wait_for(_serve(_settings(tmp_path), pm, sighup_before=lambda: True), 60)
    assert recorder.reloads == 1
    assert not nats_server_pids(tmp_path)


class RouteAdder:
    @hookimpl
    async def startup(self, app):
        from unibus.app import add_route

        async def ping(request):
            from aiohttp import web

            return web.json_response({"pong": True})

        add_route(app, "GET", "/ping", ping, summary="ping", responses={200: "pong"}, signed=False, namespaced=False)

    @hookimpl
    def healthz_fields(self, app):
        raise RuntimeError("healthz broke")


async def test_routes_match_openapi_and_broken_healthz_plugin_is_contained(tmp_path):
    pm = PluginManager()  # the real entry points...
    pm.register(RouteAdder(), "route_adder")  # ...and one more
    daemon = Daemon(_settings(tmp_path), pm)
    try:
        await daemon.start()
        doc = daemon.app[OPENAPI_DOC].document()
        routes = {(r.method.lower(), r.resource.canonical) for r in daemon.app.router.routes() if r.method != "HEAD"}
        documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
        assert routes == documented
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{daemon.settings.http_addr}/healthz") as r:
                assert r.status == 200
                body = await r.json()
            async with s.get(f"http://{daemon.settings.http_addr}/ping") as r:
                assert (await r.json()) == {"pong": True}
        assert body["status"] == "ok" and "route_adder" not in body
    finally:
        await daemon.stop()
    assert not nats_server_pids(tmp_path)


class SettingsSpy:
    seen: list = []

    @hookimpl
    def healthz_fields(self, app):
        from unibus.app import SETTINGS

        SettingsSpy.seen.append(app[SETTINGS].cluster_pass)
        return {}


async def test_hooks_reached_through_app_see_no_secret(tmp_path):
    from dataclasses import replace

    from unibus.app import make_app
    from unibus.bus import Bus
    from unibus.settings import Secret

    settings = replace(_settings(tmp_path), cluster_pass=Secret("route-secret"))
    pm = PluginManager(load_entry_points=False)
    pm.register(SettingsSpy(), "spy")
    app = make_app(settings, pm, Bus("nats://127.0.0.1:1"), None)
    from unibus.app import healthz_body

    body = await healthz_body(app)
    assert SettingsSpy.seen == [None]
    assert body["status"] == "degraded"


async def test_nothing_membershipd_writes_is_open_to_other_local_users(tmp_path, membershipd_factory):
    """Adversary: another local user. Under a umask of 022, with a data directory the operator made 0755
    (systemd's StateDirectory= default), after a workload and a backup: every file membershipd wrote is
    0600-like, every directory below the data dir is closed to others, and no secret is in any argv."""
    import stat

    from unibus.client import UnibusClient
    from unibus.client.keys import generate_identity
    from unibus.testing import bootstrap_member, run_membershipd

    alice = generate_identity("alice")
    data = tmp_path / "state"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    bootstrap_member(data, alice, "admin")
    old = os.umask(0o022)
    try:
        # a new interpreter: a forked one's /proc/PID/cmdline is its zygote's (docs/plugins.md)
        proc = membershipd_factory("--metrics-addr", f"127.0.0.1:{free_port()}", data_dir=data,
                                   env={"UNIBUS_TESTING_FORK": "0"})
        async with UnibusClient(proc.base_url, alice) as admin:
            room = (await admin.create_room("modes"))["room_id"]
            await admin.rekey(room)
        out = tmp_path / "backups" / "b.tar.gz"
        out.parent.mkdir()
        done = run_membershipd("backup", "--data-dir", str(data), "--out", str(out))
        assert done.returncode == 0, done.stderr
        secrets = [(data / n).read_text().strip() for n in ("service.nkey", "system.nkey")]
        secrets.append((data / "plugins" / "auth_enforce" / "issuer.nkey").read_text().strip())
        argv = b"".join(Path(f"/proc/{pid}/cmdline").read_bytes() for pid in (proc.pid, proc.nats_pid()))
    finally:
        os.umask(old)
    assert not any(s.encode() in argv for s in secrets)
    opened = []
    for path in [out, *data.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            opened.append((str(path), "symlink"))
        elif path.is_file() and mode & 0o077:
            opened.append((str(path.relative_to(tmp_path)), oct(mode)))
        elif path.is_dir() and mode & 0o022:
            opened.append((str(path.relative_to(tmp_path)), oct(mode)))
    assert opened == []


def test_a_data_directory_that_cannot_be_locked_is_one_line(tmp_path, monkeypatch):
    """ENOLCK (NFS without lockd) was a traceback (a review)."""
    import errno
    import fcntl

    from unibus.daemon import lock_data_dir
    from unibus.errors import ConfigError

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match="cannot lock .*membershipd.lock .*use a local file system"):
        lock_data_dir(tmp_path)


def test_the_lock_file_is_never_one_another_user_planted(tmp_path):
    """Adversary: another local user, or a leftover link. A symbolic link where the lock file goes is
    refused (exit 2), and the file it names is neither opened for writing nor truncated."""
    from unibus.daemon import lock_data_dir
    from unibus.errors import ConfigError

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_text("keep me")
    (data / "membershipd.lock").symlink_to(target)
    with pytest.raises(ConfigError, match="membershipd.lock"):
        lock_data_dir(data)
    assert target.read_text() == "keep me"
