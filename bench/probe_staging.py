"""Probe: the filesystem backend's staging file, its two lanes against one (docs/benchmarks.md, "Blobs").

Not part of ``make bench`` (it writes no section; it prints). An upload's
chunks are handed to :class:`unibus.plugins.blobstore.backend.StagedFile` 4 MiB
at a time, as the HTTP handler does, and finished (fdatasync). ``lanes``
is the class as it is: each chunk hashed in one worker thread and written in
another, at the same time. ``one lane`` is the same class with both done in
one worker thread, one after the other (what the backend did before).
``direct I/O`` is the class writing with ``O_DIRECT`` through one aligned
buffer (one copy in this process, none into the page cache), the lead for
membershipd's CPU on a put that issue 16's work left untried. The kinds
alternate, ``--runs`` times each; the probe prints MB/s (median, worst–best),
this process's CPU seconds per upload and the whole machine's CPU time per MB
(``/proc/stat``: the kernel's writeback threads too), both medians.

    .venv/bin/python bench/probe_staging.py --runs 9 --mib 256
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
PART = 1 * MIB  # what the handler receives per read, about; four of them per hand-over
HAND_OVER = 4


def one_lane() -> type:
    from unibus.plugins.blobstore.backend import StagedFile

    class OneLane(StagedFile):
        """Hash, then write, in one worker thread: the sum of the two per chunk."""

        def _start(self, parts: list[Any]) -> list[asyncio.Future[Any]]:
            def both(parts: list[Any]) -> None:
                self._hash_sync(parts)
                self._write_sync(parts)

            return [self._submit(both, parts)]

    return OneLane


def direct_io() -> type:
    import mmap

    from unibus.plugins.blobstore.backend import StagedFile

    class DirectIO(StagedFile):
        """Each hand-over copied into one page-aligned buffer and written with ``O_DIRECT``."""

        def __init__(self, tmp: Path) -> None:
            super().__init__(tmp)
            assert self._fd is not None
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            self._buffer = mmap.mmap(-1, HAND_OVER * PART)  # page-aligned, as O_DIRECT needs

        def _write_sync(self, parts: Any) -> None:
            view, n = memoryview(self._buffer), 0
            for p in parts:
                view[n:n + len(p)] = p
                n += len(p)
            written = 0
            while written < n:  # every hand-over is a whole number of pages here
                written += os.write(self._fd, view[written:n])
            self._written += n

    return DirectIO


def machine_cpu() -> float:
    """Seconds of CPU the whole machine spent so far, every core, idle and I/O wait left out."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


async def upload(cls: type, root: Path, size: int, parts: list[bytes]) -> tuple[float, float, float]:
    staged = cls(root)
    try:
        t0, c0, m0 = time.perf_counter(), time.process_time(), machine_cpu()
        done = i = 0
        while done < size:
            await staged.write(tuple(parts[(i + k) % len(parts)] for k in range(HAND_OVER)))
            done += HAND_OVER * PART
            i += 1
        await staged.finish()
        return (size / (time.perf_counter() - t0) / 1e6, time.process_time() - c0,
                (machine_cpu() - m0) * 1e3 / (size / 1e6))
    finally:
        await staged.discard()


async def main(runs: int, mib: int, scratch: Path | None) -> None:
    from unibus.plugins.blobstore.backend import StagedFile

    size = -(-mib * MIB // (HAND_OVER * PART)) * HAND_OVER * PART
    parts = [os.urandom(PART) for _ in range(2 * HAND_OVER)]
    kinds = {"lanes (this tree)": StagedFile, "one lane": one_lane(), "direct I/O": direct_io()}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="unibus-probe-staging-", dir=scratch) as tmp:
        for r in range(runs):
            order = list(kinds)[r % len(kinds):] + list(kinds)[:r % len(kinds)]
            for name in order:
                results[name].append(await upload(kinds[name], Path(tmp), size, parts))
                print(f"run {r + 1}/{runs} {name}: {results[name][-1][0]:,.0f} MB/s", file=sys.stderr)
    print(f"{size // MIB} MiB staged in 4 MiB hand-overs, {runs} runs each, alternating; "
          f"1-minute load average {os.getloadavg()[0]:.1f} at the end")
    for name, res in results.items():
        rates = [x[0] for x in res]
        print(f"{name}: {statistics.median(rates):,.0f} MB/s ({min(rates):,.0f}–{max(rates):,.0f}), "
              f"CPU {statistics.median(x[1] for x in res):.3f} s per upload, the machine's "
              f"{statistics.median(x[2] for x in res):.2f} ms per MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="uploads of each kind (default 9)")
    parser.add_argument("--mib", type=int, default=256, help="upload size, MiB (default 256)")
    parser.add_argument("--scratch", type=Path, default=None, help="directory for the files (default: a temp dir)")
    ns = parser.parse_args()
    if ns.runs < 1 or ns.mib < 1:
        parser.error("--runs and --mib must be positive")
    asyncio.run(main(ns.runs, ns.mib, ns.scratch))
