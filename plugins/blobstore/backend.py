"""The blob backend contract: what the HTTP layer needs from a place that keeps blobs.

A blob is an opaque byte string (a client-side encrypted file), addressed by
its SHA-256 (``blob_id``, 64 lowercase hex characters) within a room. Two
backends implement :class:`BlobBackend`: :class:`~unibus.plugins.blobstore.fs.FsBackend`
(single node, ``<data-dir>/blobs``) and
:class:`~unibus.plugins.blobstore.objectstore.ObjectStoreBackend` (cluster
mode, the JetStream object store). ``tests/plugins/blobstore/test_backend_contract.py``
runs the same suite against both.

An upload is staged first, whatever the backend: :meth:`BlobBackend.begin`
returns an :class:`Upload` whose chunks go to a temporary file under
``<data-dir>/blobs/.tmp`` (hashed on the way, in a worker thread, one chunk in
flight at a time, so memory stays flat); :meth:`Upload.finish` fsyncs it and
returns the SHA-256; only then does the caller decide, and
:meth:`Upload.commit` makes the blob visible atomically, or
:meth:`Upload.abort` throws it away. Nothing half-written is ever visible.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import hashlib
import os
import re
import secrets
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

BLOB_ID_RE = re.compile(r"\A[0-9a-f]{64}\Z")
ROOM_ID_RE = re.compile(r"\A[a-z0-9]{1,40}\Z")
#: Staging directory name inside ``<data-dir>/blobs`` (not a valid room id).
TMP_DIR = ".tmp"
#: Bytes handed to the writer thread at a time (as the pieces received, never joined).
WRITE_CHUNK = 4 * 1024 * 1024
#: Bytes an upload's connection asks of the socket per ``recv`` while the body streams in.
RECV_SIZE = 1024 * 1024
#: Bytes written to a staging file between two starts of its writeback (see StagedFile).
WRITEBACK_EVERY = 8 * 1024 * 1024
#: Pieces per writev(2) call (the kernel's limit is 1024).
IOV_MAX = 1024
#: Bytes read from a stored blob at a time when it is streamed (not sendfile).
READ_CHUNK = 256 * 1024

RoomExists = Callable[[str], Awaitable[bool]]


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), which the os module does not offer; None elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
#: ``SYNC_FILE_RANGE_WRITE``: start writing back the dirty pages of the range, do not wait.
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing back ``length`` bytes of ``fd`` from ``offset``, and return at once.

    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: the pages stay in the page cache.
    (``posix_fadvise(DONTNEED)`` also starts the writeback of dirty pages, but
    drops the pages already written back, which a slow upload's are.) Advice
    only: nothing on a system without it, and an error changes nothing, as the
    fdatasync before the commit is what makes the blob durable.
    """
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class BlobError(Exception):
    """A backend failure that is not the client's fault (I/O, JetStream)."""


class BlobUnavailable(BlobError):
    """The backend cannot answer now (JetStream without quorum): 503."""


def check_blob_id(blob_id: str) -> str:
    if not isinstance(blob_id, str) or not BLOB_ID_RE.match(blob_id):
        raise ValueError(f"invalid blob id {blob_id!r}: 64 lowercase hex characters (a SHA-256)")
    return blob_id


def check_room_id(room_id: str) -> str:
    if not isinstance(room_id, str) or not ROOM_ID_RE.match(room_id):
        raise ValueError(f"invalid room id {room_id!r}")
    return room_id


@dataclass(frozen=True)
class BlobInfo:
    """What is known about a stored blob."""

    room_id: str
    blob_id: str
    size: int
    uploader: str
    created: float  # unix time

    def meta_json(self) -> dict[str, Any]:
        return {"v": 1, "room_id": self.room_id, "blob_id": self.blob_id, "size": self.size,
                "uploader": self.uploader, "created": self.created}

    @classmethod
    def from_meta(cls, doc: Any) -> BlobInfo:
        """Parse a metadata document; ValueError when malformed."""
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise ValueError("not a blob metadata document")
        size, created, uploader = doc.get("size"), doc.get("created"), doc.get("uploader")
        if type(size) is not int or size < 0 or not isinstance(created, (int, float)) or not isinstance(uploader, str):
            raise ValueError("blob metadata has bad fields")
        return cls(check_room_id(doc.get("room_id")), check_blob_id(doc.get("blob_id")), size, uploader,
                   float(created))


class BlobReader(abc.ABC):
    """An opened stored blob. Use as an async context manager."""

    info: BlobInfo
    #: A path the HTTP layer may sendfile() from (fs backend), else None.
    path: Path | None = None
    #: An open binary file object positioned at 0 (fs backend), else None.
    file: Any = None

    @abc.abstractmethod
    def chunks(self, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The blob's bytes, in order, a bounded chunk at a time."""

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Upload(abc.ABC):
    """A blob being received. ``write`` → ``finish`` → ``commit`` (or ``abort`` at any point)."""

    room_id: str
    size: int = 0

    @abc.abstractmethod
    async def write(self, data: bytes | Sequence[bytes]) -> None:
        """Append ``data``, one buffer or a sequence of pieces (hashed and written off the event loop)."""

    @abc.abstractmethod
    async def finish(self) -> bytes:
        """Flush and fsync what was written; return its SHA-256 (32 bytes)."""

    @abc.abstractmethod
    async def commit(self, uploader: str) -> tuple[BlobInfo, bool]:
        """Make the blob visible; ``(info, created)``: ``created`` is False when
        the same blob was already there (idempotent upload; the first upload's
        metadata is kept and nothing is duplicated)."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Throw the staged bytes away. Idempotent; a no-op after commit."""


class StagedUpload(Upload):
    """An upload staged in a temporary file of the backend's ``tmp`` dir; backends add ``commit``."""

    def __init__(self, backend: Any, room_id: str) -> None:
        self.backend = backend
        self.room_id = room_id
        self.staged = StagedFile(backend.tmp)
        self._done = False

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.staged.size

    async def write(self, data: bytes | Sequence[bytes]) -> None:
        await self.staged.write(data)

    async def finish(self) -> bytes:
        return await self.staged.finish()

    async def abort(self) -> None:
        if not self._done:
            self._done = True
            await self.staged.discard()


class BlobBackend(abc.ABC):
    """Where blobs live. Every method is a coroutine unless said otherwise."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.blobs = 0
        self.bytes = 0

    def stats(self) -> dict[str, Any]:
        """``{"backend", "blobs", "bytes"}`` from in-memory counters (cheap; no I/O)."""
        return {"backend": self.name, "blobs": self.blobs, "bytes": self.bytes}

    @abc.abstractmethod
    async def start(self, room_exists: RoomExists | None = None) -> None:
        """Recover (remove staged leftovers of a crash), count what is stored, and,
        when ``room_exists`` is given, delete the blobs of rooms it says are gone."""

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    async def begin(self, room_id: str) -> Upload: ...

    @abc.abstractmethod
    async def info(self, room_id: str, blob_id: str) -> BlobInfo | None: ...

    @abc.abstractmethod
    async def open(self, room_id: str, blob_id: str) -> BlobReader | None:
        """The blob for reading, or None if absent."""

    @abc.abstractmethod
    async def delete(self, room_id: str, blob_id: str) -> bool:
        """Delete one blob; False if it was not there."""

    @abc.abstractmethod
    async def delete_room(self, room_id: str) -> int:
        """Delete every blob of a room; return how many there were."""

    @abc.abstractmethod
    async def list_room(self, room_id: str) -> list[BlobInfo]: ...


# --------------------------------------------------------------------------- staging


def make_private_dir(path: Path) -> bool:
    """mkdir 0700 (parents too); True if it was created."""
    try:
        path.mkdir(mode=0o700)
        return True
    except FileExistsError:
        return False
    except FileNotFoundError:
        make_private_dir(path.parent)
        return make_private_dir(path)


def remove_tree(path: Path, stop: threading.Event) -> bool:
    """``shutil.rmtree(path)``, errors ignored, that gives up between two directories once
    ``stop`` is set; True when all of it is gone.

    A room of many blobs takes long to remove, in a thread no stop can interrupt, and the
    interpreter's exit waits for that thread. What a stop leaves is in the staging directory,
    already out of every room, and the next start removes it (:func:`clean_staging`).
    """
    if os.path.islink(path):  # os.walk would list the link's target: remove the link alone, as rmtree refuses it
        with contextlib.suppress(OSError):
            os.unlink(path)
        return not os.path.lexists(path)
    for top, dirs, files in os.walk(path, topdown=False):
        if stop.is_set():
            return False
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(top, name))
        for name in dirs:  # a link to a directory is listed here, and never followed
            entry = os.path.join(top, name)
            with contextlib.suppress(OSError):
                if os.path.islink(entry):
                    os.unlink(entry)
                else:
                    os.rmdir(entry)
    with contextlib.suppress(OSError):
        os.rmdir(path)
    return not os.path.lexists(path)


def clean_staging(tmp: Path, stop: threading.Event | None = None) -> int:
    """Remove everything under the staging directory (the leftovers of a crash, or of a
    deletion a stop cut short); return how many entries. Gives up between two directories
    once ``stop`` is set (a stop during the start-up): what is left waits for the next start."""
    make_private_dir(tmp)
    stop = stop or threading.Event()
    n = 0
    for entry in list(tmp.iterdir()):
        if stop.is_set():
            break
        n += 1
        if entry.is_dir() and not entry.is_symlink():
            remove_tree(entry, stop)
        else:
            entry.unlink(missing_ok=True)
    return n


#: A staging file's worker job: queued, started, or taken back by a submit that failed (StagedFile._submit).
_QUEUED, _STARTED, _WITHDRAWN = object(), object(), object()


class StagedFile:
    """A temporary directory ``<tmp>/up-<random>/`` holding the upload as ``data``.

    Each chunk is hashed in one worker thread and written in another, at the
    same time, while the event loop receives the next one; at most one chunk
    is in flight, so memory stays at a few chunks whatever the blob size.
    Hashing and writing one after the other in a single thread made an
    upload wait for their sum (docs/benchmarks.md, "Blobs").
    """

    DATA = "data"

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / f"up-{secrets.token_hex(12)}"
        self.dir.mkdir(mode=0o700)
        self.path = self.dir / self.DATA
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:  # out of descriptors, say: the directory goes too, not at the next start
            with contextlib.suppress(OSError):
                os.rmdir(self.dir)  # empty; and rmtree would need a descriptor of its own
            raise
        self._hash = hashlib.sha256()
        self._pending: list[asyncio.Future[Any]] = []
        self._error: BaseException | None = None
        self._flush: asyncio.Future[bytes] | None = None
        self._cleanup: asyncio.Future[Any] | None = None
        # Worker-thread jobs not yet returned, and whether the file was discarded: then the last
        # job to return closes and removes it, in its own thread (see discard).
        self._jobs = 0
        self._jobs_lock = threading.Lock()
        self._discarded = False
        self.size = 0
        self._written = self._flushed = 0
        self.digest: bytes | None = None

    def _hash_sync(self, parts: Sequence[bytes]) -> None:
        for p in parts:
            self._hash.update(p)

    def _write_sync(self, parts: Sequence[bytes]) -> None:
        fd = self._fd
        assert fd is not None
        views = [memoryview(p).cast("B") for p in parts]
        while views:  # writev: the pieces as they came off the socket, no join
            n = os.writev(fd, views[:IOV_MAX])
            while n:
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0] = views[0][n:]
                    n = 0
            while views and not len(views[0]):
                views.pop(0)
        self._written += sum(len(p) for p in parts)
        if self._written - self._flushed >= WRITEBACK_EVERY:
            # Start the writeback of what was written since the last call, now, in the
            # background, so that the fdatasync at the end has only the tail left to wait
            # for. The pages stay in the page cache: a download right after the upload (a
            # room's other members fetching a new blob) is served from memory. Dropping
            # them instead (0.12 before its release) saved membershipd CPU only on a VM
            # that hands freed pages back to its host, and made that download read the
            # disk (docs/benchmarks.md, "Blobs: what was tried and not kept").
            start_writeback(fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written

    async def _settle(self) -> list[Any]:
        """Wait for what runs in the worker threads (a chunk's hash and write, or the final
        flush), even when one fails; their results.

        A caller cancelled here leaves them in ``_pending`` (the threads cannot
        be stopped), so that :meth:`discard` still waits for them before it
        closes the file under them. The first error is kept: every later
        :meth:`write` and :meth:`finish` raises it again, so a file that
        missed a chunk can never be finished.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)  # not a traceback that grows with every call
        if not self._pending:
            return []
        results = await asyncio.shield(asyncio.gather(*self._pending, return_exceptions=True))
        self._pending = []
        for result in results:
            if isinstance(result, BaseException):
                self._error = result
                raise result
        return results

    def _check_open(self) -> None:
        if self._discarded:
            raise RuntimeError("this upload's staging file was discarded")

    async def write(self, data: bytes | Sequence[bytes]) -> None:
        self._check_open()
        await self._settle()
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else [p for p in data if len(p)]
        size = sum(len(p) for p in parts)
        if not size:
            return
        self.size += size
        self._pending = self._start(parts)

    def _start(self, parts: list[Any]) -> list[asyncio.Future[Any]]:
        """A chunk's hash and write, each in a worker thread of its own, at once."""
        return [self._submit(self._hash_sync, parts), self._submit(self._write_sync, parts)]

    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a worker thread, counted as one of the file's jobs (see :meth:`_job`)."""
        with self._jobs_lock:
            if self._discarded:
                raise RuntimeError("this upload's staging file was discarded")
            self._jobs += 1
        state = [_QUEUED]
        try:
            return asyncio.get_running_loop().run_in_executor(None, self._job, state, fn, args)
        except BaseException:
            # The executor may have queued the job before it failed to start a thread for it
            # (out of threads): taken back here unless it started, so that it never runs uncounted.
            with self._jobs_lock:
                if state[0] is _QUEUED:
                    state[0] = _WITHDRAWN
                    self._jobs -= 1
            raise

    def _job(self, state: list[object], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        with self._jobs_lock:
            if state[0] is _WITHDRAWN:
                return None
            state[0] = _STARTED
        try:
            return fn(*args)
        finally:
            with self._jobs_lock:
                self._jobs -= 1
                last = self._discarded and not self._jobs
            if last:  # discarded while it ran: the last job closes and removes the file
                self._discard_sync()

    def _finish_sync(self) -> bytes:
        assert self._fd is not None
        os.fdatasync(self._fd)  # data and size; the directory fsyncs follow
        fd, self._fd = self._fd, None
        os.close(fd)
        return self._hash.digest()

    async def finish(self) -> bytes:
        if self.digest is None:
            self._check_open()
            if self._flush is None:
                await self._settle()  # the last chunk
                # In _pending too: a caller cancelled during the flush leaves discard to wait for
                # it, and a finish called again waits for the same flush.
                self._flush = self._submit(self._finish_sync)
                self._pending = [self._flush]
            await self._settle()
            self._check_open()  # discarded meanwhile (by another task): the file is gone
            self.digest = self._flush.result()
        return self.digest

    async def discard(self) -> None:
        """Close and remove the staging file, once the threads are done with it; wait for that.

        Nothing here can be cut short by a cancellation, the event loop's
        close included (it cancels every task): the file is marked discarded
        before the first await. If jobs still run in worker threads, the last
        of them to return closes and removes the file, in its own thread; if
        none runs, one more job does it. A second call waits for the same.
        """
        if self._cleanup is None:
            with self._jobs_lock:
                self._discarded = True
                running = self._jobs > 0
            waits = list(self._pending)  # gathered even when done: a failed job's error is retrieved
            if not running:
                try:
                    waits.append(asyncio.get_running_loop().run_in_executor(None, self._discard_sync))
                except RuntimeError:  # the executor is shut down (the loop closing): nothing runs, do it here
                    self._discard_sync()
            self._cleanup = asyncio.gather(*waits, return_exceptions=True)  # a future, not a task
        await asyncio.shield(self._cleanup)

    def discard_unused(self) -> None:
        """Close and remove the staging file at once, in a worker thread: only for one that no
        write, finish or discard ever used (its threads are the ones :meth:`discard` waits for)."""
        self._discard_sync()

    def _discard_sync(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None
        shutil.rmtree(self.dir, ignore_errors=True)
