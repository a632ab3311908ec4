"""Signed requests on the server: who is asking (RFC 9421), and have we seen it before.

Everything under ``/v1/`` (and any route elsewhere that was not registered
with ``signed=False``) goes through :func:`auth_middleware`, in this order
(docs/http-api.md, "Order of the checks"), and nothing of the body is read
before step 4:

1. from the headers alone: the signature headers, the covered components
   (``content-digest`` when ``Content-Length`` > 0 or ``Transfer-Encoding``
   says a body follows), the format of ``Content-Digest`` and the
   ``created`` window (:func:`unibus.signing.check_request` with ``body=None``);
2. the member by ``keyid`` in the in-memory :class:`MemberDirectory`, and the
   Ed25519 signature. An unknown keyid is verified against a fixed dummy key
   and answered with the very same 401 as a bad signature;
3. claim ``(keyid, nonce)`` in the JetStream KV bucket ``unibus_nonces``: a
   nonce already there is a replay (401). If the bucket cannot be written the
   request fails closed with 503: it is never served unauthenticated;
4. only then the body: refused with 415 if it has a ``Content-Encoding``, with
   413 if longer than :data:`MAX_BODY`, read under the body deadline (408),
   and compared with the signed digest (401). Streamed uploads (handlers
   marked :data:`STREAMING_ATTR`) read it themselves with :func:`body_chunks`.

A response sent while the body is still unread (any 4xx above) closes the
connection; what is still in flight is thrown away, never kept (see
``UNREAD_BODY_DRAIN`` in unibus.app). A signed request to an unknown route is
authenticated first, then 404; its body is never read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import nacl.signing
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError

from .bus import Bus
from .errors import ConfigError
from .problems import Problem
from .pubacks import PubAckUnavailable
from .memberlog import LoggedRequest
from .signing import SignatureError, Verified, check_request, header_value, split_path_query
from .store.base import Change, Member, Store

log = logging.getLogger("unibus.auth")

NONCE_BUCKET = "unibus_nonces"
WRONG_LAST_SEQUENCE = 10071  # JetStream: Nats-Expected-Last-Subject-Sequence failed
STREAM_NAME_IN_USE = 10058
MEMBER_KEY = "unibus.member"
#: ``request[LOGGED_REQUEST_KEY]``: the authenticated request as the membership
#: log records it (a :class:`unibus.memberlog.LoggedRequest`: method, raw path and
#: query, the signature headers as the verifier read them, and the body bytes once
#: read; docs/formats.md, "The membership log"). Handlers of logged routes pass it
#: to the store with :func:`unibus.api.common.log_record`.
LOGGED_REQUEST_KEY = "unibus.logged_request"
#: ``request[AUTH_TIME_KEY]``: the server time (unix seconds, float) at which the
#: signature was checked; a log entry's ``at`` is this time, so its ``created``
#: is within the skew of ``at`` however long the body took to arrive.
AUTH_TIME_KEY = "unibus.auth_time"
#: The handler attribute that marks a streamed upload (the body is not read here).
STREAMING_ATTR = "unibus_streaming"
#: The header block of a claim: write only if this key has never been written.
CLAIM_HEADERS = b"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: 0\r\n\r\n"
#: Largest request body read into memory: a keys POST for 1,000
#: MLKEM768_X25519 members is ~1.6 MB. Streamed uploads have their own limit.
MAX_BODY = 8 * 1024 * 1024
#: Seconds a request body may take to arrive once the signature was accepted
#: (for a streamed upload: the longest gap between two chunks). Set with the
#: environment variable BODY_TIMEOUT_ENV (docs/http-api.md, "Slow and large bodies").
DEFAULT_BODY_TIMEOUT = 30.0
BODY_TIMEOUT_ENV = "UNIBUS_BODY_TIMEOUT"
BODY_TIMEOUT_RANGE = (0.1, 3600.0)
#: ``request[BODY_TIMEOUT_KEY]``: the body deadline of this request, for streaming handlers.
BODY_TIMEOUT_KEY = "unibus.body_timeout"
_CONTINUE_SENT = "unibus.continue_sent"
#: The ``detail`` of the 401 for an unknown keyid *and* for a signature that
#: does not verify: one answer, so an anonymous caller cannot tell which
#: handles exist (docs/http-api.md, "What each 401 means").
BAD_SIGNATURE = "signature verification failed (unknown keyid or bad signature)"
#: An unknown keyid is verified against this key, so that it costs what a
#: known one costs. Its private half is derived from a public label: it stands
#: for no member, and a signature by it is still refused.
DUMMY_VERIFY_KEY = nacl.signing.SigningKey(hashlib.sha256(b"unibus: the key of no member").digest()).verify_key


def body_timeout_from_env(env: Mapping[str, str]) -> float:
    """``UNIBUS_BODY_TIMEOUT`` (seconds), or the default; ConfigError (exit 2) naming it otherwise."""
    raw = env.get(BODY_TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_BODY_TIMEOUT
    lo, hi = BODY_TIMEOUT_RANGE
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:
        raise ConfigError(f"{BODY_TIMEOUT_ENV}: {raw[:40]!r} is not allowed; use a number of seconds from {lo:g} to {hi:g}")
    return value


class NonceStoreUnavailable(Exception):
    """The nonce bucket could not be written: fail closed."""


class NonceStore:
    """Replay protection: one KV key per (handle, nonce), created at most once.

    A claim is a raw JetStream publish to ``$KV.unibus_nonces.<handle>.<nonce>``
    with ``Nats-Expected-Last-Subject-Sequence: 0``: the server accepts it only
    if the key has never been written, and rejects a replay in one round trip
    (nats-py's ``kv.create`` needs two). Keys expire with the bucket's max age,
    twice the allowed skew, after which ``created`` alone rejects the request.
    """

    def __init__(self, bus: Bus, *, skew: int, replicas: int, timeout: float = 2.0) -> None:
        self.bus = bus
        self.ttl = 2 * skew
        self.replicas = replicas
        self.timeout = timeout
        self.claims = 0
        self.replays = 0
        # Claims go over their own lean connection (see unibus.pubacks); the
        # bucket's management stays on the bus's nats-py client.
        self.acks = bus.pub_ack_client(name=f"{bus.name}-nonces", timeout=timeout)

    def bucket_config(self) -> KeyValueConfig:
        return KeyValueConfig(bucket=NONCE_BUCKET, history=1, ttl=float(self.ttl), replicas=self.replicas,
                              storage=StorageType.FILE,
                              description="unibus: seen (handle, nonce) pairs of signed requests")

    async def ensure(self) -> None:
        """Create the bucket if absent; bring TTL and replicas in line if it exists."""
        assert self.bus.js is not None
        try:
            await self.bus.js.create_key_value(config=self.bucket_config())
        except APIError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise
            info = await self.bus.js.stream_info(f"KV_{NONCE_BUCKET}")
            cfg = info.config
            # Replicas are only ever raised (R1 -> R3 in place keeps every key):
            # a node restarted with a stale --kv-replicas must not lower them.
            replicas = max(cfg.num_replicas or 1, self.replicas)
            if cfg.max_age != float(self.ttl) or cfg.num_replicas != replicas:
                cfg.max_age, cfg.num_replicas = float(self.ttl), replicas
                await self.bus.js.update_stream(cfg)
                log.info("nonce bucket updated: ttl %ss, replicas %d", self.ttl, replicas)

    async def start(self) -> None:
        """Open the claim connection (it reconnects by itself from then on)."""
        if not self.acks.connected:
            await self.acks.connect()

    async def close(self) -> None:
        await self.acks.close()

    async def available(self, timeout: float = 1.0) -> bool:
        """Claims can be made: the claim connection is up and the bucket's stream answers."""
        if self.bus.js is None or not self.bus.connected or not self.acks.connected:
            return False
        try:
            await asyncio.wait_for(self.bus.js.stream_info(f"KV_{NONCE_BUCKET}"), timeout)
            return True
        except Exception:
            return False

    async def claim(self, handle: str, nonce: str) -> bool:
        """True if this is the first use of ``nonce`` by ``handle``; False for a replay.

        The hot path of every signed request: one ``HPUB`` over the lean claim
        connection, and a success is recognised by the PubAck's prefix without
        decoding it. Raises :class:`NonceStoreUnavailable` for anything else
        than "stored" or "already there": the caller fails closed.
        """
        try:
            status, data = await self.acks.request(f"$KV.{NONCE_BUCKET}.{handle}.{nonce}", CLAIM_HEADERS, b"1")
        except PubAckUnavailable as e:
            raise NonceStoreUnavailable(f"nonce bucket unavailable: {e}") from None
        if status == 0 and data.startswith(b'{"stream":'):
            self.claims += 1
            return True
        if status == 503:
            raise NonceStoreUnavailable("nonce bucket unavailable: no responders (no stream leader)")
        try:
            error = json.loads(data).get("error") or {}
        except ValueError:
            error = {}
        if error.get("err_code") == WRONG_LAST_SEQUENCE:
            self.replays += 1
            return False
        raise NonceStoreUnavailable(f"JetStream refused the nonce write: {error.get('description') or data[:200]!r}")


class MemberDirectory:
    """Members by handle, with their parsed verify keys, cached in memory.

    A committed member change marks that handle dirty synchronously (store
    listeners run before the writing handler returns), and the next lookup
    re-reads it first: a deleted member's next request is already refused.
    A reload (SIGHUP, another cluster node's change) re-reads everything.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._members: dict[str, tuple[Member, nacl.signing.VerifyKey]] = {}
        self._stale = True  # reload everything
        self._reloads = 0  # "reloaded" changes seen: one that comes during a reload makes it stale again
        self._dirty: set[str] = set()  # reload these handles
        self._lock = asyncio.Lock()
        store.add_listener(self._on_change)

    def _on_change(self, change: Change) -> None:
        if change.kind == "reloaded" and change.keys:
            # Another cluster node's writes, key by key: re-read only the members among them.
            self._dirty.update(k.split(".", 1)[1] for k in change.keys if k.startswith("member."))
        elif change.kind == "reloaded":
            self._stale = True
            self._reloads += 1
        elif change.kind.startswith("member_") and change.handle:
            self._dirty.add(change.handle)

    async def _refresh(self) -> None:
        async with self._lock:
            for _ in range(3):  # a reload signalled during the read means read again (bounded)
                if not self._stale:
                    break
                # Stale stays set until the new table is in place, so lookups
                # made while it is read wait for it (on the lock) instead of
                # answering from the old one.
                reloads = self._reloads
                dirty, self._dirty = self._dirty, set()  # the full read covers these
                try:
                    members = await self.store.list_members()
                except BaseException:
                    self._dirty |= dirty
                    raise
                self._members = {mb.handle: (mb, nacl.signing.VerifyKey(mb.sign_pub)) for mb in members}
                self._stale = self._reloads != reloads
            while self._dirty:
                # Taken out before the read: a change that comes during it marks the handle again.
                handle = self._dirty.pop()
                try:
                    mb = await self.store.get_member(handle)
                except BaseException:
                    self._dirty.add(handle)
                    raise
                if mb is None:
                    self._members.pop(handle, None)
                else:
                    self._members[handle] = (mb, nacl.signing.VerifyKey(mb.sign_pub))

    async def get(self, handle: str) -> tuple[Member, nacl.signing.VerifyKey] | None:
        # While a refresh is under way the table may be the old one: wait for it.
        if self._stale or self._dirty or self._lock.locked():
            await self._refresh()
        return self._members.get(handle)

    def __len__(self) -> int:
        return len(self._members)


def unauthorized(detail: str) -> Problem:
    return Problem(401, detail, kind="invalid-signature", headers={"WWW-Authenticate": 'Signature alg="ed25519"'})


class Authenticator:
    def __init__(self, directory: MemberDirectory, nonces: NonceStore, skew: int) -> None:
        self.directory = directory
        self.nonces = nonces
        self.skew = skew

    async def verify(self, method: str, raw_path: str, headers: Any,
                     body: bytes | None, now: float | None = None) -> tuple[Member, Verified]:
        """Steps 1-2: the signature from the headers, the member, Ed25519.

        Every failure is a 401 :class:`Problem`. An unknown keyid costs one
        Ed25519 verification (against :data:`DUMMY_VERIFY_KEY`), like a known
        one, and gets the same :data:`BAD_SIGNATURE` detail.
        """
        path, query = split_path_query(raw_path)
        try:
            pending = check_request(method, path, query, headers, body, now=now if now is not None else time.time(),
                                    skew=self.skew)
        except SignatureError as e:
            raise unauthorized(e.reason) from None
        found = await self.directory.get(pending.keyid)
        if found is None:
            try:
                pending.verify(DUMMY_VERIFY_KEY)
            except SignatureError:
                pass
            raise unauthorized(BAD_SIGNATURE)
        member, verify_key = found
        try:
            return member, pending.verify(verify_key)
        except SignatureError:
            raise unauthorized(BAD_SIGNATURE) from None

    async def authenticate(self, request: web.Request, body: bytes | None) -> Member:
        """Steps 1-3 of the module docstring. ``body`` is ``None`` while the
        body is unread (the caller then compares ``request["unibus.signature"].content_sha256``
        with what it reads), ``b""`` for a request without a body."""
        now = time.time()
        member, verified = await self.verify(request.method, request.raw_path, request.headers, body, now)
        try:
            fresh = await self.nonces.claim(member.handle, verified.nonce)
        except NonceStoreUnavailable as e:
            log.warning("failing closed: %s", e)
            raise Problem(503, "replay protection is unavailable (the nonce store cannot be written); try again",
                          kind="nonce-store-unavailable", headers={"Retry-After": "1"}) from None
        if not fresh:
            raise unauthorized("replayed nonce: this (keyid, nonce) was already used")
        request[MEMBER_KEY] = member
        request["unibus.signature"] = verified
        request[AUTH_TIME_KEY] = now
        return member


# --------------------------------------------------------------------------- the body, after the signature


def _timeout_problem(timeout: float, what: str) -> Problem:
    return Problem(408, f"{what} did not arrive within {timeout:g} s", kind="request-timeout")


def _unreadable_body(e: Exception) -> Problem:
    if isinstance(e, ConnectionError):
        return Problem(400, "the connection closed before the request body was complete", kind="incomplete-body")
    return Problem(400, f"the request body is malformed: {getattr(e, 'message', None) or type(e).__name__}",
                   kind="malformed-body")


def too_large(limit: int, length: int | None = None) -> Problem:
    said = f"the request body is {length} bytes" if length is not None else "the request body is too large"
    return Problem(413, f"{said}; this server reads at most {limit} bytes", kind="request-entity-too-large",
                   max_bytes=limit)


async def send_continue(request: web.BaseRequest) -> None:
    """Send ``100 Continue`` if the client asked for it (``Expect: 100-continue``), once.

    Signed routes defer aiohttp's automatic ``100 Continue`` (unibus.app's
    ``defer_continue``) until the signature was accepted, so that a client
    that waits for it never sends a body that is answered 401.
    """
    if request.get(_CONTINUE_SENT) or request.version < (1, 1):
        return
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue" or request.content.is_eof():
        return
    request[_CONTINUE_SENT] = True
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0


async def read_body(request: web.Request, *, timeout: float, limit: int = MAX_BODY) -> bytes:
    """The whole body, read by aiohttp's ``request.read()`` (which keeps it for
    the handler): 413 beyond ``limit`` (before any byte when ``Content-Length``
    says so), 408 if it has not all arrived ``timeout`` seconds from now, 400
    if the HTTP framing of the body is broken."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit, length)
    await send_continue(request)
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise _timeout_problem(timeout, "the request body") from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    except (HttpProcessingError, ConnectionError) as e:
        raise _unreadable_body(e) from None


async def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The body of a streamed upload, chunk by chunk, for a handler marked
    :data:`STREAMING_ATTR`: each chunk must come within the body timeout of the
    previous one (408), a body whose HTTP framing is broken is 400. The caller
    hashes what it gets and compares with ``request["unibus.signature"].content_sha256``."""
    timeout = request.get(BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT)
    await send_continue(request)
    content = request.content
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await content.readany()
        except TimeoutError:
            raise _timeout_problem(timeout, "the next part of the request body") from None
        except (HttpProcessingError, ConnectionError) as e:
            raise _unreadable_body(e) from None
        if not chunk:
            return
        yield chunk


def body_unread(request: web.BaseRequest) -> bool:
    """Part of the request body has not arrived yet (it was not read to the end)."""
    return request.body_exists and not request.content.is_eof()


def _open_route(request: web.Request) -> bool:
    """Outside ``/v1/``, only an unknown path (404/405) and a route registered
    with ``add_route(..., signed=False)`` (``/healthz``, ``/openapi.json``) go
    without a signature. Any other route, wherever its path and however it was
    added, is signed: a route nobody declared open is not open (fail closed)."""
    if request.match_info.http_exception is not None:
        return True
    from .app import OPENAPI_DOC  # unibus.app imports this module

    doc = request.app.get(OPENAPI_DOC)
    resource = request.match_info.route.resource
    return doc is not None and resource is not None and doc.signed(request.method, resource.canonical) is False


def auth_middleware(authenticator: Authenticator, *, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                    max_body: int = MAX_BODY) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> web.StreamResponse:
        if not request.path.startswith("/v1/") and _open_route(request):
            return await handler(request)
        has_body = request.body_exists
        # Steps 1-3, from the headers: not one byte of the body is read before them.
        await authenticator.authenticate(request, None if has_body else b"")
        request[BODY_TIMEOUT_KEY] = body_timeout
        if not has_body or request.match_info.http_exception is not None:
            _keep_logged_request(request, None)
            return await handler(request)  # no body, or an unknown route (404/405): the body is never read
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
        if encoding != "identity":
            raise Problem(415, "request bodies must not have a Content-Encoding; send them as they are",
                          kind="unsupported-content-encoding")
        if getattr(request.match_info.handler, STREAMING_ATTR, False):
            _keep_logged_request(request, None)  # never logged: the body is not kept here
            return await handler(request)  # it reads the body itself (body_chunks)
        body = await read_body(request, timeout=body_timeout, limit=max_body)
        expected = request["unibus.signature"].content_sha256
        if expected is None or not hmac.compare_digest(expected, hashlib.sha256(body).digest()):
            raise unauthorized("Content-Digest does not match the body")
        _keep_logged_request(request, body)
        return await handler(request)

    return middleware


def _keep_logged_request(request: web.Request, body: bytes | None) -> None:
    """``request[LOGGED_REQUEST_KEY]``: what the verifier checked, as the membership log records it."""
    path, query = split_path_query(request.raw_path)
    headers = request.headers
    # The digest is part of the record only when the signature covered it.
    digest = header_value(headers, "content-digest") if request["unibus.signature"].content_sha256 is not None else None
    request[LOGGED_REQUEST_KEY] = LoggedRequest(
        method=request.method, path=path, query=query, content_digest=digest,
        signature_input=header_value(headers, "signature-input") or "",
        signature=header_value(headers, "signature") or "", body=body)


# --------------------------------------------------------------------------- who is asking (docs/plugins.md, "Who is asking")


def current_member(request: web.Request) -> Member | None:
    """The member whose signed request this is, as authenticated before the handler ran.

    None on a route that needs no signature (``add_route(..., signed=False)``).
    The record is the one the signature was verified with; its role is the
    role at that moment.
    """
    return request.get(MEMBER_KEY)


def require_member(request: web.Request) -> Member:
    """The caller, or a 401 :class:`~unibus.problems.Problem` when the request is not signed."""
    member = request.get(MEMBER_KEY)
    if member is None:
        raise unauthorized("this route needs a signed request")
    return member


def require_admin(request: web.Request) -> Member:
    """The caller if it is an admin; 403 for another member, 401 for an unsigned request."""
    member = require_member(request)
    if not member.is_admin:
        raise Problem(403, "this action needs the admin role", kind="forbidden")
    return member
