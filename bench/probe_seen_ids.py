"""Probe: what keeping accepted msg ids across runs costs a listener (docs/client.md, "Messages
accepted once").

Not part of ``make bench`` (it writes no section; it prints). A listener with a replica directory
appends each id it accepts to ``seen/`` (:meth:`unibus.client.seen.SeenIds.add`: one open,
write and close) and loads the ids of its window when it starts (:meth:`~SeenIds.load`). The
probe times, in the same run, the in-memory guard alone against the guard that also keeps its
ids on disk, per accepted message, then one ``load`` of ``--load`` ids, on a directory in
``--dir`` (the disk a user's home would be on); medians of ``--runs``.

    .venv/bin/python bench/probe_seen_ids.py --runs 5 --messages 20000 --load 100000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from unibus.client import seen as seen_mod
from unibus.client.seen import SeenIds
from unibus.client.signed import ReplayGuard

WINDOW_MS = 300_000


def per_message_us(directory: Path | None, room: str, messages: int) -> float:
    guard = ReplayGuard(WINDOW_MS, SeenIds(directory, room, WINDOW_MS) if directory is not None else None)
    now = int(time.time() * 1000)
    guard.start(now)
    t0 = time.perf_counter()
    for i in range(messages):
        guard.add(f"{i:022d}", now + i % 1000, now)
    return (time.perf_counter() - t0) / messages * 1e6


def load_seconds(directory: Path, room: str, ids: int) -> float:
    seen = SeenIds(directory, room, WINDOW_MS)
    now = int(time.time() * 1000)
    seen.load(now)
    saved, seen_mod.MAX_LINES_PER_MINUTE = seen_mod.MAX_LINES_PER_MINUTE, ids + 1  # all on disk
    try:
        for i in range(ids):
            seen.add(f"{i:022d}", now - (i % 240_000))
    finally:
        seen_mod.MAX_LINES_PER_MINUTE = saved
    t0 = time.perf_counter()
    found = SeenIds(directory, room, WINDOW_MS).load(now)
    assert len(found) == ids, len(found)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--load", type=int, default=100_000)
    parser.add_argument("--dir", default=None, help="where the directory goes (default: the temp dir)")
    args = parser.parse_args()
    memory, disk, loads = [], [], []
    for r in range(args.runs):  # the two kinds in turn, each on a fresh directory
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            memory.append(per_message_us(None, f"r{r}", args.messages))
            disk.append(per_message_us(Path(d) / "seen", f"r{r}", args.messages))
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            loads.append(load_seconds(Path(d) / "seen", f"l{r}", args.load))
    print(f"µs per accepted message, {args.runs} runs of {args.messages}: in memory "
          + " ".join(f"{x:.1f}" for x in memory) + f" (median {statistics.median(memory):.1f}); kept on disk "
          + " ".join(f"{x:.1f}" for x in disk) + f" (median {statistics.median(disk):.1f})")
    print(f"s to load {args.load} ids at a listener's start: " + " ".join(f"{x:.3f}" for x in loads)
          + f" (median {statistics.median(loads):.3f})")


if __name__ == "__main__":
    main()
