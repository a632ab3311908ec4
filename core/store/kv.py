"""The JetStream KV store: cluster-mode state in one KV bucket, written with atomic batches.

Layout (bucket ``unibus_state``, one JetStream stream ``KV_unibus_state``):

===============================  ==========================================================
key                              value (JSON)
===============================  ==========================================================
``member.<handle>``              ``{handle, role, sign_pub, enc_pub, enc_suite, created_at, bus_pub}``
``sign.<hex sign_pub>``          ``{handle}`` — the uniqueness index of signing keys
``bus.<nkey>``                   ``{handle, key: "bus"|"sign"}`` — every NATS identity a member's
                                 keys map to: its bus key, and its signing key as an nkey
                                 (reserved, so it can never become anyone's bus key)
``meta.admins``                  ``{admins: [handles]}`` — the last-admin guard
``meta.schema``                  ``{version: 1}``
``room.<room_id>``               ``{room_id, name, owner, epoch, rekey_required, created_at,
                                 members: [handles], sealed: {handle: [first, last]}}``
``keys.<room_id>.<epoch>``       ``{room_id, epoch, sealed: {handle: base64}, sigs: {handle: base64},
                                 sealer, log_head: {seq, hash}}`` (no sigs/sealer/log_head
                                 before 0.12)
``log.<seq>``                    an entry of the membership log: its RFC 8785 canonical JSON text
``meta.loghead``                 ``{seq, hash, max_created}`` — the log's head, and the largest
                                 ``created`` of a request in it
``lognonce.<keyid>.<nonce>``     ``{seq}`` — a (keyid, nonce) in the log (each at most once)
``meta.nonce_high_water``        ``{created}`` — no signed request was accepted with a larger
                                 ``created`` (docs/operations.md, "Durability")
===============================  ==========================================================

A logged change (``logged=``) adds to its batch the entry ``log.<seq>``, its
``lognonce.`` key (created only if absent) and ``meta.loghead``, conditional
on the head revision it read: every logged change through every node is
serialised by that head, and the log cannot fork (docs/store.md).

Every write is conditional on the revision it read (``Nats-Expected-Last-Subject-Sequence``;
0 for "never written", the tombstone's revision for a deleted key). A change that
touches several keys is one JetStream *atomic batch* (nats-server >= 2.12, stream
option ``allow_atomic``): the server checks every condition at commit, under its
lock, and stores all of the batch or none of it — on R1 and on R3 alike. So there
is no intermediate state for a crash to leave behind and no interleaving of two
writers through two nodes: the loser's batch is rejected whole, re-reads and
retries (bounded), and ends as a :class:`Conflict` if the rule it checks now fails.

Where a reference must stay valid (a room's member, a room's owner at creation), the
batch also rewrites the referenced member record unchanged with its revision as
condition (a "touch"): a concurrent ``delete_member`` then loses, or makes this
write lose. ``docs/store.md`` lists each operation's batch and its crash behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import APIError
from nats.js.errors import NotFoundError as JsNotFoundError

from .base import (
    Change,
    Conflict,
    KeyPackage,
    LogRecord,
    LogRejected,
    Member,
    Membership,
    NotFound,
    Room,
    Store,
    StoreUnavailable,
    actor_of,
    check_appendable,
    entry_text,
    member_state,
    room_state,
    room_state_of,
    snapshot_member,
    snapshot_room,
)
from ..wire import KeyFormatError, nkey_from_sign_pub, sign_pub_from_nkey
from ..memberlog import snapshot_entry
from .sqlite import new_room_id

log = logging.getLogger("unibus.store.kv")

T = TypeVar("T")

STATE_BUCKET = "unibus_state"
SCHEMA_VERSION = 1
#: JetStream's limit on the messages of one atomic batch.
MAX_BATCH = 1000
#: A write that keeps losing its compare-and-set this many times ends in Conflict.
MAX_ATTEMPTS = 12
#: Remote changes seen by the watch within this window become one ``reloaded``.
WATCH_DEBOUNCE = 0.05

WRONG_LAST_SEQUENCE = (10071, 10164)
STREAM_NAME_IN_USE = 10058
NO_MESSAGE_FOUND = 10037
KV_OP = "KV-Operation"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_PART = re.compile(r"^[-_=a-zA-Z0-9]+$")  # one token of a key: no dots, nothing KV refuses


async def _none() -> tuple[None, int]:
    return None, 0


class _CasLost(Exception):
    """A conditional write lost to a concurrent one: re-read and retry."""


class _NoAtomicBatches(Exception):
    """The server stored the first message of a batch by itself: it does not do atomic batches."""


@dataclass(frozen=True)
class _Write:
    key: str
    value: dict[str, Any] | None  # None: delete (a KV tombstone)
    last: int  # the revision read: the write applies only if the key is still at it
    raw: bytes | None = None  # stored as given, instead of ``value`` as JSON (log entries)


@dataclass(frozen=True)
class _LogPosition:
    """Where the next log entry goes, and the revisions its batch is conditional on."""

    seq: int
    prev: str
    head_rev: int
    max_created: int
    nonce_rev: int


def _b64d(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"), validate=True)


def _b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _ts(s: str) -> datetime:
    ts = datetime.fromisoformat(s)
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _member_json(m: Member) -> dict[str, Any]:
    created = m.created_at if m.created_at.tzinfo else m.created_at.replace(tzinfo=UTC)
    return {"handle": m.handle, "role": m.role, "sign_pub": _b64e(m.sign_pub), "enc_pub": _b64e(m.enc_pub),
            "enc_suite": m.enc_suite, "created_at": created.isoformat(), "bus_pub": m.bus_pub}


def _member(d: dict[str, Any]) -> Member:
    return Member(d["handle"], d["role"], _b64d(d["sign_pub"]), _b64d(d["enc_pub"]), d["enc_suite"],
                  _ts(d["created_at"]), d.get("bus_pub"))


def _keys_record(room_id: str, epoch: int, sealed: dict[str, bytes], sigs: dict[str, bytes] | None,
                 sealer: str | None, log_head: dict[str, Any] | None) -> dict[str, Any]:
    """The ``keys.<room>.<epoch>`` record; the key package fields only when there are some (0.12)."""
    record: dict[str, Any] = {"room_id": room_id, "epoch": epoch,
                              "sealed": {h: _b64e(v) for h, v in sorted(sealed.items())}}
    if sigs:
        record["sigs"] = {h: _b64e(v) for h, v in sorted(sigs.items())}
    if sealer is not None and log_head is not None:
        record["sealer"] = sealer
        record["log_head"] = {"seq": int(log_head["seq"]), "hash": str(log_head["hash"])}
    return record


def _valid(*parts: str) -> bool:
    return all(isinstance(p, str) and _PART.match(p) for p in parts)


def _mkey(handle: str) -> str:
    return f"member.{handle}"


def _skey(sign_pub: bytes) -> str:
    return f"sign.{sign_pub.hex()}"


def _bkey(nkey: str) -> str:
    return f"bus.{nkey}"


def _sign_key_of_nkey(nkey: str) -> str | None:
    """``sign.<hex>`` of the raw key inside a user nkey (None if it is not one)."""
    try:
        return _skey(sign_pub_from_nkey(nkey))
    except KeyFormatError:
        return None


def _rkey(room_id: str) -> str:
    return f"room.{room_id}"


def _kkey(room_id: str, epoch: int) -> str:
    return f"keys.{room_id}.{epoch}"


def _lkey(seq: int) -> str:
    return f"log.{seq}"


def _nonce_key(keyid: str, nonce: str) -> str:
    return f"lognonce.{keyid}.{nonce}"


ADMINS_KEY = "meta.admins"
HIGH_WATER_KEY = "meta.nonce_high_water"
SCHEMA_KEY = "meta.schema"
LOG_HEAD_KEY = "meta.loghead"
#: Log entries read at once by ``log_entries``.
LOG_READ_CHUNK = 64


@dataclass(frozen=True)
class KvSnapshot:
    """The live keys of the state bucket as of stream sequence ``seq`` (:meth:`KvStore.snapshot`).

    ``entries`` maps each key to its stored bytes and revision. ``exact``: no
    write at all happened while it was read.
    """

    seq: int
    entries: dict[str, tuple[bytes, int]]
    exact: bool
    attempts: int = 1


def _snapshot_complete(entries: dict[str, tuple[bytes, int]]) -> bool:
    """What a purge during a read could have taken is there: every log entry up to the
    head, and every sealed epoch that a live room's ranges cover."""
    try:
        head = json.loads(entries[LOG_HEAD_KEY][0]) if LOG_HEAD_KEY in entries else None
        if head is not None and any(_lkey(q) not in entries for q in range(int(head["seq"]) + 1)):
            return False
        for key, (raw, _rev) in entries.items():
            if not key.startswith("room."):
                continue
            room = json.loads(raw)
            epochs = {e for first, last in room.get("sealed", {}).values() for e in range(int(first), int(last) + 1)}
            if any(_kkey(room["room_id"], e) not in entries for e in epochs):
                return False
    except (ValueError, KeyError, TypeError):
        return False  # unreadable: let the exact read decide
    return True


class KvStore(Store):
    """Members, rooms, room members and sealed keys in a JetStream KV bucket.

    ``js`` is a nats-py JetStream context (``Bus.js``). Every call is bounded by
    ``timeout`` seconds; when JetStream cannot answer (no connection, no stream
    leader, no quorum) it raises :class:`StoreUnavailable` — the HTTP layer's 503.
    """

    cluster_wide = True

    def __init__(self, js: JetStreamContext, *, replicas: int = 1, timeout: float = 2.0,
                 bucket: str = STATE_BUCKET) -> None:
        super().__init__()
        self.js = js
        self.replicas = replicas
        self.timeout = timeout
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        # The watch: revisions this instance wrote (not "remote"), and its tasks.
        self._own: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._seen: list[tuple[int, str]] = []  # (stream seq, key); seq -1: maybe missed something
        self._kick = asyncio.Event()
        self._closing = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        #: Set while the watch subscription is live (tests and the daemon wait on it).
        self.watch_ready = asyncio.Event()
        #: (Re)subscriptions after the first, and the watched revisions by origin.
        self.watch_restarts = 0
        self.watch_stats = {"own": 0, "remote": 0, "reported": 0}

    # -- plumbing --------------------------------------------------------------

    @property
    def _nc(self) -> Any:
        return getattr(self.js, "_nc", None)

    def _check_connected(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise StoreUnavailable("not connected to NATS")

    async def _io(self, aw: Awaitable[T], what: str) -> T:
        """Await one JetStream call within ``timeout``; map failures to StoreUnavailable."""
        try:
            return await asyncio.wait_for(aw, self.timeout)
        except nats.errors.MaxPayloadError:
            raise Conflict(f"{what}: the record is larger than NATS allows in one message") from None
        except APIError as e:
            if e.err_code in WRONG_LAST_SEQUENCE:
                raise _CasLost() from None
            raise StoreUnavailable(f"{what}: JetStream refused: {e.description or e}") from None
        except (TimeoutError, nats.errors.Error, OSError) as e:
            raise StoreUnavailable(f"{what}: {type(e).__name__} {e}".rstrip()) from None

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

    async def _commit(self, writes: list[_Write]) -> None:
        """Write all of ``writes`` or none: one conditional publish, or one atomic batch."""
        if len(writes) > MAX_BATCH:
            raise Conflict(f"this change touches {len(writes)} keys; one atomic KV batch holds at most {MAX_BATCH}")
        self._check_connected()
        nc = self._nc

        def encode(w: _Write) -> tuple[str, bytes, dict[str, str]]:
            hdrs = {EXPECTED_LAST_SUBJECT_SEQ: str(w.last)}
            if w.raw is not None:
                return self._prefix + w.key, w.raw, hdrs
            if w.value is None:
                hdrs[KV_OP] = "DEL"
                return self._prefix + w.key, b"", hdrs
            return self._prefix + w.key, json.dumps(w.value, separators=(",", ":"), sort_keys=True).encode(), hdrs

        async def publish() -> dict[str, Any]:
            msgs = [encode(w) for w in writes]
            if len(msgs) == 1:
                subject, data, hdrs = msgs[0]
                reply = await nc.request(subject, data, timeout=self.timeout, headers=hdrs)
                return json.loads(reply.data) if reply.data else {}
            batch = uuid.uuid4().hex
            last = len(msgs)
            for i, (subject, data, hdrs) in enumerate(msgs, 1):
                hdrs = {**hdrs, "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i)}
                if i == last:
                    hdrs["Nats-Batch-Commit"] = "1"
                    reply = await nc.request(subject, data, timeout=self.timeout, headers=hdrs)
                    return json.loads(reply.data) if reply.data else {}
                if i == 1:  # the server answers the first message: batching enabled or not
                    reply = await nc.request(subject, data, timeout=self.timeout, headers=hdrs)
                    if reply.data:
                        first = json.loads(reply.data)
                        if "error" in first:
                            return first
                        # A pub ack: the server stored the message on its own. Never go on.
                        raise _NoAtomicBatches()
                else:
                    await nc.publish(subject, data, headers=hdrs)
            raise AssertionError("unreachable")

        try:
            ack = await self._io(publish(), "write")
        except _NoAtomicBatches:
            raise StoreUnavailable("this nats-server does not do atomic batch publishing (needs >= 2.12 "
                                   "and allow_atomic on the bucket's stream)") from None
        err = ack.get("error")
        if err:
            if err.get("err_code") in WRONG_LAST_SEQUENCE:
                raise _CasLost()
            raise StoreUnavailable(f"JetStream refused the write: {err.get('description', err)}")
        seq, count = int(ack.get("seq", 0)), int(ack.get("count", 1))
        for s in range(seq - count + 1, seq + 1):
            self._own[s] = None
        while len(self._own) > 8192:
            self._own.popitem(last=False)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` (read, check, conditional write) until its write is not outraced."""
        for n in range(MAX_ATTEMPTS):
            try:
                return await attempt()
            except _CasLost:
                await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** n)))
        raise Conflict("concurrent updates kept changing this record; try again")

    async def _scan(self, prefix: str) -> dict[str, tuple[dict[str, Any], int]]:
        """Every live key under ``prefix`` (``"member"``, ``"room"``...): ``{key: (value, revision)}``.

        An ordered consumer delivering the last message of each subject. The
        end of the snapshot is the message whose ``num_pending`` is 0 — not
        nats-py's KV watch "initial values done" marker, which can come before
        messages already in flight.
        """
        self._check_connected()

        async def scan() -> dict[str, tuple[dict[str, Any], int]]:
            queue: asyncio.Queue[Any] = asyncio.Queue()

            async def on_msg(msg: Any) -> None:
                queue.put_nowait(msg)

            sub = await self.js.subscribe(f"{self._prefix}{prefix}.>", stream=self.stream, cb=on_msg,
                                          ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                                          inactive_threshold=2.0)
            try:
                info = await sub.consumer_info()
                out: dict[str, tuple[dict[str, Any], int]] = {}
                if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                    return out  # nothing under the prefix when the consumer was made
                while True:
                    msg = await queue.get()
                    meta = msg.metadata
                    key = msg.subject[len(self._prefix):]
                    if (msg.headers or {}).get(KV_OP) in ("DEL", "PURGE"):
                        out.pop(key, None)
                    else:
                        out[key] = (json.loads(msg.data), meta.sequence.stream)
                    if meta.num_pending == 0:
                        return out
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

        return await self._io(scan(), f"list {prefix}")

    # -- the membership log ----------------------------------------------------------

    async def _log_position(self, logged: LogRecord | None) -> _LogPosition | None:
        """Read the head (writing entry 0 first if the bucket has state but no log) and
        check ``logged`` against the log; None when nothing is to be logged."""
        if logged is None:
            return None
        if not _valid(logged.keyid, logged.nonce):  # handles and nonces are KV-safe: this is a bug guard
            raise LogRejected("this keyid or nonce cannot be recorded in the membership log")
        (head, hrev), (seen, nrev) = await asyncio.gather(self._read(LOG_HEAD_KEY),
                                                          self._read(_nonce_key(logged.keyid, logged.nonce)))
        if head is None:
            if await self._write_root():
                raise _CasLost()  # the log has its entry 0 now: read the head again
            head = {"seq": -1, "hash": "", "max_created": 0}
        max_created = int(head.get("max_created", 0))
        check_appendable(logged, max_created, seen is not None)
        return _LogPosition(int(head["seq"]) + 1, str(head["hash"]), hrev, max_created, nrev)

    @staticmethod
    def _log_writes(pos: _LogPosition | None, logged: LogRecord | None, result: dict[str, Any]) -> list[_Write]:
        """The writes that append ``logged``'s entry at ``pos``: entry, nonce, head (conditional on the head read)."""
        if pos is None or logged is None:
            return []
        digest, text = logged.entry(pos.seq, pos.prev, result)
        head = {"seq": pos.seq, "hash": digest, "max_created": max(pos.max_created, logged.created)}
        return [_Write(_lkey(pos.seq), None, 0, raw=text.encode("utf-8")),
                _Write(_nonce_key(logged.keyid, logged.nonce), {"seq": pos.seq}, pos.nonce_rev),
                _Write(LOG_HEAD_KEY, head, pos.head_rev)]

    async def _write_root(self) -> bool:
        """Entry 0, a snapshot of the bucket's state, when the bucket has members but no log
        (a cluster upgraded from 0.11). True when the log has a head afterwards."""
        head, hrev = await self._read(LOG_HEAD_KEY)
        if head is not None:
            return True
        members, rooms = await asyncio.gather(self._scan("member"), self._scan("room"))
        if not members:
            return False
        ms = sorted((_member(v) for v, _rev in members.values()), key=lambda m: m.handle)
        known = frozenset(m.handle for m in ms)
        entry = snapshot_entry(int(time.time()), [snapshot_member(m) for m in ms],
                               [snapshot_room(v["room_id"], v["name"], v.get("owner", ""), v["epoch"],
                                              v["rekey_required"], set(v["members"]), known)
                                for v, _rev in rooms.values()])
        digest, text = entry_text(entry)
        try:
            # Conditional on no head and no entry 0: of two nodes starting at once, one writes it.
            await self._commit([_Write(_lkey(0), None, 0, raw=text.encode("utf-8")),
                                _Write(LOG_HEAD_KEY, {"seq": 0, "hash": digest, "max_created": 0}, hrev)])
            log.info("membership log: wrote entry 0 (snapshot of %d members, %d rooms); trust root fingerprint %s",
                     len(ms), len(rooms), digest)
        except _CasLost:
            head, _hrev = await self._read(LOG_HEAD_KEY)
            if head is None:
                raise StoreUnavailable(f"KV bucket {self.bucket} has membership log entries but no head (an "
                                       "interrupted membershipd migrate-to-kv?): run migrate-to-kv again") from None
        return True

    async def log_head(self) -> tuple[int, str]:
        head, _rev = await self._read(LOG_HEAD_KEY)
        return (int(head["seq"]), str(head["hash"])) if head is not None else (-1, "")

    async def log_entries(self, after: int = -1, limit: int = 500) -> list[str]:
        last, _hash = await self.log_head()
        seqs = list(range(max(after, -1) + 1, min(last, after + limit) + 1))
        out: list[str] = []
        for i in range(0, len(seqs), LOG_READ_CHUNK):
            got = await asyncio.gather(*(self._read_raw(_lkey(q)) for q in seqs[i:i + LOG_READ_CHUNK]))
            for q, (raw, _rev) in zip(seqs[i:i + LOG_READ_CHUNK], got):
                if raw is None:
                    raise StoreUnavailable(f"membership log entry {q} is missing from KV bucket {self.bucket}")
                out.append(raw.decode("utf-8"))
        return out

    async def log_hash_at(self, seq: int) -> str | None:
        if seq < 0:
            return None
        raw, _rev = await self._read_raw(_lkey(seq))
        # The stored text is the entry's canonical JSON: its hash is the entry's hash.
        return hashlib.sha256(raw).hexdigest() if raw is not None else None

    # -- replay protection's high-water mark ------------------------------------------

    async def nonce_high_water(self) -> int:
        value, _rev = await self._read(HIGH_WATER_KEY)
        return int(value["created"]) if value is not None else 0

    async def raise_nonce_high_water(self, value: int) -> int:
        async def attempt() -> int:
            stored, rev = await self._read(HIGH_WATER_KEY)
            current = int(stored["created"]) if stored is not None else 0
            if current >= value:
                return current
            # Conditional on the revision read: of two nodes raising it at once,
            # the loser re-reads and keeps the larger mark.
            await self._commit([_Write(HIGH_WATER_KEY, {"created": value}, rev)])
            return value

        return await self._retrying(attempt)

    # -- the bucket --------------------------------------------------------------

    def bucket_config(self) -> KeyValueConfig:
        return KeyValueConfig(bucket=self.bucket, history=1, replicas=self.replicas, storage=StorageType.FILE,
                              description="unibus: members, rooms, room members and sealed room keys")

    async def ensure(self) -> None:
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
        _schema, rev = await self._read(SCHEMA_KEY)
        if _schema is None:
            with contextlib.suppress(_CasLost):
                await self._commit([_Write(SCHEMA_KEY, {"version": SCHEMA_VERSION}, rev)])
        elif _schema.get("version", 0) > SCHEMA_VERSION:
            raise StoreUnavailable(f"KV bucket {self.bucket} holds schema {_schema['version']}; "
                                   f"this membershipd knows {SCHEMA_VERSION}: upgrade it")
        await self._write_root()

    async def available(self) -> bool:
        """The state bucket's stream answers within ``timeout`` (it has a leader)."""
        try:
            self._check_connected()
            await asyncio.wait_for(self.js.stream_info(self.stream), min(self.timeout, 1.0))
            return True
        except Exception:
            return False

    async def status(self) -> dict[str, Any]:
        """The bucket's stream: replicas, messages, atomic batches, leader."""
        info = await self._io(self.js.stream_info(self.stream), "bucket info")
        return {"bucket": self.bucket, "replicas": info.config.num_replicas or 1,
                "allow_atomic": bool(info.config.allow_atomic), "messages": info.state.messages,
                "last_seq": info.state.last_seq,
                "leader": info.cluster.leader if info.cluster is not None else None}

    # -- backup (membershipd backup) ---------------------------------------------------

    async def _scan_raw(self, timeout: float) -> tuple[dict[str, tuple[bytes, int]], int]:
        """The last message of every key: ``({key: (stored bytes, revision)} of live keys,
        the largest stream sequence delivered, tombstones included)``."""
        self._check_connected()

        async def scan() -> tuple[dict[str, tuple[bytes, int]], int]:
            queue: asyncio.Queue[Any] = asyncio.Queue()

            async def on_msg(msg: Any) -> None:
                queue.put_nowait(msg)

            sub = await self.js.subscribe(f"{self._prefix}>", stream=self.stream, cb=on_msg, ordered_consumer=True,
                                          deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, inactive_threshold=5.0)
            try:
                info = await sub.consumer_info()
                out: dict[str, tuple[bytes, int]] = {}
                newest = 0
                if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                    return out, newest
                while True:
                    msg = await queue.get()
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

        try:
            return await asyncio.wait_for(scan(), timeout)
        except (TimeoutError, nats.errors.Error, APIError, OSError) as e:
            raise StoreUnavailable(f"reading KV bucket {self.bucket}: {type(e).__name__} {e}".rstrip()) from None

    async def _last_seq(self) -> int:
        info = await self._io(self.js.stream_info(self.stream), "bucket info")
        return int(info.state.last_seq or 0)

    async def snapshot(self, *, budget: float = 60.0, exact_for: float = 10.0) -> KvSnapshot:
        """Every live key of the bucket with its stored bytes, as of one stream sequence
        (``membershipd backup``; docs/operations.md, "Backups").

        The bucket keeps one message per key (``history=1``), so an older value
        is gone once a key is rewritten: a point-in-time read has to be a read
        that no write overtook. Each attempt reads the stream's last sequence
        ``L``, then the last message of every key, then ``L`` again. When no
        message read is newer than ``L`` and ``L`` has not moved, the read is
        exactly the state at ``L`` (``exact``). Writes go on meanwhile, so it
        retries; after ``exact_for`` seconds it also accepts a read whose
        messages are all at or before ``L`` (every key then has its value at
        ``L``: a key written later shows its newer message and fails the
        attempt), provided what a purge could have taken (the sealed keys of a
        room deleted during the read) is all there. :class:`StoreUnavailable`
        when no attempt succeeds within ``budget`` seconds.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        pause = 0.01
        attempts = 0
        while True:
            attempts += 1
            before = await self._last_seq()
            entries, newest = await self._scan_raw(timeout=max(self.timeout, 30.0))
            after = await self._last_seq()
            if newest <= before:
                if after == before:
                    return KvSnapshot(before, entries, True, attempts)
                if loop.time() - start > exact_for and _snapshot_complete(entries):
                    return KvSnapshot(before, entries, False, attempts)
            if loop.time() - start > budget:
                raise StoreUnavailable(f"KV bucket {self.bucket} kept changing for {budget:.0f} s ({attempts} "
                                       "reads); try again when fewer writes are under way")
            await asyncio.sleep(random.uniform(0, pause))
            pause = min(pause * 2, 0.5)

    async def close(self) -> None:
        self._closing.set()
        task, self._watch_task = self._watch_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- bus authorization's reads (with revisions) ----------------------------------

    async def bus_member(self, handle: str) -> tuple[bool, str | None, int]:
        if not _valid(handle):
            return False, None, 0
        value, rev = await self._read(_mkey(handle))
        return value is not None, (value or {}).get("bus_pub"), rev

    async def room_handles(self, room_id: str) -> tuple[frozenset[str] | None, int]:
        if not _valid(room_id):
            return None, 0
        value, rev = await self._read(_rkey(room_id))
        return (frozenset(value["members"]) if value is not None else None), rev

    # -- members ---------------------------------------------------------------

    async def list_members(self) -> list[Member]:
        rows = await self._scan("member")
        return sorted((_member(v) for v, _rev in rows.values()), key=lambda m: m.handle)

    async def get_member(self, handle: str) -> Member | None:
        if not _valid(handle):
            return None
        value, _rev = await self._read(_mkey(handle))
        return _member(value) if value else None

    async def _bus_pub_taken(self, bus_pub: str, handle: str) -> tuple[str | None, int]:
        """Why ``bus_pub`` cannot be ``handle``'s bus key (or None), and the revision of ``bus.<bus_pub>``.

        The ``bus.`` index holds every member's bus key and the nkey of every
        member's signing key; ``sign.<hex>`` is read too, for members whose
        signing key was indexed before the ``bus.`` index existed.
        """
        if not _valid(bus_pub):
            raise ValueError(f"bus_pub {bus_pub!r} cannot be a KV key")
        skey = _sign_key_of_nkey(bus_pub)
        (entry, rev), (signer, _srev) = await asyncio.gather(
            self._read(_bkey(bus_pub)), self._read(skey) if skey else _none())
        if entry is not None:
            if entry.get("key") == "sign":
                return "this bus_pub is the nkey of a member's sign_pub; a signing key never logs in to the bus", rev
            if entry.get("handle") != handle:
                return "another member already has this bus_pub", rev
        if signer is not None:
            return "this bus_pub is the nkey of a member's sign_pub; a signing key never logs in to the bus", rev
        return None, rev

    async def add_member(self, member: Member, *, logged: LogRecord | None = None) -> Member:
        if not _valid(member.handle):
            raise ValueError(f"handle {member.handle!r} cannot be a KV key")
        sign_nkey = nkey_from_sign_pub(member.sign_pub)
        if member.bus_pub is not None and member.bus_pub == sign_nkey:
            raise Conflict("bus_pub is the nkey of the member's own sign_pub; the bus key must be a separate key")

        async def attempt() -> tuple[Member, int | None]:
            pos = await self._log_position(logged)
            (m, mrev), (s, srev), (sb, sbrev), (admins, arev) = await asyncio.gather(
                self._read(_mkey(member.handle)), self._read(_skey(member.sign_pub)), self._read(_bkey(sign_nkey)),
                self._read(ADMINS_KEY))
            if m is not None:
                raise Conflict(f"a member with handle {member.handle!r} already exists")
            if s is not None:
                raise Conflict("another member already has this sign_pub")
            if sb is not None:
                raise Conflict("the nkey of this sign_pub is a member's bus_pub; a signing key never logs in to the bus")
            writes = [_Write(_mkey(member.handle), _member_json(member), mrev),
                      _Write(_skey(member.sign_pub), {"handle": member.handle}, srev),
                      _Write(_bkey(sign_nkey), {"handle": member.handle, "key": "sign"}, sbrev)]
            if member.bus_pub is not None:
                why, brev = await self._bus_pub_taken(member.bus_pub, member.handle)
                if why:
                    raise Conflict(why)
                writes.append(_Write(_bkey(member.bus_pub), {"handle": member.handle, "key": "bus"}, brev))
            if member.role == "admin":
                current = set((admins or {}).get("admins", []))
                writes.append(_Write(ADMINS_KEY, {"admins": sorted(current | {member.handle})}, arev))
            await self._commit(writes + self._log_writes(pos, logged, {}))
            return member, _seq(pos)

        result, seq = await self._retrying(attempt)
        await self._changed(Change("member_added", handle=member.handle, seq=seq, actor=actor_of(logged),
                                   after=member_state(result)))
        return result

    async def set_bus_key(self, handle: str, bus_pub: str, *, logged: LogRecord | None = None) -> Member:
        if not _valid(handle):
            raise NotFound(f"no member {handle!r}")

        async def attempt() -> tuple[Member, Member | None, int | None]:
            pos = await self._log_position(logged)
            m, mrev = await self._read(_mkey(handle))
            if m is None:
                raise NotFound(f"no member {handle!r}")
            old = m.get("bus_pub")
            if old == bus_pub:
                if pos is not None:
                    await self._commit(self._log_writes(pos, logged, {}))
                return _member(m), None, _seq(pos)
            why, brev = await self._bus_pub_taken(bus_pub, handle)
            if why:
                raise Conflict(why)
            new = {**m, "bus_pub": bus_pub}
            writes = [_Write(_mkey(handle), new, mrev),
                      _Write(_bkey(bus_pub), {"handle": handle, "key": "bus"}, brev)]
            if old and _valid(old):
                entry, orev = await self._read(_bkey(old))
                if entry is not None and entry.get("handle") == handle and entry.get("key") == "bus":
                    writes.append(_Write(_bkey(old), None, orev))  # the old key is free again
            await self._commit(writes + self._log_writes(pos, logged, {}))
            return _member(new), _member(m), _seq(pos)

        result, before, seq = await self._retrying(attempt)
        if before is not None:
            await self._changed(Change("member_bus_key", handle=handle, seq=seq, actor=actor_of(logged),
                                       before=member_state(before), after=member_state(result)))
        return result

    async def set_role(self, handle: str, role: str, *, logged: LogRecord | None = None) -> Member:
        if not _valid(handle):
            raise NotFound(f"no member {handle!r}")

        async def attempt() -> tuple[Member, Member, int | None]:
            pos = await self._log_position(logged)
            (m, mrev), (admins, arev) = await asyncio.gather(self._read(_mkey(handle)), self._read(ADMINS_KEY))
            if m is None:
                raise NotFound(f"no member {handle!r}")
            current = set((admins or {}).get("admins", []))
            if m["role"] == "admin" and role != "admin" and not (current - {handle}):
                raise Conflict(f"{handle!r} is the last admin; make another member admin first")
            if m["role"] == role:
                if pos is not None:
                    await self._commit(self._log_writes(pos, logged, {}))
                return _member(m), _member(m), _seq(pos)
            new = {**m, "role": role}
            after = current | {handle} if role == "admin" else current - {handle}
            await self._commit([_Write(_mkey(handle), new, mrev), _Write(ADMINS_KEY, {"admins": sorted(after)}, arev)]
                               + self._log_writes(pos, logged, {}))
            return _member(new), _member(m), _seq(pos)

        result, before, seq = await self._retrying(attempt)
        await self._changed(Change("member_updated", handle=handle, seq=seq, actor=actor_of(logged),
                                   before=member_state(before), after=member_state(result)))
        return result

    async def delete_member(self, handle: str, *, logged: LogRecord | None = None) -> list[str]:
        if not _valid(handle):
            raise NotFound(f"no member {handle!r}")

        async def attempt() -> tuple[list[str], list[tuple[str, int, int]], Member, int | None]:
            pos = await self._log_position(logged)
            (m, mrev), rooms = await asyncio.gather(self._read(_mkey(handle)), self._scan("room"))
            if m is None:
                raise NotFound(f"no member {handle!r}")
            sign_pub = _b64d(m["sign_pub"])
            skey = _skey(sign_pub)
            bkeys = [_bkey(nkey_from_sign_pub(sign_pub))]
            if m.get("bus_pub") and _valid(m["bus_pub"]):
                bkeys.append(_bkey(m["bus_pub"]))
            (s, srev), (admins, arev), *bus = await asyncio.gather(
                self._read(skey), self._read(ADMINS_KEY), *(self._read(k) for k in bkeys))
            writes = [_Write(_mkey(handle), None, mrev)]
            if s is not None and s.get("handle") == handle:
                writes.append(_Write(skey, None, srev))
            for key, (entry, rev) in zip(bkeys, bus):
                if entry is not None and entry.get("handle") == handle:
                    writes.append(_Write(key, None, rev))
            current = set((admins or {}).get("admins", []))
            if m["role"] == "admin" and not (current - {handle}):
                raise Conflict(f"{handle!r} is the last admin and cannot be deleted")
            if handle in current:
                writes.append(_Write(ADMINS_KEY, {"admins": sorted(current - {handle})}, arev))
            left: list[str] = []
            strip: list[tuple[str, int, int]] = []  # (room_id, first, last) epochs sealed to the member
            for room, rrev in rooms.values():
                was_member = handle in room["members"]
                rng = room.get("sealed", {}).get(handle)
                if not (was_member or rng or room.get("owner") == handle):
                    continue
                new = dict(room)
                new["members"] = [h for h in room["members"] if h != handle]
                new["sealed"] = {h: r for h, r in room.get("sealed", {}).items() if h != handle}
                if was_member:
                    new["rekey_required"] = True
                    left.append(room["room_id"])
                if room.get("owner") == handle:
                    # Ownership dies with the member: a later member reusing the handle must not inherit it.
                    new["owner"] = ""
                if rng:
                    strip.append((room["room_id"], rng[0], rng[1]))
                writes.append(_Write(_rkey(room["room_id"]), new, rrev))
            await self._commit(writes + self._log_writes(pos, logged, {}))
            return sorted(left), strip, _member(m), _seq(pos)

        left, strip, before, seq = await self._retrying(attempt)
        await self._strip_sealed(handle, strip)
        await self._changed(Change("member_deleted", handle=handle, rooms=tuple(left), seq=seq,
                                   actor=actor_of(logged), before=member_state(before)))
        return left

    async def _strip_sealed(self, handle: str, ranges: list[tuple[str, int, int]]) -> None:
        """Remove a deleted member's sealed keys from the epochs' entries (hygiene, best effort).

        They are already unreachable: the member's sealed range left every room
        record in the deleting batch, and ``get_sealed_key`` reads only inside it.
        """
        async def strip_one(room_id: str, epoch: int) -> None:
            key = _kkey(room_id, epoch)

            async def attempt() -> None:
                entry, rev = await self._read(key)
                if entry is None or handle not in entry.get("sealed", {}):
                    return
                entry = {**entry, "sealed": {h: v for h, v in entry["sealed"].items() if h != handle}}
                if "sigs" in entry:
                    entry["sigs"] = {h: v for h, v in entry["sigs"].items() if h != handle}
                await self._commit([_Write(key, entry, rev)])

            try:
                await self._retrying(attempt)
            except Exception as e:  # noqa: BLE001 - hygiene only: the keys are unreachable already
                log.warning("could not remove %s's sealed key from %s: %s", handle, key, e)

        todo = [(r, e) for r, first, last in ranges for e in range(first, last + 1)]
        for i in range(0, len(todo), 16):
            await asyncio.gather(*(strip_one(r, e) for r, e in todo[i:i + 16]))

    # -- rooms -----------------------------------------------------------------

    def _room(self, d: dict[str, Any], members: dict[str, Member]) -> Room:
        inside = tuple(members[h] for h in sorted(d["members"]) if h in members)
        return Room(d["room_id"], d["name"], d.get("owner", ""), int(d["epoch"]), bool(d["rekey_required"]),
                    _ts(d["created_at"]), inside)

    async def _members_of(self, handles: Iterable[str]) -> dict[str, Member]:
        handles = sorted(set(handles))
        reads = await asyncio.gather(*(self._read(_mkey(h)) for h in handles))
        return {h: _member(v) for h, (v, _rev) in zip(handles, reads) if v is not None}

    async def create_room(self, name: str, owner: str, *, logged: LogRecord | None = None) -> Room:
        if not _valid(owner):
            raise NotFound(f"no member {owner!r}")

        async def attempt() -> tuple[Room, int | None]:
            pos = await self._log_position(logged)
            m, mrev = await self._read(_mkey(owner))
            if m is None:
                raise NotFound(f"no member {owner!r}")
            room_id = new_room_id()
            record = {"room_id": room_id, "name": name, "owner": owner, "epoch": 0, "rekey_required": True,
                      "created_at": datetime.now(UTC).isoformat(), "members": [owner], "sealed": {}}
            # The touch of the owner's record makes a concurrent delete_member of the owner lose (or this).
            await self._commit([_Write(_rkey(room_id), record, 0), _Write(_mkey(owner), m, mrev)]
                               + self._log_writes(pos, logged, {"room_id": room_id}))
            return self._room(record, {owner: _member(m)}), _seq(pos)

        room, seq = await self._retrying(attempt)
        await self._changed(Change("room_created", handle=owner, room_id=room.room_id, seq=seq,
                                   actor=actor_of(logged), after=room_state_of(room)))
        return room

    async def list_rooms(self, handle: str | None = None) -> list[Room]:
        rooms, members = await asyncio.gather(self._scan("room"), self._scan("member"))
        by_handle = {v["handle"]: _member(v) for v, _rev in members.values()}
        out = [self._room(v, by_handle) for v, _rev in rooms.values() if handle is None or handle in v["members"]]
        return sorted(out, key=lambda r: (r.created_at, r.room_id))

    async def get_room(self, room_id: str) -> Room | None:
        if not _valid(room_id):
            return None
        room, _rev = await self._read(_rkey(room_id))
        if room is None:
            return None
        return self._room(room, await self._members_of(room["members"]))

    async def _room_or_404(self, room_id: str) -> tuple[dict[str, Any], int]:
        if not _valid(room_id):
            raise NotFound(f"no room {room_id!r}")
        room, rev = await self._read(_rkey(room_id))
        if room is None:
            raise NotFound(f"no room {room_id!r}")
        return room, rev

    async def delete_room(self, room_id: str, *, logged: LogRecord | None = None) -> None:
        async def attempt() -> tuple[dict[str, Any], int | None]:
            pos = await self._log_position(logged)
            room, rev = await self._room_or_404(room_id)
            await self._commit([_Write(_rkey(room_id), None, rev)] + self._log_writes(pos, logged, {}))
            return _room_state(room), _seq(pos)

        before, seq = await self._retrying(attempt)
        # The sealed keys are unreachable once the room record is gone (room ids are
        # never reused); purging them is hygiene, and a crash here only leaves garbage.
        try:
            await self._io(self.js.purge_stream(self.stream, subject=f"{self._prefix}keys.{room_id}.>"),
                           "purge sealed keys")
        except Exception as e:  # noqa: BLE001 - hygiene only: the keys are unreachable already
            log.warning("could not purge the sealed keys of deleted room %s: %s", room_id, e)
        await self._changed(Change("room_deleted", room_id=room_id, seq=seq, actor=actor_of(logged), before=before))

    async def add_room_member(self, room_id: str, handle: str, *, logged: LogRecord | None = None) -> Room:
        async def attempt() -> tuple[Room, dict[str, Any] | None, int | None]:
            pos = await self._log_position(logged)
            room, rrev = await self._room_or_404(room_id)
            m, mrev = await self._read(_mkey(handle)) if _valid(handle) else (None, 0)
            if m is None:
                raise NotFound(f"no member {handle!r}")
            if handle in room["members"]:
                if pos is not None:
                    await self._commit(self._log_writes(pos, logged, {}))
                return self._room(room, await self._members_of(room["members"])), None, _seq(pos)
            new = {**room, "members": sorted(set(room["members"]) | {handle}), "rekey_required": True}
            # The touch of the member's record: a concurrent delete_member of it cannot miss this room.
            await self._commit([_Write(_rkey(room_id), new, rrev), _Write(_mkey(handle), m, mrev)]
                               + self._log_writes(pos, logged, {}))
            return self._room(new, await self._members_of(new["members"])), _room_state(room), _seq(pos)

        room, before, seq = await self._retrying(attempt)
        if before is not None:
            await self._changed(Change("room_member_added", handle=handle, room_id=room_id, seq=seq,
                                       actor=actor_of(logged), before=before, after=room_state_of(room)))
        return room

    async def remove_room_member(self, room_id: str, handle: str, *, logged: LogRecord | None = None) -> Room:
        async def attempt() -> tuple[Room, dict[str, Any], int | None]:
            pos = await self._log_position(logged)
            room, rrev = await self._room_or_404(room_id)
            if handle not in room["members"]:
                raise NotFound(f"{handle!r} is not a member of room {room_id!r}")
            new = {**room, "members": [h for h in room["members"] if h != handle], "rekey_required": True}
            await self._commit([_Write(_rkey(room_id), new, rrev)] + self._log_writes(pos, logged, {}))
            return self._room(new, await self._members_of(new["members"])), _room_state(room), _seq(pos)

        room, before, seq = await self._retrying(attempt)
        await self._changed(Change("room_member_removed", handle=handle, room_id=room_id, seq=seq,
                                   actor=actor_of(logged), before=before, after=room_state_of(room)))
        return room

    async def put_keys(self, room_id: str, epoch: int, sealed: dict[str, bytes], *,
                       sigs: dict[str, bytes] | None = None, sealer: str | None = None,
                       log_head: dict[str, Any] | None = None, logged: LogRecord | None = None) -> Room:
        if not _valid(room_id):
            raise NotFound(f"no room {room_id!r}")

        async def attempt() -> tuple[Room, dict[str, Any], int | None]:
            pos = await self._log_position(logged)
            (room, rrev), (_old, krev) = await asyncio.gather(self._room_or_404(room_id),
                                                             self._read(_kkey(room_id, epoch)))
            if epoch != room["epoch"] + 1:
                raise Conflict(f"epoch must be {room['epoch'] + 1} (the room is at epoch {room['epoch']})",
                               current_epoch=room["epoch"])
            current = set(room["members"])
            missing, extra = sorted(current - sealed.keys()), sorted(sealed.keys() - current)
            if missing or extra:
                raise Conflict("sealed must name exactly the current members", missing=missing, extra=extra)
            # krev: 0 in a consistent store (no entry beyond the room's epoch); read
            # anyway, so that garbage left by an interrupted import cannot wedge the room.
            ranges = dict(room.get("sealed", {}))
            for h in sealed:
                first = ranges[h][0] if h in ranges else epoch
                ranges[h] = [first, epoch]
            new = {**room, "epoch": epoch, "rekey_required": False, "sealed": ranges}
            entry = _keys_record(room_id, epoch, sealed, sigs, sealer, log_head)
            # One batch, both conditional: of two writers for the same epoch exactly one commits.
            await self._commit([_Write(_kkey(room_id, epoch), entry, krev), _Write(_rkey(room_id), new, rrev)]
                               + self._log_writes(pos, logged, {"epoch": epoch}))
            return self._room(new, await self._members_of(new["members"])), _room_state(room), _seq(pos)

        room, before, seq = await self._retrying(attempt)
        await self._changed(Change("keys_posted", room_id=room_id, seq=seq, actor=actor_of(logged), before=before,
                                   after=room_state_of(room)))
        return room

    async def get_key_package(self, room_id: str, handle: str, epoch: int | None = None) -> KeyPackage | None:
        if not _valid(room_id, handle):
            return None
        room, _rev = await self._read(_rkey(room_id))
        if room is None:
            return None
        rng = room.get("sealed", {}).get(handle)
        if not rng:
            return None
        e = rng[1] if epoch is None else epoch
        if not (rng[0] <= e <= rng[1]):
            return None
        entry, _rev = await self._read(_kkey(room_id, e))
        value = (entry or {}).get("sealed", {}).get(handle)
        if value is None:
            return None
        assert entry is not None
        sig = entry.get("sigs", {}).get(handle)
        head = entry.get("log_head")
        return KeyPackage(room_id, e, _b64d(value), _b64d(sig) if sig is not None else None, entry.get("sealer"),
                          dict(head) if head is not None else None)

    async def membership(self) -> Membership:
        rooms, members = await asyncio.gather(self._scan("room"), self._scan("member"))
        ms = tuple(sorted((_member(v) for v, _rev in members.values()), key=lambda m: m.handle))
        known = {m.handle for m in ms}
        return Membership(ms, {v["room_id"]: frozenset(h for h in v["members"] if h in known)
                               for v, _rev in rooms.values()})

    # -- import (membershipd migrate-to-kv) -------------------------------------

    async def import_member(self, member: Member) -> bool:
        """Add ``member`` unless its handle was ever written here (present, or deleted since)."""
        if not _valid(member.handle):
            raise ValueError(f"handle {member.handle!r} cannot be a KV key")
        existing, rev = await self._read(_mkey(member.handle))
        if existing is not None or rev:
            return False  # copied before (and maybe deleted here since: do not resurrect it)
        try:
            await self.add_member(member)
        except Conflict:
            if await self.get_member(member.handle) is not None:
                return False  # a concurrent copy won
            raise
        return True

    async def import_room(self, room: Room, epochs: dict[int, dict[str, Any]]) -> bool:
        """Copy a room with its id, epoch, members and every sealed epoch; False if it is already here.

        ``epochs``: ``{epoch: {"sealed": {handle: bytes}, "sigs": {handle: bytes},
        "sealer": str | None, "log_head": {seq, hash} | None}}`` (the key packages).

        The sealed keys go first, each entry created only if absent; the room
        record last, as the commit point: until it exists nothing reads the
        entries, and a re-run after a crash finishes the copy.
        """
        if not _valid(room.room_id):
            raise ValueError(f"room id {room.room_id!r} cannot be a KV key")
        existing, rrev = await self._read(_rkey(room.room_id))
        if existing is not None:
            return False
        if rrev:
            # A tombstone: the room was deleted here after an earlier copy. Do not resurrect it.
            return False
        for e, package in sorted(epochs.items()):
            key = _kkey(room.room_id, e)
            entry = _keys_record(room.room_id, e, package["sealed"], package.get("sigs"), package.get("sealer"),
                                 package.get("log_head"))

            async def put(key: str = key, entry: dict[str, Any] = entry) -> None:
                old, krev = await self._read(key)
                if old != entry:
                    await self._commit([_Write(key, entry, krev)])

            await self._retrying(put)
        ranges: dict[str, list[int]] = {}
        for e, package in sorted(epochs.items()):
            for h in package["sealed"]:
                ranges.setdefault(h, [e, e])[1] = e
        members = await self._members_of(m.handle for m in room.members)
        owner = room.owner if room.owner and await self.get_member(room.owner) is not None else ""
        created = room.created_at if room.created_at.tzinfo else room.created_at.replace(tzinfo=UTC)
        record = {"room_id": room.room_id, "name": room.name, "owner": owner, "epoch": room.epoch,
                  "rekey_required": room.rekey_required, "created_at": created.isoformat(),
                  "members": sorted(members), "sealed": ranges}
        try:
            await self._commit([_Write(_rkey(room.room_id), record, 0)])
        except _CasLost:
            return False  # a concurrent import won
        await self._changed(Change("room_created", handle=owner or None, room_id=room.room_id))
        return True

    async def import_log(self, texts: list[str], nonces: list[tuple[str, str, int]], max_created: int) -> int:
        """Copy a membership log (entry texts from seq 0 on, the (keyid, nonce, seq) of
        its requests, its largest ``created``); returns the entries written.

        Entries and nonces first, each written only if absent; the head last, as
        the commit point, so a re-run after a crash finishes the copy. A bucket
        whose log already holds the last entry is left alone (a second run, or
        a cluster that has moved on since); one with a log of its own that
        does not contain this one is a :class:`Conflict`.
        """
        if not texts:
            return 0
        last = len(texts) - 1
        last_hash = hashlib.sha256(texts[-1].encode("utf-8")).hexdigest()
        head, hrev = await self._read(LOG_HEAD_KEY)
        if head is not None:
            if int(head["seq"]) >= last and await self.log_hash_at(last) == last_hash:
                return 0
            raise Conflict(f"KV bucket {self.bucket} has a membership log of its own (head {head['seq']}) that "
                           f"does not contain the one being copied (entry {last}, {last_hash}); nothing copied")
        written = 0
        chunk = 256
        for i in range(0, len(texts), chunk):
            part = [(_lkey(q), texts[q].encode("utf-8")) for q in range(i, min(i + chunk, len(texts)))]
            got = await asyncio.gather(*(self._read_raw(k) for k, _raw in part))
            writes = []
            for (key, raw), (old, rev) in zip(part, got):
                if old == raw:
                    continue
                if old is not None:
                    raise Conflict(f"KV bucket {self.bucket}: {key} differs from the log being copied; nothing "
                                   "more copied")
                writes.append(_Write(key, None, rev, raw=raw))
            if writes:
                await self._commit(writes)
                written += len(writes)
        valid = [(k, n, q) for k, n, q in nonces if _valid(k, n)]
        for i in range(0, len(valid), chunk):
            part = valid[i:i + chunk]
            got = await asyncio.gather(*(self._read(_nonce_key(k, n)) for k, n, _q in part))
            writes = [_Write(_nonce_key(k, n), {"seq": q}, rev) for (k, n, q), (old, rev) in zip(part, got)
                      if old is None]
            if writes:
                await self._commit(writes)
        try:
            await self._commit([_Write(LOG_HEAD_KEY, {"seq": last, "hash": last_hash, "max_created": max_created},
                                       hrev)])
        except _CasLost:
            raise Conflict(f"KV bucket {self.bucket}: its membership log head changed during the copy") from None
        return written

    # -- the watch ------------------------------------------------------------------

    def start_watch(self) -> asyncio.Task[None]:
        """Run :meth:`watch` as a task of this store; :meth:`close` stops it."""
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.get_running_loop().create_task(self.watch(), name="unibus-kv-watch")
        return self._watch_task

    async def watch(self, poll: float = 0.25) -> None:
        """Watch the bucket and report other nodes' changes as ``Change("reloaded")`` until :meth:`close`.

        Writes of this instance are recognised by their revision and not
        reported again (their own Change was already delivered). Each time the
        subscription is (re)made — at start, after a NATS reconnect — one
        ``reloaded`` is reported too, since changes may have been missed.
        """
        notifier = asyncio.get_running_loop().create_task(self._notify_loop())
        sub = None
        try:
            while not self._closing.is_set():
                try:
                    self._check_connected()
                    sub = await self._subscribe_watch()
                except Exception as e:  # noqa: BLE001 - retried until close()
                    log.debug("KV watch not (yet) subscribed: %s", e)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), 0.5)
                    continue
                reconnects = self._nc.stats.get("reconnects", 0)
                self._seen.append((-1, ""))  # "maybe missed something": report once
                self._kick.set()
                self.watch_ready.set()
                while not self._closing.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), poll)
                    nc = self._nc
                    if nc.is_closed:
                        break
                    if nc.stats.get("reconnects", 0) != reconnects and nc.is_connected:
                        log.info("KV watch: NATS reconnected; watching %s again", self.bucket)
                        break
                self.watch_ready.clear()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sub.unsubscribe(), 1.0)
                sub = None
                if self._nc.is_closed:
                    await self._closing.wait()
                    break
                self.watch_restarts += 1
        finally:
            self.watch_ready.clear()
            if sub is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sub.unsubscribe(), 1.0)
            notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await notifier

    async def _subscribe_watch(self) -> Any:
        async def on_msg(msg: Any) -> None:
            self._seen.append((msg.metadata.sequence.stream, msg.subject[len(self._prefix):]))
            self._kick.set()

        return await asyncio.wait_for(
            self.js.subscribe(f"{self._prefix}>", stream=self.stream, cb=on_msg, ordered_consumer=True,
                              deliver_policy=DeliverPolicy.NEW, headers_only=True, idle_heartbeat=1.0,
                              inactive_threshold=30.0),
            self.timeout)

    async def _notify_loop(self) -> None:
        while True:
            await self._kick.wait()
            await asyncio.sleep(WATCH_DEBOUNCE)
            self._kick.clear()
            seen, self._seen = self._seen, []
            keys: set[str] = set()
            missed = False
            for seq, key in seen:
                if seq in self._own:
                    del self._own[seq]
                    self.watch_stats["own"] += 1
                elif seq < 0:
                    missed = True
                else:
                    keys.add(key)
                    self.watch_stats["remote"] += 1
            if missed or keys:
                self.watch_stats["reported"] += 1
                # Listeners that can, apply the keys one by one; a (re)subscription
                # may have missed some, so it reports no keys: re-read everything.
                change = Change("reloaded", origin="remote", keys=() if missed else tuple(sorted(keys)))
                try:
                    await self._changed(change)
                except Exception:  # pragma: no cover - _changed logs listener errors itself
                    log.exception("KV watch: reporting a change failed")


def _seq(pos: _LogPosition | None) -> int | None:
    """The log seq a logged write took (None: nothing was logged)."""
    return pos.seq if pos is not None else None


def _room_state(d: dict[str, Any]) -> dict[str, Any]:
    """A room record of the bucket as change events carry it (:func:`unibus.store.base.room_state`)."""
    return room_state(d["room_id"], d["name"], d.get("owner", ""), d["epoch"], d["rekey_required"], d["members"])


async def _sealed_epochs(src: Store, room: Room, handles: list[str]) -> dict[int, dict[str, Any]]:
    """Every sealed epoch of a room in ``src`` with its key packages (see :meth:`KvStore.import_room`)."""
    from .sqlite import SqliteStore

    if isinstance(src, SqliteStore):
        return await src.epoch_packages(room.room_id)
    out: dict[int, dict[str, Any]] = {}
    for e in range(1, room.epoch + 1):
        got = await asyncio.gather(*(src.get_key_package(room.room_id, h, e) for h in handles))
        for h, g in zip(handles, got):
            if g is not None:
                package = out.setdefault(e, {"sealed": {}, "sigs": {}, "sealer": g.sealer, "log_head": g.log_head})
                package["sealed"][h] = g.sealed
                if g.sig is not None:
                    package["sigs"][h] = g.sig
    return out


async def copy_store(src: Store, dst: KvStore) -> dict[str, int]:
    """Copy the membership log, members, rooms, room members and every sealed epoch
    (with its key packages) from ``src`` (SQLite) into ``dst``.

    Idempotent: what is already in ``dst`` (the log up to its last entry, a
    member by handle, a room by id) is left untouched, and so is what was
    copied and deleted there since; a second run writes nothing. A run cut
    short is finished by the next one. Returns what was copied:
    ``{"log_entries": n, "members": n, "rooms": n, "sealed_epochs": n}``.
    """
    from .sqlite import SqliteStore

    counts = {"log_entries": 0, "members": 0, "rooms": 0, "sealed_epochs": 0}
    if isinstance(src, SqliteStore):
        # The log first: once its head is in the bucket, no node writes a snapshot of its own there.
        texts, nonces, max_created = await src.log_export()
        counts["log_entries"] = await dst.import_log(texts, nonces, max_created)
    members = await src.list_members()
    for member in members:
        if await dst.import_member(member):
            counts["members"] += 1
    handles = [m.handle for m in members]
    for room in await src.list_rooms():
        if await dst.get_room(room.room_id) is not None:
            continue
        epochs = await _sealed_epochs(src, room, handles)
        if await dst.import_room(room, epochs):
            counts["rooms"] += 1
            counts["sealed_epochs"] += len(epochs)
    return counts


__all__ = ["STATE_BUCKET", "KvSnapshot", "KvStore", "copy_store"]
