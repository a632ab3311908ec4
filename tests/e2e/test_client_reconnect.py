"""The SDK's Bus across kicks: membershipd kicks every connection of a member whose rights change.

One real membershipd (``--bus-auth enforce``: the auth callout, real
nats-server, real SQLite) for the module, real nats-py clients through
:class:`unibus.client.Bus`. A kicked Bus reconnects with its key, its
listeners' subscriptions are made again, and nothing published after it was
re-authorized is lost or delivered twice; a room the member lost ends that
listener only; a member the bus keeps refusing (deleted, another key) stops
with a BusError that says why, after a bounded number of attempts
(docs/client.md, "Reconnects").
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from unibus.client import ApiError, BusError, NotARoomMember, UnibusClient
from unibus.client.api import AUTH_FAILURES_LIMIT
from unibus.client.keys import generate_identity, save_identity, with_bus_key
from unibus.testing import MembershipdProcess, bootstrap_member, freeze, member_connections

WAIT = 20.0  # upper bound for "eventually" (never a timing assertion: latency lives in bench/)


class World:
    def __init__(self, daemon: MembershipdProcess, people: dict[str, Any]) -> None:
        self.daemon = daemon
        self.people = people

    def sdk(self, handle: str) -> UnibusClient:
        return UnibusClient(self.daemon.base_url, self.people[handle], notice=lambda _text: None)

    async def add(self, handle: str) -> None:
        person = self.people[handle] = generate_identity(handle)
        r = person.public_record()
        async with self.sdk("alice") as a:
            await a.add_member(handle, r["sign_pub"], r["enc_pub"], r["enc_suite"], bus_pub=r["bus_pub"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    people = {"alice": generate_identity("alice"), "bob": generate_identity("bob")}
    data_dir = tmp_path_factory.mktemp("reconnect") / "daemon"
    bootstrap_member(data_dir, people["alice"], "admin")
    daemon = MembershipdProcess(data_dir, ["--bus-auth", "enforce"]).start()
    w = World(daemon, people)

    async def members() -> None:
        async with w.sdk("alice") as a:
            r = people["bob"].public_record()
            await a.add_member("bob", r["sign_pub"], r["enc_pub"], r["enc_suite"], bus_pub=r["bus_pub"])

    try:
        asyncio.run(members())
        yield w
    finally:
        daemon.stop()


async def new_room(world: World, *handles: str) -> str:
    async with world.sdk("alice") as a:
        rid = (await a.create_room("r"))["room_id"]
        for h in handles:
            await a.add_room_member(rid, h)
        await a.rekey(rid)
    return rid


async def next_message(messages: Any, timeout: float = WAIT) -> Any:
    return await asyncio.wait_for(messages.__anext__(), timeout)


async def test_a_listener_keeps_receiving_after_a_grant_kicks_it(world):
    """Added to room B, bob is kicked; his listener on room A comes back by itself, and every
    message published after his Bus was re-authorized arrives exactly once, in order."""
    room_a = await new_room(world, "bob")
    room_b = await new_room(world)
    async with world.sdk("bob") as b, b.bus() as bob_bus, bob_bus.listen(room_a) as messages, \
            world.sdk("alice") as a, a.bus() as alice_bus:
        await alice_bus.send(room_a, "t", b"before")
        assert (await next_message(messages)).text == "before"
        before = await member_connections(world.daemon, "bob")
        assert len(before) == 1

        # alice keeps publishing while bob is added to room B (kicked before the 200) and comes back
        sent: list[tuple[str, float]] = []
        stop = asyncio.Event()

        async def publisher() -> None:
            i = 0
            while not stop.is_set() and i < 2000:
                started = time.monotonic()
                await alice_bus.send(room_a, "t", f"m{i}".encode())
                sent.append((f"m{i}", started))
                i += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(publisher())
        try:
            await asyncio.sleep(0.1)
            await a.add_room_member(room_b, "bob")
            # the 200 is here: nats-server no longer holds bob's old connection
            assert not before & await member_connections(world.daemon, "bob")
            await bob_bus.wait_reconnected(1, timeout=WAIT)
            reauthorized = time.monotonic()
            deadline = reauthorized + WAIT
            while sum(1 for _, t in sent if t >= reauthorized) < 20:
                assert not task.done() and time.monotonic() < deadline
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)
        await alice_bus.send(room_a, "t", b"end")

        got: list[str] = []
        while True:
            m = await next_message(messages)
            assert m.ok, (m.reason, m.error)  # a duplicate would be a rejected "replay"
            if m.text == "end":
                break
            got.append(m.text)
        assert len(got) == len(set(got))  # nothing twice
        order = [name for name, _ in sent]
        assert got == sorted(got, key=order.index)  # in order
        after = [name for name, t in sent if t >= reauthorized]
        assert len(after) >= 20 and set(after) <= set(got)  # nothing published after re-authorization lost
        assert messages.rejected == Counter()
        assert bob_bus.reconnects == 1

        # the same Bus has the new room now
        async with bob_bus.listen(room_b) as in_b:
            await alice_bus.send(room_b, "t", b"in b")
            assert (await next_message(in_b)).text == "in b"


async def test_a_room_lost_ends_its_listener_and_the_others_go_on(world):
    room_a = await new_room(world, "bob")
    room_b = await new_room(world, "bob")
    async with world.sdk("bob") as b, b.bus() as bob_bus, bob_bus.listen(room_a) as in_a, \
            bob_bus.listen(room_b) as in_b, world.sdk("alice") as a, a.bus() as alice_bus:
        await alice_bus.send(room_b, "t", b"b1")
        assert (await next_message(in_b)).text == "b1"
        await a.remove_room_member(room_b, "bob")
        with pytest.raises(BusError, match=f"access to room {room_b} was revoked"):
            await next_message(in_b)
        # room A goes on: a message published once the bus is back arrives (a revocation's
        # background sweep may kick bob once more, so publish until one gets through)
        await bob_bus.wait_reconnected(1, timeout=WAIT)
        deadline = time.monotonic() + WAIT
        for i in range(1000):
            await alice_bus.send(room_a, "t", f"a{i}".encode())
            try:
                m = await next_message(in_a, 0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "room A's listener got nothing after the removal from room B"
        assert m.ok and m.text.startswith("a") and m.sender == "alice"
        assert in_a.rejected == Counter()
        # and bob can no longer publish in room B
        with pytest.raises((ApiError, NotARoomMember, BusError)):
            await bob_bus.send(room_b, "t", b"no")


async def test_a_deleted_members_bus_stops_after_repeated_authorization_violations(world):
    await world.add("dave")
    room = await new_room(world, "dave")
    async with world.sdk("dave") as d, d.bus() as bus, bus.listen(room) as messages, world.sdk("alice") as a:
        raw = bus.nc
        await a.remove_member("dave")
        with pytest.raises(BusError) as stopped:
            await next_message(messages, WAIT)
        text = str(stopped.value)
        assert f"refused dave {AUTH_FAILURES_LIMIT} times in a row (authorization violation)" in text
        assert "deleted" in text
        # No endless reconnect loop: closed for good, soon. Not at once: the listener ends with the
        # reason as the stop begins, and nats-py's reconnect loop can mark the connection
        # "reconnecting" again while it is closed (unibus.aio.close_nats closes until it stays
        # closed): a CI run saw it not closed yet when the error came.
        deadline = time.monotonic() + 10
        while not raw.is_closed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert raw.is_closed
        with pytest.raises(BusError, match="authorization violation"):
            await bus.send(room, "t", b"x")
        with pytest.raises(BusError, match="authorization violation"):
            await bus.listen(room).start()
        assert bus.reconnects == 0
    assert await member_connections(world.daemon, "dave") == set()


async def test_a_bus_key_rotated_by_the_same_client_is_used_to_reconnect(world):
    await world.add("erin")
    room = await new_room(world, "erin")
    old = world.people["erin"]
    async with world.sdk("erin") as e, e.bus() as bus, bus.listen(room) as messages, \
            world.sdk("alice") as a, a.bus() as alice_bus:
        new = await e.rotate_bus_key()
        assert new.bus_pub != old.bus_pub and e.identity is new
        assert new.sign_pub == old.sign_pub and new.enc_pub == old.enc_pub
        assert (await e.me())["bus_pub"] == new.bus_pub
        await bus.wait_reconnected(1, timeout=WAIT)
        await alice_bus.send(room, "t", b"after the rotation")
        m = await next_message(messages)
        assert m.ok and m.text == "after the rotation"
        assert len(await member_connections(world.daemon, "erin")) == 1
        # the same through set_bus_key with the client's own (new) identity
        e.identity = newer = with_bus_key(new)
        assert (await e.set_bus_key())["bus_pub"] == newer.bus_pub
        await bus.wait_reconnected(2, timeout=WAIT)
        await alice_bus.send(room, "t", b"after the second rotation")
        m = await next_message(messages)
        assert m.ok and m.text == "after the second rotation"
        assert messages.rejected == Counter()


async def test_a_bus_key_rotated_elsewhere_stops_the_bus_naming_what_to_do(world):
    await world.add("fay")
    room = await new_room(world, "fay")
    async with world.sdk("fay") as f, f.bus() as bus, bus.listen(room) as messages:
        other = with_bus_key(world.people["fay"])  # a key this SDK does not hold
        await f.set_bus_key(other.bus_pub)
        with pytest.raises(BusError) as stopped:
            await next_message(messages, WAIT)
        text = str(stopped.value)
        assert "authorization violation" in text and other.bus_pub in text
        assert "unibus keygen --upgrade --server" in text


@pytest.mark.parametrize("between", ["deleted", "rotated", "hung"])
async def test_a_first_connection_still_refused_asks_the_control_plane_why(world, between):
    """The first connection of a Bus is refused for longer than its tries last, because something
    changed between its ``GET /v1/bus`` and its login: the member was deleted, its bus key was
    rotated elsewhere, or membershipd hangs (nats-server then refuses the login once its
    callout's answer is late). The BusError says which, as a bus stopped after refused
    reconnects does, and the hung case is bounded (the tries by ``connect_timeout`` + 5 s, the
    control plane's answer by 5 s). Before, each ended after 10 s with "no connection"."""
    import signal

    handle = f"ivy-{between}"
    await world.add(handle)
    stopped_daemon = False
    async with world.sdk(handle) as me, world.sdk("alice") as a:
        real_bus_info = me.bus_info
        calls = 0

        async def bus_info():  # the Bus's GET /v1/bus, then the change, before its login
            nonlocal calls, stopped_daemon
            calls += 1
            info = await real_bus_info()
            if calls == 1 and between == "deleted":
                await a.remove_member(handle)
            elif calls == 1 and between == "rotated":
                async with world.sdk(handle) as elsewhere:
                    await elsewhere.rotate_bus_key()
            elif calls == 1:
                freeze(world.daemon.pid)  # its nats-server keeps running
                stopped_daemon = True
            return info

        me.bus_info = bus_info
        started = time.monotonic()
        try:
            with pytest.raises(BusError) as refused:
                # nats-py must wait longer than nats-server's 1.5 s for the callout to hear the refusal
                async with me.bus(connect_timeout=2 if between == "hung" else 1, grant_wait=0.5):
                    pass
        finally:
            if stopped_daemon:
                os.kill(world.daemon.pid, signal.SIGCONT)
        took = time.monotonic() - started
    text = str(refused.value)
    assert text.startswith("the bus at ") and f"refused the connection of {handle} (authorization violation): " in text
    assert calls == 2  # the Bus asked why
    if between == "deleted":
        assert f"no longer accepts {handle}'s signed requests either (the member was deleted?)" in text
    elif between == "rotated":
        assert f"has another bus key for {handle}" in text and world.people[handle].bus_pub in text
    else:
        assert "the control plane could not say why" in text and "is membershipd down or overloaded?" in text
        assert took < WAIT  # bounded: no retry loop behind the refusal
    assert await member_connections(world.daemon, handle) == set()


async def test_a_first_connection_refused_within_grant_wait_is_tried_again(world):
    """membershipd hangs between the Bus's ``GET /v1/bus`` and its login, for less than
    ``grant_wait``: nats-server refuses the login (the callout's answer is late), the Bus tries
    again, and connects once membershipd answers."""
    import signal

    await world.add("jay")
    room = await new_room(world, "jay")
    loop = asyncio.get_running_loop()
    resumed = loop.create_future()
    async with world.sdk("jay") as me:
        real_bus_info = me.bus_info

        stopped = False

        async def bus_info():
            nonlocal stopped
            info = await real_bus_info()
            if not stopped:
                stopped = True
                freeze(world.daemon.pid)
                loop.call_later(2.5, lambda: (os.kill(world.daemon.pid, signal.SIGCONT), resumed.set_result(None)))
            return info

        me.bus_info = bus_info
        try:
            async with me.bus(grant_wait=WAIT) as bus:
                assert resumed.done()  # the login waited for membershipd
                assert any("authorization violation" in str(e).lower() for e in bus._connect_errors)
                async with bus.listen(room) as messages:
                    await bus.send(room, "t", b"connected")
                    assert (await next_message(messages)).text == "connected"
        finally:
            if stopped and not resumed.done():
                os.kill(world.daemon.pid, signal.SIGCONT)


async def test_a_send_during_a_reconnect_waits_for_the_bus(world):
    """kim sends while his kicked connection is coming back: the send waits for the bus
    and the message arrives once (a send in the very instant of the kick, before nats-py
    saw the connection close, is at most once: docs/client.md, "Reconnects").

    kim is a member of its own, and his removal comes last: a removal kicks the member's
    connections again 2.7 s later (docs/bus-auth.md), which would reach another test's bus of
    a shared member, or this test's next send (a review)."""
    await world.add("kim")
    room_a = await new_room(world, "kim")
    room_b, room_c = await new_room(world), await new_room(world)
    async with world.sdk("kim") as k, k.bus() as kim_bus, world.sdk("alice") as a, a.bus() as alice_bus, \
            alice_bus.listen(room_a) as messages:
        await kim_bus.send(room_a, "t", b"warm")  # the key is cached: the next sends need no HTTP first
        assert (await next_message(messages)).text == "warm"
        changes = ((a.add_room_member, room_b), (a.add_room_member, room_c), (a.remove_room_member, room_b))
        for i, (change, room) in enumerate(changes):
            before = kim_bus.reconnects
            await change(room, "kim")  # kim's connection is closed before the 2xx
            deadline = time.monotonic() + WAIT
            while not (kim_bus.nc.is_reconnecting or kim_bus.reconnects > before):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.001)
            assert await kim_bus.send(room_a, "t", f"after change {i}".encode()) == 1
            m = await next_message(messages)
            assert m.ok and m.text == f"after change {i}" and m.sender == "kim"
        assert messages.rejected == Counter()
        assert alice_bus.reconnects == 0  # the listener was never kicked: what it missed, the test would not see


#: How many times :func:`_kick_and_hold` may kick before it catches a reconnect in the act.
KICK_ATTEMPTS = 8


async def spare_rooms(world: World) -> list[str]:
    """Rooms for :func:`_kick_and_hold`, made before the test's buses connect: a room alice makes
    grants it to her, which kicks her own buses too (a CI run: her listener, still reconnecting
    when membershipd was held, missed the message the test waited for)."""
    return [await new_room(world) for _ in range(KICK_ATTEMPTS)]


async def _kick_and_hold(world: World, a: UnibusClient, bus: Any, moment: str,
                         rooms: list[str]) -> Callable[[], None]:
    """Kick ``bus``'s member (added to one of ``rooms``, from :func:`spare_rooms`: its connection
    is closed before the 2xx), and hold membershipd (SIGSTOP, 0.5 s) once nats-py is ``moment``:
    "reconnecting" (waiting to try) or "connecting" (the new connection's handshake, waiting for
    the callout's answer). A kick whose reconnect was over before this saw it is made again (a
    grant each time: a revocation would be swept, and kicked, again later). Returns what resumes
    membershipd at once."""
    import signal

    assert len(rooms) >= KICK_ATTEMPTS
    for room in rooms[:KICK_ATTEMPTS]:
        before = bus.reconnects
        await a.add_room_member(room, bus.client.identity.handle)
        deadline = time.monotonic() + WAIT
        while not bus.nc.is_reconnecting and bus.reconnects == before:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.0005)
        if bus.nc.is_reconnecting:
            break
    else:
        raise AssertionError("every reconnect was over before the test saw it")
    freeze(world.daemon.pid)  # its callout cannot answer the login yet
    held = [True]

    def resume() -> None:
        if held[0]:
            held[0] = False
            os.kill(world.daemon.pid, signal.SIGCONT)
    asyncio.get_running_loop().call_later(0.5, resume)  # within nats-server's wait for the callout
    try:
        while moment == "connecting" and not bus.nc.is_connecting:
            assert bus.reconnects == before and time.monotonic() < deadline
            await asyncio.sleep(0.0005)
    except BaseException:
        resume()
        raise
    return resume


@pytest.mark.parametrize("moment", ["reconnecting", "connecting"])
async def test_a_listener_started_while_its_bus_reconnects_hears_the_next_message(world, tmp_path, moment):
    """A listener whose bus is kicked just before it subscribes (here during the sync that a
    replica with no trust root pinned makes first) starts once nats-server has its subscription,
    so a message published right after is heard. Before, nats-py's flush() returned at once
    while it reconnected, the listener started with its SUB still held back, and the message
    was missed (a CI run: a test's replay reached a listener after the next message); and
    during the new connection's handshake the start failed at once (a review)."""
    handle = f"lou-{moment}"  # a member of its own: no other test's sweep kicks it meanwhile
    await world.add(handle)
    room_a = await new_room(world, handle)
    rooms = await spare_rooms(world)
    resume = None
    held_at = -1  # the bus's reconnects when membershipd was held
    async with world.sdk("alice") as a, world.sdk("alice") as sender, sender.bus(key_ttl=WAIT) as alice_bus, \
            UnibusClient(world.daemon.base_url, world.people[handle], replica_root=tmp_path / "lou.log",
                         notice=lambda _text: None) as b, b.bus() as bus:
        await alice_bus.send(room_a, "t", b"warm")  # alice's key is cached: her next send needs no HTTP
        real_sync = b.sync

        async def sync():  # the listener's first sync, then the kick
            nonlocal resume, held_at
            state = await real_sync()
            resume = await _kick_and_hold(world, a, bus, moment, rooms)
            held_at = bus.reconnects
            return state

        b.sync = sync
        try:
            async with bus.listen(room_a) as messages:
                assert resume is not None and bus.nc.is_connected and bus.reconnects == held_at + 1
                await alice_bus.send(room_a, "t", b"right after the start")
                await alice_bus.send(room_a, "t", b"later")
                assert (await next_message(messages)).text == "right after the start"
                assert (await next_message(messages)).text == "later"
        finally:
            if resume is not None:
                resume()


async def test_a_send_while_the_new_connection_waits_for_the_callout_waits_for_it(world):
    """A review: a member's send while his kicked connection was in its handshake (nats-server asking
    a slow membershipd about the login) raised "the bus connection dropped 3 times" at once, and
    the message went out anyway once the bus was back. It waits for the bus, and arrives once."""
    await world.add("sam")  # a member of its own: no other test's sweep kicks it meanwhile
    room_a = await new_room(world, "sam")
    rooms = await spare_rooms(world)
    async with world.sdk("alice") as a, a.bus() as alice_bus, alice_bus.listen(room_a) as messages, \
            world.sdk("sam") as b, b.bus(key_ttl=WAIT) as bus:
        await bus.send(room_a, "t", b"warm")  # the key is cached: the next send needs no HTTP first
        assert (await next_message(messages)).text == "warm"
        resume = await _kick_and_hold(world, a, bus, "connecting", rooms)
        held_at = bus.reconnects
        try:
            assert await bus.send(room_a, "t", b"during the handshake") == 1
            assert bus.reconnects == held_at + 1
        finally:
            resume()
        await bus.send(room_a, "t", b"end")
        assert [(await next_message(messages)).text for _ in range(2)] == ["during the handshake", "end"]
        assert messages.rejected == Counter()
        assert alice_bus.reconnects == 0  # the listener was never kicked: what it missed, the test would not see


@pytest.mark.parametrize("ended", ["timed out", "cancelled"])
async def test_a_listener_whose_start_failed_keeps_no_subscription(world, ended):
    """A review: a start that failed (here its barrier timed out: nats-server frozen) left its
    nats-py subscription in place, made again at every reconnect and filling a queue nobody
    reads, and a second start returned at once as if live (a second review: also a start
    cancelled by its caller, whose listener then outlived a revocation). It unsubscribes.
    And the bus hears again once nats-server answers: nats-py's flush() left its timed-out
    future among the PONGs awaited, and the late PONG ended nats-py's read loop (deaf until
    its pings went stale, minutes later)."""
    import signal

    handle = "flo" if ended == "timed out" else "flo-c"
    await world.add(handle)  # a member of its own: no other test's sweep kicks it meanwhile
    room = await new_room(world, handle)
    nats_pid = world.daemon.nats_pid()
    assert nats_pid is not None
    async with world.sdk("alice") as a, a.bus() as alice_bus, world.sdk(handle) as b, \
            b.bus(connect_timeout=1) as bus:
        failed = bus.listen(room)
        freeze(nats_pid)  # every thread: one still running answered two PINGs (CI, twice)
        try:
            if ended == "timed out":
                with pytest.raises(BusError, match="cannot subscribe to"):
                    await failed.start()
            else:
                task = asyncio.create_task(failed.start())
                await asyncio.sleep(0.3)  # waiting for nats-server's answer
                assert not task.done()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        finally:
            os.kill(nats_pid, signal.SIGCONT)
        async with bus.listen(room) as messages:  # a barrier: the server has seen the UNSUB
            await alice_bus.send(room, "t", b"after")
            assert (await next_message(messages)).text == "after"
        assert failed._queue.qsize() == 0  # heard nothing: no subscription left behind
        async with failed as again:  # a second start subscribes for real
            await alice_bus.send(room, "t", b"again")
            assert (await next_message(again)).text == "again"


async def test_a_send_whose_bus_is_closed_while_the_server_is_silent_says_so(world):
    """A second review: a send waiting for a frozen nats-server's answer while its bus was
    closed ended in "flush timeout"; it says the bus was closed."""
    import signal

    await world.add("cy")
    room = await new_room(world, "cy")
    nats_pid = world.daemon.nats_pid()
    assert nats_pid is not None
    async with world.sdk("cy") as c:
        bus = c.bus(connect_timeout=1)
        await bus.connect()
        try:
            await bus.send(room, "t", b"warm")  # the key is cached: the next send needs no HTTP
            freeze(nats_pid)
            try:
                sending = asyncio.create_task(bus.send(room, "t", b"unanswered"))
                await asyncio.sleep(0.3)
                assert not sending.done()
                closing = asyncio.create_task(bus.close())  # its drain waits for the server too
                with pytest.raises(BusError, match="^the bus was closed$"):
                    await asyncio.wait_for(sending, WAIT)
            finally:
                os.kill(nats_pid, signal.SIGCONT)
            await asyncio.wait_for(closing, WAIT)
        finally:
            await bus.close()


async def _listen_cli(world: World, tmp_path: Any, handle: str, *args: str) -> asyncio.subprocess.Process:
    """`unibus listen ARGS` as ``handle``, started; returns once it says it is listening."""
    path = tmp_path / f"{handle}.json"
    if not path.exists():
        save_identity(world.people[handle], path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "unibus.client.cli", "--server", world.daemon.base_url, "--identity", str(path),
        "listen", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
        assert line, "unibus listen ended before it listened"
        if "listening on" in line:
            return proc


async def test_unibus_listen_goes_on_across_a_kick_and_stops_when_deleted(world, tmp_path):
    await world.add("gus")
    room_a = await new_room(world, "gus")
    room_b = await new_room(world)
    proc = await _listen_cli(world, tmp_path, "gus", room_a, "--count", "2", "--json")
    try:
        async with world.sdk("alice") as a, a.bus() as alice_bus:
            await alice_bus.send(room_a, "t", b"one")
            assert proc.stdout is not None
            first = json.loads(await asyncio.wait_for(proc.stdout.readline(), WAIT))
            assert (first["text"], first["sender"]) == ("one", "alice")
            old = await member_connections(world.daemon, "gus")
            await a.add_room_member(room_b, "gus")  # kicks gus's `listen`
            assert not old & await member_connections(world.daemon, "gus")
            assert proc.stderr is not None
            while True:  # it says when it is back, subscription made again
                line = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
                assert line, "unibus listen ended"
                if "listening again" in line:
                    break
            await alice_bus.send(room_a, "t", b"two")
            out, err = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == 0, err.decode()
        assert json.loads(out)["text"] == "two"
        assert "Traceback" not in err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    proc = await _listen_cli(world, tmp_path, "gus", room_a)
    try:
        async with world.sdk("alice") as a:
            await a.remove_member("gus")
        _out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    errors = [line for line in err.decode().splitlines() if line.startswith("unibus: error: ")]
    assert len(errors) == 1 and "Traceback" not in err.decode(), err.decode()
    assert "refused gus 3 times in a row (authorization violation)" in errors[0] and "deleted" in errors[0]
