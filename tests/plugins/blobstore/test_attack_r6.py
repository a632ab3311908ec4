"""Red team r6: the object store's download deadline (f048a99: "what waits to be sent did
not shrink"), against a client that reads steadily but slowly, and one that reads a trickle.

Real parts only: a real nats-server and object store behind the plugin's real routes on a
real aiohttp server (the stand-in store/auth of test_http_backends), real sockets. Written as
strict xfails by the red team; they pass since a download must average what an upload must
(32 KiB/s after one deadline) and "read nothing" takes two deadlines in a row.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time

import nats
import pytest
from unibus.plugins.blobstore.objectstore import READ_AHEAD_BUDGET, ObjectStoreBackend

from .test_http_backends import serve_blob_routes

MIB = 1024 * 1024
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")


async def _serve(nats_server, tmp_path):
    """The blob routes over the object store on a real aiohttp server; (server, backend, nc)."""
    nc = await nats.connect(nats_server.url)
    backend = ObjectStoreBackend(nc.jetstream(timeout=5), tmp_path / "blobs")
    await backend.start()
    server, _service = await serve_blob_routes(backend, 64 * MIB)
    return server, backend, nc


async def _store(backend, size: int) -> str:
    up = await backend.begin("r1")
    await up.write(os.urandom(size))
    blob_id = (await up.finish()).hex()
    await up.commit("bob")
    return blob_id


def _request(blob_id: str, deadline: float) -> bytes:
    return (f"GET /v1/rooms/r1/blobs/{blob_id} HTTP/1.1\r\nHost: x\r\n"
            f"X-Test-Member: carol\r\nX-Test-Body-Timeout: {deadline}\r\n\r\n").encode()


async def test_a_client_that_keeps_reading_slowly_is_not_cut_off(nats_server, tmp_path, caplog):
    """docs/blobstore.md, "Limits" (f048a99): a download is dropped when "what waits to be sent
    to it, in membershipd's buffer and the socket's send queue, did not shrink" over a body
    deadline; "a client that reads on, however slowly, is not". But SIOCOUTQ counts bytes
    not yet *acknowledged*, and the client's kernel acknowledges on receipt, into its receive
    buffer: what a slow client reads comes out of that buffer, and the server's queue shrinks
    only once the client has freed enough of it for its window to reopen (receiver-side
    silly-window avoidance: on loopback, whose MSS is 64 KiB, about the whole buffer). A
    client reading steadily, never pausing, but less per deadline than its receive buffer
    holds, is dropped, and logged as having read nothing: r5's hole with "one 512 KiB chunk
    per deadline" replaced by "one receive buffer per deadline" (a 128 KiB default, several
    MiB once autotuned). Scaled: deadline 2 s, SO_RCVBUF 64 KiB, 16 KiB read every 0.4 s
    (40 KiB/s, 80 KiB per deadline), for 12 s."""
    caplog.set_level(logging.INFO, logger="unibus.plugins.blobstore")
    deadline = 2.0
    server, backend, nc = await _serve(nats_server, tmp_path)
    stop = threading.Event()
    reads: list[float] = []
    got = 0

    def cut_records():
        return [r for r in caplog.records if "connection dropped" in r.getMessage()]

    def client(blob_id: str) -> None:
        nonlocal got
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", server.port))
            s.sendall(_request(blob_id, deadline))
            reads.append(time.time())
            start = time.monotonic()
            while time.monotonic() - start < 12 and not stop.is_set():  # six deadlines
                try:
                    chunk = s.recv(16 * 1024)
                except OSError:
                    break
                if not chunk:
                    break
                reads.append(time.time())
                got += len(chunk)
                time.sleep(0.4)
        finally:
            s.close()

    try:
        blob_id = await _store(backend, 16 * MIB + 5)
        worker = asyncio.ensure_future(asyncio.to_thread(client, blob_id))
        while not worker.done() and not cut_records():
            await asyncio.sleep(0.1)
        stop.set()
        await worker
    finally:
        stop.set()
        await server.close()
        await backend.close()
        await nc.close()
    cuts = cut_records()
    if cuts:
        at = cuts[0].created
        before = [t for t in reads if t <= at]
        gap = max(b - a for a, b in zip(before, before[1:] + [at], strict=True))
        pytest.fail(f"cut off {at - reads[0]:.1f} s in, after {got / 1024:.0f} KiB read: the client never "
                    f"paused more than {gap:.2f} s < the {deadline} s deadline; the server logged: "
                    f"{cuts[0].getMessage()}")
    assert got > 0


async def test_trickling_downloads_do_not_hold_the_read_ahead_budget(nats_server, tmp_path, caplog):
    """f048a99 drops a download only when what waits to be sent did not shrink over a body
    deadline ("a client that reads on, however slowly, is not"). An upload that trickles is
    ended once it averages under 32 KiB/s after one deadline (docs/blobstore.md, "Limits");
    a download has no such floor. Each object-store download keeps up to 7 read-ahead
    requests from the node's budget of 32 (READ_AHEAD_BUDGET) while its client has not taken
    the chunk before them, so six clients (members, or one member's) reading 2 KiB every 0.2 s (10 KiB/s,
    a small receive buffer so that every read lets the server's queue shrink) hold all 32
    for as long as their blobs last (at 30 s deadlines, a few hundred bytes a second per
    client suffice): every other download on the node runs without read-ahead, and each
    trickling download keeps its chunks in membershipd's memory, their number unbounded.
    Scaled: deadline 1.5 s, 8 s of trickling (five deadlines)."""
    caplog.set_level(logging.INFO, logger="unibus.plugins.blobstore")
    deadline = 1.5
    server, backend, nc = await _serve(nats_server, tmp_path)
    stop = threading.Event()
    got = [0] * 6
    alive = [False] * 6

    def client(i: int, blob_id: str) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", server.port))
            s.sendall(_request(blob_id, deadline))
            alive[i] = True
            while not stop.is_set():
                try:
                    chunk = s.recv(2048)
                except OSError:
                    alive[i] = False
                    break
                if not chunk:
                    alive[i] = False
                    break
                got[i] += len(chunk)
                time.sleep(0.2)
        finally:
            s.close()

    highest = 0  # the most read-ahead tokens free at any time after two deadlines
    try:
        blob_id = await _store(backend, 16 * MIB)
        workers = [asyncio.ensure_future(asyncio.to_thread(client, i, blob_id)) for i in range(6)]
        start = time.monotonic()
        while time.monotonic() - start < 8:
            await asyncio.sleep(0.1)
            if time.monotonic() - start > 2 * deadline:
                highest = max(highest, backend.read_tokens)
        held = backend.read_tokens
        still = sum(alive)
        stop.set()
        await asyncio.gather(*workers)
    finally:
        stop.set()
        await server.close()
        await backend.close()
        await nc.close()
    elapsed = time.monotonic() - start
    rate = sum(got) / 6 / elapsed / 1024
    assert rate < 32, f"the clients read {rate:.1f} KiB/s each: not a trickle"
    dropped = [r.getMessage() for r in caplog.records if "connection dropped" in r.getMessage()]
    assert not (still == 6 and held == 0 and highest == 0), (
        f"six clients reading {rate:.1f} KiB/s each (under the 32 KiB/s an upload must average) held the "
        f"node's whole read-ahead budget ({READ_AHEAD_BUDGET} requests) from the second body deadline to "
        f"the fifth and on; "
        f"none was dropped ({len(dropped)} drops logged)")
