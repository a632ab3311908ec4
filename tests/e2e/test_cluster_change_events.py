"""``store_changed`` on a real cluster (docs/plugins.md, "Change events"): a change made
through one node reaches the plugins of every node once, with the same seq and actor,
``local`` where it was made and ``remote`` elsewhere. (This test found another node's
change lost for good on a node where a later local change came first.)"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.slow


def events(node) -> list[dict]:
    path = node.data_dir / "plugins" / "recorder" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(cluster, check, what: str, timeout: float = 30) -> list[list[dict]]:
    deadline = time.monotonic() + timeout
    while True:
        seen = [events(node) for node in cluster.nodes]
        if all(check(e) for e in seen):
            return seen
        assert time.monotonic() < deadline, f"{what}: {seen}"
        time.sleep(0.1)


def test_a_change_reaches_every_nodes_plugins_once_local_there_remote_elsewhere(cluster_factory):
    cluster = cluster_factory(plugins=["change_recorder"])
    admin = cluster.identity.handle
    bob = cluster.member("bob", node=0)  # made through node 1, signed by the admin
    cluster.wait_member(1, bob)
    status, room = cluster.client(1, bob).post("/v1/rooms", {"name": "made on n2"})  # through node 2, by bob
    assert status == 201, room
    rid = room["room_id"]

    def added(e):
        return [x for x in e if x["kind"] == "member_added" and x["handle"] == "bob"]

    def created(e):
        return [x for x in e if x["kind"] == "room_created" and x["room_id"] == rid]

    seen = wait_for(cluster, lambda e: added(e) and created(e), "bob's addition and bob's room on every node")
    time.sleep(1)  # anything delivered twice would show up by now
    seen = [events(node) for node in cluster.nodes]
    for i, e in enumerate(seen):
        assert len(added(e)) == 1 and len(created(e)) == 1, (i, e)
    adds = [added(e)[0] for e in seen]
    rooms = [created(e)[0] for e in seen]
    assert [a["origin"] for a in adds] == ["local", "remote", "remote"]
    assert [r["origin"] for r in rooms] == ["remote", "local", "remote"]
    assert {a["actor"] for a in adds} == {admin} and {r["actor"] for r in rooms} == {"bob"}
    # the membership log's seq, the same on every node, and in the order the changes were made
    assert len({a["seq"] for a in adds}) == 1 and len({r["seq"] for r in rooms}) == 1
    assert isinstance(adds[0]["seq"], int) and rooms[0]["seq"] > adds[0]["seq"]
    for e in seen:  # every seq once on every node (the order may differ: docs/plugins.md)
        seqs = [x["seq"] for x in e if x["seq"] is not None]
        assert len(seqs) == len(set(seqs)), e
