"""``membershipd backup`` and ``membershipd restore``: one archive, checked before anything is written.

An archive is a tar file (gzip-compressed when its name ends in ``.gz`` or
``.tgz``) of regular files only::

    manifest.json                       first: what the archive holds, and every file's SHA-256 and size
    membershipd.db                      single node: the SQLite store, through SQLite's online backup API
    kv/unibus_state.jsonl               cluster: every live key of the state bucket, one JSON line each
    blobs/<room_id>/<blob_id>/data      the blobs, in the fs backend's layout, whichever backend kept them
    blobs/<room_id>/<blob_id>/meta.json

docs/operations.md, "Backups", is the operator's side of it: what "consistent"
means here, the restore steps, and what is deliberately left out (every
secret: ``service.nkey``, ``system.nkey``, the auth callout's issuer seed, TLS
keys, ``nats.conf``).

The blob code is the blobstore plugin's (``unibus.plugins.blobstore.archive``):
blobs are part of a deployment's state whether or not the plugin is loaded in
the process that makes or restores the backup, so the core calls it directly.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, RuntimeFailure
from .privatefiles import check_ancestors, make_missing_dirs
from .stopsignals import stoppable

FORMAT = "unibus-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DB_NAME = "membershipd.db"
KV_FILE = "kv/unibus_state.jsonl"
BLOBS_DIR = "blobs"
#: The only paths an archive may hold besides the manifest.
ARCHIVE_PATH = re.compile(r"\A(?:membershipd\.db|kv/unibus_state\.jsonl|"
                          r"blobs/[a-z0-9]{1,40}/[0-9a-f]{64}/(?:data|meta\.json))\Z")
#: Limits on what restore reads into memory.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_META_BYTES = 64 * 1024
_KV_KEY = re.compile(r"\A[-/_=.a-zA-Z0-9]+\Z")
_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
_CHUNK = 1024 * 1024

Warn = Callable[[str], None]


class ArchiveError(ConfigError):
    """An archive that restore refuses (exit 2): the message says what is wrong with it."""


# --------------------------------------------------------------------------- manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's RFC 8785 canonical JSON without its ``digest`` field."""
    from .memberlog import canonical

    return hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "digest"})).hexdigest()


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ArchiveFile:
    """One file of an archive: its path there, and where its bytes come from (a file or bytes)."""

    path: str
    source: Path | bytes
    sha256: str
    size: int

    @classmethod
    def of_bytes(cls, path: str, data: bytes) -> ArchiveFile:
        return cls(path, data, hashlib.sha256(data).hexdigest(), len(data))

    @classmethod
    def of_file(cls, path: str, source: Path) -> ArchiveFile:
        digest, size = file_sha256(source)
        return cls(path, source, digest, size)


def file_sha256(path: Path) -> tuple[str, int]:
    """``(hex SHA-256, size)`` of a file, read in chunks (the blobstore plugin's archives use it too)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def build_manifest(kind: str, node: str, files: list[ArchiveFile], **facts: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "created": _utc_now(), "node": node,
                                "kind": kind, "unibus_version": __version__, **facts,
                                "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files]}
    manifest["digest"] = manifest_digest(manifest)
    return manifest


# --------------------------------------------------------------------------- writing


class _HashingReader(io.RawIOBase):
    """Reads a file for tarfile and hashes what it hands over."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        return data


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_archive(out: Path, manifest: dict[str, Any], files: list[ArchiveFile]) -> int:
    """Write the archive to ``out``: a temporary file beside it (mode 0600 from its first
    byte), fsynced, then linked into place (never over an existing file). Returns its size.

    Each file is hashed again as it goes in: bytes that changed since they were
    listed in the manifest fail the backup rather than make an archive that
    restore would refuse.
    """
    compress = out.name.endswith((".gz", ".tgz"))
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")  # 0600
    tmp = Path(tmp_name)
    mtime = int(datetime.now(UTC).timestamp())
    try:
        with os.fdopen(fd, "wb") as raw, stoppable():
            # gzip at its default level 6: blobs are ciphertext, level 9 would only cost time.
            gz = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=mtime) if compress else None
            with (gz or contextlib.nullcontext()), \
                    tarfile.open(fileobj=gz or raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                body = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
                for f in [ArchiveFile.of_bytes(MANIFEST, body), *files]:
                    info = tarfile.TarInfo(f.path)
                    info.size, info.mode, info.mtime, info.type = f.size, 0o600, mtime, tarfile.REGTYPE
                    if isinstance(f.source, bytes):
                        tar.addfile(info, io.BytesIO(f.source))
                        continue
                    with open(f.source, "rb") as src:
                        reader = _HashingReader(src)
                        tar.addfile(info, reader)
                    if reader.hash.hexdigest() != f.sha256:
                        raise RuntimeFailure(f"{f.path} changed while the archive was written; run backup again")
            raw.flush()
            os.fsync(raw.fileno())
        try:
            os.link(tmp, out)  # fails if out appeared meanwhile: never overwrite a backup
        except FileExistsError:
            raise RuntimeFailure(f"--out: {out} appeared while the backup ran; nothing was overwritten") from None
        except OSError:  # a filesystem without hard links
            if out.exists():
                raise RuntimeFailure(f"--out: {out} appeared while the backup ran; nothing was overwritten") from None
            os.rename(tmp, out)
        fsync_dir(out.parent)
        return out.stat().st_size
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- single node


def snapshot_sqlite(db: Path, dest: Path) -> None:
    """Copy the database at ``db`` into ``dest`` (a new 0600 file) with SQLite's online
    backup API: one step, under one read transaction, so the copy is the state at one
    instant, whatever the daemon writes meanwhile. The copy is a self-contained file
    (rollback journal, no WAL) that passes ``quick_check``."""
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    # mode=rw: never create a database that is not there.
    src = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)  # pages=-1: everything in one step
            dst.execute("PRAGMA journal_mode=DELETE")
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise RuntimeFailure(f"the snapshot of {db} fails SQLite's quick_check: {check}")
        finally:
            dst.close()
    except sqlite3.Error as e:
        raise RuntimeFailure(f"cannot snapshot {db}: {e}") from None
    finally:
        src.close()
    with open(dest, "rb+") as f:
        os.fsync(f.fileno())


@dataclass(frozen=True)
class StoreFacts:
    """What the manifest says about a store: revision, log head, counts, and the rooms (for the blobs)."""

    revision: str | None
    log_head: dict[str, Any] | None
    rooms: frozenset[str]
    members: int
    log_entries: int
    trust_root: str | None
    #: ``(seq, hash)`` of each bootstrap entry after entry 0: an offline ``member add`` (a recovery).
    recoveries: tuple[tuple[int, str], ...] = ()


def recovery_bootstraps(rows: Any) -> tuple[tuple[int, str], ...]:
    """``(seq, hash)`` of every bootstrap entry after entry 0 among ``rows`` of ``(seq, hash, text)``.

    No member signed such an entry (``membershipd member add`` on a store that
    already had a log, to recover when every admin lost its keys), so a
    client accepts it only once trusted explicitly, and so does ``restore``.
    """
    found = []
    for seq, digest, text in rows:
        if seq == 0 or '"bootstrap"' not in text:
            continue
        try:
            doc = json.loads(text)
        except ValueError:
            continue  # the chain and replay checks refuse it
        if isinstance(doc, dict) and doc.get("kind") == "bootstrap":
            found.append((int(seq), str(digest)))
    return tuple(found)


def sqlite_facts(db: Path) -> StoreFacts:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        def one(sql: str) -> Any:
            try:
                return conn.execute(sql).fetchone()
            except sqlite3.OperationalError:  # a table an older revision does not have
                return None

        revision = one("SELECT version_num FROM alembic_version")
        members = one("SELECT count(*) FROM members")
        try:
            rooms = frozenset(r[0] for r in conn.execute("SELECT room_id FROM rooms"))
        except sqlite3.OperationalError:
            rooms = frozenset()
        head = one("SELECT seq, hash FROM log_entries ORDER BY seq DESC LIMIT 1")
        count = one("SELECT count(*) FROM log_entries")
        root = one("SELECT hash FROM log_entries WHERE seq = 0")
        try:
            recoveries = recovery_bootstraps(conn.execute(
                "SELECT seq, hash, entry FROM log_entries WHERE seq > 0 AND entry LIKE '%\"bootstrap\"%' ORDER BY seq"))
        except sqlite3.OperationalError:
            recoveries = ()
    return StoreFacts(revision[0] if revision else None,
                      {"seq": int(head[0]), "hash": str(head[1])} if head else None, rooms,
                      int(members[0]) if members else 0, int(count[0]) if count else 0, root[0] if root else None,
                      recoveries)


def _warn_recoveries(facts: StoreFacts, warn: Warn) -> None:
    for seq, digest in facts.recoveries:
        warn(f"the membership log has a recovery bootstrap at seq {seq} (fingerprint {digest}): restoring this "
             f"archive will need --accept-bootstrap {digest}")


@dataclass
class BackupResult:
    out: Path
    size: int
    manifest: dict[str, Any]

    def summary(self) -> str:
        m = self.manifest
        head = m.get("log_head")
        c = m["counts"]
        return (f"wrote {self.out} ({m['kind']} backup of {m['node']}, {self.size} bytes): {c['members']} member(s), "
                f"{c['rooms']} room(s), {c['log_entries']} log entr{'y' if c['log_entries'] == 1 else 'ies'}"
                + (f" (head {head['seq']} {head['hash']})" if head else "")
                + f", {c['blobs']} blob(s) of {c['blob_bytes']} bytes")


def _blob_files(blobs: list[Any]) -> list[ArchiveFile]:
    from .plugins.blobstore.archive import DATA, META

    files: list[ArchiveFile] = []
    for b in sorted(blobs, key=lambda b: (b.info.room_id, b.info.blob_id)):
        # The data's hash is its id, checked when it was staged; write_archive checks it again.
        files.append(ArchiveFile(b.archive_path(DATA), b.data, b.info.blob_id, b.info.size))
        files.append(ArchiveFile.of_bytes(b.archive_path(META), b.meta))
    return files


def _blob_staging(data_dir: Path, fallback: Path) -> Path:
    """A private directory for the blob links: inside the blob store's staging area (same
    filesystem, emptied by the daemon at every start), or ``fallback`` when that cannot be made."""
    from .plugins.blobstore.backend import TMP_DIR, make_private_dir

    blobs = data_dir / BLOBS_DIR
    if blobs.is_dir():
        with contextlib.suppress(OSError):
            make_private_dir(blobs / TMP_DIR)
            staging = blobs / TMP_DIR / f"backup-{secrets.token_hex(8)}"
            staging.mkdir(mode=0o700)
            return staging
    fallback.mkdir(mode=0o700)
    return fallback


def _staging_dir(out: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))  # 0700
    except OSError as e:
        raise RuntimeFailure(f"--out: cannot write in {out.parent} ({e.strerror})") from None


def backup_single(data_dir: Path, out: Path, warn: Warn) -> BackupResult:
    """Back up a single node's data directory into ``out`` (docs/operations.md, "Backups").

    The blobs are staged first, then the database is snapshotted, and only the
    blobs of rooms in that snapshot go in: so a blob acknowledged before the
    backup began is in the archive unless its room was gone by the snapshot,
    and no blob is without its room.
    """
    from .plugins.blobstore.archive import stage_fs_blobs

    staging = _staging_dir(out)
    blob_staging: Path | None = None
    try:
        blob_staging = _blob_staging(data_dir, staging / BLOBS_DIR)
        with stoppable():  # what it makes is inside the two staging directories
            blobs = stage_fs_blobs(data_dir / BLOBS_DIR, blob_staging, warn)
            snap = staging / DB_NAME
            snapshot_sqlite(data_dir / DB_NAME, snap)
            facts = sqlite_facts(snap)
            _warn_recoveries(facts, warn)
            _check_restorable(snap, facts)
            blobs = [b for b in blobs if b.info.room_id in facts.rooms]
            files = [ArchiveFile.of_file(DB_NAME, snap), *_blob_files(blobs)]
            manifest = build_manifest("single", socket.gethostname(), files, db_revision=facts.revision,
                                      log_head=facts.log_head, trust_root=facts.trust_root,
                                      counts=_counts(facts, blobs))
        return BackupResult(out, write_archive(out, manifest, files), manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if blob_staging is not None:
            shutil.rmtree(blob_staging, ignore_errors=True)


def log_disagreement(db: Path, facts: StoreFacts | None = None) -> str | None:
    """What restore would refuse in ``db`` (its log's chain, its rows against the log's replay,
    its own recovery bootstraps accepted), said of a store rather than an archive; None if nothing.
    For ``backup`` and ``migrate-to-kv``, which must not pass on what restore refuses."""
    facts = facts if facts is not None else sqlite_facts(db)
    if facts.log_head is None:
        return None  # a store from before the log: its migration writes entry 0
    try:
        check_log_chain(db)
        check_rows_match_log(db, [digest for _seq, digest in facts.recoveries])
    except ArchiveError as e:
        why = str(e).removeprefix("--in: ").replace("the archive's ", "the ").replace("in the archive", "")
        return why.removesuffix("; nothing was restored")
    return None


def _check_restorable(db: Path, facts: StoreFacts) -> None:
    """Run restore's checks of the schema and the log on ``db`` before the archive is written: an
    archive restore would refuse is a failed backup (exit 2 for the schema, 1 for the log), not one
    found out when it is needed."""
    from .store.db import known_revision, newer_database, revision_rows

    rows = revision_rows(db)
    if len(rows) > 1:
        raise ConfigError(f"{DB_NAME} names {len(rows)} schema revisions (alembic_version), not one: not a "
                          "database a unibus made; restore a backup")
    if facts.revision is not None and not known_revision(facts.revision):
        raise newer_database(Path(DB_NAME), facts.revision)  # restore would refuse it: say so now
    why = log_disagreement(db, facts)
    if why is not None:
        raise RuntimeFailure(f"the state cannot be backed up, as restore would refuse it: {why}")


def _counts(facts: StoreFacts, blobs: list[Any]) -> dict[str, int]:
    return {"members": facts.members, "rooms": len(facts.rooms), "log_entries": facts.log_entries,
            "blobs": len(blobs), "blob_bytes": sum(b.info.size for b in blobs)}


# --------------------------------------------------------------------------- cluster


def kv_lines(entries: dict[str, tuple[bytes, int]]) -> bytes:
    """The archive's ``kv/unibus_state.jsonl``: ``{"key", "rev", "value"}`` per line (value: base64 of the
    stored bytes, so log entries keep every byte), in key order."""
    import base64

    return b"".join(json.dumps({"key": k, "rev": rev, "value": base64.b64encode(raw).decode("ascii")},
                               sort_keys=True).encode() + b"\n" for k, (raw, rev) in sorted(entries.items()))


def parse_kv_lines(data: bytes) -> dict[str, bytes]:
    """The entries of ``kv/unibus_state.jsonl``; :class:`ArchiveError` naming the line when one is bad."""
    import base64
    import binascii

    out: dict[str, bytes] = {}
    for n, line in enumerate(data.splitlines(), 1):
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError
            key, value = doc["key"], doc["value"]
            if set(doc) != {"key", "rev", "value"} or not isinstance(key, str) or not _KV_KEY.match(key):
                raise ValueError
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, binascii.Error):
            raise ArchiveError(f"--in: {KV_FILE} line {n} is not a {{key, rev, value}} record") from None
        if key in out:
            raise ArchiveError(f"--in: {KV_FILE} holds key {key!r} twice")
        out[key] = raw
    return out


async def backup_cluster(js: Any, node: str, out: Path, warn: Warn) -> BackupResult:
    """Back up a cluster's state bucket and object store into ``out`` through one node.

    The blobs are downloaded first, then the bucket is read at one stream
    sequence (:meth:`unibus.store.kv.KvStore.snapshot`), and only the blobs of
    rooms in that state go in, as for a single node.
    """
    from .plugins.blobstore.archive import stage_object_store_blobs
    from .store.base import StoreUnavailable
    from .store.fromkv import KvFormatError, rows_from_kv
    from .store.kv import STATE_BUCKET, KvStore
    from .store.kv_layout import IMPORTING_FIELD, LOG_HEAD_KEY

    staging = _staging_dir(out)
    try:
        async with stoppable():  # what it makes is inside the staging directory
            kv = KvStore(js, timeout=5.0)
            try:
                await kv.status()
            except StoreUnavailable as e:
                raise RuntimeFailure(f"cannot read the KV bucket {STATE_BUCKET} (is this a unibus cluster node, "
                                     f"after migrate-to-kv?): {e}") from None
            blobs = await stage_object_store_blobs(js, staging / BLOBS_DIR, warn)
            snap = await kv.snapshot()
            raw = {k: v for k, (v, _rev) in snap.entries.items()}
            if IMPORTING_FIELD in json.loads(raw.get(LOG_HEAD_KEY, b"{}")):
                raise RuntimeFailure(f"membershipd migrate-to-kv is copying into {STATE_BUCKET}, or was cut short: its "
                                     "state is partial; run migrate-to-kv again to its end, then back up")
            try:
                rows = rows_from_kv(raw)
            except KvFormatError as e:
                raise RuntimeFailure(f"the state in {STATE_BUCKET} cannot be restored, so it is not backed up: {e}") from None
            rooms = frozenset(r["room_id"] for r in rows.rooms)
            blobs = [b for b in blobs if b.info.room_id in rooms]
            seq, digest = rows.log_head
            facts = StoreFacts(None, {"seq": seq, "hash": digest} if seq >= 0 else None, rooms, len(rows.members),
                               len(rows.log_entries), rows.log_entries[0]["hash"] if rows.log_entries else None,
                               recovery_bootstraps((e["seq"], e["hash"], e["entry"]) for e in rows.log_entries))
            _warn_recoveries(facts, warn)
            kv_text = kv_lines(snap.entries)

            def check() -> None:  # what restore builds, checked as restore checks it
                (staging / KV_FILE).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                (staging / KV_FILE).write_bytes(kv_text)
                try:
                    _build_db_from_kv(staging / KV_FILE, staging / DB_NAME)
                except ArchiveError as e:
                    raise RuntimeFailure(f"the state in {STATE_BUCKET} cannot be backed up, as restore would refuse "
                                         f"it: {str(e).removeprefix('--in: ')}") from None
                _check_restorable(staging / DB_NAME, facts)

            # In this thread, not a worker: a stop cancels this coroutine, whose clean-up must not race
            # a thread still writing into the staging (a review left a copy of the state there).
            check()
            files = [ArchiveFile.of_bytes(KV_FILE, kv_text), *_blob_files(blobs)]
            manifest = build_manifest("cluster", node, files, kv={"bucket": STATE_BUCKET, "stream_seq": snap.seq,
                                                                 "exact": snap.exact},
                                      log_head=facts.log_head, trust_root=facts.trust_root, counts=_counts(facts, blobs))
        return BackupResult(out, write_archive(out, manifest, files), manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- verifying


@dataclass
class VerifiedArchive:
    """An archive whose manifest and every file checked out (pass 1 of restore)."""

    manifest: dict[str, Any]
    files: dict[str, tuple[str, int]]  # path -> (sha256, size)
    metas: dict[str, bytes] = field(default_factory=dict)  # blob meta.json path -> bytes

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])


_TYPE_NAMES = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.DIRTYPE: "directory",
               tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


@contextlib.contextmanager
def _reading(path: Path) -> Any:
    """Iterate the archive's members as ``(TarInfo, file object or None)``, streaming.

    Whatever the reading raises because the archive is not a complete tar file
    (a truncated or corrupted one) becomes one :class:`ArchiveError`.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ArchiveError(f"--in: cannot read {path} ({e.strerror})") from None
    try:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            yield ((info, tar.extractfile(info) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else None)
                   for info in tar)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ArchiveError(f"--in: {path} is not a complete tar archive (truncated or corrupted: {e})") from None
    finally:
        f.close()


def _check_manifest(doc: Any) -> dict[str, tuple[str, int]]:
    """The manifest's ``files`` as ``{path: (sha256, size)}``; ArchiveError on anything else."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArchiveError(f"--in: {MANIFEST} is not the manifest of a unibus backup")
    try:
        digest = manifest_digest(doc)
    except (TypeError, ValueError):  # RFC 8785 refuses it (a float NaN, an integer beyond 2**53...)
        digest = None
    if digest is None or doc.get("digest") != digest:
        raise ArchiveError(f"--in: {MANIFEST} was altered (its digest does not match its content)")
    version = doc.get("version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ArchiveError(f"--in: archive format version {version!r}; this membershipd reads version "
                           f"{FORMAT_VERSION}: restore it with the unibus {doc.get('unibus_version')} that made it")
    if doc.get("kind") not in ("single", "cluster"):
        raise ArchiveError(f"--in: {MANIFEST}: kind must be single or cluster, not {doc.get('kind')!r}")
    for name in ("node", "created", "unibus_version"):  # printed once restored (a red team: KeyError after it)
        value = doc.get(name)
        if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
            raise ArchiveError(f"--in: {MANIFEST}: {name} must be a line of printable text")
    head = doc.get("log_head")
    if head is not None and not (isinstance(head, dict) and type(head.get("seq")) is int
                                 and isinstance(head.get("hash"), str)):
        raise ArchiveError(f"--in: {MANIFEST}: log_head must be {{seq, hash}} or null")
    files = doc.get("files")
    if not isinstance(files, list):
        raise ArchiveError(f"--in: {MANIFEST}: files must be a list")
    out: dict[str, tuple[str, int]] = {}
    for item in files:
        if not (isinstance(item, dict) and set(item) == {"path", "sha256", "size"}):
            raise ArchiveError(f"--in: {MANIFEST}: every file needs exactly path, sha256 and size")
        p, digest, size = item["path"], item["sha256"], item["size"]
        if not isinstance(p, str) or not ARCHIVE_PATH.match(p):
            raise ArchiveError(f"--in: {MANIFEST} lists {p!r}, which is not a file a unibus backup contains")
        if not isinstance(digest, str) or not _SHA256.match(digest) or type(size) is not int or size < 0:
            raise ArchiveError(f"--in: {MANIFEST}: {p}: sha256 must be 64 hex characters and size a byte count")
        if p in out:
            raise ArchiveError(f"--in: {MANIFEST} lists {p} twice")
        out[p] = (digest, size)
    return out


def _verify_member(info: tarfile.TarInfo, f: Any, seen: dict[str, tuple[str, int]], metas: dict[str, bytes]) -> None:
    """Check one member of pass 1 and record its hash (the manifest is read by the caller)."""
    name = info.name
    if f is None:
        kind = _TYPE_NAMES.get(info.type, f"member of type {info.type!r}")
        raise ArchiveError(f"--in: {name!r} is a {kind}; a unibus backup holds regular files only")
    if name == MANIFEST:
        return
    if name in seen:
        raise ArchiveError(f"--in: {name!r} is in the archive twice")
    if not ARCHIVE_PATH.match(name):
        raise ArchiveError(f"--in: {name!r} is not a file a unibus backup contains")
    h = hashlib.sha256()
    keep = name.endswith("/meta.json") and info.size <= MAX_META_BYTES
    kept = []
    size = 0
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
        if keep:
            kept.append(chunk)
    seen[name] = (h.hexdigest(), size)
    if keep:
        metas[name] = b"".join(kept)


def verify_archive(path: Path) -> VerifiedArchive:
    """Pass 1 of restore: read the whole archive and check it, writing nothing.

    Only regular files at the paths a backup writes, each once; a manifest
    whose digest matches; exactly the files it lists, each with its SHA-256 and
    size; the files its kind needs; every blob complete and matching its id.
    :class:`ArchiveError` (exit 2) naming the first problem.
    """
    from .plugins.blobstore.archive import check_archived_blob

    seen: dict[str, tuple[str, int]] = {}
    metas: dict[str, bytes] = {}
    manifest: Any = None
    with _reading(path) as members:
        for info, f in members:
            _verify_member(info, f, seen, metas)
            if info.name == MANIFEST:
                if manifest is not None:
                    raise ArchiveError(f"--in: {MANIFEST!r} is in the archive twice")
                if info.size > MAX_MANIFEST_BYTES:
                    raise ArchiveError(f"--in: {MANIFEST} is {info.size} bytes, more than a manifest can be")
                try:
                    manifest = json.loads(f.read())
                except (ValueError, RecursionError):
                    raise ArchiveError(f"--in: {MANIFEST} is not JSON") from None
    if manifest is None:
        raise ArchiveError(f"--in: {path} has no {MANIFEST}; it is not a unibus backup")
    listed = _check_manifest(manifest)
    missing, extra = sorted(listed.keys() - seen.keys()), sorted(seen.keys() - listed.keys())
    if missing:
        raise ArchiveError(f"--in: {missing[0]} is listed in {MANIFEST} but missing from the archive"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise ArchiveError(f"--in: {extra[0]} is in the archive but not in {MANIFEST}"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, (digest, size) in sorted(seen.items()):
        if listed[name] != (digest, size):
            raise ArchiveError(f"--in: {name} does not match its SHA-256 and size in {MANIFEST} (corrupted)")
    kind = manifest["kind"]
    needed, refused = (DB_NAME, KV_FILE) if kind == "single" else (KV_FILE, DB_NAME)
    if needed not in seen:
        raise ArchiveError(f"--in: a {kind} backup must hold {needed}")
    if refused in seen:
        raise ArchiveError(f"--in: a {kind} backup cannot hold {refused}")
    blob_dirs = {n.rsplit("/", 1)[0] for n in seen if n.startswith(BLOBS_DIR + "/")}
    for d in sorted(blob_dirs):
        data, meta = f"{d}/data", f"{d}/meta.json"
        if data not in seen or meta not in seen:
            raise ArchiveError(f"--in: blob {d} is incomplete: it needs both data and meta.json")
        if meta not in metas:
            raise ArchiveError(f"--in: {meta} is larger than blob metadata can be")
        _, room_id, blob_id = d.split("/")
        try:
            check_archived_blob(room_id, blob_id, metas[meta], *seen[data])
        except ValueError as e:
            raise ArchiveError(f"--in: {e}") from None
    return VerifiedArchive(manifest, listed, metas)


# --------------------------------------------------------------------------- restoring


def check_restore_target(data_dir: Path) -> None:
    """Restore writes only into an empty or new directory: ConfigError (exit 2) otherwise."""
    if data_dir.is_symlink():
        raise ConfigError(f"--data-dir: {data_dir} is a symbolic link; give the directory itself")
    if data_dir.exists():
        if not data_dir.is_dir():
            raise ConfigError(f"--data-dir: {data_dir} exists and is not a directory")
        try:
            entries = sorted(p.name for p in data_dir.iterdir())
        except OSError as e:
            raise ConfigError(f"--data-dir: cannot read {data_dir} ({e.strerror})") from None
        if entries:
            raise ConfigError(f"--data-dir: {data_dir} is not empty ({len(entries)} entr"
                              f"{'y' if len(entries) == 1 else 'ies'}, e.g. {entries[0]!r}); restore writes only "
                              "into an empty or new directory: give another, or move its contents away")
        if os.path.ismount(data_dir):
            raise ConfigError(f"--data-dir: {data_dir} is a mount point, which restore cannot replace in one "
                              "rename; restore into a new directory inside it and point --data-dir there")


def _private_dirs(root: Path, path: Path) -> None:
    """Make ``path`` and every directory between ``root`` and it, each 0700 (``mkdir -p`` gives the
    intermediate ones the umask's mode)."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        with contextlib.suppress(FileExistsError):
            current.mkdir(mode=0o700)


def _extract(path: Path, verified: VerifiedArchive, into: Path) -> None:
    """Pass 2: write every verified file under ``into`` (dirs 0700, files 0600), hashing it again."""
    with _reading(path) as members:
        for info, f in members:
            if info.name == MANIFEST:
                continue
            if f is None or info.name not in verified.files:  # pass 1 refused both: the file changed
                raise ArchiveError(f"--in: {path} changed while it was being restored; nothing was restored")
            target = into / info.name
            h = hashlib.sha256()
            try:
                _private_dirs(into, target.parent)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                out = os.fdopen(fd, "wb")
            except OSError as e:
                raise RuntimeFailure(f"--data-dir: cannot write {target} ({e.strerror}); nothing was restored") from None
            with out:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as e:
                        raise RuntimeFailure(f"--data-dir: cannot write {target} ({e.strerror}); nothing was "
                                             "restored") from None
            if h.hexdigest() != verified.files[info.name][0]:
                raise ArchiveError(f"--in: {path} changed while it was being restored; nothing was restored")


def check_log_chain(db: Path) -> tuple[int, str]:
    """The membership log in ``db`` is whole: seqs from 0 without a gap, each stored text hashing to its
    hash, each ``prev`` the hash before it. Returns the head; ArchiveError otherwise."""
    prev, seq = "", -1
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for n, digest, text in conn.execute("SELECT seq, hash, entry FROM log_entries ORDER BY seq"):
            try:
                entry = json.loads(text)
            except ValueError:
                entry = None
            if (n != seq + 1 or hashlib.sha256(text.encode("utf-8")).hexdigest() != digest
                    or not isinstance(entry, dict) or entry.get("seq") != n or entry.get("prev") != prev):
                raise ArchiveError(f"--in: the membership log in the archive is broken at entry {n}")
            prev, seq = digest, n
    return seq, prev


def check_rows_match_log(db: Path, accepted_bootstraps: Iterable[str] = ()) -> None:
    """The store's members and rosters are the state its membership log establishes.

    The log is replayed with every check a client makes (signatures included:
    whoever can write archives cannot sign as a member); a row the log does not
    account for, such as an admin added to the archived database behind the
    log's back (the manifest's digest is no MAC), is refused with ArchiveError.
    A bootstrap after entry 0 (an offline ``member add``: a recovery) is signed
    by no one, so, as for a client, it must be one the operator accepted
    (``--accept-bootstrap``): else it is refused, naming its fingerprint."""
    from .memberlog import LogError, LogState

    accepted = set(accepted_bootstraps)
    for seq, digest in sqlite_facts(db).recoveries:
        if digest not in accepted:
            raise ArchiveError(f"--in: the archive's membership log has a recovery bootstrap at seq {seq}, which no "
                               f"member signed (an offline membershipd member add); if your operator made it, add "
                               f"--accept-bootstrap {digest}; nothing was restored")
    state = LogState(accepted_bootstraps=accepted)
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        conn.execute("BEGIN")  # one snapshot for every read below, even if a daemon writes meanwhile
        try:
            for (text,) in conn.execute("SELECT entry FROM log_entries ORDER BY seq"):
                state.apply(json.loads(text))
        except (LogError, ValueError) as e:
            raise ArchiveError(f"--in: the membership log in the archive does not verify ({e})") from None
        members = {h: (role, bytes(sp), bytes(ep), suite, bus) for h, role, sp, ep, suite, bus in conn.execute(
            "SELECT handle, role, sign_pub, enc_pub, enc_suite, bus_pub FROM members")}
        rooms = {r: (name, owner or "", int(epoch), bool(rekey)) for r, name, owner, epoch, rekey in conn.execute(
            "SELECT room_id, name, owner, epoch, rekey_required FROM rooms")}
        rosters: dict[str, set[str]] = {r: set() for r in rooms}
        for room_id, handle in conn.execute("SELECT room_id, handle FROM room_members"):
            rosters.setdefault(room_id, set()).add(handle)
        nonces = {(k, n) for k, n in conn.execute("SELECT keyid, nonce FROM log_nonces")}
        row = conn.execute("SELECT value FROM unibus_meta WHERE key = 'log.max_created'").fetchone()
        max_created = int(row[0]) if row else 0
    derived = {h: (m.role, bytes(m.sign_pub), bytes(m.enc_pub), m.enc_suite, m.bus_pub)
               for h, m in state.members.items()}
    for handle in sorted(set(members) | set(derived)):
        if members.get(handle) != derived.get(handle):
            raise ArchiveError(f"--in: member {handle!r} in the archive's store is not what its membership log "
                               "establishes; nothing was restored")
    # Owner and epoch decide who may manage a room and which rekey comes next: rows that
    # disagree would let the restored server accept requests every client refuses.
    for room_id in sorted(set(rooms) | set(state.rooms)):
        room = state.rooms.get(room_id)
        if (room is None or rosters.get(room_id) != set(room.members)
                or rooms.get(room_id) != (room.name, room.owner, room.epoch, room.rekey_required)):
            raise ArchiveError(f"--in: room {room_id!r} in the archive's store is not what its membership log "
                               "establishes; nothing was restored")
    # What replay protection keeps of the log: a nonce missing from the rows could be used again,
    # and a smaller largest `created` would admit requests older than the log allows.
    if nonces != state.nonces or max_created != state.max_created:
        raise ArchiveError("--in: the archive's log nonces or largest `created` are not what its membership log "
                           "establishes; nothing was restored")


def _prepare_single_db(db: Path) -> bool:
    """Check a single node's archived database and put in its place one this membershipd made,
    at the current revision, holding its rows (:func:`_rebuild_in_fresh_schema`). True when it
    had no membership log (the migration wrote entry 0: a new trust root). Nothing of the
    archive's SQL ever runs: not a trigger, not a view, not its schema."""
    from .store.db import alembic_config, stored_revision

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            _check_schema_objects(conn)
            try:
                revisions = conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
            except sqlite3.OperationalError:
                revisions = 0
    except sqlite3.Error as e:
        raise ArchiveError(f"--in: {DB_NAME} is not a usable SQLite database ({e})") from None
    if check != "ok":
        raise ArchiveError(f"--in: {DB_NAME} fails SQLite's integrity_check: {check}")
    revision = stored_revision(db) if revisions == 1 else None
    if revisions > 1:
        raise ArchiveError(f"--in: {DB_NAME} names {revisions} schema revisions (alembic_version), not one; "
                           "nothing was restored")
    if revision is None:
        raise ArchiveError(f"--in: {DB_NAME} has no schema revision (alembic_version): it is not a membershipd "
                           "database; nothing was restored")
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        script = ScriptDirectory.from_config(alembic_config()).get_revision(revision)
    except CommandError:
        script = None
    if script is None or script.revision != revision:  # "head", "heads", "0004@head" name no one revision
        raise ArchiveError(f"--in: {DB_NAME} is at revision {revision!r}, which this membershipd does not know: "
                           "restore it with a newer unibus")
    try:
        new_root = sqlite_facts(db).log_head is None
    except (sqlite3.Error, TypeError, AttributeError, KeyError, ValueError) as e:
        raise ArchiveError(f"--in: {DB_NAME} cannot be read as a unibus store ({type(e).__name__}: {e}); "
                           "nothing was restored") from None
    _rebuild_in_fresh_schema(db, revision)
    return new_root


def _build_db_from_kv(kv_file: Path, db: Path) -> bool:
    """Build ``db`` from a cluster archive's state. True when that state had members but no
    membership log (a 0.11 cluster's bucket, backed up by this version): its entry 0, a snapshot
    of the state, is written here, as a node writes it into such a bucket and migration 0004
    into a 0.11 database: a new trust root. Such an archive was refused (its rows were not what
    an empty log establishes) after ``backup`` had made it (an upgrade rehearsal)."""
    from sqlalchemy.orm import Session

    from .store.db import make_engine, migrate
    from .store.fromkv import KvFormatError, insert_rows, rows_from_kv
    from .store.sqlite import ensure_root_sync

    entries = parse_kv_lines(kv_file.read_bytes())
    try:
        rows = rows_from_kv(entries)
    except KvFormatError as e:
        raise ArchiveError(f"--in: {KV_FILE}: {e}") from None
    migrate(db)
    engine = make_engine(db)
    try:
        with Session(engine) as session, session.begin():
            insert_rows(session, rows)
            new_root = not rows.log_entries and ensure_root_sync(session)[0] == 0
    except KvFormatError as e:
        raise ArchiveError(f"--in: {KV_FILE}: {e}") from None
    finally:
        engine.dispose()
    return new_root


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


@dataclass
class RestoreResult:
    data_dir: Path
    manifest: dict[str, Any]
    facts: StoreFacts
    blobs: int
    #: The archive's store had no membership log: the migration at restore wrote its entry 0.
    new_root: bool = False

    def summary(self) -> str:
        m, f = self.manifest, self.facts
        head = f.log_head
        return (f"restored the {m['kind']} backup of {m['node']} made {m['created']} (unibus {m['unibus_version']}) "
                f"into {self.data_dir}: {f.members} member(s), {len(f.rooms)} room(s), {f.log_entries} log "
                f"entr{'y' if f.log_entries == 1 else 'ies'}" + (f" (head {head['seq']} {head['hash']})" if head else "")
                + f", {self.blobs} blob(s)")


def restore(archive: Path, data_dir: Path, accepted_bootstraps: Iterable[str] = (),
            expected_root: str | None = None) -> RestoreResult:
    """Restore ``archive`` into ``data_dir`` (empty or new; docs/operations.md, "Backups").

    ``accepted_bootstraps``: fingerprints of recovery bootstraps in the log the
    operator vouches for (``--accept-bootstrap``; :func:`check_rows_match_log`).
    ``expected_root``: the trust root fingerprint the deployment's members pinned
    (``--expect-root``); an archive whose log starts with another, or whose store
    had no log yet (its root would be new), is refused. Nothing in an archive
    proves whose deployment it is, so this is the operator's one way to say it.

    The whole archive is checked first (:func:`verify_archive`), writing
    nothing. Then everything is built in a temporary directory beside
    ``data_dir`` (the files, re-hashed; the database migrated to the current
    revision, or made from a cluster's state) and checked again (the log's
    chain and head, the blobs' rooms), fsynced, and renamed into place in one
    step: a crash or an error leaves ``data_dir`` as it was.
    """
    check_restore_target(data_dir)
    with stoppable():  # reads, writes nothing
        verified = verify_archive(archive)
    parent = data_dir.parent
    made: list[Path] = []
    try:
        made = make_missing_dirs(parent)  # each 0700, whatever the umask
        check_ancestors(data_dir, "--data-dir")  # no one else may rename what is restored here
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{data_dir.name}.restore-"))  # 0700
    except OSError as e:
        _remove_made(made)
        raise ConfigError(f"--data-dir: cannot create a directory in {parent} ({e.strerror})") from None
    except BaseException:
        _remove_made(made)
        raise
    try:
        with stoppable():  # what it makes is inside tmp; the rename below is the commit point
            _extract(archive, verified, tmp)
            db = tmp / DB_NAME
            new_root = False
            if verified.kind == "single":
                new_root = _prepare_single_db(db)
            else:
                new_root = _build_db_from_kv(tmp / KV_FILE, db)
                shutil.rmtree(tmp / KV_FILE.split("/")[0])
            try:
                head = check_log_chain(db)
                check_rows_match_log(db, accepted_bootstraps)
                facts = sqlite_facts(db)
            except ArchiveError:
                raise
            except (sqlite3.Error, TypeError, AttributeError, KeyError, ValueError) as e:
                raise ArchiveError(f"--in: {DB_NAME} cannot be read as a unibus store ({type(e).__name__}: {e}); "
                                   "nothing was restored") from None
            if expected_root is not None and (new_root or facts.trust_root != expected_root):
                found = ("none: its store predates the membership log" if new_root
                         else facts.trust_root or "none: its membership log is empty")
                raise ArchiveError(f"--expect-root: the archive's trust root is {found}, not {expected_root}: it is "
                                   "not a backup of the deployment your members pinned; nothing was restored")
            want = verified.manifest.get("log_head")
            # A store older than the log gets its entry 0 from the migration: the manifest had no head then.
            if want is not None and (want["seq"], want["hash"]) != head:
                raise ArchiveError(f"--in: the archive's membership log ends at {head}, not at the head its manifest "
                                   f"names ({want['seq']}, {want['hash']})")
            blob_rooms = {p.split("/")[1] for p in verified.files if p.startswith(BLOBS_DIR + "/")}
            strays = sorted(blob_rooms - facts.rooms)
            if strays:
                raise ArchiveError(f"--in: the archive has blobs of room {strays[0]}, which its store does not have")
            blobs = sum(1 for p in verified.files if p.endswith("/data"))
            for leftover in (tmp / f"{DB_NAME}-wal", tmp / f"{DB_NAME}-shm"):
                leftover.unlink(missing_ok=True)
            _fsync_tree(tmp)
        check_restore_target(data_dir)  # again: nothing may have appeared there meanwhile
        try:
            os.rename(tmp, data_dir)  # replaces an empty directory in one step
        except OSError as e:
            raise RuntimeFailure(f"--data-dir: cannot move the restored state into {data_dir} ({e.strerror}); "
                                 "nothing was restored") from None
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise
    return RestoreResult(data_dir, verified.manifest, facts, blobs, new_root)


def _remove_made(made: list[Path]) -> None:
    """A refused restore leaves nothing: the directories it made above ``--data-dir`` go too."""
    for d in reversed(made):
        with contextlib.suppress(OSError):  # not empty (someone put something there): left
            os.rmdir(d)


#: The only kinds of schema object a unibus database has. Anything else in an archive (a trigger,
#: which would act on every later write of the restored node, a view) was put there by whoever
#: wrote it. Compared without regard to case: SQLite loads a row typed "Trigger" as a trigger.
SCHEMA_TYPES = ("table", "index")


def _check_schema_objects(conn: sqlite3.Connection, schema: str = "main") -> None:
    row = conn.execute(f"SELECT type, name FROM {schema}.sqlite_master WHERE lower(type) NOT IN "
                       f"({', '.join('?' * len(SCHEMA_TYPES))}) ORDER BY type, name", SCHEMA_TYPES).fetchone()
    if row is not None:
        raise ArchiveError(f"--in: {DB_NAME} holds a {str(row[0]).lower()} {row[1]!r}, which no unibus makes; "
                           "nothing was restored")


def _rebuild_in_fresh_schema(db: Path, revision: str) -> None:
    """Put in ``db``'s place a database this membershipd made, holding ``db``'s rows.

    A fresh database is migrated to the archive's own ``revision``, the archived rows are
    copied into it (every table but ``alembic_version``), its foreign keys checked, and only
    then is it migrated to the current revision: by unibus's migrations, on unibus's schema,
    so nothing the archive's writer put in its schema runs or reaches the restored node (red
    team: a planted trigger made every member added after the restore an admin). A table
    unibus does not make, a missing one, or rows its constraints refuse, refuse the archive.
    """
    from .errors import RuntimeFailure
    from .store.db import migrate

    fresh = db.with_name(db.name + ".fresh")

    def q(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    try:
        migrate(fresh, revision)  # unibus's own schema at the archive's revision (0600)
        with contextlib.closing(sqlite3.connect(fresh)) as conn:
            conn.execute("ATTACH DATABASE ? AS archived", (f"file:{db}?mode=ro",))
            _check_schema_objects(conn, "archived")
            listed = ("SELECT name FROM {}.sqlite_master WHERE lower(type) = 'table' "
                      "AND substr(name, 1, 7) != 'sqlite_'")
            ours = [r[0] for r in conn.execute(listed.format("main")) if r[0] != "alembic_version"]
            theirs = {r[0] for r in conn.execute(listed.format("archived"))} - {"alembic_version"}
            if theirs - set(ours):
                raise ArchiveError(f"--in: {DB_NAME} holds a table {sorted(theirs - set(ours))[0]!r}, which no "
                                   "unibus makes; nothing was restored")
            with conn:
                for table in ours:
                    columns = ", ".join(q(r[1]) for r in conn.execute(f"PRAGMA main.table_info({q(table)})"))
                    conn.execute(f"DELETE FROM main.{q(table)}")
                    conn.execute(f"INSERT INTO main.{q(table)} ({columns}) SELECT {columns} FROM archived.{q(table)}")
                orphan = conn.execute("PRAGMA main.foreign_key_check").fetchone()
                if orphan is not None:
                    raise ArchiveError(f"--in: {DB_NAME} has a row of {orphan[0]!r} whose {orphan[2]!r} does not "
                                       "exist (unibus keeps its foreign keys); nothing was restored")
            conn.execute("DETACH DATABASE archived")
        try:
            migrate(fresh)
        except RuntimeFailure as e:
            cause = e.__cause__
            raise ArchiveError(f"--in: {DB_NAME} could not be migrated from revision {revision} to the current one "
                               f"({type(cause).__name__}: {cause}); nothing was restored") from None
        with contextlib.closing(sqlite3.connect(fresh)) as conn:
            conn.execute("PRAGMA journal_mode=DELETE")  # one file, as the archive's was (membershipd sets WAL)
    except sqlite3.Error as e:
        _remove_db(fresh)
        raise ArchiveError(f"--in: {DB_NAME} does not fit unibus's schema ({e}); nothing was restored") from None
    except BaseException:
        _remove_db(fresh)
        raise
    _remove_db(db)  # the archived file and anything SQLite kept beside it: never applied to the new one
    os.replace(fresh, db)


def _remove_db(db: Path) -> None:
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
                 db.with_name(db.name + "-journal")):
        path.unlink(missing_ok=True)
