"""Probe: the filesystem backend's staging file, its two lanes against one (docs/benchmarks.md, "Blobs").

Not part of ``make bench`` (it writes no section; it prints). An upload's
chunks are handed to :class:`unibus.plugins.blobstore.backend.StagedFile` 4 MiB
at a time, as the HTTP handler does, and finished (fdatasync). ``lanes``
is the class as it is: each chunk hashed in one worker thread and written in
another, at the same time. ``one lane`` is the same class with both done in
one worker thread, one after the other (what the backend did before). The two
alternate, ``--runs`` times each; the probe prints MB/s (median, worst–best)
and this process's CPU seconds per upload (median).

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


async def upload(cls: type, root: Path, size: int, parts: list[bytes]) -> tuple[float, float]:
    staged = cls(root)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        done = i = 0
        while done < size:
            await staged.write(tuple(parts[(i + k) % len(parts)] for k in range(HAND_OVER)))
            done += HAND_OVER * PART
            i += 1
        await staged.finish()
        return size / (time.perf_counter() - t0) / 1e6, time.process_time() - c0
    finally:
        await staged.discard()


async def main(runs: int, mib: int, scratch: Path | None) -> None:
    from unibus.plugins.blobstore.backend import StagedFile

    size = -(-mib * MIB // (HAND_OVER * PART)) * HAND_OVER * PART
    parts = [os.urandom(PART) for _ in range(2 * HAND_OVER)]
    kinds = {"lanes (this tree)": StagedFile, "one lane": one_lane()}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="unibus-probe-staging-", dir=scratch) as tmp:
        for r in range(runs):
            order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
            for name in order:
                results[name].append(await upload(kinds[name], Path(tmp), size, parts))
                print(f"run {r + 1}/{runs} {name}: {results[name][-1][0]:,.0f} MB/s", file=sys.stderr)
    print(f"{size // MIB} MiB staged in 4 MiB hand-overs, {runs} runs each, alternating; "
          f"1-minute load average {os.getloadavg()[0]:.1f} at the end")
    for name, res in results.items():
        rates = [x[0] for x in res]
        print(f"{name}: {statistics.median(rates):,.0f} MB/s ({min(rates):,.0f}–{max(rates):,.0f}), "
              f"CPU {statistics.median(x[1] for x in res):.3f} s per upload")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="uploads of each kind (default 9)")
    parser.add_argument("--mib", type=int, default=256, help="upload size, MiB (default 256)")
    parser.add_argument("--scratch", type=Path, default=None, help="directory for the files (default: a temp dir)")
    ns = parser.parse_args()
    if ns.runs < 1 or ns.mib < 1:
        parser.error("--runs and --mib must be positive")
    asyncio.run(main(ns.runs, ns.mib, ns.scratch))
