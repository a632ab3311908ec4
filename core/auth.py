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
   nonce already there is a replay (401). A request created at or before the
   epoch's floor (the bucket was lost since: :class:`NonceStore`) is refused:
   401 ``nonce-lost`` when it was signed before the epoch began (a replay
   cannot be told from it), else 503. If the bucket cannot be written or its
   epoch is not known, the request fails closed with 503: it is never served
   unauthenticated. A request whose claim completes after its ``created``
   window closed is refused as expired (401);
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
import collections
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import nacl.signing
import nats.errors
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import APIError
from nats.js.errors import NotFoundError as JsNotFoundError

from .aio import cancel_and_wait, within
from .bus import Bus
from .errors import ConfigError
from .memberlog import LoggedRequest
from .httperrors import unreadable_body
from .problems import Problem
from .pubacks import PubAckUnavailable
from .signing import SignatureError, Verified, check_request, header_value, split_path_query
from .wire import HANDLE_RE, MAX_AUTH_SKEW
from .store.base import Change, Member, Store
from .store.turns import writer as store_writer

log = logging.getLogger("unibus.auth")

NONCE_BUCKET = "unibus_nonces"
NONCE_STREAM = f"KV_{NONCE_BUCKET}"
NONCE_PREFIX = f"$KV.{NONCE_BUCKET}."
#: The key of each incarnation of the nonce bucket: ``{floor, at, id, node}``.
EPOCH_KEY = "_epoch"
#: Keys ``_health.<id>.<n>`` are the health probe's claims (:meth:`NonceStore.available`). Keys of
#: claims start with a handle, which starts with a letter: ``_`` keys are never a claim.
HEALTH_KEY = "_health"
#: The probe's claim is as large as the largest a request makes (a 32-character handle, a
#: 64-character nonce) or larger, so a bucket that cannot take a claim cannot take it either.
HEALTH_PAYLOAD = b"1" * 128
#: Written only if absent, and kept past the bucket's max age: it goes only with the bucket's contents.
EPOCH_HEADERS = {"Nats-Expected-Last-Subject-Sequence": "0", "Nats-TTL": "never"}
#: The nonce bucket's storage (docs/operations.md, "Durability"): memory, so that a
#: claim costs no fsync; the epoch floor makes its loss safe.
NONCE_STORAGE = StorageType.MEMORY
#: The bucket's size bound: memory streams count against nats-server's
#: max_memory_store. A full bucket refuses claims (503, fail closed); nonces
#: expire after 2 × skew. ~200 bytes a nonce: 256 MiB hold ~1.3 million.
DEFAULT_NONCE_MAX_BYTES = 256 * 1024 * 1024
NONCE_MAX_BYTES_ENV = "UNIBUS_NONCE_MAX_BYTES"
NONCE_MAX_BYTES_RANGE = (1024 * 1024, 64 * 1024 ** 3)
#: How far ahead of a request's ``created`` the high-water mark is raised. With 0 it is
#: written at most once a second (under load; never while idle), and a lost bucket's floor
#: is the last second a request was accepted in, so a fresh request passes it about a
#: second after the loss. It was 2: the first signed request after a restart of
#: membershipd, 0.7 s here, was refused in 8 runs of 8 (an acceptance test's view of a
#: restart), and the writes it saved cost nothing measurable: with one a second, signed
#: requests ran at 99% (98-103%) of the throughput and 100% of the server CPU per request
#: of a step of 2 (``bench/bench_signed.py --runs 7 --before 052af93``, 2026-12-07).
HIGH_WATER_STEP = 0
#: The most a start waits for the floor of a new nonce epoch to pass before it opens HTTP
#: (:meth:`NonceStore.wait_past_floor`): a floor further ahead (a signer's clock ran ahead of
#: the server's) still refuses, with 503 and ``Retry-After``, what is created at or before it.
START_FLOOR_WAIT = 3.0
#: How many times :meth:`NonceStore.admit` checks a request again when a new epoch comes in
#: while it raises the mark; past that, 503.
ADMIT_ROUNDS = 3
#: Seconds between two checks of the bucket's ``_epoch``.
EPOCH_CHECK_INTERVAL = 1.0
RECOVERY_TIMEOUT = 5.0
RECOVERY_BACKOFF = 0.5
MOVE_TIMEOUT = 60.0
#: How long a recovery (a bucket lost under a running membershipd) may spend writing the nonces
#: carried over from a 0.11 bucket into the new one; what is not written by then is covered by
#: the floor instead. Within RECOVERY_TIMEOUT: 100,000 of them took about 5 s, longer than a
#: recovery may take, and every recovery timed out until they expired (a review).
CARRY_OVER_RECOVERY_BUDGET = 3.0
WRONG_LAST_SEQUENCE = 10071  # JetStream: Nats-Expected-Last-Subject-Sequence failed
STREAM_NAME_IN_USE = 10058
STREAM_NOT_FOUND = 10059
NO_MESSAGE_FOUND = 10037


#: ``request[MEMBER_KEY]``: the member whose signature the request carries (read it
#: with :func:`current_member`).
MEMBER_KEY = web.RequestKey("unibus.member", Member)
#: ``request[SIGNATURE_KEY]``: what the verifier checked (:class:`unibus.signing.Verified`).
SIGNATURE_KEY = web.RequestKey("unibus.signature", Verified)
#: ``request[LOGGED_REQUEST_KEY]``: the authenticated request as the membership
#: log records it (a :class:`unibus.memberlog.LoggedRequest`: method, raw path and
#: query, the signature headers as the verifier read them, and the body bytes once
#: read; docs/formats.md, "The membership log"). Handlers of logged routes pass it
#: to the store with :func:`unibus.api.common.log_record`. Read it with
#: :func:`logged_request`: for a request without a body it is made on first use.
LOGGED_REQUEST_KEY = web.RequestKey("unibus.logged_request", LoggedRequest)
#: ``request[AUTH_TIME_KEY]``: the server time (unix seconds, float) at which the
#: signature was checked; a log entry's ``at`` is this time, so its ``created``
#: is within the skew of ``at`` however long the body took to arrive.
AUTH_TIME_KEY = web.RequestKey("unibus.auth_time", float)
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
BODY_TIMEOUT_KEY = web.RequestKey("unibus.body_timeout", float)
_CONTINUE_SENT = web.RequestKey("unibus.continue_sent", bool)
#: The ``detail`` of the 401 for an unknown keyid *and* for a signature that
#: does not verify: one answer, so an anonymous caller cannot tell which
#: handles exist (docs/http-api.md, "What each 401 means").
BAD_SIGNATURE = "signature verification failed (unknown keyid or bad signature)"
#: An unknown keyid is verified against this key, so that it costs what a
#: known one costs. Its private half is derived from a public label: it stands
#: for no member, and a signature by it is still refused.
DUMMY_VERIFY_KEY = nacl.signing.SigningKey(hashlib.sha256(b"unibus: the key of no member").digest()).verify_key
_DUMMY_RAW = bytes(DUMMY_VERIFY_KEY)


def body_timeout_from_env(env: Mapping[str, str]) -> float:
    """``UNIBUS_BODY_TIMEOUT`` (seconds), or the default; ConfigError (exit 2) naming it otherwise."""
    return _number_from_env(env, BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT, BODY_TIMEOUT_RANGE, float,
                            "a number of seconds from {lo:g} to {hi:g}")


def _number_from_env(env: Mapping[str, str], name: str, default: Any, bounds: tuple[Any, Any],
                     parse: Callable[[str], Any], allowed: str) -> Any:
    """``env[name]`` parsed by ``parse`` within ``bounds``, or ``default`` when unset or blank;
    ConfigError (exit 2) naming the variable, and saying ``allowed``, otherwise."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    lo, hi = bounds
    try:
        # ASCII digits, one optional fraction: int() and float() take "٦٠" and "1_0" too (a review)
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", raw.strip()):
            raise ValueError
        value = parse(raw.strip())
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: {raw[:40]!r} is not allowed; use {allowed.format(lo=lo, hi=hi)}")
    return value


class NonceStoreUnavailable(Exception):
    """The nonce bucket could not be written, or its epoch is not known: fail closed."""


class ReplayFloorError(NonceStoreUnavailable):
    """The request was created at or before the nonce bucket's floor: it may have
    been accepted before the bucket was lost, so it cannot be checked.

    ``before_epoch``: its ``created`` second began before the bucket's epoch
    was written (the epoch's ``at``), so it was signed before the loss, or in
    the second the loss was noticed in: a replay cannot be told from it, and
    it is refused as one (401, with ``Retry-After`` for a clock behind).
    Otherwise it was signed later, by a clock behind the floor (a signer's
    clock ran ahead before the loss): 503, sign it again once the floor has
    passed."""

    def __init__(self, floor: int, retry_after: int, before_epoch: bool = False) -> None:
        super().__init__(f"created at or before the nonce floor {floor}")
        self.floor = floor
        self.retry_after = retry_after
        self.before_epoch = before_epoch


class HighWater(Protocol):
    """Where the high-water mark of signed requests is kept durably (the store)."""

    async def nonce_high_water(self) -> int: ...

    async def raise_nonce_high_water(self, value: int) -> int: ...


class MemoryHighWater:
    """A high-water mark that lives as long as the process: for tests and benches
    of :class:`NonceStore` alone. membershipd always passes its store."""

    def __init__(self) -> None:
        self.value = 0

    async def nonce_high_water(self) -> int:
        return self.value

    async def raise_nonce_high_water(self, value: int) -> int:
        self.value = max(self.value, value)
        return self.value


class CarriedNonces(Protocol):
    """Where a single node keeps, durably, the nonces it carried over from a bucket that moved
    to memory (a 0.11 file bucket), with their claim times: each new incarnation of the bucket
    gets them again (:meth:`NonceStore.carry_over`). ``record`` is a JSON text; None clears it."""

    async def carried_nonces(self) -> str | None: ...

    async def keep_carried_nonces(self, record: str | None) -> None: ...


class MemoryCarriedNonces:
    """Carried-over nonces that live as long as the process: for tests of :class:`NonceStore`
    alone. membershipd passes its SQLite store."""

    def __init__(self) -> None:
        self.record: str | None = None

    async def carried_nonces(self) -> str | None:
        return self.record

    async def keep_carried_nonces(self, record: str | None) -> None:
        self.record = record


def nonce_max_bytes_from_env(env: Mapping[str, str]) -> int:
    """``UNIBUS_NONCE_MAX_BYTES``, or the default; ConfigError (exit 2) naming it otherwise."""
    return _number_from_env(env, NONCE_MAX_BYTES_ENV, DEFAULT_NONCE_MAX_BYTES, NONCE_MAX_BYTES_RANGE, int,
                            "a number of bytes from {lo} to {hi}")


class _BucketMissing(Exception):
    """The nonce bucket's stream does not exist (a single node's nats-server restarted)."""


#: How far ahead of this node's clock an epoch's ``at`` may be (another node's clock) and still
#: say when the epoch began; beyond it, or not a finite number, it is not used (a floor refusal is
#: then ``503``, as for an epoch without one).
EPOCH_AT_AHEAD = 5.0


def _epoch_time(at: Any) -> float | None:
    """An epoch record's ``at``, if it is a finite time not far ahead of this clock."""
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        return None
    if not 0 <= at <= time.time() + EPOCH_AT_AHEAD:
        return None
    return float(at)


def floor_wait(floor: int, now: float) -> int:
    """Whole seconds until a request signed then passes ``floor`` (at least 1): its ``Retry-After``."""
    return max(1, math.ceil(floor + 1 - now))


def _for_how_long(floor: int) -> str:
    wait = floor - time.time()
    return f"for about {wait:.0f} s more" if wait > 0 else "none is fresh any more"


def _ack_seq(data: bytes) -> int:
    """The ``seq`` of a PubAck (``{"stream":"…","seq":N…}``) without decoding the JSON; 0 if absent."""
    i = data.find(b'"seq":')
    if i < 0:
        return 0
    j = i + 6
    k = j
    while k < len(data) and 48 <= data[k] <= 57:
        k += 1
    return int(data[j:k]) if k > j else 0


class NonceStore:
    """Replay protection: one KV key per (handle, nonce), created at most once.

    A claim is a raw JetStream publish to ``$KV.unibus_nonces.<handle>.<nonce>``
    with ``Nats-Expected-Last-Subject-Sequence: 0``: the server accepts it only
    if the key has never been written, and rejects a replay in one round trip
    (nats-py's ``kv.create`` needs two). Keys expire with the bucket's max age,
    twice the allowed skew, after which ``created`` alone rejects the request.

    The bucket is kept in memory (docs/operations.md, "Durability"): nonces are
    worth nothing after 2 × skew, and memory spares every signed request an
    fsync. So the bucket can be lost (a single node's nats-server restarts; every
    node of a cluster crashes at once), and the rule that keeps that safe is:

    * the store keeps a durable *high-water mark*: no request was accepted with
      a ``created`` above it. :meth:`admit` raises it (to the request's second, or
      now's, plus :data:`HIGH_WATER_STEP`, so it is written at most once a second,
      not per request) before a request's nonce is claimed;
    * each incarnation of the bucket holds the key ``_epoch`` (created only if
      absent, ``Nats-TTL: never``): its ``floor`` is the high-water mark read
      when it was written. It disappears only with the bucket's contents;
    * a request created at or before the floor is refused: its nonce may have
      been claimed in the bucket that was lost (401 ``nonce-lost`` when its
      ``created`` second began before the epoch's ``at``, else 503: see
      :class:`ReplayFloorError`). Until the epoch is known, every request is
      refused (503);
    * a loss is noticed from no responders (the stream is gone), the claim
      connection reconnecting, a claim's sequence going backwards, and a check
      of ``_epoch`` every :data:`EPOCH_CHECK_INTERVAL` seconds.
    """

    def __init__(self, bus: Bus, *, skew: int, replicas: int, high_water: HighWater | None = None,
                 timeout: float = 2.0, max_bytes: int = DEFAULT_NONCE_MAX_BYTES, exclusive: bool = False,
                 node: str = "", carried: CarriedNonces | None = None) -> None:
        self.bus = bus
        self.node = node or bus.name
        self.skew = skew
        self.ttl = 2 * skew
        self.replicas = replicas
        self.timeout = timeout
        self.max_bytes = max_bytes
        #: Nobody else claims in this bucket (a single node's own nats-server): moving
        #: a file bucket to memory then carries its nonces over exactly.
        self.exclusive = exclusive
        self.high_water_store: HighWater = high_water if high_water is not None else MemoryHighWater()
        #: Where a single node keeps the nonces a moved bucket carried over (:meth:`carry_over`).
        self.carried = carried if exclusive else None
        # Read by unibus.metrics (unibus_nonce_claims_total{result}).
        self.claims = 0
        self.replays = 0
        self.failures = 0
        #: The last claim (a request's or the health probe's) failed: /healthz is degraded until one
        #: succeeds, not only from the probe's next reading (a signed request answered 503 while
        #: /healthz still said ok; a black-box test of the contract).
        self.failing = False
        #: Requests refused because they were created at or before the floor.
        self.floor_refusals = 0
        #: Losses of the bucket this node noticed (a new ``_epoch`` adopted).
        self.resets = 0
        #: The floor of the bucket's current incarnation; None while it is not known (503).
        self.floor: int | None = None
        #: When the current incarnation's epoch was written (its ``at``, Unix seconds); None if unknown,
        #: or not a finite time at most :data:`EPOCH_AT_AHEAD` seconds ahead of this clock.
        self.epoch_at: float | None = None
        #: The durable high-water mark as far as this node knows it (a lower bound).
        self.high_water = 0
        self._epoch_raw: bytes | None = None
        self._max_seq = 0
        self._reconnects = 0  # the claim connection's reconnects when the epoch was last established
        self._pending_floor: int | None = None  # the floor of a bucket just moved from file storage
        self._raising: asyncio.Future[int] | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0
        self._watch_task: asyncio.Task[None] | None = None
        self._closing = False
        # Claims go over their own lean connection (see unibus.pubacks); the
        # bucket's management stays on the bus's nats-py client.
        self.acks = bus.pub_ack_client(name=f"{bus.name}-nonces", timeout=timeout)
        # the health probe's own key: one per process, expiring with the bucket's max age
        self._health_subject = f"{NONCE_PREFIX}{HEALTH_KEY}.{secrets.token_hex(8)}"
        self._health_seq = itertools.count()

    def bucket_config(self) -> KeyValueConfig:
        return KeyValueConfig(bucket=NONCE_BUCKET, history=1, ttl=float(self.ttl), replicas=self.replicas,
                              storage=NONCE_STORAGE, max_bytes=self.max_bytes,
                              description="unibus: seen (handle, nonce) pairs of signed requests")

    # -- the bucket ----------------------------------------------------------------

    async def ensure(self) -> None:
        """Create the bucket if absent (or move a file bucket to memory), bring TTL,
        replicas and size in line, then establish its epoch."""
        await self._ensure_bucket()
        await self._establish()

    async def _ensure_bucket(self) -> None:
        assert self.bus.js is not None
        config = self.bucket_config()
        try:
            await self.bus.js.create_key_value(config=config)
            return
        except APIError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise
        info = await self.bus.js.stream_info(NONCE_STREAM)
        cfg = info.config
        if cfg.storage != config.storage:
            await self._move_bucket(info)
            return
        # Replicas are only ever raised (R1 -> R3 in place keeps every key):
        # a node restarted with a stale --kv-replicas must not lower them.
        replicas = max(cfg.num_replicas or 1, self.replicas)
        # nats-server refuses a duplicate window longer than the max age (a lower
        # --auth-skew than the bucket was made with); nats-py's create caps it alike.
        window = min(float(cfg.duplicate_window or self.ttl), float(self.ttl))
        if (cfg.max_age != float(self.ttl) or cfg.num_replicas != replicas or cfg.max_bytes != self.max_bytes
                or cfg.duplicate_window != window):
            cfg.max_age, cfg.num_replicas, cfg.max_bytes = float(self.ttl), replicas, self.max_bytes
            cfg.duplicate_window = window
            await self.bus.js.update_stream(cfg)
            log.info("nonce bucket updated: ttl %ss, replicas %d, max %d bytes", self.ttl, replicas, self.max_bytes)

    async def _move_bucket(self, info: Any) -> None:
        """Re-create the bucket with the configured storage (it cannot be changed in place), keeping its nonces.

        A nonce claimed at ``t`` came with a ``created`` of at most ``t`` + the skew it was
        accepted under (half the old bucket's max age; ``skew`` for a bucket without one). What
        the old bucket holds is made safe before it goes, so a crash before the copy is back
        loses nothing:

        * a single node (``exclusive``: nobody else claims in the bucket) with a place to keep
          ``carried`` nonces, whose nonces were read, keeps them there durably with their claim
          times and the old skew, and every new incarnation of the bucket gets them again
          before its epoch, for as long as the skew of that start leaves their requests fresh
          (:meth:`carry_over`). The mark is not raised for them. It was raised for the latest
          claim, and the mark is the floor of the next incarnation: a restart within a minute
          of an upgrade from 0.11 left ``/healthz`` degraded, refusing every signed request,
          for up to a minute (a black-box test of the upgrade). It is raised to now minus the
          old skew, which refuses nothing fresh: a request whose nonce had expired from the
          old bucket before the move was created before that, and a longer skew now or later
          would take it again (a review);
        * otherwise (a cluster, ``--nats-url``, nonces that could not be read, or a store
          without a place for them) the mark is raised to cover them: for the latest claim
          when the bucket is this node's own and its nonces were read, else to now + the old
          skew (a node of the previous version may claim after the copy was read). The copy
          carries every nonce with the time it has left, and the new bucket's floor is the
          raised mark, refused until it has passed. (An exact copy kept the old floor here;
          with the first case, no deployment took that path any more.)
        """
        assert self.bus.js is not None
        old = getattr(info.config.storage, "value", info.config.storage)
        accepted_skew = math.ceil((info.config.max_age or 0) / 2) or self.skew  # the skew it was made with
        try:
            nonces = await within(self._read_nonces(info), MOVE_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - the floor covers what is not copied
            log.warning("nonce bucket: could not read the nonces of the %s bucket (%s: %s); requests from the "
                        "last %d s will be refused instead", old, type(e).__name__, e, accepted_skew)
            nonces = None
        now = time.time()
        floor_before = await self.high_water_store.nonce_high_water()
        keep = self.carried is not None and nonces is not None
        if keep:
            assert self.carried is not None and nonces is not None
            # each while some skew a later start may have keeps its request fresh
            kept = [[key, math.ceil(claimed * 1000) / 1000] for key, claimed in nonces
                    if claimed + accepted_skew + MAX_AUTH_SKEW >= now]
            await self.carried.keep_carried_nonces(json.dumps({"skew": accepted_skew, "nonces": kept})
                                                   if kept else None)
            floor = await self.high_water_store.raise_nonce_high_water(int(now) - accepted_skew)
        else:
            if nonces is None or not self.exclusive:
                cover = int(now) + accepted_skew
            else:
                # and now minus the old skew: a request whose nonce expired from the old bucket was
                # created before that, and a longer skew would take it again (a review)
                cover = max((math.ceil(claimed) + accepted_skew for _key, claimed in nonces),
                            default=int(now) - accepted_skew)
            floor = (await self.high_water_store.raise_nonce_high_water(cover) if cover > floor_before
                     else floor_before)
        try:
            await self.bus.js.delete_stream(NONCE_STREAM)
        except APIError as e:
            if e.err_code != STREAM_NOT_FOUND:
                raise
        try:
            await self.bus.js.create_key_value(config=self.bucket_config())
        except APIError as e:
            if e.err_code != STREAM_NAME_IN_USE:  # another node re-created it first: copy into that one
                raise
        new = getattr(self.bucket_config().storage, "value", "?")
        self._pending_floor = floor  # the floor of the epoch written next (after carry_over, if kept)
        if keep:
            log.warning("nonce bucket moved from %s to %s storage (docs/operations.md, Durability): %d nonce(s) "
                        "carried over, kept in the store while their requests can be fresh", old, new, len(kept))
            return
        # each with the time it has left in the new bucket (nonces older than its max age stay out)
        live = [(key, left) for key, claimed in nonces or ()
                if (left := math.ceil(self.ttl - (time.time() - claimed))) > 0]
        copied = await self._write_nonces(live) if live else 0
        log.warning("nonce bucket moved from %s to %s storage (docs/operations.md, Durability): %d nonce(s) carried "
                    "over; requests created at or before %d are refused until then", old, new, copied, floor)

    async def carry_over(self, budget: float = MOVE_TIMEOUT) -> int:
        """Write the nonces kept from a moved bucket (:class:`CarriedNonces`) into this new
        incarnation of the bucket, before its epoch is written, and return the floor they
        still need (0 for none).

        A nonce claimed at ``t`` under the old skew came with a ``created`` of at most ``t`` +
        that skew, fresh under this start's skew until that + this skew: it is written with
        the seconds left until then. One that this bucket cannot keep that long (its max
        age is twice this skew), or that is not written within ``budget`` seconds, is covered
        by the floor instead: ``t`` + the old skew. The record goes once no skew a later start
        may have (up to :data:`MAX_AUTH_SKEW`) can make any of its requests fresh again. The
        expiries were fixed at the move, and a restart with a longer ``--auth-skew`` let a
        request the longer window made fresh again be replayed once its nonce had gone (a
        review)."""
        if self.carried is None:
            return 0
        text = await self.carried.carried_nonces()  # the store cannot be read: no epoch, fail closed
        if text is None:
            return 0
        now = time.time()
        try:
            record = json.loads(text)
            old_skew = int(record["skew"])
            kept = [(str(key), float(claimed)) for key, claimed in record["nonces"]]
        except (ValueError, KeyError, TypeError):
            # Only membershipd writes it. Should it be unreadable: refuse what it may hold, from
            # now on (the mark), whatever skew 0.11 ran with, and let it go.
            floor = await self.high_water_store.raise_nonce_high_water(int(now) + MAX_AUTH_SKEW)
            await self.carried.keep_carried_nonces(None)
            log.error("nonce bucket: the nonces carried over from a moved bucket are unreadable (removed); requests "
                      "created at or before %d are refused (%s)", floor, _for_how_long(floor))
            return floor
        if all(claimed + old_skew + MAX_AUTH_SKEW < now for _key, claimed in kept):
            await self.carried.keep_carried_nonces(None)
            log.info("nonce bucket: the nonces carried over from the moved bucket cannot be fresh any more")
            return 0
        floor = 0
        live: list[tuple[str, int]] = []
        for key, claimed in kept:
            fresh = claimed + old_skew + self.skew - now  # seconds its request may still be fresh
            if fresh < 0:
                continue
            if fresh >= self.ttl:
                floor = max(floor, math.ceil(claimed + old_skew))  # past this bucket's max age
            else:
                live.append((key, min(math.ceil(fresh) + 1, self.ttl)))
        copied = -1
        if live:
            with contextlib.suppress(TimeoutError):
                copied = await within(self._write_nonces(live), budget)
        if live and copied != len(live):
            floor = max(floor, math.ceil(max(claimed for _key, claimed in kept) + old_skew))
            log.warning("nonce bucket: %s of %d nonce(s) carried over from the moved bucket could not be written "
                        "into this one; requests created at or before %d are refused (%s)",
                        "some" if copied < 0 else len(live) - copied, len(live), floor, _for_how_long(floor))
        elif live:
            log.info("nonce bucket: %d nonce(s) carried over from the moved bucket written into this one", copied)
        return floor

    async def _read_nonces(self, info: Any) -> list[tuple[str, float]]:
        """``(key, claimed at)`` of every nonce in the bucket, ``_epoch`` left out (``claimed at``:
        the server's timestamp of the claim, Unix seconds)."""
        assert self.bus.js is not None
        if not info.state.messages:
            return []
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            queue.put_nowait(msg)

        sub = await self.bus.js.subscribe(f"{NONCE_PREFIX}>", stream=NONCE_STREAM, cb=on_msg, ordered_consumer=True,
                                          deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, inactive_threshold=5.0)
        out: list[tuple[str, float]] = []
        try:
            info = await sub.consumer_info()
            if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                return out
            while True:
                msg = await queue.get()
                meta = msg.metadata
                key = msg.subject[len(NONCE_PREFIX):]
                if not key.startswith("_") and (msg.headers or {}).get("KV-Operation") is None:
                    out.append((key, meta.timestamp.timestamp()))
                if meta.num_pending == 0:
                    return out
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _write_nonces(self, nonces: list[tuple[str, int]]) -> int:
        """Create each ``(key, seconds left)`` in the bucket; returns how many are in it afterwards."""
        assert self.bus.nc is not None
        nc = self.bus.nc

        async def put(key: str, left: int) -> bool:
            try:
                reply = await nc.request(NONCE_PREFIX + key, b"1", timeout=self.timeout,
                                         headers={"Nats-Expected-Last-Subject-Sequence": "0", "Nats-TTL": str(left)})
            except Exception:  # noqa: BLE001 - counted as not copied
                return False
            try:
                error = json.loads(reply.data).get("error")
            except ValueError:
                return False
            return error is None or error.get("err_code") == WRONG_LAST_SEQUENCE  # there already

        done = 0
        for i in range(0, len(nonces), 256):
            done += sum(await asyncio.gather(*(put(k, left) for k, left in nonces[i:i + 256])))
        return done

    # -- the epoch -------------------------------------------------------------------

    async def _read_epoch(self) -> bytes | None:
        """The stored ``_epoch`` record, None when absent; :class:`_BucketMissing` without a bucket."""
        assert self.bus.js is not None
        try:
            msg = await self.bus.js.get_msg(NONCE_STREAM, subject=NONCE_PREFIX + EPOCH_KEY, direct=False)
        except JsNotFoundError as e:
            if e.err_code == NO_MESSAGE_FOUND:
                return None
            if e.err_code == STREAM_NOT_FOUND:
                raise _BucketMissing() from None
            raise
        except APIError as e:
            if e.err_code == STREAM_NOT_FOUND:
                raise _BucketMissing() from None
            raise
        if (msg.headers or {}).get("KV-Operation") is not None:
            return None
        return bytes(msg.data)

    async def _establish(self, carry_budget: float = MOVE_TIMEOUT) -> None:
        """Read the bucket's ``_epoch``, writing it first if it is missing (the bucket is new), and adopt it."""
        assert self.bus.nc is not None
        reconnects = self.acks.reconnects
        raw = await self._read_epoch()
        mark = await self.high_water_store.nonce_high_water()
        if raw is None:
            floor = self._pending_floor if self._pending_floor is not None else mark
            floor = max(floor, await self.carry_over(carry_budget))
            record = {"floor": floor, "at": round(time.time(), 3), "id": uuid.uuid4().hex, "node": self.node}
            try:
                reply = await self.bus.nc.request(NONCE_PREFIX + EPOCH_KEY, json.dumps(record).encode(),
                                                  timeout=self.timeout, headers=EPOCH_HEADERS)
            except nats.errors.NoRespondersError:
                raise _BucketMissing() from None
            error = (json.loads(reply.data) if reply.data else {}).get("error")
            if error is not None and error.get("err_code") != WRONG_LAST_SEQUENCE:
                raise NonceStoreUnavailable(f"JetStream refused the nonce epoch: {error.get('description', error)}")
            raw = await self._read_epoch()  # ours, or the one another node wrote first
            if raw is None:
                raise NonceStoreUnavailable("the nonce epoch was written but cannot be read back")
            if error is None and floor > 0:
                log.warning("nonce bucket: new epoch, written here: the bucket is new and requests may have been "
                            "accepted before (its nonces were lost); signed requests created at or before %d are "
                            "refused (%s)", floor, _for_how_long(floor))
            elif error is None:
                log.info("nonce bucket: first epoch (no high-water mark of signed requests is stored here yet)")
        self._adopt(raw, mark, reconnects)

    def _adopt(self, raw: bytes, mark: int, reconnects: int) -> None:
        try:
            record = json.loads(raw)
            floor = int(record["floor"])
        except (ValueError, KeyError, TypeError):
            raise NonceStoreUnavailable(f"the nonce epoch is unreadable: {raw[:100]!r}") from None
        epoch_at = _epoch_time(record.get("at"))
        new = raw != self._epoch_raw
        if new and self._epoch_raw is not None:
            self.resets += 1
            log.warning("nonce bucket: new epoch, adopted: the bucket was lost and made again; signed requests "
                        "created at or before %d are refused (%s)", floor, _for_how_long(floor))
        elif new:
            log.info("nonce bucket: epoch with floor %d (%s)", floor, _for_how_long(floor))
        if new:
            self._max_seq = 0
        self._epoch_raw = raw
        self.epoch_at = epoch_at
        self._pending_floor = None
        self._reconnects = reconnects
        self.high_water = max(self.high_water, mark)
        self.floor = floor

    def _lost(self, why: str) -> None:
        if self.floor is not None:
            log.warning("nonce bucket: %s; signed requests wait for its epoch", why)
        self.floor = None

    async def _recover(self) -> None:
        """(Re)establish the epoch, creating the bucket if it is gone; on failure the floor stays unknown."""
        async with self._lock:
            if self.floor is not None and self._reconnects == self.acks.reconnects:
                return  # done while we waited for the lock
            self.floor = None
            loop = asyncio.get_running_loop()
            if loop.time() < self._retry_at:
                return
            try:
                await within(self._rebuild(), RECOVERY_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - retried; requests meanwhile fail closed
                self._retry_at = loop.time() + RECOVERY_BACKOFF
                log.warning("nonce bucket: cannot establish its epoch yet (%s: %s)", type(e).__name__, e)

    async def _rebuild(self) -> None:
        try:
            await self._establish(CARRY_OVER_RECOVERY_BUDGET)
        except _BucketMissing:
            log.warning("nonce bucket: %s is gone (its nats-server restarted); creating it again", NONCE_STREAM)
            await self._ensure_bucket()
            await self._establish(CARRY_OVER_RECOVERY_BUDGET)

    async def _watch(self) -> None:
        """Every EPOCH_CHECK_INTERVAL: re-establish an unknown epoch, and notice one that changed."""
        while not self._closing:  # a flag as well: a cancellation can be lost in nats-py (unibus.aio)
            await asyncio.sleep(EPOCH_CHECK_INTERVAL)
            if self._closing:
                return
            try:
                if self.floor is None or self._reconnects != self.acks.reconnects:
                    await self._recover()
                    continue
                raw = await within(self._read_epoch(), self.timeout)
            except _BucketMissing:
                self._lost(f"{NONCE_STREAM} is gone")
                continue
            except Exception as e:  # noqa: BLE001 - no answer now: claims fail closed on their own
                log.debug("nonce epoch check: %s", e)
                continue
            if raw is None:
                self._lost("its _epoch is missing (the bucket was reset)")
                await self._recover()
            elif raw != self._epoch_raw:
                async with self._lock:
                    with contextlib.suppress(Exception):
                        self._adopt(raw, await self.high_water_store.nonce_high_water(), self._reconnects)

    # -- requests ----------------------------------------------------------------------

    def admitted(self, created: int) -> bool:
        """True when :meth:`admit` would pass at once, with nothing to read or write:
        the epoch is known and current, ``created`` is above its floor and under
        the high-water mark. Otherwise call :meth:`admit`."""
        floor = self.floor
        return (floor is not None and floor < created <= self.high_water
                and self._reconnects == self.acks.reconnects)

    async def admit(self, created: int, now: float) -> None:
        """Before a claim: the epoch is known, ``created`` is above its floor, and the
        high-water mark covers ``created`` (raised durably first if it did not).

        Raises :class:`ReplayFloorError` for a request created at or before the
        floor, :class:`NonceStoreUnavailable` when the epoch is unknown or the
        mark cannot be stored.
        """
        for _ in range(ADMIT_ROUNDS):
            if self.floor is None or self._reconnects != self.acks.reconnects:
                await self._recover()
            floor, epoch, epoch_at = self.floor, self._epoch_raw, self.epoch_at
            if floor is None:
                raise NonceStoreUnavailable("the nonce bucket's epoch is not known yet")
            if created <= floor:
                self.floor_refusals += 1
                raise ReplayFloorError(floor, floor_wait(floor, now),
                                       before_epoch=epoch_at is not None and created < epoch_at)
            while created > self.high_water:
                fut = self._raising
                if fut is None:
                    fut = self._raising = asyncio.ensure_future(self._raise(max(created, int(now)) + HIGH_WATER_STEP))
                try:
                    await asyncio.shield(fut)
                except Exception as e:  # noqa: BLE001 - fail closed
                    raise NonceStoreUnavailable(f"the high-water mark of signed requests cannot be stored: "
                                                f"{type(e).__name__}: {e}") from None
            # A new epoch adopted while the mark was raised (a review: its floor was never checked,
            # and the claim, in the new bucket, passed the sequence check): check it again.
            if self._epoch_raw == epoch and self.floor == floor and self._reconnects == self.acks.reconnects:
                return
        raise NonceStoreUnavailable("the nonce bucket's epoch kept changing while the request was admitted")

    async def _raise(self, value: int) -> int:
        try:
            stored = await within(self.high_water_store.raise_nonce_high_water(value), self.timeout)
            self.high_water = max(self.high_water, stored)
            return stored
        finally:
            self._raising = None

    async def start(self) -> None:
        """Open the claim connection (it reconnects by itself from then on) and watch the epoch."""
        self._closing = False
        if not self.acks.connected:
            await self.acks.connect()
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="unibus-nonce-epoch")

    async def wait_past_floor(self, limit: float = START_FLOOR_WAIT) -> float:
        """At start, before HTTP opens: establish the epoch, then wait until a request signed now
        is past its floor, for at most ``limit`` seconds in all; return the seconds waited.

        A new epoch's floor is the last second a request may have been accepted in before the
        bucket was lost, so without this wait the first signed request after a restart of
        membershipd was refused (503) whenever it came within that second. With it, a client
        that waits for ``/healthz``, or for the port, gets its first request served."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self.floor is None:
            with contextlib.suppress(Exception):  # not known yet: requests fail closed, as before
                await within(self._recover(), limit)
        floor = self.floor
        if floor is None:
            return loop.time() - started
        wait = min(floor + 1 - time.time(), limit - (loop.time() - started))
        if floor + 1 - time.time() > wait:
            log.warning("nonce bucket: its floor is %d, %.0f s ahead of this clock (a signer's clock ran ahead of "
                        "this one, this one stepped back, or nonces carried over from a 0.11 bucket still need it); "
                        "signed requests created at or before it are refused until it has passed (/healthz is "
                        "degraded meanwhile)", floor, floor - time.time())
        if wait > 0:
            await asyncio.sleep(wait)
        return loop.time() - started

    async def close(self) -> None:
        self._closing = True
        if self._watch_task is not None:
            await cancel_and_wait(self._watch_task)
        await self.acks.close()

    async def available(self, timeout: float = 1.0) -> bool:
        """Claims can be made: the epoch is known, the claim connection is up, and a claim is
        acknowledged: a new key ``_health.<id>.<n>`` of this process's, with the claim's own
        header, as a request's nonce is claimed.

        A claim, not the stream's info: on a cluster that lost its quorum a replica still answers
        the info of a stream without a leader, and ``/healthz`` said ``ok`` while every signed
        request was refused 503 (a black-box test of the contract). And a new key each time: an
        overwrite of one key is accepted by a bucket that is full, whose claims are all refused
        (a review), and as large as any claim, so a nearly full bucket is not taken for a free one.
        At one a second, each node keeps about 2 × skew such keys (about 250 bytes each) until
        they expire with the others."""
        if self.bus.js is None or not self.bus.connected or not self.acks.connected or self.floor is None:
            return False
        subject = f"{self._health_subject}.{next(self._health_seq)}"
        try:
            status, data = await within(self.acks.request(subject, CLAIM_HEADERS, HEALTH_PAYLOAD), timeout)
        except Exception:
            self.failing = True
            return False
        self.failing = not (status == 0 and data.startswith(b'{"stream":'))
        return not self.failing

    async def claim(self, handle: str, nonce: str) -> bool:
        """True if this is the first use of ``nonce`` by ``handle``; False for a replay.

        The hot path of every signed request: one ``HPUB`` over the lean claim
        connection, and a success is recognised by the PubAck's prefix; its
        sequence is compared with the highest seen (one that goes backwards may
        come from a new bucket: the epoch is checked). Raises
        :class:`NonceStoreUnavailable` for anything else than "stored" or
        "already there": the caller fails closed.
        """
        epoch = self._epoch_raw
        try:
            status, data = await self.acks.request(f"{NONCE_PREFIX}{handle}.{nonce}", CLAIM_HEADERS, b"1")
        except PubAckUnavailable as e:
            self.failures += 1
            self.failing = True
            raise NonceStoreUnavailable(f"nonce bucket unavailable: {e}") from None
        if status == 0 and data.startswith(b'{"stream":'):
            if self._epoch_raw != epoch:
                # a new epoch adopted while the claim was out: it may have landed in the new bucket,
                # under a floor this request was never checked against (a review); fail closed
                self.failures += 1
                self.failing = True
                raise NonceStoreUnavailable("the nonce bucket's epoch changed during the claim; sign the request "
                                            "again")
            seq = _ack_seq(data)
            if seq >= self._max_seq:
                self._max_seq = seq
            else:
                await self._same_epoch()
            self.claims += 1
            self.failing = False
            return True
        if status == 503:
            self.failures += 1
            self.failing = True
            raise NonceStoreUnavailable("nonce bucket unavailable: no responders (no stream leader, or no bucket)")
        try:
            error = json.loads(data).get("error") or {}
        except ValueError:
            error = {}
        if error.get("err_code") == WRONG_LAST_SEQUENCE:
            self.replays += 1
            self.failing = False
            return False
        self.failures += 1
        self.failing = True
        raise NonceStoreUnavailable(f"JetStream refused the nonce write: {error.get('description') or data[:200]!r}")

    async def _same_epoch(self) -> None:
        """A claim's sequence went backwards: unless ``_epoch`` is still the one adopted, the
        claim landed in a new bucket whose floor this node does not know: refuse (503)."""
        try:
            raw = await within(self._read_epoch(), self.timeout)
        except Exception as e:  # noqa: BLE001
            self._lost(f"a claim's sequence went backwards and its epoch cannot be read ({type(e).__name__})")
            raise NonceStoreUnavailable("the nonce bucket may have been reset; sign the request again") from None
        if raw != self._epoch_raw:
            self._lost("a claim's sequence went backwards and its epoch changed (the bucket was reset)")
            raise NonceStoreUnavailable("the nonce bucket was reset; sign the request again")


#: Handles :class:`MemberDirectory` remembers as no member's (about 100 bytes each).
MAX_UNKNOWN = 4096


class MemberDirectory:
    """Members by handle, with their parsed verify keys, cached in memory.

    Filled lazily, one handle at a time, from the store (a node with 100,000
    members does not read them all before its first request: that took 14 s,
    docs/benchmarks.md). A committed member change drops that handle
    synchronously (store listeners run before the writing handler returns), so
    a deleted member's next request is already refused; a reload (SIGHUP)
    drops everything; another cluster node's changes drop the members among
    their keys. The last :data:`MAX_UNKNOWN` handles found to be no member's
    are remembered too, and dropped by the same changes: an unknown keyid asked
    again costs no store read (on SQLite the read waits for the one thread
    that also writes), and takes about as long as a cached member's (red team:
    without it, a handle asked twice answered faster when it was a member's).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        # handle -> (member, its raw 32-byte Ed25519 key, checked when cached)
        self._members: dict[str, tuple[Member, bytes]] = {}
        # handles the store did not have, oldest first
        self._unknown: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._version = 0  # bumped by every change: a read that spans one is not cached
        store.add_listener(self._on_change)

    def _on_change(self, change: Change) -> None:
        if change.kind == "reloaded" and change.keys:
            # Another cluster node's writes, key by key: drop only the members among them.
            for key in change.keys:
                if key.startswith("member."):
                    handle = key.split(".", 1)[1]
                    self._members.pop(handle, None)
                    self._unknown.pop(handle, None)
        elif change.kind == "reloaded":
            self._members.clear()
            self._unknown.clear()
        elif change.kind.startswith("member_") and change.handle:
            self._members.pop(change.handle, None)
            self._unknown.pop(change.handle, None)
        else:
            return
        self._version += 1

    def cached(self, handle: str) -> tuple[Member, bytes] | None:
        """The member and its raw verify key if cached now (no I/O); else None: ask :meth:`get`."""
        return self._members.get(handle)

    async def get(self, handle: str) -> tuple[Member, bytes] | None:
        """The member and its raw 32-byte verify key, or None for an unknown handle."""
        found = self._members.get(handle)
        if found is not None:
            return found
        if handle in self._unknown:
            self._unknown.move_to_end(handle)
            return None
        version = self._version
        mb = await self.store.get_member(handle)
        if mb is None:
            if self._version == version:  # no member change while it was read: still no one's
                self._unknown[handle] = None
                if len(self._unknown) > MAX_UNKNOWN:
                    self._unknown.popitem(last=False)
            return None
        found = (mb, bytes(nacl.signing.VerifyKey(mb.sign_pub)))  # VerifyKey: a key of the wrong size fails here
        if self._version == version:  # nothing changed while it was read: the entry is current
            self._members[handle] = found
        return found

    def __len__(self) -> int:
        return len(self._members)


def unauthorized(detail: str, reason: str = "other", kind: str = "invalid-signature") -> Problem:
    """The 401 of a refused signature; ``reason`` (one of unibus.metrics.SIGNATURE_REJECTION_REASONS)
    is counted, never sent: the client gets ``detail``."""
    problem = Problem(401, detail, kind=kind, headers={"WWW-Authenticate": 'Signature alg="ed25519"'})
    problem.reason = reason  # type: ignore[attr-defined]
    return problem


#: The 401 detail of a request signed before the nonce bucket was lost (docs/http-api.md).
NONCE_LOST = ("signed before replay protection restarted (the nonce store was lost and made again): its nonce may "
              "have been used, so it is refused as a replay would be; sign it again")

#: The 401 detail of a request signed for another deployment (its ``tag``).
OTHER_DEPLOYMENT = ("signed for another deployment: the signature's tag is not this server's trust root "
                    "(the fingerprint of entry 0 of its membership log)")


class Authenticator:
    def __init__(self, directory: MemberDirectory, nonces: NonceStore, skew: int) -> None:
        self.directory = directory
        self.nonces = nonces
        self.skew = skew
        self._root: str | None = None  # entry 0's hash, once there is one (it never changes while serving)

    async def trust_root(self) -> str | None:
        if self._root is None:
            self._root = await self.directory.store.log_hash_at(0)
        return self._root

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
            raise unauthorized(e.reason, e.kind) from None
        # A cached member costs no coroutine (the hot path: docs/benchmarks.md, "Signed requests").
        # A keyid that cannot be a handle is no one's, without a look at the store or the
        # directory's memory of unknown handles (an 8,000-character keyid took 8 KB of it).
        found = self.directory.cached(pending.keyid) or (
            await self.directory.get(pending.keyid) if HANDLE_RE.match(pending.keyid) else None)
        if found is None:
            with contextlib.suppress(SignatureError):
                pending.verify(_DUMMY_RAW)
            raise unauthorized(BAD_SIGNATURE, "bad_signature")
        member, verify_key = found
        try:
            verified = pending.verify(verify_key)
        except SignatureError:
            raise unauthorized(BAD_SIGNATURE, "bad_signature") from None
        # A request a client bound to its deployment (docs/http-api.md, "Signed requests"):
        # lifted from one server's log, it is refused by every other.
        if pending.tag is not None and pending.tag != (self._root or await self.trust_root()):
            raise unauthorized(OTHER_DEPLOYMENT, "other")
        return member, verified

    async def authenticate(self, request: web.Request, body: bytes | None) -> Member:
        """Steps 1-3 of the module docstring. ``body`` is ``None`` while the
        body is unread (the caller then compares ``request[SIGNATURE_KEY].content_sha256``
        with what it reads), ``b""`` for a request without a body."""
        now = time.time()
        member, verified = await self.verify(request.method, request.raw_path, request.headers, body, now)
        nonces = self.nonces
        try:
            if not nonces.admitted(verified.created):  # else the epoch, floor and mark need a look (or a write)
                await nonces.admit(verified.created, now)
            fresh = await nonces.claim(member.handle, verified.nonce)
        except ReplayFloorError as e:
            if e.before_epoch:  # signed before the nonces were lost: cannot be told from a replay
                problem = unauthorized(NONCE_LOST, "replay", kind="nonce-lost")
                problem.headers["Retry-After"] = str(e.retry_after)  # a clock behind: when to sign again
                raise problem from None
            raise Problem(503, f"replay protection restarted (the nonce store was lost and made again): a request "
                          f"created at or before {e.floor} cannot be checked for replay; sign it again in "
                          f"{e.retry_after} s", kind="nonce-store-unavailable",
                          headers={"Retry-After": str(e.retry_after)}) from None
        except NonceStoreUnavailable as e:
            log.warning("failing closed: %s", e)
            raise Problem(503, "replay protection is unavailable (the nonce store cannot be written); try again",
                          kind="nonce-store-unavailable", headers={"Retry-After": "1"}) from None
        if not fresh:
            raise unauthorized("replayed nonce: this (keyid, nonce) was already used", "replay")
        if verified.created < time.time() - self.skew:
            # Claimed after its window closed (it waited for a lost bucket to be made again): a
            # nonce kept only as long as its request is fresh may have expired by then, so the
            # claim proves nothing. A review replayed a request carried over from 0.11 that way.
            raise unauthorized("signature expired (created is too old)", "expired")
        request[MEMBER_KEY] = member
        request[SIGNATURE_KEY] = verified
        request[AUTH_TIME_KEY] = now
        return member


# --------------------------------------------------------------------------- the body, after the signature


def _timeout_problem(timeout: float, what: str) -> Problem:
    return Problem(408, f"{what} did not arrive within {timeout:g} s", kind="request-timeout")


def too_large(limit: int, length: int | None = None) -> Problem:
    said = f"the request body is {length} bytes" if length is not None else "the request body is too large"
    return Problem(413, f"{said}; this server reads at most {limit} bytes", kind="request-entity-too-large",
                   max_bytes=limit)


async def send_continue(request: web.BaseRequest, *, without_body: bool = False) -> None:
    """Send ``100 Continue`` if the client asked for it (``Expect: 100-continue``), once,
    and only for a request with a body unless ``without_body`` (what aiohttp does).

    Signed routes defer aiohttp's automatic ``100 Continue`` (unibus.app's
    ``defer_continue``) until the signature was accepted, so that a client
    that waits for it never sends a body that is answered 401.
    """
    if request.get(_CONTINUE_SENT) or request.version < (1, 1):
        return
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue" or (
            request.content.is_eof() and not without_body):
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
    except (HttpProcessingError, web.RequestPayloadError, ConnectionError) as e:
        raise unreadable_body(e) from None


async def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The body of a streamed upload, chunk by chunk, for a handler marked
    :data:`STREAMING_ATTR`: each chunk must come within the body timeout of the
    previous one (408), a body whose HTTP framing is broken is 400. The caller
    hashes what it gets and compares with ``request[SIGNATURE_KEY].content_sha256``."""
    timeout = request.get(BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT)
    await send_continue(request)
    content = request.content
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await content.readany()
        except TimeoutError:
            raise _timeout_problem(timeout, "the next part of the request body") from None
        except (HttpProcessingError, web.RequestPayloadError, ConnectionError) as e:
            raise unreadable_body(e) from None
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
                    max_body: int = MAX_BODY, member_requests: Any = None) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Authenticate every request of a signed route, then read and check its body (docs/http-api.md).

    ``member_requests`` (:class:`unibus.connlimits.MemberRequests`) counts each member's
    requests in progress, from authentication until the response was sent (here, under the
    send deadline), and refuses one past the member's share of the listener (429) before
    its body is read.
    """
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> web.StreamResponse:
        request[BODY_TIMEOUT_KEY] = body_timeout  # for the handler, and for sending the response (a 401 too)
        if not request.path.startswith("/v1/") and _open_route(request):
            if (request.body_exists and request.match_info.http_exception is None
                    and not getattr(request.match_info.handler, STREAMING_ATTR, False)):
                # An open route that takes a body (a plugin's) reads it under the same deadline and
                # limit as a signed one: without, an anonymous client trickling a body held its
                # connection busy for good, beyond the idle deadline's reach (red team).
                await read_body(request, timeout=body_timeout, limit=max_body)
            return await handler(request)
        has_body = request.body_exists
        # Steps 1-3, from the headers: not one byte of the body is read before them.
        await authenticator.authenticate(request, None if has_body else b"")
        handle = request[MEMBER_KEY].handle
        transport = request.transport  # the connection: never pushed out while it serves this request
        if member_requests is not None:
            member_requests.enter(handle, transport)  # 429 when this member holds its share of the listener
        # The store's writes serve this member: its share of the node's turns (unibus.store.turns).
        serving = store_writer.set(handle)
        try:
            if not has_body or request.match_info.http_exception is not None:
                # No body, or an unknown route (404/405): the body is never read, and the
                # logged request is made only if a handler asks (logged_request).
                response = await handler(request)
            else:
                # Every field line and every coding in it: a second line "gzip" after "identity" is a coding too.
                codings = {c.strip().lower() for line in request.headers.getall(hdrs.CONTENT_ENCODING, ())
                           for c in line.split(",")}
                if codings - {"identity"}:
                    raise Problem(415, "request bodies must not have a Content-Encoding; send them as they are",
                                  kind="unsupported-content-encoding")
                if getattr(request.match_info.handler, STREAMING_ATTR, False):
                    request[LOGGED_REQUEST_KEY] = _logged(request, None)  # never logged: the body is not kept here
                    response = await handler(request)  # it reads the body itself (body_chunks)
                else:
                    body = await read_body(request, timeout=body_timeout, limit=max_body)
                    expected = request[SIGNATURE_KEY].content_sha256
                    if expected is None or not hmac.compare_digest(expected, hashlib.sha256(body).digest()):
                        raise unauthorized("Content-Digest does not match the body", "digest")
                    request[LOGGED_REQUEST_KEY] = _logged(request, body)
                    response = await handler(request)
            if not isinstance(response, web.StreamResponse):
                from .app import _checked  # unibus.app imports this module

                _checked(request, response)  # a TypeError naming the route and its plugin (a 500), not sent here
            if member_requests is not None:
                await member_requests.send(request, response, body_timeout)  # still counted while it goes out
            return response
        finally:
            store_writer.reset(serving)
            if member_requests is not None:
                member_requests.leave(handle, transport)

    return middleware


def logged_request(request: web.Request) -> LoggedRequest:
    """What the verifier checked, as the membership log records it: ``request[LOGGED_REQUEST_KEY]``,
    made here for a request without a body (the auth middleware makes it only when it read one)."""
    found = request.get(LOGGED_REQUEST_KEY)
    if found is None:
        found = request[LOGGED_REQUEST_KEY] = _logged(request, None)
    return found


def _logged(request: web.Request, body: bytes | None) -> LoggedRequest:
    path, query = split_path_query(request.raw_path)
    headers = request.headers
    # The digest is part of the record only when the signature covered it.
    digest = header_value(headers, "content-digest") if request[SIGNATURE_KEY].content_sha256 is not None else None
    return LoggedRequest(method=request.method, path=path, query=query, content_digest=digest,
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
