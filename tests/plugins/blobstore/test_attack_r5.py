"""Red team r5: the object store's download deadline and the client's download lanes.

Written as strict xfails by the red team; they pass since the deadline counts what
the client takes (the transport's buffer and the socket's send queue), not the time
of one write, and a download's lanes wait for their thread before it returns.

Real parts only: a real nats-server and object store behind real aiohttp (the
``http`` harness of test_http_backends), a real daemon (the ``world`` fixture).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest
from unibus.client.blobs import _download, put_raw_blob

from .test_http_backends import http  # noqa: F401 - the fixture

MIB = 1024 * 1024


@pytest.mark.parametrize("http", ["objectstore"], indirect=True)
async def test_a_client_that_keeps_reading_is_not_cut_off(http, caplog):  # noqa: F811
    """docs/blobstore.md: "A client that reads nothing for a body deadline (UNIBUS_BODY_TIMEOUT,
    30 s) is disconnected." get_blob wraps every ``response.write(chunk)`` of a 512 KiB chunk in
    ``asyncio.timeout(deadline)``: once the socket buffers are full, a write returns only after
    the client has read most of a chunk, so a client reading less than a chunk per deadline
    (under ~17 KiB/s with the default 30 s) is dropped, and logged as having "read nothing",
    although it never stopped reading. Scaled down here: deadline 3 s, the client reads
    16 KiB every 0.05 s (~320 KiB/s), for 7 s."""
    import logging

    caplog.set_level(logging.INFO, logger="unibus.plugins.blobstore")
    deadline = 3.0  # long enough that the test client itself never pauses that long
    client, backend, _ = http
    data = os.urandom(16 * MIB + 7)
    up = await backend.begin("r1")
    await up.write(data)
    blob_id = (await up.finish()).hex()
    await up.commit("bob")
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    reads: list[float] = []  # wall-clock times of the client's successful reads

    def cut_records():
        return [r for r in caplog.records if "connection dropped" in r.getMessage()]

    got = 0
    try:
        await loop.sock_connect(sock, ("127.0.0.1", client.port))
        await loop.sock_sendall(sock, (f"GET /v1/rooms/r1/blobs/{blob_id} HTTP/1.1\r\nHost: x\r\n"
                                       f"X-Test-Member: carol\r\nX-Test-Body-Timeout: {deadline}\r\n\r\n").encode())
        reads.append(time.time())
        start = time.monotonic()
        while time.monotonic() - start < 7 and not cut_records():  # over two deadlines of steady reading
            async with asyncio.timeout(5):
                chunk = await loop.sock_recv(sock, 16 * 1024)
            if not chunk:
                break
            reads.append(time.time())
            got += len(chunk)
            await asyncio.sleep(0.05)
    finally:
        sock.close()
    cuts = cut_records()
    if cuts:
        at = cuts[0].created
        before = [t for t in reads if t <= at]
        gap = max(b - a for a, b in zip(before, before[1:] + [at], strict=True))
        pytest.fail(f"cut off {at - reads[0]:.1f} s in, after {got / MIB:.2f} MiB read: the client never "
                    f"paused more than {gap:.2f} s < the {deadline} s deadline; the server logged: "
                    f"{cuts[0].getMessage()}")
    assert got > 0


async def test_no_worker_still_writes_after_a_cancelled_download(world, tmp_path):
    """_download's finally drains both lanes "never leave a worker writing after we return".
    But _Lane.drain() sets ``self.pending = None`` *before* awaiting it: a cancellation that
    lands there (the receive loop waiting in ``writer.submit`` for a slow sink, e.g. a slow
    disk, or get_blob's decrypting sink) cancels the asyncio wrapper only, the finally's drain
    finds nothing pending, the executor is shut down with wait=False, and the download raises
    while the thread still runs the sink. With get_raw_blob/get_blob the caller
    (_replacing) then closes the descriptor and unlinks the temp file while the thread's
    writev goes on to it (EBADF, or a descriptor number reused by another open file)."""
    rid = await world.room()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MIB))
    blob_id = await put_raw_blob(world.clients["carol"], rid, src)

    entered = threading.Event()
    running = threading.Event()
    calls: list[float] = []

    def slow_sink(parts):  # a sink the documentation allows: called in a worker thread
        running.set()
        entered.set()
        try:
            time.sleep(1.5)  # a slow disk
            calls.append(time.monotonic())
        finally:
            running.clear()

    task = asyncio.ensure_future(_download(world.clients["bob"], rid, blob_id, None, slow_sink))
    try:
        # the first block is in the sink; the receive loop (fast loopback) then waits for it in
        # writer.submit -> drain
        assert await asyncio.to_thread(entered.wait, 10)
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        returned = time.monotonic()
        still_running = running.is_set()
    finally:
        if not task.done():
            task.cancel()
        # let the thread finish before the test ends (no thread left behind)
        for _ in range(100):
            if not running.is_set():
                break
            await asyncio.sleep(0.05)
    assert not still_running, "the download raised while its writing lane was still in the sink"
    assert all(t <= returned for t in calls), "the sink ran after the download had raised"
