"""Red team stop-r1: can someone other than the operator spoil a SIGTERM stop?

The contract (docs/operations.md, "Signals"; ``unibus.daemon.Daemon.stop``, ``serve``):
SIGTERM stops membershipd and it exits 0 within 10 s (STOP_BUDGET), each step a hard
bound; a stop still running 12 s after the signal ends in the watchdog's stack dump and
exit 1; no nats-server is left running, nothing acknowledged is lost.

Real processes only: ``membershipd serve`` (``membershipd_factory``), raw sockets and
signed requests on 127.0.0.1. The one hole this round found is upstream (nats-server panics
under a connect flood at its shutdown), documented; its test holds what membershipd
promises all the same. The other tests are attacks that held, or (the last) one
fixed since.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from helpers import room_ids, sigterm, wait_gone

from unibus.client import UnibusClient
from unibus.client.blobs import sign_streamed_request
from unibus.client.keys import generate_identity
from unibus.signing import sign_request
from unibus.testing import (MembershipdProcess, accept_offline_bootstraps, bootstrap_member, http_json,
                            nats_server_pids)

#: docs/operations.md, "Signals": stop, then exit 0, within 10 s (the slack is the
#: test's own wait for the exit, not a performance allowance).
STOP_BUDGET = 10.0
SLACK = 0.5


# --------------------------------------------------------------------------- helpers


def _world(tmp_path: Path, membershipd_factory, *args: str, members: tuple[str, ...] = ("bob",),
           env: dict[str, str] | None = None, wait: bool = True):
    data_dir = tmp_path / "node"
    people = {"alice": generate_identity("alice")}
    bootstrap_member(data_dir, people["alice"], "admin")
    for h in members:
        people[h] = generate_identity(h)
        bootstrap_member(data_dir, people[h], "member")
    proc = membershipd_factory(*args, env=env, wait=wait, data_dir=data_dir)
    return proc, people


def _sigterm(proc: MembershipdProcess, timeout: float = 20.0) -> tuple[int | None, float, int | None]:
    return sigterm(proc, timeout)


@contextlib.contextmanager
def _held() -> Iterator[list[socket.socket]]:
    """A list for the sockets a test holds open; all of them closed at the end, whatever happens."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def _stopped_in_budget(proc: MembershipdProcess, settle: float) -> None:
    """After ``settle`` s, SIGTERM: exit 0 within the budget, and nats-server gone."""
    time.sleep(settle)
    rc, took, nats = _sigterm(proc)
    assert rc == 0 and took <= STOP_BUDGET + SLACK, (rc, took, proc.log_text()[-2000:])
    wait_gone(nats)


def _signed_headers(method: str, target: str, body: bytes | None, ident) -> dict[str, str]:
    h = sign_request(method, target, body, keyid=ident.handle, private_key=ident.sign_key)
    if body is not None:
        h["Content-Type"] = "application/json"
    return h


def _raw_head(method: str, target: str, headers: dict[str, str]) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


async def _make_room(proc: MembershipdProcess, owner, members=()) -> str:
    async with UnibusClient(proc.base_url, owner) as c:
        await accept_offline_bootstraps(c)  # the members were added offline (_world)
        rid = (await c.create_room("stop-r1"))["room_id"]
        for h in members:
            await c.add_room_member(rid, h)
        return rid


async def _upload_one(proc: MembershipdProcess, ident, rid: str, data: bytes) -> dict:
    target = f"/v1/rooms/{rid}/blobs"
    h = sign_streamed_request("PUT", target, hashlib.sha256(data).digest(), keyid=ident.handle,
                              private_key=ident.sign_key)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, \
            s.put(proc.base_url + target, data=data, headers=h) as r:
        assert r.status == 201, (r.status, await r.text())
        return await r.json()


# --------------------------------------------------------------------------- the hole (upstream)


def test_a_nats_connect_flood_at_the_stop_still_exits_0_with_no_nats_server_left(tmp_path, membershipd_factory):
    """Who: anyone who reaches the NATS port (no credentials at all). Steps: open TCP
    connections to the NATS port as fast as possible, each sending
    ``CONNECT {"user":"x","pass":"y"}`` + ``PING``, and keep doing it while the
    operator sends SIGTERM. Each connection goes to the auth callout; membershipd
    closes its NATS connections (the callout's responder) before it sends nats-server
    SIGTERM, and nats-server, shutting down with callouts pending, panics
    (``panic: runtime error: invalid memory address or nil pointer dereference`` in
    ``(*Server).newRespInbox`` from ``processClientOrLeafCallout``,
    nats-server v2.15.1) instead of shutting down cleanly. membershipd still exits 0
    within the budget and no child is left, so the damage is an unclean nats-server
    exit (its JetStream stores are not closed in order) on a stop under such a flood
    (most stops here; not every one under load). Lame duck mode first would close the
    port, but nats-server then handles no SIGTERM until its grace period ends (the stop
    would end in SIGKILL). This test holds what membershipd promises."""
    proc, _ = _world(tmp_path, membershipd_factory)
    stop = threading.Event()
    socks: list[socket.socket] = []

    def flood() -> None:
        # until the stop is over (bounded: 20,000 connections), at most 1,000 open at once
        made = 0
        while not stop.is_set() and made < 20000:
            try:
                s = socket.create_connection(("127.0.0.1", proc.nats_port), timeout=1)
                s.sendall(b'CONNECT {"user":"x","pass":"y","verbose":false}\r\nPING\r\n')
                socks.append(s)
                made += 1
            except OSError:
                time.sleep(0.01)
            if len(socks) > 1000:
                socks.pop(0).close()

    flooder = threading.Thread(target=flood, name="stop-r1-flood", daemon=True)
    flooder.start()
    try:
        time.sleep(0.5)
        rc, took, nats = _sigterm(proc, timeout=15)
    finally:
        stop.set()
        flooder.join(10)
        for s in socks:
            s.close()
    assert rc == 0 and took <= STOP_BUDGET + SLACK
    wait_gone(nats)
    # Whether nats-server panicked depends on timing (most runs here, not every one under
    # load): an upstream bug, documented in docs/operations.md ("Signals"), not asserted.


# --------------------------------------------------------------------------- attacks that held


def test_idle_and_slowloris_connections_do_not_hold_up_the_stop(tmp_path, membershipd_factory):
    """Anyone on 127.0.0.1: 400 HTTP connections, half idle, half with an unfinished
    request head (slowloris). The stop closes them all; exit 0 at once."""
    proc, _ = _world(tmp_path, membershipd_factory)
    with _held() as socks:
        for i in range(400):
            s = socket.create_connection(("127.0.0.1", proc.http_port), timeout=5)
            if i % 2:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            socks.append(s)
        _stopped_in_budget(proc, 0.3)
    assert nats_server_pids(proc.data_dir) == set()


def test_slow_signed_bodies_at_sigterm_are_cut_and_leave_nothing(tmp_path, membershipd_factory):
    """A member: 10 signed ``POST /v1/rooms`` whose bodies stop after 5 bytes (the body
    deadline is 30 s). The stop gives them 2 s, exits 0 within the budget, and none of
    them created a room (seen after a restart)."""
    proc, people = _world(tmp_path, membershipd_factory)
    bob = people["bob"]
    with _held() as socks:
        for i in range(10):
            body = json.dumps({"name": f"slow-{i}"}).encode()
            h = _signed_headers("POST", "/v1/rooms", body, bob)
            h["Content-Length"] = str(len(body))
            s = socket.create_connection(("127.0.0.1", proc.http_port), timeout=5)
            s.sendall(_raw_head("POST", "/v1/rooms", h) + body[:5])
            socks.append(s)
        _stopped_in_budget(proc, 0.3)
    again = proc.again().start()
    assert room_ids(again, bob) == []


def test_unread_downloads_and_stalled_uploads_at_sigterm(tmp_path, membershipd_factory):
    """A member: 8 downloads of a 16 MiB blob that it never reads (4 KiB receive
    buffers), and 4 uploads stalled after 3 MiB of 8 MiB, all in flight at SIGTERM. The
    HTTP step is cut at its 2.5 s bound; exit 0 within the budget, no nats-server
    left; after a restart the staging area is empty and only the committed blob counts."""
    proc, people = _world(tmp_path, membershipd_factory)
    bob = people["bob"]
    rid = asyncio.run(_make_room(proc, bob))
    doc = asyncio.run(_upload_one(proc, bob, rid, os.urandom(16 * 1024 * 1024)))
    target = f"/v1/rooms/{rid}/blobs/{doc['blob_id']}"
    with _held() as socks:
        for _ in range(8):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(5)
            s.connect(("127.0.0.1", proc.http_port))
            s.sendall(_raw_head("GET", target, _signed_headers("GET", target, None, bob)))
            socks.append(s)
        for _ in range(4):
            data = os.urandom(8 * 1024 * 1024)
            put = f"/v1/rooms/{rid}/blobs"
            h = sign_streamed_request("PUT", put, hashlib.sha256(data).digest(), keyid="bob",
                                      private_key=bob.sign_key)
            h.update({"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
            s = socket.create_connection(("127.0.0.1", proc.http_port), timeout=5)
            s.sendall(_raw_head("PUT", put, h) + data[:3 * 1024 * 1024])
            socks.append(s)
        _stopped_in_budget(proc, 1.0)
    again = proc.again().start()
    status, health = again.healthz()
    assert status == 200 and health["blobstore"]["blobs"] == 1, health
    tmp = again.data_dir / "blobs" / ".tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_an_acknowledged_write_survives_the_stop_and_cannot_be_replayed(tmp_path, membershipd_factory):
    """A member's signed ``POST /v1/rooms`` answered 201, SIGTERM right after: after the
    restart the room is there, and the very same signed request sent again is refused
    (its nonce was in memory; the durable high-water mark covers it), not a second room."""
    proc, people = _world(tmp_path, membershipd_factory)
    bob = people["bob"]
    body = json.dumps({"name": "acked"}).encode()
    h = _signed_headers("POST", "/v1/rooms", body, bob)
    status, doc = http_json("POST", proc.base_url + "/v1/rooms", body, h)
    assert status == 201, doc
    rc, took, nats = _sigterm(proc)
    assert rc == 0 and took <= STOP_BUDGET + SLACK
    wait_gone(nats)
    again = proc.again().start()
    replay, _ = http_json("POST", again.base_url + "/v1/rooms", body, h)
    assert replay in (401, 409, 503), replay
    assert room_ids(again, bob) == [doc["room_id"]]
    replay, _ = http_json("POST", again.base_url + "/v1/rooms", body, h)  # and once the floor has passed
    assert replay in (401, 409, 503), replay
    assert room_ids(again, bob) == [doc["room_id"]]


def test_sigterm_during_start_up_stops_nats_server_and_exits_0(tmp_path, membershipd_factory):
    """SIGTERM as soon as the nats-server child exists, before /healthz answers 200:
    exit 0 within the budget, and no nats-server of this data dir left."""
    proc, _ = _world(tmp_path, membershipd_factory, wait=False)
    deadline = time.monotonic() + 20
    while proc.nats_pid() is None and time.monotonic() < deadline and proc.proc.poll() is None:
        time.sleep(0.005)
    assert proc.nats_pid() is not None
    rc, took, nats = _sigterm(proc)
    assert rc == 0 and took <= STOP_BUDGET + SLACK, (rc, took, proc.log_text()[-2000:])
    wait_gone(nats)
    assert nats_server_pids(proc.data_dir) == set()


def test_sighup_right_before_sigterm(tmp_path, membershipd_factory):
    """SIGHUP (a store re-read) and SIGTERM back to back: exit 0, nats-server gone."""
    proc, _ = _world(tmp_path, membershipd_factory)
    nats = proc.nats_pid()
    started = time.monotonic()
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(15)
    assert rc == 0 and time.monotonic() - started <= STOP_BUDGET + SLACK
    wait_gone(nats)
    assert "Traceback" not in proc.log_text()


def test_a_second_stop_signal_does_not_cut_the_exit_short(tmp_path, membershipd_factory):
    """The operator (or a script) signals twice: the signal handlers were removed once the
    stop was done, so a second SIGTERM, SIGINT or SIGHUP in the last moments before the
    exit killed the process (exit -15, -1 or -2). Now they are ignored until it exits."""
    for i, second in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
        proc, _ = _world(tmp_path / str(i), membershipd_factory)
        nats = proc.nats_pid()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(second)
        assert proc.wait(15) == 0, second
        wait_gone(nats)
