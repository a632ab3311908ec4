"""The nats_monitor plugin end to end: config, a real daemon, its log, bad toggles.

* configure_nats through a real plugin manager and the core's finalize step:
  the monitor is opened on 127.0.0.1:--nats-monitor-port only when a toggle is
  on, and no other plugin can move it off loopback (the rendered config is
  checked by ``nats-server -t``);
* a real ``membershipd serve`` with UNIBUS_NATS_MONITOR=1 answers /varz, /connz
  and /jsz on 127.0.0.1 and nowhere else; without the toggle nothing listens;
* the log stays quiet with MONITOR=1 while a client talks on a room subject,
  and shows [DBG]/[TRC] with UNIBUS_NATS_DEBUG=1;
* a bad toggle spelling stops the daemon (and ``membershipd posture``) with exit
  code 2 and one line naming the variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from unibus import hookimpl
from unibus.daemon import forward_levels, nats_config
from unibus.natsconf import check_config, write_config
from unibus.plugins import nats_monitor
from unibus.plugins.nats_monitor import ENV_DEBUG, ENV_MONITOR
from unibus.settings import HostPort, Settings
from unibus.supervisor import ALL_LEVELS, QUIET_LEVELS, find_nats_server
from unibus.testing import free_port, http_json

ROOM_SUBJECT = "unibus.room.abc123.chat"
# Every key nats-server reads as a monitoring listener. nats-server matches
# config keys case-insensitively, so "HTTP" opens the monitor exactly like "http".
MONITOR_KEYS = {"http", "http_port", "monitor_port", "https", "https_port", "http_base_path"}
TOGGLES_OFF = {ENV_MONITOR: "", ENV_DEBUG: ""}


@pytest.fixture(autouse=True)
def _clean_toggles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither toggle leaks in from the environment the tests run in."""
    monkeypatch.delenv(ENV_MONITOR, raising=False)
    monkeypatch.delenv(ENV_DEBUG, raising=False)


def monitor_entries(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if isinstance(k, str) and k.lower() in MONITOR_KEYS}


def make_settings(tmp_path: Path, monitor_port: int, nats_host: str = "127.0.0.1") -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        nats_addr=HostPort(nats_host, free_port()),
        server_name="nats-monitor-test",
        options={"nats_monitor_port": monitor_port},
    )


def assert_nats_server_accepts(config: dict[str, Any], tmp_path: Path) -> None:
    """Render the final config with the one renderer and let ``nats-server -t`` check it."""
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "data" / "nats.conf"
    write_config(config, path)
    assert json.loads(path.read_text()) == config
    assert path.stat().st_mode & 0o777 == 0o600
    check_config(find_nats_server(), path)


# -- small hostile plugins --------------------------------------------------------


class _Attacker:
    """A plugin that tries to put the monitor on the network."""

    PLUGIN_NAME = "attacker"

    def __init__(self, entries: dict[str, Any]) -> None:
        self.entries = entries

    def attack(self, config: dict[str, Any]) -> None:
        config.update(self.entries)


class Attacker(_Attacker):
    @hookimpl
    def configure_nats(self, settings: Settings, config: dict[str, Any]) -> None:
        self.attack(config)


class FirstAttacker(_Attacker):
    @hookimpl(tryfirst=True)
    def configure_nats(self, settings: Settings, config: dict[str, Any]) -> None:
        self.attack(config)


class LastAttacker(_Attacker):
    # trylast like nats_monitor itself; registered after it, pluggy calls it after it.
    @hookimpl(trylast=True)
    def configure_nats(self, settings: Settings, config: dict[str, Any]) -> None:
        self.attack(config)


ATTACKS = {
    "http-wildcard": {"http": "0.0.0.0:9999"},
    "http-ipv6-wildcard": {"http": "[::]:9999"},
    "http-hostname": {"http": "localhost:9999"},
    "http-int": {"http": 9999},
    "http_port": {"http_port": 9999},
    "monitor_port": {"monitor_port": 9999},
    "https": {"https": "0.0.0.0:9443"},
    "https_port": {"https_port": 9443},
    "everything": {"http": "0.0.0.0:9999", "http_port": 9998, "https": "0.0.0.0:9443", "https_port": 9443,
                   "http_base_path": "/m"},
}
ATTACKER_KINDS = [Attacker, FirstAttacker, LastAttacker]


def build(tmp_path: Path, *plugins: Any, monitor_port: int, nats_host: str = "127.0.0.1",
          unibus_plugin_manager=None) -> tuple[dict[str, Any], Settings]:
    settings = make_settings(tmp_path, monitor_port, nats_host)
    pm = unibus_plugin_manager(*plugins)
    return nats_config(settings, pm), settings


# -- configure_nats: the toggles ----------------------------------------------------


@pytest.mark.parametrize("nats_host", ["127.0.0.1", "0.0.0.0"])
def test_monitor_off_writes_no_monitor(tmp_path, unibus_plugin_manager, nats_host) -> None:
    port = free_port()
    config, _ = build(tmp_path, nats_monitor, monitor_port=port, nats_host=nats_host,
                      unibus_plugin_manager=unibus_plugin_manager)
    assert monitor_entries(config) == {}
    assert config["debug"] is False and config["trace"] is False
    assert forward_levels(config) == QUIET_LEVELS
    assert_nats_server_accepts(config, tmp_path)


@pytest.mark.parametrize("nats_host", ["127.0.0.1", "0.0.0.0"])
@pytest.mark.parametrize("value", ["1", "true", "Yes", " on "])
def test_monitor_on_opens_loopback_only(tmp_path, monkeypatch, unibus_plugin_manager, nats_host, value) -> None:
    monkeypatch.setenv(ENV_MONITOR, value)
    port = free_port()
    config, _ = build(tmp_path, nats_monitor, monitor_port=port, nats_host=nats_host,
                      unibus_plugin_manager=unibus_plugin_manager)
    # Explicit host, even when the client listener is a wildcard (nats-server
    # would otherwise give the monitor the client listener's host).
    assert monitor_entries(config) == {"http": f"127.0.0.1:{port}"}
    assert config["host"] == nats_host
    assert config["debug"] is False and config["trace"] is False
    assert forward_levels(config) == QUIET_LEVELS
    assert_nats_server_accepts(config, tmp_path)


def test_debug_implies_monitor_and_loud_log(tmp_path, monkeypatch, unibus_plugin_manager) -> None:
    monkeypatch.setenv(ENV_DEBUG, "1")
    monkeypatch.setenv(ENV_MONITOR, "0")
    port = free_port()
    config, _ = build(tmp_path, nats_monitor, monitor_port=port, unibus_plugin_manager=unibus_plugin_manager)
    assert monitor_entries(config) == {"http": f"127.0.0.1:{port}"}
    assert config["debug"] is True and config["trace"] is True
    assert forward_levels(config) == ALL_LEVELS
    assert_nats_server_accepts(config, tmp_path)


def test_default_port_is_8222(tmp_path, monkeypatch, unibus_plugin_manager) -> None:
    monkeypatch.setenv(ENV_MONITOR, "1")
    settings = Settings(data_dir=tmp_path / "data", nats_addr=HostPort("127.0.0.1", free_port()))
    config = nats_config(settings, unibus_plugin_manager(nats_monitor))
    assert monitor_entries(config) == {"http": "127.0.0.1:8222"}


def test_bad_toggle_refused_by_configure_nats(tmp_path, monkeypatch, unibus_plugin_manager) -> None:
    from unibus.errors import ConfigError

    monkeypatch.setenv(ENV_MONITOR, "enable")
    with pytest.raises(ConfigError) as info:
        build(tmp_path, nats_monitor, monitor_port=free_port(), unibus_plugin_manager=unibus_plugin_manager)
    assert info.value.exit_code == 2 and ENV_MONITOR in str(info.value)


# -- configure_nats: another plugin tries to move the monitor off loopback -------------


@pytest.mark.parametrize("kind", ATTACKER_KINDS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("attack", list(ATTACKS), ids=str)
@pytest.mark.parametrize("attacker_first", [True, False], ids=["attacker-registered-first", "attacker-registered-last"])
@pytest.mark.parametrize("toggle", ["monitor", "off"])
def test_other_plugin_cannot_move_monitor(tmp_path, monkeypatch, unibus_plugin_manager, kind, attack,
                                          attacker_first, toggle) -> None:
    if toggle == "monitor":
        monkeypatch.setenv(ENV_MONITOR, "1")
    port = free_port()
    attacker = kind(ATTACKS[attack])
    plugins = (attacker, nats_monitor) if attacker_first else (nats_monitor, attacker)
    config, _ = build(tmp_path, *plugins, monitor_port=port, nats_host="0.0.0.0",
                      unibus_plugin_manager=unibus_plugin_manager)
    entries = monitor_entries(config)
    # Whatever the order, the only monitor key left is a plain http on 127.0.0.1.
    assert set(entries) <= {"http"}, entries
    if entries:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", entries["http"]), entries
    if toggle == "monitor" and not (kind is LastAttacker and not attacker_first):
        # nats_monitor ran after the attacker: its address is the one written.
        assert entries == {"http": f"127.0.0.1:{port}"}
    if toggle == "off" and not (kind is LastAttacker and not attacker_first):
        # ... and with the toggle off it removed the attacker's monitor entirely.
        assert entries == {}
    assert_nats_server_accepts(config, tmp_path)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"http": "0.0.0.0:9999"}, {"http": "127.0.0.1:9999"}),
        ({"http": "[::]:9999"}, {"http": "127.0.0.1:9999"}),
        ({"http": "192.0.2.10:9999"}, {"http": "127.0.0.1:9999"}),
        ({"http": 9999}, {"http": "127.0.0.1:9999"}),
        ({"http_port": 9999}, {"http": "127.0.0.1:9999"}),
        ({"monitor_port": 9999}, {"http": "127.0.0.1:9999"}),
        ({"https": "0.0.0.0:9443"}, {}),
        ({"https_port": 9443}, {}),
        ({"http": "0.0.0.0:9999", "https_port": 9443, "http_base_path": "/m"}, {"http": "127.0.0.1:9999"}),
    ],
    ids=["http-wildcard", "http-ipv6", "http-lan", "http-int", "http_port", "monitor_port", "https",
         "https_port", "mixed"],
)
def test_core_pins_foreign_monitor_without_nats_monitor(tmp_path, unibus_plugin_manager, entries, expected) -> None:
    """Even with nats_monitor absent (blocked), the core's finalize keeps the monitor on loopback."""
    config, _ = build(tmp_path, Attacker(entries), monitor_port=free_port(), nats_host="0.0.0.0",
                      unibus_plugin_manager=unibus_plugin_manager)
    assert monitor_entries(config) == expected
    assert_nats_server_accepts(config, tmp_path)


# nats-server matches config keys case-insensitively (verified with 2.15: "HTTP":
# "0.0.0.0:P" opens the monitor on 0.0.0.0, and "MONITOR_PORT" opens it on the
# client listener's host). nats_monitor strips every spelling, and the core's
# enforce_loopback_monitor pins every spelling too.
CASE_ATTACKS = {
    "HTTP": {"HTTP": "0.0.0.0:9999"},
    "Http": {"Http": "0.0.0.0:9999"},
    "HTTP_PORT": {"HTTP_PORT": 9999},
    "Monitor_Port": {"Monitor_Port": 9999},
    "HTTPS": {"HTTPS": "0.0.0.0:9443"},
}


@pytest.mark.parametrize("attack", list(CASE_ATTACKS), ids=str)
@pytest.mark.parametrize("toggle", ["monitor", "off"])
@pytest.mark.parametrize("kind", [Attacker, FirstAttacker], ids=lambda k: k.__name__)
def test_case_variants_removed_by_nats_monitor(tmp_path, monkeypatch, unibus_plugin_manager, attack, toggle,
                                               kind) -> None:
    if toggle == "monitor":
        monkeypatch.setenv(ENV_MONITOR, "1")
    port = free_port()
    config, _ = build(tmp_path, kind(CASE_ATTACKS[attack]), nats_monitor, monitor_port=port,
                      nats_host="0.0.0.0", unibus_plugin_manager=unibus_plugin_manager)
    assert monitor_entries(config) == ({"http": f"127.0.0.1:{port}"} if toggle == "monitor" else {})
    assert_nats_server_accepts(config, tmp_path)


@pytest.mark.parametrize("attack", ["HTTP", "HTTP_PORT"], ids=str)
def test_case_variants_pinned_by_core(tmp_path, unibus_plugin_manager, attack) -> None:
    """A plugin running after nats_monitor, or nats_monitor blocked: only the core can stop it."""
    config, _ = build(tmp_path, Attacker(CASE_ATTACKS[attack]), monitor_port=free_port(), nats_host="0.0.0.0",
                      unibus_plugin_manager=unibus_plugin_manager)
    entries = monitor_entries(config)
    assert set(entries) <= {"http"}, entries
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", str(v)) for v in entries.values()), entries


# -- a real daemon -----------------------------------------------------------------------


def tcp_listeners(port: int) -> list[tuple[str, str]]:
    """``(table, local address hex)`` of every LISTEN socket on ``port`` (IPv4 and IPv6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                addr, _, port_hex = local.rpartition(":")
                if state == "0A" and int(port_hex, 16) == port:
                    found.append((table, addr))
    return found


def connect_refused(host: str, port: int) -> bool:
    """True when nothing accepts a TCP connection at host:port (refused, or no answer)."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return False
    except OSError:
        return True


def varz_like(body: Any) -> bool:
    return isinstance(body, dict) and "server_id" in body


def test_monitor_on_real_daemon(membershipd_factory) -> None:
    proc = membershipd_factory(env={ENV_MONITOR: "1", ENV_DEBUG: ""})
    port = proc.monitor_port
    base = f"http://127.0.0.1:{port}"

    status, varz = http_json("GET", base + "/varz")
    assert status == 200 and varz_like(varz), varz
    assert varz["http_host"] == "127.0.0.1" and varz["http_port"] == port
    assert varz["port"] == proc.nats_port
    assert varz.get("jetstream"), "JetStream is on"

    status, connz = http_json("GET", base + "/connz")
    assert status == 200 and isinstance(connz, dict)
    assert "membershipd" in [c.get("name") for c in connz["connections"]], "membershipd's own bus connection"

    status, jsz = http_json("GET", base + "/jsz?accounts=true&streams=true")
    assert status == 200 and isinstance(jsz, dict)
    assert jsz["server_id"] == varz["server_id"]
    # nats-server keeps its files in <store_dir>/jetstream.
    assert Path(jsz["config"]["store_dir"]).resolve().is_relative_to((proc.data_dir / "jetstream").resolve())
    assert isinstance(jsz["streams"], int) and "account_details" in jsz

    status, health = proc.healthz()
    assert status == 200
    assert health["nats_monitor"] == {"enabled": True, "url": base}

    # Loopback only: the kernel's socket table shows 127.0.0.1, never a wildcard.
    listeners = tcp_listeners(port)
    assert listeners == [("/proc/net/tcp", "0100007F")], listeners


def test_monitor_stays_on_loopback_with_wildcard_client_listener(membershipd_factory, tmp_path) -> None:
    """The deploy unit binds NATS to 0.0.0.0 (with TLS); nats-server would give the monitor that host
    if ``http`` were written without one. The monitor must still be 127.0.0.1 only."""
    from unibus.testing import make_test_pki

    nats_port = free_port()
    tls = make_test_pki(tmp_path / "pki").serve_args(http=False)  # an exposed NATS listener needs TLS
    proc = membershipd_factory("--nats-addr", f"0.0.0.0:{nats_port}", *tls, env={ENV_MONITOR: "1", ENV_DEBUG: ""})
    port = proc.monitor_port
    # Sanity: the client listener really is a wildcard (Go binds 0.0.0.0 as a dual-stack [::]).
    assert {addr.strip("0") for _, addr in tcp_listeners(nats_port)} == {""}, tcp_listeners(nats_port)
    status, varz = http_json("GET", f"http://127.0.0.1:{port}/varz")
    assert status == 200 and varz_like(varz)
    assert tcp_listeners(port) == [("/proc/net/tcp", "0100007F")]
    conf = json.loads((proc.data_dir / "nats.conf").read_text())
    assert monitor_entries(conf) == {"http": f"127.0.0.1:{port}"}


def test_no_toggle_no_monitor(membershipd_factory) -> None:
    proc = membershipd_factory(env=dict(TOGGLES_OFF))
    port = proc.monitor_port
    status, health = proc.healthz()
    assert status == 200
    assert health["nats_monitor"] == {"enabled": False}
    assert tcp_listeners(port) == []
    assert connect_refused("127.0.0.1", port)
    conf = json.loads((proc.data_dir / "nats.conf").read_text())
    assert monitor_entries(conf) == {}


def test_debug_toggle_opens_monitor(membershipd_factory) -> None:
    proc = membershipd_factory(env={ENV_DEBUG: "1", ENV_MONITOR: "0"})
    base = f"http://127.0.0.1:{proc.monitor_port}"
    status, varz = http_json("GET", base + "/varz")
    assert status == 200 and varz_like(varz)
    assert proc.healthz()[1]["nats_monitor"] == {"enabled": True, "url": base}
    assert tcp_listeners(proc.monitor_port) == [("/proc/net/tcp", "0100007F")]


# -- the log: quiet with MONITOR, loud with DEBUG ---------------------------------------


async def room_traffic(proc, count: int = 5) -> None:
    """A real nats-py client subscribes and publishes on a room-like subject.

    Bus authorization is on (the default): it connects with the daemon's own
    service nkey, the one user allowed everywhere.
    """
    import nats

    nc = await nats.connect(proc.nats_url, connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False,
                            nkeys_seed=str(proc.data_dir / "service.nkey"))
    try:
        got: asyncio.Queue = asyncio.Queue()

        async def on_msg(msg) -> None:
            await got.put(msg)

        sub = await nc.subscribe(ROOM_SUBJECT, cb=on_msg)
        await nc.flush(timeout=5)
        for i in range(count):
            await nc.publish(ROOM_SUBJECT, f"hello {i}".encode(), headers={"Unibus-Epoch": "0"})
        await nc.flush(timeout=5)
        received = [await asyncio.wait_for(got.get(), 10) for _ in range(count)]
        assert [m.data for m in received] == [f"hello {i}".encode() for i in range(count)]
        await sub.unsubscribe()
    finally:
        await nc.drain()


def nats_lines(log: str, level: str) -> list[str]:
    return [line for line in log.splitlines() if f"[{level}]" in line]


async def test_monitor_keeps_log_quiet(membershipd_factory) -> None:
    proc = membershipd_factory(env={ENV_MONITOR: "1", ENV_DEBUG: ""})
    await room_traffic(proc)
    status, varz = http_json("GET", f"http://127.0.0.1:{proc.monitor_port}/varz")
    assert status == 200 and varz["in_msgs"] >= 5
    assert proc.stop() == 0
    log = proc.log_text()
    assert "membershipd serving" in log, "sanity: this is the daemon's log"
    for level in ("DBG", "TRC", "INF"):
        assert nats_lines(log, level) == [], f"[{level}] lines reached the quiet log"
    assert ROOM_SUBJECT not in log


async def test_debug_log_shows_debug_and_trace(membershipd_factory) -> None:
    proc = membershipd_factory(env={ENV_DEBUG: "1", ENV_MONITOR: ""})
    await room_traffic(proc)
    assert proc.stop() == 0
    log = proc.log_text()
    assert nats_lines(log, "DBG"), "no [DBG] line in the debug log"
    trc = nats_lines(log, "TRC")
    assert any(ROOM_SUBJECT in line for line in trc), "no [TRC] line mentions the room subject"
    assert nats_lines(log, "INF"), "all levels are forwarded with DEBUG"


# -- a bad toggle value ------------------------------------------------------------------


def nats_servers_using(data_dir: Path) -> list[int]:
    """PIDs of nats-server processes whose command line points into ``data_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            if "nats-server" in cmd and str(data_dir) in cmd:
                pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize(("var", "value"), [(ENV_MONITOR, "maybe"), (ENV_DEBUG, "2"), (ENV_MONITOR, "enable")])
def test_bad_toggle_stops_daemon(membershipd_factory, var, value) -> None:
    env = dict(TOGGLES_OFF)
    env[var] = value
    proc = membershipd_factory(env=env, wait=False)
    assert proc.wait(15) == 2
    log = proc.log_text()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, log
    assert var in errors[0] and repr(value) in errors[0]
    assert [line for line in lines if var in line] == errors
    other = ENV_DEBUG if var == ENV_MONITOR else ENV_MONITOR
    assert other not in log
    # Refused before anything started: no nats-server, no config, nothing listening.
    assert proc.nats_pid() is None
    assert nats_servers_using(proc.data_dir) == []
    assert not (proc.data_dir / "nats.conf").exists()
    assert connect_refused("127.0.0.1", proc.nats_port)
    assert connect_refused("127.0.0.1", proc.http_port)


@pytest.mark.parametrize(("var", "value"), [(ENV_MONITOR, "maybe"), (ENV_DEBUG, "tru")])
def test_bad_toggle_refused_by_posture_command(tmp_path, var, value) -> None:
    env = {**os.environ, **TOGGLES_OFF, var: value}
    res = subprocess.run([sys.executable, "-m", "unibus.cli", "posture", "--data-dir", str(tmp_path / "d")],
                         check=False, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    err_lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1 and var in err_lines[0], res.stderr
    assert res.stdout == ""


def test_posture_command_accepts_good_toggles(tmp_path) -> None:
    env = {**os.environ, ENV_MONITOR: "YES", ENV_DEBUG: "off"}
    res = subprocess.run([sys.executable, "-m", "unibus.cli", "posture", "--data-dir", str(tmp_path / "d")],
                         check=False, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode in (0, 1), res.stderr
    assert "summary" in json.loads(res.stdout)
