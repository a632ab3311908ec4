"""Bounds on the connections of membershipd's HTTP listeners: the control plane and the
metrics endpoint (docs/http-api.md, "Slow and large bodies"; docs/operations.md,
"Listeners and TLS").

A red-team finding: any client could take the control plane down without sending a
request. aiohttp keeps an idle connection for 3630 s by default, nothing bounded the
number of connections but the process's descriptor limit (RLIMIT_NOFILE), and once that
was reached Python 3.11's accept loop logged a traceback for every failed ``accept()``
(505 MB of log in 110 s). Now:

* **Idle and head deadline** (:data:`DEFAULT_IDLE_TIMEOUT`, ``UNIBUS_HTTP_IDLE_TIMEOUT``):
  aiohttp's ``keepalive_timeout``. aiohttp 3.14 arms that timer when a connection is made
  and again when a response is done, and does not re-arm it for bytes that arrive, so it
  closes a connection whose request head is not complete in time (nothing sent, or a head
  trickled a byte at a time) as well as one idle between two requests. It never cuts a
  request being served: a body has the body deadline, a blob transfer its pacing.
* **TLS handshake deadline**: the same time (asyncio's default is 60 s).
* **Connections per listener** (:func:`max_connections`, from RLIMIT_NOFILE as it is at each
  new connection; the metrics listener: :data:`METRICS_MAX_CONNECTIONS`). At the limit
  a new connection pushes out the oldest one that is not serving a member's signed
  request (on the metrics listener with a client CA: that has not shown a certificate):
  idle (waiting for a request head, in its TLS handshake, or closing), which the
  idle deadline would have closed later anyway, or busy with requests nobody signed (red
  team: anonymous clients pipelining requests and reading their answers just fast enough
  to pass the stall rule held every connection for good). Only when every connection
  serves a member's request is the new one closed at once. So HTTP connections alone
  never use up the descriptors, and clients that have signed nothing cannot keep members
  out. The oldest goes first, so a newcomer has a while (the limit over the rate of new
  connections) to get its first request signed; a flood faster than that, a client
  pipelining signed requests (between two of them), and the last answer of a connection
  whose request has left the member's count are not covered (docs/http-api.md).
* **accept() out of descriptors** (:class:`AcceptErrorLog`): one WARNING per
  :data:`ACCEPT_ERROR_LOG_INTERVAL`, no traceback; every failure is counted.
* **A member's share** (:class:`MemberRequests`): a connection serving a request is
  never pushed out, so one member's signed requests in progress (slow bodies within
  their deadline) could fill the listener for everyone. A member may have at most an
  eighth of the limit of them at once (at least :data:`MIN_MEMBER_REQUESTS`), each until
  its response is handed to the kernel; beyond, 429 ``too-many-requests``, answered
  before the body is read.
* **Sending** (:func:`send_within`): aiohttp writes a response after the middlewares,
  with no deadline, so a client that reads none of its answers (a large one, or many
  small ones to pipelined requests) kept a connection busy for good. Every response goes
  out in a middleware instead; one that cannot be handed over at once must be taken
  within the body deadline plus a second per :data:`SEND_MIN_RATE` bytes, or the
  connection is dropped. Over TLS "taken" counts what waits in the socket's transport
  under the TLS layer too (:meth:`_Gate.unsent`): a large answer goes there in one piece.
* **Stalls** (:meth:`_Gate.pause_writing`): a connection whose writes are paused and whose
  client takes nothing of them for a whole body deadline is dropped, whatever wrote them.
* **TLS shutdown**: a closing TLS connection waits at most :data:`TLS_SHUTDOWN_TIMEOUT`
  for its client's close_notify (asyncio's default is 30 s, during which its unsent
  answers stay in memory).

The listener is :class:`LimitedSite` (aiohttp's ``TCPSite``, plus :class:`_Gate`, the
protocol of each accepted socket, which admits it and, for HTTPS, does the handshake with
``loop.start_tls`` so that a socket is counted from ``accept()`` to its close, handshake
included), and every request is still served by aiohttp's ``RequestHandler``: the subclass
:class:`unibus.httperrors.ProblemRequestHandler`, whose own error answers are problem documents.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from .auth import _number_from_env, body_unread
from .httperrors import for_server

log = logging.getLogger("unibus.http")

#: Seconds an HTTP connection may wait for its next request head: after it is accepted (after
#: its TLS handshake, which has as long), and after each response. aiohttp's own default is
#: 3630 s. 30 s: the default body deadline (UNIBUS_BODY_TIMEOUT), so that a client has as long
#: for a request's head as for its body; twice the 15 s for which aiohttp's client (the
#: unibus client's) keeps an idle connection, so that such a client closes an idle connection
#: before the server does and never sends a request on one the server is closing; and short
#: enough that a connection left idle (at most :func:`max_connections` of them, and those are
#: pushed out first at the limit) holds its descriptor briefly.
DEFAULT_IDLE_TIMEOUT = 30.0
IDLE_TIMEOUT_ENV = "UNIBUS_HTTP_IDLE_TIMEOUT"
IDLE_TIMEOUT_RANGE = (0.1, 3600.0)

#: Descriptors kept for everything but the control plane's connections: membershipd's NATS
#: connections, the store, the log, nats-server's pipes, the metrics listener
#: (:data:`METRICS_MAX_CONNECTIONS`), and the sockets accepted in one go (up to the listen
#: backlog, 128) before those over the limit are closed.
FD_RESERVE = 256
#: Descriptors one connection may hold: its socket, and a blob's file while it uploads or downloads.
FDS_PER_CONNECTION = 2
#: The control plane's connection limit is never below this (a very low RLIMIT_NOFILE) nor above
#: :data:`MOST_CONNECTIONS` (an unlimited one).
FEWEST_CONNECTIONS = 16
MOST_CONNECTIONS = 65536
#: The metrics listener's limit: a scraper or two, and an operator's curl.
METRICS_MAX_CONNECTIONS = 16
#: The listen backlog (aiohttp's TCPSite default).
BACKLOG = 128

#: The message of asyncio's exception-handler call when ``accept()`` fails for lack of a
#: descriptor or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM); it stops accepting on that
#: listener for a second, then tries again.
ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"
#: At most one log line per this many seconds about failed accepts.
ACCEPT_ERROR_LOG_INTERVAL = 10.0
#: At most one log line per this many seconds about a listener at its connection limit.
LIMIT_LOG_INTERVAL = 10.0


def idle_timeout_from_env(env: Mapping[str, str]) -> float:
    """``UNIBUS_HTTP_IDLE_TIMEOUT`` (seconds), or the default; ConfigError (exit 2) naming it otherwise."""
    return _number_from_env(env, IDLE_TIMEOUT_ENV, DEFAULT_IDLE_TIMEOUT, IDLE_TIMEOUT_RANGE, float,
                            "a number of seconds from {lo:g} to {hi:g}")


def descriptor_limit() -> int | None:
    """This process's soft RLIMIT_NOFILE; None when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def max_connections(nofile: int | None) -> int:
    """The control plane's connection limit for a descriptor limit of ``nofile`` (None: unlimited):
    what is left after :data:`FD_RESERVE`, :data:`FDS_PER_CONNECTION` per connection, within
    :data:`FEWEST_CONNECTIONS` and :data:`MOST_CONNECTIONS`. 384 for the usual 1024."""
    if nofile is None:
        return MOST_CONNECTIONS
    return max(FEWEST_CONNECTIONS, min(MOST_CONNECTIONS, (nofile - FD_RESERVE) // FDS_PER_CONNECTION))


def nofile_limit() -> int:
    """:func:`max_connections` of the descriptor limit as it is now: a limit changed while
    membershipd runs (``prlimit --pid``) moves the control plane's connection limit with it."""
    return max_connections(descriptor_limit())


class _Every:
    """Log lines about one kind of event, at most one per ``interval`` seconds: the first event
    is reported at once, the next ones are added up and reported when the interval is over
    (``report(since)``: what happened in the ``since`` seconds before; None for the first)."""

    def __init__(self, interval: float, report: Callable[[float | None], None]) -> None:
        self.interval = interval
        self._report = report
        self._at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def hit(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        if self._at is None or now - self._at >= self.interval:
            self.cancel()  # a timer the loop has not run yet would report nothing new
            self._fire(now)
        elif self._timer is None:
            self._timer = loop.call_at(self._at + self.interval, lambda: self._fire(loop.time()))

    def _fire(self, now: float) -> None:
        self._timer = None
        since = None if self._at is None else now - self._at
        self._at = now
        self._report(since)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ConnectionLimiter:
    """The open connections of one listener, at most ``limit`` of them (see the module docstring):
    a number, or a function asked at each new connection (:func:`nofile_limit`).

    ``evicted`` counts the idle connections closed to make room, ``refused`` the new ones
    closed at once because none was idle; both are exported as metrics
    (``unibus_http_connections_evicted_total``, ``unibus_http_connections_refused_total``).
    """

    def __init__(self, name: str, limit: int | Callable[[], int], *, where: str = "") -> None:
        self.name = name
        self._limit = limit
        self.where = where or name
        self.evicted = 0
        self.refused = 0
        #: connections dropped for taking nothing of what waited to be sent for a whole stall timeout
        self.stalled = 0
        #: ``serving(transport)``: True while the connection of that (aiohttp) transport serves a
        #: member's signed request (:meth:`MemberRequests.serving`); such a connection is never
        #: pushed out. None: no connection is protected so (the metrics listener).
        self.serving: Callable[[Any], bool] | None = None
        #: True when the listener's TLS requires a client certificate (the metrics listener with
        #: ``--metrics-tls-ca``): a connection past its handshake proved who it is, and is pushed
        #: out only when every connection did, then the oldest idle one. A red team's flood of bare
        #: TCP connects, with no certificate, pushed out a scraper's scrapes, mid-request or between
        #: two on a kept connection (32% of them in its run, 14% in a rerun).
        self.verified = False
        # insertion-ordered: the oldest connection first, and pushed out first
        self._open: dict[_Gate, None] = {}
        self._reported = (0, 0)
        self._log = _Every(LIMIT_LOG_INTERVAL, self._log_limit)

    def __len__(self) -> int:
        return len(self._open)

    @property
    def limit(self) -> int:
        return self._limit() if callable(self._limit) else self._limit

    def _protected(self, conn: _Gate) -> bool:
        if self.verified:  # a connection that showed a certificate, and is not closing
            return conn.tls and not conn.app_transport.is_closing()
        serving = self.serving
        return serving is not None and not conn.idle() and serving(conn.app_transport)

    def admit(self, conn: _Gate) -> bool:
        """Count ``conn`` in; at the limit, push out the oldest connection that does not serve a
        member's signed request first. False (and counted) when every connection does: the
        caller closes ``conn``."""
        if len(self._open) >= self.limit:
            victim = next((c for c in self._open if not self._protected(c)), None)
            if victim is None and self.verified:
                # Every connection showed a certificate: an idle one makes room, as before (a
                # review: 16 kept connections of one holder of a certificate locked out the rest).
                victim = next((c for c in self._open if c.idle()), None)
            if victim is None:
                self.refused += 1
                self._log.hit(asyncio.get_running_loop())
                return False
            del self._open[victim]
            self.evicted += 1
            victim.evict()
            self._log.hit(asyncio.get_running_loop())
        self._open[conn] = None
        return True

    def release(self, conn: _Gate) -> None:
        """``conn`` is closed (or closing, its socket released): it no longer counts. Idempotent."""
        self._open.pop(conn, None)

    def abort_handshakes(self) -> None:
        """Close the connections aiohttp does not know of yet: those in their TLS handshake."""
        for conn in [c for c in self._open if c.handshaking]:
            self.release(conn)
            conn.evict()

    def _log_limit(self, since: float | None) -> None:
        """The WARNING of a listener at its limit: at most one per LIMIT_LOG_INTERVAL (:class:`_Every`)."""
        evicted, refused = self.evicted - self._reported[0], self.refused - self._reported[1]
        self._reported = (self.evicted, self.refused)
        if self.serving is not None:
            pushed, busy = "idle or serving no member's request", "served a member"
        elif self.verified:
            pushed, busy = "without a client certificate, or idle,", "with a certificate was busy"
        else:
            pushed, busy = "the oldest first,", "was busy"
        log.warning("%s: at its limit of %d open connections: %d connection(s) %s closed early to make room, %d new "
                    "one(s) closed at once as every connection %s%s", self.where, self.limit, evicted, pushed, refused,
                    busy, "" if since is None else f" (in the last {since:.0f} s)")


class _Gate(asyncio.Protocol):
    """The protocol of one accepted socket: counted by the listener's :class:`ConnectionLimiter`
    from ``accept()`` to its close, TLS handshake (``loop.start_tls``, within the site's
    handshake deadline) included; every event is handed to aiohttp's ``RequestHandler``."""

    __slots__ = ("_site", "_raw", "_app", "_handler", "_early", "_handshake", "_fresh", "_stall", "_unsent")

    def __init__(self, site: LimitedSite) -> None:
        self._site = site
        self._raw: Any = None  # the socket's transport
        self._app: Any = None  # what aiohttp reads and writes: the same, or the TLS transport over it
        self._handler: Any = None  # aiohttp's RequestHandler, once the connection is served
        self._early: list[bytes] = []  # decrypted bytes that came with the end of the handshake
        self._handshake: asyncio.Task[None] | None = None
        self._fresh = True  # no byte of a request yet
        self._stall: asyncio.TimerHandle | None = None  # armed while writing is paused (see pause_writing)
        self._unsent = 0  # what the transport held to send when the stall timer was last armed

    @property
    def handshaking(self) -> bool:
        return self._handler is None

    @property
    def tls(self) -> bool:
        return self._app is not None and self._app is not self._raw

    @property
    def app_transport(self) -> Any:
        """The transport aiohttp reads and writes (``request.transport``): the socket's, or TLS over it."""
        return self._app

    def unsent(self) -> int:
        """Bytes written to this connection that the kernel has not taken yet: the TLS transport's
        and, under it, the socket transport's. asyncio's TLS layer hands the socket's transport
        all it has encrypted whenever that one is not paused, so a large answer written in one
        piece waits there, with the TLS transport empty and never paused (red team)."""
        app, raw = self._app, self._raw
        try:
            n = app.get_write_buffer_size() if app is not None else 0
        except AttributeError:  # asyncio's TLS transport, closed twice, has let go of its protocol
            n = 0
        if raw is not None and raw is not app:
            n += raw.get_write_buffer_size()
        return n

    async def drained(self, most: int) -> None:
        """Return once at most ``most`` bytes are unsent, or the connection is closing. Polled
        every :data:`DRAIN_POLL` s: the socket's transport under TLS reports its flow control
        to asyncio's TLS layer, not to us. For the caller's deadline to bound."""
        while self.unsent() > most and self._raw is not None and not self._raw.is_closing():
            await asyncio.sleep(DRAIN_POLL)

    def idle(self) -> bool:
        """True when closing this connection loses no request: in its TLS handshake, closing,
        not a byte of a request received yet (accepted in the same burst: aiohttp's handler
        has not started), or waiting for a request head. The last is the test aiohttp's own
        keep-alive timer makes before it closes a connection (its ``_waiter``, the future its
        loop awaits for the next request, is pending); anything else is busy."""
        handler = self._handler
        if handler is None or self._fresh or self._app.is_closing():
            return True
        waiter = getattr(handler, "_waiter", None)
        return waiter is not None and not waiter.done()

    def evict(self) -> None:
        """Close the socket now, nothing flushed (no TLS close_notify to wait for)."""
        if self._handshake is not None:
            self._handshake.cancel()
        if self._raw is not None:
            self._raw.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport
        site = self._site
        if not site.limiter.admit(self):
            transport.abort()
            return
        if site.ssl_context is None:
            self._serve(transport)
            return
        transport.pause_reading()  # the handshake's bytes are SSLProtocol's, not ours: start_tls resumes
        self._handshake = asyncio.get_running_loop().create_task(self._tls(transport))

    async def _tls(self, raw: Any) -> None:
        site = self._site
        try:
            app = None
            if not raw.is_closing():  # evicted, or the client left, before the handshake began
                app = await asyncio.get_running_loop().start_tls(
                    raw, self, site.ssl_context, server_side=True, ssl_handshake_timeout=site.handshake_timeout,
                    ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        except asyncio.CancelledError:  # evicted, or the listener stops
            self._drop()
            raise
        except Exception:  # noqa: BLE001 - a failed or timed-out handshake, a client gone: asyncio closed it
            app = None
        finally:
            self._handshake = None
        if app is None or app.is_closing():
            self._drop()
            return
        self._serve(app)

    def _drop(self) -> None:
        self._site.limiter.release(self)
        _GATES.pop(self._app, None)
        self._early = []
        if self._raw is not None:
            self._raw.abort()

    def _serve(self, transport: Any) -> None:
        """Hand the connection to a new aiohttp RequestHandler (with the bytes that came before it)."""
        assert self._site.runner.server is not None
        self._app = transport
        if transport is not self._raw:
            # asyncio's TLS transport takes 512 KiB before it pauses its writer, a plain one 64 KiB:
            # the same for both, so that a client that does not read holds no more of membershipd's
            # memory over TLS, and is paused (and judged by the stall rule) as soon
            transport.set_write_buffer_limits(high=TLS_WRITE_HIGH_WATER)
        handler = for_server(self._site.runner.server)  # aiohttp's, with its own errors as problems
        self._handler = handler
        _GATES[transport] = self
        handler.connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._fresh = False
            self._handler.data_received(data)
        else:  # TLS: after the handshake, before start_tls returned
            self._early.append(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        """The client does not take what is written to it fast enough. Whatever wrote it (a
        response of a middleware, or one aiohttp writes itself: a 417, a 400 of its parser,
        a ``100 Continue``), the connection is then busy and never pushed out, so it must
        make progress: a whole ``stall_timeout`` in which not a byte of what waits to be sent
        was taken drops it (red team: pipelined requests whose answers were never read)."""
        if self._handler is not None:
            self._handler.pause_writing()
        self._arm_stall()

    def resume_writing(self) -> None:
        self._disarm_stall()
        if self._handler is not None:
            self._handler.resume_writing()

    def _arm_stall(self) -> None:
        timeout = self._site.stall_timeout
        if timeout is None or self._app is None:
            return
        self._disarm_stall()
        self._unsent = self.unsent()
        self._stall = asyncio.get_running_loop().call_later(timeout, self._stalled)

    def _disarm_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if self._app is None or self._app.is_closing():
            return
        if self.unsent() < self._unsent:  # the client took some: slow, not stalled
            self._arm_stall()
            return
        self._site.limiter.stalled += 1
        if self._raw is not None:
            self._raw.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_stall()
        self._site.limiter.release(self)
        _GATES.pop(self._app, None)
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.connection_lost(exc)


class LimitedSite(web.BaseSite):
    """aiohttp's ``TCPSite`` with the bounds of this module: at most ``limiter.limit``
    connections, and a TLS handshake (when ``ssl_context`` is given) within ``handshake_timeout``."""

    __slots__ = ("_host", "_port", "_reuse_address", "limiter", "handshake_timeout", "stall_timeout")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limiter: ConnectionLimiter,
                 handshake_timeout: float, ssl_context: ssl.SSLContext | None = None,
                 reuse_address: bool = True, stall_timeout: float | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=BACKLOG)
        self._host, self._port = host, port
        self._reuse_address = reuse_address
        self.limiter = limiter
        self.handshake_timeout = handshake_timeout
        #: seconds a connection whose writes are paused may go without its client taking a byte
        self.stall_timeout = stall_timeout

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    @property
    def runner(self) -> web.BaseRunner:
        return self._runner

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Gate(self), self._host, self._port, backlog=self._backlog,
                                                reuse_address=self._reuse_address)

    async def stop(self) -> None:
        await super().stop()
        self.limiter.abort_handshakes()


class AcceptErrorLog:
    """The event loop's exception handler while membershipd listens: asyncio's
    "socket.accept() out of system resource" (EMFILE: out of descriptors; ENFILE, ENOBUFS,
    ENOMEM), which Python 3.11 reports with a traceback for every failed ``accept()``, many
    times a second, becomes one WARNING per :data:`ACCEPT_ERROR_LOG_INTERVAL` without a
    traceback, saying how many failed since the last; ``count`` has them all
    (``unibus_accept_errors_total``). Any other report goes to the handler installed before
    (asyncio's default when none)."""

    def __init__(self, interval: float = ACCEPT_ERROR_LOG_INTERVAL) -> None:
        self.count = 0
        self._reported = 0
        self._last: tuple[str, OSError] | None = None
        self._log = _Every(interval, self._log_failures)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    def install(self, loop: asyncio.AbstractEventLoop) -> AcceptErrorLog:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)
        return self

    def uninstall(self) -> None:
        """Put back the handler found at :meth:`install` (unless another replaced this one since)."""
        loop, self._loop = self._loop, None
        self._log.cancel()
        if loop is not None and loop.get_exception_handler() is self:
            loop.set_exception_handler(self._previous)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ValueError) and _is_accept_retry(context.get("handle")):
            # After a failed accept(), asyncio tries again a second later with a timer that closing
            # the listener does not cancel: a stop in that second made it log a traceback about the
            # closed socket (fd -1; one CI failure). Nothing is wrong: the listener is gone.
            log.debug("an accept() retry came after its listener closed: %s", exc)
            return
        if context.get("message") != ACCEPT_ERROR_MESSAGE or not isinstance(exc, OSError):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.count += 1
        where = "a listener"
        sock = context.get("socket")
        if sock is not None:
            try:
                host, port = sock.getsockname()[:2]
                where = f"the listener on {host}:{port}"
            except (OSError, ValueError, TypeError):
                pass
        self._last = (where, exc)
        self._log.hit(loop)

    def _log_failures(self, since: float | None) -> None:
        assert self._last is not None
        where, exc = self._last
        failed, self._reported = self.count - self._reported, self.count
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        how_many = "" if since is None else f": {failed} failed accept()s in the last {since:.0f} s"
        log.warning("%s cannot accept connections: %s (%s)%s; new connections wait, asyncio tries again every "
                    "second. Raise the descriptor limit (LimitNOFILE) or find what holds descriptors",
                    where, exc.strerror or exc, code, how_many)


def _is_accept_retry(handle: Any) -> bool:
    """``handle`` is asyncio's timer that starts accepting again after a failed ``accept()``."""
    return getattr(getattr(handle, "_callback", None), "__name__", None) == "_start_serving"


#: The write buffer of a TLS connection's transport pauses its writer past this, as a plain one does.
TLS_WRITE_HIGH_WATER = 64 * 1024
#: Seconds a closing TLS connection waits for its client's close_notify (and for what it had
#: left to send) before it is aborted, at most: asyncio's default is 30 s whatever the idle
#: deadline, during which the connection and its unsent answers stay (red team). Answers of
#: more than :data:`SEND_AT_ONCE` were taken before their response was done (send_within), so
#: what is left takes a client of 10 KB/s 5 s. Not tied to the idle deadline, which may be 0.1 s
#: (a red team: at 0.5 s, answers to a 16 KB/s reader were cut).
TLS_SHUTDOWN_TIMEOUT = 5.0
#: Seconds between two looks at what a TLS connection has left to send (:meth:`_Gate.drained`).
DRAIN_POLL = 0.05
#: The gate of each connection aiohttp serves, by its transport (``request.transport``), from
#: :meth:`_Gate._serve` to its close. A plain dict, emptied by the gate itself: a weak one never
#: let go (the gate, its value, holds the transport, its key; red team: 1.4 KB per connection
#: ever accepted).
_GATES: dict[Any, _Gate] = {}
#: The part of the control plane's connection limit one member's signed requests in progress may
#: hold at once (an eighth: eight members acting together fill it, one cannot), and the least:
#: at the smallest limit (16) one member holds a quarter.
MEMBER_SHARE = 8
MIN_MEMBER_REQUESTS = 4
#: A response that, with what the connection has not sent yet, fits in this is handed to the
#: transport at once (asyncio's transport takes 64 KiB before ``drain()`` waits); a larger one
#: may have to wait for its client to read, and gets a deadline.
SEND_AT_ONCE = 48 * 1024
#: Bytes per second a client must take of a large response past the body deadline (as an upload).
SEND_MIN_RATE = 32 * 1024


async def send_within(request: web.Request, response: web.StreamResponse, deadline: float) -> bool:
    """Send ``response`` now; True if its client took too little of it in time and the
    connection was dropped.

    aiohttp writes a response after the middlewares return, with no deadline: a client
    that does not read (a large response, or many small ones pipelined on one connection)
    kept that write, and so the connection, busy for good, never idle and never pushed
    out (red team: anonymous pipelined 404s held every connection). So every response goes
    out here: one that fits, with what the connection has not sent yet, in
    :data:`SEND_AT_ONCE` is handed to the transport as aiohttp would (no timer); any other
    must be taken within ``deadline`` plus a second per :data:`SEND_MIN_RATE` bytes, or the
    connection is dropped. Over TLS, "taken" means until at most :data:`SEND_AT_ONCE` is
    left under the TLS layer too (:meth:`_Gate.unsent`): aiohttp's drain looks at the TLS
    transport only, which had handed a whole large answer to the socket's transport and
    was empty (red team: one member's unread answers were neither counted nor bounded).
    aiohttp's own calls are then no-ops. A response its handler prepared already (a
    streamed blob download, with its own pacing) is left alone.
    """
    if response.prepared:
        return False
    if body_unread(request):
        response.force_close()  # the rest of the body is never read: no next request on this connection
    transport = request.transport
    gate = _GATES.get(transport) if transport is not None else None
    body = getattr(response, "body", None)
    size = len(body) if isinstance(body, (bytes, bytearray)) else None
    try:
        unsent = gate.unsent() if gate is not None else (transport.get_write_buffer_size() if transport else 0)
        if size is not None and transport is not None and size + unsent <= SEND_AT_ONCE:
            await response.prepare(request)
            await response.write_eof()
            return False
        async with asyncio.timeout(deadline + (size or 0) / SEND_MIN_RATE):
            await response.prepare(request)
            await response.write_eof()
            if gate is not None and gate.tls:  # out of the socket's transport under the TLS layer too
                await gate.drained(SEND_AT_ONCE)
    except TimeoutError:
        if transport is not None:
            transport.abort()  # aiohttp then finds the client gone, as for any disconnect
        return True
    except ConnectionError:
        pass  # the client left: aiohttp finds it gone too
    return False


class MemberRequests:
    """Signed requests in progress on the control plane, by member (see the module docstring).

    The auth middleware calls :meth:`enter` once a request is authenticated, before its body
    is read, and :meth:`leave` once its response was sent (:meth:`send`; a response its
    handler streamed: when the handler returns, the stream being sent by then). ``limit``
    is the listener's connection limit, asked only when a member is past
    :data:`MIN_MEMBER_REQUESTS` (it follows RLIMIT_NOFILE); ``refused`` counts the 429s
    (``unibus_http_member_requests_refused_total``).
    """

    def __init__(self, limit: Callable[[], int] | None = None) -> None:
        self.limit = limit
        self.by_member: dict[str, int] = {}
        #: requests in progress by connection (its aiohttp transport): :meth:`serving`
        self.by_connection: dict[Any, int] = {}
        self.refused = 0
        #: responses whose client took too little of them in time: the connection was dropped
        self.stalled = 0

    def per_member(self) -> int:
        limit = self.limit() if self.limit is not None else 0
        return max(MIN_MEMBER_REQUESTS, limit // MEMBER_SHARE)

    def serving(self, transport: Any) -> bool:
        """True while the connection of ``transport`` serves a signed request: the listener never
        pushes such a connection out to make room (:class:`ConnectionLimiter`)."""
        return transport in self.by_connection

    def enter(self, handle: str, transport: Any = None) -> None:
        """Count one request of ``handle`` (on the connection of ``transport``) in, or raise a 429
        problem when it holds its share."""
        held = self.by_member.get(handle, 0)
        if held >= MIN_MEMBER_REQUESTS and held >= (most := self.per_member()):
            from .problems import Problem

            self.refused += 1
            raise Problem(429, f"{handle} has {held} requests in progress on this node, the most one member may "
                               f"have at once (an eighth of its connection limit, at least {MIN_MEMBER_REQUESTS}); "
                               "let one finish first", kind="too-many-requests", max_requests=most,
                          headers={"Retry-After": "1"})
        self.by_member[handle] = held + 1
        if transport is not None:
            self.by_connection[transport] = self.by_connection.get(transport, 0) + 1

    async def send(self, request: web.Request, response: web.StreamResponse, deadline: float) -> None:
        """:func:`send_within`, while the request still counts for its member: aiohttp writes a
        handler's response after the middlewares return, and a response its client did not read
        was then neither counted nor idle (red team: one member held every connection so)."""
        if await send_within(request, response, deadline):
            self.stalled += 1

    def leave(self, handle: str, transport: Any = None) -> None:
        held = self.by_member.get(handle, 0) - 1
        if held > 0:
            self.by_member[handle] = held
        else:
            self.by_member.pop(handle, None)
        if transport is not None:
            n = self.by_connection.get(transport, 0) - 1
            if n > 0:
                self.by_connection[transport] = n
            else:
                self.by_connection.pop(transport, None)


__all__ = ["ACCEPT_ERROR_LOG_INTERVAL", "DEFAULT_IDLE_TIMEOUT", "FD_RESERVE", "IDLE_TIMEOUT_ENV",
           "MEMBER_SHARE", "METRICS_MAX_CONNECTIONS", "MIN_MEMBER_REQUESTS", "AcceptErrorLog", "ConnectionLimiter",
           "LimitedSite", "MemberRequests", "descriptor_limit", "send_within",
           "idle_timeout_from_env", "max_connections", "nofile_limit"]
