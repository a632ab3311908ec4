"""The blob handlers over both backends, in process.

The daemon picks the object store only in cluster mode, so the HTTP path
over it (a streamed GET from JetStream chunks, not sendfile) is exercised
here: the plugin's real routes on an aiohttp test server, with a stand-in
for the store and for the auth layer (which the daemon tests cover).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from datetime import UTC, datetime

import aiohttp
import nats
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from unibus.app import OPENAPI_DOC, STASHES, STORE, problem_middleware, stash
from unibus.auth import BODY_TIMEOUT_KEY, MEMBER_KEY, SIGNATURE_KEY
from unibus.openapi import OpenAPI
from unibus.plugins.blobstore import SERVICE, BlobService, register_routes
from unibus.plugins.blobstore.fs import FsBackend
from unibus.plugins.blobstore.objectstore import ObjectStoreBackend
from unibus.signing import Verified
from unibus.store.base import Change, Member, Room

NOW = datetime.now(UTC)
# The stand-in auth layer uses the same plain string keys as unibus.auth.
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")


def member(handle: str, role: str = "member") -> Member:
    return Member(handle, role, bytes(32), bytes(32), "X25519", NOW)


class FakeStore:
    def __init__(self) -> None:
        self.rooms = {"r1": Room("r1", "one", "bob", 1, False, NOW, (member("bob"), member("carol")))}
        self.listeners = []
        #: deleted members whose handle room records still name, as a cluster's do for a moment
        self.deleted: set[str] = set()

    async def get_member(self, handle):
        return None if handle in self.deleted else member(handle)

    async def get_room(self, room_id):
        return self.rooms.get(room_id)

    async def room_handles(self, room_id):
        room = self.rooms.get(room_id)
        return (room.handles if room is not None else None), 0

    def add_listener(self, cb):
        self.listeners.append(cb)

    async def delete_room(self, room_id):
        del self.rooms[room_id]
        for cb in self.listeners:
            res = cb(Change("room_deleted", room_id=room_id))
            if res is not None:
                await res


@web.middleware
async def fake_auth(request, handler):
    """Trust X-Test-Member / X-Test-Sha256 (the real auth layer is tested with a real daemon)."""
    handle = request.headers.get("X-Test-Member", "bob")
    request[MEMBER_KEY] = member(handle, "admin" if handle == "alice" else "member")
    sha = request.headers.get("X-Test-Sha256")
    request[SIGNATURE_KEY] = Verified(handle, "n" * 16, 0, "sig1", bytes.fromhex(sha) if sha else None)
    if "X-Test-Body-Timeout" in request.headers:
        request[BODY_TIMEOUT_KEY] = float(request.headers["X-Test-Body-Timeout"])
    return await handler(request)


def blob_app(backend, max_bytes: int, members: tuple[str, ...] = (), **limits) -> tuple[web.Application, BlobService]:
    """The plugin's routes over ``backend``, with the stand-in store (room ``r1``: bob,
    carol and ``members``) and auth; ``limits`` go to :class:`BlobService`."""
    store = FakeStore()
    if members:
        room = store.rooms["r1"]
        store.rooms["r1"] = dataclasses.replace(room, members=room.members + tuple(member(h) for h in members))
    app = web.Application(middlewares=[problem_middleware, fake_auth])
    app[STORE] = store
    app[OPENAPI_DOC] = OpenAPI()
    service = BlobService(backend, max_bytes, **limits)
    app[STASHES] = {}
    stash(app, "blobstore")[SERVICE] = service
    store.add_listener(service.on_change)
    register_routes(app)
    return app, service


async def serve_blob_routes(backend, max_bytes: int, members: tuple[str, ...] = (),
                            **limits) -> tuple[TestServer, BlobService]:
    """:func:`blob_app` on a real aiohttp server (a free loopback port), started."""
    app, service = blob_app(backend, max_bytes, members, **limits)
    server = TestServer(app)
    await server.start_server()
    return server, service


@pytest.fixture(params=["fs", "objectstore"])
async def http(request, tmp_path):
    nc = None
    if request.param == "fs":
        backend = FsBackend(tmp_path / "blobs")
    else:
        server = request.getfixturevalue("nats_server")
        nc = await nats.connect(server.url)
        backend = ObjectStoreBackend(nc.jetstream(timeout=5), tmp_path / "blobs")
    await backend.start()
    app, _service = blob_app(backend, 5 * 1024 * 1024)
    store = app[STORE]
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, backend, store
    finally:
        await client.close()
        await backend.close()
        if nc is not None:
            await nc.close()


async def put(client, data, who="bob", sha=None):
    return await client.put("/v1/rooms/r1/blobs", data=data, headers={
        "X-Test-Member": who, "X-Test-Sha256": sha or hashlib.sha256(data).hexdigest()})


@pytest.mark.parametrize("size", [0, 1, 256 * 1024 + 1, 3 * 1024 * 1024 + 5])
async def test_put_get_delete(http, size):
    client, backend, _ = http
    data = os.urandom(size)
    r = await put(client, data)
    assert r.status == 201, await r.text()
    blob_id = (await r.json())["blob_id"]
    assert blob_id == hashlib.sha256(data).hexdigest()
    r = await client.get(f"/v1/rooms/r1/blobs/{blob_id}", headers={"X-Test-Member": "carol"})
    assert r.status == 200
    assert r.headers["Content-Length"] == str(size)
    assert r.headers["Content-Digest"].startswith("sha-256=:")
    assert await r.read() == data
    assert backend.stats()["blobs"] == 1
    r = await client.delete(f"/v1/rooms/r1/blobs/{blob_id}", headers={"X-Test-Member": "carol"})
    assert r.status == 403  # not the uploader
    r = await client.delete(f"/v1/rooms/r1/blobs/{blob_id}", headers={"X-Test-Member": "bob"})
    assert r.status == 204
    r = await client.get(f"/v1/rooms/r1/blobs/{blob_id}")
    assert r.status == 404
    assert backend.stats()["blobs"] == 0


async def test_refusals_store_nothing(http):
    client, backend, _ = http
    data = os.urandom(100_000)
    r = await put(client, data, sha=hashlib.sha256(b"other").hexdigest())
    assert r.status == 400
    r = await put(client, os.urandom(5 * 1024 * 1024 + 1))
    assert r.status == 413
    r = await put(client, data, who="dave")
    assert r.status == 403
    r = await client.put("/v1/rooms/r1/blobs", data=data)  # no digest covered
    assert r.status == 401
    # Bodies of several chunks, refused once some of them were stored (the object store streams
    # an upload into its stream as it arrives): at the end (digest) and in the middle (size).
    big = os.urandom(2 * 1024 * 1024 + 3)
    r = await put(client, big, sha=hashlib.sha256(b"other").hexdigest())
    assert r.status == 400

    async def over_the_limit():  # no Content-Length: the limit is found on the way
        for _ in range(6):
            yield os.urandom(1024 * 1024)

    r = await put(client, over_the_limit(), sha=hashlib.sha256(b"other").hexdigest())
    assert r.status == 413
    assert await _nothing_stored(backend)


async def _nothing_stored(backend) -> bool:
    """No blob in room r1, nothing staged on disk, no chunk in the object store."""
    return (backend.stats()["blobs"] == 0 and await backend.list_room("r1") == []
            and list((backend.root / ".tmp").iterdir()) == [] and await stored_chunks(backend) == {})


async def stored_chunks(backend) -> dict:
    """The object store's chunk subjects and their message counts (nothing for the fs backend)."""
    if backend.name != "objectstore":
        return {}
    info = await backend.js.stream_info(backend.stream, subjects_filter=f"$O.{backend.bucket}.C.>")
    return info.state.subjects or {}


async def test_an_upload_whose_client_goes_away_leaves_nothing(http):
    """A client that sends part of a blob and closes its connection: what was received (streamed
    into the object store's stream, or staged on disk) is thrown away."""
    import asyncio

    client, backend, _ = http
    data = os.urandom(5 * 1024 * 1024)  # the most this app takes
    head = (f"PUT /v1/rooms/r1/blobs HTTP/1.1\r\nHost: x\r\nX-Test-Member: bob\r\n"
            f"X-Test-Sha256: {hashlib.sha256(data).hexdigest()}\r\nContent-Length: {len(data)}\r\n\r\n")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head.encode() + data[:4 * 1024 * 1024 + 17])  # past the handler's first hand-off
    await writer.drain()
    for _ in range(200):  # until the first chunks are in (object store) or staged (fs)
        if await stored_chunks(backend) or any((backend.root / ".tmp").iterdir()):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the upload never started")
    writer.close()
    for _ in range(250):  # bounded: 5 s
        if not await stored_chunks(backend) and not any((backend.root / ".tmp").iterdir()):
            break
        await asyncio.sleep(0.02)
    assert await stored_chunks(backend) == {}
    assert list((backend.root / ".tmp").iterdir()) == []
    assert backend.stats()["blobs"] == 0


async def test_chunked_upload_and_room_deletion(http):
    client, backend, store = http
    pieces = [os.urandom(100_000) for _ in range(5)]

    async def gen():
        for p in pieces:
            yield p

    r = await put(client, gen(), sha=hashlib.sha256(b"".join(pieces)).hexdigest())
    assert r.status == 201
    await store.delete_room("r1")
    assert backend.stats()["blobs"] == 0 and await backend.list_room("r1") == []


def _record_commits(monkeypatch, backend, before=None, finished=None):
    """Wrap ``backend``'s uploads so that each commit appends its uploader to the returned list
    (after awaiting ``before()``, if given) before it makes the blob visible; ``finished()`` is
    called once an upload's body is in and hashed."""
    commits = []
    real_begin = backend.begin

    async def begin(room_id):
        upload = await real_begin(room_id)
        real_commit, real_finish = upload.commit, upload.finish

        async def commit(handle):
            commits.append(handle)
            if before is not None:
                await before()
            return await real_commit(handle)

        async def finish():
            digest = await real_finish()
            if finished is not None:
                finished()
            return digest

        upload.commit, upload.finish = commit, finish
        return upload

    monkeypatch.setattr(backend, "begin", begin)
    return commits


def _without(store, handle):
    room = store.rooms["r1"]
    store.rooms["r1"] = dataclasses.replace(room, members=tuple(m for m in room.members if m.handle != handle))


@pytest.mark.parametrize("gone", ["left", "deleted", "uploader deleted"])
async def test_an_upload_whose_uploader_left_or_whose_room_went_is_never_committed(http, monkeypatch, gone):
    """Adversary: a member removed from a room (or a room deleted, or the member deleted while the
    room's record still names it, as a cluster's does for a moment: a review had such an upload
    stored) while their upload streams in. The check before the commit refuses it, so the blob is
    never visible, not even for the moment until the check after the commit deletes it (a moment a
    stop of membershipd could make lasting)."""
    import asyncio

    client, backend, store = http
    commits = _record_commits(monkeypatch, backend)
    first, rest = os.urandom(300_000), os.urandom(300_000)
    sent_first, changed = asyncio.Event(), asyncio.Event()

    async def body():
        yield first
        sent_first.set()
        await asyncio.wait_for(changed.wait(), 10)
        yield rest

    async def change_meanwhile():
        await asyncio.wait_for(sent_first.wait(), 10)
        await asyncio.sleep(0.1)  # the first part is at the server
        if gone == "left":
            _without(store, "carol")
        elif gone == "uploader deleted":
            store.deleted.add("carol")
        else:
            await store.delete_room("r1")
        changed.set()

    r, _ = await asyncio.wait_for(asyncio.gather(put(client, body(), who="carol",
                                                     sha=hashlib.sha256(first + rest).hexdigest()),
                                                 change_meanwhile()), 30)
    assert commits == []
    assert r.status == (404 if gone == "deleted" else 403), await r.text()
    assert "nothing was stored" in (await r.json())["detail"]
    assert await _nothing_stored(backend)


async def test_an_uploader_removed_during_the_commit_itself_is_still_refused_and_the_blob_deleted(
        http, monkeypatch):
    """The check after the commit stays: a removal that lands between the first check and the
    commit's end is answered 403, and the blob the commit made visible is deleted again."""
    client, backend, store = http

    async def remove_carol():
        _without(store, "carol")

    commits = _record_commits(monkeypatch, backend, before=remove_carol)
    data = os.urandom(200_000)
    r = await put(client, data, who="carol")
    assert commits == ["carol"]
    assert r.status == 403, await r.text()
    assert await _nothing_stored(backend)


async def test_a_room_deleted_during_the_commit_itself_is_404_and_the_blob_goes_with_it(http, monkeypatch):
    client, backend, store = http

    async def delete_the_room():
        await store.delete_room("r1")

    commits = _record_commits(monkeypatch, backend, before=delete_the_room)
    r = await put(client, os.urandom(300_000), who="carol")
    assert commits == ["carol"]
    assert r.status == 404, await r.text()
    assert await _nothing_stored(backend)


async def test_a_member_removed_while_re_uploading_someone_else_s_blob_does_not_delete_it(http, monkeypatch):
    """Adversary: carol, about to be removed, uploads the bytes of bob's blob again; the check after
    the commit refuses her, and must not take bob's blob with her upload."""
    client, backend, store = http
    data = os.urandom(400_000)
    r = await put(client, data, who="bob")
    assert r.status == 201, await r.text()

    async def remove_carol():
        _without(store, "carol")

    commits = _record_commits(monkeypatch, backend, before=remove_carol)
    r = await put(client, data, who="carol")
    assert commits == ["carol"]
    assert r.status == 403, await r.text()
    blob_id = hashlib.sha256(data).hexdigest()
    assert [i.blob_id for i in await backend.list_room("r1")] == [blob_id]
    r = await client.get(f"/v1/rooms/r1/blobs/{blob_id}", headers={"X-Test-Member": "bob"})
    assert r.status == 200 and await r.read() == data
    assert list((backend.root / ".tmp").iterdir()) == []


async def test_a_store_that_cannot_answer_the_check_before_the_commit_is_503_and_nothing_is_left(
        http, monkeypatch):
    """The check before the commit reads the store; a store that cannot answer (a cluster's KV
    without a quorum) is 503 with Retry-After, never a 500, and the upload is thrown away."""
    from unibus.store.base import StoreUnavailable

    client, backend, store = http
    body_in = []
    commits = _record_commits(monkeypatch, backend, finished=lambda: body_in.append(True))
    real = store.room_handles

    async def room_handles(room_id):
        if body_in:
            raise StoreUnavailable("the membership store cannot answer now")
        return await real(room_id)

    monkeypatch.setattr(store, "room_handles", room_handles)
    r = await put(client, os.urandom(1_500_000), who="carol")
    assert body_in == [True] and commits == []
    assert r.status == 503, await r.text()
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert r.headers["Retry-After"] == "1"
    assert await _nothing_stored(backend)


@pytest.mark.parametrize("http", ["objectstore"], indirect=True)
async def test_a_blob_whose_chunks_vanished_is_cut_short(http):
    """If the chunks disappear under a reader, the response is cut short (its
    Content-Length is not met), never completed with wrong bytes."""
    client, backend, _ = http
    data = os.urandom(1024 * 1024)
    blob_id = (await (await put(client, data)).json())["blob_id"]
    nuid = backend._objects[f"r1/{blob_id}"][1]
    await backend.js.purge_stream(backend.stream, subject=f"$O.{backend.bucket}.C.{nuid}")
    r = await client.get(f"/v1/rooms/r1/blobs/{blob_id}")
    assert r.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.read()


@pytest.mark.parametrize("http", ["objectstore"], indirect=True)
async def test_a_blob_deleted_while_it_is_sent_is_cut_short_and_logs_no_error(http, caplog):
    """A blob deleted by its uploader while a download streams it: the download is cut short, as
    for chunks gone missing, but that is no fault of the node's: INFO, not ERROR (a red team saw
    one ERROR per download, which any uploader could cause)."""
    import asyncio
    import logging

    _, backend, _ = http
    server, _service = await serve_blob_routes(backend, 64 * 1024 * 1024)  # a blob larger than any socket buffers
    try:
        async with aiohttp.ClientSession(str(server.make_url(""))) as client:
            data = os.urandom(48 * 1024 * 1024)
            blob_id = (await (await put(client, data)).json())["blob_id"]
            caplog.set_level(logging.INFO, logger="unibus.plugins.blobstore")
            async with client.get(f"/v1/rooms/r1/blobs/{blob_id}") as r:
                assert r.status == 200
                await r.content.readexactly(64 * 1024)  # under way; the rest waits for the reader
                assert (await client.delete(f"/v1/rooms/r1/blobs/{blob_id}", headers={"X-Test-Member": "bob"})
                        ).status == 204
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(r.read(), 30)
    finally:
        await server.close()
    for _ in range(100):  # the handler logs once it sees the cut
        if any("deleted while it was being sent" in m for m in caplog.messages):
            break
        await asyncio.sleep(0.02)
    assert any("deleted while it was being sent" in m for m in caplog.messages), caplog.messages
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


@pytest.mark.parametrize("http", ["objectstore"], indirect=True)
async def test_reads_ahead_across_interleaved_chunks(http, monkeypatch):
    """A read keeps several chunk requests in flight, betting that an object's
    chunks follow each other in the stream. Two uploads committed at once
    interleave their chunks: every read must still give back exactly its bytes."""
    import asyncio

    from unibus.plugins.blobstore import objectstore

    client, backend, _ = http
    # one chunk read and in flight at a time: the puts take turns chunk by chunk
    monkeypatch.setattr(objectstore, "PUT_WINDOW", 1)
    datas = [os.urandom(objectstore.CHUNK_SIZE * 9 + 1234) for _ in range(3)]

    async def store(data: bytes) -> str:
        up = await backend.begin("r1")
        await up.write(data)
        await up.finish()
        info, created = await up.commit("bob")
        assert created
        return info.blob_id

    ids = await asyncio.gather(*(store(d) for d in datas))
    seqs = []
    for blob_id in ids:  # the test only proves something if the chunks did interleave
        nuid = backend._objects[f"r1/{blob_id}"][1]
        subject = f"$O.{backend.bucket}.C.{nuid}"
        first = await backend.js.get_msg(backend.stream, seq=1, subject=subject, next=True)
        last = await backend.js.get_msg(backend.stream, subject=subject)
        seqs.append((first.seq, last.seq))
    assert any(a[0] < b[1] and b[0] < a[1] for a in seqs for b in seqs if a != b), seqs
    for blob_id, data in zip(ids, datas, strict=True):
        r = await client.get(f"/v1/rooms/r1/blobs/{blob_id}")
        assert r.status == 200
        got = await r.read()
        assert len(got) == len(data) and got == data


async def test_a_download_whose_client_reads_nothing_is_cut_off(http):
    """A download holds chunks (object store) or a descriptor and a send queue (fs, sendfile)
    while its client does not read: a client that reads nothing for two body deadlines is
    disconnected, and what waited to be sent is dropped."""
    import asyncio
    import socket

    client, backend, _ = http
    data = os.urandom(16 * 1024 * 1024 + 7)  # more than loopback's socket buffers take in
    up = await backend.begin("r1")
    await up.write(data)
    blob_id = (await up.finish()).hex()
    await up.commit("bob")
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # the window shuts soon
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", client.port))
        await loop.sock_sendall(sock, (f"GET /v1/rooms/r1/blobs/{blob_id} HTTP/1.1\r\nHost: x\r\n"
                                       "X-Test-Member: carol\r\nX-Test-Body-Timeout: 0.5\r\n\r\n").encode())
        await asyncio.sleep(2.0)  # read nothing for four deadlines
        got = 0
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionResetError):  # dropped: reset, what waited discarded
                while chunk := await loop.sock_recv(sock, 1 << 20):
                    got += len(chunk)
        assert got < len(data), "the server waited for the stalled client and sent everything"
    finally:
        sock.close()


async def test_a_download_whose_client_only_trickles_is_cut_off(http):
    """A client that takes a little within every deadline (holding its read's chunks and
    read-ahead for as long as it likes) must, past its first deadline, average what an
    upload must (limits.MIN_RATE, 32 KiB/s), or it is disconnected."""
    import asyncio
    import socket
    import time

    client, backend, _ = http
    data = os.urandom(16 * 1024 * 1024 + 7)
    up = await backend.begin("r1")
    await up.write(data)
    blob_id = (await up.finish()).hex()
    await up.commit("bob")
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    got = 0
    closed = False
    try:
        await loop.sock_connect(sock, ("127.0.0.1", client.port))
        await loop.sock_sendall(sock, (f"GET /v1/rooms/r1/blobs/{blob_id} HTTP/1.1\r\nHost: x\r\n"
                                       "X-Test-Member: carol\r\nX-Test-Body-Timeout: 0.5\r\n\r\n").encode())
        await asyncio.sleep(0.3)  # the response's first part fills the socket buffers
        start = time.monotonic()
        while time.monotonic() - start < 15:  # a trickle: 1 KiB every 0.1 s, far under 32 KiB/s
            async with asyncio.timeout(5):
                try:
                    chunk = await loop.sock_recv(sock, 1024)
                except ConnectionResetError:
                    chunk = b""
            if not chunk:
                closed = True
                break
            got += len(chunk)
            await asyncio.sleep(0.1)
    finally:
        sock.close()
    assert closed, f"a client trickling {got} bytes over 15 s kept its download"
    assert got < len(data)
