"""The blob store's part of ``membershipd backup``, ``restore`` and ``migrate-to-kv``.

An archive keeps blobs in the filesystem backend's own layout (docs/blobstore.md),
whichever backend they come from::

    blobs/<room_id>/<blob_id>/data        the blob's bytes
    blobs/<room_id>/<blob_id>/meta.json   {"v": 1, "room_id", "blob_id", "size", "uploader", "created"}

so restoring is writing that layout into a new data directory, and a cluster's
blobs land in the fs backend of the single node it is restored to.

Staging makes a backup's blobs stable while the archive is written: on a single
node each complete blob's ``data`` is hard-linked into a private directory
under ``blobs/.tmp`` (the daemon deletes a blob by renaming its directory and
removing it, which leaves the link intact; a copy replaces the link where one
cannot be made), and from a cluster each object is downloaded. Every staged
blob is checked, size and SHA-256 against its id; one that fails is left out
with a warning. ``membershipd migrate-to-kv`` copies the fs backend's blobs
into the object store, so that a single node's state (a restored backup
included) moves into a cluster whole (docs/operations.md, "Backups").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unibus.backup import file_sha256

from .backend import TMP_DIR, BlobError, BlobInfo, check_blob_id, check_room_id, make_private_dir
from .fs import DATA, META, _read_meta

#: Where blobs sit inside an archive, and how many path parts a blob file has there.
ARCHIVE_DIR = "blobs"
ARCHIVE_FILES = (DATA, META)
#: Read size when hashing and copying.
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StagedBlob:
    """A blob ready for an archive: its metadata and a private, stable copy of its bytes."""

    info: BlobInfo
    data: Path

    @property
    def meta(self) -> bytes:
        return meta_document(self.info)

    def archive_path(self, name: str) -> str:
        return f"{ARCHIVE_DIR}/{self.info.room_id}/{self.info.blob_id}/{name}"


def meta_document(info: BlobInfo) -> bytes:
    """``meta.json`` of a blob, as the archive carries it."""
    return json.dumps(info.meta_json(), sort_keys=True, separators=(",", ":")).encode()


def _private_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _stage_one(blob_dir: Path, info: BlobInfo, target: Path, warn: Callable[[str], None]) -> StagedBlob | None:
    make_private_dir(target.parent)
    try:
        os.link(blob_dir / DATA, target)
    except FileNotFoundError:
        if not target.parent.is_dir():  # the staging area was emptied: a daemon started meanwhile
            raise
        return None  # deleted since it was listed
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        try:
            with open(blob_dir / DATA, "rb") as src, os.fdopen(_private_file(target), "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        except FileNotFoundError:
            target.unlink(missing_ok=True)
            return None
    digest, size = file_sha256(target)
    if digest != info.blob_id or size != info.size:
        warn(f"blob {info.blob_id} of room {info.room_id}: its bytes do not match its id and size; left out")
        target.unlink(missing_ok=True)
        return None
    return StagedBlob(info, target)


def fs_blobs(root: Path) -> list[tuple[Path, BlobInfo]]:
    """Every complete blob of an fs backend at ``root`` (``<data-dir>/blobs``), in name order."""
    out: list[tuple[Path, BlobInfo]] = []
    try:
        rooms = sorted(root.iterdir())
    except FileNotFoundError:
        return out
    for room_dir in rooms:
        if room_dir.name == TMP_DIR or room_dir.is_symlink() or not room_dir.is_dir():
            continue
        try:
            check_room_id(room_dir.name)
        except ValueError:
            continue
        with contextlib.suppress(FileNotFoundError):  # a room deleted while we list
            for blob_dir in sorted(room_dir.iterdir()):
                try:
                    check_blob_id(blob_dir.name)
                except ValueError:
                    continue
                if blob_dir.is_symlink():
                    continue
                info = _read_meta(blob_dir)  # None: not complete (or deleted meanwhile)
                if info is not None:
                    out.append((blob_dir, info))
    return out


def stage_fs_blobs(root: Path, staging: Path, warn: Callable[[str], None]) -> list[StagedBlob]:
    """Stage every complete blob under ``root`` into ``staging`` (a new private directory):
    a hard link of its data where one can be made, a copy otherwise."""
    out = []
    for blob_dir, info in fs_blobs(root):
        staged = _stage_one(blob_dir, info, staging / info.room_id / info.blob_id / DATA, warn)
        if staged is not None:
            out.append(staged)
    return out


async def stage_object_store_blobs(js: Any, staging: Path, warn: Callable[[str], None]) -> list[StagedBlob]:
    """Download every object of the cluster's object store into ``staging``, each checked."""
    from .objectstore import BUCKET, ObjReader, ObjectStoreBackend

    backend = ObjectStoreBackend(js, staging)
    if not await backend.open_existing():
        return []  # no blob was ever stored
    out = []
    for name in sorted(await backend.object_names()):
        room_id, blob_id = name.split("/", 1)
        found = await backend._get_object(room_id, blob_id)
        if found is None:
            continue  # deleted since, or unreadable (logged)
        info, nuid = found
        target = staging / room_id / blob_id / DATA
        make_private_dir(target.parent)
        try:
            with os.fdopen(_private_file(target), "wb") as f:
                async for chunk in ObjReader(backend, info, nuid).chunks():  # checks the digest at the end
                    await asyncio.to_thread(f.write, chunk)
        except BlobError as e:
            warn(f"{BUCKET} object {name}: {e}; left out")
            target.unlink(missing_ok=True)
            continue
        out.append(StagedBlob(info, target))
    return out


def check_archived_blob(room_id: str, blob_id: str, meta: bytes, data_sha256: str, data_size: int) -> BlobInfo:
    """The metadata of an archived blob, checked against its path and its data
    (as the archive's manifest describes it); ValueError saying what is wrong."""
    try:
        info = BlobInfo.from_meta(json.loads(meta))
    except ValueError as e:
        raise ValueError(f"blob {room_id}/{blob_id}: unreadable meta.json ({e})") from None
    if info.room_id != room_id or info.blob_id != blob_id:
        raise ValueError(f"blob {room_id}/{blob_id}: meta.json names another blob")
    if info.size != data_size or data_sha256 != blob_id:
        raise ValueError(f"blob {room_id}/{blob_id}: its data is not the blob its id names")
    return info


async def copy_to_object_store(js: Any, root: Path, *, replicas: int,
                               room_exists: Callable[[str], Awaitable[bool]],
                               warn: Callable[[str], None]) -> int:
    """Copy the fs backend's blobs under ``root`` into the object store (``migrate-to-kv``).

    Only blobs of rooms that ``room_exists`` and that the object store does not
    have yet: a second run copies nothing. Returns how many were copied.
    """
    from .objectstore import ObjectStoreBackend

    blobs = await asyncio.to_thread(fs_blobs, root)
    if not blobs:
        return 0
    backend = ObjectStoreBackend(js, root, replicas=replicas)
    backend.obs = await backend._ensure_bucket()
    copied = 0
    rooms: dict[str, bool] = {}
    try:
        for blob_dir, info in blobs:
            if info.room_id not in rooms:
                rooms[info.room_id] = await room_exists(info.room_id)
            if not rooms[info.room_id] or await backend.whole_info(info.room_id, info.blob_id) is not None:
                continue
            digest, size = await asyncio.to_thread(file_sha256, blob_dir / DATA)
            if digest != info.blob_id or size != info.size:
                warn(f"blob {info.blob_id} of room {info.room_id}: its bytes do not match its id and size; "
                     "not copied")
                continue
            await backend._put(info, blob_dir / DATA)
            copied += 1
    finally:
        await backend.close()  # its subscription to the chunks' acknowledgements
    return copied

