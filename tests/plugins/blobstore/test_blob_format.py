"""The client-side blob encryption format ``unibus-blob-v1`` (unibus.client.blobs, docs/blobstore.md).

No server: round trips, every way of tampering that must fail, an independent
decoder written from docs/blobstore.md, a fixed test vector, and the signing
of a streamed body.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from unibus.client.blobs import (
    DIGEST_BLOCK,
    UPLOAD_BLOCK,
    CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    BlobDecryptor,
    BlobEncryptor,
    BlobFormatError,
    ciphertext_size,
    _encrypt_path,
    _sealed_blocks,
    decrypt_stream,
    encrypt_file,
    encrypt_stream,
    parse_header,
    sign_streamed_request,
)
from unibus.client.keys import generate_identity
from unibus.signing import check_request, sign_request, split_path_query, verify_request

KEY = bytes(range(32))
ROOM = "k3x9q2"
C = CHUNK_SIZE
REC = C + 16


def enc(data: bytes, room: str = ROOM, epoch: int = 1, key: bytes = KEY, **kw) -> bytes:
    out = io.BytesIO()
    ct = encrypt_stream(key, room, epoch, io.BytesIO(data), out, **kw)
    blob = out.getvalue()
    assert ct.size == len(blob) and ct.sha256 == hashlib.sha256(blob).digest()
    assert ct.blob_id == hashlib.sha256(blob).hexdigest()
    return blob


def dec(blob: bytes, room: str = ROOM, epoch: int | None = 1, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    n = decrypt_stream(key, room, epoch, io.BytesIO(blob), out)
    assert n == len(out.getvalue())
    return out.getvalue()


SIZES = [0, 1, 100, C - 1, C, C + 1, 2 * C, 3 * C + 7, 5 * C - 1]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_size(size):
    data = os.urandom(size)
    blob = enc(data)
    assert len(blob) == ciphertext_size(size)
    assert dec(blob) == data
    h = parse_header(blob)
    assert h.epoch == 1 and h.chunk_size == C and len(h.file_id) == 16
    records = max(1, -(-size // C))
    assert len(blob) == HEADER_SIZE + size + 16 * records


def test_two_encryptions_differ_and_both_decrypt():
    data = b"same plaintext" * 1000
    a, b = enc(data), enc(data)
    assert a != b  # random file id, so another key and another hash
    assert dec(a) == dec(b) == data


@pytest.mark.parametrize("feed", [1, 7, 4096, C + 16, 3 * C])
def test_incremental_feeding_in_any_piece_size(feed):
    data = os.urandom(3 * C + 123)
    e = BlobEncryptor(KEY, ROOM, 4)
    parts = [e.header]
    for i in range(0, len(data), feed):
        parts.append(e.update(data[i:i + feed]))
    parts.append(e.finish())
    blob = b"".join(parts)
    d = BlobDecryptor(ROOM)
    out = []
    for i in range(0, len(blob), feed):
        out.append(d.feed(blob[i:i + feed]))
        if d.needs_key:
            assert d.header.epoch == 4
            d.set_key(KEY)
            out.append(d.feed(b""))
    out.append(d.finish())
    assert b"".join(out) == data


def _records(blob: bytes) -> list[bytes]:
    body = blob[HEADER_SIZE:]
    return [body[i:i + REC] for i in range(0, len(body), REC)]


def _fails(blob: bytes, **kw) -> None:
    with pytest.raises(BlobFormatError):
        dec(blob, **kw)


@pytest.fixture
def blob4():
    """A blob of 4 records (3 full chunks and a short one) and its plaintext."""
    data = os.urandom(3 * C + 1000)
    return enc(data), data


def test_flipping_any_region_fails(blob4):
    blob, _ = blob4
    for pos in [0, 13, 14, 21, 22, 37, 38, 41,  # magic, epoch, file id, chunk size
                HEADER_SIZE, HEADER_SIZE + 5, HEADER_SIZE + C + 15,  # first record: data, tag
                HEADER_SIZE + REC + 100, len(blob) - 17, len(blob) - 1]:  # middle, last record, last tag byte
        tampered = bytearray(blob)
        tampered[pos] ^= 0x01
        _fails(bytes(tampered))


def test_truncation_fails(blob4):
    blob, _ = blob4
    recs = _records(blob)
    header = blob[:HEADER_SIZE]
    _fails(header + b"".join(recs[:3]))  # dropped the final record: record 2 is not marked final
    _fails(header + b"".join(recs[:1]))
    _fails(header)  # no record at all
    _fails(blob[:-1])  # mid-record
    _fails(blob[:HEADER_SIZE + 10])
    _fails(blob[:HEADER_SIZE - 1])  # not even a header
    _fails(b"")


def test_reordering_and_duplication_fail(blob4):
    blob, _ = blob4
    recs = _records(blob)
    header = blob[:HEADER_SIZE]
    _fails(header + recs[1] + recs[0] + recs[2] + recs[3])
    _fails(header + recs[0] + recs[0] + recs[2] + recs[3])
    _fails(header + recs[0] + recs[1] + recs[2] + recs[3] + recs[3])  # final record appended twice


def test_appending_fails(blob4):
    blob, _ = blob4
    _fails(blob + b"\x00")
    _fails(blob + _records(blob)[0])
    other = enc(b"x" * 10)
    _fails(blob + other[HEADER_SIZE:])


def test_other_room_epoch_or_key_fails():
    data = os.urandom(C + 5)
    blob = enc(data, room="rooma", epoch=3)
    assert dec(blob, room="rooma", epoch=3) == data
    _fails(blob, room="roomb", epoch=3)  # moved to another room
    _fails(blob, room="rooma", epoch=3, key=bytes(32))  # another key
    with pytest.raises(BlobFormatError, match="epoch"):
        dec(blob, room="rooma", epoch=2)  # the caller expected another epoch
    # relabelling the epoch in the header (keeping the right key) fails too
    relabelled = bytearray(blob)
    relabelled[14:22] = struct.pack(">Q", 4)
    _fails(bytes(relabelled), room="rooma", epoch=None)
    # swapping the whole header for that of another blob of the same room and key
    other = enc(data, room="rooma", epoch=3)
    _fails(other[:HEADER_SIZE] + blob[HEADER_SIZE:], room="rooma", epoch=None)


def test_not_a_blob():
    _fails(os.urandom(5000))
    with pytest.raises(BlobFormatError, match="magic"):
        parse_header(b"unibus-blob-v2" + bytes(28))
    with pytest.raises(BlobFormatError):
        parse_header(b"unibus-blob-v1" + bytes(8) + bytes(16) + struct.pack(">I", 10))  # chunk size too small


def test_bad_arguments():
    with pytest.raises(ValueError):
        enc(b"x", room="Bad.Room")
    with pytest.raises(ValueError):
        enc(b"x", key=b"short")
    with pytest.raises(ValueError):
        enc(b"x", epoch=-1)


# -- an independent decoder, written from docs/blobstore.md only ----------------


def reference_decrypt(room_key: bytes, room_id: str, blob: bytes) -> bytes:
    magic, epoch, file_id, chunk_size = struct.unpack(">14sQ16sI", blob[:42])
    assert magic == b"unibus-blob-v1"
    info = b"unibus/blob-key/v1|" + room_id.encode() + b"|" + str(epoch).encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=file_id, info=info).derive(room_key)
    aead = ChaCha20Poly1305(key)
    body = blob[42:]
    rec = chunk_size + 16
    starts = list(range(0, len(body), rec)) or [0]
    out = []
    for i, s in enumerate(starts):
        final = i == len(starts) - 1
        nonce = bytes(4) + i.to_bytes(8, "big")
        aad = blob[:42] + room_id.encode() + (b"\x01" if final else b"\x00")
        out.append(aead.decrypt(nonce, body[s:s + rec], aad))
    return b"".join(out)


@pytest.mark.parametrize("size", [0, 1, C, C + 1, 2 * C + 3])
def test_reference_decoder_agrees(size):
    data = os.urandom(size)
    assert reference_decrypt(KEY, ROOM, enc(data)) == data


def test_vector():
    """The worked example of docs/blobstore.md: fixed key and file id, plaintext "hello"."""
    blob = enc(b"hello", epoch=1, file_id=bytes(range(0x40, 0x50)))
    assert blob.hex() == (
        "756e696275732d626c6f622d7631"  # "unibus-blob-v1"
        "0000000000000001"  # epoch 1
        "404142434445464748494a4b4c4d4e4f"  # file id
        "00010000"  # chunk size 65536
        + VECTOR_RECORD
    )
    assert len(blob) == 42 + 5 + 16
    assert hashlib.sha256(blob).hexdigest() == VECTOR_SHA256


# Filled in from the implementation once and then frozen; docs/blobstore.md shows the same bytes.
VECTOR_RECORD = "8946e6c2ac" "4f63d66177883569cf384e0af0cbc98f"  # ciphertext (5) || tag (16)
VECTOR_SHA256 = "204c49e215e52bc21a5a0515f6533a3b339567acb10ca25965c3a2e2397db46b"


# -- signing a streamed body ---------------------------------------------------


def test_sign_streamed_request_equals_sign_request_for_the_same_body():
    me = generate_identity("alice")
    body = os.urandom(1000)
    target = "/v1/rooms/abc/blobs"
    a = sign_request("PUT", target, body, keyid="alice", private_key=me.sign_key, created=1_700_000_000,
                     nonce="n" * 32)
    b = sign_streamed_request("PUT", target, hashlib.sha256(body).digest(), keyid="alice",
                              private_key=me.sign_key, created=1_700_000_000, nonce="n" * 32)
    assert a == b


def test_sign_streamed_request_verifies_with_and_without_the_body():
    me = generate_identity("alice")
    body = os.urandom(3000)
    headers = sign_streamed_request("PUT", "/v1/rooms/abc/blobs", hashlib.sha256(body).digest(), keyid="alice",
                                    private_key=me.sign_key)
    headers["Content-Length"] = str(len(body))
    path, query = split_path_query("/v1/rooms/abc/blobs")
    v = verify_request("PUT", path, query, headers, body, resolve_key=lambda k: me.sign_key.public_key())
    assert v.content_sha256 == hashlib.sha256(body).digest()
    p = check_request("PUT", path, query, headers, None)  # streamed: digest checked later by the server
    assert p.content_sha256 == hashlib.sha256(body).digest()
    from unibus.signing import SignatureError

    with pytest.raises(SignatureError, match="Content-Digest does not match"):
        verify_request("PUT", path, query, headers, body + b"x", resolve_key=lambda k: me.sign_key.public_key())


BLOCK = DIGEST_BLOCK


@pytest.mark.parametrize("size", [0, 1, C, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 3 * BLOCK - 5,
                                  UPLOAD_BLOCK + C + 7])
def test_sealed_blocks_are_the_incremental_encryptors_bytes(size, tmp_path):
    """The fast path (whole blocks of records with encrypt_into, used by encrypt_stream,
    encrypt_file and put_blob's two passes) writes exactly what BlobEncryptor.update/finish
    write, at every block boundary: no new format, old readers read it."""
    data = os.urandom(size)
    file_id = bytes(range(16))
    e = BlobEncryptor(KEY, ROOM, 3, file_id=file_id)
    slow = e.header + e.update(data) + e.finish()
    assert enc(data, epoch=3, file_id=file_id) == slow
    src, dst = tmp_path / "p", tmp_path / "c"
    src.write_bytes(data)
    hashed = _encrypt_path(KEY, ROOM, 3, src, None, file_id=file_id)  # put_blob's first pass: no file
    assert (hashed.size, hashed.sha256) == (len(slow), hashlib.sha256(slow).digest())
    with open(src, "rb") as f:  # put_blob's upload pass: larger blocks, the same bytes
        sent = b"".join(bytes(b) for b in _sealed_blocks(BlobEncryptor(KEY, ROOM, 3, file_id=file_id), f, UPLOAD_BLOCK,
                                                         reuse=True))  # each block let go at once: buffers reused
    assert sent == slow
    with open(src, "rb") as f:  # every block held (views alive): no buffer may be written again
        held = list(_sealed_blocks(BlobEncryptor(KEY, ROOM, 3, file_id=file_id), f, BLOCK, reuse=True))
    assert b"".join(bytes(b) for b in held) == slow
    ct = encrypt_file(KEY, ROOM, 3, src, dst)  # a fresh file_id: other bytes, same size, decrypts
    assert ct.size == len(slow) == dst.stat().st_size and dec(dst.read_bytes(), epoch=3) == data
    assert dec(slow, epoch=3) == data


def test_buffer_pool_reuses_only_buffers_nobody_views():
    from unibus.client.blobs import _BufferPool

    pool = _BufferPool(1000, keep=2)
    a = pool.get()
    view = memoryview(a)
    b = pool.get()
    assert b is not a  # a is still viewed
    view.release()
    assert pool.get() is a and len(a) == 1000  # the check leaves the size alone
    with memoryview(a), memoryview(b):
        c = pool.get()
        assert all(c is not x for x in (a, b, *pool.bufs))  # a third, not kept (keep=2)


def test_seal_refuses_a_partial_block_that_is_not_final_and_mixing():
    e = BlobEncryptor(KEY, ROOM, 1)
    with pytest.raises(ValueError):
        e.seal(b"x" * (C + 1), False)
    e.seal(b"x" * C, False)
    e.seal(b"", True)
    with pytest.raises(ValueError):
        e.seal(b"", True)  # after the final block
    e2 = BlobEncryptor(KEY, ROOM, 1)
    e2.update(b"x" * 10)
    with pytest.raises(ValueError):
        e2.seal(b"", True)  # update() holds bytes back: the two paths do not mix


def test_feed_parts_in_any_grouping():
    data = os.urandom(3 * C + 11)
    blob = enc(data)
    pieces = [blob[i:i + 5000] for i in range(0, len(blob), 5000)]
    d = BlobDecryptor(ROOM, KEY)
    out = b"".join(bytes(d.feed_parts(pieces[i:i + 7])) for i in range(0, len(pieces), 7)) + d.finish()
    assert out == data


def _feed_pieces(blob: bytes, cuts: list[int], key: bytes | None = KEY) -> bytes:
    """get_blob's fast path: the blob in the given pieces through feed_view, then finish."""
    from unibus.client.blobs import BlobDecryptor

    d = BlobDecryptor(ROOM, key)
    out = bytearray()
    last = 0
    for cut in [*cuts, len(blob)]:
        out += d.feed_view([blob[last:cut]])  # the view is valid until the next call: copied at once
        last = cut
    return bytes(out + d.finish())


@pytest.mark.parametrize("seed", range(12))
def test_feed_view_any_cut_of_the_pieces_gives_the_plaintext(seed):
    """Records whole inside a piece are decrypted from it, records cut between pieces are
    carried over: every way of cutting the body gives the same plaintext."""
    import random

    rnd = random.Random(seed)
    data = os.urandom(rnd.choice([0, 1, C - 1, C, 3 * C + 17, 9 * C]))
    blob = enc(data)
    cuts = sorted(rnd.sample(range(1, len(blob)), min(len(blob) - 1, rnd.randint(0, 12)))) if len(blob) > 1 else []
    assert _feed_pieces(blob, cuts) == data
    assert _feed_pieces(blob, list(range(1, len(blob), C + TAG_SIZE))) == data  # cut on record bounds


def test_feed_view_with_the_key_set_after_the_header_and_several_parts_at_once():
    from unibus.client.blobs import BlobDecryptor

    data = os.urandom(5 * C + 3)
    blob = enc(data)
    d = BlobDecryptor(ROOM)
    assert len(d.feed_view([blob[:HEADER_SIZE + 2 * C]])) == 0 and d.needs_key  # held until the key
    d.set_key(KEY)
    first = bytes(d.feed_view([]))
    rest = bytes(d.feed_view([blob[HEADER_SIZE + 2 * C:HEADER_SIZE + 4 * C + 5], blob[HEADER_SIZE + 4 * C + 5:]]))
    assert first + rest + d.finish() == data


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_feed_view_refuses_a_tampered_record_inside_a_piece(where):
    data = os.urandom(6 * C + 100)
    blob = bytearray(enc(data))
    pos = {"first": HEADER_SIZE + 10, "middle": HEADER_SIZE + 3 * (C + TAG_SIZE) + 5, "last": len(blob) - 3}[where]
    blob[pos] ^= 0x40
    with pytest.raises(BlobFormatError):
        _feed_pieces(bytes(blob), [HEADER_SIZE, len(blob) // 2])


@pytest.mark.parametrize("cut", [1, TAG_SIZE, C + TAG_SIZE, 2 * (C + TAG_SIZE), 2 * (C + TAG_SIZE) + 1])
def test_feed_view_refuses_a_truncated_body(cut):
    """A body cut short (on a record boundary, or inside a record) never authenticates as complete."""
    blob = enc(os.urandom(3 * C + 50))
    with pytest.raises(BlobFormatError):
        _feed_pieces(blob[:len(blob) - cut], [HEADER_SIZE + 7, len(blob) // 3])
