"""A compromised server against ``put_blob``'s two passes: no two records under one nonce.

``put_blob`` seals a file twice with one file key (the first pass only to hash
what the second sends), and seals it again for every attempt a 503 asks for.
A server that reads a whole body, answers 503 ``nonce-store-unavailable`` and
reads the next attempt would get the same key and nonces over other plaintext
if the file changed in between: two ciphertexts whose XOR is the XOR of the
plaintexts (ChaCha20 and AES-CTR are stream ciphers), and for AES-GCM enough
to forge tags under that key. The client compares every record's tag with
the first pass's before it sends a block (``unibus.client.blobs._SameRecords``),
so the server only ever sees records the first pass sealed.

Uses attackkit's module world (a real membershipd with a real nats-server and
SQLite) and its real aiohttp :class:`Proxy` as the compromised server.
"""

from __future__ import annotations

import os

import pytest
from attackkit import new_room

from unibus.client.blobs import CHUNK_SIZE, HEADER_SIZE, TAG_SIZE, put_blob

REC = CHUNK_SIZE + TAG_SIZE


def _records(body: bytes) -> list[bytes]:
    return [body[i:i + REC] for i in range(HEADER_SIZE, len(body), REC)]


def _no_nonce_sealed_twice(bodies: list[bytes]) -> None:
    """Every record position the server saw more than once holds the same record each time
    (a record cut short by an aborted body is compared on the bytes it has)."""
    first: dict[int, bytes] = {}
    for body in bodies:
        assert body[:HEADER_SIZE] == bodies[0][:HEADER_SIZE]  # one file key, one version
        for i, rec in enumerate(_records(body)):
            seen = first.setdefault(i, rec)
            n = min(len(seen), len(rec))
            assert seen[:n] == rec[:n], f"record {i} was sent with other content under the same nonce"


@pytest.mark.parametrize("size, where", [
    (3 * CHUNK_SIZE + 100, CHUNK_SIZE + 10),  # an upload with Expect: 100-continue; a record inside
    (40_000, 100),  # a small one (the body goes with the headers); its only record
    (3 * CHUNK_SIZE + 100, 3 * CHUNK_SIZE + 90),  # the short last record
], ids=["record-1", "small", "last"])
async def test_a_503_after_the_body_gets_no_other_records_under_the_same_nonces(world, proxy, tmp_path, size,
                                                                                 where):
    rid = await new_room(world, "bob")
    src = tmp_path / "plain"
    src.write_bytes(os.urandom(size))
    bodies: list[bytes] = []

    def answer(request, body):
        if request.method != "PUT" or not request.path.endswith("/blobs"):
            return None
        bodies.append(body)
        if len(bodies) == 1:  # the file changes in place between the attempts
            with open(src, "r+b") as f:
                f.seek(where)
                f.write(b"changed!")
        return 503, {"type": "https://unibus.invalid/problems/nonce-store-unavailable",
                     "title": "Service Unavailable", "status": 503}

    proxy.answer = answer
    async with world.sdk("bob", server=proxy.url) as c:
        with pytest.raises(OSError, match="changed while it was being uploaded; nothing was stored"):
            await put_blob(c, rid, src)
    assert len(bodies[0]) == HEADER_SIZE + size + TAG_SIZE * len(_records(bodies[0]))  # the whole first body
    _no_nonce_sealed_twice(bodies)


async def test_a_503_after_the_body_of_an_unchanged_file_is_retried_with_the_same_bytes(world, proxy, tmp_path):
    """The control: an unchanged file is sent again byte for byte, and stored once the server lets it."""
    rid = await new_room(world, "bob")
    src = tmp_path / "plain"
    src.write_bytes(os.urandom(2 * CHUNK_SIZE + 5))
    bodies: list[bytes] = []

    def answer(request, body):
        if request.method == "PUT" and request.path.endswith("/blobs") and not bodies:
            bodies.append(body)
            return 503, {"type": "https://unibus.invalid/problems/nonce-store-unavailable",
                         "title": "Service Unavailable", "status": 503}
        return None

    proxy.answer = answer
    async with world.sdk("bob", server=proxy.url) as c:
        blob_id = await put_blob(c, rid, src)
    import hashlib

    assert hashlib.sha256(bodies[0]).hexdigest() == blob_id  # the stored blob is the first attempt's bytes
