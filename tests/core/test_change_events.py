"""The store_changed and reloaded hooks against a real in-process daemon (docs/plugins.md, "Change events")."""

from __future__ import annotations

import asyncio
import json

import pytest

from unibus import hookimpl
from unibus.client import UnibusClient
from unibus.client.keys import generate_identity
from unibus.daemon import Daemon
from unibus.events import ChangeEvent, event_from_entry
from unibus.pluginmanager import PluginManager
from unibus.settings import HostPort, Settings
from unibus.testing import accept_offline_bootstraps, bootstrap_member, free_port, nats_server_pids


class Recorder:
    """Records every event; its async hook proves coroutines are awaited before the 2xx."""

    def __init__(self) -> None:
        self.events: list[ChangeEvent] = []
        self.reloads = 0

    @hookimpl
    async def store_changed(self, app, event):
        await asyncio.sleep(0)
        self.events.append(event)

    @hookimpl
    def reloaded(self, app):
        self.reloads += 1


class Broken:
    @hookimpl
    def store_changed(self, event):
        raise RuntimeError("the audit disk is full")

    @hookimpl
    def reloaded(self):
        raise RuntimeError("nope")


@pytest.fixture
async def running(tmp_path, alice):
    data_dir = tmp_path / "d"
    bootstrap_member(data_dir, alice, "admin")
    settings = Settings(data_dir=data_dir, http_addr=HostPort("127.0.0.1", free_port()),
                        nats_addr=HostPort("127.0.0.1", free_port()), server_name="t", bus_auth="off")
    pm = PluginManager(load_entry_points=False)
    recorder = Recorder()
    pm.register(Broken(), "broken")  # registered first: a failing plugin never stops the others
    pm.register(recorder, "recorder")
    daemon = Daemon(settings, pm)
    try:
        await daemon.start()
        client = UnibusClient(f"http://{settings.http_addr}", alice)
        yield daemon, recorder, client, data_dir
        await client.close()
    finally:
        await daemon.stop()
    assert not nats_server_pids(tmp_path)


async def test_every_local_change_is_one_event_with_seq_actor_before_after(running):
    daemon, recorder, alice, _ = running
    bob = generate_identity("bob")
    await alice.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bob.enc_suite, bus_pub=bob.bus_pub)
    # delivered before the 2xx: no waiting
    [added] = recorder.events
    assert (added.kind, added.actor, added.origin, added.handle, added.before) == (
        "member_added", "alice", "local", "bob", None)
    assert added.after["handle"] == "bob" and added.after["role"] == "member"
    head = await alice.log_head()
    assert added.seq == head["seq"]

    await alice.set_role("bob", "admin")
    changed = recorder.events[-1]
    assert (changed.kind, changed.before["role"], changed.after["role"]) == ("member_updated", "member", "admin")

    room = await alice.create_room("ops")
    created = recorder.events[-1]
    assert (created.kind, created.room_id, created.before) == ("room_created", room["room_id"], None)
    assert created.after["members"] == ["alice"] and created.after["owner"] == "alice"

    await alice.add_room_member(room["room_id"], "bob")
    joined = recorder.events[-1]
    assert joined.kind == "room_member_added" and joined.handle == "bob"
    assert joined.before["members"] == ["alice"] and joined.after["members"] == ["alice", "bob"]

    await alice.remove_member("bob")
    gone = recorder.events[-1]
    assert (gone.kind, gone.handle, gone.after, gone.before["handle"]) == ("member_deleted", "bob", None, "bob")

    seqs = [e.seq for e in recorder.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e.actor == "alice" and e.origin == "local" for e in recorder.events)
    # the broken plugin failed on every change: counted for unibus_plugin_hook_errors_total
    assert daemon.plugins.hook_errors[("broken", "store_changed")] == len(recorder.events)


async def test_offline_member_add_is_an_offline_event_then_reloaded(running):
    daemon, recorder, alice, data_dir = running
    carol = generate_identity("carol")
    bootstrap_member(data_dir, carol)
    assert recorder.events == [] and recorder.reloads == 0
    await daemon._reload()  # what SIGHUP runs
    [event] = recorder.events
    assert (event.kind, event.origin, event.actor, event.handle) == ("member_added", "offline", None, "carol")
    assert event.after["sign_pub"] == carol.sign_pub_b64
    assert recorder.reloads == 1
    await daemon._reload()  # nothing new: no event is delivered twice
    assert len(recorder.events) == 1 and recorder.reloads == 2


async def test_an_entry_a_local_change_jumped_over_is_delivered_later_not_lost(running):
    """An offline member add the daemon has not heard of (no SIGHUP yet), then a local change:
    the local change is delivered before its 2xx (a request never waits for other entries),
    and the offline entry it jumped over right after, in the background, each once (on a
    cluster: another node's entry the watch has not reported yet). Before, the local
    change's seq moved a high-water mark past the offline entry, which was never delivered."""
    daemon, recorder, alice, data_dir = running
    bootstrap_member(data_dir, generate_identity("carol"))
    await accept_offline_bootstraps(alice)  # as alice would (unibus trust), or her changes are refused
    assert recorder.events == []  # reading the log delivers nothing
    room = await alice.create_room("after carol")
    created = next(e for e in recorder.events if e.kind == "room_created")
    assert (created.origin, created.room_id) == ("local", room["room_id"])
    for _ in range(250):  # bounded: 5 s
        if len(recorder.events) == 2:
            break
        await asyncio.sleep(0.02)
    offline = next(e for e in recorder.events if e.kind == "member_added")
    assert (offline.origin, offline.handle, offline.seq) == ("offline", "carol", created.seq - 1)
    assert recorder.reloads == 0  # no SIGHUP was needed
    await daemon._reload()  # SIGHUP: nothing is delivered twice
    await alice.create_room("next")
    seqs = sorted(e.seq for e in recorder.events)
    assert seqs == list(range(seqs[0], seqs[0] + 3)) and recorder.reloads == 1


async def test_a_change_reported_twice_is_delivered_once(running):
    daemon, recorder, alice, _ = running
    await alice.create_room("x")
    assert len(recorder.events) == 1
    # the same seq seen again through the log (a cluster watch that missed nothing new)
    assert await daemon.events.catch_up("remote") == 0
    assert len(recorder.events) == 1


async def test_unsubscribed_listener_hears_nothing(running):
    daemon, recorder, alice, _ = running
    heard = []
    remove = daemon.store.add_listener(heard.append)
    await alice.create_room("a")
    remove()
    remove()  # harmless twice
    await alice.create_room("b")
    assert [c.kind for c in heard] == ["room_created"]


def test_event_from_a_remote_log_entry_names_the_actor():
    entry = {"seq": 9, "prev": "x", "at": 1, "kind": "request",
             "request": {"method": "DELETE", "path": "/v1/rooms/abc/members/bob", "query": "",
                         "content_digest": None, "body": None, "signature": "sig=:AA==:",
                         "signature_input": 'sig=("@method");created=1;nonce="n";keyid="carol";alg="ed25519"'},
             "result": {}}
    event = event_from_entry(entry, "remote")
    assert event == ChangeEvent(seq=9, kind="room_member_removed", actor="carol", origin="remote",
                                handle="bob", room_id="abc")
    assert json.loads(json.dumps(event.as_json()))["actor"] == "carol"
    assert event_from_entry({"seq": 0, "kind": "snapshot"}, "remote") is None
    # an actor forged into another parameter is not taken
    entry["request"]["signature_input"] = 'sig=("@method");nonce="keyid=\\"mallory\\"";keyid="carol"'
    assert event_from_entry(entry, "remote").actor == "carol"


async def test_sighups_during_a_re_read_make_one_more_re_read_not_one_each(running):
    """Red team: a burst of SIGHUPs (hundreds a second) started a full re-read each; they queued
    on the store's thread, signed requests waited behind them for tens of seconds and the
    memory grew by gigabytes. Now a re-read runs at a time, and the SIGHUPs during it ask for
    one more, which reads whatever was written before them."""
    daemon, recorder, alice, data_dir = running
    entered, release = asyncio.Event(), asyncio.Event()

    def slow_listener(change):  # holds the first re-read until the test lets it go
        async def wait():
            entered.set()
            await release.wait()
        return wait() if change.kind == "reloaded" and not release.is_set() else None

    remove = daemon.store.add_listener(slow_listener)
    try:
        daemon.on_sighup()
        await asyncio.wait_for(entered.wait(), 10)  # the re-read is under way
        for _ in range(100):
            daemon.on_sighup()
        bootstrap_member(data_dir, generate_identity("carol"))  # written after the first read, before the signals end
        running_reload = daemon._reloading
        release.set()
        await asyncio.wait_for(running_reload, 30)
    finally:
        remove()
    assert recorder.reloads == 2 and daemon._reloading is None  # the first, and one for the 100
    assert [(e.kind, e.handle) for e in recorder.events] == [("member_added", "carol")]  # read, once
    daemon.on_sighup()  # a later SIGHUP starts a re-read of its own
    await asyncio.wait_for(daemon._reloading, 30)
    assert recorder.reloads == 3 and len(recorder.events) == 1
    assert (await alice.me())["handle"] == "alice"



async def test_a_sighup_during_the_start_up_is_read_once_the_start_is_done(tmp_path, alice, monkeypatch):
    """A SIGHUP part-way through the start re-read the store at once: bus authorization had read
    its index of members and rooms and set up its kicks, but not yet its listener, so a member
    added offline before the signal stayed out of the index, and off the bus, until the next
    SIGHUP. Now the SIGHUPs of the start ask for one re-read once the start is done."""
    import nats

    from unibus.plugins.auth_enforce import Enforcer

    data_dir = tmp_path / "d"
    bootstrap_member(data_dir, alice, "admin")
    settings = Settings(data_dir=data_dir, http_addr=HostPort("127.0.0.1", free_port()),
                        nats_addr=HostPort("127.0.0.1", free_port()), server_name="t")
    daemon = Daemon(settings, PluginManager())
    carol = generate_identity("carol")
    enforcer_start = Enforcer.start

    async def start_signalled(self):  # the index is read, its listener is not set up yet
        bootstrap_member(data_dir, carol)
        daemon.on_sighup()
        daemon.on_sighup()
        if daemon._reloading is not None:  # the code before: the re-read ran here, during the start
            await asyncio.wait_for(asyncio.shield(daemon._reloading), 30)
        await enforcer_start(self)

    monkeypatch.setattr(Enforcer, "start", start_signalled)
    try:
        await daemon.start()
        if daemon._reloading is not None:  # asked for by the two SIGHUPs, once
            await asyncio.wait_for(daemon._reloading, 30)
        nc = await nats.connect(f"nats://{settings.nats_addr}", nkeys_seed_str=carol.bus_nkey_seed(),
                                allow_reconnect=False, connect_timeout=3)
        assert nc.is_connected
        await nc.close()
    finally:
        await daemon.stop()
    assert not nats_server_pids(tmp_path)
