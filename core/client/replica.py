"""The client's verified replica of a server's membership log, and its sync.

A client trusts nothing the server says about members, keys and rosters until
the membership log (docs/formats.md, "The membership log") backs it. This
module keeps, per identity and server, the log entries this client verified,
the verified head, the pinned trust root, the recovery bootstraps the user
accepted and, per room, the highest epoch whose key it accepted; it brings
them up to date from ``GET /v1/log/head`` and ``GET /v1/log``, entry by entry
through :class:`unibus.memberlog.LogState`. docs/client.md ("The verified
replica") describes the files and the rules.

Files, in ``<identity path>.log/<server id>/`` (directories 0700, files 0600,
refused when another user owns them):

* ``log.jsonl``: one entry per line, as its RFC 8785 canonical JSON, so the
  SHA-256 of a line is the entry's hash. Only the first ``head.seq + 1``
  lines count (a crash between the append and the state write leaves extra
  lines, cut at the next write).
* ``state.json``: ``{"version": 2, "server", "trust_root", "accepted_bootstraps",
  "head": {"seq", "hash"}, "epochs": {room_id: n}}``, replaced atomically, with
  ``"first_use": true`` while the trust root is one pinned on first use that
  ``unibus trust`` has not confirmed, and ``"changes": [{"handle", "nonce",
  "created", "process", "given_up_at"}, ...]`` while the identity has
  membership changes in flight (``process`` names the process that sends it)
  or given up on (``process`` null) that the log has not settled
  (:meth:`Replica.begin_change`). Version 1 (no ``changes``) is read too;
  version 2 is written, so that a unibus that would drop ``changes`` refuses
  the file instead.
* ``lock``: ``flock``-ed by the process that reads or writes the other two.

The local files are trusted (only their owner can write them): loading
replays them without checking signatures again. ``unibus log verify``
checks everything again from the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yarl

from ..memberlog import (
    FIRST_USE_SNAPSHOT_PAIRS,
    MAX_AUTH_SKEW,
    MAX_SAFE_INT,
    LogError,
    LogState,
    UnacceptedBootstrap,
    entry_hash,
)
from ..privatefiles import make_missing_dirs

__all__ = [
    "FINGERPRINT_RE",
    "LOCK_TIMEOUT",
    "LogVerificationError",
    "Replica",
    "ReplicaError",
    "SyncResult",
    "VerificationError",
    "replica_root_for",
    "server_id",
]

log = logging.getLogger("unibus.client")

REPLICA_VERSION = 2
_READS = (1, 2)  # the state.json versions this unibus reads
#: Entries asked for per ``GET /v1/log`` (the server's maximum).
PAGE_LIMIT = 1000
#: How long ``unibus trust`` searches a server's log for a bootstrap (a hostile one never ends).
TRUST_SEARCH_WITHIN = 60.0
#: Seconds a process waits for another one's lock on the replica.
LOCK_TIMEOUT = 30.0
#: Changes in flight or given up on that a replica remembers at most (the oldest are forgotten first).
GAVE_UP_MAX = 256
FINGERPRINT_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
_NAME_MAX = 200
#: :meth:`Replica.trust` has not asked the server for its entry 0 yet.
_UNASKED = object()


@dataclass(frozen=True)
class _Unanswered:
    """The server gave :meth:`Replica.trust` no entry 0: why."""

    reason: str


class VerificationError(Exception):
    """The membership log fails a check, or the server's answers contradict the verified log.

    ``seq`` names the entry where the log went wrong, when there is one. The
    CLI exits 1 with this message.
    """

    def __init__(self, message: str, seq: int | None = None) -> None:
        self.seq = seq
        super().__init__(message)


class LogVerificationError(VerificationError):
    """The server's membership log itself fails: a rollback, a fork, an entry that fails a check.

    Unlike a single answer that does not verify, nothing more can be
    trusted from this server until it is resolved: a listener stops on it.
    """

    @classmethod
    def from_log(cls, exc: LogError, server: str) -> LogVerificationError:
        return cls(f"the membership log of {server} does not verify: {exc}", exc.seq)


class _Redo(Exception):
    """A page's deferred checks failed: verify it again entry by entry."""


class TrustRefused(VerificationError):
    """``unibus trust`` of a fingerprint that is neither the root pinned on first use nor a
    bootstrap in the server's log: it may be the operator's root, and the server another log."""


class ReplicaError(Exception):
    """The local replica cannot be used (permissions, another user's files, a lock held too long)."""


def _escape(text: str) -> str:
    return "".join(ch if ch in _SAFE else "".join(f"%{b:02x}" for b in ch.encode("utf-8")) for ch in text)


def server_id(url: str) -> str:
    """A readable, filesystem-safe name for a server URL, different for different servers.

    ``scheme_host_port[_path]``; every character outside ``[A-Za-z0-9.-]`` is
    written ``%xx`` (so ``_`` only separates), the host in lower case and the
    port explicit: ``https://Unibus.example/`` and ``https://unibus.example:443``
    are one server. A name over 200 characters keeps its start and ends in a
    hash of the whole.
    """
    u = yarl.URL(str(url))
    if u.scheme not in ("http", "https") or not u.host:
        raise ValueError(f"server URL {url!r} must be an http:// or https:// URL with a host")
    parts = [u.scheme, u.host.lower(), str(u.port)]
    path = u.raw_path.rstrip("/")
    if path:
        parts.append(path)
    name = "_".join(_escape(p) for p in parts)
    if len(name) > _NAME_MAX:
        name = name[:_NAME_MAX - 65] + "~" + hashlib.sha256(name.encode()).hexdigest()
    return name


def replica_root_for(identity_path: str | os.PathLike[str]) -> Path:
    """``<identity path>.log``: where the replicas of that identity live, one directory per server."""
    p = Path(os.path.expanduser(os.fspath(identity_path)))
    return p.with_name(p.name + ".log")


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What a sync did: ``fetched`` new entries, ``pinned`` the trust root now (first use)."""

    head: tuple[int, str]
    fetched: int
    pinned: str | None = None


# --------------------------------------------------------------------------- files


def _check_private_dir(path: Path) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ReplicaError(f"{path} is not a directory (a link or a file is there); move it away")
    if st.st_uid != os.getuid():
        raise ReplicaError(f"{path} belongs to another user (uid {st.st_uid}); refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _make_private_dir(path: Path) -> None:
    """``path`` (a server's replica) and its parent (the replica root) as private directories."""
    make_missing_dirs(path.parent.parent)  # each 0700, whatever the umask
    for d in (path.parent, path):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        _check_private_dir(d)


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReplicaError(f"{path} is not a regular file")
        if st.st_uid != os.getuid():
            raise ReplicaError(f"{path} belongs to another user (uid {st.st_uid}); refusing to use it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_file(path: Path) -> bytes | None:
    try:
        fd = _open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------- the replica


class Replica:
    """One server's verified log for one identity: in ``directory``, or in memory when None.

    ``trust_root`` pins a fingerprint for an in-memory replica (a directory
    keeps its own pin, set by ``unibus trust``). ``notice`` receives the
    one-line messages a user should see (the trust-on-first-use pin, a
    damaged replica being rebuilt); default: logged at WARNING.
    """

    def __init__(self, server: str, directory: str | os.PathLike[str] | None = None, *,
                 trust_root: str | None = None, notice: Callable[[str], None] | None = None) -> None:
        self.server = server
        self.directory = None if directory is None else Path(directory)
        self.notice = notice or (lambda text: log.warning("%s", text))
        self.trust_root: str | None = _fingerprint(trust_root) if trust_root else None
        self.accepted: set[str] = set()
        self.first_use = False  # the root was pinned on first use, not named by `unibus trust` (persisted)
        self.pinned_head: tuple[int, str] = (-1, "")  # the head this client verified last (persisted)
        self.epochs: dict[str, int] = {}
        #: (handle, nonce) -> _Change: this identity's membership changes in flight or given up on,
        #: not yet settled (:meth:`begin_change`; persisted)
        self._changes: dict[tuple[str, str], _Change] = {}
        #: (handle, nonce) -> the head seq read once it was given up on (None: in flight, or not read), of
        #: each of them: what :class:`LogState` reads (``in_doubt``)
        self.in_doubt: dict[tuple[str, str], int | None] = {}
        self._told: set[int] = set()  # the seqs of kept_back this process has given a notice of
        self.server_skew: int | None = None  # the --auth-skew the server reported last (availability only)
        self.state = self._fresh_state()
        self._disk_lines = 0  # lines of log.jsonl that hold state's entries
        self._disk_bytes = 0
        self._mem_lines: list[bytes] = []  # an in-memory replica's verified entries, canonical (for _replay)
        self._stamp: bytes | None = None  # state.json as last read or written
        self._stale = True  # reload from the files before use
        self._alock = asyncio.Lock()

    # -- the lock ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the replica (this task, and ``flock`` against other processes), up to date with its files."""
        async with self._alock:
            if self.directory is None:
                yield
                return
            _make_private_dir(self.directory)
            fd = _open_private(self.directory / "lock", os.O_RDWR | os.O_CREAT)
            try:
                deadline = time.monotonic() + LOCK_TIMEOUT
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() > deadline:
                            raise ReplicaError(f"another unibus process has held the lock of {self.directory} "
                                               f"for more than {LOCK_TIMEOUT:.0f} s") from None
                        await asyncio.sleep(0.05)
                self._refresh()
                yield
            finally:
                os.close(fd)  # releases the flock

    def pinned_root(self) -> str | None:
        """The trust root pinned for this server: as ``state.json`` has it now (read without the
        lock, which a task holding it may be waiting on: the file is replaced whole), else the one
        in memory (an in-memory replica's, or a ``trust_root`` given and not written yet).

        A red team: the tag of a changing request was taken from the server whenever the
        replica's files had not been read yet in this process, so a compromised server chose
        another deployment's tag, or none, for a client that had pinned and verified its root.
        Read afresh each time: a review's long-running process kept tagging with the root that
        `unibus trust --reset` had replaced on disk, and a ``trust_root`` argument overrode the
        directory's own pin until the first sync."""
        if self.directory is not None:
            raw = _read_file(self.directory / "state.json")
            if raw is not None:
                try:
                    doc = json.loads(raw)
                    root = doc.get("trust_root") if isinstance(doc, dict) else None
                    if root is not None:
                        return _fingerprint(root)
                except (ValueError, TypeError, AttributeError) as exc:
                    raise ReplicaError(f"{self.directory}/state.json is damaged ({exc}); move the directory away "
                                       "and pin the trust root again with `unibus trust`") from None
        return self.trust_root

    # -- loading ---------------------------------------------------------------------------

    def _fresh_state(self) -> LogState:
        # The time checks use the constant cap of every server's --auth-skew,
        # never the auth_skew a server reports (docs/client.md, "The verified replica").
        return LogState(trust_root=self.trust_root, accepted_bootstraps=self.accepted, skew=MAX_AUTH_SKEW,
                        in_doubt=self.in_doubt, first_use_pairs=FIRST_USE_SNAPSHOT_PAIRS)

    def _refresh(self) -> None:
        """Catch up with the files (another process may have synced); load them the first time."""
        assert self.directory is not None
        raw = _read_file(self.directory / "state.json")
        if raw is None or (raw == self._stamp and not self._stale):
            if raw is None and self._stale:
                self._reset_memory()
            self._stale = False
            self._reap_ended()
            return
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            version = doc.get("version")
            if version not in _READS:
                raise ReplicaError(f"{self.directory}/state.json has version {version!r}; this unibus reads "
                                   f"versions {' and '.join(map(str, _READS))} (a newer unibus wrote it?)")
            root = doc.get("trust_root")
            root = _fingerprint(root) if root is not None else None
            first_use = doc.get("first_use", False)
            if type(first_use) is not bool:
                raise ValueError("bad first_use")
            accepted = {_fingerprint(f) for f in doc.get("accepted_bootstraps", [])}
            head = doc.get("head") or {}
            seq, digest = head.get("seq"), head.get("hash")
            if type(seq) is not int or not -1 <= seq <= MAX_SAFE_INT or not isinstance(digest, str) \
                    or (seq >= 0 and not FINGERPRINT_RE.match(digest)) or (seq < 0 and digest):
                raise ValueError("bad head")
            epochs = doc.get("epochs") or {}
            if not isinstance(epochs, dict) or not all(isinstance(k, str) and type(v) is int
                                                       for k, v in epochs.items()):
                raise ValueError("bad epochs")
            changes = _changes_from(doc.get("changes") or [])
        except (ValueError, TypeError, AttributeError) as exc:
            raise ReplicaError(f"{self.directory}/state.json is damaged ({exc}); move the directory away and "
                               "pin the trust root again with `unibus trust`") from None
        doubt = {k: c.given_up_at for k, c in changes.items()}
        same_log = (not self._stale and self.state.head == (seq, digest) and self.trust_root == root
                    and doubt == self.in_doubt)
        self._changes = changes
        self._set_doubt()  # a different one is replayed by _load_entries below (same_log is False)
        self.trust_root, self.accepted, self.first_use = root, accepted, first_use and root is not None
        self.pinned_head = (seq, digest)
        for room, n in epochs.items():  # never lower an accepted epoch, whoever wrote last
            self.epochs[room] = max(n, self.epochs.get(room, 0))
        self._stamp = raw
        if same_log:
            self.state.accepted_bootstraps = set(accepted)
        else:
            self._load_entries()
            self._told |= set(self.state.kept_back)  # what the files hold was told when it was found
        self._stale = False
        self._reap_ended()

    def _reap_ended(self) -> None:
        """A change whose process ended before settling it was given up on (a kill, a crash): record
        so, with the head verified before it was sent for the head read at the give-up (the log
        holding it after that head is held back: a kill right after an honest server made the change
        meets it too)."""
        me = _this_process()
        ended = [k for k, c in self._changes.items()
                 if c.process is not None and c.process != me and not _process_alive(c.process, c.created)]
        if not ended:
            return
        for key in ended:
            c = self._changes[key]
            self._changes[key] = _Change(c.created, None, c.sent_after, c.sent_after)
        self._sync_doubt()
        self._tell_kept()
        self._write_state()

    def _sync_doubt(self) -> None:
        """:attr:`in_doubt` as :attr:`_changes` says, and the log replayed when that may change the
        verdict on an entry it holds: a change taken for held back settled (confirmed after all: a
        request in flight that an honest server logged after a later one), or a change the log holds
        given up on with no head read after it (a process killed, a read that failed). Both are
        rare: a change given up on is read against the log, and settled when the log holds it."""
        before = dict(self.in_doubt)
        self._set_doubt()
        flagged = {(k.author, k.nonce) for k in self.state.kept_back.values()}
        cleared = any(k in flagged for k in before.keys() - self.in_doubt.keys())
        given_up = any(k in self.state.nonces and before.get(k, 0) is None and v is not None
                       for k, v in self.in_doubt.items())
        if cleared or given_up:
            self._replay()

    def _set_doubt(self) -> None:
        """:attr:`in_doubt` (the mapping :class:`LogState` holds) as :attr:`_changes` says, in place."""
        self.in_doubt.clear()
        self.in_doubt.update({k: c.given_up_at for k, c in self._changes.items()})

    def _replay(self) -> None:
        """Apply the verified entries again, trusted (:attr:`in_doubt` changed): from the files, or
        those an in-memory replica keeps."""
        if self.directory is not None:
            self._load_entries()
        else:
            lines, state = self._mem_lines, self._fresh_state()
            for line in lines:
                state.apply(json.loads(line), trusted_hash=hashlib.sha256(line).hexdigest())
            self.state = state
        self._tell_kept()

    def _tell_kept(self) -> None:
        """A notice for each change held back that this process has not told of yet; not for one
        this process still has in flight (an honest server may log two changes in flight out of
        order): it is told once given up on, and never if it is confirmed."""
        me = _this_process()
        for seq in sorted(set(self.state.kept_back) - self._told):
            kept = self.state.kept_back[seq]
            mine = self._changes.get((kept.author, kept.nonce))
            if mine is not None and mine.process == me:
                continue
            self._told.add(seq)
            when = (f"after a request {kept.author} signed later (seq {kept.later})" if kept.later is not None
                    else f"after seq {kept.given_up_at}, the log as its client read it once it gave up on it (or "
                         f"before sending it, when it could not read it then)")
            self.notice(f"{self.server}'s membership log holds at seq {seq} a change of {kept.author}'s that its "
                        f"client had not seen confirmed ({kept.op} {' '.join(kept.args)}: it failed, went "
                        f"unanswered, or is still in flight), {when}: the server held it back, then appended it. "
                        f"Check it (`unibus log show`) and undo it if it is not meant; no room key is sealed to, "
                        f"or sent with, a member such a change put back in a room")

    def _reset_memory(self) -> None:
        self.state = self._fresh_state()
        self._disk_lines = self._disk_bytes = 0
        self._mem_lines = []

    def _load_entries(self) -> None:
        """Replay ``log.jsonl`` up to the pinned head, trusted; a damaged file is rebuilt from the server."""
        assert self.directory is not None
        self._reset_memory()
        want = self.pinned_head[0] + 1
        if want == 0:
            return
        data = _read_file(self.directory / "log.jsonl") or b""
        state, offset, count = self.state, 0, 0
        try:
            while count < want:
                end = data.find(b"\n", offset)
                if end < 0:
                    raise ValueError(f"{count} entries for a head at seq {want - 1}")
                line = data[offset:end]
                state.apply(json.loads(line), trusted_hash=hashlib.sha256(line).hexdigest())
                offset, count = end + 1, count + 1
            if state.head != self.pinned_head:
                raise ValueError("the last entry is not the verified head")
        except (ValueError, LogError) as exc:
            self.notice(f"the local replica in {self.directory} is damaged ({exc}); fetching the log again from "
                        f"{self.server} and verifying it (the pinned trust root and the verified head still hold)")
            self._reset_memory()
            return
        self._disk_lines, self._disk_bytes = count, offset

    # -- saving ----------------------------------------------------------------------------

    def _save(self, new_lines: Iterable[bytes] = (), *, rewrite: bool = False) -> None:
        """Append ``new_lines`` (canonical entries following the saved ones), then write state.json."""
        if self.directory is None:
            if rewrite:
                self._mem_lines = list(new_lines)
            else:
                self._mem_lines.extend(new_lines)
            return
        _make_private_dir(self.directory)
        lines = list(new_lines)
        if lines or rewrite:
            fd = _open_private(self.directory / "log.jsonl", os.O_WRONLY | os.O_CREAT)
            try:
                base = 0 if rewrite else self._disk_bytes
                os.ftruncate(fd, base)
                os.lseek(fd, base, os.SEEK_SET)
                blob = b"".join(line + b"\n" for line in lines)
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._disk_lines = (0 if rewrite else self._disk_lines) + len(lines)
            self._disk_bytes = base + len(blob)
        self._write_state()

    def _write_state(self) -> None:
        if self.directory is None:
            return
        seq, digest = self.pinned_head
        doc = {"version": REPLICA_VERSION, "server": self.server, "trust_root": self.trust_root,
               "accepted_bootstraps": sorted(self.accepted), "head": {"seq": seq, "hash": digest},
               "epochs": dict(sorted(self.epochs.items()))}
        if self.first_use:
            doc["first_use"] = True
        if self._changes:
            doc["changes"] = [{"handle": h, "nonce": n, "created": c.created, "process": c.process,
                               "given_up_at": c.given_up_at, "sent_after": c.sent_after}
                              for (h, n), c in sorted(self._changes.items(), key=lambda kv: (kv[1].created, kv[0]))]
        raw = (json.dumps(doc, indent=1) + "\n").encode()
        _write_atomic(self.directory / "state.json", raw)
        self._stamp = raw

    # -- changes in flight and given up on ---------------------------------------------------

    async def begin_change(self, handle: str, nonce: str, created: int, sent_after: int = -1) -> None:
        """Remember, before it is sent, that this process sends ``handle``'s membership change signed
        with ``nonce`` at ``created``, the log verified up to seq ``sent_after``;
        :meth:`settle_change` once it is confirmed, :meth:`give_up`
        otherwise. A process that ends in between (a kill, a crash) gave up on it: the next one to
        read the files records so. Until it is settled, the log holding it after a request
        ``handle`` signed later, or after the head read once it was given up on, shows a server
        that held it back (:attr:`unibus.memberlog.LogState.kept_back`; docs/client.md, "Changes
        confirmed in the log"). At most :data:`GAVE_UP_MAX` not settled are remembered, the oldest
        forgotten first. Raises :class:`ReplicaError` when the files cannot be written: then send
        nothing."""
        async with self.locked():
            self._changes[(handle, nonce)] = _Change(created, _this_process(), None, sent_after)
            kept = {(k.author, k.nonce) for k in self.state.kept_back.values()}  # for replays: never dropped
            unsettled = sorted((k for k in self._changes if k not in kept), key=lambda k: (self._changes[k].created, k))
            for old in unsettled[:max(0, len(unsettled) - GAVE_UP_MAX)]:
                del self._changes[old]
            self._sync_doubt()
            self._write_state()

    async def settle_change(self, handle: str, nonce: str) -> None:
        """The change :meth:`begin_change` remembered was confirmed: forget it (and replay the log,
        if it had been taken for held back while it was in flight)."""
        async with self.locked():
            if self._changes.pop((handle, nonce), None) is not None:
                self._sync_doubt()
                self._write_state()

    async def give_up(self, handle: str, nonce: str, head: int | None) -> None:
        """This process gave up on the change :meth:`begin_change` remembered (an error answer, no
        answer, a change it could not confirm, an interrupt), having read the log up to seq ``head``
        after that: the log holding it after that head was appended after the failure was
        reported. Without a head read (None: the log could not be read, an interrupt), the head
        verified before it was sent stands in, and any entry of it is taken for held back."""
        async with self.locked():
            key = (handle, nonce)
            if key not in self._changes:
                return
            c = self._changes[key]
            self._changes[key] = _Change(c.created, None, c.sent_after if head is None else head, c.sent_after)
            self._sync_doubt()
            self._tell_kept()
            self._write_state()

    def latest_in_flight(self) -> int | None:
        """The ``created`` of the latest change in flight, of any process (None: none)."""
        return max((c.created for c in self._changes.values() if c.process is not None), default=None)

    def _forget_settled(self) -> None:
        """Forget the changes given up on whose outcome the log settled: held in it and not held
        back (the verdict is the same without them), or too old for any later entry (the log refuses
        a ``created`` over twice the skew older than its newest). Those it holds where they were
        held back are kept: a replay of the replica finds them again. A change still in flight
        stays until its process settles it or gives up on it, even when the log holds it already."""
        state = self.state
        kept = {(k.author, k.nonce) for k in state.kept_back.values()}
        for key, c in list(self._changes.items()):
            if key in kept:
                continue
            if (c.process is None and key in state.nonces) or \
                    (key not in state.nonces and c.created < state.max_created - 2 * state.skew):
                del self._changes[key]
        self._set_doubt()  # the verdicts on the entries held stay as they are (no replay)

    # -- pins ------------------------------------------------------------------------------

    async def pin_first_use(self, root: str) -> str:
        """Pin ``root`` (entry 0's fingerprint, checked by the caller as a sync checks it) as the
        trust root when none is pinned yet, with the notice of a first sync; return the root
        pinned (another process's, when it pinned one first)."""
        root = _fingerprint(root)
        async with self.locked():
            if self.trust_root is None:
                self._pin_on_first_use(root)
            assert self.trust_root is not None
            return self.trust_root

    async def trust(self, fingerprint: str, *, reset: bool = False, client: Any = None) -> str:
        """``unibus trust``: pin ``fingerprint`` as the trust root when none is pinned, accept it as a
        recovery bootstrap when one is (verified yet or not), or (``reset``) start over with it as
        the trust root. Returns what was done: ``"pinned"``, ``"already"``, ``"confirmed"`` (the
        root pinned on first use, named now), ``"accepted"`` or ``"reset"``.

        A root pinned on first use came from the server: another fingerprint is accepted as a
        recovery bootstrap only when the server's log holds a bootstrap entry with that hash after
        entry 0, which ``client`` (a :class:`unibus.client.UnibusClient`) is asked for. Otherwise
        :class:`TrustRefused` is raised: the fingerprint may be the root the operator gave, and the
        server another log (a walk-through of the upgrade steps pinned the server's root first,
        then took the operator's root for a bootstrap, exit 0).

        A root pinned by hand (or confirmed): another fingerprint is accepted in advance as a
        recovery bootstrap, after ``client`` was asked for the entry 0 it serves. When that entry's
        hash is the fingerprint, the deployment started over with a new log, and
        :class:`TrustRefused` is raised (naming ``--reset``); when the server cannot say (unreachable,
        an error answer), the fingerprint is accepted with a notice saying so."""
        fp = _fingerprint(fingerprint)
        found: bool | None = None
        served_root: str | None | object = _UNASKED if client is not None else None
        for _ in range(3):  # each question is asked at most once, outside the lock (a review: a
            # server's endless log held it, and every other command of the identity waited)
            async with self.locked():
                done = self._trust_now(fp, reset, found, served_root)
                if done is not None:
                    return done
                after = max(0, self.pinned_head[0])  # what is verified holds no unaccepted bootstrap
                search = self.first_use and found is None
            if search:
                found = await self._served_bootstrap(client, fp, after)
            else:
                served_root = await self._served_root(client)
        raise AssertionError("trust asked the server more than twice")  # _trust_now decides by then

    def _trust_now(self, fp: str, reset: bool, found: bool | None, served_root: str | None | object) -> str | None:
        """What :meth:`trust` does, under the lock; None when the server must be asked first
        (``found``: whether the search of its log found ``fp``, or None before it; ``served_root``:
        the fingerprint of the entry 0 it serves, None if unknown, ``_UNASKED`` before asking)."""
        if reset:
            self.trust_root, self.accepted, self.pinned_head, self.epochs = fp, set(), (-1, ""), {}
            self.first_use = False
            self._reset_memory()
            self._save(rewrite=True)
            return "reset"
        if self.trust_root == fp:
            if not self.first_use:
                return "already"
            self.first_use = False
            self._write_state()
            return "confirmed"
        if self.trust_root is None:  # nothing pinned yet: the trust root
            self.trust_root = fp
            self.state.trust_root = fp
            self.first_use = False
            self._write_state()
            return "pinned"
        if fp in self.accepted:
            if served_root is _UNASKED and not found:
                return None
            if served_root == fp:  # taken for a recovery before this check existed
                raise self._started_over(fp)
            return "already"
        if self.first_use and not found:
            if found is None:
                return None
            raise TrustRefused(
                f"the trust root of {self.server} was pinned on first use ({self.trust_root}) and {fp} is not "
                f"a recovery bootstrap in the log it serves: if {fp} is the trust root your operator gave you, "
                f"this server serves another log (`unibus trust --reset {fp}` starts over with yours, and the "
                f"next command checks the server against it); if it is a recovery bootstrap, confirm the root "
                f"first with `unibus trust {self.trust_root}`")
        # A root is pinned, verified or not: another fingerprint is a recovery bootstrap. It
        # replaced the root while nothing was verified, so a new member of a deployment that
        # had recovered (`trust ROOT`, then `trust RECOVERY`) could never verify its log (red
        # team). Re-pinning a root is `--reset`.
        if served_root is _UNASKED and not found:  # a bootstrap found after entry 0 is not entry 0
            return None
        if served_root == fp:
            # The entry 0 of the log the server serves now: a deployment started over (an upgrade
            # redone from a copy made before it, a new database), which no bootstrap after the
            # pinned root can be; accepted as one, every later command failed (an upgrade drill).
            raise self._started_over(fp)
        if isinstance(served_root, _Unanswered):
            self.notice(f"{self.server} did not serve its entry 0 ({served_root.reason}), so {fp} is taken for a "
                        f"recovery bootstrap unchecked: if it is a new trust root your operator gave you "
                        f"(the deployment started over), run `unibus trust --reset {fp}` instead")
        self.accepted.add(fp)
        self.state.accepted_bootstraps.add(fp)
        self._write_state()
        return "accepted"

    def _started_over(self, fp: str) -> TrustRefused:
        return TrustRefused(
            f"{self.server} says its membership log now starts with {fp} (unverified), so {fp} is no recovery "
            f"bootstrap after the root you pinned ({self.trust_root}): the deployment started over with a new "
            f"log, or the server is not the one you trust. Only if your operator confirms it started over and "
            f"gave you {fp}, `unibus trust --reset {fp}` forgets what this client verified of {self.server} and "
            f"pins {fp}")

    async def _served_root(self, client: Any) -> str | None | _Unanswered:
        """The fingerprint of the entry 0 the server serves now; :class:`_Unanswered` when it gives
        none (unreachable, an error answer), None for an answer that is not a log page. Unverified:
        it only ever leads to a refusal (an entry's hash covers its ``seq``, so no entry 0 has a
        later bootstrap's hash)."""
        import aiohttp

        from .api import ApiError, ServerUnreachable

        try:
            page = await client.log(limit=1)
        except (ApiError, ServerUnreachable, aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _Unanswered(str(exc)[:200] or type(exc).__name__)
        entries = page.get("entries") if isinstance(page, dict) else None
        first = entries[0] if isinstance(entries, list) and entries else None
        if not isinstance(first, dict) or type(first.get("seq")) is not int or first["seq"] != 0:
            return None
        return _entry_fingerprint(first)

    async def _served_bootstrap(self, client: Any, fp: str, after: int = 0) -> bool:
        """Whether the server's log holds a bootstrap entry whose hash is ``fp`` after seq
        ``after`` (at least entry 0; unverified: an entry's hash covers its ``seq``, so no later
        entry has entry 0's hash). A search longer than :data:`TRUST_SEARCH_WITHIN` raises
        :class:`VerificationError`."""
        if client is None:
            return False
        head = await client.log_head()
        last = head.get("seq") if isinstance(head, dict) else None
        if type(last) is not int or last < 1:
            return False
        deadline = time.monotonic() + TRUST_SEARCH_WITHIN
        after = max(0, after)
        while after < last:
            if time.monotonic() > deadline:
                raise VerificationError(f"{self.server}'s membership log could not be searched for {fp} within "
                                        f"{TRUST_SEARCH_WITHIN:.0f} s; nothing was accepted")
            page = await client.log(after=after, limit=PAGE_LIMIT)
            entries = page.get("entries") if isinstance(page, dict) else None
            if not isinstance(entries, list) or not entries:
                return False
            for entry in entries:
                if not isinstance(entry, dict) or type(entry.get("seq")) is not int or entry["seq"] <= after:
                    return False  # not a log page: nothing found
                after = entry["seq"]
                if entry.get("kind") == "bootstrap" and _entry_fingerprint(entry) == fp:
                    return True
        return False

    async def accept_epoch(self, room_id: str, epoch: int) -> None:
        """Remember that a key of ``epoch`` was accepted for the room (never lowered)."""
        if epoch <= self.epochs.get(room_id, 0):
            return
        async with self.locked():
            if epoch > self.epochs.get(room_id, 0):
                self.epochs[room_id] = epoch
                self._write_state()

    async def accepted_epoch(self, room_id: str) -> int:
        """The highest epoch whose key was accepted for the room, by any process (0: none)."""
        async with self.locked():
            return self.epochs.get(room_id, 0)

    # -- sync ------------------------------------------------------------------------------

    async def sync(self, client: Any, *, from_scratch: bool = False) -> SyncResult:
        """Bring the replica to the server's head, verifying every new entry.

        ``client`` has ``log_head()`` and ``log(after=, limit=)`` (a
        :class:`unibus.client.UnibusClient`). ``from_scratch`` verifies the
        whole log again into a new state (``unibus log verify``) and, if it
        holds, replaces the replica with it. Raises :class:`VerificationError`
        naming the seq (rollback, fork, an entry that fails a check).
        """
        async with self.locked():
            return await self._sync(client, from_scratch)

    async def _sync(self, client: Any, from_scratch: bool, defer: bool = True) -> SyncResult:
        seq, digest = await self._server_head(client, from_scratch)
        pinned_head = self.pinned_head
        state = self._fresh_state() if from_scratch else self.state
        had_root = self.trust_root
        try:
            lines = await self._apply_pages(client, state, seq, defer, self.state if from_scratch else None)
        except (LogError, _Redo) as exc:
            root = state.root
            self._discard(from_scratch)
            if not defer:
                assert isinstance(exc, LogError)
                if isinstance(exc, UnacceptedBootstrap) and self.trust_root is None and root is not None:
                    # First contact with a log whose entry 0 verified, and which holds a later offline
                    # bootstrap: entry 0 is pinned as on any first use, so that `unibus trust <that
                    # bootstrap>`, as the error says, accepts it (it would pin it as the root otherwise).
                    self._pin_on_first_use(root)
                raise LogVerificationError.from_log(exc, self.server) from None
            failed = True
        except BaseException:
            self._discard(from_scratch)
            raise
        else:
            failed = False
        if failed:
            # Something failed: check again entry by entry, which names the first bad one. Out of
            # the except block, with the failed state dropped: a review's server made the retry
            # parse a second 60 MiB page while the first try's traceback still held the first.
            del state
            if self.directory is not None and not from_scratch:
                self._refresh()
            return await self._sync(client, from_scratch, defer=False)
        try:
            self._check_same_log(state, seq, digest, pinned_head)
        except LogVerificationError:
            self._discard(from_scratch)
            raise
        return self._adopt(state, lines, from_scratch, had_root)

    async def _server_head(self, client: Any, from_scratch: bool = False) -> tuple[int, str]:
        """The server's log head ``(seq, hash)``; a rollback or a fork of the pinned head is refused.

        ``from_scratch`` (``log verify``): another hash at the pinned seq is left to the entries,
        which are all fetched again and compared with the verified ones, so that the first entry
        that changed is named rather than the head (a review: a server that rewrote an entry's
        ``at`` and chained the rest and the head again was named only as a fork at the head);
        :meth:`_check_same_log` still refuses whatever differs at the pinned head."""
        head = await client.log_head()
        if not isinstance(head, dict):
            raise LogVerificationError(f"{self.server} answered GET /v1/log/head with something else than an object")
        seq, digest = head.get("seq"), head.get("hash")
        if type(seq) is not int or not -1 <= seq <= MAX_SAFE_INT or not isinstance(digest, str) \
                or (seq >= 0 and not FINGERPRINT_RE.match(digest)):
            raise LogVerificationError(f"{self.server} served a malformed log head")
        # what the server says it takes (GET /v1/log/head's Unibus-Auth-Skew header, read by the client):
        # used only to keep a change's `created` within it, never in a check
        skew = getattr(client, "reported_auth_skew", None)
        self.server_skew = skew if type(skew) is int and 1 <= skew <= MAX_AUTH_SKEW else None
        pinned_seq, pinned_hash = self.pinned_head
        if seq < pinned_seq:
            raise LogVerificationError(
                f"rollback: {self.server} serves a membership log that ends at seq {seq}, but this client has "
                f"verified it up to seq {pinned_seq}: entries after seq {seq} were dropped. That is what a "
                f"compromised server does; only if your operator started the deployment over and gives you "
                f"its new trust root, `unibus trust --reset NEW_ROOT` starts this client over", pinned_seq)
        if seq == pinned_seq and digest != pinned_hash and not from_scratch:
            raise LogVerificationError(
                f"fork: {self.server} serves another entry at seq {seq} than the one this client verified "
                f"({digest} instead of {pinned_hash})", seq)
        return seq, digest

    async def _apply_pages(self, client: Any, state: LogState, seq: int, defer: bool,
                           verified: LogState | None = None) -> list[bytes]:
        """Fetch and apply the entries after ``state``'s head up to ``seq``; return their canonical lines.

        With ``defer`` the signatures of a page are checked together (:class:`_Redo` if one fails).
        ``verified``: the replica's state, when the log is verified again from seq 0 (``unibus log
        verify``). An entry it holds that now hashes to something else is named as altered: a field no
        signature covers (``at``, the server's clock) fails no check of its own entry, and the chain alone
        would name the entry after it, or, the rest chained again, only the verified head."""
        lines: list[bytes] = []
        while state.head[0] < seq:
            after = state.head[0]
            page = await client.log(after=None if after < 0 else after, limit=PAGE_LIMIT)
            entries = page.get("entries") if isinstance(page, dict) else None
            if not isinstance(entries, list) or not entries:
                raise LogVerificationError(f"{self.server} says its membership log reaches seq {seq}, but serves "
                                           f"no entry after seq {after}", after + 1)
            if defer:  # the Ed25519 work of a page on every core, then the page's verdict
                state.defer_checks()
            for entry in entries:
                digest, raw = state.apply_canonical(entry)
                lines.append(raw)
                if verified is not None:
                    at, was = state.head[0], verified.hash_at(state.head[0])
                    if was is not None and was != digest:
                        raise LogError(at, f"the server altered it: this client verified another entry at seq {at} "
                                           f"(its hash was {was}, the one served now hashes to {digest})")
            if defer and state.run_deferred() is not None:
                raise _Redo
        return lines

    def _check_same_log(self, state: LogState, seq: int, digest: str, pinned_head: tuple[int, str]) -> None:
        """The applied log ends in the entry the head names and holds the pinned head's entry."""
        if state.hash_at(seq) != (digest or None):
            raise LogVerificationError(f"fork: the entry {self.server} serves at seq {seq} is not the one its log head "
                                       "names", seq)
        pinned_seq, pinned_hash = pinned_head
        if pinned_seq >= 0 and state.hash_at(pinned_seq) != pinned_hash:
            raise LogVerificationError(f"fork: {self.server} serves another entry at seq {pinned_seq} than the one "
                                       "this client verified", pinned_seq)

    def _pin_on_first_use(self, root: str) -> None:
        """Pin ``root`` as the trust root, nothing verified yet (a first sync that stopped after entry 0)."""
        self.trust_root = self.state.trust_root = root
        self.first_use = True
        self._write_state()
        self.notice(f"trusting the membership log of {self.server} on first use: its trust root fingerprint is "
                    f"{root}; check it with your operator (`unibus trust FINGERPRINT` pins it in advance)")

    def _adopt(self, state: LogState, lines: list[bytes], from_scratch: bool, had_root: str | None) -> SyncResult:
        """Make the verified ``state`` the replica's (pinning its trust root on first use) and save ``lines``."""
        pinned = None
        if self.trust_root is None and state.root is not None:
            self.trust_root = pinned = state.root
            self.first_use = True
        state.trust_root = self.trust_root
        self.state = state
        self.pinned_head = state.head
        self._forget_settled()  # on a verified state only
        if from_scratch:
            self._save(lines, rewrite=True)
        else:
            self._save(lines)
        if pinned is not None and had_root is None:
            self.notice(f"trusting the membership log of {self.server} on first use: its trust root fingerprint is "
                        f"{pinned}; check it with your operator (`unibus trust FINGERPRINT` pins it in advance)")
        self._tell_kept()
        return SyncResult(self.pinned_head, len(lines), pinned)

    def _discard(self, from_scratch: bool) -> None:
        """Forget what a failed sync applied: a failing entry may leave the state half-changed.

        The pinned head stays, so the next sync still refuses a rollback or a
        fork; a replica in files reloads them, one in memory starts again from seq 0.
        """
        if from_scratch:
            return  # the failed state was a new one; self.state is untouched
        if self.directory is not None:
            self._stale = True
        else:
            self._reset_memory()


@dataclass(frozen=True)
class _Change:
    """A membership change of this identity not yet settled (:meth:`Replica.begin_change`)."""

    created: int
    process: str | None  # the process that sends it (:func:`_process_name`); None once given up on
    given_up_at: int | None  # the head seq read once it was given up on (else sent_after); None: in flight
    sent_after: int = -1  # the verified head seq before it was sent


def _changes_from(records: Any) -> dict[tuple[str, str], _Change]:
    """``state.json``'s ``changes``; ValueError if malformed."""
    if not isinstance(records, list):
        raise ValueError("bad changes")
    out: dict[tuple[str, str], _Change] = {}
    for r in records:
        if not isinstance(r, dict) or not isinstance(r.get("handle"), str) or not isinstance(r.get("nonce"), str) \
                or type(r.get("created")) is not int \
                or not (r.get("process") is None or isinstance(r.get("process"), str)) \
                or not (r.get("given_up_at") is None or type(r.get("given_up_at")) is int) \
                or type(r.get("sent_after", -1)) is not int:
            raise ValueError("bad changes")
        out[(r["handle"], r["nonce"])] = _Change(r["created"], r["process"], r.get("given_up_at"),
                                                 r.get("sent_after", -1))
    return out


def _read_small(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(4096)
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc), or None where unknown."""
    stat = _read_small(f"/proc/{pid}/stat")
    if stat is None or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def _namespace() -> str:
    """This host and PID namespace: the boot, the host name and the PID namespace (Linux)."""
    boot = (_read_small("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{boot}|{socket.gethostname()}|{pidns}".replace("/", "_")


def _process_name() -> str:
    """This process, named so that another process can tell whether it still runs: its host and
    PID namespace (:func:`_namespace`), its pid, and when it started (Linux)."""
    pid = os.getpid()
    return f"{_namespace()}/{pid}/{_process_start(pid) or ''}"


def _process_alive(name: str, created: int) -> bool:
    """Whether the process :func:`_process_name` gave ``name``, sending a change signed at
    ``created``, may still run. One of this host and PID namespace runs if its pid does, and
    started when it did. One of an earlier boot of this host does not. One of another host or
    PID namespace (a container, a home directory shared between hosts) cannot be looked at: it
    is taken to run until no server could take its change any more (``created`` older than
    :data:`MAX_AUTH_SKEW`)."""
    where, _, rest = name.partition("/")
    pid_text, _, start = rest.partition("/")
    if not pid_text.isdigit() or int(pid_text) <= 0:
        return False
    here = _namespace()
    if where != here:
        boot, host, _ns = (where.split("|") + ["", "", ""])[:3]
        here_boot, here_host, _ = here.split("|")
        if host == here_host and boot != here_boot:
            return False  # an earlier boot of this host
        return time.time() <= created + MAX_AUTH_SKEW
    pid = int(pid_text)
    if start:
        return _process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it runs, as another user
    return True


_NAMES: dict[int, str] = {}


def _this_process() -> str:
    """:func:`_process_name` of this process (kept per pid: a fork is another process)."""
    pid = os.getpid()
    if pid not in _NAMES:
        _NAMES[pid] = _process_name()
    return _NAMES[pid]


def _entry_fingerprint(entry: dict[str, Any]) -> str | None:
    """``hash(entry)`` of an entry as a server served it, or None for one that is not JSON a log holds."""
    try:
        return entry_hash(entry)
    except (TypeError, ValueError):
        return None


def _fingerprint(value: Any) -> str:
    if not isinstance(value, str) or not FINGERPRINT_RE.match(value.lower()):
        raise ValueError("a fingerprint is 64 hexadecimal characters (the SHA-256 of entry 0 of the log)")
    return value.lower()
