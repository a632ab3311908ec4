"""Red team r7: the download rules of da70af3 ("a download must average 32 KiB/s past its
first body deadline, and is dropped after two deadlines with nothing taken").

Real parts only: a real nats-server and object store (or the real fs backend) behind the
plugin's real routes on a real aiohttp server (the stand-in store/auth of
test_http_backends, as r6's tests), real sockets. Each was a strict xfail on the code of
da70af3 and passes now: downloads take slots (``--blob-max-downloads``, a quarter per
member) and the fs backend's sendfile is held to the download rules
(``unibus.plugins.blobstore.pacing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from unibus.plugins.blobstore.fs import FsBackend

from .test_attack_r6 import _request, _serve, _store
from .test_http_backends import serve_blob_routes

MIB = 1024 * 1024
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")


async def _stalled_get(port: int, request: bytes) -> socket.socket:
    """A connection that sent ``request`` and will read nothing (a small receive buffer,
    so the window shuts soon)."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, request)
    except BaseException:
        s.close()
        raise
    return s


def _held(server: TestServer) -> tuple[int, int]:
    """``(bytes in membershipd's transport buffers, bytes in the sockets' send queues)`` over
    every connection of the aiohttp server (what its clients have not taken yet)."""
    from unibus.plugins.blobstore.pacing import unsent

    user = kernel = 0
    for handler in server.runner.server.connections:
        transport = handler.transport
        if transport is None:
            continue
        buffered = transport.get_write_buffer_size()
        user += buffered
        kernel += unsent(transport) - buffered
    return user, kernel


async def test_one_members_stalled_downloads_hold_a_bounded_amount(nats_server, tmp_path):
    """da70af3 bounds how *long* a stalled download lives (two body deadlines with nothing
    taken, then a reset that discards the kernel's queue: "a few MiB on loopback", as its
    ``_drop`` says), and docs/blobstore.md, "Limits", bounds the read-ahead (a node-wide
    budget of 32 requests, 16 MiB), but not how *many* downloads one member holds: uploads
    have slots (16 per node, a quarter per member), downloads none. A download whose client
    reads nothing fills its socket's send queue (up to tcp_wmem's maximum, 4 MiB, on
    loopback at once), then waits with a chunk's rest in membershipd's transport buffer,
    its own chunk request in flight ("each download may have one chunk request in flight",
    outside the budget) and the read-ahead it got. All of it stays for two body deadlines
    (60 s by default). So what one member pins grows with the number of requests it sends:
    at about 4 MiB of kernel memory each, a member sending 10 GETs a second keeps ~600
    downloads and ~2.4 GiB of TCP send queues alive, past this host's tcp_mem limits
    (pressure at 1.5 GiB, hard limit 2.2 GiB; under them every TCP socket of the host,
    NATS routes included, is starved), plus ~1 MiB each in membershipd.
    Here: one member, 48 downloads of a 16 MiB blob, read nothing, 10 s deadline; 3 s
    later all 48 were answered 200 (none refused) and they hold far more than the 16
    downloads' worth an upload-like bound (16 slots per node) would allow (64 MiB)."""
    deadline = 10.0
    clients = 48
    server, backend, nc = await _serve(nats_server, tmp_path)
    socks: list[socket.socket] = []
    try:
        blob_id = await _store(backend, 16 * MIB)
        for _ in range(clients):
            socks.append(await _stalled_get(server.port, _request(blob_id, deadline)))
        await asyncio.sleep(3)
        user, kernel = _held(server)
        answered = 0  # how many got a 200 (none was refused)
        for s in socks:
            with contextlib.suppress(BlockingIOError, OSError):
                if s.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 200"):
                    answered += 1
    finally:
        for s in socks:
            s.close()
        await server.close()
        await backend.close()
        await nc.close()
    assert answered < clients or user + kernel <= 64 * MIB, (
        f"one member's {clients} downloads that read nothing (all {answered} answered 200, none refused) "
        f"held {user / MIB:.0f} MiB in membershipd's transport buffers and {kernel / MIB:.0f} MiB in "
        f"socket send queues, {deadline:g} s deadline not yet passed: about {(user + kernel) / clients / MIB:.1f} "
        f"MiB per request, with no bound on the number of requests")


async def _serve_fs(tmp_path: Path):
    backend = FsBackend(tmp_path / "blobs")
    await backend.start()
    server, _service = await serve_blob_routes(backend, 64 * MIB)
    return server, backend


def _open_fds_under(root: Path) -> int:
    """How many of this process's file descriptors are open on files under ``root``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
                n += 1
    return n


async def test_a_stalled_fs_download_is_dropped(tmp_path):
    """docs/blobstore.md, "Limits": "a client that takes nothing for two deadlines in a row
    is disconnected" and "a download is held to what an upload is held to". On the fs
    backend (the single-node daemon's default) ``get_blob`` returns through
    ``_SendfileResponse``, whose ``loop.sendfile`` waits for the socket to become writable
    with no deadline: ``_write_while_read`` and its two rules are never reached. The
    "holds no part of it" of the docs is true of memory but not of the rest: each stalled
    download keeps one socket, one handler task and one descriptor on the blob's data file
    (plus up to a send buffer of kernel memory) until its client goes away, so one member
    opening a few hundred of them runs membershipd out of descriptors (RLIMIT_NOFILE) for
    everybody. Here: deadline 0.5 s, 20 clients that read nothing for 3 s (six deadlines):
    every download is still open, each holding a descriptor on the blob's file."""
    deadline = 0.5
    clients = 20
    server, backend = await _serve_fs(tmp_path)
    root = (tmp_path / "blobs").resolve()
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        up = await backend.begin("r1")
        await up.write(os.urandom(16 * MIB + 3))  # more than loopback's socket buffers take in
        blob_id = (await up.finish()).hex()
        await up.commit("bob")
        before = _open_fds_under(root)
        for _ in range(clients):
            socks.append(await _stalled_get(server.port, _request(blob_id, deadline)))
        await asyncio.sleep(6 * deadline)  # read nothing for six deadlines
        held = _open_fds_under(root) - before
        # then drain one client: a download that was dropped ends short (or is reset); one
        # that was not gets the whole body (the connection then stays open: keep-alive)
        got = 0
        async with asyncio.timeout(30):
            with contextlib.suppress(ConnectionResetError):
                while got < 16 * MIB + 3 and (chunk := await loop.sock_recv(socks[0], 1 << 20)):
                    got += len(chunk)
    finally:
        for s in socks:
            s.close()
        await server.close()
        await backend.close()
    assert held < clients and got < 16 * MIB + 3, (
        f"{clients} clients that read nothing for {6 * deadline:g} s ({6:d} body deadlines) kept their "
        f"downloads: {held} descriptors on the blob's file still open, and the first client, reading at "
        f"last, got all {got} bytes (the response, headers included): the server waited for it")
