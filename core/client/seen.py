"""The msg ids a member's listeners accepted, kept across runs beside its replica.

A :class:`~unibus.client.signed.ReplayGuard` remembers the msg ids of one run. A later run
(`unibus listen --count 1` in a loop, a service restarted) remembered none, so a room member or
the NATS operator could publish a message again, unchanged, and the new run accepted it as its
sender's: a review made a script run "deploy production" once per pass. A listener whose
client keeps its replica in a directory now loads the ids accepted within its window when it
starts, and adds each one it accepts (docs/client.md, "Messages accepted once").

The files: ``<replica root>/seen/<trust root>/<room_id>.<minute>`` (one directory per
deployment, whatever spelling of its URL reached it), one line ``<time_ms> <msg_id>`` per
accepted message, by the minute of its ``Unibus-Time``. Each line is appended with one
``write`` in ``O_APPEND`` mode, so listeners in several processes may add to one file; nothing
is rewritten, and a file is removed whole once its minute is older than every window that
could still need it (a review: files were removed only at a listener's start, 3.8 MB in 15 s
of a flood). Directories and files are private (0700 and 0600, the owner's, no links, no
FIFOs), as the replica's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path

from .replica import ReplicaError, _make_private_dir, _open_private

log = logging.getLogger("unibus.client")

#: How long the ids of a room stay on disk at least: the default window (``--max-age``,
#: 300 s), or the listener's own if longer.
KEEP_MS = 300_000

#: Another room's files are removed once older than this: the longest window the CLI allows
#: (``--max-age 86400``), so that a listener of that room does not lose its ids.
KEEP_OTHERS_MS = 86_400_000

#: The most lines one listener appends in a minute of its clock, to whichever files: past it
#: the ids are kept in this run's memory only (a member flooding a room cannot fill the disk
#: faster than about 3.7 MB a minute; a review spread a flood's times over several minutes'
#: files when the bound was per file).
MAX_LINES_PER_MINUTE = 100_000

_NAME = re.compile(r"([a-z0-9]{1,40})\.([0-9]{1,12})")
_LINE = re.compile(rb"([0-9]{1,16}) ([A-Za-z0-9_-]{22})")
_MINUTE_MS = 60_000


class SeenIds:
    """The accepted msg ids of ``room_id`` in ``directory`` (one deployment's, private)."""

    def __init__(self, directory: str | os.PathLike[str], room_id: str, window_ms: int) -> None:
        self.directory = Path(directory)
        self.room_id = room_id
        self.window_ms = int(window_ms)
        self._pruned = -1  # the minute (of the clock) this instance last removed old files
        self._written = 0  # lines this instance appended in that minute
        self._capped = False

    def _open(self, name: str, flags: int) -> int:
        # O_NONBLOCK: a FIFO planted under the name must not hang the open (it is then refused
        # as no regular file); for a regular file it changes nothing.
        return _open_private(self.directory / name, flags | os.O_NONBLOCK)

    def load(self, now_ms: int) -> list[tuple[int, str]]:
        """``(time_ms, msg_id)`` of every id accepted with a time no older than the window (newer
        ones too: a run whose window or clock differed accepted them); old files are removed.
        :class:`ReplicaError` names a directory or file that is not private."""
        _make_private_dir(self.directory)
        first = (now_ms - self.window_ms) // _MINUTE_MS
        found: list[tuple[int, str]] = []
        for name, room_id, minute in self._prune(now_ms):
            if room_id != self.room_id or minute < first:
                continue
            try:
                fd = self._open(name, os.O_RDONLY)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ReplicaError(f"cannot read {self.directory / name}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            for line in data.split(b"\n"):
                m = _LINE.fullmatch(line)  # a line cut short by a crash is skipped
                if m is not None and int(m[1]) >= now_ms - self.window_ms:
                    found.append((int(m[1]), m[2].decode("ascii")))
        return found

    def _prune(self, now_ms: int) -> list[tuple[str, str, int]]:
        """Remove the files no window needs any more; ``(name, room_id, minute)`` of the others."""
        mine = (now_ms - max(self.window_ms, KEEP_MS)) // _MINUTE_MS - 1
        others = (now_ms - max(self.window_ms, KEEP_OTHERS_MS)) // _MINUTE_MS - 1
        if now_ms // _MINUTE_MS != self._pruned:
            self._pruned, self._written = now_ms // _MINUTE_MS, 0
        kept = []
        try:
            with os.scandir(self.directory) as entries:
                names = [e.name for e in entries]
        except FileNotFoundError:  # removed while a listener ran: made again, empty
            _make_private_dir(self.directory)
            return []
        except OSError as exc:
            raise ReplicaError(f"cannot list {self.directory}: {exc.strerror or exc}") from None
        for name in names:
            m = _NAME.fullmatch(name)
            if m is None:
                continue
            room_id, minute = m[1], int(m[2])
            if minute < (mine if room_id == self.room_id else others):
                with contextlib.suppress(OSError):
                    os.unlink(self.directory / name)
            else:
                kept.append((name, room_id, minute))
        return kept

    def add(self, msg_id: str, time_ms: int) -> None:
        """Append one accepted id. A failure is logged, not raised: the message was accepted, and
        this run still remembers it."""
        name = f"{self.room_id}.{time_ms // _MINUTE_MS}"
        try:
            now_ms = int(time.time() * 1000)
            if now_ms // _MINUTE_MS != self._pruned:
                self._prune(now_ms)
            if self._written >= MAX_LINES_PER_MINUTE:
                if not self._capped:
                    self._capped = True
                    log.warning("room %s: more than %d messages in a minute; their ids are kept in this run's "
                                "memory only", self.room_id, MAX_LINES_PER_MINUTE)
                return
            try:
                fd = self._open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            except FileNotFoundError:  # the directory was removed meanwhile: made again
                _make_private_dir(self.directory)
                fd = self._open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, f"{time_ms} {msg_id}\n".encode("ascii"))
            finally:
                os.close(fd)
            self._written += 1
        except (OSError, ReplicaError) as exc:
            log.warning("could not keep the id of an accepted message of room %s in %s (a later run may accept "
                        "it again): %s", self.room_id, self.directory, exc)
