"""Probe: what sharing a node's turns for atomic batches between members buys and costs
(docs/store.md, "Batches in flight").

Not part of ``make bench`` (it writes no section; it prints). Every multi-key write takes one of
a node's 16 turns and gives it back when its batch is answered; :class:`unibus.store.turns.Turns`
hands a turn given back to the waiting writer that holds the fewest, and a member holds at most 8.

1. **What it buys** (``--seconds`` per case, a real nats-server and one ``KvStore``): member B
   writes two-key batches one after the other while other members keep ``N`` writes each in
   flight on the same store; B's latency and 503s, with the turns shared (as membershipd) and as
   one queue (every write the node's own, ``writer`` None: first come, first served, what the
   store had before), in the same run, cases alternating.
2. **What it costs**: one give-back and its hand-out with ``W`` writers waiting and all 16 turns
   held, against the same with an ``asyncio.Semaphore``, in the same run; medians of ``--runs``.
   Nothing else runs: the scheduler's own CPU per batch, to set against a batch's round trip.

    .venv/bin/python bench/probe_batch_turns.py --runs 5 --seconds 4
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import tempfile
import time
from pathlib import Path

import nats

from unibus.store.base import StoreUnavailable
from unibus.store.kv import KvStore
from unibus.store.kv_txn import _Write
from unibus.store.turns import Turns, writer
from unibus.testing import NatsServer

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


FLOODS = (("one member, 200 in flight", {"A": 200}), ("one member, 400 in flight", {"A": 400}),
          ("two members, 200 each", {"A": 200, "C": 200}), ("eight members, 200 each", {f"M{i}": 200 for i in range(8)}))


async def flooded(store: KvStore, floods: dict[str, int], shared: bool, seconds: float, tag: str) -> dict:
    """B's writes, one after the other, for ``seconds`` while ``floods`` keep writes in flight."""
    stop = False
    counter = iter(range(10**9))

    async def flood(who: str) -> None:
        writer.set(who if shared else None)
        while not stop:
            i = next(counter)
            try:
                await store._commit([_Write(f"room.{tag}{who}.{i}", {"i": i}, 0),
                                     _Write(f"room.{tag}{who}.{i}x", {"i": i}, 0)])
            except StoreUnavailable:
                pass  # a flooder's own writes wait past the timeout: its own queue

    tasks = [asyncio.create_task(flood(who)) for who, n in floods.items() for _ in range(n)]
    await asyncio.sleep(0.5)  # the floods are in flight
    writer.set("B" if shared else None)
    took, failed = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        i = next(counter)
        t0 = time.monotonic()
        try:
            await store._commit([_Write(f"room.{tag}B.{i}", {"i": i}, 0), _Write(f"room.{tag}B.{i}x", {"i": i}, 0)])
            took.append((time.monotonic() - t0) * 1000)
        except StoreUnavailable:
            failed += 1
    writer.set(None)
    stop = True
    await asyncio.gather(*tasks)
    took.sort()
    return {"ok": len(took), "503": failed, "p50": statistics.median(took) if took else float("nan"),
            "max": took[-1] if took else float("nan")}


async def latency(seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="turns") as d:
        server = await asyncio.to_thread(NatsServer, Path(d) / "nats")
        try:
            nc = await nats.connect(servers=[server.url])
            store = KvStore(nc.jetstream(timeout=2.0))
            await store.ensure()
            try:
                print("flood | B, turns shared: writes, 503, p50 ms, max ms | B, one queue: writes, 503, p50 ms, max ms")
                for n, (name, floods) in enumerate(FLOODS):
                    got = {}
                    for shared in ((True, False) if n % 2 == 0 else (False, True)):
                        got[shared] = await flooded(store, floods, shared, seconds, f"c{n}{int(shared)}.")
                    a, b = got[True], got[False]
                    print(f"{name} | {a['ok']}, {a['503']}, {a['p50']:.0f}, {a['max']:.0f} "
                          f"| {b['ok']}, {b['503']}, {b['p50']:.0f}, {b['max']:.0f}")
            finally:
                await store.close()
                await nc.close()
        finally:
            await asyncio.to_thread(server.stop)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5000, help="give-backs per run")
    parser.add_argument("--seconds", type=float, default=4.0, help="of B's writes per flood case")
    args = parser.parse_args()
    await latency(args.seconds)
    print()
    print("writers waiting | Turns µs per give-back | Semaphore µs per release | ratio")
    for waiting in (1, 48, 384, 1000):
        fair = [await turns_us(waiting, args.rounds) for _ in range(args.runs)]
        fifo = [await semaphore_us(waiting, args.rounds) for _ in range(args.runs)]
        f, s = statistics.median(fair), statistics.median(fifo)
        print(f"{waiting:15d} | {f:22.2f} | {s:24.2f} | ×{f / s:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
