"""Transactions on the KV bucket: conditional reads and writes, atomic batches, bounded retries.

Every write is conditional on the revision it read (``Nats-Expected-Last-Subject-Sequence``;
0 for "never written", the tombstone's revision for a deleted key). A change that
touches several keys is one JetStream *atomic batch* (nats-server >= 2.12, stream
option ``allow_atomic``): the server checks every condition at commit, under its
lock, and stores all of the batch or none of it — on R1 and on R3 alike. So there
is no intermediate state for a crash to leave behind and no interleaving of two
writers through two nodes: the loser's batch is rejected whole, re-reads and
retries (bounded), and ends as a :class:`Conflict` if the rule it checks now fails
(docs/store.md, "Each operation").

:class:`KvBucket` is that machinery, with the bucket's creation and health; the
domain store (:class:`unibus.store.kv.KvStore`) builds every operation on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import APIError
from nats.js.errors import NotFoundError as JsNotFoundError

from ..aio import within
from .base import Conflict, Store, StoreUnavailable
from .kv_layout import STATE_BUCKET
from .turns import Turns, writer

log = logging.getLogger("unibus.store.kv")

T = TypeVar("T")

#: JetStream's limit on the messages of one atomic batch.
MAX_BATCH = 1000
#: A write that keeps losing its compare-and-set this many times ends in Conflict.
MAX_ATTEMPTS = 12
#: Seconds a scan of a key prefix (every room, every member) may take while it makes progress.
SCAN_BUDGET = 60.0
#: Own revisions remembered for the watch (it tells them from other nodes' writes).
OWN_REVISIONS = 8192
#: Atomic batches one store sends at once; the others wait their turn. nats-server takes
#: at most 50 in flight per stream (``jetstream.limits.batch.max_inflight_per_stream``) and
#: refuses the next (``TOO_MANY_BATCHES``): one member's parallel room writes filled it, and
#: every other write, a deletion's clean-up included, failed (a review). 16 per node keeps a
#: three-node cluster under it. A member holds at most half of them at once, and a turn given
#: back goes to the writer holding the fewest (:mod:`unibus.store.turns`).
BATCHES_IN_FLIGHT = 16

#: Seconds nats-server keeps a batch that was started and never committed
#: (``jetstream.limits.batch.timeout``, 10 s by default): a slot whose batch was cut short
#: (a timeout, a cancellation) is given back only then, or this node's 16 would be more than
#: the server's share (a review: 48 cut short, then the next 16 refused).
SERVER_BATCH_TIMEOUT = 10.0

WRONG_LAST_SEQUENCE = (10071, 10164)
#: "atomic publish too many inflight" (HTTP 429): nats-server answers a batch's first message
#: so, before storing anything, and nothing more of it is sent; the batch is sent again after a
#: pause, until the store's ``timeout`` has passed since the first try.
TOO_MANY_BATCHES = 10210
STREAM_NAME_IN_USE = 10058
NO_MESSAGE_FOUND = 10037
KV_OP = "KV-Operation"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"


async def _none() -> tuple[None, int]:
    return None, 0


class _CasLost(Exception):
    """A conditional write lost to a concurrent one: re-read and retry."""


@dataclass
class _Slot:
    """A batch slot: ``open`` while the server may hold a batch of it (sent, not yet answered)."""
    open: bool = False


class _NoAtomicBatches(Exception):
    """The server stored the first message of a batch by itself: it does not do atomic batches."""


@dataclass(frozen=True)
class _Write:
    key: str
    value: dict[str, Any] | None  # None: delete (a KV tombstone)
    last: int  # the revision read: the write applies only if the key is still at it
    raw: bytes | None = None  # stored as given, instead of ``value`` as JSON (log entries)


def _wire_size(data: bytes, hdrs: dict[str, str]) -> int:
    """What nats-server counts against ``max_payload`` for a message: its headers as nats-py
    writes them (``NATS/1.0``, a line per header, an empty line) and its payload."""
    return (len(data) + len(b"NATS/1.0\r\n\r\n")
            + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in hdrs.items()))


def _reply(reply: Any) -> dict[str, Any]:
    return json.loads(reply.data) if reply.data else {}


class KvBucket(Store):
    """The state bucket's reads, conditional writes and scans, for the KV store built on it.

    ``js`` is a nats-py JetStream context (``Bus.js``). Every call is bounded by
    ``timeout`` seconds; when JetStream cannot answer (no connection, no stream
    leader, no quorum) it raises :class:`StoreUnavailable` — the HTTP layer's 503.
    """

    def __init__(self, js: JetStreamContext, *, replicas: int = 1, timeout: float = 2.0,
                 bucket: str = STATE_BUCKET) -> None:
        super().__init__()
        self.js = js
        self.replicas = replicas
        self.timeout = timeout
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        # The revisions this instance wrote: the watch does not report them as "remote".
        self._own: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._turns = Turns(BATCHES_IN_FLIGHT)

    @property
    def _nc(self) -> Any:
        return getattr(self.js, "_nc", None)

    def _check_connected(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise StoreUnavailable("not connected to NATS")

    async def _io(self, aw: Awaitable[T], what: str, timeout: float | None = None) -> T:
        """Await one JetStream call within ``timeout`` (the store's, by default); map failures to
        StoreUnavailable."""
        try:
            return await within(aw, self.timeout if timeout is None else timeout)
        except nats.errors.MaxPayloadError:
            raise Conflict(f"{what}: the record is larger than NATS allows in one message") from None
        except APIError as e:
            if e.err_code in WRONG_LAST_SEQUENCE:
                raise _CasLost() from None
            raise StoreUnavailable(f"{what}: JetStream refused: {e.description or e}") from None
        except (TimeoutError, nats.errors.Error, OSError) as e:
            raise StoreUnavailable(f"{what}: {type(e).__name__} {e}".rstrip()) from None

    # -- reads -----------------------------------------------------------------------

    async def _read(self, key: str) -> tuple[dict[str, Any] | None, int]:
        """``(value, revision)``: revision is 0 for a key never written, the tombstone's for a deleted one."""
        raw, rev = await self._read_raw(key)
        return (json.loads(raw) if raw is not None else None), rev

    async def _read_raw(self, key: str) -> tuple[bytes | None, int]:
        """``(stored bytes, revision)`` of ``key``, as :meth:`_read`."""
        self._check_connected()

        async def get() -> Any:
            try:
                return await self.js.get_msg(self.stream, subject=self._prefix + key, direct=False)
            except JsNotFoundError as e:
                if e.err_code == NO_MESSAGE_FOUND:
                    return None
                raise

        msg = await self._io(get(), f"read {key}")
        if msg is None:
            return None, 0
        hdrs = msg.headers or {}
        if hdrs.get(KV_OP) in ("DEL", "PURGE"):
            return None, msg.seq
        return bytes(msg.data), msg.seq

    async def _scan(self, prefix: str) -> dict[str, tuple[dict[str, Any], int]]:
        """Every live key under ``prefix`` (``"member"``, ``"room"``...): ``{key: (value, revision)}``."""
        self._check_connected()
        # Bounded by progress, not by its length: a scan fails once no message came for
        # ``timeout``, or after SCAN_BUDGET. A fixed 2 s failed every scan of a bucket of about
        # 80,000 rooms, which one member can make: its deletion and bus authorization's load
        # with them (docs/store.md, "Failure: fail fast, fail closed").
        found, _newest = await self._io(self._last_messages(f"{prefix}.>", 2.0, stall=self.timeout),
                                        f"list {prefix}", timeout=max(self.timeout, SCAN_BUDGET))
        return {key: (json.loads(raw), rev) for key, (raw, rev) in found.items()}

    async def _last_messages(self, keys: str, inactive: float,
                             stall: float | None = None) -> tuple[dict[str, tuple[bytes, int]], int]:
        """The last message of every key matching ``keys`` (a subject filter below the bucket's
        prefix): ``({key: (stored bytes, revision)} of live keys, the largest stream sequence
        delivered, tombstones included)``. With ``stall``, :class:`TimeoutError` when no
        message comes for that many seconds.

        An ordered consumer delivering the last message of each subject. The
        end of the snapshot is the message whose ``num_pending`` is 0 — not
        nats-py's KV watch "initial values done" marker, which can come before
        messages already in flight.
        """
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            queue.put_nowait(msg)

        sub = await self.js.subscribe(self._prefix + keys, stream=self.stream, cb=on_msg, ordered_consumer=True,
                                      deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, inactive_threshold=inactive)
        try:
            info = await sub.consumer_info()
            out: dict[str, tuple[bytes, int]] = {}
            newest = 0
            if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                return out, newest  # nothing matched when the consumer was made
            while True:
                msg = await (within(queue.get(), stall) if stall is not None else queue.get())
                meta = msg.metadata
                key = msg.subject[len(self._prefix):]
                newest = max(newest, meta.sequence.stream)
                if (msg.headers or {}).get(KV_OP) in ("DEL", "PURGE"):
                    out.pop(key, None)
                else:
                    out[key] = (bytes(msg.data), meta.sequence.stream)
                if meta.num_pending == 0:
                    return out, newest
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- writes ----------------------------------------------------------------------

    def _encode(self, w: _Write) -> tuple[str, bytes, dict[str, str]]:
        hdrs = {EXPECTED_LAST_SUBJECT_SEQ: str(w.last)}
        if w.raw is not None:
            return self._prefix + w.key, w.raw, hdrs
        if w.value is None:
            hdrs[KV_OP] = "DEL"
            return self._prefix + w.key, b"", hdrs
        return self._prefix + w.key, json.dumps(w.value, separators=(",", ":"), sort_keys=True).encode(), hdrs

    def _messages(self, writes: list[_Write]) -> list[tuple[str, bytes, dict[str, str]]]:
        """``writes`` as the messages :meth:`_publish` sends: one, or an atomic batch's, each with
        the batch's headers."""
        msgs = [self._encode(w) for w in writes]
        if len(msgs) == 1:
            return msgs
        batch, last = uuid.uuid4().hex, len(msgs)
        return [(subject, data, {**hdrs, "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i),
                                 **({"Nats-Batch-Commit": "1"} if i == last else {})})
                for i, (subject, data, hdrs) in enumerate(msgs, 1)]

    async def _publish(self, writes: list[_Write], slot: _Slot | None = None) -> dict[str, Any]:
        """Send ``writes`` as one conditional publish or one atomic batch; the server's answer.
        ``slot.open`` says whether the server may still hold the batch when this ends."""
        slot = _Slot() if slot is None else slot
        nc = self._nc
        msgs = self._messages(writes)
        limit = getattr(nc, "max_payload", None)
        if isinstance(limit, int) and any(_wire_size(data, hdrs) > limit for _subject, data, hdrs in msgs):
            # Refused here, before the first message: nothing is sent, so a batch's turn comes back
            # at once (a review: a record past max_payload kept it for the server's 10 s). nats-py
            # checks the payload alone, and nats-server headers and payload together: a record a
            # few headers short of the limit was sent, and the server's -ERR closed the node's
            # connection for good (another review).
            raise nats.errors.MaxPayloadError
        if len(msgs) == 1:
            subject, data, hdrs = msgs[0]
            return _reply(await nc.request(subject, data, timeout=self.timeout, headers=hdrs))
        for i, (subject, data, hdrs) in enumerate(msgs, 1):
            if i == len(msgs):
                answer = _reply(await nc.request(subject, data, timeout=self.timeout, headers=hdrs))
                slot.open = False  # committed or refused: the server holds it no more
                return answer
            if i == 1:  # the server answers the first message: batching enabled or not
                slot.open = True  # from here until an answer says otherwise
                reply = await nc.request(subject, data, timeout=self.timeout, headers=hdrs)
                if reply.data:
                    slot.open = False
                    first = json.loads(reply.data)
                    if "error" in first:
                        return first
                    # A pub ack: the server stored the message on its own. Never go on.
                    raise _NoAtomicBatches()
            else:
                await nc.publish(subject, data, headers=hdrs)
        raise AssertionError("unreachable")

    async def _commit(self, writes: list[_Write]) -> int:
        """Write all of ``writes`` or none: one conditional publish, or one atomic batch. Returns
        the stream sequence of the last write: the revision its key has now."""
        if len(writes) > MAX_BATCH:
            raise Conflict(f"this change touches {len(writes)} keys; one atomic KV batch holds at most {MAX_BATCH}")
        self._check_connected()
        deadline = time.monotonic() + self.timeout
        for n in itertools.count():
            try:
                if len(writes) == 1:
                    ack = await self._io(self._publish(writes), "write")
                else:
                    async with self._batch_slot() as slot:
                        ack = await self._io(self._publish(writes, slot), "write")
            except _NoAtomicBatches:
                raise StoreUnavailable("this nats-server does not do atomic batch publishing (needs >= 2.12 "
                                       "and allow_atomic on the bucket's stream)") from None
            err = ack.get("error")
            if not err or err.get("err_code") != TOO_MANY_BATCHES or time.monotonic() >= deadline:
                break
            # Other writers (another node, a tool on the same bucket) fill the server's slots:
            # nothing of this batch was stored, so it is sent again.
            await asyncio.sleep(random.uniform(0, min(0.1, 0.002 * 2 ** n)))
        if err:
            if err.get("err_code") in WRONG_LAST_SEQUENCE:
                raise _CasLost()
            raise StoreUnavailable(f"JetStream refused the write: {err.get('description', err)}")
        seq, count = int(ack.get("seq", 0)), int(ack.get("count", 1))
        for s in range(seq - count + 1, seq + 1):
            self._own[s] = None
        while len(self._own) > OWN_REVISIONS:
            self._own.popitem(last=False)
        return seq

    @contextlib.asynccontextmanager
    async def _batch_slot(self) -> AsyncIterator[_Slot]:
        """A turn among :data:`BATCHES_IN_FLIGHT`, for the member this write serves
        (:data:`unibus.store.turns.writer`), waited for up to the store's ``timeout``; given
        back at once, or after :data:`SERVER_BATCH_TIMEOUT` when its batch was cut short."""
        who = writer.get()
        try:
            await self._turns.take(who, self.timeout)
        except TimeoutError:
            raise StoreUnavailable(f"write: no turn for an atomic batch in {self.timeout:g} s (a node sends "
                                   f"{BATCHES_IN_FLIGHT} at once, {self._turns.per_writer} for one member)") from None
        slot = _Slot()
        try:
            yield slot
        finally:
            if slot.open:
                asyncio.get_running_loop().call_later(SERVER_BATCH_TIMEOUT, self._turns.give_back, who)
            else:
                self._turns.give_back(who)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` (read, check, conditional write) until its write is not outraced."""
        for n in range(MAX_ATTEMPTS):
            try:
                return await attempt()
            except _CasLost:
                await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** n)))
        raise Conflict("concurrent updates kept changing this record; try again")

    # -- the bucket ------------------------------------------------------------------

    def bucket_config(self) -> KeyValueConfig:
        return KeyValueConfig(bucket=self.bucket, history=1, replicas=self.replicas, storage=StorageType.FILE,
                              description="unibus: members, rooms, room members and sealed room keys")

    async def _ensure_bucket(self) -> None:
        """Create the bucket if absent; raise its replicas in place and enable atomic batches if it exists.

        Replicas are only ever raised here (R1 → R3 keeps every message); a
        bucket with more replicas than asked is left alone, with a warning.
        """
        self._check_connected()

        async def create() -> None:
            try:
                await self.js.create_key_value(config=self.bucket_config())
            except APIError as e:
                # An existing bucket whose config differs (allow_atomic, replicas) is not an error.
                if e.err_code != STREAM_NAME_IN_USE:
                    raise

        await self._io(create(), "create bucket")
        info = await self._io(self.js.stream_info(self.stream), "bucket info")
        cfg = info.config
        changed = []
        if (cfg.num_replicas or 1) < self.replicas:
            changed.append(f"replicas {cfg.num_replicas or 1} -> {self.replicas}")
            cfg.num_replicas = self.replicas
        elif (cfg.num_replicas or 1) > self.replicas:
            log.warning("KV bucket %s has %d replicas, more than the %d asked for: left as it is",
                        self.bucket, cfg.num_replicas, self.replicas)
        if not cfg.allow_atomic:
            changed.append("atomic batches on")
            cfg.allow_atomic = True
        if changed:
            info = await self._io(self.js.update_stream(cfg), "update bucket")
            if not info.config.allow_atomic:
                raise StoreUnavailable("this nats-server does not support atomic batch publishing (needs >= 2.12)")
            log.info("KV bucket %s updated: %s", self.bucket, ", ".join(changed))

    async def available(self) -> bool:
        """The state bucket's stream answers within ``timeout`` and has a leader (a replica answers
        the info of a stream that lost its quorum, with no leader named)."""
        try:
            self._check_connected()
            info = await within(self.js.stream_info(self.stream), min(self.timeout, 1.0))
        except Exception:
            return False
        return info.cluster is None or bool(info.cluster.leader)

    async def status(self) -> dict[str, Any]:
        """The bucket's stream: replicas, messages, atomic batches, leader."""
        info = await self._io(self.js.stream_info(self.stream), "bucket info")
        return {"bucket": self.bucket, "replicas": info.config.num_replicas or 1,
                "allow_atomic": bool(info.config.allow_atomic), "messages": info.state.messages,
                "last_seq": info.state.last_seq,
                "leader": info.cluster.leader if info.cluster is not None else None}

    async def _last_seq(self) -> int:
        info = await self._io(self.js.stream_info(self.stream), "bucket info")
        return int(info.state.last_seq or 0)
