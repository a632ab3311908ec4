"""membershipd's own connection to NATS (embedded or external)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from .aio import close_nats, within
from .errors import RuntimeFailure
from .pubacks import PubAckClient
from .settings import Secret, redact_url
from .tls import TLSFileError, check_pair, connect_bounded, load_certificates, permanent_tls_error

log = logging.getLogger("unibus.bus")

#: How long a clustered node waits for JetStream (a quorum of its peers) at start.
CLUSTER_FORM_TIMEOUT = 120.0


async def retry_until(fn: Callable[[], Awaitable[object]], timeout: float, what: str) -> None:
    """Call ``await fn()`` until it succeeds; RuntimeFailure naming ``what`` after ``timeout``.

    JetStream answers "insufficient resources" or "no suitable peers" while a
    cluster is still forming; those clear up as the other nodes join.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await fn()
            return
        except Exception as e:
            if loop.time() > deadline:
                raise RuntimeFailure(f"{what}: {type(e).__name__}: {e}") from None
            log.info("%s (retrying): %s", what, e)
            await asyncio.sleep(0.5)


def embedded_tls_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """TLS for membershipd's own connection to its embedded server (``--tls-cert``).

    The server's certificate is pinned (it is the one trust anchor, accepted
    as a partial chain), so nothing else is trusted and the loopback dial
    needs no host name in the certificate. With ``--tls-ca`` the server asks
    every client for a certificate: membershipd presents the same one, which
    then needs the clientAuth usage too.
    """
    return EmbeddedTLS(cert, key, client_ca).context


class EmbeddedTLS:
    """:func:`embedded_tls_context`, kept up to date with what a restarted nats-server presents.

    The pin is the certificate itself: the first of the ``--tls-cert`` file, the one
    whose key is ``--tls-key``, and nothing else of the file. A chain in that file
    (a public CA's fullchain.pem) is not trusted, or any certificate its CA issued to
    anyone would be (red team).

    nats-server reads ``--tls-cert`` and ``--tls-key`` each time it starts. A
    certificate renewed on disk while it runs is therefore what it presents after
    the supervisor restarts it (a crash, a kill), and a context that pinned only the
    first would lock membershipd out of its own bus until membershipd itself
    restarted. :meth:`before_restart` checks the files and adds the renewed
    certificate, read once, to the pins of the same context, which every connection
    of membershipd to its nats-server shares. The earlier pins stay until
    membershipd restarts (docs/operations.md, "Certificates": restart it after a
    key compromise).
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.pinned = _der(load_certificates(cert)[0])  # the start-up checks (check_pair) ran already
        self.context = ssl.create_default_context(cadata=self.pinned)
        self.context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        self.context.check_hostname = False
        if client_ca is not None:
            self.context.load_cert_chain(str(cert), str(key))

    def before_restart(self) -> bool:
        """Check the files nats-server is about to read; pin its certificate if it is a new one.

        Returns whether it was. Raises :class:`unibus.tls.TLSFileError` naming the
        flag (expired, not valid yet, a key that is not the certificate's, a key
        others may read, a CA file without a certificate, not a regular file): the
        supervisor then leaves nats-server down and tries again, rather than serve
        what membershipd, or its members, would refuse.
        """
        leaf = _der(check_pair("--tls-cert", self.cert, "--tls-key", self.key))
        if self.client_ca is not None:
            try:
                load_certificates(self.client_ca)
            except TLSFileError as e:
                raise TLSFileError(f"--tls-ca: {e}") from None
        if leaf == self.pinned:
            return False
        self.context.load_verify_locations(cadata=leaf)  # the certificate checked, and only it
        if self.client_ca is not None:
            self.context.load_cert_chain(str(self.cert), str(self.key))  # present the renewed one
        self.pinned = leaf
        return True


def _der(cert: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def tls_first(url: str) -> bool:
    """Whether to start a connection to ``url`` with the TLS handshake (``tls://`` URLs).

    nats-py otherwise reads the server's INFO in clear and upgrades only if
    that INFO says ``tls_required``: a man in the middle who strips the flag
    would get the nkey's answer to the nonce in clear, and could relay it to
    log in as us. Starting with the handshake leaves nothing to strip. The
    embedded server requires it (``handshake_first: true``); an external
    NATS reached over ``tls://`` must enable ``handshake_first`` too
    (docs/operations.md, "Listeners and TLS").
    """
    return url.strip().lower().startswith("tls://")


def server_id_of(nc: Client | None) -> str | None:
    """The id of the nats-server a nats-py connection is on, from the INFO it sent (None before any)."""
    return (getattr(nc, "_server_info", None) or {}).get("server_id") or None


async def routes_of_server(nc: Client, server_id: str, timeout: float = 1.0) -> frozenset[str] | None:
    """The ids of the servers that server ``server_id`` has routes to, from its ROUTEZ
    (``$SYS.REQ.SERVER.<id>.ROUTEZ``, over a system-account connection ``nc``); None when
    it does not answer in time or answers with an error ("could not say", never "no routes")."""
    try:
        msg = await nc.request(f"$SYS.REQ.SERVER.{server_id}.ROUTEZ", b"", timeout=timeout)
        reply = json.loads(msg.data)
        if reply.get("error") or not isinstance(reply.get("data"), dict):
            return None
        routes = reply["data"].get("routes") or []
        return frozenset(i for i in (r.get("remote_id") or r.get("remote_name") for r in routes) if i)
    except Exception:
        return None


def _refused_login(e: Exception) -> bool:
    """The server refused this login (nats-py 2.16 reports it as a bare ``Error`` during connect)."""
    return isinstance(e, nats.errors.AuthorizationError) or "authorization violation" in str(e).lower()


class Bus:
    """A reconnecting nats-py client plus its JetStream context.

    It reconnects forever: while nats-server is down (crash, restart) requests
    that need it fail fast and ``/healthz`` reports ``degraded``. An end it cannot
    come back from (nats-py closes a connection that is up after most of the
    server's ``-ERR`` answers) is told to :attr:`lost_listeners`: membershipd then
    stops with exit 1, for systemd to start it again.
    """

    def __init__(self, url: str, seed: Secret | None = None, *, name: str = "membershipd",
                 tls: ssl.SSLContext | None = None, seed_name: str = "service.nkey") -> None:
        self.url = url
        #: the seed's file as a refused login's error names it (remove-peer logs in with system.nkey)
        self.seed_name = seed_name
        #: the URL as logs and errors show it: without a ``user:pass@``
        self.shown_url = redact_url(url)
        self._seed = seed
        self.name = name
        self.tls = tls
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._closing = False  # close() under way: its disconnect is no warning
        #: called (no arguments, synchronously) on every disconnect and reconnect: the health prober wakes up
        self.state_listeners: list[Callable[[], None]] = []
        #: called (with a one-line reason, synchronously) when the connection ends for good without
        #: :meth:`close`: nats-py does not reconnect after most ``-ERR`` answers on a connection that is up
        self.lost_listeners: list[Callable[[str], None]] = []

    def _state_changed(self) -> None:
        for listener in list(self.state_listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - a listener must not break the connection's callbacks
                log.exception("bus state listener failed")

    async def connect(self, timeout: float = 10.0, jetstream_timeout: float = 10.0, check_jetstream: bool = True) -> None:
        self._closing = False
        connect_errors: list[Exception] = []
        give_up = asyncio.Event()

        async def _err(e: Exception) -> None:
            log.debug("nats client: %s", e)
            if self.nc is not None:
                return
            connect_errors.append(e)  # what keeps it from connecting, to say instead of a timeout
            if isinstance(e, ssl.SSLError) and permanent_tls_error(e):
                give_up.set()  # the same certificates will fail again: stop retrying
            elif _refused_login(e):
                give_up.set()  # so will the same nkey (it was only a bare timeout after 10 s)

        async def _disc() -> None:
            if self._closing:
                log.debug("closed the connection to NATS at %s", self.shown_url)
            else:
                log.warning("disconnected from NATS at %s", self.shown_url)
            self._state_changed()

        async def _reconn() -> None:
            log.info("reconnected to NATS at %s", self.shown_url)
            self._state_changed()

        async def _closed() -> None:
            # nats-py closes for good, with no reconnect, after a -ERR from the server on a
            # connection that is up, other than a stale connection or a permissions violation (a
            # message past max_payload, a control line too long, an invalid subject, too many
            # subscriptions): "reconnects forever" no longer holds, and everything on this
            # connection would fail until a restart. (A refusal while it reconnects, an
            # authorization violation or maximum connections, is retried.)
            if self._closing or self.nc is None:
                return
            why = self.nc.last_error
            reason = (f"the connection {self.name} to NATS at {self.shown_url} ended for good"
                      + (f" after {type(why).__name__}: {why}" if why is not None else "")
                      + " (nats-py does not reconnect after such an error)")
            log.error("%s", reason)
            self._state_changed()
            for listener in list(self.lost_listeners):
                try:
                    listener(reason)
                except Exception:  # noqa: BLE001 - one listener must not keep the others from hearing it
                    log.exception("bus lost listener failed")

        kwargs: dict = {}
        if self.tls is not None:
            kwargs["tls"] = self.tls
        if tls_first(self.url):
            kwargs["tls_handshake_first"] = True
        if self._seed is not None:
            kwargs["nkeys_seed_str"] = self._seed.reveal()
        # Made here, not by nats.connect(): a connection cut short (a timeout, a cancellation: an
        # operator command stopped) is closed, not left with its socket open (a review).
        nc = nats.NATS()
        try:
            await connect_bounded(
                nc.connect(
                    servers=[self.url],
                    name=self.name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    error_cb=_err,
                    disconnected_cb=_disc,
                    reconnected_cb=_reconn,
                    closed_cb=_closed,
                    **kwargs,
                ),
                timeout,
                give_up,
            )
        except BaseException as exc:
            heard = list(connect_errors)  # before the close, whose own errors and disconnection are no news
            self._closing = True
            with contextlib.suppress(Exception):
                await close_nats(nc, 3.0)
            if not isinstance(exc, Exception):
                raise
            cause = exc
            refused = [x for x in heard if _refused_login(x)]
            if refused:
                cause = refused[-1]  # the cause, rather than the reset or the timeout that followed it
            elif isinstance(exc, TimeoutError) and heard:
                cause = heard[-1]  # what kept it from connecting, rather than the timeout
            hint = f" (the server does not know this nkey: is it this node's {self.seed_name}?)" if refused else ""
            said = str(cause) or f"no answer within {timeout:g} s"
            raise RuntimeFailure(f"cannot connect to NATS at {self.shown_url}: {type(cause).__name__}: {said}"
                                 f"{hint}") from None
        self.nc = nc
        self.js = self.nc.jetstream(timeout=2.0)
        if check_jetstream:
            await self.wait_jetstream(jetstream_timeout)

    async def wait_jetstream(self, timeout: float) -> None:
        """Wait until JetStream answers: in a forming cluster, until it has a meta leader."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.jetstream_ok(timeout=2.0):
            if loop.time() > deadline:
                raise RuntimeFailure(
                    f"NATS at {self.shown_url} answers but JetStream does not after {timeout:.0f} s "
                    "(is it enabled? in a cluster: are enough nodes up for a quorum?)")
            await asyncio.sleep(0.25)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def jetstream_ok(self, timeout: float = 1.0) -> bool:
        """One JetStream round trip ($JS.API.INFO) within ``timeout``."""
        if not self.connected or self.js is None:
            return False
        try:
            await within(self.js.account_info(), timeout)
            return True
        except Exception:
            return False

    @property
    def server_id(self) -> str | None:
        """The id of the nats-server this connection is on (from its INFO), or None before any."""
        return server_id_of(self.nc)

    async def route_ids(self, timeout: float = 1.0) -> frozenset[str] | None:
        """The ids of the other servers this node's nats-server has routes to.

        Asks the server itself (``$SYS.REQ.SERVER.<id>.ROUTEZ``): this must be
        a connection of a system-account user. Route pooling opens several
        connections per peer, so they are told apart by server id. None when
        the server does not answer.
        """
        if not self.connected or self.nc is None:
            return None
        server_id = self.server_id
        if not server_id:
            return None
        return await routes_of_server(self.nc, server_id, timeout)

    async def route_peers(self, timeout: float = 1.0) -> int | None:
        """How many other servers this node's nats-server has routes to (:meth:`route_ids`)."""
        ids = await self.route_ids(timeout)
        return None if ids is None else len(ids)

    def pub_ack_client(self, *, name: str, timeout: float = 2.0) -> PubAckClient:
        """A lean second connection, with this bus's URL and credentials, for
        publish-and-await-reply on a hot path (see :mod:`unibus.pubacks`)."""
        return PubAckClient(self.url, seed=self._seed, tls=self.tls, name=name, timeout=timeout)

    async def close(self) -> None:
        self._closing = True
        if self.nc is not None:  # closed already, it may still have a reconnect running (unibus.aio)
            with contextlib.suppress(Exception):
                await close_nats(self.nc, 3.0)
