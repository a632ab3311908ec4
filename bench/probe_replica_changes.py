"""Probe: what the client's memory of changes costs a membership change (docs/client.md,
"Changes confirmed in the log").

Not part of ``make bench`` (it writes no section; it prints). Every membership change the SDK
or the CLI makes is written into the replica's ``state.json`` before it is sent
(:meth:`unibus.client.replica.Replica.begin_change`) and again once it is confirmed
(:meth:`~unibus.client.replica.Replica.settle_change`): two atomic, fsynced replacements of the
file under the replica's lock. The probe times those two calls alone, on a replica directory in
``--dir`` (the disk a user's home would be on), ``--changes`` per run, and prints the ms per
change of each run and their median; the rest of a change (two syncs, the request) is network
and server time it does not count.

    .venv/bin/python bench/probe_replica_changes.py --runs 5 --changes 200
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from unibus.client.replica import Replica


async def run(directory: str, runs: int, changes: int) -> list[float]:
    replica = Replica("http://127.0.0.1:1", directory)
    async with replica.locked():
        replica._write_state()  # a state.json to replace, as every used replica has
    per_change = []
    for r in range(runs):
        t0 = time.perf_counter()
        for i in range(changes):
            nonce = f"probe-{r:04d}-{i:08d}"
            await replica.begin_change("alice", nonce, int(time.time()), sent_after=0)
            await replica.settle_change("alice", nonce)
        per_change.append((time.perf_counter() - t0) / changes * 1000)
    return per_change


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--dir", default=None, help="where the replica directory goes (default: the temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        per_change = asyncio.run(run(d, args.runs, args.changes))
    print(f"ms per change (begin_change + settle_change), {args.runs} runs of {args.changes}: "
          + " ".join(f"{x:.2f}" for x in per_change) + f"; median {statistics.median(per_change):.2f}")


if __name__ == "__main__":
    main()
