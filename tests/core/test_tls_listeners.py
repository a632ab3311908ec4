"""TLS on every exposed listener (docs/operations.md, "Listeners and TLS").

Refusals are checked without starting anything; two real daemons (HTTPS +
tls://, the second also verifying client certificates) are shared by the
tests of this module; the `unibus` CLI and the SDK talk to them. An attacker's
NATS endpoint that answers a `tls://` dial in clear gets no login.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from helpers import one_error_line
from unibus.client import BusError, UnibusClient, save_identity, tls_context
from unibus.client.keys import generate_identity
from unibus.testing import (
    MembershipdProcess,
    bootstrap_member,
    free_port,
    http_json,
    make_test_ca,
    make_test_cert,
    make_test_pki,
    nats_server_pids,
    run_membershipd,
)


# -- refusals: nothing starts --------------------------------------------------------------


def refused(argv: list[str], *needles: str) -> str:
    """In-process: the flags are refused like serve/posture refuse them (exit 2, one line)."""
    from unibus.cli import load_settings
    from unibus.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_settings("serve", argv, env={})
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.mark.parametrize("flag, addr, fix", [
    ("--http-addr", "0.0.0.0", "--http-tls-cert and --http-tls-key"),
    ("--http-addr", "[::]", "--http-tls-cert and --http-tls-key"),
    ("--http-addr", "example.net", "--http-tls-cert and --http-tls-key"),
    ("--nats-addr", "0.0.0.0", "--tls-cert and --tls-key"),
    ("--nats-addr", "10.0.0.1", "--tls-cert and --tls-key"),
])
def test_exposed_plaintext_listener_is_refused(flag, addr, fix):
    msg = refused([flag, f"{addr}:{free_port()}"], flag, "exposed", fix, "deploy/generate-certs.sh",
                  "--insecure-plaintext")
    assert msg.count(flag) == 1


def test_both_exposed_listeners_are_named_in_one_line():
    refused(["--http-addr", "0.0.0.0:1", "--nats-addr", "0.0.0.0:2"], "--http-addr 0.0.0.0:1", "--nats-addr 0.0.0.0:2")


@pytest.mark.parametrize("command", ["serve", "posture"])
def test_exposed_plaintext_refusal_exits_2_before_anything_starts(tmp_path, command):
    proc = run_membershipd(command, "--data-dir", str(tmp_path / "d"), "--http-addr", f"0.0.0.0:{free_port()}")
    one_error_line(proc, 2, "--http-addr", "exposed", "--http-tls-cert")
    assert not (tmp_path / "d").exists() and not nats_server_pids(tmp_path)


def test_loopback_listeners_need_no_tls(tmp_path):
    proc = run_membershipd("posture", "--http-addr", f"127.0.0.2:{free_port()}", "--nats-addr", f"localhost:{free_port()}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["listeners"] == {"http": "loopback", "nats": "loopback", "routes": "none",
                                                     "metrics": "none"}


def test_exposed_with_tls_is_accepted(tmp_path):
    pki = make_test_pki(tmp_path / "pki")
    proc = run_membershipd("posture", "--http-addr", f"0.0.0.0:{free_port()}", "--nats-addr", f"[::]:{free_port()}",
                           *pki.serve_args())
    assert proc.returncode == 0, proc.stderr
    posture = json.loads(proc.stdout)
    assert posture["summary"] == "enforce+acl+tls"
    assert posture["listeners"] == {"http": "tls", "nats": "tls", "routes": "none", "metrics": "none"}
    verified = run_membershipd("posture", "--nats-addr", f"0.0.0.0:{free_port()}", *pki.serve_args(verify_clients=True))
    assert json.loads(verified.stdout)["listeners"]["nats"] == "mtls"


def test_insecure_plaintext_is_accepted_and_says_so(tmp_path):
    proc = run_membershipd("posture", "--http-addr", f"0.0.0.0:{free_port()}", "--nats-addr", f"0.0.0.0:{free_port()}",
                           "--insecure-plaintext")
    assert proc.returncode == 1  # not enforce+acl+tls
    posture = json.loads(proc.stdout)
    assert posture["tls"] is False and posture["summary"] == "enforce+acl"
    assert posture["listeners"] == {"http": "plaintext", "nats": "plaintext", "routes": "none", "metrics": "none"}
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 2 and all("--insecure-plaintext" in w for w in warnings)
    assert any("--http-addr" in w for w in warnings) and any("--nats-addr" in w for w in warnings)


def test_insecure_plaintext_never_passes_the_cluster_gate(tmp_path):
    d = tmp_path / "pki"
    route_ca = make_test_ca(d, "route-ca")
    node = make_test_cert(d, "n1", route_ca)
    pw = tmp_path / "pass"
    pw.write_text("route-secret-pw\n")
    pw.chmod(0o600)
    args = ["--cluster-name", "c", "--cluster-addr", f"127.0.0.1:{free_port()}",
            "--routes", f"nats://127.0.0.1:{free_port()}", "--cluster-pass-file", str(pw),
            "--route-tls-cert", str(node[0]), "--route-tls-key", str(node[1]), "--route-tls-ca", str(route_ca[0]),
            "--http-addr", f"0.0.0.0:{free_port()}", "--insecure-plaintext"]
    proc = run_membershipd("serve", "--data-dir", str(tmp_path / "data"), *args)
    one_error_line(proc, 2, "enforce+acl+tls", "the http listener is plaintext", "--http-tls-cert")
    assert "routes listener" not in proc.stderr  # routes have mutual TLS: only http is named
    assert not (tmp_path / "data").exists()
    posture = run_membershipd("posture", *args)
    assert posture.returncode == 1 and json.loads(posture.stdout)["listeners"]["routes"] == "mtls"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tls-files")
    pki = make_test_pki(d / "pki")
    other = make_test_pki(d / "other")
    expired = make_test_cert(d / "pki", "expired", pki.ca, valid_from_days=-60, valid_for_days=30)
    future = make_test_cert(d / "pki", "future", pki.ca, valid_from_days=5)
    garbage = d / "garbage.crt"
    garbage.write_text("not a certificate\n")
    return {"cert": pki.server[0], "key": pki.server[1], "other_key": other.server[1], "expired": expired[0],
            "expired_key": expired[1], "future": future[0], "future_key": future[1], "garbage": garbage,
            "ca": pki.ca[0]}


@pytest.mark.parametrize("case, needle", [
    ("cert-only", "--http-tls-cert and --http-tls-key go together"),
    ("missing", "not a readable file"),
    ("key-readable", "chmod 600"),
    ("wrong-key", "does not match --http-tls-cert"),
    ("expired", "expired on"),
    ("not-yet-valid", "not valid before"),
    ("garbage", "no PEM certificate"),
    ("nats-key-readable", "--tls-key"),
    ("nats-wrong-key", "does not match --tls-cert"),
])
def test_tls_file_refusals(tmp_path, files, case, needle):
    f = dict(files)
    if case in ("key-readable", "nats-key-readable"):
        loose = tmp_path / "loose.key"
        loose.write_bytes(f["key"].read_bytes())
        loose.chmod(0o644)
        f["key"] = loose
    http = {"cert-only": ["--http-tls-cert", str(f["cert"])],
            "missing": ["--http-tls-cert", str(tmp_path / "nope.crt"), "--http-tls-key", str(f["key"])],
            "wrong-key": ["--http-tls-cert", str(f["cert"]), "--http-tls-key", str(f["other_key"])],
            "expired": ["--http-tls-cert", str(f["expired"]), "--http-tls-key", str(f["expired_key"])],
            "not-yet-valid": ["--http-tls-cert", str(f["future"]), "--http-tls-key", str(f["future_key"])],
            "garbage": ["--http-tls-cert", str(f["garbage"]), "--http-tls-key", str(f["key"])],
            "nats-key-readable": ["--tls-cert", str(f["cert"]), "--tls-key", str(f["key"])],
            "nats-wrong-key": ["--tls-cert", str(f["cert"]), "--tls-key", str(f["other_key"])],
            }.get(case, ["--http-tls-cert", str(f["cert"]), "--http-tls-key", str(f["key"])])
    refused(["--data-dir", str(tmp_path / "d"), *http], needle)
    if case == "key-readable":  # and once for real: one line, exit 2, nothing started
        proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), *http)
        one_error_line(proc, 2, needle)
    assert not (tmp_path / "d").exists()


def test_the_private_file_check_refuses_another_users_file_and_a_loose_mode():
    """The check itself, on the ``stat`` of a file as another user would own it: runs as any user
    (the test below makes such a file for real, which needs root)."""
    from unibus.tls import private_file_problem

    def st(uid: int, mode: int) -> os.stat_result:
        return os.stat_result((mode, 0, 0, 1, uid, uid, 100, 0, 0, 0))

    me, other = os.geteuid(), os.geteuid() + 1 if os.geteuid() != 65534 else 65533
    key = Path("/k")
    assert private_file_problem(key, st(me, 0o100600)) is None
    assert private_file_problem(key, st(0, 0o100600)) is None  # root's own file
    assert f"belongs to uid {other}" in private_file_problem(key, st(other, 0o100600))
    assert "chmod 600" in private_file_problem(key, st(me, 0o100640))
    # write access alone is refused too, and the error says what it saw, not "readable"
    assert "open to group or others (mode 0620)" in private_file_problem(key, st(me, 0o100620))
    assert "not a regular file" in private_file_problem(key, st(me, 0o010600))  # a FIFO


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (CI runs as root)")
def test_a_key_of_another_user_is_refused_even_behind_a_link(tmp_path, files):
    """Red team: ``--tls-key`` a link to a 0600 key of another user (nobody) passed the check on
    the mode alone, and that user could swap the key under a running node. The file read must
    be this user's or root's; a link to one's own key (certbot's layout) is fine."""
    other_uid = 65534
    theirs = tmp_path / "theirs.key"
    theirs.write_bytes(files["key"].read_bytes())
    theirs.chmod(0o600)
    os.chown(theirs, other_uid, other_uid)
    link = tmp_path / "server.key"
    link.symlink_to(theirs)
    for flags in (["--http-tls-cert", str(files["cert"]), "--http-tls-key", str(link)],
                  ["--tls-cert", str(files["cert"]), "--tls-key", str(link)]):
        refused(["--data-dir", str(tmp_path / "d"), *flags], f"belongs to uid {other_uid}")
    mine = tmp_path / "mine.key"
    mine.write_bytes(files["key"].read_bytes())
    mine.chmod(0o600)
    own_link = tmp_path / "live.key"
    own_link.symlink_to(mine)
    proc = run_membershipd("posture", "--http-tls-cert", str(files["cert"]), "--http-tls-key", str(own_link))
    assert proc.returncode == 0, proc.stderr


# -- real daemons ---------------------------------------------------------------------------


def loopback_alias() -> str:
    """A host name other than "localhost" that resolves only to loopback addresses.

    membershipd treats every host name but localhost as exposed (it cannot know
    what the name resolves to elsewhere), so such a name lets a test run an
    "exposed" listener that is still reachable from this machine only. Where
    the machine has none, the wildcard address stands in (exposed too; the
    test still dials it on 127.0.0.1 only).
    """
    names = [socket.gethostname()]
    with contextlib.suppress(OSError):
        for line in Path("/etc/hosts").read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            names += fields[1:]
    for name in dict.fromkeys(names):
        if not name or name.lower() == "localhost":
            continue
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            continue
        try:
            addrs = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)}
        except OSError:
            continue
        if addrs and all(ipaddress.ip_address(a).is_loopback for a in addrs):
            return name
    return "0.0.0.0"


def test_insecure_plaintext_daemon_warns_in_its_log_and_on_healthz(membershipd_factory):
    alias = loopback_alias()
    proc = membershipd_factory("--insecure-plaintext", http_host=alias, nats_host=alias)
    status, body = proc.healthz()
    assert status == 200
    assert body["posture"]["tls"] is False and body["posture"]["summary"] == "enforce+acl"
    assert body["posture"]["listeners"] == {"http": "plaintext", "nats": "plaintext", "routes": "none",
                                            "metrics": "none"}
    assert len(body["warnings"]) == 2 and all("--insecure-plaintext" in w for w in body["warnings"])
    log = proc.log_text()
    assert sum("WARNING" in line and "--insecure-plaintext" in line for line in log.splitlines()) == 2
    # without the flag the same listeners are refused
    again = run_membershipd("serve", "--data-dir", str(proc.data_dir.parent / "other"),
                            "--http-addr", f"{alias}:{free_port()}", "--nats-addr", f"127.0.0.1:{free_port()}")
    one_error_line(again, 2, "--http-addr", "exposed")


class World:
    """A running daemon with an admin, the admin's identity file, and the test PKI."""

    def __init__(self, root: Path, *, verify_clients: bool) -> None:
        self.root = root
        self.pki = make_test_pki(root / "pki")
        self.other = make_test_pki(root / "other-pki")
        self.alice = generate_identity("alice")
        self.identity = root / "alice.json"
        save_identity(self.alice, self.identity)
        data = root / "data"
        bootstrap_member(data, self.alice, "admin")
        self.proc = MembershipdProcess(data, self.pki.serve_args(verify_clients=verify_clients), ca=self.pki.ca[0])

    def unibus(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
        full.update(env or {})
        return subprocess.run([sys.executable, "-m", "unibus.client.cli", "--server", self.proc.base_url,
                               "--identity", str(self.identity), *args],
                              capture_output=True, text=True, timeout=60, env=full, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("https"), verify_clients=False)
    try:
        w.proc.start()
        yield w
    finally:
        w.proc.stop()


@pytest.fixture(scope="module")
def mtls_world(tmp_path_factory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("mtls"), verify_clients=True)
    try:
        w.proc.start()
        yield w
    finally:
        w.proc.stop()


def test_https_daemon_serves(world):
    p = world.proc
    assert p.base_url.startswith("https://127.0.0.1:")
    status, body = p.healthz()
    assert status == 200 and body["status"] == "ok"
    assert body["posture"]["summary"] == "enforce+acl+tls"
    assert body["posture"]["listeners"] == {"http": "tls", "nats": "tls", "routes": "none", "metrics": "none"}
    assert body["nats"]["url"].startswith("tls://") and "warnings" not in body
    assert "serving on https://" in p.log_text()
    # the readiness probe of nats-server's TLS port was logged as an [ERR] failed handshake at every start,
    # which tripped alerts on ERR lines (an operations audit)
    assert "TLS handshake error" not in p.log_text().split("serving on https://")[0]
    # a client that does not trust the CA is refused, and so is plain HTTP on the HTTPS port
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        http_json("GET", p.base_url + "/healthz", context=ssl.create_default_context(cafile=str(world.other.ca[0])))
    with pytest.raises(Exception):
        http_json("GET", f"http://127.0.0.1:{p.http_port}/healthz", timeout=3)
    # TLS 1.2 is the floor: a 1.2-only client is served
    ctx = ssl.create_default_context(cafile=str(world.pki.ca[0]))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert http_json("GET", p.base_url + "/healthz", context=ctx)[0] == 200
    conf = json.loads((p.data_dir / "nats.conf").read_text())
    assert conf["tls"]["handshake_first"] is True


def test_a_stop_of_a_tls_node_logs_no_asyncio_warning(tmp_path):
    """nats-py's connections over ``tls://`` made asyncio warn ``returning true from eof_received()
    has no effect when using ssl`` twice at every stop (an operator's walk-through): noise that
    trips alerts on WARNING lines. The stop logs no asyncio warning."""
    w = World(tmp_path, verify_clients=False)
    w.proc.start()
    w.proc.stop()
    log = w.proc.log_text()
    assert "stopped in " in log, log[-2000:]
    assert [line for line in log.splitlines() if " asyncio: " in line] == []


def test_server_context_refuses_old_tls(world):
    from unibus.tls import server_context

    ctx = server_context(world.pki.server[0], world.pki.server[1])
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_cli_talks_to_https_with_ca(world):
    ca = str(world.pki.ca[0])
    ok = world.unibus("--ca", ca, "whoami", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["handle"] == "alice"
    by_env = world.unibus("whoami", "--json", env={"UNIBUS_CA": ca})
    assert by_env.returncode == 0, by_env.stderr
    after = world.unibus("whoami", "--ca", ca)  # a global flag after the command, too
    assert after.returncode == 0, after.stderr


@pytest.mark.parametrize("case", ["no-ca", "other-ca"])
def test_cli_refuses_an_unknown_certificate(world, case):
    args = [] if case == "no-ca" else ["--ca", str(world.other.ca[0])]
    proc = world.unibus(*args, "whoami")
    line = one_error_line(proc, 1, world.proc.base_url, "certificate", "--ca")
    assert "alice" not in proc.stdout and len(line) < 400


@pytest.mark.parametrize("case, needle", [
    ("missing-ca", "--ca"),
    ("cert-without-key", "--cert and --key go together"),
    ("key-readable", "chmod 600"),
    ("wrong-key", "does not match --cert"),
    ("ca-not-a-cert", "no PEM certificate"),
])
def test_cli_tls_flag_refusals(world, tmp_path, case, needle):
    pki = world.pki
    args = {
        "missing-ca": ["--ca", str(tmp_path / "nope.crt")],
        "cert-without-key": ["--ca", str(pki.ca[0]), "--cert", str(pki.client[0])],
        "wrong-key": ["--ca", str(pki.ca[0]), "--cert", str(pki.client[0]), "--key", str(world.other.client[1])],
        "ca-not-a-cert": ["--ca", str(pki.client[1])],
    }.get(case)
    if case == "key-readable":
        loose = tmp_path / "client.key"
        loose.write_bytes(pki.client[1].read_bytes())
        loose.chmod(0o640)
        args = ["--ca", str(pki.ca[0]), "--cert", str(pki.client[0]), "--key", str(loose)]
    one_error_line(world.unibus(*args, "whoami"), 2, needle)


async def _talk(client: UnibusClient, room: str, text: bytes) -> bytes:
    async with client.bus() as bus, bus.listen(room) as messages:
        await bus.send(room, "chat", text)
        msg = await asyncio.wait_for(messages.__anext__(), 10)
        return msg.plaintext


async def test_member_uses_a_tls_bus_verified_with_ca(world):
    async with UnibusClient(world.proc.base_url, world.alice, ssl=tls_context(world.pki.ca[0])) as c:
        info = await c.bus_info()
        assert info["servers"] == [f"tls://127.0.0.1:{world.proc.nats_port}"]
        room = (await c.create_room("tls"))["room_id"]
        await c.rekey(room)
        assert await _talk(c, room, b"over tls") == b"over tls"
        # the same bus without the CA: the bus certificate does not verify, nothing is sent
        with pytest.raises(BusError, match="TLS failed"):
            async with c.bus(tls=ssl.create_default_context(cafile=str(world.other.ca[0]))):
                pass
    # the CLI: --ca covers the bus too
    sent = await asyncio.to_thread(world.unibus, "--ca", str(world.pki.ca[0]), "send", room, "chat", "hi")
    assert sent.returncode == 0, sent.stderr


async def _first_bytes(port: int, wait: float = 1.5) -> bytes:
    """What the server sends first to a client that sends nothing (b"" if nothing within ``wait``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(64), wait)
    except TimeoutError:
        return b""
    finally:
        writer.close()


async def test_a_classic_client_gets_no_plaintext_info(world):
    """handshake_first: true. A classic client waits for INFO before its TLS
    handshake: it is never sent one in clear, however long it waits."""
    import nats

    assert await _first_bytes(world.proc.nats_port) == b""
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
        await nats.connect(f"tls://127.0.0.1:{world.proc.nats_port}", tls=tls_context(world.pki.ca[0]),
                           connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0)


async def test_member_presents_a_client_certificate_when_the_bus_verifies_clients(mtls_world):
    w = mtls_world
    pki = w.pki
    async with UnibusClient(w.proc.base_url, w.alice, ssl=tls_context(pki.ca[0], pki.client[0], pki.client[1])) as c:
        room = (await c.create_room("mtls"))["room_id"]
        await c.rekey(room)
        assert await _talk(c, room, b"with a client cert") == b"with a client cert"
    async with UnibusClient(w.proc.base_url, w.alice, ssl=tls_context(pki.ca[0])) as c:
        with pytest.raises(BusError, match="--cert"):
            async with c.bus():
                pass
    # a client certificate from another CA is refused as well
    other = w.other
    async with UnibusClient(w.proc.base_url, w.alice, ssl=tls_context(pki.ca[0], other.client[0], other.client[1])) as c:
        with pytest.raises(BusError):
            async with c.bus():
                pass
    ca = ["--ca", str(pki.ca[0])]
    without = await asyncio.to_thread(w.unibus, *ca, "send", room, "chat", "no cert")
    one_error_line(without, 1, "--cert")
    env = {"UNIBUS_CERT": str(pki.client[0]), "UNIBUS_KEY": str(pki.client[1])}
    with_cert = await asyncio.to_thread(w.unibus, *ca, "send", room, "chat", "cert", env=env)
    assert with_cert.returncode == 0, with_cert.stderr


def test_migrate_to_kv_presents_a_client_certificate(mtls_world):
    w = mtls_world
    pki = w.pki
    base = ["migrate-to-kv", "--data-dir", str(w.proc.data_dir), "--nats-url", f"nats://localhost:{w.proc.nats_port}",
            "--ca", str(pki.ca[0])]
    without = run_membershipd(*base)
    one_error_line(without, 1, "cannot connect")
    ok = run_membershipd(*base, "--cert", str(pki.client[0]), "--key", str(pki.client[1]))
    assert ok.returncode == 0, ok.stderr
    one_error_line(run_membershipd(*base, "--cert", str(pki.client[0])), 2, "--cert and --key go together")
    no_ca = [a for a in base if a not in ("--ca", str(pki.ca[0]))]
    one_error_line(run_membershipd(*no_ca, "--cert", str(pki.client[0]), "--key", str(pki.client[1])), 2, "--ca")


# -- an attacker's NATS endpoint --------------------------------------------------------------


class FakeNats:
    """Answers every connection at once with a plaintext INFO that omits tls_required
    (what a man in the middle would send), and records what the client sends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> FakeNats:
        info = (b'INFO {"server_id":"FAKE","version":"2.15.1","proto":1,"headers":true,'
                b'"max_payload":1048576,"auth_required":true,"nonce":"relay-me-nonce"}\r\n')

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(info)
            with contextlib.suppress(Exception):
                await writer.drain()
                while True:
                    chunk = await asyncio.wait_for(reader.read(4096), 3)
                    if not chunk:
                        break
                    self.received += chunk
                    writer.write(info)  # whatever arrives, it answers in clear
                    await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"


async def test_the_fake_endpoint_is_a_real_attack():
    """Control: nats-py's classic TLS (INFO first) signs the nonce in clear for this endpoint."""
    import nats

    seed = generate_identity("eve").bus_nkey_seed()
    async with FakeNats() as fake:
        with contextlib.suppress(Exception):
            nc = await nats.connect(fake.url, tls=ssl.create_default_context(), nkeys_seed_str=seed,
                                    connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=0)
            await nc.close()
    assert b"CONNECT" in fake.received and b'"sig"' in fake.received


async def test_member_bus_never_logs_in_over_a_stripped_tls(tmp_path):
    """/v1/bus says tls://; the endpoint answers in clear: the member's client sends no login."""
    async with FakeNats() as fake:
        app = web.Application()

        async def bus(request: web.Request) -> web.Response:
            return web.json_response({"servers": [fake.url], "user_nkey": "U", "inbox_prefix": "_INBOX_alice",
                                      "rooms": {}})

        app.router.add_get("/v1/bus", bus)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with UnibusClient(f"http://127.0.0.1:{port}", generate_identity("alice")) as c:
                with pytest.raises(BusError):
                    async with c.bus(connect_timeout=2):
                        pass
        finally:
            await runner.cleanup()
    assert b"CONNECT" not in fake.received and b"sig" not in fake.received
    assert fake.received[:1] in (b"\x16", b"")  # a TLS ClientHello, or nothing at all


async def test_membershipd_never_logs_in_over_a_stripped_tls():
    """The same for membershipd's own connection (its service nkey has every right)."""
    from unibus.bus import Bus
    from unibus.errors import RuntimeFailure
    from unibus.settings import Secret

    seed = Secret(generate_identity("svc").bus_nkey_seed())
    async with FakeNats() as fake:
        bus = Bus(fake.url, seed, tls=ssl.create_default_context())
        with pytest.raises(RuntimeFailure):
            await bus.connect(timeout=3, check_jetstream=False)
        await bus.close()
    assert b"CONNECT" not in fake.received and b"sig" not in fake.received


async def test_unreachable_https_message_without_ca(world):
    """The SDK's error for an unknown certificate names the fix (ServerUnreachable, not a traceback)."""
    from unibus.client import ServerUnreachable

    async with UnibusClient(world.proc.base_url, world.alice) as c:
        with pytest.raises(ServerUnreachable, match="does not verify"):
            await c.me()


def test_an_sdk_program_with_a_tls_bus_prints_no_asyncio_warning(world):
    """A program using the SDK with a ``tls://`` bus, and no logging configured, printed asyncio's
    ``returning true from eof_received() has no effect when using ssl`` on stderr at each close (a
    developer's walk-through of docs/client.md)."""
    script = textwrap.dedent(f"""
        import asyncio
        from unibus.client import UnibusClient, load_identity, tls_context

        async def main():
            ssl = tls_context(ca={str(world.pki.ca[0])!r})
            async with UnibusClient({world.proc.base_url!r}, load_identity({str(world.identity)!r}), ssl=ssl,
                                    replica_root={str(world.identity.parent / "sdk-replica")!r}) as c:
                room = (await c.create_room("eof"))["room_id"]
                await c.rekey(room)
                async with c.bus() as bus:
                    await bus.send(room, "t", b"x")
            print("done")

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert "eof_received" not in proc.stderr, proc.stderr


async def test_a_url_of_the_wrong_scheme_is_named(world):
    """http:// to an HTTPS listener said only "Server disconnected" (a developer's walk-through)."""
    from unibus.client import ServerUnreachable, UnibusClient

    async with UnibusClient(f"http://127.0.0.1:{world.proc.http_port}", world.alice, timeout=5,
                            replica_root=world.identity.parent / "scheme-replica") as c:
        with pytest.raises(ServerUnreachable) as unreachable:
            await c.me()
    assert unreachable.value.reason.endswith(": does the server want TLS? give an https:// URL"), unreachable.value
