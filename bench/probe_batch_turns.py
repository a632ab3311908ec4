"""Probe: what sharing a node's turns for atomic batches between members costs (docs/store.md,
"Batches in flight").

Not part of ``make bench`` (it writes no section; it prints). Every multi-key write takes one of
a node's 16 turns and gives it back when its batch is answered; :class:`unibus.store.turns.Turns`
hands a turn given back to the waiting writer that holds the fewest. The probe times one give-back
and its hand-out with ``W`` writers waiting and all 16 turns held, against the same with an
``asyncio.Semaphore`` (one queue, what the store had before), in the same run; medians of
``--runs``. Nothing else runs: the figures are the scheduler's own CPU per batch, to set against a
batch's round trip to nats-server (milliseconds).

    .venv/bin/python bench/probe_batch_turns.py --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import time

from unibus.store.turns import Turns

CAPACITY = 16


async def _until(served: list) -> None:
    """Until a take has returned (its task's callbacks run a few turns of the loop later)."""
    for _ in range(100):
        if served:
            return
        await asyncio.sleep(0)
    raise RuntimeError("no take returned: the probe is wrong")


async def turns_us(waiting: int, rounds: int) -> float:
    """µs per give-back with ``waiting`` writers in line, each with enough takes to last the run."""
    turns = Turns(CAPACITY)
    for _ in range(CAPACITY):
        await turns.take(None, 0)
    holders: collections.deque[str | None] = collections.deque([None] * CAPACITY)
    served: list[str | None] = []
    takes = []
    for i in range(waiting):
        who = f"m{i}"
        for _ in range(rounds // waiting + 2):
            task = asyncio.ensure_future(turns.take(who, None))
            task.add_done_callback(lambda _t, who=who: served.append(who))
            takes.append(task)
    await asyncio.sleep(0)  # every take is in line
    t0 = time.perf_counter()
    for _ in range(rounds):
        turns.give_back(holders.popleft())
        if turns.free:  # a lone writer at its bound: the node takes the turn, to keep all 16 held
            await turns.take(None, 0)
            holders.append(None)
            continue
        await _until(served)  # the writer served runs (it would send its batch)
        holders.append(served.pop())
    elapsed = time.perf_counter() - t0
    for task in takes:
        task.cancel()
    await asyncio.gather(*takes, return_exceptions=True)
    return elapsed / rounds * 1e6


async def semaphore_us(waiting: int, rounds: int) -> float:
    sem = asyncio.Semaphore(CAPACITY)
    for _ in range(CAPACITY):
        await sem.acquire()
    served: list[None] = []
    takes = []
    for _ in range(rounds + waiting):
        task = asyncio.ensure_future(sem.acquire())
        task.add_done_callback(lambda _t: served.append(None))
        takes.append(task)
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    for _ in range(rounds):
        sem.release()
        await _until(served)
        served.pop()
    elapsed = time.perf_counter() - t0
    for task in takes:
        task.cancel()
    await asyncio.gather(*takes, return_exceptions=True)
    return elapsed / rounds * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5000, help="give-backs per run")
    args = parser.parse_args()
    print("writers waiting | Turns µs per give-back | Semaphore µs per release | ratio")
    for waiting in (1, 48, 384, 1000):
        fair = [await turns_us(waiting, args.rounds) for _ in range(args.runs)]
        fifo = [await semaphore_us(waiting, args.rounds) for _ in range(args.runs)]
        f, s = statistics.median(fair), statistics.median(fifo)
        print(f"{waiting:15d} | {f:22.2f} | {s:24.2f} | ×{f / s:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
