"""strace attached to running processes, and the order of their system calls.

For the tests that prove an fsync ends before an acknowledgement leaves
(docs/operations.md, "Durability"). ``Tracer`` attaches ``strace -f`` to live
pids (every thread), lets the test do one thing, detaches (the processes go on)
and parses the traces into :class:`Call` records with start and end times on
the same clock. Requires strace and ptrace rights (root, or ptrace_scope 0).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

STRACE = shutil.which("strace")
#: The calls that make written data durable. Not ``sync_file_range``: membershipd calls it
#: (``SYNC_FILE_RANGE_WRITE``) only to start a blob's writeback early, which waits for nothing.
SYNCS = ("fsync", "fdatasync")
WRITES = ("write", "pwrite64", "writev", "pwritev", "pwritev2")
SENDS = ("sendto", "sendmsg", "write", "writev")
RENAMES = ("rename", "renameat", "renameat2")
#: The calls traced: the fsync family, writes and socket sends (with -yy every fd
#: shows its path or socket), and renames.
TRACE_SET = ",".join(sorted({*SYNCS, "sync_file_range", *WRITES, *SENDS, *RENAMES}))
OPTIONS = ["-f", "-ttt", "-T", "-yy", "-s", "16384", "-e", f"trace={TRACE_SET}"]

_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<ts>\d+\.\d+)\s+(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)$")
_FD = re.compile(r"^(?P<fd>\d+)<(?P<path>(?:[^<>]|<[^<>]*>)*)>")
_RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>(?P<args>.*)$")
_DURATION = re.compile(r"<(\d+\.\d+)>\s*$")


@dataclass
class Call:
    pid: int
    name: str
    path: str  # the first argument's fd path (-yy), "" when it is not an fd
    args: str  # everything after the call's name, as strace printed it
    start: float
    end: float


def parse(text: str) -> list[Call]:
    """Every completed call of an ``strace -f -ttt -T -yy`` trace, in start order."""
    calls: list[Call] = []
    pending: dict[int, Call] = {}
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        pid, ts, rest = int(m["pid"]), float(m["ts"]), m["rest"]
        resumed = _RESUMED.match(rest)
        if resumed:
            call = pending.pop(pid, None)
            if call is not None and call.name == resumed["name"]:
                call.args += resumed["args"]
                call.end = ts + _duration(rest)
                calls.append(call)
            continue
        c = _CALL.match(rest)
        if not c:
            continue
        fd = _FD.match(c["args"])
        call = Call(pid, c["name"], fd["path"] if fd else "", c["args"], ts, ts)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = call
            continue
        call.end = ts + _duration(rest)
        calls.append(call)
    calls.sort(key=lambda c: c.start)
    return calls


def _duration(rest: str) -> float:
    m = _DURATION.search(rest)
    return float(m.group(1)) if m else 0.0


def first(calls: list[Call], pred, after: float | None = None) -> Call | None:
    for c in calls:
        if (after is None or c.start >= after) and pred(c):
            return c
    return None


def synced_after(calls: list[Call], write: Call) -> Call | None:
    """The first fsync-family call on ``write``'s file that started after it."""
    return first(calls, lambda c: c.name in SYNCS and c.path == write.path, after=write.start)


class Tracer:
    """``with Tracer(pids, directory) as t: ...`` then ``t.calls(pid)``."""

    def __init__(self, pids: list[int], directory: Path, *, options: list[str] | None = None) -> None:
        if STRACE is None:
            raise RuntimeError("strace is not installed")
        self.pids = pids
        self.directory = directory
        self.options = options or OPTIONS
        self.procs: list[tuple[int, subprocess.Popen[bytes], Path, Path]] = []

    def command(self, pid: int, out: Path) -> list[str]:
        return [STRACE, *self.options, "-o", str(out), "-p", str(pid)]

    def __enter__(self) -> Tracer:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for pid in self.pids:
                out, err = self.directory / f"{pid}.strace", self.directory / f"{pid}.stderr"
                with open(err, "wb") as e:
                    proc = subprocess.Popen(self.command(pid, out), stdout=subprocess.DEVNULL, stderr=e)
                self.procs.append((pid, proc, out, err))
            for pid, proc, _out, err in self.procs:
                deadline = time.monotonic() + 15
                while b"attached" not in err.read_bytes():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"strace could not attach to {pid}: {err.read_text(errors='replace')}")
                    time.sleep(0.02)
            time.sleep(0.2)  # every thread attached ("attached with N threads" comes first)
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # let the last calls be written
        self._detach()

    def _detach(self) -> None:
        for _pid, proc, _out, _err in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # strace detaches; the traced process goes on
        for _pid, proc, _out, _err in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def calls(self, pid: int) -> list[Call]:
        for p, _proc, out, _err in self.procs:
            if p == pid:
                return parse(out.read_text(errors="replace")) if out.exists() else []
        raise KeyError(pid)


def can_trace() -> str | None:
    """None when strace can attach here, else why not (for a skip reason)."""
    if STRACE is None:
        return "strace is not installed (.ci/run installs it)"
    probe = subprocess.Popen(["sleep", "1"])
    try:
        r = subprocess.run([STRACE, "-e", "trace=none", "-p", str(probe.pid)], capture_output=True, timeout=15)
    finally:
        probe.kill()
        probe.wait()
    return None if b"attached" in r.stderr else (r.stderr.decode(errors="replace")[-300:] or "strace cannot attach")
