"""Red team r10: 93cc36c, "while a download's body goes out its connection closes with a
reset (zero linger, restored after)" (``pacing.reset_if_closed``) and "a connection closing
with bytes its client never took is dropped" (``pacing.drained``).

Real parts only: the plugin's real routes over the real fs backend and the object store
on a real nats-server, served as membershipd serves them (r8's ``_DaemonLikeServer``, here
with an optional short keep-alive timeout), plain or HTTPS with the test PKI, real loopback
sockets. The first two tests pass on 93cc36c and guard what held: an honest client that
does not half-close gets every byte (and a refusal whole) however the connection ends
(``Connection: close``, HTTP/1.0, the server's keep-alive timeout; TLS close_notify), the
linger being restored before aiohttp closes (trimmed to what tells them apart: every way
of closing at 1 byte and 16 MiB on the fs backend's sendfile, and the chunked paths, fs
over HTTPS and the object store, once each). The last is a strict xfail:
a client that half-closes while the body goes out may get a cut one, the price of the reset
that keeps a half-closed unread download from leaving an orphan (test_attack_r9); it is
documented with the half-close limit in docs/blobstore.md ("Limits").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl

import pytest
from aiohttp import web
from unibus.plugins.blobstore.fs import FsBackend

from .test_attack_r6 import _store
from .test_attack_r8 import _backend, _DaemonLikeServer, _errors, _server_tls
from .test_http_backends import blob_app

MIB = 1024 * 1024
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")


class _Server(_DaemonLikeServer):
    def __init__(self, app, ssl_context, keepalive_timeout=None):
        super().__init__(app, ssl_context)
        self.keepalive_timeout = keepalive_timeout

    async def start(self):
        from unibus.app import SERVER_OPTIONS

        extra = {} if self.keepalive_timeout is None else {"keepalive_timeout": self.keepalive_timeout}
        self.runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=1.0,
                                    **SERVER_OPTIONS, **extra)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self


def _req(path: str, version: str = "1.1", headers: str = "", member: str = "carol") -> bytes:
    return (f"GET {path} HTTP/{version}\r\nHost: x\r\nX-Test-Member: {member}\r\n"
            f"X-Test-Body-Timeout: 5\r\n{headers}\r\n").encode()


async def _exchange(port: int, client_ctx, raw: bytes, *, pause: float, rcvbuf: int | None = None,
                    limit: int) -> bytes:
    """Send ``raw``, wait ``pause`` s without reading (the server finishes and closes meanwhile),
    then read until EOF."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    data = b""
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port)), 10)
        tls = {"ssl": client_ctx, "server_hostname": "localhost"} if client_ctx is not None else {}
        reader, writer = await asyncio.wait_for(asyncio.open_connection(sock=s, limit=1 << 22, **tls), 10)
        writer.write(raw)
        await asyncio.wait_for(writer.drain(), 10)
        await asyncio.sleep(pause)
        try:
            while len(data) < limit:
                got = await asyncio.wait_for(reader.read(1 << 20), 20)
                if not got:
                    break
                data += got
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            data += f"<<{type(e).__name__}: {e}>>".encode()
        writer.transport.abort()
    finally:
        s.close()
    return data


def _body(data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return lines[0].encode(), hdrs, body


@pytest.mark.parametrize("kind, mode, size", [
    # every way a connection ends, on the path that restores the linger (sendfile, plain TCP)
    *(("fs", mode, size) for mode in ("close", "http10", "keepalive-timeout") for size in (1, 16 * MIB)),
    # the chunked paths, once each
    ("fs-https", "close", 16 * MIB), ("objectstore", "close", 16 * MIB),
])
async def test_an_honest_client_gets_every_byte(tmp_path, request, caplog, kind, mode, size):
    backend, nc, server_ctx, client_ctx = await _backend(kind, request, tmp_path)
    app, service = blob_app(backend, 64 * MIB)
    server = await _Server(app, server_ctx, keepalive_timeout=0.5 if mode == "keepalive-timeout" else None).start()
    try:
        blob_id = await _store(backend, size)
        path = f"/v1/rooms/r1/blobs/{blob_id}"
        raw = {"close": _req(path, headers="Connection: close\r\n"), "http10": _req(path, "1.0"),
               "keepalive-timeout": _req(path)}[mode]
        data = await _exchange(server.port, client_ctx, raw, pause=1.5, rcvbuf=None, limit=size + 100000)
        slots = service.downloads.active
    finally:
        await server.close()
        await backend.close()
        if nc is not None:
            await nc.close()
    status, hdrs, body = _body(data)
    assert status.split(b" ")[1] == b"200", data[:200]
    assert len(body) == size, f"{len(body)} of {size}; tail {body[-80:]!r}"
    assert hashlib.sha256(body).hexdigest() == blob_id
    assert slots == 0
    assert not _errors(caplog)



@pytest.mark.parametrize("version", ["1.1-close", "1.0"])
@pytest.mark.parametrize("kind", ["fs", "fs-https"])
async def test_refusals_arrive_whole(tmp_path, caplog, kind, version):
    server_ctx = client_ctx = None
    if kind == "fs-https":
        server_ctx, client_ctx = _server_tls(tmp_path)
    backend = FsBackend(tmp_path / "blobs")
    await backend.start()
    app, service = blob_app(backend, 64 * MIB, ("dave", "erin", "frank"), max_downloads=4)
    server = await _Server(app, server_ctx).start()
    stalled = []
    got = {}
    try:
        blob_id = await _store(backend, 16 * MIB)
        path = f"/v1/rooms/r1/blobs/{blob_id}"
        v, h = ("1.1", "Connection: close\r\n") if version == "1.1-close" else ("1.0", "")
        got[404] = await _exchange(server.port, client_ctx, _req(f"/v1/rooms/r1/blobs/{'0' * 64}", v, h),
                                   pause=0.5, limit=1 << 20)
        got[403] = await _exchange(server.port, client_ctx, _req(path, v, h, member="mallory"), pause=0.5,
                                   limit=1 << 20)
        loop = asyncio.get_running_loop()
        for who in ("carol", "bob", "dave", "erin"):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.setblocking(False)
            stalled.append(s)
            await loop.sock_connect(s, ("127.0.0.1", server.port))
            if client_ctx is None:
                await loop.sock_sendall(s, _req(path, member=who).replace(b"Timeout: 5", b"Timeout: 30"))
            else:
                _r, w = await asyncio.open_connection(sock=s, ssl=client_ctx, server_hostname="localhost")
                w.write(_req(path, member=who).replace(b"Timeout: 5", b"Timeout: 30"))
                await w.drain()
                stalled.append(w)
        await asyncio.sleep(0.5)
        assert service.downloads.active == 4
        got[429] = await _exchange(server.port, client_ctx, _req(path, v, h, member="carol"), pause=0.5,
                                   limit=1 << 20)
        got[503] = await _exchange(server.port, client_ctx, _req(path, v, h, member="frank"), pause=0.5,
                                   limit=1 << 20)
    finally:
        for s in stalled:
            if isinstance(s, socket.socket):
                s.close()
            else:
                s.transport.abort()
        await server.close()
        await backend.close()
    for code, data in got.items():
        status, hdrs, body = _body(data)
        assert status.split(b" ")[1] == str(code).encode(), (code, data[:300])
        assert len(body) == int(hdrs["content-length"]), (code, data[-200:])
        json.loads(body)
    assert service.downloads.active == 0
    assert not _errors(caplog)


@pytest.mark.xfail(strict=True, reason="known limit, documented in docs/blobstore.md (Limits): the client's FIN, "
                                       "seen once loop.sendfile returns, closes the transport with the zero linger "
                                       "still set (and drained drops it): the send queue's last MiB are reset, not "
                                       "delivered; the reset is what keeps an unread half-closed download from "
                                       "leaving an orphan (test_attack_r9)")
@pytest.mark.parametrize("size", [16 * MIB])
async def test_a_client_that_half_closes_once_the_body_flows_gets_the_whole_blob(tmp_path, caplog, size):
    """docs/blobstore.md (93cc36c) and test_attack_r9's known limit say of a client that
    half-closes that "only the fs backend's sendfile(2) over plain HTTP, once started,
    delivers all (asyncio pauses reading during ``loop.sendfile`` and the kernel sends the
    rest)". No longer: a client that got the headers and 2 MiB of a 16 MiB blob, then shuts
    down its writing side (``shutdown(SHUT_WR)``, as ``nc -N`` does at the end of its input)
    and reads on at ~25 MiB/s (a 256 KiB receive buffer, 256 KiB every 10 ms) gets ~14 MiB
    and then ECONNRESET. asyncio resumes reading when ``loop.sendfile`` returns, the FIN
    reaches aiohttp's ``eof_received`` (None: the transport closes itself), so
    ``reset_if_closed`` leaves the zero linger in place (``is_closing()``) and ``drained``
    raises ConnectionResetError ("bytes its client never took") -> ``pacing.drop``: the
    send queue (up to tcp_wmem's 4 MiB) is discarded with a RST. On 848ef22 the same client
    got every byte (the socket closed with a FIN and the kernel delivered the queue): 3 of
    3 runs passed there, 4 of 4 fail on 93cc36c. The same cut hits any HTTP/1.1 client or
    proxy that half-closes its request side while reading a sendfile download."""
    backend = FsBackend(tmp_path / "blobs")
    await backend.start()
    app, service = blob_app(backend, 64 * MIB)
    server = await _Server(app, None).start()
    data = b""
    err = None
    try:
        blob_id = await _store(backend, size)
        s = socket.socket()
        s.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", server.port)), 10)
            await loop.sock_sendall(s, _req(f"/v1/rooms/r1/blobs/{blob_id}"))
            while b"\r\n\r\n" not in data or len(data) < 2 * MIB:
                data += await asyncio.wait_for(loop.sock_recv(s, 1 << 20), 10)
            s.shutdown(socket.SHUT_WR)  # nothing more to send; reads on, at speed
            try:
                while True:
                    got = await asyncio.wait_for(loop.sock_recv(s, 256 * 1024), 10)
                    if not got:
                        break
                    data += got
                    await asyncio.sleep(0.01)  # ~25 MiB/s: far above any pacing rule
            except OSError as e:
                err = e
        finally:
            s.close()
        await asyncio.sleep(0.2)
        slots = service.downloads.active
    finally:
        await server.close()
        await backend.close()
    status, hdrs, body = _body(data)
    assert status.startswith(b"HTTP/1.1 200")
    assert len(body) == size and hashlib.sha256(body).hexdigest() == blob_id, (
        f"{len(body)} of {size} bytes, then {err!r}")
    assert slots == 0
