"""--blob-max-uploads against a real daemon (docs/blobstore.md, "Limits").

The attacker here is an ordinary room member who opens many slow uploads to
pin membershipd's memory: the node takes at most ``--blob-max-uploads`` at
once and one member at most a quarter of them, and every refusal comes before
a byte of the body is read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from unibus.client.blobs import put_raw_blob
from unibus.client import UnibusClient
from unibus.client.keys import generate_identity
from unibus.plugins.blobstore.limits import MIN_RATE, check_rate, per_member
from unibus.problems import Problem
from unibus.testing import free_port

from .conftest import World, agen, raw_request, start_world

MAX_UPLOADS = 4  # a member's share: 1
SLOW = 1024 * 1024  # what a stalled upload declares


def limited(tmp_path_factory, body_timeout: float):
    port = free_port()
    server, people = start_world(tmp_path_factory.mktemp("limits") / "daemon", "--blob-max-uploads",
                                 str(MAX_UPLOADS), "--metrics-addr", f"127.0.0.1:{port}",
                                 env={"UNIBUS_BODY_TIMEOUT": str(body_timeout)})
    try:
        # a fifth member: the four of start_world, one slot each, fill the node
        erin = people["erin"] = generate_identity("erin")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, add_member(server.base_url, people["alice"], erin)).result(60)
        yield server, people, f"http://127.0.0.1:{port}/metrics"
    finally:
        server.stop()


async def add_member(base_url, admin, identity) -> None:
    async with UnibusClient(base_url, admin) as c:
        await c.add_member(identity.handle, identity.sign_pub_b64, identity.enc_pub_b64, identity.enc_suite,
                           bus_pub=identity.bus_pub)


@pytest.fixture(scope="module")
def limited_daemon(tmp_path_factory):
    yield from limited(tmp_path_factory, 60)  # a stalled upload keeps its slot


@pytest.fixture(scope="module")
def hasty_daemon(tmp_path_factory):
    yield from limited(tmp_path_factory, 2)  # a trickle is found out after 2 s


@contextlib.asynccontextmanager
async def opened(daemon):
    """A :class:`World` of one of this module's daemons, its clients closed at the end."""
    server, people, metrics = daemon
    w = World(server, people, {h: UnibusClient(server.base_url, i) for h, i in people.items()})
    w.metrics = metrics  # type: ignore[attr-defined]
    try:
        yield w
    finally:
        for c in w.clients.values():
            await c.close()


@pytest.fixture
async def world(limited_daemon):
    async with opened(limited_daemon) as w:
        yield w


@pytest.fixture
async def hasty(hasty_daemon):
    async with opened(hasty_daemon) as w:
        yield w


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


def test_the_rate_an_upload_must_keep():
    check_rate(0, 30.0, 30.0)  # nothing is asked within the grace
    check_rate(MIN_RATE * 10, 40.0, 30.0)  # exactly the rate since the grace
    with pytest.raises(Problem) as e:
        check_rate(MIN_RATE * 10 - 1, 40.0, 30.0)
    assert e.value.status == 408 and e.value.kind == "request-timeout"
    assert e.value.detail == ("the request body arrived at 8192 bytes/s; an upload must average at least "
                              "32768 bytes/s after its first 30 s")


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
    rid = await world.room(members=("carol", "dave", "alice", "erin"))
    stalled = Stalled(world, rid)
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * 1024 * 1024))  # over the client's Expect: 100-continue threshold
    try:
        for h in ("alice", "bob", "carol", "dave"):
            await stalled.start(h)
        assert sample(world.metrics, "unibus_blobstore_uploads_in_progress") == MAX_UPLOADS
        refused = sample(world.metrics, "unibus_blobstore_uploads_refused_total", reason="node")
        # a member at its share hears so first: retrying would not help it
        status, doc, _ = await put(world, "bob", rid, b"bob again")
        assert status == 429 and doc["type"].endswith("/too-many-uploads"), doc
        # the answer comes from the headers alone: 1 MiB of a declared 4 MiB, then a stall
        status, doc, headers = await asyncio.wait_for(
            raw_request(world.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs", world.people["erin"],
                        body=agen([os.urandom(1024 * 1024)]), digest_of=b"whatever",
                        headers={"Content-Length": str(4 * 1024 * 1024)}), 30)
        assert status == 503, doc
        assert doc["type"].endswith("/too-many-uploads") and doc["max_uploads"] == MAX_UPLOADS
        assert headers["Retry-After"] == "1"
        assert sample(world.metrics, "unibus_blobstore_uploads_refused_total", reason="node") == refused + 1
        assert sorted(world.stored(rid)) == []
        # the client retries a full node's 503: a slot that frees meanwhile takes the upload
        upload = asyncio.create_task(put_raw_blob(world.clients["erin"], rid, path))
        await until(lambda: sample(world.metrics, "unibus_blobstore_uploads_refused_total", reason="node") > refused + 1,
                    "the client's upload to be refused once")
        assert not upload.done()
        await stalled.stop()
        blob_id = await asyncio.wait_for(upload, 30)
        assert world.stored(rid) == [blob_id]
    finally:
        await stalled.stop()


async def test_a_trickle_does_not_keep_its_slot(hasty):
    """A byte within every body deadline (2 s here) never stalls, but averages next to
    nothing: once past the first deadline the upload is 408 and its slot comes back."""
    rid = await hasty.room()

    async def trickle():
        for _ in range(20):  # 20 s at most, never reached
            yield b"x"
            await asyncio.sleep(1.2)

    status, doc, headers = await asyncio.wait_for(
        raw_request(hasty.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs", hasty.people["carol"], body=trickle(),
                    digest_of=b"whatever", headers={"Content-Length": str(SLOW)}), 30)
    assert status == 408, doc
    assert doc["type"].endswith("/request-timeout")
    assert doc["detail"].startswith("the request body arrived at ") and "after its first 2 s" in doc["detail"]
    assert headers["Connection"].lower() == "close"
    assert sample(hasty.metrics, "unibus_blobstore_uploads_in_progress") == 0
    assert hasty.stored(rid) == [] and hasty.staging() == []
    # an upload that moves data is not hurried: carol's slot is hers again
    status, doc, _ = await put(hasty, "carol", rid, os.urandom(3 * 1024 * 1024))
    assert status == 201, doc
