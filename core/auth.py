"""Signed requests on the server: who is asking (RFC 9421), and have we seen it before.

Everything under ``/v1/`` goes through :func:`auth_middleware`:

1. parse and check the signature headers, the covered components, the
   Content-Digest against the real body and the ``created`` window
   (:func:`unibus.signing.check_request`);
2. find the member by ``keyid`` in the in-memory :class:`MemberDirectory`;
3. verify the Ed25519 signature;
4. claim ``(keyid, nonce)`` in the JetStream KV bucket ``unibus_nonces``: a
   nonce already there is a replay (401). If the bucket cannot be written the
   request fails closed with 503: it is never served unauthenticated.

A signed request to an unknown route is authenticated first, then 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nacl.signing
from aiohttp import web
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError

from .bus import Bus
from .problems import Problem
from .pubacks import PubAckUnavailable
from .signing import SignatureError, check_request, split_path_query
from .store.base import Change, Member, Store

log = logging.getLogger("unibus.auth")

NONCE_BUCKET = "unibus_nonces"
WRONG_LAST_SEQUENCE = 10071  # JetStream: Nats-Expected-Last-Subject-Sequence failed
STREAM_NAME_IN_USE = 10058
MEMBER_KEY = "unibus.member"
#: The handler attribute that marks a streamed upload (the body is not read here).
STREAMING_ATTR = "unibus_streaming"
#: The header block of a claim: write only if this key has never been written.
CLAIM_HEADERS = b"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: 0\r\n\r\n"


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
        if change.kind == "reloaded":
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

    async def authenticate(self, request: web.Request, body: bytes | None) -> Member:
        path, query = split_path_query(request.raw_path)
        try:
            pending = check_request(request.method, path, query, request.headers, body, now=time.time(),
                                    skew=self.skew)
        except SignatureError as e:
            raise unauthorized(e.reason) from None
        found = await self.directory.get(pending.keyid)
        if found is None:
            raise unauthorized("unknown keyid")
        member, verify_key = found
        try:
            verified = pending.verify(verify_key)
        except SignatureError as e:
            raise unauthorized(e.reason) from None
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
        return member


def auth_middleware(authenticator: Authenticator) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        route_handler = getattr(request.match_info.route, "handler", None)
        streaming = bool(getattr(route_handler, STREAMING_ATTR, False))
        if streaming:
            body = None  # the handler hashes the body while streaming it
        elif request.body_exists:
            body = await request.read()
        else:
            body = b""  # no body at all (most GETs): nothing to read
        await authenticator.authenticate(request, body)
        return await handler(request)

    return middleware


def current_member(request: web.Request) -> Member:
    return request[MEMBER_KEY]
