"""The cluster backend: one JetStream object store, ``unibus_blobs``, replicated like the KV buckets.

Objects are named ``<room_id>/<blob_id>``; their metadata (uploader, created)
is a JSON document in the object's ``description``. The stream is
``OBJ_unibus_blobs`` with ``--kv-replicas`` replicas (file storage).

An upload streams straight into the object store as it arrives (:class:`ObjUpload`):
its chunks, of :data:`CHUNK_SIZE`, under a fresh ``nuid`` (the messages of nats-py's
``ObjectStore.put``, up to :data:`PUT_WINDOW` awaiting the stream leader's
acknowledgement at once), hashed on the way; the metadata message follows
only once the handler found the digest to match. An object becomes visible
when its metadata message is stored, which happens after all of its chunks:
an upload refused or given up has its chunks purged, and a crash mid-put
leaves chunks that no metadata references, never a partial object.
Such orphaned chunks are purged at start-up, and every :data:`SWEEP_EVERY`
while the node runs, once the newest of them is older than :data:`ORPHAN_AGE`
(younger ones may belong to an upload another node is making right now); a
running node's sweep reads the metadata afresh before it purges, as its own
view of it may lag. Deleting writes a tombstone metadata message (rolling up
the old one) and purges the chunks.

Reads stream chunk by chunk: direct gets (``next_by_subj``), up to
:data:`READ_AHEAD` in flight, a miss asked again of the stream leader with
``STREAM.MSG.GET`` (docs/blobstore.md, "Cluster mode"), so memory stays flat. Every node keeps
its counters for ``/healthz`` from an ordered consumer on the metadata
subjects, so they include what other nodes stored, without a round trip per
``/healthz``.
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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.errors import ConnectionClosedError, MaxPayloadError, NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import (
    APIError,
    NoStreamResponseError,
    NotFoundError,
    ObjectNotFoundError,
    BadObjectMetaError,
    ServiceUnavailableError,
)
from nats.js.object_store import ObjectStore
from nats.nuid import NUID
from unibus.aio import cancel_and_wait, retrieve_exception, within

from .backend import (
    READ_CHUNK,
    TMP_DIR,
    BlobBackend,
    BlobError,
    BlobInfo,
    BlobReader,
    BlobUnavailable,
    RoomExists,
    Upload,
    check_blob_id,
    check_room_id,
    clean_staging,
    make_private_dir,
)

log = logging.getLogger("unibus.plugins.blobstore")

BUCKET = "unibus_blobs"
#: Room left in a message for what is not the chunk, when a server's ``max_payload`` bounds the chunks.
_PAYLOAD_HEADROOM = 4096
#: Size of the chunks a put writes: the largest that nats-server's default ``max_payload`` (1 MiB)
#: takes with :data:`_PAYLOAD_HEADROOM` to spare; a server whose ``max_payload`` is smaller gets
#: chunks that fit it (:meth:`ObjectStoreBackend.chunk_size`). Per byte, nats-server copies a
#: message four times and checksums it once to answer a direct get, whatever its size, but every
#: message costs both sides a round of parsing and scheduling: against 512 KiB chunks, a 256 MiB
#: blob reads about a fifth faster in process (docs/benchmarks.md, "Blobs"). Readers take chunks
#: of any size.
CHUNK_SIZE = 1024 * 1024 - _PAYLOAD_HEADROOM
#: Chunks a put keeps published and awaiting their acknowledgement (at most this many in memory: 4 MiB).
PUT_WINDOW = 4
#: Bytes of the staged file a put reads (and hashes) at a time, in a worker thread.
PUT_READ = 4 * 1024 * 1024
#: Direct gets a read keeps in flight (at most this many chunks in memory: 4 MiB). Four read a
#: 256 MiB blob faster than eight here (docs/benchmarks.md, "Blobs").
READ_AHEAD = 4
#: Read-ahead requests all the reads of a node may have in flight together (16 MiB of chunks):
#: a client that stops reading keeps its read's answers in memory, and without a node-wide
#: bound every stalled download held 4 MiB (found by a red-team test). Four downloads read
#: ahead fully at once; more share the rest. The one request a read makes when it has none in
#: flight needs no token, and is awaited at once, so a stalled read holds only tokens' answers
#: (and its HTTP response the chunk it is writing: docs/blobstore.md, "Limits").
READ_AHEAD_BUDGET = 16
#: Orphaned chunks (no metadata references them) younger than this are left alone.
ORPHAN_AGE = 600.0
#: How often a running node looks for orphaned chunks, besides once at its start (give or take
#: a fifth, so that nodes started together do not sweep in step).
SWEEP_EVERY = 600.0
#: An upload that paused this long since it last published a chunk is refused (503, try again)
#: before it publishes another, or its metadata: its chunks could be taken for orphans by then.
#: Two minutes under ORPHAN_AGE, for stream leaders' clocks that differ (ages are in their time).
MAX_CHUNK_GAP = ORPHAN_AGE - 120.0
STREAM_NAME_IN_USE = 10058
#: A chunk kept back (_Chunks._hold) that is a slice of a part larger than this is copied, so that
#: it does not keep the whole part alive (a red team held 64 MiB for one chunk). The HTTP handler's
#: and a restore's 4 MiB hand-offs stay uncopied.
_HOLD_SLICE_OF = 8 * 1024 * 1024
#: What a nuid is made of (a chunk subject's last token: no wildcard, no dot).
_NUID = re.compile(r"[A-Za-z0-9]{1,64}")
#: JetStream wrong last sequence: another node stored the metadata first.
WRONG_LAST_SEQUENCE = 10071
#: What a NATS connection that is reconnecting, or a stream whose leader changes, raises: try again.
_UNAVAILABLE = (NatsTimeoutError, asyncio.TimeoutError, NoRespondersError, ConnectionClosedError,
                OutboundBufferLimitError, NoStreamResponseError, ServiceUnavailableError)


def chunk_for(max_payload: int | None) -> int:
    """The chunk size for a server whose ``max_payload`` is this (None or 0: not known):
    :data:`CHUNK_SIZE`, or what fits under a smaller ``max_payload``, at least one byte."""
    if not isinstance(max_payload, int) or max_payload <= 0:
        return CHUNK_SIZE
    return max(1, min(CHUNK_SIZE, max(max_payload // 2, max_payload - _PAYLOAD_HEADROOM)))


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)  # Linux


def _since_boot() -> float:
    """Seconds on a clock that never goes back and, unlike ``time.monotonic``, counts a suspended
    host's sleep too (``CLOCK_BOOTTIME``), which the stream's ages include."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


def _unavailable(e: BaseException) -> BlobUnavailable:
    return BlobUnavailable(f"the JetStream object store is unavailable: {type(e).__name__}: {e}")


def _digest_of(obj: api.ObjectInfo) -> bytes | None:
    d = obj.digest or ""
    if not isinstance(d, str):  # foreign metadata
        return None
    for prefix in ("SHA-256=", "sha-256="):
        if d.startswith(prefix):
            try:
                return base64.urlsafe_b64decode(d[len(prefix):])
            except ValueError:
                return None
    return None


class _ChunkAcks:
    """The stream's acknowledgements of the chunks this node publishes, each a
    future, through one reply subscription on the backend's connection (made on
    the first publish).

    nats-py's ``publish_async`` does this too, but it took one of 4,000
    pending-ack slots before it sent, and kept the slot and its future for good
    when ``Client.publish`` refused the message (a server with a smaller
    ``max_payload``, a connection closed or full while reconnecting): once
    they were all lost, every upload of the node waited for a slot and failed.
    Its reply handler also turned a refusal of the stream (full, for one) into
    a timeout, as nats-py 2.16's ``APIError.from_error`` raises where it is
    expected to return. Here a publish that fails forgets its future at once,
    and each upload bounds its own acknowledgements (:data:`PUT_WINDOW`)."""

    def __init__(self, connection: Callable[[], Any]) -> None:
        self._connection = connection
        self._prefix: str | None = None
        self._subscribing = asyncio.Lock()
        self._sub: Any = None
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._sent = 0
        self._closed = False

    async def publish(self, subject: str, payload: bytes | bytearray | memoryview) -> asyncio.Future[None]:
        """Publish, and return the future of the stream's acknowledgement: ``None``, or the error
        the stream answered (``APIError``, ``NoStreamResponseError``). A caller that stops waiting
        for it cancels it."""
        nc = self._connection()
        if self._prefix is None and not self._closed:
            async with self._subscribing:
                if self._prefix is None and not self._closed:
                    prefix = nc.new_inbox() + "."
                    sub = await nc.subscribe(prefix + "*", cb=self._on_ack)
                    if self._closed:  # while it subscribed
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                    else:
                        self._sub, self._prefix = sub, prefix
        prefix = self._prefix
        if self._closed or prefix is None:
            raise ConnectionClosedError()  # the backend was closed: a 503, as for a closed connection
        self._sent += 1
        token = str(self._sent)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        future.add_done_callback(lambda _, token=token: self._waiting.pop(token, None))
        try:
            # nats-py copies the payload into the PUB command before it returns: the caller may reuse it
            await nc.publish(subject, payload, reply=prefix + token)
        except BaseException:
            self._waiting.pop(token, None)
            future.cancel()
            raise
        return future

    async def _on_ack(self, msg: Any) -> None:
        if self._prefix is None:
            return  # queued before close() unsubscribed: its waiter was told
        future = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if future is None or future.done():
            return  # an answer after its waiter gave up
        if msg.headers and msg.headers.get(api.Header.STATUS) == "503":  # no stream for the subject
            future.set_exception(NoStreamResponseError())
            return
        try:
            answer = json.loads(msg.data)
        except ValueError:
            answer = {"error": {"description": "an acknowledgement that is not JSON"}}
        error = answer.get("error") if isinstance(answer, dict) else {"description": "not an acknowledgement"}
        if not error:
            future.set_result(None)
        elif isinstance(error, dict) and error.get("code") == 503:
            future.set_exception(ServiceUnavailableError(code=503, description=error.get("description"),
                                                         err_code=error.get("err_code")))
        else:
            error = error if isinstance(error, dict) else {}
            future.set_exception(APIError(code=error.get("code"), description=str(error.get("description") or ""),
                                          err_code=error.get("err_code")))

    @property
    def pending(self) -> int:
        """How many acknowledgements are awaited (a future given up is forgotten by its callback, soon)."""
        return sum(not future.done() for future in self._waiting.values())

    async def close(self) -> None:
        """Stop listening: whoever still waits for an acknowledgement gets ``ConnectionClosedError``
        (a 503), as does a later publish."""
        self._closed = True
        sub, self._sub, self._prefix = self._sub, None, None
        for future in list(self._waiting.values()):
            if not future.done():
                future.set_exception(ConnectionClosedError())
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be gone
                await sub.unsubscribe()


class _Chunks:
    """An object's chunks being published on ``$O.<bucket>.C.<nuid>``, whatever sizes its bytes
    come in: each message is :meth:`ObjectStoreBackend.chunk_size` bytes but the last, and up
    to :data:`PUT_WINDOW` await the stream leader's acknowledgement at once (nats-py's
    ``ObjectStore.put`` waits for each in turn: a round trip per chunk). One coroutine
    publishes, so the chunks are stored in order. Nothing is visible until a metadata message
    names the ``nuid``; :meth:`discard` purges what was published."""

    def __init__(self, backend: ObjectStoreBackend) -> None:
        self.backend = backend
        self.chunk = backend.chunk_size()
        self.nuid = NUID().next().decode()
        self.subject = f"$O.{backend.bucket}.C.{self.nuid}"
        self.size = self.count = 0
        self._acks: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._carry = bytearray()  # less than a chunk, waiting for the bytes that follow
        self._held: bytes | bytearray | memoryview | None = None  # the newest full chunk, kept back (_hold)
        self._timeout = getattr(backend.js, "_timeout", 5.0)
        self._discarded = False
        self._adding: asyncio.Future[None] | None = None  # an ``add`` under way
        self._published_at: float | None = None  # _since_boot() when the newest chunk was sent

    def check_fresh(self) -> None:
        """BlobUnavailable once the newest chunk published is :data:`MAX_CHUNK_GAP` old: the chunks
        may have been taken for orphans (nodes purge chunks that no metadata names once their
        newest is :data:`ORPHAN_AGE` old), and nothing may be published after them, neither a
        chunk nor the metadata, which would then name chunks that are gone. Checked before every
        publish, so an upload's chunks never look old to a purge while it runs (a red team broke
        a blob answered 201 when its commit fell between a sweep's read and its purge)."""
        if self._published_at is not None and _since_boot() - self._published_at >= MAX_CHUNK_GAP:
            raise BlobUnavailable(f"no chunk of this upload was stored for {MAX_CHUNK_GAP:g} s or more, so its "
                                  "chunks may be taken for orphans; try again")

    async def _publish(self, payload: bytes | bytearray | memoryview) -> None:
        while len(self._acks) >= PUT_WINDOW:
            await within(self._acks.popleft(), self._timeout)
        if self._discarded:
            raise BlobError("this upload was given up")
        self.check_fresh()
        nc = getattr(self.backend.js, "_nc", None)
        if nc is not None and not nc.is_connected:
            # a reconnecting connection buffers what is published (2 MiB at most, then it refuses):
            # chunks that might be stored after the upload gave up
            raise BlobUnavailable("the NATS connection is reconnecting; try again")
        self._published_at = _since_boot()  # before the send: the message is stored no sooner
        self._acks.append(await self.backend.acks.publish(self.subject, payload))
        self.count += 1
        # nats-py's flusher task writes the chunk to the socket when it next runs: now, so that
        # nats-server stores it while this upload hashes and cuts the next. Without this turn
        # (publish_async had one, in its wait for a slot) a put into the object store ran at 90 to
        # 94% of publish_async's speed, with it at 104 to 107% (bench/probe_chunk_acks.py: in
        # process, 128 MiB, the median of 10 alternating rounds; docs/benchmarks.md).
        await asyncio.sleep(0)

    async def add(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        self._adding = asyncio.get_running_loop().create_future()
        try:
            await self._add(parts)
        finally:
            self._adding.set_result(None)
            self._adding = None

    async def _add(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        chunk = self.chunk
        for part in parts:
            view = memoryview(part).cast("B")
            self.size += len(view)
            if self._carry:  # fill the chunk begun with the previous part first
                take = chunk - len(self._carry)
                self._carry += view[:take]
                view = view[take:]
                if len(self._carry) < chunk:
                    continue
                await self._hold(self._carry)
                self._carry = bytearray()
            while len(view) >= chunk:  # whole chunks straight out of the part, no copy of ours
                await self._hold(view[:chunk])
                view = view[chunk:]
            if view:
                self._carry += view

    async def _hold(self, payload: bytes | bytearray | memoryview) -> None:
        """Keep the newest full chunk back, and publish the one kept before. So the last chunks are
        published by :meth:`close`, right before the metadata: an upload's newest chunk is never
        old when it commits, however long its body paused, and a node that starts then does not
        take its chunks for orphans (their age is their newest chunk's)."""
        if isinstance(payload, memoryview) and memoryview(payload.obj).nbytes > _HOLD_SLICE_OF:
            payload = bytes(payload)  # kept past the write: not the whole (large) part it is a slice of
        held, self._held = self._held, payload
        if held is not None:
            await self._publish(held)

    async def close(self) -> None:
        """Publish the chunks kept back and wait until every chunk was acknowledged."""
        if self._held is not None:
            held, self._held = self._held, None
            await self._publish(held)
        if self._carry:
            await self._publish(self._carry)
            self._carry = bytearray()
        while self._acks:
            await within(self._acks.popleft(), self._timeout)

    async def discard(self) -> None:
        """Purge what was published (best effort: what is left is purged later, as orphaned chunks).
        The chunks still unacknowledged are waited for first: nats-server stores a stream's messages and
        answers its API requests from different queues, so a purge sent right after a chunk may be
        done before that chunk is stored, and leave it behind (found by a test)."""
        self._discarded = True
        self._carry = bytearray()
        self._held = None
        adding = self._adding
        if adding is not None:  # an ``add`` of another task: it stops at its next chunk
            with contextlib.suppress(Exception):
                await within(asyncio.shield(adding), self._timeout)
        acks, self._acks = list(self._acks), collections.deque()
        if acks:
            with contextlib.suppress(Exception):  # failed or never answered: purged all the same
                await within(asyncio.gather(*acks, return_exceptions=True), self._timeout)
        if self.count:
            self.count = 0
            with contextlib.suppress(Exception):
                await self.backend.js.purge_stream(self.backend.stream, subject=self.subject)


@contextlib.contextmanager
def _nats_errors(what: str) -> Iterator[None]:
    """The NATS errors of a put as the backend's: unavailable (503, try again) or refused."""
    try:
        yield
    except _UNAVAILABLE as e:
        raise _unavailable(e) from None
    except MaxPayloadError:  # the connection moved to a server with a smaller max_payload: fits next time
        raise BlobUnavailable(f"{what}: the NATS server's max_payload changed during the put; try again") from None
    except APIError as e:  # the stream refused it (full, for one): the server's problem, not the request's
        raise BlobUnavailable(f"JetStream refused {what}: {e.description or e}") from None


#: JetStream's "store failed" (503): a stream limit checked before the message is proposed, or
#: a write that failed on one replica only (a full disk), after which the others may hold it.
STORE_FAILED = 10077


def _refused_before_storing(e: BaseException) -> bool:
    """Whether the stream's answer to a publish says for certain that nothing was stored: no
    stream listens, a lost race (the expected last sequence), or a stream limit, which each
    replica applies alike. Any other error (a 503 of a write that failed on the leader of an R3
    stream whose followers stored it, a leader change) leaves it open (a review)."""
    if isinstance(e, NoStreamResponseError):
        return True
    if not isinstance(e, APIError):
        return False
    return e.err_code == WRONG_LAST_SEQUENCE or (
        e.err_code == STORE_FAILED and (e.description or "").startswith("maximum ") and
        (e.description or "").endswith(" exceeded"))


class _LostRace(Exception):
    """The metadata of the same name was stored by someone else between our read and our write."""


def _hash_parts(h: Any, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    for p in parts:
        h.update(p)


class ObjUpload(Upload):
    """An upload streamed straight into the object store as it arrives: its chunks under a fresh
    ``nuid``, hashed on the way, and visible only once :meth:`commit` publishes the metadata
    message (after the handler checked the digest). Nothing is staged on disk: against staging
    the body in a file, hashing, fsyncing and copying it into JetStream after it arrived, this
    stores a 256 MiB blob about twice as fast in process (docs/benchmarks.md, "Blobs")."""

    backend: ObjectStoreBackend

    def __init__(self, backend: ObjectStoreBackend, room_id: str) -> None:
        self.backend = backend
        self.room_id = room_id
        self._chunks = _Chunks(backend)
        self._hash = hashlib.sha256()
        # The previous write's bytes, being hashed in a worker thread (hashlib lets go of the GIL
        # on large buffers) while this write publishes.
        self._hashing: asyncio.Future[None] | None = None
        self._digest: bytes | None = None
        self._done = False

    @property
    def size(self) -> int:  # type: ignore[override]
        return self._chunks.size

    async def write(self, data: bytes | Sequence[bytes]) -> None:
        if self._done or self._digest is not None:
            raise BlobError("this upload is finished")
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else [p for p in data if len(p)]
        if not parts:
            return
        # Both the hashing thread and the chunk kept back (_Chunks._hold) read the parts after this
        # returns: a caller's mutable buffer is copied once (the HTTP handler's parts are bytes).
        parts = [p if isinstance(p, bytes) or (isinstance(p, memoryview) and isinstance(p.obj, bytes)) else bytes(p)
                 for p in parts]
        if self._hashing is not None:
            hashing, self._hashing = self._hashing, None
            await hashing
        self._hashing = asyncio.get_running_loop().run_in_executor(None, _hash_parts, self._hash, parts)
        with _nats_errors("an upload"):
            await self._chunks.add(parts)

    async def finish(self) -> bytes:
        if self._digest is None:
            with _nats_errors("an upload"):
                await self._chunks.close()
            if self._hashing is not None:
                hashing, self._hashing = self._hashing, None
                await hashing
            self._digest = self._hash.digest()
        return self._digest

    async def commit(self, uploader: str) -> tuple[BlobInfo, bool]:
        digest = await self.finish()
        info = BlobInfo(self.room_id, digest.hex(), self._chunks.size, uploader, time.time())
        name = f"{info.room_id}/{info.blob_id}"
        try:
            async with self.backend.name_lock(name):
                existing, old, last = await self.backend._look(info.room_id, info.blob_id)
                if existing is None:
                    try:
                        await self.backend._publish_meta(info, self._chunks, old, last)
                        self._done = True
                        return info, True
                    except _LostRace:  # another node stored the same blob at the same moment
                        existing = await self.backend.info(info.room_id, info.blob_id)
                        if existing is None:  # ...and it is gone again
                            raise BlobUnavailable(f"blob {info.blob_id} was stored and deleted during this "
                                                  "upload; try again") from None
                return existing, False  # the chunks of this upload go in the ``finally``
        finally:
            await self.abort()

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        hashing, self._hashing = self._hashing, None
        if hashing is not None:
            with contextlib.suppress(Exception):  # thrown away anyway
                await hashing
        await self._chunks.discard()


class ObjReader(BlobReader):
    def __init__(self, backend: ObjectStoreBackend, info: BlobInfo, nuid: str) -> None:
        self.backend = backend
        self.info = info
        self.nuid = nuid

    async def chunks(self, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        # ``size`` is advisory: the object store's own chunk size decides.
        js = self.backend.js
        subject = f"$O.{self.backend.bucket}.C.{self.nuid}"
        remaining = self.info.size
        cursor = 1  # the next chunk is the first message on ``subject`` at or after this sequence
        # (sequence, request, whether it holds one of the node's READ_AHEAD_BUDGET tokens)
        inflight: collections.deque[tuple[int, asyncio.Future[Any], bool]] = collections.deque()
        h = hashlib.sha256()
        backend = self.backend
        chunk = CHUNK_SIZE  # the object's chunk size, as its chunks show it (older objects have smaller ones)

        def ask(seq: int) -> bool:
            """Ask for the chunk at or after ``seq``; False when the node's read-ahead budget is spent
            (the first request in flight is this read's own and needs no token)."""
            token = bool(inflight)
            if token:
                if backend.read_tokens <= 0:
                    return False
                backend.read_tokens -= 1
            # A direct get: the message as it is stored (no JSON, no base64), answered by
            # any replica that is current; a miss is asked of the stream leader again.
            fut = asyncio.ensure_future(js.get_msg(backend.stream, seq=seq, subject=subject, next=True,
                                                   direct=True))
            fut.add_done_callback(retrieve_exception)  # a read-ahead nobody waits for may fail
            inflight.append((seq, fut, token))
            return True

        def take() -> tuple[int, asyncio.Future[Any]]:
            seq, fut, token = inflight.popleft()
            if token:
                backend.read_tokens += 1
            return seq, fut

        try:
            while remaining > 0:
                # Up to READ_AHEAD requests in flight, for the sequences that follow
                # the cursor: a put stores an object's chunks one after the other,
                # so each usually answers with exactly the chunk after the previous.
                wanted = min(READ_AHEAD, -(-remaining // chunk))
                nxt = inflight[-1][0] + 1 if inflight else cursor
                while len(inflight) < wanted and ask(nxt):
                    nxt += 1
                asked, fut = take()
                try:
                    try:
                        msg = await fut
                    except APIError:  # a replica behind the leader (or refusing)? The leader decides.
                        msg = await js.get_msg(self.backend.stream, seq=asked, subject=subject, next=True)
                except NotFoundError:
                    raise BlobError(f"blob {self.info.blob_id}: chunks missing (deleted while being read?)") from None
                except _UNAVAILABLE as e:
                    raise _unavailable(e) from None
                data = msg.data or b""
                if len(data) > remaining:
                    raise BlobError(f"blob {self.info.blob_id}: more data than its size")
                remaining -= len(data)
                h.update(data)
                if data and remaining:  # the last chunk may be short
                    chunk = len(data)
                cursor = (msg.seq or asked) + 1
                # A request for a sequence before the new cursor could only answer with
                # this chunk again (another object's message was in between): drop it.
                while inflight and inflight[0][0] < cursor:
                    take()[1].cancel()
                # Hand the chunk over without keeping it: a read suspended here (its client stopped
                # reading) holds no chunk of its own, only its read-ahead's answers (the budget).
                out = [data]
                del data, msg, fut
                yield out.pop()
            if h.hexdigest() != self.info.blob_id:
                raise BlobError(f"blob {self.info.blob_id}: stored chunks do not match its digest")
        finally:
            while inflight:
                take()[1].cancel()


class ObjectStoreBackend(BlobBackend):
    """Blobs in the JetStream object store ``bucket`` (replicated ``replicas`` times)."""

    name = "objectstore"

    def __init__(self, js: Any, staging_root: Path, *, replicas: int = 1, bucket: str = BUCKET) -> None:
        super().__init__()
        self.js = js
        self.bucket = bucket
        self.stream = f"OBJ_{bucket}"
        self.replicas = replicas
        self.root = Path(staging_root)
        self.tmp = self.root / TMP_DIR
        self._locks: dict[str, list[Any]] = {}  # name -> [lock, holders and waiters]
        self.obs: ObjectStore | None = None
        self._objects: dict[str, tuple[int, str]] = {}  # name -> (size, nuid)
        self._synced = asyncio.Event()
        self._sub: Any = None
        #: the acknowledgements of the chunks this node publishes
        self.acks = _ChunkAcks(lambda: self.js._nc)
        self._sweeper: asyncio.Task[None] | None = None
        #: read-ahead requests the reads may still add (READ_AHEAD_BUDGET)
        self.read_tokens = READ_AHEAD_BUDGET

    def chunk_size(self) -> int:
        """The chunk size of a put: :data:`CHUNK_SIZE`, or less when the server's ``max_payload``
        (from its INFO) leaves less room."""
        return chunk_for(getattr(getattr(self.js, "_nc", None), "max_payload", None))

    # -- counters (from the metadata subjects, this node's writes and everyone else's)
    def _apply(self, name: str, size: int | None, nuid: str | None) -> None:
        old = self._objects.pop(name, None)
        if old is not None:
            self.blobs -= 1
            self.bytes -= old[0]
        if size is not None and nuid:
            self._objects[name] = (size, nuid)
            self.blobs += 1
            self.bytes += size

    async def _on_meta(self, msg: Any) -> None:
        try:
            obj = api.ObjectInfo.from_response(json.loads(msg.data))
            if not isinstance(obj.name, str) or msg.subject != self._meta_subject(obj.name):
                # Someone with rights on the stream naming another object: it would drop a live
                # object from this node's view, and start-up would purge its chunks (a red team).
                log.warning("blobstore: object metadata on %s names another object; ignored", msg.subject)
            elif obj.deleted:
                self._apply(obj.name, None, None)
            else:
                self._apply(obj.name, int(obj.size or 0), obj.nuid)
        except Exception as e:  # noqa: BLE001 - a foreign or broken metadata message
            log.warning("blobstore: unreadable object metadata on %s: %s", msg.subject, e)
        try:
            if not self._synced.is_set() and msg.metadata.num_pending == 0:
                self._synced.set()
        except Exception:  # noqa: BLE001
            self._synced.set()

    # -- start-up
    async def _ensure_bucket(self) -> ObjectStore:
        config = api.ObjectStoreConfig(bucket=self.bucket, replicas=self.replicas, storage=api.StorageType.FILE,
                                       description="unibus: room blobs (client-side encrypted)")
        try:
            return await self.js.create_object_store(self.bucket, config=config)
        except APIError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise
        info = await self.js.stream_info(self.stream)
        # Raised only, like the core's buckets: a node restarted with a stale,
        # lower --kv-replicas must not take the blobs back to R1.
        if (info.config.num_replicas or 1) < self.replicas:
            info.config.num_replicas = self.replicas
            await self.js.update_stream(info.config)
            log.info("blobstore: object store %s now has %d replicas", self.bucket, self.replicas)
        return await self.js.object_store(self.bucket)

    async def start(self, room_exists: RoomExists | None = None) -> None:
        make_private_dir(self.root)
        leftovers = await asyncio.to_thread(clean_staging, self.tmp)
        if leftovers:
            log.info("blobstore: removed %d unfinished upload(s) left in %s", leftovers, self.tmp)
        try:
            self.obs = await self._ensure_bucket()
            all_meta = f"$O.{self.bucket}.M.>"
            try:
                await self.js.get_last_msg(self.stream, all_meta)
            except NotFoundError:
                self._synced.set()
            self._sub = await self.js.subscribe(all_meta, cb=self._on_meta, ordered_consumer=True,
                                                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
            await within(self._synced.wait(), 30)
        except _UNAVAILABLE as e:
            raise _unavailable(e) from None
        if room_exists is not None:
            rooms = sorted({name.split("/", 1)[0] for name in self._objects})
            for room_id in rooms:
                if not await room_exists(room_id):
                    n = await self.delete_room(room_id)
                    log.info("blobstore: removed %d blob(s) of deleted room %s", n, room_id)
        await self._purge_orphaned_chunks()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="blobstore-orphaned-chunks")
        log.info("blobstore: object store %s: %d blob(s), %d bytes", self.bucket, self.blobs, self.bytes)

    async def _sweep(self) -> None:
        """Every :data:`SWEEP_EVERY`, purge the orphaned chunks that aged while this node runs:
        those of uploads whose purge failed (JetStream in trouble) or whose metadata's fate was
        unknown. Without it they stayed until a node started."""
        while True:
            await asyncio.sleep(SWEEP_EVERY * random.uniform(0.8, 1.2))  # noqa: S311 - not a secret
            try:
                await self._purge_orphaned_chunks(fresh=True)
            except Exception as e:  # noqa: BLE001 - housekeeping only: the next sweep tries again
                log.warning("blobstore: the sweep for orphaned chunks failed: %s", e)

    async def _purge_orphaned_chunks(self, *, fresh: bool = False) -> int:
        """Purge the chunks that no metadata names and whose newest message is older than
        :data:`ORPHAN_AGE`; how many subjects were purged.

        This node's view of the metadata (``_objects``) picks the candidates.
        At start-up it was just read to its end. A running node's view can lag
        behind, or stop, with its consumer, so with ``fresh`` the metadata is
        read again from the stream after the candidates were aged, just before
        they are purged, and every chunk that any metadata message names is
        kept (docs/blobstore.md, "Cluster mode").
        """
        try:
            info = await self.js.stream_info(self.stream, subjects_filter=f"$O.{self.bucket}.C.>")
        except Exception as e:  # noqa: BLE001 - housekeeping only
            log.warning("blobstore: cannot list object chunks: %s", e)
            return 0
        live = {nuid for _size, nuid in self._objects.values()}
        # Ages in the stream's own time (its leader stamps every message), not this node's clock:
        # a node whose clock ran ahead took every upload under way for orphans (a red team, with
        # 700 s). "Now" is the stream's newest message, so an idle stream ages nothing.
        try:  # the newest message that still exists (the last sequence may have been purged)
            newest = await self.js.get_msg(self.stream, subject=f"$O.{self.bucket}.>")
        except NotFoundError:  # an empty stream
            return 0
        except Exception as e:  # noqa: BLE001 - housekeeping only
            log.warning("blobstore: cannot read the object store's newest message: %s", e)
            return 0
        now = newest.time
        if now is None:
            return 0
        aged = []
        for subject in (info.state.subjects or {}):
            if subject.rsplit(".", 1)[-1] in live:
                continue
            try:
                last = await self.js.get_msg(self.stream, subject=subject)
            except Exception as e:  # noqa: BLE001
                log.warning("blobstore: cannot purge orphaned chunks %s: %s", subject, e)
                continue
            if last.time is None or (now - last.time).total_seconds() >= ORPHAN_AGE:
                aged.append(subject)
        if aged and fresh:
            try:
                named = await self._named_nuids()
            except Exception as e:  # noqa: BLE001 - housekeeping only: nothing is purged unseen
                log.warning("blobstore: cannot read the object metadata afresh; no orphaned chunks purged: %s", e)
                return 0
            aged = [subject for subject in aged if subject.rsplit(".", 1)[-1] not in named]
        purged = 0
        for subject in aged:
            try:
                await self.js.purge_stream(self.stream, subject=subject)
            except Exception as e:  # noqa: BLE001
                log.warning("blobstore: cannot purge orphaned chunks %s: %s", subject, e)
                continue
            log.info("blobstore: purged orphaned chunks %s", subject)
            purged += 1
        return purged

    async def _named_nuids(self, timeout: float = 30.0) -> set[str]:
        """The nuid of every object that the last metadata message of any name gives, read afresh
        from the stream. Any: a message on one name's subject that names another object (someone
        with rights on the stream) keeps its chunks too, as nothing here may purge a live object's."""
        return {obj.nuid for obj in await self._last_metadata(timeout)
                if isinstance(obj.nuid, str) and obj.nuid and not obj.deleted}

    # -- read-only access (membershipd backup): no bucket made, no housekeeping
    async def open_existing(self) -> bool:
        """Open the bucket without creating or changing anything; False if it does not exist."""
        try:
            self.obs = await self.js.object_store(self.bucket)
        except NotFoundError:
            return False
        except (*_UNAVAILABLE, APIError) as e:
            raise _unavailable(e) from None
        return True

    async def object_names(self, timeout: float = 30.0) -> list[str]:
        """The names of the live objects: the last metadata message of each, read to the end."""
        names: set[str] = set()
        for obj in await self._last_metadata(timeout):
            if not isinstance(obj.name, str):  # a foreign message (someone with rights on the stream)
                continue
            if obj.deleted:
                names.discard(obj.name)
            else:
                names.add(obj.name)
        return sorted(n for n in names if n.count("/") == 1)

    async def _last_metadata(self, timeout: float) -> list[api.ObjectInfo]:
        """The last metadata message of every name, read from the stream to its end (not this
        node's view), in the stream's order; unreadable ones are logged and left out."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            queue.put_nowait(msg)

        async def scan() -> list[api.ObjectInfo]:
            sub = await self.js.subscribe(f"$O.{self.bucket}.M.>", stream=self.stream, cb=on_msg,
                                          ordered_consumer=True, deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                                          inactive_threshold=5.0)
            try:
                info = await sub.consumer_info()
                found: list[api.ObjectInfo] = []
                if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                    return []
                while True:
                    msg = await queue.get()
                    try:
                        found.append(api.ObjectInfo.from_response(json.loads(msg.data)))
                    except Exception as e:  # noqa: BLE001 - a foreign or broken metadata message
                        log.warning("blobstore: unreadable object metadata on %s: %s", msg.subject, e)
                    if msg.metadata.num_pending == 0:
                        return found
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

        try:
            return await within(scan(), timeout)
        except (*_UNAVAILABLE, APIError) as e:
            raise _unavailable(e) from None

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            await cancel_and_wait(sweeper)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be gone
                await sub.unsubscribe()
        await self.acks.close()

    # -- helpers
    @contextlib.asynccontextmanager
    async def name_lock(self, name: str) -> AsyncIterator[None]:
        """One lock per object name on this node: the same blob uploaded twice at once is put once.
        The lock is forgotten when nobody holds or waits for it (an ``asyncio.Lock`` reads unlocked
        while its next waiter has not run yet: forgotten then, a third comer got a lock of its own)."""
        entry = self._locks.get(name)
        if entry is None:
            entry = self._locks[name] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                self._locks.pop(name, None)

    def _store(self) -> ObjectStore:
        if self.obs is None:
            raise BlobUnavailable("the object store backend is not started")
        return self.obs

    def _meta_subject(self, name: str) -> str:
        """The metadata subject of the object ``name``, as nats-py's object store names it."""
        return f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"

    @staticmethod
    def _name(room_id: str, blob_id: str) -> str:
        return f"{check_room_id(room_id)}/{check_blob_id(blob_id)}"

    async def _get_object(self, room_id: str, blob_id: str) -> tuple[BlobInfo, str] | None:
        name = self._name(room_id, blob_id)
        try:
            obj = await self._store().get_info(name)
        except (ObjectNotFoundError, NotFoundError):
            return None
        except BadObjectMetaError:  # not JSON: a foreign message; a new upload of the blob replaces it
            log.warning("blobstore: object %s: its metadata is not an object's; ignored", name)
            return None
        except _UNAVAILABLE as e:
            raise _unavailable(e) from None
        found = self._info_from(obj, room_id, blob_id, log_as=log.warning)
        return None if found is None else (found, obj.nuid)

    def _info_from(self, obj: api.ObjectInfo, room_id: str, blob_id: str,
                   log_as: Any = None) -> BlobInfo | None:
        """The blob that the metadata ``obj`` describes, or None if it is not a unibus blob's
        (its digest not its name's blob id, or no uploader and creation time)."""
        name = f"{room_id}/{blob_id}"
        digest = _digest_of(obj)
        if digest is None or digest.hex() != blob_id:
            if log_as is not None:
                log_as("blobstore: object %s: digest does not match its name; ignored", name)
            return None
        try:
            meta = json.loads(obj.description or "{}")
            size = int(obj.size or 0)
        except (TypeError, ValueError):  # foreign metadata: a description that is no JSON string, ...
            meta = size = None
        uploader = meta.get("uploader") if isinstance(meta, dict) else None
        created = meta.get("created") if isinstance(meta, dict) else None
        nuid, chunks = obj.nuid, obj.chunks
        if (not isinstance(nuid, str) or not _NUID.fullmatch(nuid) or not isinstance(chunks, int) or chunks < 0
                or size is None or (size == 0) != (chunks == 0)):
            # Foreign metadata: its chunk subject could match other objects' (a wildcard), or none.
            if log_as is not None:
                log_as("blobstore: object %s: metadata names no chunks of its own; ignored", name)
            return None
        if not isinstance(uploader, str) or not isinstance(created, (int, float)):
            if log_as is not None:
                log_as("blobstore: object %s: unreadable metadata; ignored", name)
            return None
        return BlobInfo(room_id, blob_id, size, uploader, float(created))

    async def _put(self, info: BlobInfo, path: Path) -> None:
        """Copy a blob's file into the object store (a restore, or ``migrate-to-kv``): its chunks,
        then, if the bytes still hash to the blob id, the metadata message (:meth:`_publish_meta`).
        The file is read and hashed :data:`PUT_READ` bytes at a time in a worker thread while the
        previous block is published."""
        chunks = _Chunks(self)
        h = hashlib.sha256()
        loop = asyncio.get_running_loop()
        # Opened here, not in a worker: a cancellation of that await (an operator command stopped,
        # migrate-to-kv's copy) left the file the worker opened to the garbage collector (a review).
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in the finally below

        def read() -> bytes:
            block = f.read(PUT_READ)
            h.update(block)
            return block

        try:
            with _nats_errors(f"blob {info.blob_id}"):
                block = await loop.run_in_executor(None, read)
                while block:
                    following = loop.run_in_executor(None, read)  # read ahead while publishing
                    try:
                        await chunks.add([block])
                    finally:
                        block = await following  # never leave the worker reading a file about to be closed
                await chunks.close()
            if chunks.size != info.size or h.hexdigest() != info.blob_id:
                raise BlobError(f"blob {info.blob_id}: the file changed while it was copied")
            existing, old, last = await self._look(info.room_id, info.blob_id)
            if existing is not None:
                raise _LostRace()  # stored meanwhile
            await self._publish_meta(info, chunks, old, last)
        except _LostRace:  # stored by someone else meanwhile: there it is
            await chunks.discard()
        except BaseException:
            await chunks.discard()
            raise
        finally:
            await asyncio.to_thread(f.close)

    async def _publish_meta(self, info: BlobInfo, chunks: _Chunks, old: api.ObjectInfo | None, last: int) -> None:
        """Make the object whose chunks were all acknowledged visible: its ``ObjectInfo`` on its
        metadata subject with ``Nats-Rollup: sub``, as nats-py's ``ObjectStore.put`` writes it,
        so its ``ObjectStore.get`` and the ``nats`` CLI read the object. If the metadata's own
        acknowledgement is lost, it may be stored all the same: its chunks are then kept (the
        caller's discard purges nothing once this started), so the blob is either whole or absent
        (orphaned chunks, which no stored object names, are purged later). ``old`` and ``last`` are what
        :meth:`_look` read, the caller's decision to store: the metadata is stored only if nothing
        was stored under the name since, else :class:`_LostRace`. The chunks of ``old``, which the
        new metadata replaces, are purged."""
        name = self._name(info.room_id, info.blob_id)
        meta_subject = self._meta_subject(name)
        with _nats_errors(f"blob {info.blob_id}"):
            obj = api.ObjectInfo(name=name, bucket=self.bucket, nuid=chunks.nuid, size=chunks.size,
                                 chunks=chunks.count, mtime=datetime.now(UTC).isoformat(),
                                 digest="SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(info.blob_id)).decode(),
                                 description=json.dumps({"uploader": info.uploader, "created": info.created}),
                                 options=api.ObjectMetaOptions(max_chunk_size=chunks.chunk))
            await self._check_chunks(info, chunks)
            nc = getattr(self.js, "_nc", None)
            if nc is not None and not nc.is_connected:  # never buffered for a later reconnect
                raise BlobUnavailable("the NATS connection is reconnecting; try again")
            chunks.check_fresh()  # a commit that waited (a lock, a slow store) must not name purged chunks
            count, chunks.count = chunks.count, 0  # from here on they are the object's: never purged by a discard
            try:
                # Stored only if nobody stored this name's metadata since _look read it: two nodes
                # committing the same blob at once would otherwise both store it, the second
                # rolling up the first (purging its chunks under its downloads, or leaving them to
                # nobody: found by red teams).
                await self.js.publish(meta_subject, json.dumps(obj.as_dict()).encode(),
                                      headers={api.Header.ROLLUP: "sub",
                                               api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)})
            except (APIError, NoStreamResponseError) as e:
                if _refused_before_storing(e):  # the chunks are not the object's: the caller's discard purges them
                    chunks.count = count
                    if isinstance(e, APIError) and e.err_code == WRONG_LAST_SEQUENCE:
                        raise _LostRace() from None
                raise
            # Any other failure (a lost acknowledgement, a reconnect) leaves the chunks: the metadata
            # may still be stored, later even (nats-py sends what it buffered once it reconnects, and
            # nats-server may answer a read sent after it first). Purging them on such an ambiguous
            # outcome broke a stored object (found by a red team). They are purged as orphans later
            # if no object names them.
            try:
                chunks.count = count
                # Acknowledged, so stored by now: if the send was held up (a stalled connection)
                # until the chunks could look like orphans, a purge may still come after the count.
                chunks.check_fresh()
                await self._check_chunks(info, chunks)
            except BlobError:
                with contextlib.suppress(Exception):  # a broken object must not stay visible
                    await self._store().delete(name)
                self._apply(name, None, None)
                raise
            finally:
                chunks.count = 0
        if old is not None and not old.deleted and old.nuid and old.nuid != chunks.nuid:
            with contextlib.suppress(Exception):  # the old object's chunks, no longer referenced
                await self.js.purge_stream(self.stream, subject=f"$O.{self.bucket}.C.{old.nuid}")
        self._apply(name, info.size, chunks.nuid)

    async def _last_meta(self, meta_subject: str) -> tuple[api.ObjectInfo | None, int]:
        """The metadata stored last on ``meta_subject`` (a tombstone included), and its stream
        sequence; ``(None, 0)`` if there is none."""
        try:
            msg = await self.js.get_last_msg(self.stream, meta_subject)
        except NotFoundError:
            return None, 0
        try:
            return api.ObjectInfo.from_response(json.loads(msg.data or b"{}")), msg.seq or 0
        except Exception:  # noqa: BLE001 - a foreign or broken metadata message: replaced, in order
            return None, msg.seq or 0

    async def _check_chunks(self, info: BlobInfo, chunks: _Chunks) -> None:
        """BlobUnavailable unless every chunk of ``chunks`` is still stored. An upload's chunks are
        orphans until its metadata is stored, and nodes purge orphans whose newest chunk is older
        than :data:`ORPHAN_AGE`, when they start and every :data:`SWEEP_EVERY`. Uploads publish as
        the body arrives, and a body may pause for long stretches if it came fast enough before
        (the upload rate is an average). :meth:`_Chunks.check_fresh` refuses an upload before its
        chunks can look that old; this count is the second line: made before the metadata is
        published and again after, it covers a purge that listed the live objects before the
        metadata was stored."""
        found = await self.js.stream_info(self.stream, subjects_filter=chunks.subject)
        stored = (found.state.subjects or {}).get(chunks.subject, 0)
        if stored != chunks.count:
            raise BlobUnavailable(f"blob {info.blob_id}: {chunks.count - stored} of its {chunks.count} chunks were "
                                  "purged during the upload (a node took them for orphans); try again")

    # -- the contract
    async def begin(self, room_id: str) -> Upload:
        check_room_id(room_id)
        if self.obs is None:
            raise BlobUnavailable("the object store backend is not started")
        return ObjUpload(self, room_id)

    async def info(self, room_id: str, blob_id: str) -> BlobInfo | None:
        found = await self._get_object(room_id, blob_id)
        return None if found is None else found[0]

    async def whole_info(self, room_id: str, blob_id: str) -> BlobInfo | None:
        """:meth:`info`, or None if the object's chunks are not all stored: an upload of the blob
        then replaces it instead of answering with a broken object for ever (a red team)."""
        return (await self._look(room_id, blob_id))[0]

    async def _look(self, room_id: str, blob_id: str) -> tuple[BlobInfo | None, api.ObjectInfo | None, int]:
        """One read of the name's metadata, for a commit: the blob if it is stored whole (else
        None), the metadata as read, and its stream sequence, which :meth:`_publish_meta` expects."""
        name = self._name(room_id, blob_id)
        with _nats_errors(f"blob {blob_id}"):
            obj, seq = await self._last_meta(self._meta_subject(name))
            found = None if obj is None or obj.deleted else self._info_from(obj, room_id, blob_id)
            if found is not None and not await self._whole(obj):
                log.warning("blobstore: object %s: chunks missing; an upload of it replaces it", name)
                found = None
        return found, obj, seq

    async def _whole(self, obj: api.ObjectInfo) -> bool:
        """Every chunk that the metadata ``obj`` counts is stored."""
        subject = f"$O.{self.bucket}.C.{obj.nuid}"
        found = await self.js.stream_info(self.stream, subjects_filter=subject)
        return (found.state.subjects or {}).get(subject, 0) == (obj.chunks or 0)

    async def open(self, room_id: str, blob_id: str) -> BlobReader | None:
        found = await self._get_object(room_id, blob_id)
        if found is None:
            return None
        return ObjReader(self, *found)

    async def delete(self, room_id: str, blob_id: str) -> bool:
        name = self._name(room_id, blob_id)
        try:
            await self._store().delete(name)
        except (ObjectNotFoundError, NotFoundError, BadObjectMetaError):  # no object (a foreign message: ignored)
            return False
        except _UNAVAILABLE as e:
            raise _unavailable(e) from None
        self._apply(name, None, None)
        return True

    async def delete_room(self, room_id: str) -> int:
        prefix = check_room_id(room_id) + "/"
        n = 0
        for name in [k for k in self._objects if k.startswith(prefix)]:
            if await self.delete(room_id, name[len(prefix):]):
                n += 1
        return n

    async def list_room(self, room_id: str) -> list[BlobInfo]:
        prefix = check_room_id(room_id) + "/"
        out = []
        for name in sorted(k for k in self._objects if k.startswith(prefix)):
            info = await self.info(room_id, name[len(prefix):])
            if info is not None:
                out.append(info)
        return out
