"""The client-side blob encryption formats ``unibus-blob-v1`` and ``-v2`` (unibus.client.blobs,
docs/blobstore.md).

No server: round trips, every way of tampering that must fail (in both
versions, and from one version to the other), an independent decoder written
from docs/blobstore.md, a fixed test vector of each version, and the signing
of a streamed body.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import struct
import types

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from unibus.client.blobs import (
    DIGEST_BLOCK,
    UPLOAD_BLOCK,
    CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    WRITE_VERSION,
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


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def version(request):
    """Every format version a reader takes: what holds for one holds for the other."""
    return request.param


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_size(size, version):
    data = os.urandom(size)
    blob = enc(data, version=version)
    assert len(blob) == ciphertext_size(size)
    assert dec(blob) == data
    h = parse_header(blob)
    assert h.epoch == 1 and h.chunk_size == C and len(h.file_id) == 16 and h.version == version
    assert blob.startswith(b"unibus-blob-v%d" % version)
    records = max(1, -(-size // C))
    assert len(blob) == HEADER_SIZE + size + 16 * records


def test_writers_use_version_2_where_the_cpu_has_aes_instructions():
    """This suite runs on x86 CPUs with AES-NI (CI included): the default is v2 there."""
    from unibus.client.blobs import _aes_in_hardware

    assert WRITE_VERSION == (2 if _aes_in_hardware() else 1)
    assert parse_header(enc(b"x")).version == WRITE_VERSION


@pytest.mark.parametrize("cpuinfo, machine, has_aes", [
    ("processor\t: 0\nflags\t\t: fpu sse2 aes avx2 sha_ni\n\nprocessor\t: 1\n", "x86_64", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 aesx\n", "x86_64", False),  # a flag that only contains "aes"
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n", "aarch64", True),  # Arm crypto
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n", "aarch64", False),  # a Raspberry Pi 4
    ("processor\t: 0\nmodel name\t: something else\n", "x86_64", True),  # no flags: every x86-64 server has AES
    ("processor\t: 0\nisa\t\t: rv64imafdc_zicsr\n", "riscv64", False),  # RISC-V: software AES, so v1
    (b"\x00\xff" * 1000, "armv7l", False),  # binary junk, 32-bit Arm
    (None, "arm64", True),  # no /proc/cpuinfo: macOS on Apple silicon
    (None, "x86_64", True),  # macOS on Intel
])
def test_the_write_version_follows_the_cpus_aes_instructions(tmp_path, cpuinfo, machine, has_aes):
    from unibus.client.blobs import _aes_in_hardware

    path = tmp_path / "cpuinfo"
    if isinstance(cpuinfo, bytes):
        path.write_bytes(cpuinfo)
    elif cpuinfo is not None:
        path.write_text(cpuinfo)
    assert _aes_in_hardware(str(path), machine) is has_aes


def test_two_encryptions_differ_and_both_decrypt():
    data = b"same plaintext" * 1000
    a, b = enc(data), enc(data)
    assert a != b  # random file id, so another key and another hash
    assert dec(a) == dec(b) == data


@pytest.mark.parametrize("feed", [1, 7, 4096, C + 16, 3 * C])
def test_incremental_feeding_in_any_piece_size(feed, version):
    data = os.urandom(3 * C + 123)
    e = BlobEncryptor(KEY, ROOM, 4, version=version)
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
def blob4(version):
    """A blob of 4 records (3 full chunks and a short one) and its plaintext, in each version."""
    data = os.urandom(3 * C + 1000)
    return enc(data, version=version), data


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


def test_other_room_epoch_or_key_fails(version):
    data = os.urandom(C + 5)
    blob = enc(data, room="rooma", epoch=3, version=version)
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
    other = enc(data, room="rooma", epoch=3, version=version)
    _fails(other[:HEADER_SIZE] + blob[HEADER_SIZE:], room="rooma", epoch=None)


@pytest.mark.parametrize("size", [0, 5, 2 * C + 9])
def test_a_blob_relabelled_as_the_other_version_fails(size):
    """The magic is in every record's AAD and each version derives its own key: a v2 blob
    read as v1 (or the reverse) never authenticates, so no one can choose the cipher a
    reader uses on someone else's blob."""
    data = os.urandom(size)
    for v, other in ((1, b"unibus-blob-v2"), (2, b"unibus-blob-v1")):
        blob = enc(data, version=v)
        assert dec(blob) == data
        _fails(other + blob[len(other):])


def test_each_version_derives_its_own_key():
    from unibus.client.blobs import blob_key

    keys = {blob_key(KEY, ROOM, 1, bytes(16), version=v) for v in (1, 2)}
    assert len(keys) == 2
    with pytest.raises(ValueError, match="version"):
        blob_key(KEY, ROOM, 1, bytes(16), version=3)
    with pytest.raises(ValueError, match="version"):
        BlobEncryptor(KEY, ROOM, 1, version=0)


def test_not_a_blob():
    _fails(os.urandom(5000))
    with pytest.raises(BlobFormatError, match="magic"):
        parse_header(b"unibus-blob-x2" + bytes(28))
    with pytest.raises(BlobFormatError, match="unibus-blob-v3 blob: a format this client does not read"):
        parse_header(b"unibus-blob-v3" + bytes(8) + bytes(16) + struct.pack(">I", C))
    for v in (b"1", b"2"):
        with pytest.raises(BlobFormatError, match="malformed"):  # chunk size too small
            parse_header(b"unibus-blob-v" + v + bytes(8) + bytes(16) + struct.pack(">I", 10))


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
    aeads = {b"unibus-blob-v1": (b"v1", ChaCha20Poly1305), b"unibus-blob-v2": (b"v2", AESGCM)}
    v, aead_class = aeads[magic]
    info = b"unibus/blob-key/" + v + b"|" + room_id.encode() + b"|" + str(epoch).encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=file_id, info=info).derive(room_key)
    aead = aead_class(key)
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
def test_reference_decoder_agrees(size, version):
    data = os.urandom(size)
    assert reference_decrypt(KEY, ROOM, enc(data, version=version)) == data


@pytest.mark.parametrize("version, magic, record, sha256", [
    (1, "756e696275732d626c6f622d7631", "8946e6c2ac" "4f63d66177883569cf384e0af0cbc98f",
     "204c49e215e52bc21a5a0515f6533a3b339567acb10ca25965c3a2e2397db46b"),
    (2, "756e696275732d626c6f622d7632", "666812d7fa" "e127e11d416637cd9e65f626e0f54558",
     "4cd06170448c07a3f77fd5b2d7274c66c22c2d8020c04c5747592435ee8e59d6"),
], ids=["v1", "v2"])
def test_vector(version, magic, record, sha256):
    """The worked examples of docs/blobstore.md: fixed key and file id, plaintext "hello".

    The records and hashes were filled in from the implementation once and then
    frozen (v1 at 0.11, v2 at 0.12); docs/blobstore.md shows the same bytes, and
    the reference decoder above, written from the docs, reads them."""
    blob = enc(b"hello", epoch=1, file_id=bytes(range(0x40, 0x50)), version=version)
    assert blob.hex() == (
        magic  # "unibus-blob-v1" or "-v2"
        + "0000000000000001"  # epoch 1
        "404142434445464748494a4b4c4d4e4f"  # file id
        "00010000"  # chunk size 65536
        + record  # ciphertext (5) || tag (16)
    )
    assert len(blob) == 42 + 5 + 16
    assert hashlib.sha256(blob).hexdigest() == sha256
    assert reference_decrypt(KEY, ROOM, blob) == b"hello"


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
def test_sealed_blocks_are_the_incremental_encryptors_bytes(size, tmp_path, version):
    """The fast path (whole blocks of records with encrypt_into, used by encrypt_stream,
    encrypt_file and put_blob's two passes) writes exactly what BlobEncryptor.update/finish
    write, at every block boundary: no new format, old readers read it."""
    data = os.urandom(size)
    file_id = bytes(range(16))
    e = BlobEncryptor(KEY, ROOM, 3, file_id=file_id, version=version)
    slow = e.header + e.update(data) + e.finish()
    assert enc(data, epoch=3, file_id=file_id, version=version) == slow
    src, dst = tmp_path / "p", tmp_path / "c"
    src.write_bytes(data)
    hashed = _encrypt_path(KEY, ROOM, 3, src, None, file_id=file_id, version=version)  # put_blob's first pass
    assert (hashed.size, hashed.sha256) == (len(slow), hashlib.sha256(slow).digest())
    with open(src, "rb") as f:  # put_blob's upload pass: larger blocks, the same bytes
        sent = b"".join(bytes(b) for b in _sealed_blocks(BlobEncryptor(KEY, ROOM, 3, file_id=file_id, version=version),
                                                         f, UPLOAD_BLOCK, reuse=True))  # each let go at once: reused
    assert sent == slow
    with open(src, "rb") as f:  # every block held (views alive): no buffer may be written again
        held = list(_sealed_blocks(BlobEncryptor(KEY, ROOM, 3, file_id=file_id, version=version), f, BLOCK, reuse=True))
    assert b"".join(bytes(b) for b in held) == slow
    ct = encrypt_file(KEY, ROOM, 3, src, dst, version=version)  # a fresh file_id: other bytes, same size
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
def test_feed_view_any_cut_of_the_pieces_gives_the_plaintext(seed, version):
    """Records whole inside a piece are decrypted from it, records cut between pieces are
    carried over: every way of cutting the body gives the same plaintext."""
    import random

    rnd = random.Random(seed)
    data = os.urandom(rnd.choice([0, 1, C - 1, C, 3 * C + 17, 9 * C]))
    blob = enc(data, version=version)
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
def test_feed_view_refuses_a_tampered_record_inside_a_piece(where, version):
    data = os.urandom(6 * C + 100)
    blob = bytearray(enc(data, version=version))
    pos = {"first": HEADER_SIZE + 10, "middle": HEADER_SIZE + 3 * (C + TAG_SIZE) + 5, "last": len(blob) - 3}[where]
    blob[pos] ^= 0x40
    with pytest.raises(BlobFormatError):
        _feed_pieces(bytes(blob), [HEADER_SIZE, len(blob) // 2])


@pytest.mark.parametrize("cut", [1, TAG_SIZE, C + TAG_SIZE, 2 * (C + TAG_SIZE), 2 * (C + TAG_SIZE) + 1])
def test_feed_view_refuses_a_truncated_body(cut, version):
    """A body cut short (on a record boundary, or inside a record) never authenticates as complete."""
    blob = enc(os.urandom(3 * C + 50), version=version)
    with pytest.raises(BlobFormatError):
        _feed_pieces(blob[:len(blob) - cut], [HEADER_SIZE + 7, len(blob) // 3])


def test_the_digest_pass_hashes_every_block_as_sealed_while_the_hash_lags(tmp_path, monkeypatch, version):
    """The digest pass queues up to DIGEST_AHEAD sealed blocks, views of pooled buffers, for
    the hashing thread: with a hash slower than the sealing, no buffer is sealed into again
    before its block was hashed (the digest and every tag are still the blob's)."""
    import threading

    from unibus.client import blobs

    class SlowHash:
        def __init__(self):
            self.h, self.calls = hashlib.sha256(), 0

        def update(self, data):
            assert threading.current_thread() is not threading.main_thread()  # the hashing thread
            threading.Event().wait(0.003)  # the sealer runs ahead meanwhile
            self.calls += 1
            self.h.update(data)

        def digest(self):
            return self.h.digest()

    made = []
    monkeypatch.setattr(blobs, "hashlib", types.SimpleNamespace(sha256=lambda: made.append(SlowHash()) or made[-1]))
    data = os.urandom(6 * DIGEST_BLOCK + C + 3)
    src = tmp_path / "p"
    src.write_bytes(data)
    file_id = bytes(range(16))
    tags = bytearray()
    ct = _encrypt_path(KEY, ROOM, 3, src, None, file_id=file_id, version=version, tags=tags)
    monkeypatch.undo()
    blob = enc(data, epoch=3, file_id=file_id, version=version)
    assert made[0].calls == 1 + 7  # the header, then every block, each hashed once
    assert (ct.size, ct.sha256) == (len(blob), hashlib.sha256(blob).digest())
    assert bytes(tags) == b"".join(r[-TAG_SIZE:] for r in _records(blob))


def _slow_third_hash(monkeypatch):
    """The digest pass's hash, its third update (the second block of records) slowed down, so
    that the blocks after it queue up behind it."""
    import threading

    from unibus.client import blobs

    class Hash:
        def __init__(self):
            self.h, self.n = hashlib.sha256(), 0

        def update(self, data):
            self.n += 1
            if self.n == 3:
                threading.Event().wait(0.2)
            self.h.update(data)

        def digest(self):
            return self.h.digest()

    monkeypatch.setattr(blobs, "hashlib", types.SimpleNamespace(sha256=Hash))


def test_a_failed_write_of_the_digest_pass_is_raised_and_no_later_block_is_written(tmp_path, monkeypatch,
                                                                                  version):
    """encrypt_file's first failed write (an I/O error on the first block of records) is raised;
    the block already queued behind it (DIGEST_AHEAD is 2) is not written after it, so the
    output never holds the header and a later block spliced together."""
    from unibus.client import blobs

    calls = []
    real_write = blobs._write_all

    def write(fd, parts):
        calls.append(sum(len(p) for p in parts))
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real_write(fd, parts)

    monkeypatch.setattr(blobs, "_write_all", write)
    src, dst = tmp_path / "p", tmp_path / "c"
    src.write_bytes(os.urandom(4 * DIGEST_BLOCK))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as err:
        encrypt_file(KEY, ROOM, 3, src, dst, version=version)
    assert err.value.errno == errno.EIO
    assert len(calls) == 2 and dst.stat().st_size == HEADER_SIZE  # the header, and nothing after it
    assert set(os.listdir("/proc/self/fd")) <= before  # the source and the output closed


def _is_open(fd: int) -> bool:
    """Whether ``fd`` is still an open descriptor (a write hook's check that its file was not closed under it)."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_failed_read_of_the_digest_pass_lets_the_queued_blocks_finish_before_the_output_closes(
        tmp_path, monkeypatch, version):
    """A read error raised while blocks are still queued for the hashing (and writing) thread:
    the output is closed only after they ran, so none writes to a closed descriptor, or to
    whatever file was opened next under its number. (The code before the thread pool became
    the innermost context held this too, by waiting in a ``finally``; this test holds the
    property, whichever way the code keeps it.)"""
    import time

    from unibus.client import blobs

    writes, raised = [], []
    real_write = blobs._write_all

    def write(fd, parts):
        still_open = _is_open(fd)
        writes.append((still_open, time.monotonic()))
        if still_open:
            real_write(fd, parts)

    class FailingRead(io.RawIOBase):
        """The source: its fourth block's read fails (the first three are sealed and queued)."""

        def __init__(self, f):
            self.f, self.reads = f, 0

        def readable(self):
            return True

        def readinto(self, b):
            self.reads += 1
            if self.reads == 4:
                raise OSError(errno.EIO, "Input/output error")
            return self.f.readinto(b)

    monkeypatch.setattr(blobs, "_write_all", write)
    _slow_third_hash(monkeypatch)
    src, dst = tmp_path / "p", tmp_path / "c"
    src.write_bytes(os.urandom(6 * DIGEST_BLOCK))
    with open(src, "rb", buffering=0) as f, pytest.raises(OSError) as err:
        try:
            _encrypt_path(KEY, ROOM, 3, FailingRead(f), dst, version=version)
        finally:
            raised.append(time.monotonic())
    assert err.value.errno == errno.EIO
    assert len(writes) >= 3  # the header and the blocks queued when the read failed
    assert all(ok and at < raised[0] for ok, at in writes), writes


class _ReadFails(io.RawIOBase):
    """A source whose every read fails (EIO)."""

    def readable(self):
        return True

    def readinto(self, b):
        raise OSError(errno.EIO, "Input/output error")


def test_a_failed_read_of_the_digest_pass_keeps_the_error_of_a_failed_write_in_a_note(version):
    """The header's write fails (/dev/full: ENOSPC) and, before that job's error was collected,
    the source's first read fails too: the read's error is raised, and the write's is not lost:
    it is in a note, and the CLI's one line carries it."""
    from unibus.client.cli import _local_file_error

    with pytest.raises(OSError) as err:
        _encrypt_path(KEY, ROOM, 3, _ReadFails(), "/dev/full", version=version)
    assert err.value.errno == errno.EIO
    assert err.value.__notes__ == ["hashing or writing the ciphertext had failed too: "
                                   "[Errno 28] No space left on device"]
    assert _local_file_error(err.value) == ("Input/output error (hashing or writing the ciphertext "
                                            "had failed too: [Errno 28] No space left on device)")


def test_a_failed_write_raised_by_the_digest_pass_gets_no_note(tmp_path, version):
    """The job's own error, raised by the pass (a source that reads fine), is not noted twice."""
    src = tmp_path / "p"
    src.write_bytes(os.urandom(3 * DIGEST_BLOCK))
    with pytest.raises(OSError) as err:
        encrypt_file(KEY, ROOM, 3, src, "/dev/full", version=version)
    assert err.value.errno == errno.ENOSPC
    assert not getattr(err.value, "__notes__", None)


class _Signalled(Exception):
    """What the test's SIGUSR1 handler raises in the main thread, as SIGINT's raises KeyboardInterrupt."""


@pytest.mark.parametrize("interrupts", [2, 3])
def test_a_second_interrupt_does_not_cut_the_wait_for_the_queued_jobs_short(tmp_path, monkeypatch, version,
                                                                           interrupts):
    """Interrupts (here SIGUSR1, whose handler raises as Ctrl-C's does): the first while the pass
    waits for a queued job, the next ones while leaving it waits for that job to return. With
    two, the output is still closed only after the job wrote: no write lands on a closed
    descriptor, or on whatever file was opened next under its number; the second interrupt is
    held, not lost behind the first (the first is raised). A third ends the wait: there is
    always a way out, for a job stuck on a dead disk."""
    import signal
    import threading
    import time

    from unibus.client import blobs

    assert threading.current_thread() is threading.main_thread()  # signal handlers run here
    writes, in_write, go_on = [], threading.Event(), threading.Event()
    gave_up = threading.Event()  # the wait ended before the job: its descriptor may be anyone's now
    real_write = blobs._write_all

    def write(fd, parts):
        if writes:  # the header went through; the first block of records waits for go_on
            in_write.set()
            assert go_on.wait(10)
        still_open = _is_open(fd)
        writes.append((still_open, time.monotonic()))
        if still_open and not gave_up.is_set():
            real_write(fd, parts)

    signals = []

    def handler(signum, frame):
        signals.append(time.monotonic())
        raise _Signalled(len(signals))

    def interrupt():
        main = threading.main_thread().ident
        assert in_write.wait(10)
        for _ in range(interrupts):
            time.sleep(0.3)  # the pass waits for the blocked job; then, leaving, for it to return
            signal.pthread_kill(main, signal.SIGUSR1)
        time.sleep(0.3)
        released.append(time.monotonic())
        go_on.set()

    released = []
    monkeypatch.setattr(blobs, "_write_all", write)
    src, dst = tmp_path / "p", tmp_path / "c"
    src.write_bytes(os.urandom(6 * DIGEST_BLOCK))
    before = set(os.listdir("/proc/self/fd"))
    old = signal.signal(signal.SIGUSR1, handler)
    helper = threading.Thread(target=interrupt, daemon=True)
    try:
        helper.start()
        with pytest.raises(_Signalled) as err:
            encrypt_file(KEY, ROOM, 3, src, dst, version=version)
        returned = time.monotonic()
        if interrupts == 3:
            gave_up.set()
    finally:
        go_on.set()
        helper.join(10)
        signal.signal(signal.SIGUSR1, old)
    assert len(signals) == interrupts
    if interrupts == 2:
        assert err.value.args == (1,)  # the first is raised; the second was held
        assert len(writes) >= 2 and all(ok for ok, _ in writes), writes
        assert writes[-1][1] > signals[1] and returned > writes[-1][1]  # the last write after both signals
    else:
        assert err.value.args == (3,) and returned < released[0]  # the wait ended before the job did
    assert set(os.listdir("/proc/self/fd")) <= before  # the source and the output closed


_LAST_TAKEN = """
import faulthandler, os, queue, signal, sys, threading, time
from unibus.client import blobs

faulthandler.dump_traceback_later(20, exit=True)  # a hang fails the test, with the stacks


class Interrupt(Exception):
    pass


def handler(*_):
    raise Interrupt()


signal.signal(signal.SIGUSR1, handler)


class Outcomes(queue.SimpleQueue):
    def put(self, item, *args):
        if item is blobs._LAST:  # the signal lands on the worker: the main thread handles it
            time.sleep(0.05)     # once its get() has returned, with the last job taken
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        super().put(item, *args)


init = blobs._Jobs.__init__


def with_outcomes(self):
    init(self)
    self._done = Outcomes()


blobs._Jobs.__init__ = with_outcomes
src, dst = sys.argv[1], sys.argv[2]
with open(src, "wb") as f:
    f.write(os.urandom(5 * blobs.DIGEST_BLOCK))
try:
    blobs.encrypt_file(bytes(32), "room1", 3, src, dst)
    print("returned")
except Interrupt:
    print("interrupted")
"""


def test_an_interrupt_right_after_the_last_job_was_taken_does_not_hang_the_wait(tmp_path):
    """An interrupt handled just after the wait took its last, empty job: the wait asks for
    another one instead of waiting for ever (a review's finding: one signal hung it)."""
    import subprocess
    import sys

    script = tmp_path / "last.py"
    script.write_text(_LAST_TAKEN)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "p"), str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "interrupted", proc.stdout + proc.stderr


@pytest.mark.parametrize("size", [0, 1, C, C + 1, DIGEST_BLOCK + 3 * C + 5])
def test_the_digest_pass_keeps_every_records_tag_and_the_upload_pass_is_held_to_them(size, tmp_path, version):
    """put_blob's first pass records each record's tag; its upload pass yields a block only
    while its records' tags are those, and stops at the first block that differs."""
    from unibus.client.blobs import _SameRecords, _SourceChanged

    data = os.urandom(size)
    src = tmp_path / "p"
    src.write_bytes(data)
    file_id = bytes(range(16))
    tags = bytearray()
    ct = _encrypt_path(KEY, ROOM, 3, src, None, file_id=file_id, version=version, tags=tags)
    blob = enc(data, epoch=3, file_id=file_id, version=version)
    assert ct.sha256 == hashlib.sha256(blob).digest()
    assert bytes(tags) == b"".join(r[-TAG_SIZE:] for r in _records(blob) or [blob[HEADER_SIZE:]])

    def upload(path):
        with open(path, "rb") as f:
            sealed = _sealed_blocks(BlobEncryptor(KEY, ROOM, 3, file_id=file_id, version=version), f, 2 * C)
            return [bytes(b) for b in same.blocks(sealed)]

    same = _SameRecords(bytes(tags), C)
    assert b"".join(upload(src)) == blob and not same.changed
    if size > 2 * C:  # the second block of the upload pass changes: the first one alone goes
        src.write_bytes(data[:2 * C] + bytes([data[2 * C] ^ 1]) + data[2 * C + 1:])  # not b"x": 1 in 256 is "x"
        sent = []
        with pytest.raises(_SourceChanged), open(src, "rb") as f:
            for b in same.blocks(_sealed_blocks(BlobEncryptor(KEY, ROOM, 3, file_id=file_id, version=version),
                                                f, 2 * C)):
                sent.append(bytes(b))
        assert same.changed and b"".join(sent) == blob[:HEADER_SIZE + 2 * REC]
