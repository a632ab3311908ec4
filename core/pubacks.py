"""A minimal NATS connection for one job: publish, then await the reply (a JetStream PubAck).

Every signed request claims its nonce with one JetStream publish and waits for
the PubAck. Through nats-py that round trip cost membershipd about 80 µs of
CPU per request (a publish coroutine, the flusher task, the read loop's
``StreamReader``, the pure-Python parser, a per-subscription queue and task
before the reply reaches its future): a quarter of a signed request. This
module does the same round trip in an :class:`asyncio.Protocol`:

* ``HPUB`` commands are batched: while replies to the last write are
  awaited, new ones wait and then go out in one ``write`` (see
  :meth:`PubAckClient._maybe_flush`);
* the replies of all requests arrive on one wildcard subscription, and the
  reply subject's last token (a counter) finds the waiting future directly
  from ``data_received``;
* one timer per ``timeout / 4`` expires late replies instead of one timer per
  request.

It speaks only what this needs of the NATS client protocol
(https://docs.nats.io/reference/reference-protocols/nats-protocol): ``INFO``,
``CONNECT`` (nkey signature of the server nonce, or user/password or token
from the URL), TLS upgrade after ``INFO``, ``SUB``, ``HPUB``, ``MSG``/``HMSG``
(a ``503`` status header is "no responders"), ``PING``/``PONG``, ``+OK``,
``-ERR``. Everything else about the bus (JetStream management, watches,
membershipd's other traffic) stays on nats-py.

It fails closed and keeps nothing for later: while it is disconnected
:meth:`request` raises :class:`PubAckUnavailable` at once, every request in flight when the
connection drops gets the same error, and a request with no reply after
``timeout`` (to within a quarter of it) gets it too. It reconnects by itself
with a short backoff (50 ms doubling to 1 s), forever, until :meth:`close`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import secrets
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

from .aio import cancel_and_wait
from .settings import Secret

log = logging.getLogger("unibus.pubacks")

__all__ = ["PubAckClient", "PubAckUnavailable"]

_CRLF = b"\r\n"
#: A control line from the server longer than this without CRLF is a protocol error (its own lines are short).
_MAX_CONTROL_LINE = 64 * 1024
RECONNECT_INITIAL = 0.05
RECONNECT_MAX = 1.0


class PubAckUnavailable(Exception):
    """No reply can be had now: not connected, connection lost, or no reply in time."""


class PubAckClient:
    """One NATS connection that publishes with a reply subject and awaits the reply.

    ``url`` is ``nats://`` or ``tls://HOST:PORT``, optionally with
    ``user:password@`` or ``token@``; ``seed`` an nkey seed used when the server
    sends a nonce; ``tls`` the client TLS context (default: the system's
    trust store when the server or the URL requires TLS).
    """

    def __init__(self, url: str, *, seed: Secret | None = None, tls: ssl.SSLContext | None = None,
                 name: str = "membershipd-pubacks", timeout: float = 2.0, connect_timeout: float = 2.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ValueError("url must be nats://HOST:PORT or tls://HOST:PORT")
        self.host = parts.hostname
        self.port = parts.port or 4222
        self.tls_required = parts.scheme == "tls"
        self._user = unquote(parts.username) if parts.username is not None else None
        self._password = Secret(unquote(parts.password)) if parts.password is not None else None
        self._seed = seed
        self._tls = tls
        self.name = name
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.server_info: dict[str, Any] = {}
        self.requests = 0
        self.writes = 0  # socket writes of HPUB/PUB commands: requests / writes is the batching achieved
        self.reconnects = 0
        self._inbox_str = "_INBOX." + secrets.token_hex(11) + "."
        self._inbox = self._inbox_str.encode()
        self._counter = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[tuple[int, bytes]], float]] = {}
        self._proto: _Protocol | None = None
        self._outbox: list[tuple[int, bytes]] = []  # (request number, command) not written yet
        self._unreplied: set[int] = set()  # written, reply not in yet; always a subset of _waiting
        self._flush_handle: asyncio.Handle | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._proto is not None and self._proto.ready

    async def connect(self) -> None:
        """Connect once; raise :class:`PubAckUnavailable` saying why if that fails."""
        if self._closed:
            raise PubAckUnavailable("closed")
        await self._connect()

    async def close(self) -> None:
        """Stop reconnecting, fail what is in flight, close the connection."""
        if not self._closed:
            log.info("%s: %d requests in %d writes, %d reconnects", self.name, self.requests, self.writes,
                     self.reconnects)
        self._closed = True
        if self._reconnect_task is not None:
            await cancel_and_wait(self._reconnect_task)
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
        self._fail_all("closed")

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        proto = _Protocol(self)
        try:
            async with asyncio.timeout(self.connect_timeout):
                # A tls:// server is spoken to in TLS from the first byte (the embedded
                # listener has handshake_first: docs/operations.md, "Listeners and TLS"):
                # no plaintext INFO that a man in the middle could rewrite.
                tls_first = self._context() if self.tls_required else None
                transport, _ = await loop.create_connection(lambda: proto, self.host, self.port, ssl=tls_first,
                                                            server_hostname=self.host if tls_first else None)
                try:
                    await self._handshake(loop, proto, transport)
                except BaseException:
                    (proto.transport or transport).close()
                    raise
        except TimeoutError:
            raise PubAckUnavailable(f"NATS at {self.host}:{self.port} did not complete the handshake "
                                    f"in {self.connect_timeout:g} s") from None
        except OSError as e:
            raise PubAckUnavailable(f"cannot connect to NATS at {self.host}:{self.port}: {e.strerror or e}") from None
        self._proto = proto
        proto.ready = True

    def _context(self) -> ssl.SSLContext:
        return self._tls if self._tls is not None else ssl.create_default_context()

    async def _handshake(self, loop: asyncio.AbstractEventLoop, proto: _Protocol,
                         transport: asyncio.BaseTransport) -> None:
        info = await proto.info
        self.server_info = info
        if info.get("tls_required") and not self.tls_required:
            # A nats:// URL whose server demands TLS: the classic upgrade after INFO.
            tls_transport = await loop.start_tls(transport, proto, self._context(),  # type: ignore[arg-type]
                                                 server_hostname=self.host)
            if tls_transport is None:
                raise PubAckUnavailable("TLS upgrade failed")
            proto.transport = tls_transport
        options: dict[str, Any] = {"verbose": False, "pedantic": False, "lang": "python-unibus", "version": "1",
                                   "protocol": 1, "headers": True, "no_responders": True, "echo": False,
                                   "name": self.name}
        if info.get("nonce") and self._seed is not None:
            import nkeys

            kp = nkeys.from_seed(self._seed.reveal().encode())
            try:
                options["nkey"] = kp.public_key.decode()
                options["sig"] = base64.urlsafe_b64encode(kp.sign(info["nonce"].encode())).rstrip(b"=").decode()
            finally:
                kp.wipe()
        if self._user is not None:
            if self._password is None:
                options["auth_token"] = self._user
            else:
                options["user"], options["pass"] = self._user, self._password.reveal()
        # CONNECT, the reply subscription, then a PING: its PONG means both were accepted.
        proto.transport.write(b"CONNECT " + json.dumps(options).encode() + _CRLF  # type: ignore[union-attr]
                              + b"SUB " + self._inbox + b"* 1\r\nPING\r\n")
        await proto.pong

    def _connection_lost(self, proto: _Protocol, reason: str) -> None:
        if self._proto is not proto:
            return  # a handshake that failed: connect() reports it
        self._proto = None
        self._fail_all(f"connection to NATS lost ({reason})")
        if not self._closed:
            log.warning("nonce-claim connection to NATS at %s:%d lost (%s); reconnecting", self.host, self.port, reason)
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = RECONNECT_INITIAL
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except PubAckUnavailable as e:
                log.debug("reconnect failed: %s", e)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            self.reconnects += 1
            log.info("nonce-claim connection to NATS at %s:%d re-established", self.host, self.port)
            return

    # -- requests ----------------------------------------------------------------

    async def request(self, subject: str, headers: bytes, payload: bytes) -> tuple[int, bytes]:
        """Publish ``payload`` to ``subject`` and return the reply as ``(status, data)``.

        ``headers`` is a complete NATS header block (``b"NATS/1.0\\r\\n...\\r\\n\\r\\n"``)
        or ``b""``. ``status`` is 0 for an ordinary reply, else the reply's status
        code (503: no responders, e.g. a stream without a leader). Raises
        :class:`PubAckUnavailable` when there is no connection or no reply in time.
        """
        proto = self._proto
        if proto is None or not proto.ready:
            raise PubAckUnavailable("not connected to NATS")
        if not subject or " " in subject or not subject.isprintable():
            raise ValueError("subject must be printable and without spaces")
        loop = proto.loop
        n = next(self._counter)
        waiter: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._waiting[n] = (waiter, loop.time())
        if headers:
            hlen = len(headers)
            self._outbox.append((n, f"HPUB {subject} {self._inbox_str}{n} {hlen} {hlen + len(payload)}\r\n".encode()
                                 + headers + payload + _CRLF))
        else:
            self._outbox.append((n, f"PUB {subject} {self._inbox_str}{n} {len(payload)}\r\n".encode() + payload + _CRLF))
        self._maybe_flush()
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(self.timeout / 4, self._sweep)
        self.requests += 1
        try:
            return await waiter
        finally:
            if self._waiting.pop(n, None) is not None:  # cancelled: no longer counts as awaiting a reply
                self._unreplied.discard(n)
                self._maybe_flush()

    def _maybe_flush(self) -> None:
        """Write what is queued on the next tick, unless replies to the last write are outstanding.

        Like Nagle's algorithm: with nothing in flight a request goes out at
        once; while replies are awaited, requests gather and go out together
        as soon as the last of them is in (:meth:`_Protocol.data_received`) or
        has timed out. Under load that doubles the requests per write (about
        4 to 9 here) and cuts nats-server's CPU per request by a fifth,
        without delaying a request on an idle connection.
        """
        if self._outbox and self._flush_handle is None and not self._unreplied and self._proto is not None:
            self._flush_handle = self._proto.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        out, self._outbox = self._outbox, []
        proto = self._proto
        if proto is not None and proto.transport is not None and out:
            proto.transport.write(b"".join([c for _, c in out]))
            # Only requests still waiting: one cancelled meanwhile will never be discarded again.
            waiting = self._waiting
            self._unreplied.update([n for n, _ in out if n in waiting])
            self.writes += 1

    def _sweep(self) -> None:
        """Expire requests older than ``timeout``; re-arm while any are waiting."""
        self._sweep_handle = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.timeout
        expired = []
        for n, (_waiter, started) in self._waiting.items():  # insertion order = start order
            if started > cutoff:
                break
            expired.append(n)
        for n in expired:
            self._unreplied.discard(n)
            waiter, _ = self._waiting.pop(n)
            if not waiter.done():
                waiter.set_exception(PubAckUnavailable(f"no reply from NATS in {self.timeout:g} s"))
        self._maybe_flush()
        if self._waiting:
            self._sweep_handle = loop.call_later(self.timeout / 4, self._sweep)

    def _fail_all(self, reason: str) -> None:
        self._outbox.clear()
        self._unreplied.clear()
        waiting, self._waiting = self._waiting, {}
        for waiter, _ in waiting.values():
            if not waiter.done():
                waiter.set_exception(PubAckUnavailable(reason))

    def _reply(self, subject: bytes, status: int, data: bytes) -> None:
        if not subject.startswith(self._inbox):
            return
        try:
            n = int(subject[len(self._inbox):])
        except ValueError:
            return
        self._unreplied.discard(n)
        entry = self._waiting.pop(n, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((status, data))


class _Protocol(asyncio.Protocol):
    """Parses what the server sends; hands replies to the client."""

    def __init__(self, client: PubAckClient) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.ready = False
        self.info: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.pong: asyncio.Future[None] = self.loop.create_future()
        self._buf = b""
        self._error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._error or (f"{type(exc).__name__}: {exc}" if exc else "closed by the server")
        for fut in (self.info, self.pong):
            if not fut.done():
                fut.set_exception(PubAckUnavailable(f"NATS at {self.client.host}:{self.client.port}: {reason}"))
                fut.exception()  # retrieved: no "never retrieved" warning when nobody awaits it
        self.ready = False
        self.client._connection_lost(self, reason)

    def data_received(self, data: bytes) -> None:
        # The replies (MSG, HMSG) are parsed here, inline: this is the hot path of every
        # signed request (see the module's docstring); the rare other lines go to _control_line.
        buf = self._buf + data if self._buf else data
        pos = 0
        size = len(buf)
        client = self.client
        while pos < size:
            end = buf.find(_CRLF, pos)
            if end < 0:
                if size - pos > _MAX_CONTROL_LINE:
                    return self._protocol_error("control line too long")
                break
            op = buf[pos:pos + 4]
            if op == b"MSG ":
                # MSG <subject> <sid> [reply-to] <#bytes>
                args = buf[pos + 4:end].split()
                start = end + 2
                stop = start + int(args[-1])
                if stop + 2 > size:
                    break  # the payload is not all here yet
                client._reply(args[0], 0, buf[start:stop])
                pos = stop + 2
            elif op == b"HMSG":
                # HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
                args = buf[pos + 5:end].split()
                start = end + 2
                hlen, total = int(args[-2]), int(args[-1])
                stop = start + total
                if stop + 2 > size:
                    break
                client._reply(args[0], _status(buf[start:start + hlen]), buf[start + hlen:stop])
                pos = stop + 2
            else:
                error = self._control_line(op, buf, pos, end)
                if error is not None:
                    return self._protocol_error(error)
                pos = end + 2
        self._buf = buf[pos:] if pos < size else b""
        client._maybe_flush()

    def _control_line(self, op: bytes, buf: bytes, pos: int, end: int) -> str | None:
        """A line other than a reply (``buf[pos:end]``, ``op`` its first 4 bytes); a protocol error's text."""
        if op == b"PING":
            if self.transport is not None:
                self.transport.write(b"PONG\r\n")
        elif op == b"PONG":
            if not self.pong.done():
                self.pong.set_result(None)
        elif op == b"INFO":
            try:
                info = json.loads(buf[pos + 5:end])
            except ValueError:
                return "INFO is not JSON"
            if not self.info.done():
                self.info.set_result(info)
            else:
                self.client.server_info.update(info)  # e.g. lame duck mode, new cluster URLs
        elif op == b"-ERR":
            message = buf[pos + 5:end].decode(errors="replace").strip().strip("'")
            log.warning("NATS server error on the nonce-claim connection: %s", message)
            self._error = message
            if not self.pong.done():
                self.pong.set_exception(PubAckUnavailable(f"NATS refused the connection: {message}"))
        elif not op.startswith(b"+OK"):
            return f"unexpected {bytes(op)!r}"
        return None

    def _protocol_error(self, what: str) -> None:
        self._error = f"protocol error: {what}"
        self._buf = b""
        if self.transport is not None:
            self.transport.close()


def _status(header_block: bytes) -> int:
    """The status code of a NATS header block (``NATS/1.0 503\\r\\n...``), 0 when none."""
    first = header_block.split(_CRLF, 1)[0]
    parts = first.split(b" ", 2)
    if len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return 0
