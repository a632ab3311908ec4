"""A node's turns for atomic batches, shared between the members writing (unibus.store.turns)."""

from __future__ import annotations

import asyncio
import random

import pytest

from unibus.store.turns import Turns, writer


async def _queued(turns: Turns, who: str | None, n: int) -> list[asyncio.Task[None]]:
    """``n`` takes of ``who`` that wait for a turn (each started, and in line, when this returns)."""
    tasks = [asyncio.create_task(turns.take(who, 5.0)) for _ in range(n)]
    await asyncio.sleep(0)
    return tasks


async def test_a_member_holds_at_most_half_of_the_turns_and_the_rest_go_to_the_others() -> None:
    turns = Turns(16)
    flood = await _queued(turns, "dave", 200)
    assert (turns.held("dave"), turns.waiting("dave"), turns.free) == (8, 192, 8)
    for _ in range(8):  # another member's writes go at once, while dave's 192 wait
        await turns.take("erin", 0.0)
    assert (turns.held("erin"), turns.free) == (8, 0)
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    assert (turns.held("dave"), turns.waiting("dave")) == (8, 0)


async def test_a_turn_given_back_goes_to_the_writer_holding_the_fewest() -> None:
    turns = Turns(4, per_writer=4)
    for _ in range(4):
        await turns.take("dave", 1.0)
    flood = await _queued(turns, "dave", 50)  # dave queued first, and holds every turn
    erin = asyncio.create_task(turns.take("erin", 5.0))
    await asyncio.sleep(0)
    turns.give_back("dave")
    await erin  # the first turn back is erin's, not the next of dave's 50
    assert (turns.held("erin"), turns.held("dave"), turns.waiting("dave")) == (1, 3, 50)
    turns.give_back("dave")  # erin waits for nothing: dave's own line goes on
    assert (turns.held("dave"), turns.waiting("dave")) == (3, 49)
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)


async def test_writers_holding_as_many_are_served_in_the_order_they_came() -> None:
    turns = Turns(1)
    await turns.take(None, 1.0)
    order = []

    async def take(who: str) -> None:
        await turns.take(who, 5.0)
        order.append(who)
        turns.give_back(who)

    tasks = [asyncio.create_task(take(who)) for who in ("carol", "bob", "alice")]
    await asyncio.sleep(0)
    turns.give_back(None)
    await asyncio.gather(*tasks)
    assert order == ["carol", "bob", "alice"]
    assert turns.free == 1


async def test_the_nodes_own_writes_have_no_bound_of_their_own() -> None:
    turns = Turns(16)
    for _ in range(16):
        await turns.take(None, 0.0)
    assert (turns.held(None), turns.free) == (16, 0)
    with pytest.raises(TimeoutError):
        await turns.take("dave", 0.05)
    assert turns.waiting("dave") == 0  # a take that timed out left no trace


async def test_a_take_that_ends_as_its_turn_comes_gives_it_back() -> None:
    """A turn handed to a take whose wait ends in the same turn of the event loop (its timeout, a
    cancellation) is not lost: the take gives it back, and the next in line gets it."""
    turns = Turns(1)
    await turns.take("a", 1.0)
    late = asyncio.create_task(turns.take("b", 5.0))
    nxt = asyncio.create_task(turns.take("c", 5.0))
    await asyncio.sleep(0)
    turns.give_back("a")  # b's turn: handed to it, and b is cancelled before it runs
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    await nxt
    assert (turns.held("b"), turns.held("c"), turns.free) == (0, 1, 0)


async def test_a_writer_at_its_bound_keeps_no_turn_from_others_when_its_wait_ends() -> None:
    turns = Turns(4)  # two each
    for _ in range(2):
        await turns.take("dave", 1.0)
    queued = await _queued(turns, "dave", 3)
    assert (turns.free, turns.waiting("dave")) == (2, 3)
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    assert (turns.free, turns.waiting("dave")) == (2, 0)
    await turns.take("erin", 0.0)
    await turns.take("erin", 0.0)
    assert turns.free == 0


async def test_giving_back_a_turn_not_held_is_an_error() -> None:
    turns = Turns(2)
    with pytest.raises(RuntimeError, match="does not hold"):
        turns.give_back("dave")
    with pytest.raises(ValueError):
        Turns(0)


async def test_the_writer_is_the_contexts_and_tasks_inherit_it() -> None:
    async def seen() -> str | None:
        await asyncio.sleep(0)
        return writer.get()

    assert writer.get() is None
    token = writer.set("dave")
    try:
        assert await asyncio.create_task(seen()) == "dave"
    finally:
        writer.reset(token)
    assert writer.get() is None


@pytest.mark.parametrize("seed", range(3))
async def test_takes_timeouts_and_cancellations_at_random_keep_every_turn_and_the_order(seed: int) -> None:
    """A review's fuzz, kept: takes with random timeouts and cancellations (some in the same turn of
    the loop as a hand-out), turns held for a while and given back at once or later. At every step
    the 16 turns are all accounted for, no member holds more than 8, a free turn never waits beside
    a writer that may take it; each hand-out goes where a scan of every writer says (fewest held,
    then longest waiting), and in the end every turn is back."""
    rnd = random.Random(seed)
    turns = Turns(16)
    writers = [None, *"abcdefgh"]
    broken: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    hand_out = turns._hand_out

    def checked_hand_out() -> None:
        while turns.free:
            eligible = [(turns.held(w), q[0][0], w) for w, q in turns._waiting.items()
                        if w is None or turns.held(w) < turns.per_writer]
            if not eligible:
                break
            want = min(eligible, key=lambda e: e[:2])[2]
            waiting = turns.waiting(want)
            free, turns.free = turns.free, 1
            hand_out()
            turns.free += free - 1
            if turns.waiting(want) != waiting - 1:
                broken.append(f"a turn did not go to {want!r}")
                break
        hand_out()

    def check(where: str) -> None:
        if turns.free + sum(turns.held(w) for w in writers) != 16:
            broken.append(f"{where}: turns lost or made")
        if any(turns.held(w) > 8 for w in writers if w is not None):
            broken.append(f"{where}: a member over its bound")
        if turns.free and any(turns.waiting(w) and (w is None or turns.held(w) < 8) for w in writers):
            broken.append(f"{where}: a free turn beside a writer that may take it")

    turns._hand_out = checked_hand_out  # type: ignore[method-assign]

    async def user(who: str | None) -> None:
        try:
            await turns.take(who, rnd.choice([None, 0, 0.0005, 0.002, 0.01]))
        except (TimeoutError, asyncio.CancelledError):
            return
        try:
            for _ in range(rnd.randrange(4)):
                await asyncio.sleep(0 if rnd.random() < 0.7 else 0.001)
        finally:
            if rnd.random() < 0.2:
                asyncio.get_running_loop().call_later(rnd.choice([0, 0.001, 0.01]), turns.give_back, who)
            else:
                turns.give_back(who)
                if rnd.random() < 0.5:
                    rnd.choice(tasks).cancel()  # in the same turn of the loop as the hand-out
            check("after a give-back")

    for _ in range(2000):
        tasks.append(asyncio.create_task(user(rnd.choice(writers))))
        if rnd.random() < 0.3:
            await asyncio.sleep(0)
            check("between takes")
        if rnd.random() < 0.05:
            rnd.choice(tasks).cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.05)  # the later give-backs
    assert broken == []
    assert (turns.free, [w for w in writers if turns.held(w) or turns.waiting(w)]) == (16, [])
