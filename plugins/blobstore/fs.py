"""The filesystem backend: ``<data-dir>/blobs``, one directory per blob, made visible by one rename.

Layout (directories 0700, files 0600)::

    blobs/
      .tmp/                      staging, same filesystem; emptied at every start
        up-<random>/data         an upload being received
        up-<random>/meta.json    ...its metadata, once the digest checked out
        del-<random>/            a blob or room being deleted
      <room_id>/
        <blob_id>/               appears atomically, data and metadata together
          data                   the blob's bytes (client-side ciphertext)
          meta.json              {"v": 1, "room_id", "blob_id", "size", "uploader", "created"}

Crash safety. A blob and its metadata are built together in a staging
directory (``data`` written in chunks, fsynced; ``meta.json`` written and
fsynced; the staging directory fsynced so both entries are durable), then
the *directory* is renamed to ``<room_id>/<blob_id>`` (``rename(2)`` is atomic)
and the room directory is fsynced before the client gets its 201. So after a
crash at any point, either the blob directory is there with both files
complete, or it is not there at all; leftovers can only be in ``.tmp``, which
is emptied at start-up. A rename onto an existing blob directory fails
(``ENOTEMPTY``): that is the idempotent re-upload, and the new copy is
dropped. Deletion is the same in reverse: rename the blob (or the whole room)
directory into ``.tmp`` (atomic disappearance, then fsync), then remove it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from unibus.aio import retrieve_exception
from unibus.backup import fsync_dir

from .backend import (
    READ_CHUNK,
    TMP_DIR,
    BlobBackend,
    BlobError,
    BlobInfo,
    BlobReader,
    RoomExists,
    StagedUpload,
    Upload,
    check_blob_id,
    check_room_id,
    clean_staging,
    remove_tree,
    make_private_dir,
)

log = logging.getLogger("unibus.plugins.blobstore")

DATA = "data"
META = "meta.json"


def _write_file_durably(path: Path, payload: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _read_meta(blob_dir: Path) -> BlobInfo | None:
    """The blob's metadata if the directory holds a complete blob, else None."""
    try:
        raw = (blob_dir / META).read_bytes()
        st = (blob_dir / DATA).stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        info = BlobInfo.from_meta(json.loads(raw))
    except ValueError:
        log.error("blob %s: unreadable metadata; ignored", blob_dir)
        return None
    if info.size != st.st_size or info.blob_id != blob_dir.name or info.room_id != blob_dir.parent.name:
        log.error("blob %s: metadata does not match the data; ignored", blob_dir)
        return None
    return info


class FsUpload(StagedUpload):
    backend: FsBackend

    def __init__(self, backend: FsBackend, room_id: str) -> None:
        super().__init__(backend, room_id)
        self._committing: asyncio.Future[tuple[BlobInfo, bool]] | None = None

    async def commit(self, uploader: str) -> tuple[BlobInfo, bool]:
        """Write the metadata, then rename the staged directory into place and sync its room directory.

        Once the digest is known, these run in a task of their own, which a
        cancelled caller (membershipd stopping) does not take down with it,
        and the rename and the sync in one worker-thread call, which no
        cancellation cuts in two. :meth:`abort` waits for that task, so the
        staged files are never removed under the rename.
        """
        digest = await self.finish()
        if self._committing is None:
            info = BlobInfo(self.room_id, digest.hex(), self.staged.size, uploader, time.time())
            self._committing = asyncio.ensure_future(self._run_commit(info))
            # Retrieved even when every caller that awaited it was cancelled (asyncio then logged it).
            self._committing.add_done_callback(retrieve_exception)
        return await asyncio.shield(self._committing)

    async def _run_commit(self, info: BlobInfo) -> tuple[BlobInfo, bool]:
        try:
            await asyncio.to_thread(self._prepare_meta, info)  # outside the lock: other commits need not wait
            async with self.backend.lock:
                created, stored, not_durable, trash = await asyncio.to_thread(self._install_sync, info)
                if created:  # visible from here on: counted even if the room directory's fsync failed
                    self.backend._count(info.room_id, 1, info.size)
            if trash is not None:  # the damaged directory this blob replaced, removed outside the lock
                await asyncio.to_thread(remove_tree, trash, self.backend._closing)
            if not_durable is not None:
                raise not_durable
        except Exception as e:
            log.warning("blobstore: blob %s of room %s: %s", info.blob_id, info.room_id, e)
            await self.staged.discard()  # what a failed rename left (abort waits for the same cleanup)
            raise
        self._done = True
        if not created:
            await self.staged.discard()
        return stored, created

    def _prepare_meta(self, info: BlobInfo) -> None:
        """Step 2 of docs/blobstore.md ("Crash safety"); if the task is cancelled after it, the staged
        directory stays complete and unseen, for the next start to empty."""
        _write_file_durably(self.staged.dir / META, json.dumps(info.meta_json()).encode())
        fsync_dir(self.staged.dir)

    def _install_sync(self, info: BlobInfo) -> tuple[bool, BlobInfo, BlobError | None, Path | None]:
        """Steps 3 and 4, in one worker-thread call, so that nothing comes between the rename and
        the room directory's fsync, whatever happens to the task that waits for them. The fsync's
        failure is returned, not raised: the blob is visible by then and must be counted. Last,
        the damaged directory the blob replaced, if any, moved to the staging directory: the
        caller removes it once the lock is released."""
        created, stored, trash = self.backend._install(self.staged.dir, info)
        if not created:
            return created, stored, None, trash
        try:
            fsync_dir(self.backend._room_dir(info.room_id))
        except OSError as e:
            return created, stored, BlobError(f"the blob is stored, but its room directory could not be synced "
                                              f"to disk: {e.strerror}"), trash
        return created, stored, None, trash

    async def abort(self) -> None:
        if self._committing is not None:
            try:
                await asyncio.shield(self._committing)
            except asyncio.CancelledError:
                if not self._committing.cancelled():
                    raise  # this caller was cancelled: the commit goes on, and so does its cleanup
                # The loop is closing (it cancels every task): the commit's thread may still be
                # renaming, so nothing is removed under it; the next start empties the staging directory.
                return
            except Exception:  # noqa: BLE001 - the commit's error is the commit's to raise
                pass
        await super().abort()


def _discard_unclaimed(opening: asyncio.Future[FsUpload]) -> None:
    """Close and remove the staging file of an upload whose caller was cancelled while it was made."""
    if opening.cancelled() or opening.exception() is not None:
        return
    staged = opening.result().staged
    try:
        asyncio.get_running_loop().run_in_executor(None, staged.discard_unused).add_done_callback(retrieve_exception)
    except RuntimeError:  # the loop's executor is shut down: the next start empties the staging directory
        log.debug("blobstore: %s left for the next start", staged.dir)


class FsReader(BlobReader):
    def __init__(self, info: BlobInfo, path: Path, file: Any) -> None:
        self.info = info
        self.path = path
        self.file = file

    async def chunks(self, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        while True:
            data = await asyncio.to_thread(self.file.read, size)
            if not data:
                return
            yield data

    async def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()


class FsBackend(BlobBackend):
    """Blobs on the local filesystem under ``root`` (``<data-dir>/blobs``)."""

    name = "fs"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)
        self.tmp = self.root / TMP_DIR
        self.lock = asyncio.Lock()
        self._rooms: dict[str, list[int]] = {}  # room_id -> [blobs, bytes]
        #: set by :meth:`close`: a deletion still running stops between two blobs
        self._closing = threading.Event()

    # -- counters
    def _count(self, room_id: str, n: int, size: int) -> None:
        agg = self._rooms.setdefault(room_id, [0, 0])
        agg[0] += n
        agg[1] += size
        self.blobs += n
        self.bytes += size
        if agg[0] <= 0:
            self._rooms.pop(room_id, None)

    # -- start-up
    async def start(self, room_exists: RoomExists | None = None) -> None:
        try:
            rooms = await asyncio.to_thread(self._scan)
            if room_exists is not None:
                for room_id in sorted(rooms):
                    if not await room_exists(room_id):
                        n = await self.delete_room(room_id)
                        log.info("blobstore: removed %d blob(s) of deleted room %s", n, room_id)
        except asyncio.CancelledError:  # a stop during the start-up: the threads give up as at close
            self._closing.set()
            raise

    def _scan(self) -> set[str]:
        fresh = make_private_dir(self.root)
        if fresh:
            fsync_dir(self.root.parent)
        leftovers = clean_staging(self.tmp, self._closing)
        if leftovers:
            log.info("blobstore: removed %d unfinished upload(s)/deletion(s) left in %s", leftovers, self.tmp)
        self.blobs = self.bytes = 0
        self._rooms.clear()
        rooms: set[str] = set()
        for room_dir in self.root.iterdir():
            if room_dir.name == TMP_DIR:
                continue
            try:
                check_room_id(room_dir.name)
            except ValueError:
                log.warning("blobstore: %s is not a room directory; ignored", room_dir)
                continue
            if not room_dir.is_dir():
                continue
            rooms.add(room_dir.name)
            for blob_dir in room_dir.iterdir():
                try:
                    check_blob_id(blob_dir.name)
                except ValueError:
                    log.warning("blobstore: %s is not a blob directory; ignored", blob_dir)
                    continue
                info = _read_meta(blob_dir)
                if info is not None:
                    self._count(room_dir.name, 1, info.size)
        log.info("blobstore: %d blob(s), %d bytes in %s", self.blobs, self.bytes, self.root)
        return rooms

    # -- paths
    def _room_dir(self, room_id: str) -> Path:
        return self.root / check_room_id(room_id)

    def _blob_dir(self, room_id: str, blob_id: str) -> Path:
        return self._room_dir(room_id) / check_blob_id(blob_id)

    # -- writes
    async def begin(self, room_id: str) -> Upload:
        check_room_id(room_id)
        opening = asyncio.get_running_loop().run_in_executor(None, FsUpload, self, room_id)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread that makes the staging file cannot be stopped: what it makes
            # for a caller that is gone is thrown away once it is made.
            opening.add_done_callback(_discard_unclaimed)
            raise

    def _install(self, staged_dir: Path, info: BlobInfo) -> tuple[bool, BlobInfo, Path | None]:
        """Rename the staged blob directory into place (under the lock, in a thread); the caller
        syncs the room directory, counts a new blob, and removes the damaged directory it
        replaced (the third item, in the staging directory) once the lock is released."""
        room_dir = self._room_dir(info.room_id)
        if make_private_dir(room_dir):
            fsync_dir(self.root)
        target = room_dir / info.blob_id
        try:
            os.rename(staged_dir, target)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise BlobError(f"cannot store blob {info.blob_id}: {e.strerror}") from None
            existing = _read_meta(target)
            if existing is not None:
                return False, existing, None
            # A damaged blob directory (never made by this code): replaced, and moved to the
            # staging directory; its caller removes it once the commit's lock is released.
            trash = self._move_to_trash(target)
            os.rename(staged_dir, target)
            return True, info, trash
        return True, info, None

    def _move_to_trash(self, path: Path) -> Path | None:
        trash = self.tmp / f"del-{secrets.token_hex(8)}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        fsync_dir(path.parent)
        return trash

    async def delete(self, room_id: str, blob_id: str) -> bool:
        blob_dir = self._blob_dir(room_id, blob_id)
        async with self.lock:
            info = await asyncio.to_thread(_read_meta, blob_dir)
            trash = await asyncio.to_thread(self._move_to_trash, blob_dir)
            if trash is None:
                return False
            if info is not None:
                self._count(room_id, -1, -info.size)
        await asyncio.to_thread(remove_tree, trash, self._closing)
        return True

    async def delete_room(self, room_id: str) -> int:
        room_dir = self._room_dir(room_id)
        async with self.lock:
            trash = await asyncio.to_thread(self._move_to_trash, room_dir)
            n, size = self._rooms.get(room_id, (0, 0))
            self._count(room_id, -n, -size)
        if trash is not None:
            await asyncio.to_thread(remove_tree, trash, self._closing)
        return n

    async def close(self) -> None:
        self._closing.set()

    # -- reads
    async def info(self, room_id: str, blob_id: str) -> BlobInfo | None:
        return await asyncio.to_thread(_read_meta, self._blob_dir(room_id, blob_id))

    async def open(self, room_id: str, blob_id: str) -> BlobReader | None:
        blob_dir = self._blob_dir(room_id, blob_id)

        def _open() -> FsReader | None:
            info = _read_meta(blob_dir)
            if info is None:
                return None
            try:
                f = open(blob_dir / DATA, "rb")  # noqa: SIM115 - closed by the reader
            except FileNotFoundError:  # deleted in between
                return None
            if os.fstat(f.fileno()).st_size != info.size:
                f.close()
                return None
            return FsReader(info, blob_dir / DATA, f)

        return await asyncio.to_thread(_open)

    async def list_room(self, room_id: str) -> list[BlobInfo]:
        room_dir = self._room_dir(room_id)

        def _list() -> list[BlobInfo]:
            try:
                entries = sorted(room_dir.iterdir())
            except FileNotFoundError:
                return []
            out = []
            for d in entries:
                info = _read_meta(d)
                if info is not None:
                    out.append(info)
            return out

        return await asyncio.to_thread(_list)

    def staging_entries(self) -> list[str]:
        """Names in the staging directory (tests: proof that nothing was left behind)."""
        try:
            return sorted(p.name for p in self.tmp.iterdir())
        except FileNotFoundError:
            return []
