"""--blob-max-uploads against a real daemon (docs/blobstore.md, "Limits").

The attacker here is an ordinary room member who opens many slow uploads to
pin membershipd's memory: the node takes at most ``--blob-max-uploads`` at
once and one member at most a quarter of them, and every refusal comes before
a byte of the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from unibus.client.blobs import put_raw_blob
from unibus.plugins.blobstore.limits import per_member
from unibus.testing import free_port

from .conftest import World, agen, raw_request, start_world

MAX_UPLOADS = 4  # a member's share: 1
SLOW = 1024 * 1024  # what a stalled upload declares


@pytest.fixture(scope="module")
def limited_daemon(tmp_path_factory):
    port = free_port()
    server, people = start_world(tmp_path_factory.mktemp("limits") / "daemon", "--blob-max-uploads",
                                 str(MAX_UPLOADS), "--metrics-addr", f"127.0.0.1:{port}",
                                 env={"UNIBUS_BODY_TIMEOUT": "60"})  # a stalled upload keeps its slot
    try:
        yield server, people, f"http://127.0.0.1:{port}/metrics"
    finally:
        server.stop()


@pytest.fixture
async def world(limited_daemon):
    from unibus.client import UnibusClient

    server, people, metrics = limited_daemon
    w = World(server, people, {h: UnibusClient(server.base_url, i) for h, i in people.items()})
    w.metrics = metrics  # type: ignore[attr-defined]
    try:
        yield w
    finally:
        for c in w.clients.values():
            await c.close()


def sample(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


class Stalled:
    """Uploads that send 100 KiB of a declared 1 MiB and then wait: each holds a slot."""

    def __init__(self, world: World, room: str) -> None:
        self.world, self.room = world, room
        self.tasks: list[asyncio.Task] = []

    async def start(self, handle: str) -> None:
        async def body():
            yield os.urandom(100 * 1024)
            await asyncio.Event().wait()  # never set: cancelling the task closes the connection

        before = len(self.world.staging())
        self.tasks.append(asyncio.create_task(raw_request(
            self.world.server.base_url, "PUT", f"/v1/rooms/{self.room}/blobs", self.world.people[handle],
            body=body(), digest_of=b"whatever", headers={"Content-Length": str(SLOW)})))
        await until(lambda: len(self.world.staging()) > before, "the stalled upload to be received")

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.tasks.clear()
        await until(lambda: self.world.staging() == [], "the stalled uploads to be dropped")


async def until(check, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def put(world: World, handle: str, room: str, data: bytes, **headers: str):
    return await raw_request(world.server.base_url, "PUT", f"/v1/rooms/{room}/blobs", world.people[handle],
                             body=data, headers=headers)


def test_a_member_gets_a_quarter():
    assert [per_member(n) for n in (1, 3, 4, 7, 16, 100)] == [1, 1, 1, 1, 4, 25]


async def test_one_member_cannot_hold_more_than_its_share(world):
    rid = await world.room(members=("carol", "dave"))
    stalled = Stalled(world, rid)
    try:
        await stalled.start("carol")
        refused = sample(world.metrics, "unibus_blobstore_uploads_refused_total", reason="member")
        status, doc, headers = await put(world, "carol", rid, b"second")
        assert status == 429, doc
        assert doc["type"].endswith("/too-many-uploads") and doc["max_uploads"] == 1
        assert doc["detail"].startswith("carol has 1 uploads in progress") and "--blob-max-uploads" in doc["detail"]
        assert sample(world.metrics, "unibus_blobstore_uploads_refused_total", reason="member") == refused + 1
        # another member is not held back by carol's share
        status, doc, _ = await put(world, "dave", rid, b"dave's")
        assert status == 201, doc
        assert sample(world.metrics, "unibus_blobstore_uploads_in_progress") == 1
    finally:
        await stalled.stop()
    # carol's slot came back with her stalled connection
    status, doc, _ = await put(world, "carol", rid, b"second")
    assert status == 201, doc
    assert sample(world.metrics, "unibus_blobstore_uploads_in_progress") == 0


async def test_a_full_node_refuses_before_reading_and_the_client_retries(world, tmp_path):
    rid = await world.room(members=("carol", "dave", "alice"))
    stalled = Stalled(world, rid)
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * 1024 * 1024))  # over the client's Expect: 100-continue threshold
    try:
        for h in ("alice", "bob", "carol", "dave"):
            await stalled.start(h)
        assert sample(world.metrics, "unibus_blobstore_uploads_in_progress") == MAX_UPLOADS
        refused = sample(world.metrics, "unibus_blobstore_uploads_refused_total", reason="node")
        # the answer comes from the headers alone: 1 MiB of a declared 4 MiB, then a stall
        status, doc, headers = await asyncio.wait_for(
            raw_request(world.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs", world.people["bob"],
                        body=agen([os.urandom(1024 * 1024)]), digest_of=b"whatever",
                        headers={"Content-Length": str(4 * 1024 * 1024)}), 30)
        assert status == 503, doc
        assert doc["type"].endswith("/too-many-uploads") and doc["max_uploads"] == MAX_UPLOADS
        assert headers["Retry-After"] == "1"
        assert sample(world.metrics, "unibus_blobstore_uploads_refused_total", reason="node") == refused + 1
        assert sorted(world.stored(rid)) == []
        # the client retries a full node's 503: a slot that frees meanwhile takes the upload
        upload = asyncio.create_task(put_raw_blob(world.clients["carol"], rid, path))
        await until(lambda: sample(world.metrics, "unibus_blobstore_uploads_refused_total", reason="node") > refused + 1,
                    "the client's upload to be refused once")
        assert not upload.done()
        await stalled.stop()
        blob_id = await asyncio.wait_for(upload, 30)
        assert world.stored(rid) == [blob_id]
    finally:
        await stalled.stop()
