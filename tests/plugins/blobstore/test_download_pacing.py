"""Downloads take slots and are held to the download rules (docs/blobstore.md, "Limits";
``unibus.plugins.blobstore.limits`` and ``.pacing``).

Real parts: the plugin's routes over the real fs backend on a real aiohttp server (the
stand-in store and auth of test_http_backends), real loopback sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time

import pytest
from unibus.plugins.blobstore.fs import FsBackend
from unibus.plugins.blobstore.pacing import acked

from .test_http_backends import serve_blob_routes

MIB = 1024 * 1024
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")


def test_acked_reads_the_bytes_a_client_took_from_a_real_socket():
    """``tcpi_bytes_acked`` sits where pacing reads it: after a client read every byte, the
    sender's count grew by exactly what was sent (the struct's offset is hand-written)."""

    class Transport:
        def __init__(self, sock):
            self.sock = sock

        def get_extra_info(self, name):
            return self.sock if name == "socket" else None

    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            server, _ = listener.accept()
            with server:
                before = acked(Transport(server))
                assert before is not None
                payload = os.urandom(3 * MIB + 11)
                server.sendall(payload)
                got = 0
                while got < len(payload):
                    got += len(client.recv(MIB))
                deadline = time.monotonic() + 5
                while acked(Transport(server)) - before < len(payload) and time.monotonic() < deadline:
                    time.sleep(0.01)  # the last ACK may still be on its way
                assert acked(Transport(server)) - before == len(payload)


async def _serve(tmp_path, max_downloads: int):
    backend = FsBackend(tmp_path / "blobs")
    await backend.start()
    server, service = await serve_blob_routes(backend, 64 * MIB, ("dave", "erin", "frank", "gina"),
                                              max_downloads=max_downloads)
    return server, backend, service


def _get(blob_id: str, member: str, deadline: float = 30.0) -> bytes:
    return (f"GET /v1/rooms/r1/blobs/{blob_id} HTTP/1.1\r\nHost: x\r\n"
            f"X-Test-Member: {member}\r\nX-Test-Body-Timeout: {deadline}\r\n\r\n").encode()


async def _answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and (for a problem) body the server sent first on ``sock``."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(10):
        while b"\r\n\r\n" not in data:
            data += await loop.sock_recv(sock, 65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        status = int(lines[0].split()[1])
        if status != 200:
            while len(rest) < int(headers.get("content-length", "0")):
                rest += await loop.sock_recv(sock, 65536)
    return status, headers, rest


async def test_downloads_take_slots_a_quarter_per_member(tmp_path):
    """--blob-max-downloads 4: one download per member (a quarter), four on the node. A
    member over its share gets 429 too-many-downloads (no retry helps it), a member on a
    full node 503 with Retry-After; both before the blob is opened. Closing the stalled
    downloads gives every slot back, and a download then goes through whole."""
    server, backend, service = await _serve(tmp_path, max_downloads=4)
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    async def open_get(blob_id: str, member: str) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # the window shuts soon
        s.setblocking(False)
        socks.append(s)
        await loop.sock_connect(s, ("127.0.0.1", server.port))
        await loop.sock_sendall(s, _get(blob_id, member))
        return s

    try:
        data = os.urandom(16 * MIB + 3)  # more than loopback's socket buffers take in
        up = await backend.begin("r1")
        await up.write(data)
        blob_id = (await up.finish()).hex()
        await up.commit("bob")
        assert service.downloads.per_member == 1

        assert (await _answer(await open_get(blob_id, "carol")))[0] == 200
        status, headers, body = await _answer(await open_get(blob_id, "carol"))
        problem = json.loads(body)
        assert status == 429 and problem["type"].endswith("/too-many-downloads"), problem
        assert problem["max_downloads"] == 1 and "--blob-max-downloads" in problem["detail"]
        for member in ("dave", "erin", "frank"):
            assert (await _answer(await open_get(blob_id, member)))[0] == 200
        assert service.downloads.active == 4
        status, headers, body = await _answer(await open_get(blob_id, "gina"))
        problem = json.loads(body)
        assert status == 503 and headers["retry-after"] == "1", (status, headers)
        assert problem["type"].endswith("/too-many-downloads") and problem["max_downloads"] == 4

        for s in socks:
            s.close()
        socks.clear()
        async with asyncio.timeout(10):  # each handler sees its connection reset
            while service.downloads.active:
                await asyncio.sleep(0.05)

        s = await open_get(blob_id, "carol")
        got = b""
        async with asyncio.timeout(30):
            while len(got) < len(data) + 200 and (chunk := await loop.sock_recv(s, MIB)):
                got += chunk
                if b"\r\n\r\n" in got and len(got.partition(b"\r\n\r\n")[2]) == len(data):
                    break
        assert got.startswith(b"HTTP/1.1 200") and got.partition(b"\r\n\r\n")[2] == data
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        await server.close()
        await backend.close()
