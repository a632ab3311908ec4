"""The blob backend contract, one suite for both backends.

``fs`` runs on a temporary directory; ``objectstore`` on a real nats-server
with JetStream (the ``nats_server`` fixture of unibus.testing), with its
staging directory in a temporary directory. Crash leftovers are simulated by
putting in place what a crash at each step would leave.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import json
import os
from pathlib import Path

import nats
import nats.js.api
import pytest
from unibus.plugins.blobstore.backend import (
    TMP_DIR,
    BlobBackend,
    BlobError,
    BlobInfo,
    BlobUnavailable,
    clean_staging,
    remove_tree,
)
from unibus.plugins.blobstore.fs import FsBackend
from unibus.plugins.blobstore.objectstore import ObjectStoreBackend

ROOM, OTHER = "room1", "room2"


class Env:
    """Makes backends of one kind on shared storage (a "restart" is a new backend)."""

    def __init__(self, kind: str, root: Path, js=None) -> None:
        self.kind, self.root, self.js = kind, root, js
        self.made: list[BlobBackend] = []

    async def backend(self, room_exists=None) -> BlobBackend:
        if self.kind == "fs":
            b: BlobBackend = FsBackend(self.root)
        else:
            b = ObjectStoreBackend(self.js, self.root, replicas=1)
        await b.start(room_exists)
        self.made.append(b)
        return b

    def staging(self) -> list[str]:
        tmp = self.root / TMP_DIR
        return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


@pytest.fixture(params=["fs", "objectstore"])
async def env(request, tmp_path):
    if request.param == "fs":
        e = Env("fs", tmp_path / "blobs")
        yield e
    else:
        server = request.getfixturevalue("nats_server")
        nc = await nats.connect(server.url)
        e = Env("objectstore", tmp_path / "blobs", nc.jetstream(timeout=5))
        try:
            yield e
        finally:
            for b in e.made:
                await b.close()
            await nc.close()
    for b in e.made:
        await b.close()


@pytest.fixture
async def js(nats_server):
    """A JetStream context on the test's nats-server, its connection closed at the end."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc.jetstream(timeout=5)
    finally:
        await nc.close()


async def put(backend: BlobBackend, data: bytes, room: str = ROOM, uploader: str = "alice", piece: int = 100_000):
    up = await backend.begin(room)
    for i in range(0, len(data), piece):
        await up.write(data[i:i + piece])
    digest = await up.finish()
    assert digest == hashlib.sha256(data).digest()
    assert up.size == len(data)
    return await up.commit(uploader)


async def read_all(backend: BlobBackend, room: str, blob_id: str) -> bytes:
    reader = await backend.open(room, blob_id)
    assert reader is not None
    async with reader:
        assert reader.info.blob_id == blob_id
        return b"".join([c async for c in reader.chunks()])


@pytest.mark.parametrize("size", [0, 1, 256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 1024 * 1024 + 3])
async def test_round_trip(env, size):
    b = await env.backend()
    assert b.stats() == {"backend": env.kind, "blobs": 0, "bytes": 0}
    data = os.urandom(size)
    info, created = await put(b, data)
    assert created
    assert info == BlobInfo(ROOM, hashlib.sha256(data).hexdigest(), size, "alice", info.created)
    assert await b.info(ROOM, info.blob_id) == info
    assert await read_all(b, ROOM, info.blob_id) == data
    assert [i.blob_id for i in await b.list_room(ROOM)] == [info.blob_id]
    assert b.stats() == {"backend": env.kind, "blobs": 1, "bytes": size}
    assert await b.info(OTHER, info.blob_id) is None  # rooms are separate
    assert env.staging() == []


async def test_idempotent_upload_keeps_the_first(env):
    b = await env.backend()
    data = os.urandom(50_000)
    first, created = await put(b, data, uploader="alice")
    assert created
    again, created = await put(b, data, uploader="bob")
    assert not created and again == first and again.uploader == "alice"
    assert b.stats()["blobs"] == 1 and b.stats()["bytes"] == 50_000
    assert env.staging() == []
    # the same bytes in another room are another blob
    other, created = await put(b, data, room=OTHER)
    assert created and other.room_id == OTHER
    assert b.stats()["blobs"] == 2


async def test_concurrent_identical_uploads_store_one(env):
    b = await env.backend()
    data = os.urandom(300_000)
    results = await asyncio.gather(*(put(b, data, uploader=f"u{i}") for i in range(4)))
    assert sum(created for _, created in results) == 1
    assert len({info.blob_id for info, _ in results}) == 1
    assert b.stats()["blobs"] == 1 and b.stats()["bytes"] == 300_000
    assert env.staging() == []
    assert await read_all(b, ROOM, results[0][0].blob_id) == data


async def test_abort_leaves_nothing(env):
    b = await env.backend()
    up = await b.begin(ROOM)
    await up.write(os.urandom(1000))
    await up.write(os.urandom(1000))
    await up.abort()
    await up.abort()  # idempotent
    assert b.stats()["blobs"] == 0 and await b.list_room(ROOM) == []
    assert env.staging() == []
    up = await b.begin(ROOM)
    await up.write(b"x")
    await up.finish()
    await up.abort()  # after finish, before commit
    assert await b.info(ROOM, hashlib.sha256(b"x").hexdigest()) is None
    assert env.staging() == []


async def test_delete(env):
    b = await env.backend()
    a, _ = await put(b, b"a" * 10)
    c, _ = await put(b, b"c" * 20)
    assert await b.delete(ROOM, a.blob_id) is True
    assert await b.delete(ROOM, a.blob_id) is False
    assert await b.info(ROOM, a.blob_id) is None and await b.open(ROOM, a.blob_id) is None
    assert b.stats()["blobs"] == 1 and b.stats()["bytes"] == 20
    assert await read_all(b, ROOM, c.blob_id) == b"c" * 20
    # deleted, then uploaded again: a fresh blob
    again, created = await put(b, b"a" * 10, uploader="carol")
    assert created and again.uploader == "carol"
    assert env.staging() == []


async def test_delete_room(env):
    b = await env.backend()
    for i in range(3):
        await put(b, f"blob {i}".encode())
    keep, _ = await put(b, b"elsewhere", room=OTHER)
    assert await b.delete_room(ROOM) == 3
    assert await b.list_room(ROOM) == []
    assert b.stats() == {"backend": env.kind, "blobs": 1, "bytes": len(b"elsewhere")}
    assert await b.info(OTHER, keep.blob_id) == keep
    assert await b.delete_room(ROOM) == 0
    assert await b.delete_room("neverexisted") == 0
    assert env.staging() == []


async def test_restart_recounts_and_drops_rooms_that_are_gone(env):
    b = await env.backend()
    x, _ = await put(b, os.urandom(1000))
    y, _ = await put(b, os.urandom(2000), room=OTHER)
    await b.close()

    b2 = await env.backend()
    assert b2.stats() == {"backend": env.kind, "blobs": 2, "bytes": 3000}
    assert await b2.info(ROOM, x.blob_id) == x
    await b2.close()

    async def room_exists(room_id: str) -> bool:
        return room_id == ROOM

    b3 = await env.backend(room_exists)
    assert b3.stats() == {"backend": env.kind, "blobs": 1, "bytes": 1000}
    assert await b3.info(OTHER, y.blob_id) is None
    assert await b3.info(ROOM, x.blob_id) == x


async def test_staging_leftovers_of_a_crash_are_removed_at_start(env):
    b = await env.backend()
    kept, _ = await put(b, b"kept")
    # a crash mid-upload, one after the metadata was written but before the rename,
    # and one mid-deletion: all of it lives in the staging directory only.
    tmp = env.root / TMP_DIR
    (tmp / "up-crashed").mkdir()
    (tmp / "up-crashed" / "data").write_bytes(os.urandom(5000))
    (tmp / "up-almost").mkdir()
    (tmp / "up-almost" / "data").write_bytes(b"almost")
    digest = hashlib.sha256(b"almost").hexdigest()
    (tmp / "up-almost" / "meta.json").write_text(json.dumps(
        BlobInfo(ROOM, digest, 6, "alice", 1.0).meta_json()))
    (tmp / "del-1234").mkdir()
    (tmp / "stray-file").write_bytes(b"x")
    await b.close()

    b2 = await env.backend()
    assert env.staging() == []
    assert b2.stats()["blobs"] == 1
    assert await b2.info(ROOM, digest) is None
    assert await read_all(b2, ROOM, kept.blob_id) == b"kept"


async def test_invalid_ids_are_refused(env):
    b = await env.backend()
    for bad_room in ["../etc", "Room", "", "a" * 41, ".tmp"]:
        with pytest.raises(ValueError):
            await b.begin(bad_room)
    for bad_blob in ["../x", "A" * 64, "0" * 63, "g" * 64]:
        with pytest.raises(ValueError):
            await b.info(ROOM, bad_blob)
        with pytest.raises(ValueError):
            await b.delete(ROOM, bad_blob)
    assert await b.open(ROOM, "0" * 64) is None


# -- backend-specific crash states ---------------------------------------------


async def test_fs_half_made_blob_directories_are_not_visible(tmp_path):
    """A blob directory missing a file, or whose metadata disagrees, is never served
    (this code never makes one; a damaged disk or a hand edit could)."""
    root = tmp_path / "blobs"
    b = FsBackend(root)
    await b.start()
    good, _ = await put(b, b"good")
    data = b"no metadata"
    bid = hashlib.sha256(data).hexdigest()
    (root / ROOM / bid).mkdir()
    (root / ROOM / bid / "data").write_bytes(data)
    meta_only = hashlib.sha256(b"meta only").hexdigest()
    (root / ROOM / meta_only).mkdir()
    (root / ROOM / meta_only / "meta.json").write_text(json.dumps(BlobInfo(ROOM, meta_only, 9, "a", 1.0).meta_json()))
    b2 = FsBackend(root)
    await b2.start()
    assert b2.stats()["blobs"] == 1
    assert await b2.info(ROOM, bid) is None and await b2.open(ROOM, bid) is None
    assert await b2.info(ROOM, meta_only) is None
    # uploading the real bytes replaces the damaged directory, and removes it at once
    _info, created = await put(b2, data)
    assert created and await read_all(b2, ROOM, bid) == data
    assert await b2.info(ROOM, good.blob_id) == good
    assert list((root / ".tmp").iterdir()) == []


async def test_fs_a_deletion_under_way_stops_with_the_backend(tmp_path):
    """A room's removal runs in a thread that no stop can cancel, and the interpreter's exit
    waits for it: once the backend is closed it stops between two blobs. What it leaves is
    out of the room already, and the next start removes it (docs/blobstore.md, "Deleting")."""
    root = tmp_path / "blobs"
    b = FsBackend(root)
    await b.start()
    for i in range(5):
        await put(b, f"blob {i}".encode())
    kept, _ = await put(b, b"elsewhere", room=OTHER)
    await b.close()  # the stop came first
    assert await b.delete_room(ROOM) == 5
    assert await b.list_room(ROOM) == [] and not (root / ROOM).exists()
    [trash] = (root / TMP_DIR).iterdir()  # the room, moved out of sight and not yet removed
    assert len(list(trash.iterdir())) == 5
    b2 = FsBackend(root)
    await b2.start()
    assert list((root / TMP_DIR).iterdir()) == []
    assert b2.stats() == {"backend": "fs", "blobs": 1, "bytes": len(b"elsewhere")}
    assert await b2.info(OTHER, kept.blob_id) == kept


def test_clean_staging_gives_up_once_stopped(tmp_path):
    """A stop during the start-up: the sweep of .tmp gives up, and the next start finishes it."""
    tmp = tmp_path / TMP_DIR
    for i in range(3):
        (tmp / f"del-{i}" / "blob").mkdir(parents=True)
    stop = threading.Event()
    stop.set()
    assert clean_staging(tmp, stop) == 0 and len(list(tmp.iterdir())) == 3
    assert clean_staging(tmp) == 3 and list(tmp.iterdir()) == []


def test_fs_remove_tree_never_follows_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "data").write_text("x")
    (tree / "a" / "link").symlink_to(outside)
    (tree / "file-link").symlink_to(outside / "precious")
    assert remove_tree(tree, threading.Event())
    assert not tree.exists() and (outside / "precious").read_text() == "keep"
    link = tmp_path / "del-link"  # a room directory that was a link, moved into .tmp
    link.symlink_to(outside)
    assert remove_tree(link, threading.Event())
    assert not link.is_symlink() and (outside / "precious").read_text() == "keep"
    (tree / "a").mkdir(parents=True)
    stopped = threading.Event()
    stopped.set()
    assert not remove_tree(tree, stopped) and (tree / "a").is_dir()


async def test_fs_layout_and_modes(tmp_path):
    root = tmp_path / "blobs"
    b = FsBackend(root)
    await b.start()
    info, _ = await put(b, b"secret-ish")
    blob_dir = root / ROOM / info.blob_id
    assert (blob_dir / "data").read_bytes() == b"secret-ish"
    meta = json.loads((blob_dir / "meta.json").read_text())
    assert meta == {"v": 1, "room_id": ROOM, "blob_id": info.blob_id, "size": 10, "uploader": "alice",
                    "created": info.created}
    for p in (root, root / TMP_DIR, root / ROOM, blob_dir):
        assert p.stat().st_mode & 0o777 == 0o700, p
    for p in (blob_dir / "data", blob_dir / "meta.json"):
        assert p.stat().st_mode & 0o777 == 0o600, p


async def test_objectstore_orphaned_chunks_are_purged_at_start(js, tmp_path, monkeypatch):
    from unibus.plugins.blobstore import objectstore

    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    kept, _ = await put(b, os.urandom(300_000))
    # a crash mid-put: chunks published, no metadata message
    await js.publish("$O.unibus_blobs.C.crashednuid", os.urandom(1000))
    await js.publish("$O.unibus_blobs.C.crashednuid", os.urandom(1000))
    await b.close()

    young = ObjectStoreBackend(js, tmp_path / "blobs")
    await young.start()  # too young to be sure: left alone (another node may be uploading)
    info = await js.stream_info("OBJ_unibus_blobs", subjects_filter="$O.unibus_blobs.C.>")
    assert "$O.unibus_blobs.C.crashednuid" in (info.state.subjects or {})
    await young.close()

    monkeypatch.setattr(objectstore, "ORPHAN_AGE", 0.0)
    b2 = ObjectStoreBackend(js, tmp_path / "blobs")
    await b2.start()
    info = await js.stream_info("OBJ_unibus_blobs", subjects_filter="$O.unibus_blobs.C.>")
    subjects = set(info.state.subjects or {})
    assert "$O.unibus_blobs.C.crashednuid" not in subjects
    assert len(subjects) == 1  # the kept blob's chunks
    assert b2.stats()["blobs"] == 1
    assert await read_all(b2, ROOM, kept.blob_id) is not None
    await b2.close()


async def _until(predicate, seconds: float = 10.0):
    """Poll ``predicate()`` (a coroutine function) until it is true, at most ``seconds``."""
    for _ in range(int(seconds / 0.05)):
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def _sweeping(js, tmp_path, monkeypatch, name: str):
    """A backend whose orphan sweep runs every 0.1 s and takes chunks 0.5 s old for orphans."""
    from unibus.plugins.blobstore import objectstore

    monkeypatch.setattr(objectstore, "SWEEP_EVERY", 0.1)
    monkeypatch.setattr(objectstore, "ORPHAN_AGE", 0.5)
    b = ObjectStoreBackend(js, tmp_path / name)
    await b.start()
    return b


async def test_objectstore_a_running_node_purges_chunks_that_became_orphans_while_it_ran(js, tmp_path,
                                                                                          monkeypatch):
    """Chunks whose purge failed, or whose upload's metadata never came, were purged only when a
    node started: a cluster that ran for months kept them all. A running node sweeps them too."""
    b = await _sweeping(js, tmp_path, monkeypatch, "blobs")
    try:
        kept, _ = await put(b, os.urandom(300_000))
        await js.publish("$O.unibus_blobs.C.lostnuid", os.urandom(1000))  # a failed purge's leftovers
        await asyncio.sleep(0.2)
        assert "$O.unibus_blobs.C.lostnuid" in await chunk_subjects(js)  # too young (stream time)
        await asyncio.sleep(0.5)
        await put(b, os.urandom(2000))  # the stream's clock moves on: the leftovers are old now

        async def swept():
            return "$O.unibus_blobs.C.lostnuid" not in await chunk_subjects(js)

        assert await _until(swept)
        assert len(await chunk_subjects(js)) == 2  # both blobs' chunks
        assert await read_all(b, ROOM, kept.blob_id) is not None
        assert b.stats()["blobs"] == 2
    finally:
        await b.close()
    assert b._sweeper is None


async def test_objectstore_the_sweep_keeps_the_chunks_of_an_object_its_own_view_missed(js, tmp_path, monkeypatch):
    """A running node's view of the metadata comes from its consumer, which can lag or stop. The
    sweep reads the metadata afresh before it purges: an object stored by another node that this
    node's view does not hold keeps its chunks (the reason an earlier sweep was taken out)."""
    b = await _sweeping(js, tmp_path, monkeypatch, "lagging")
    try:
        info, _ = await put(b, os.urandom(300_000))
        name = f"{ROOM}/{info.blob_id}"
        await b._sub.unsubscribe()  # this node's view stops here
        b._objects.pop(name)  # and never saw the object
        await js.publish("$O.unibus_blobs.C.lostnuid", os.urandom(1000))
        await asyncio.sleep(0.6)
        await js.publish("$O.unibus_blobs.C.youngnuid", os.urandom(1000))  # the stream's clock moves on

        async def swept():
            return "$O.unibus_blobs.C.lostnuid" not in await chunk_subjects(js)

        assert await _until(swept)  # the sweep ran, and took the real orphan
        await asyncio.sleep(0.3)  # and ran again
        subjects = await chunk_subjects(js)
        assert len(subjects) == 2 and "$O.unibus_blobs.C.youngnuid" in subjects  # the object's, and the young
    finally:
        await b.close()
    fresh = ObjectStoreBackend(js, tmp_path / "fresh")
    await fresh.start()
    try:
        assert await read_all(fresh, ROOM, info.blob_id) is not None
    finally:
        await fresh.close()


async def test_objectstore_the_sweep_purges_nothing_when_it_cannot_read_the_metadata_afresh(js, tmp_path,
                                                                                              monkeypatch):
    from unibus.plugins.blobstore.backend import BlobUnavailable

    b = await _sweeping(js, tmp_path, monkeypatch, "blind")
    calls = []

    async def unreadable(timeout=30.0):
        calls.append(timeout)
        raise BlobUnavailable("the object store is unavailable: timeout")

    monkeypatch.setattr(b, "_named_nuids", unreadable)
    try:
        await js.publish("$O.unibus_blobs.C.lostnuid", os.urandom(1000))
        await asyncio.sleep(0.6)
        await put(b, os.urandom(2000))

        async def tried():
            return len(calls) >= 2

        assert await _until(tried)
        assert "$O.unibus_blobs.C.lostnuid" in await chunk_subjects(js)
    finally:
        await b.close()


@pytest.mark.parametrize("paused", ["between two chunks", "before the commit", "in the metadata's send"])
async def test_objectstore_an_upload_that_paused_until_its_chunks_may_be_orphans_is_503_and_leaves_none(
        js, tmp_path, monkeypatch, paused):
    """Red team: a sweep aged an upload's chunks (its body had paused), read the metadata afresh,
    and the upload committed right after that read: 201, then the sweep purged its chunks. An
    upload now refuses to publish anything once its newest chunk is MAX_CHUNK_GAP old, under the
    age at which nodes take chunks for orphans, so its chunks never look old while it runs."""
    from unibus.plugins.blobstore import objectstore
    from unibus.plugins.blobstore.backend import BlobUnavailable

    monkeypatch.setattr(objectstore, "MAX_CHUNK_GAP", 0.3)
    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    try:
        data = os.urandom(3 * b.chunk_size() + 10)
        up = await b.begin(ROOM)
        await up.write(data[:2 * b.chunk_size() + 5])  # one chunk published, one kept back
        await first_chunks_stored(js)
        with pytest.raises(BlobUnavailable, match=r"no chunk of this upload was stored for 0\.3 s or more"):
            if paused == "between two chunks":
                await asyncio.sleep(0.4)
                await up.write(data[2 * b.chunk_size() + 5:])
                await up.finish()
            elif paused == "in the metadata's send":  # a stalled connection holds the send back
                real_publish = js.publish

                async def held_publish(subject, *args, **kwargs):
                    if ".M." in subject:
                        await asyncio.sleep(0.4)
                    return await real_publish(subject, *args, **kwargs)

                monkeypatch.setattr(js, "publish", held_publish)
                await up.write(data[2 * b.chunk_size() + 5:])
                await up.finish()
            else:
                await up.write(data[2 * b.chunk_size() + 5:])
                await up.finish()  # every chunk published
                await asyncio.sleep(0.4)  # the commit waited (a lock, a slow store)
            await up.commit("alice")
        await up.abort()
        assert await chunk_subjects(js) == {}
        assert await b.list_room(ROOM) == [] and b.stats()["blobs"] == 0
        monkeypatch.undo()  # the client's retry, without a pause
        again, created = await put(b, data)
        assert created and await read_all(b, ROOM, again.blob_id) == data
    finally:
        await b.close()


async def test_objectstore_names_of_metadata_whose_name_is_not_a_string_are_skipped(js, tmp_path):
    """The backup lists the objects by name (object_names): a metadata message whose JSON names
    a list or a number (someone with rights on the stream) is skipped, not a TypeError."""
    import base64

    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    try:
        info, _ = await put(b, os.urandom(3000))
        for i, name in enumerate((["x"], {"a": 1}, 5)):
            await js.publish(f"$O.unibus_blobs.M.{base64.urlsafe_b64encode(f'r1/odd{i}'.encode()).decode()}",
                             json.dumps({"name": name, "bucket": "unibus_blobs", "nuid": "n"}).encode())
        assert await b.object_names() == [f"{ROOM}/{info.blob_id}"]
    finally:
        await b.close()


async def test_objectstore_counts_what_other_nodes_store(js, tmp_path):
    """Two backends on one bucket (two nodes): each one's /healthz counters include the other's writes."""
    one = ObjectStoreBackend(js, tmp_path / "one")
    two = ObjectStoreBackend(js, tmp_path / "two")
    await one.start()
    await two.start()
    info, _ = await put(one, os.urandom(70_000))
    for _ in range(200):
        if two.stats()["blobs"] == 1:
            break
        await asyncio.sleep(0.02)
    assert two.stats() == {"backend": "objectstore", "blobs": 1, "bytes": 70_000}
    assert await read_all(two, ROOM, info.blob_id) is not None
    assert await two.delete(ROOM, info.blob_id)
    for _ in range(200):
        if one.stats()["blobs"] == 0:
            break
        await asyncio.sleep(0.02)
    assert one.stats()["blobs"] == 0
    await one.close()
    await two.close()


async def test_objectstore_put_is_what_nats_py_reads(js, tmp_path, monkeypatch):
    """The pipelined put writes the object store's own messages: nats-py's ObjectStore reads the
    object back (size, chunks, digest, bytes), across several read blocks and a short last chunk."""
    from unibus.plugins.blobstore import objectstore

    monkeypatch.setattr(objectstore, "PUT_READ", 3 * objectstore.CHUNK_SIZE)  # several blocks, small file
    monkeypatch.setattr(objectstore, "PUT_WINDOW", 2)  # the window is full most of the time
    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    data = os.urandom(10 * objectstore.CHUNK_SIZE + 12_345)
    info, created = await put(b, data)
    assert created
    obs = await js.object_store("unibus_blobs")
    got = await obs.get(f"{ROOM}/{info.blob_id}")
    assert got.data == data
    assert got.info.size == len(data) and got.info.chunks == 11
    assert json.loads(got.info.description)["uploader"] == "alice"
    assert await read_all(b, ROOM, info.blob_id) == data
    await b.close()


@pytest.mark.parametrize("written_with", [64 * 1024, 256 * 1024, 1000 * 1024])
async def test_objectstore_reads_objects_of_any_chunk_size(nats_server, tmp_path, monkeypatch, written_with):
    """Objects written with another chunk size read back whole: smaller chunks (0.12.0's
    earlier 256 KiB ones, or a server with a small max_payload) keep the read-ahead busier
    than it guessed, larger ones (another writer) make it ask past the object's last chunk."""
    from unibus.plugins.blobstore import objectstore

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        monkeypatch.setattr(objectstore, "CHUNK_SIZE", written_with)
        data = os.urandom(5 * written_with + 777)
        info, _ = await put(b, data)
        other, _ = await put(b, os.urandom(3 * written_with))  # chunks of another object follow in the stream
        monkeypatch.undo()
        got = await (await js.object_store("unibus_blobs")).get(f"{ROOM}/{info.blob_id}")
        assert got.info.chunks == 6
        assert await read_all(b, ROOM, info.blob_id) == data
        assert len(await read_all(b, ROOM, other.blob_id)) == 3 * written_with
        await b.close()
    finally:
        await nc.close()


@pytest.fixture
def small_payload_server(tmp_path):
    """A nats-server whose max_payload (64 KiB) is smaller than the object store's chunks."""
    from unibus.testing import NatsServer

    server = NatsServer(tmp_path / "nats-small", config_hook=lambda config: config.update(max_payload=64 * 1024))
    try:
        yield server
    finally:
        server.stop()


async def test_objectstore_chunks_fit_a_smaller_max_payload(small_payload_server, tmp_path):
    """A put on a server whose max_payload is under the chunk size writes chunks that fit it,
    instead of failing every upload over 64 KiB."""
    from unibus.plugins.blobstore import objectstore

    nc = await nats.connect(small_payload_server.url)
    js = nc.jetstream(timeout=5)
    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        chunk = b.chunk_size()
        assert nc.max_payload == 64 * 1024 and chunk == 64 * 1024 - 4096 < objectstore.CHUNK_SIZE
        data = os.urandom(4 * chunk + 5)
        info, created = await put(b, data)
        assert created
        got = await (await js.object_store("unibus_blobs")).get(f"{ROOM}/{info.blob_id}")
        assert got.data == data and got.info.chunks == 5
        assert await read_all(b, ROOM, info.blob_id) == data
        await b.close()
    finally:
        await nc.close()


def test_objectstore_chunks_always_fit_the_max_payload():
    from unibus.plugins.blobstore.objectstore import CHUNK_SIZE, chunk_for

    assert chunk_for(None) == chunk_for(0) == CHUNK_SIZE
    assert chunk_for(1024 * 1024) == CHUNK_SIZE  # nats-server's default
    for max_payload in (1, 2, 100, 4096, 4097, 8192, 64 * 1024, CHUNK_SIZE, CHUNK_SIZE + 4096, 8 * 1024 * 1024):
        chunk = chunk_for(max_payload)
        assert 1 <= chunk <= min(max_payload, CHUNK_SIZE), max_payload


async def test_objectstore_a_chunk_over_the_max_payload_is_503_not_500(small_payload_server, tmp_path, monkeypatch):
    """Chunks are sized from the server the connection is on; if the connection moved to one
    with a smaller max_payload mid-put, the put fails as unavailable (503, retried), and stores nothing."""
    from unibus.plugins.blobstore.backend import BlobUnavailable

    nc = await nats.connect(small_payload_server.url)
    js = nc.jetstream(timeout=5)
    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        monkeypatch.setattr(ObjectStoreBackend, "chunk_size", lambda self: 128 * 1024)  # sized for another server
        for _ in range(3):
            with pytest.raises(BlobUnavailable, match="max_payload"):
                await put(b, os.urandom(200_000))
        assert await b.list_room(ROOM) == []
        # nats-py's publish_async took a pending-ack slot (of 4,000) for each refused publish,
        # and kept it for good: a node refused every upload once enough were lost
        assert b.acks.pending == 0 and js.publish_async_pending() == 0
        await b.close()
    finally:
        await nc.close()


async def test_objectstore_a_full_stream_is_503_naming_it_and_keeps_nothing(nats_server, tmp_path):
    """A stream that refuses a chunk (here: full) is answered as such, not as a timeout of its
    acknowledgement (nats-py 2.16's reply handler lost the refusal), and nothing is stored."""
    from unibus.plugins.blobstore.backend import BlobUnavailable

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    try:
        await js.create_object_store("unibus_blobs", config=nats.js.api.ObjectStoreConfig(
            bucket="unibus_blobs", max_bytes=512 * 1024))
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        for _ in range(2):
            up = await b.begin(ROOM)
            with pytest.raises(BlobUnavailable, match="maximum bytes exceeded"):
                await up.write(os.urandom(3 * b.chunk_size()))
                await up.finish()
            await up.abort()  # as the upload handler does: the other chunks' answers are awaited
            assert b.acks.pending == 0
        assert await b.list_room(ROOM) == [] and not await chunk_subjects(js)
        data = os.urandom(1000)
        info, created = await put(b, data)  # what fits is stored
        assert created and await read_all(b, ROOM, info.blob_id) == data
        await b.close()
    finally:
        await nc.close()


async def test_objectstore_metadata_the_stream_refuses_leaves_no_chunks(nats_server, tmp_path):
    """The chunks fit, their metadata does not (the stream is full by its message count): the
    stream answered that it stored nothing, so the chunks are purged at once, not left to the
    sweep while the stream stays full (a review found them kept)."""
    from unibus.plugins.blobstore.backend import BlobUnavailable

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        config = (await js.stream_info(b.stream)).config
        config.max_msgs = 3
        await js.update_stream(config)
        up = await b.begin(ROOM)
        with pytest.raises(BlobUnavailable, match="maximum messages exceeded"):
            await up.write(os.urandom(3 * b.chunk_size()))
            await up.commit("alice")
        await up.abort()
        assert not await chunk_subjects(js) and await b.list_room(ROOM) == []
        await b.close()
    finally:
        await nc.close()


def test_objectstore_purges_a_commit_s_chunks_only_when_nothing_was_stored():
    """A 503 "store failed" for a write that failed on the leader of an R3 stream may leave the
    metadata on its followers: purging its chunks then would break a stored blob (a review).
    Only answers that say for certain that nothing was stored let the commit purge."""
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

    from unibus.plugins.blobstore.objectstore import _refused_before_storing

    assert _refused_before_storing(NoStreamResponseError())
    assert _refused_before_storing(APIError(code=400, err_code=10071, description="wrong last sequence: 5"))
    for limit in ("maximum messages exceeded", "maximum bytes exceeded", "maximum messages per subject exceeded"):
        assert _refused_before_storing(ServiceUnavailableError(code=503, err_code=10077, description=limit))
    assert not _refused_before_storing(ServiceUnavailableError(code=503, err_code=10077,
                                                               description="write failed: no space left on device"))
    assert not _refused_before_storing(ServiceUnavailableError(code=503, description="raft: not leader"))
    assert not _refused_before_storing(APIError(code=500, description="maximum messages exceeded"))
    assert not _refused_before_storing(NatsTimeoutError())


async def test_objectstore_closing_the_backend_fails_its_uploads_at_once(nats_server, tmp_path):
    """A backend closed under running uploads: each fails as unavailable (503) without waiting
    for acknowledgements no one listens to, and no publish subscribes again."""
    from unibus.plugins.blobstore.backend import BlobUnavailable

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=30)  # a wait for an acknowledgement would show as a hang
    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        ups = [await b.begin(ROOM) for _ in range(3)]
        for up in ups:
            await up.write(os.urandom(2 * b.chunk_size()))
        before = {sub.subject for sub in nc._subs.values()}
        acks = b.acks._prefix + "*"
        assert acks in before
        await b.close()
        for up in ups:
            with pytest.raises(BlobUnavailable):
                async with asyncio.timeout(10):
                    await up.write(os.urandom(b.chunk_size()))
                    await up.finish()
            await up.abort()
        after = {sub.subject for sub in nc._subs.values()}
        assert b.acks.pending == 0 and after < before and acks not in after
    finally:
        await nc.close()


async def test_objectstore_a_connection_closed_during_a_put_waits_for_nothing(nats_server, tmp_path):
    """The connection closes while an upload's chunks are published: the upload is unavailable
    (503), and no acknowledgement is awaited any more."""
    from unibus.plugins.blobstore.backend import BlobUnavailable

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=1)  # how long the abort waits for the answers that will not come
    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        up = await b.begin(ROOM)
        await up.write(os.urandom(3 * b.chunk_size()))  # two chunks published, one held back
        await nc.close()
        with pytest.raises(BlobUnavailable):
            await up.write(os.urandom(b.chunk_size()))
            await up.finish()
            await up.commit("alice")
        await up.abort()
        assert b.acks.pending == 0
        await b.close()
    finally:
        await nc.close()


async def chunk_subjects(js) -> dict:
    info = await js.stream_info("OBJ_unibus_blobs", subjects_filter="$O.unibus_blobs.C.>")
    return info.state.subjects or {}


async def first_chunks_stored(js) -> str:
    """The chunk subject of the one upload under way, once its first chunks are stored (a write
    returns once they are published, before their acknowledgement)."""
    for _ in range(250):  # bounded: 5 s
        subjects = await chunk_subjects(js)
        if subjects:
            assert len(subjects) == 1, subjects
            return next(iter(subjects))
        await asyncio.sleep(0.02)
    raise AssertionError("no chunk was stored")


async def test_objectstore_a_file_changed_while_it_is_copied_stores_nothing(js, tmp_path):
    """A restore or ``migrate-to-kv`` copies a blob's file into the object store and hashes it on
    the way: bytes that no longer hash to the blob id are refused, their chunks purged, no object
    visible."""
    from unibus.plugins.blobstore.backend import BlobError

    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    data = bytearray(os.urandom(2_600_000))
    blob_id = hashlib.sha256(data).hexdigest()
    data[2_000_000] ^= 1  # a bit flipped on the disk since the backup's checksum
    (tmp_path / "data").write_bytes(data)
    info = BlobInfo(ROOM, blob_id, len(data), "alice", 1.0)
    with pytest.raises(BlobError, match="changed while it was copied"):
        await b._put(info, tmp_path / "data")
    assert await b.info(ROOM, blob_id) is None
    assert b.stats()["blobs"] == 0
    assert not await chunk_subjects(js)  # the chunks were purged
    await b.close()


@pytest.mark.parametrize("when", ["after-writes", "after-finish"])
async def test_objectstore_an_aborted_upload_leaves_no_chunks(js, tmp_path, when):
    """An upload streams its chunks into the stream as they arrive (nothing staged on disk). One
    that is given up (its client went away, its digest did not match, 413) leaves neither an
    object nor chunks, and nothing in the staging directory."""
    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    up = await b.begin(ROOM)
    data = os.urandom(3 * b.chunk_size() + 5)
    await up.write([data[:1000], data[1000:2 * b.chunk_size()]])  # pieces across a chunk's boundary
    await up.write(data[2 * b.chunk_size():])
    await first_chunks_stored(js)  # streamed, not staged
    assert not any((tmp_path / "blobs").rglob("data"))
    if when == "after-finish":
        assert await up.finish() == hashlib.sha256(data).digest()
    await up.abort()
    await up.abort()  # idempotent
    assert not await chunk_subjects(js)
    assert await b.info(ROOM, hashlib.sha256(data).hexdigest()) is None
    assert b.stats()["blobs"] == 0
    await b.close()


async def test_objectstore_the_same_blob_uploaded_again_keeps_the_first_and_no_second_copy(js, tmp_path):
    """The second upload of a blob already stored streamed its chunks too: they are purged at its
    commit, which answers with the first upload's metadata."""
    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    data = os.urandom(2 * b.chunk_size() + 1)
    first, created = await put(b, data, uploader="alice")
    assert created
    again, created = await put(b, data, uploader="bob")
    assert not created and again == first
    subjects = await chunk_subjects(js)
    assert list(subjects) == [f"$O.unibus_blobs.C.{b._objects[f'{ROOM}/{first.blob_id}'][1]}"]
    assert subjects[next(iter(subjects))] == 3
    assert await read_all(b, ROOM, first.blob_id) == data
    await b.close()


@pytest.mark.parametrize("when", ["before-the-metadata", "with-the-metadata"])
async def test_objectstore_an_upload_whose_chunks_were_purged_under_it_stores_nothing(js, tmp_path, when):
    """An upload's chunks are orphans until its metadata is stored, and a node that starts purges
    orphans whose newest chunk is older than ORPHAN_AGE. A member whose body came fast and then
    paused (the upload rate is an average) could have its first chunks purged under it: the
    commit finds them gone, before its metadata is published or just after (a purge that
    listed the live objects first), and fails with 503's error; no broken object stays."""
    from unibus.plugins.blobstore.backend import BlobUnavailable

    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    up = await b.begin(ROOM)
    data = os.urandom(3 * b.chunk_size() + 5)
    await up.write(data[:2 * b.chunk_size()])
    subject = await first_chunks_stored(js)
    if when == "before-the-metadata":
        await js.purge_stream(b.stream, subject=subject)  # what the start-up purge does
    else:
        real = js.publish

        async def publish(subj, payload=b"", **kw):
            if ".M." in subj:  # the purge lands between the check and the metadata
                await js.purge_stream(b.stream, subject=subject)
            return await real(subj, payload, **kw)

        js.publish = publish
    await up.write(data[2 * b.chunk_size():])
    await up.finish()
    with pytest.raises(BlobUnavailable, match="purged during the upload"):
        await up.commit("alice")
    blob_id = hashlib.sha256(data).hexdigest()
    assert await b.info(ROOM, blob_id) is None
    assert await b.open(ROOM, blob_id) is None
    assert not await chunk_subjects(js)
    for _ in range(100):  # the counters follow the metadata subjects
        if b.stats()["blobs"] == 0:
            break
        await asyncio.sleep(0.02)
    assert b.stats()["blobs"] == 0
    await b.close()


async def test_objectstore_the_same_blob_committed_by_two_nodes_at_once_is_stored_once(js, tmp_path):
    """Two nodes (two backends on one bucket) commit the same blob at the same moment: their name
    locks are their own, so both find it absent. Only one metadata message is stored (it is
    published expecting the subject's last sequence it read); the other upload answers with the
    stored blob and purges its chunks. Before, both stored theirs, the second rolling up the
    first, whose chunks no object named any more (a red team leaked 18 copies in 20 rounds)."""
    one = ObjectStoreBackend(js, tmp_path / "one")
    two = ObjectStoreBackend(js, tmp_path / "two")
    await one.start()
    await two.start()
    for _ in range(5):
        data = os.urandom(2 * one.chunk_size() + 99)
        ups = [await b.begin(ROOM) for b in (one, two)]
        for up in ups:
            await up.write(data)
            await up.finish()
        results = await asyncio.gather(ups[0].commit("alice"), ups[1].commit("bob"))
        assert sorted(created for _info, created in results) == [False, True]
        assert results[0][0] == results[1][0]  # the loser answers with the winner's metadata
        assert len(await chunk_subjects(js)) == 1
        assert await read_all(one, ROOM, results[0][0].blob_id) == data
        assert await one.delete(ROOM, results[0][0].blob_id)
        assert not await chunk_subjects(js)
    await one.close()
    await two.close()


async def test_objectstore_metadata_lost_on_its_way_leaves_the_chunks_to_the_start_up_purge(nats_server, tmp_path,
                                                                                             monkeypatch):
    """The metadata's publish times out and nothing tells whether it was stored: the upload fails,
    and its chunks stay, for a stored metadata may name them (nats-py sends what it buffered once
    it reconnects, and nats-server may answer a later read first: a red team broke stored objects
    by purging here). Start-up purges them once no object names them."""
    from unibus.plugins.blobstore import objectstore

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    real = js.publish

    async def publish(subject, payload=b"", **kw):
        if ".M." in subject:  # lost before nats-server stored it
            raise nats.errors.TimeoutError()
        return await real(subject, payload, **kw)

    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        data = os.urandom(2 * b.chunk_size() + 5)
        js.publish = publish
        with pytest.raises(BlobUnavailable):
            await put(b, data)
        js.publish = real
        assert len(await chunk_subjects(js)) == 1
        assert await b.info(ROOM, hashlib.sha256(data).hexdigest()) is None
        await b.close()
        monkeypatch.setattr(objectstore, "ORPHAN_AGE", 0.0)
        again = ObjectStoreBackend(js, tmp_path / "blobs")  # a restart
        await again.start()
        assert not await chunk_subjects(js)
        await again.close()
    finally:
        js.publish = real
        await nc.close()


async def test_objectstore_an_upload_publishes_its_last_full_chunk_only_at_finish(js, tmp_path):
    """The newest full chunk is kept back until the next bytes or ``finish``: the last chunks go out
    right before the metadata, so an upload's newest chunk is fresh when it commits, however long
    its body paused, and a node starting then does not take its chunks for orphans."""
    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    up = await b.begin(ROOM)
    data = os.urandom(3 * b.chunk_size() + 10)
    await up.write(data[:3 * b.chunk_size()])  # three full chunks: two go out
    subject = await first_chunks_stored(js)
    for _ in range(100):
        if (await chunk_subjects(js)).get(subject) == 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert (await chunk_subjects(js))[subject] == 2
    await up.write(data[3 * b.chunk_size():])
    await up.finish()
    assert (await chunk_subjects(js))[subject] == 4  # the kept one and the short last one
    _info, created = await up.commit("alice")
    assert created and await read_all(b, ROOM, hashlib.sha256(data).hexdigest()) == data
    await b.close()


async def test_objectstore_a_caller_reusing_its_buffer_after_write_changes_nothing(js, tmp_path):
    """The chunk kept back and the hashing thread read a write's parts after it returned: a caller
    that writes one bytearray again and again gets exactly what it wrote stored."""
    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    buf = bytearray(b.chunk_size() + 100)
    written = []
    up = await b.begin(ROOM)
    for _ in range(4):
        buf[:] = os.urandom(len(buf))
        written.append(bytes(buf))
        await up.write([buf, memoryview(buf)[:50], memoryview(buf).toreadonly()])  # read-only, not immutable
        written.append(bytes(buf[:50]))
        written.append(bytes(buf))
    ro = bytearray(os.urandom(2 * b.chunk_size()))  # whole chunks out of a read-only view: one kept back
    await up.write(b"x" * (b.chunk_size() - len(b"".join(written)) % b.chunk_size()))  # carry emptied
    written.append(b"x" * (b.chunk_size() - len(b"".join(written)) % b.chunk_size()))
    await up.write(memoryview(ro).toreadonly())
    written.append(bytes(ro))
    ro[:] = bytes(len(ro))
    await up.write(b"tail")
    written.append(b"tail")
    data = b"".join(written)
    assert await up.finish() == hashlib.sha256(data).digest()
    info, created = await up.commit("alice")
    assert created and await read_all(b, ROOM, info.blob_id) == data
    await b.close()


async def test_objectstore_the_chunk_kept_back_does_not_keep_a_large_part_alive(js, tmp_path):
    """The chunk kept back out of a large part (a Python caller's 16 MiB buffer) is a copy, not a
    view that keeps the whole part in memory until the next write (a red team: 64 MiB for one
    chunk); out of the HTTP handler's 4 MiB hand-offs it stays a view (no copy)."""
    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    up = await b.begin(ROOM)
    await up.write(os.urandom(4 * 1024 * 1024))
    assert isinstance(up._chunks._held, memoryview) and len(up._chunks._held) == b.chunk_size()
    await up.write(os.urandom(16 * 1024 * 1024))
    held = up._chunks._held
    assert isinstance(held, bytes) and len(held) == b.chunk_size()
    await up.abort()
    await b.close()


async def test_objectstore_a_blob_another_node_stored_meanwhile_is_not_replaced(js, tmp_path):
    """Node B looked for the blob (absent) just before node A stored it, and commits after: the
    metadata it reads next is A's, live, so B's upload lost the race. It answers with A's blob and
    purges its own chunks; A's chunks and uploader stay (a red team saw B replace A's object and
    purge its chunks under a download, 7 rounds of 40)."""
    a = ObjectStoreBackend(js, tmp_path / "a")
    b = ObjectStoreBackend(js, tmp_path / "b")
    await a.start()
    await b.start()
    data = os.urandom(2 * a.chunk_size() + 7)
    up = await b.begin(ROOM)
    await up.write(data)
    await up.finish()
    real_look = b._look
    looked = []

    async def look_before_a_stored(room_id, blob_id):  # B's look, then A's upload lands
        seen = await real_look(room_id, blob_id)
        looked.append(seen)
        await put(a, data, uploader="alice")
        return seen

    b._look = look_before_a_stored
    stored, created = await up.commit("bob")
    assert looked and looked[0][0] is None and not created  # B found it absent, then lost the race
    assert stored.uploader == "alice"
    assert len(await chunk_subjects(js)) == 1
    assert (await b.info(ROOM, stored.blob_id)).uploader == "alice"
    assert await read_all(a, ROOM, stored.blob_id) == data
    await a.close()
    await b.close()


async def test_objectstore_a_name_whose_metadata_is_not_json_is_no_blob_and_can_be_stored_again(js, tmp_path):
    """A message on a blob's metadata subject that is not JSON (someone with rights on the stream):
    the blob is absent (no 500 on GET, DELETE or PUT), and an upload of it stores it again."""
    import base64

    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    data = os.urandom(5000)
    blob_id = hashlib.sha256(data).hexdigest()
    name = f"{ROOM}/{blob_id}".encode()
    await js.publish(f"$O.unibus_blobs.M.{base64.urlsafe_b64encode(name).decode()}", b"not json {")
    assert await b.info(ROOM, blob_id) is None
    assert await b.open(ROOM, blob_id) is None
    assert await b.delete(ROOM, blob_id) is False
    _info, created = await put(b, data)
    assert created and await read_all(b, ROOM, blob_id) == data
    await b.close()


async def test_objectstore_an_object_missing_chunks_is_replaced_by_an_upload_of_it(nats_server, tmp_path):
    """An object whose metadata is stored but whose chunks are not all there (a purge by an older
    version, a damaged stream): an upload of the same blob stores it whole again, instead of
    answering "already stored" with the broken object for ever (a red team)."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        data = os.urandom(2 * b.chunk_size() + 3)
        info, _ = await put(b, data)
        broken = b._objects[f"{ROOM}/{info.blob_id}"][1]
        await js.purge_stream(b.stream, subject=f"$O.unibus_blobs.C.{broken}")
        again, created = await put(b, data, uploader="bob")
        assert created and again.uploader == "bob"
        assert await read_all(b, ROOM, info.blob_id) == data
        assert len(await chunk_subjects(js)) == 1
        await b.close()
    finally:
        await nc.close()


@pytest.mark.parametrize("field", [{"description": 7}, {"size": "big"}, {"digest": 5}, {"options": "x"},
                                   {"chunks": 0}, {"chunks": None}, {"nuid": ">"}, {"nuid": ""}, {"nuid": "a b"}])
async def test_objectstore_metadata_of_the_wrong_types_is_no_blob(js, tmp_path, field):
    """Foreign metadata that is JSON but whose fields have the wrong types: the blob is absent (no
    500 on GET, DELETE or PUT), and an upload of it stores it again."""
    import base64

    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    data = os.urandom(4000)
    blob_id = hashlib.sha256(data).hexdigest()
    name = f"{ROOM}/{blob_id}"
    meta = {"name": name, "bucket": "unibus_blobs", "nuid": "x", "size": 4000, "chunks": 1,
            "digest": "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(blob_id)).decode(),
            "description": json.dumps({"uploader": "eve", "created": 1.0})} | field
    await js.publish(f"$O.unibus_blobs.M.{base64.urlsafe_b64encode(name.encode()).decode()}",
                     json.dumps(meta).encode())
    assert await b.info(ROOM, blob_id) is None
    assert await b.open(ROOM, blob_id) is None
    assert await b.delete(ROOM, blob_id) in (True, False)
    _info, created = await put(b, data)
    assert created and await read_all(b, ROOM, blob_id) == data
    await b.close()


async def test_objectstore_metadata_naming_another_object_is_ignored(js, tmp_path, monkeypatch):
    """A metadata message on one name's subject whose JSON names another, live object as deleted
    (someone with rights on the stream): ignored, so start-up does not take that object's chunks
    for orphans (a red team broke a live object this way)."""
    import base64

    from unibus.plugins.blobstore import objectstore

    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    data = os.urandom(3000)
    info, _ = await put(b, data)
    victim = f"{ROOM}/{info.blob_id}"
    await js.publish(f"$O.unibus_blobs.M.{base64.urlsafe_b64encode(b'r1/other').decode()}",
                     json.dumps({"name": victim, "bucket": "unibus_blobs", "nuid": "", "deleted": True}).encode())
    await b.close()
    monkeypatch.setattr(objectstore, "ORPHAN_AGE", 0.0)
    again = ObjectStoreBackend(js, tmp_path / "blobs")
    await again.start()
    assert again.stats()["blobs"] == 1
    assert await read_all(again, ROOM, info.blob_id) == data
    await again.close()


async def test_objectstore_start_up_purges_orphans_when_the_newest_message_was_purged(js, tmp_path,
                                                                                    monkeypatch):
    """"Now" for the orphans' age is the newest message that still exists: the stream's last
    sequence is often gone (an aborted upload purges its chunks, the newest messages), and start-up
    then purged nothing (a red team)."""
    from unibus.plugins.blobstore import objectstore

    b = ObjectStoreBackend(js, tmp_path / "blobs")
    await b.start()
    await js.publish("$O.unibus_blobs.C.crashednuid", os.urandom(1000))
    await put(b, os.urandom(2000))
    up = await b.begin(ROOM)
    await up.write(os.urandom(3 * b.chunk_size()))
    await up.finish()
    await up.abort()  # purges its chunks: the stream's last sequence is gone
    await b.close()
    monkeypatch.setattr(objectstore, "ORPHAN_AGE", 0.0)
    again = ObjectStoreBackend(js, tmp_path / "blobs")
    await again.start()
    assert "$O.unibus_blobs.C.crashednuid" not in await chunk_subjects(js)
    assert again.stats()["blobs"] == 1
    await again.close()


async def test_objectstore_start_up_ages_orphans_by_the_stream_s_clock(js, tmp_path, monkeypatch):
    """A node whose clock runs 700 s ahead starts while an upload streams in on another node: the
    upload's young chunks are not taken for orphans (ages are the stream's own time)."""
    from datetime import UTC, datetime, timedelta

    from unibus.plugins.blobstore import objectstore

    class Ahead(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz or UTC) + timedelta(seconds=700)

    other = ObjectStoreBackend(js, tmp_path / "other")
    await other.start()
    up = await other.begin(ROOM)
    data = os.urandom(2 * other.chunk_size() + 1)
    await up.write(data)
    await first_chunks_stored(js)
    monkeypatch.setattr(objectstore, "datetime", Ahead)
    skewed = ObjectStoreBackend(js, tmp_path / "skewed")
    await skewed.start()
    monkeypatch.undo()
    await up.finish()
    _info, created = await up.commit("alice")
    assert created and await read_all(skewed, ROOM, hashlib.sha256(data).hexdigest()) == data
    await skewed.close()
    await other.close()


async def test_objectstore_an_abort_during_a_write_leaves_no_chunks(nats_server, tmp_path, monkeypatch):
    """``abort`` from another task while ``write`` still publishes (the contract allows it "at any
    point"): the write stops at its next chunk, and what it published is purged."""
    from unibus.plugins.blobstore import objectstore

    monkeypatch.setattr(objectstore, "PUT_WINDOW", 1)  # one chunk at a time: the write takes a while
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        up = await b.begin(ROOM)
        writing = asyncio.ensure_future(up.write(os.urandom(12 * b.chunk_size())))
        await first_chunks_stored(js)
        await up.abort()
        with pytest.raises(BlobError, match="given up"):
            await asyncio.wait_for(writing, 30)
        assert not await chunk_subjects(js)
        await b.close()
    finally:
        await nc.close()


@pytest.mark.parametrize("error", ["OutboundBufferLimitError", "NoStreamResponseError", "ServiceUnavailableError",
                                   "APIError"])
def test_objectstore_jetstream_trouble_during_a_put_is_unavailable_not_a_crash(error):
    """What nats-py raises while its connection reconnects (it refuses more than 2 MiB of pending
    data, and a chunk is 1 MiB), while a stream's leader changes, or when the stream refuses a
    message: the backend's BlobUnavailable, a 503 that the client retries. Before, these were
    500s with a traceback (found by a red team against a real reconnect and leader stepdowns)."""
    import nats.errors
    import nats.js.errors
    from unibus.plugins.blobstore.objectstore import _nats_errors

    cls = getattr(nats.errors, error, None) or getattr(nats.js.errors, error)
    with pytest.raises(BlobUnavailable):
        with _nats_errors("an upload"):
            raise cls()


async def test_objectstore_a_lost_metadata_ack_leaves_the_blob_whole_not_broken(nats_server, tmp_path):
    """The metadata is stored but its acknowledgement never arrives: the put fails, and after a
    restart the blob reads back whole (its chunks were kept), or a retry finds it."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    real = js.publish

    async def publish(subject, payload=b"", **kw):
        ack = await real(subject, payload, **kw)
        if ".M." in subject:  # stored, then the acknowledgement is "lost"
            raise nats.errors.TimeoutError()
        return ack

    try:
        b = ObjectStoreBackend(js, tmp_path / "blobs")
        await b.start()
        data = os.urandom(600_000)
        js.publish = publish
        with pytest.raises(Exception):  # noqa: B017 - the backend's unavailable error, whatever its class
            await put(b, data)
        js.publish = real
        await b.close()
        again = ObjectStoreBackend(js, tmp_path / "blobs")  # a restart
        await again.start()
        blob_id = hashlib.sha256(data).hexdigest()
        assert await read_all(again, ROOM, blob_id) == data
        _info, created = await put(again, data)
        assert created is False and await read_all(again, ROOM, blob_id) == data
        await again.close()
    finally:
        js.publish = real
        await nc.close()
