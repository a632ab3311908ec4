"""The blob routes against a real daemon (docs/blobstore.md).

One daemon per module with ``--blob-max-bytes`` a little over 3 MiB; alice is
an admin, bob owns the rooms the tests make, carol is a member, dave is not.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os

import pytest
from unibus.client import ApiError
from unibus.client.blobs import get_raw_blob, put_raw_blob

from .conftest import BODY_TIMEOUT, MAX_BYTES, agen, raw_request


def digest_header(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


async def expect(status, coro):
    with pytest.raises(ApiError) as e:
        await coro
    assert e.value.status == status, e.value.problem
    return e.value.problem


@pytest.mark.parametrize("size", [0, 1, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 3 * 1024 * 1024])
async def test_round_trip_sizes(world, tmp_path, size):
    rid = await world.room()
    before = world.blobstore_health()
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    seen = []
    blob_id = await put_raw_blob(world.clients["carol"], rid, src, progress=lambda d, t: seen.append((d, t)))
    assert blob_id == hashlib.sha256(data).hexdigest()
    assert seen[-1] == (size, size) and all(t == size for _, t in seen)
    out = tmp_path / "out"
    got = []
    assert await get_raw_blob(world.clients["bob"], rid, blob_id, out, progress=lambda d, t: got.append((d, t))) == size
    assert out.read_bytes() == data
    assert got[-1] == (size, size)
    after = world.blobstore_health()
    assert after["blobs"] == before["blobs"] + 1 and after["bytes"] == before["bytes"] + size
    assert world.stored(rid) == [blob_id]
    assert world.staging() == []


async def test_downloads_leave_no_worker_threads_behind(world, tmp_path):
    """Each download hashes and writes in two threads of its own: they end with it, whether
    it succeeded or failed half-way (here: its progress callback raised)."""
    import asyncio
    import threading

    def lanes() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("unibus-blob")]

    class Stop(Exception):
        pass

    def stop_after_some(done: int, _total: int) -> None:
        if done >= 1024 * 1024:
            raise Stop

    rid = await world.room()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    blob_id = await put_raw_blob(world.clients["carol"], rid, src)
    for _ in range(3):
        await get_raw_blob(world.clients["bob"], rid, blob_id, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    with pytest.raises(Stop):
        await get_raw_blob(world.clients["bob"], rid, blob_id, tmp_path / "other", progress=stop_after_some)
    assert not (tmp_path / "other").exists()
    for _ in range(100):  # a thread ends once it has seen its executor shut down
        if not lanes():
            break
        await asyncio.sleep(0.05)
    assert lanes() == []


async def test_get_headers_and_ranges_ignored(world):
    rid = await world.room()
    data = os.urandom(100_000)
    status, doc, headers = await raw_request(world.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs",
                                             world.people["bob"], body=data)
    assert status == 201 and doc == {"blob_id": hashlib.sha256(data).hexdigest(), "size": 100_000}
    assert headers["Location"] == f"/v1/rooms/{rid}/blobs/{doc['blob_id']}"
    target = f"/v1/rooms/{rid}/blobs/{doc['blob_id']}"
    status, body, headers = await raw_request(world.server.base_url, "GET", target, world.people["carol"],
                                              sign="no-digest", headers={"Range": "bytes=0-9"})
    assert status == 200 and body == data  # the whole blob: the digest describes exactly it
    assert headers["Content-Length"] == "100000"
    assert headers["Content-Digest"] == digest_header(data)
    assert headers["Content-Type"] == "application/octet-stream"
    # upper-case hex names the same blob
    status, body, _ = await raw_request(world.server.base_url, "GET", target.upper().replace("/V1/ROOMS/", "/v1/rooms/")
                                        .replace(rid.upper(), rid).replace("/BLOBS/", "/blobs/"),
                                        world.people["carol"], sign="no-digest")
    assert status == 200 and body == data


async def test_wrong_digest_is_400_and_nothing_is_stored(world):
    rid = await world.room()
    before = world.blobstore_health()
    data = os.urandom(200_000)
    other = data[:-1] + bytes([data[-1] ^ 1])  # not + b"!": 1 in 256 random blobs ends with "!"
    status, doc, _ = await raw_request(world.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs",
                                       world.people["carol"], body=data, digest_of=other)
    assert status == 400, doc
    assert doc["type"].endswith("/digest-mismatch") and "nothing was stored" in doc["detail"]
    assert world.stored(rid) == [] and world.staging() == []
    assert world.blobstore_health() == before
    for blob in (data, other):
        await expect(404, world.clients["carol"].request("GET", f"/v1/rooms/{rid}/blobs/{hashlib.sha256(blob).hexdigest()}"))


async def test_unsigned_or_uncovered_digest_is_401(world):
    rid = await world.room()
    target = f"/v1/rooms/{rid}/blobs"
    data = b"some bytes"
    # a body whose signature covers no Content-Digest (even with the header present)
    status, doc, _ = await raw_request(world.server.base_url, "PUT", target, world.people["carol"], body=data,
                                       sign="no-digest", headers={"Content-Digest": digest_header(data)})
    assert status == 401, doc
    assert "content-digest" in doc["detail"]
    # an empty body without a digest: still a blob upload, still refused
    status, doc, _ = await raw_request(world.server.base_url, "PUT", target, world.people["carol"], body=b"",
                                       sign="no-digest")
    assert status == 401 and "Content-Digest" in doc["detail"]
    # chunked without a covered digest
    status, doc, _ = await raw_request(world.server.base_url, "PUT", target, world.people["carol"],
                                       body=agen([b"a", b"b"]), sign="no-digest")
    assert status == 401
    # not signed at all
    status, doc, _ = await raw_request(world.server.base_url, "PUT", target, None, body=data, sign="none")
    assert status == 401
    assert world.stored(rid) == [] and world.staging() == []


async def test_too_large_by_content_length_is_413(world, tmp_path):
    rid = await world.room()
    before = world.blobstore_health()
    big = tmp_path / "big"
    big.write_bytes(os.urandom(MAX_BYTES + 1))
    problem = await expect(413, put_raw_blob(world.clients["carol"], rid, big))
    assert problem["max_bytes"] == MAX_BYTES and str(MAX_BYTES) in problem["detail"]
    assert problem["detail"].startswith(f"the blob is {MAX_BYTES + 1} bytes")  # from Content-Length
    assert world.stored(rid) == [] and world.staging() == []
    assert world.blobstore_health() == before
    # exactly the limit is fine
    os.truncate(big, MAX_BYTES)
    blob_id = await put_raw_blob(world.clients["carol"], rid, big)
    assert world.stored(rid) == [blob_id]


async def test_too_large_while_streaming_chunked_is_413(world):
    rid = await world.room()
    before = world.blobstore_health()
    pieces = [os.urandom(256 * 1024) for _ in range(16)]  # 4 MiB, no Content-Length
    data = b"".join(pieces)
    status, doc, _ = await raw_request(world.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs",
                                       world.people["carol"], body=agen(pieces), digest_of=data)
    assert status == 413, doc
    assert doc["type"].endswith("/too-large")
    assert world.stored(rid) == [] and world.staging() == []
    assert world.blobstore_health() == before
    # chunked under the limit is accepted
    small = pieces[:3]
    status, doc, _ = await raw_request(world.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs",
                                       world.people["carol"], body=agen(small), digest_of=b"".join(small))
    assert status == 201 and doc["size"] == 3 * 256 * 1024


async def test_too_large_content_length_is_refused_before_the_body_is_read(world):
    """The 413 comes from the Content-Length alone: the client sends 1 MiB of a
    declared 4 MiB and then stalls, and still gets its answer."""
    rid = await world.room()
    stall = asyncio.Event()

    async def body():
        yield os.urandom(1024 * 1024)
        await stall.wait()  # never set: only the server's early answer ends this request

    declared = 4 * 1024 * 1024
    status, doc, _ = await asyncio.wait_for(
        raw_request(world.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs", world.people["carol"], body=body(),
                    digest_of=b"whatever", headers={"Content-Length": str(declared)}), 30)
    assert status == 413 and doc["detail"].startswith(f"the blob is {declared} bytes")
    assert world.stored(rid) == [] and world.staging() == []


async def test_stalled_upload_is_408_and_nothing_is_kept(world):
    """A member's upload that stops sending is ended after the body deadline, not held open."""
    rid = await world.room()
    before = world.blobstore_health()
    stall = asyncio.Event()

    async def body():
        yield os.urandom(100 * 1024)
        await stall.wait()  # never set

    status, doc, headers = await asyncio.wait_for(
        raw_request(world.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs", world.people["carol"], body=body(),
                    digest_of=b"whatever", headers={"Content-Length": str(1024 * 1024)}), 60)
    assert status == 408, doc
    assert doc["detail"] == f"the next part of the request body did not arrive within {BODY_TIMEOUT} s"
    assert headers["Connection"].lower() == "close"
    assert world.stored(rid) == [] and world.staging() == []
    assert world.blobstore_health() == before


def _raw_put(port: int, target: str, headers: dict[str, str]):
    """A socket that sent the head of a PUT, and its first response: (socket, status, rest)."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    lines = [f"PUT {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return sock, int(data.split(b" ", 2)[1]), data


async def test_expect_continue_refusals_come_before_the_body(world):
    from unibus.client.blobs import sign_streamed_request

    rid = await world.room()  # bob (owner), carol; dave is no member
    data = os.urandom(512 * 1024)
    target = f"/v1/rooms/{rid}/blobs"
    port = world.server.http_port

    def headers(who: str) -> dict[str, str]:
        h = sign_streamed_request("PUT", target, hashlib.sha256(data).digest(), keyid=who,
                                  private_key=world.people[who].sign_key)
        h.update({"Content-Length": str(len(data)), "Expect": "100-continue"})
        return h

    for who, want in (("dave", 403), ("carol", 100)):
        sock, status, head = await asyncio.to_thread(_raw_put, port, target, headers(who))
        try:
            assert status == want, head
            if who == "dave":
                assert b"Connection: close" in head
            else:
                sock.sendall(data)
                rest = head.split(b"\r\n\r\n", 1)[1]
                while b"\r\n\r\n" not in rest:
                    rest += sock.recv(65536)
                assert rest.startswith(b"HTTP/1.1 201"), rest
        finally:
            sock.close()
    assert world.stored(rid) == [hashlib.sha256(data).hexdigest()]


async def test_members_only(world, tmp_path):
    rid = await world.room()  # bob (owner), carol
    src = tmp_path / "x"
    src.write_bytes(b"members only")
    blob_id = await put_raw_blob(world.clients["carol"], rid, src)
    path = f"/v1/rooms/{rid}/blobs"
    await expect(403, put_raw_blob(world.clients["dave"], rid, src))
    await expect(403, world.clients["dave"].request("GET", f"{path}/{blob_id}"))
    await expect(403, world.clients["dave"].request("DELETE", f"{path}/{blob_id}"))
    # admins are not room members: they may delete, not read or write
    await expect(403, put_raw_blob(world.clients["alice"], rid, src))
    await expect(403, world.clients["alice"].request("GET", f"{path}/{blob_id}"))
    # a member removed from the room loses access
    await world.clients["bob"].remove_room_member(rid, "carol")
    await expect(403, world.clients["carol"].request("GET", f"{path}/{blob_id}"))
    # unknown room: 404, for anyone
    await expect(404, world.clients["carol"].request("GET", f"/v1/rooms/nosuchroom/blobs/{blob_id}"))
    await expect(404, put_raw_blob(world.clients["carol"], "nosuchroom", src))


async def test_blob_id_validation_and_404(world):
    """A blob_id that is not 64 hex characters names no blob: 404, as an unknown one."""
    rid = await world.room()
    c = world.clients["carol"]
    for bad in ["xyz", "0" * 63, "0" * 65, "g" * 64, "no-such-blob"]:
        problem = await expect(404, c.request("GET", f"/v1/rooms/{rid}/blobs/{bad}"))
        assert problem["detail"].startswith("no such blob: ") and "64 hex" in problem["detail"]
        await expect(404, world.clients["bob"].request("DELETE", f"/v1/rooms/{rid}/blobs/{bad}"))
    await expect(404, c.request("GET", f"/v1/rooms/{rid}/blobs/{'0' * 64}"))
    await expect(404, world.clients["bob"].request("DELETE", f"/v1/rooms/{rid}/blobs/{'0' * 64}"))
    await expect(405, c.request("POST", f"/v1/rooms/{rid}/blobs", json_body={}))


async def test_reupload_is_idempotent(world, tmp_path):
    rid = await world.room()
    src = tmp_path / "same"
    src.write_bytes(os.urandom(300_000))
    first = await put_raw_blob(world.clients["carol"], rid, src)
    health = world.blobstore_health()
    again = await put_raw_blob(world.clients["carol"], rid, src)
    by_bob = await put_raw_blob(world.clients["bob"], rid, src)
    assert first == again == by_bob
    assert world.blobstore_health() == health
    assert world.stored(rid) == [first] and world.staging() == []
    # the uploader stays carol: dave is not in the room, but bob re-uploading did not make it his
    meta = (world.blobs_dir / rid / first / "meta.json").read_text()
    assert '"uploader": "carol"' in meta


async def test_delete_rights(world, tmp_path):
    rid = await world.room(members=("carol", "dave"))
    c = world.clients
    ids = {}
    for name in ("a", "b", "c", "d"):
        p = tmp_path / name
        p.write_bytes(name.encode() * 1000)
        ids[name] = await put_raw_blob(c["carol"], rid, p)
    path = f"/v1/rooms/{rid}/blobs/"
    await expect(403, c["dave"].request("DELETE", path + ids["a"]))  # a member, not the uploader
    assert await c["carol"].request("DELETE", path + ids["a"]) is None  # the uploader
    await expect(404, c["carol"].request("GET", path + ids["a"]))
    assert await c["bob"].request("DELETE", path + ids["b"]) is None  # the owner
    assert await c["alice"].request("DELETE", path + ids["c"]) is None  # an admin, not even in the room
    # an uploader removed from the room may no longer delete
    await c["bob"].remove_room_member(rid, "carol")
    await expect(403, c["carol"].request("DELETE", path + ids["d"]))
    assert world.stored(rid) == [ids["d"]]
    await expect(404, c["bob"].request("DELETE", path + ids["a"]))


async def test_deleting_the_room_deletes_its_blobs(world, tmp_path):
    rid = await world.room()
    other = await world.room()
    before = world.blobstore_health()
    sizes = 0
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(10_000 + i))
        sizes += 10_000 + i
        await put_raw_blob(world.clients["carol"], rid, p)
    p = tmp_path / "other"
    p.write_bytes(b"survives")
    kept = await put_raw_blob(world.clients["carol"], other, p)
    assert world.blobstore_health()["blobs"] == before["blobs"] + 4
    await world.clients["bob"].delete_room(rid)
    assert not (world.blobs_dir / rid).exists()
    after = world.blobstore_health()
    assert after["blobs"] == before["blobs"] + 1 and after["bytes"] == before["bytes"] + len(b"survives")
    assert world.stored(other) == [kept] and world.staging() == []


async def test_healthz_and_openapi(world):
    health = world.blobstore_health()
    assert set(health) == {"backend", "blobs", "bytes"} and health["backend"] == "fs"
    status, doc, _ = await raw_request(world.server.base_url, "GET", "/openapi.json", None, sign="none")
    assert status == 200
    paths = doc["paths"]
    assert set(paths["/v1/rooms/{room_id}/blobs"]) == {"put"}
    assert set(paths["/v1/rooms/{room_id}/blobs/{blob_id}"]) == {"get", "delete"}
    put = paths["/v1/rooms/{room_id}/blobs"]["put"]
    assert {"201", "400", "401", "403", "404", "413"} <= set(put["responses"])
    assert "application/octet-stream" in put["requestBody"]["content"]


async def test_an_upload_does_not_outlive_the_uploaders_room_membership(world):
    """Adversary: a member about to be removed from a room, who starts a (slow) upload before the removal
    and finishes it after."""
    rid = await world.room()
    first = os.urandom(100 * 1024)
    rest = os.urandom(100 * 1024)
    removed = asyncio.Event()
    sent_first = asyncio.Event()

    async def body():
        yield first
        sent_first.set()
        await asyncio.wait_for(removed.wait(), 10)
        yield rest

    async def remove_meanwhile():
        await asyncio.wait_for(sent_first.wait(), 10)
        await asyncio.sleep(0.2)  # the first part is at the server
        await world.clients["bob"].remove_room_member(rid, "carol")
        removed.set()

    (status, doc, _), _ = await asyncio.wait_for(asyncio.gather(
        raw_request(world.server.base_url, "PUT", f"/v1/rooms/{rid}/blobs", world.people["carol"], body=body(),
                    digest_of=first + rest, headers={"Content-Length": str(len(first + rest))}),
        remove_meanwhile()), 30)
    assert status == 403, (status, doc)
    assert world.stored(rid) == []
