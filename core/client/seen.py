"""The msg ids a member's listeners accepted, kept across runs in its replica directory.

A :class:`~unibus.client.signed.ReplayGuard` remembers the msg ids of one run. A later run
(`unibus listen --count 1` in a loop, a service restarted) remembered none, so a room member or
the NATS operator could publish a message again, unchanged, and the new run accepted it as its
sender's: a review made a script run "deploy production" once per pass. A listener with a
replica directory now loads the ids accepted within its window when it starts and adds each
one it accepts (docs/client.md, "Messages accepted once").

The files: ``<replica>/seen/<room_id>.<minute>``, one line ``<time_ms> <msg_id>`` per accepted
message, by the minute of its ``Unibus-Time``. Each line is appended with one ``write`` in
``O_APPEND`` mode, so listeners in several processes may add to one file; nothing is ever
rewritten, and a file is removed whole once its minute is older than :data:`KEEP_MS` (no line
in it is still in any window). Room ids hold no dot, so a name parses back. The directory and
files are private (0700 and 0600, the owner's, no links), as the replica's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from .replica import ReplicaError, _check_private_dir, _make_private_dir, _open_private

log = logging.getLogger("unibus.client")

#: How long the ids stay on disk at least: the default window (``--max-age``, 300 s), or a
#: listener's own if longer. A listener whose window is longer than any run's before it may not
#: find the oldest ids (documented).
KEEP_MS = 300_000

_LINE = re.compile(rb"([0-9]{1,16}) ([A-Za-z0-9_-]{22})")
_MINUTE_MS = 60_000


class SeenIds:
    """The accepted msg ids of ``room_id`` in ``directory`` (a server's replica directory)."""

    def __init__(self, directory: str | os.PathLike[str], room_id: str) -> None:
        self.directory = Path(directory) / "seen"
        self.room_id = room_id

    def _path(self, minute: int) -> Path:
        return self.directory / f"{self.room_id}.{minute}"

    def load(self, now_ms: int, window_ms: int) -> list[tuple[int, str]]:
        """``(time_ms, msg_id)`` of every id accepted within ``window_ms`` of ``now_ms``; files too old
        to hold any are removed. :class:`ReplicaError` if the directory or a file is not private."""
        _make_private_dir(self.directory.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.directory, 0o700)
        _check_private_dir(self.directory)
        first, last = (now_ms - window_ms) // _MINUTE_MS, (now_ms + window_ms) // _MINUTE_MS
        oldest_kept = (now_ms - max(window_ms, KEEP_MS)) // _MINUTE_MS - 1
        found: list[tuple[int, str]] = []
        prefix = self.room_id + "."
        with os.scandir(self.directory) as entries:
            names = [e.name for e in entries if e.name.startswith(prefix)]
        for name in names:
            minute_text = name[len(prefix):]
            if not minute_text.isdigit():
                continue
            minute = int(minute_text)
            if minute < oldest_kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                continue
            if not first <= minute <= last:
                continue
            try:
                fd = _open_private(self.directory / name, os.O_RDONLY)
            except FileNotFoundError:
                continue
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            for line in data.split(b"\n"):
                m = _LINE.fullmatch(line)  # a line cut short by a crash is skipped
                if m is not None and abs(now_ms - int(m[1])) <= window_ms:
                    found.append((int(m[1]), m[2].decode("ascii")))
        return found

    def add(self, msg_id: str, time_ms: int) -> None:
        """Append one accepted id. A failure is logged, not raised: the message was accepted, and
        this run still remembers it."""
        try:
            fd = _open_private(self._path(time_ms // _MINUTE_MS), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, f"{time_ms} {msg_id}\n".encode("ascii"))
            finally:
                os.close(fd)
        except (OSError, ReplicaError) as exc:
            log.warning("could not keep the id of an accepted message of room %s in %s (a later run may accept "
                        "it again): %s", self.room_id, self.directory, exc)
