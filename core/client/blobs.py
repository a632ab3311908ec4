"""Room blobs, client side: the ``unibus-blob`` encryption formats and streaming helpers.

The server stores blobs without ever seeing a plaintext: a file is encrypted
with the room key before upload and decrypted after download (docs/blobstore.md).

The format (byte by byte in docs/blobstore.md); ``vN`` is the version, 1 or 2,
and the only difference between the two is the AEAD::

    header   = "unibus-blob-vN" (14) || epoch u64be (8) || file_id (16 random) || chunk_size u32be (4)   # 42 bytes
    key      = HKDF-SHA256(ikm=room_key, salt=file_id,
                           info="unibus/blob-key/vN|" || room_id || "|" || str(epoch), L=32)
    record_i = AEAD(key, nonce_i, chunk_i, aad_i)                             # len(chunk_i) + 16
               # v1: ChaCha20-Poly1305; v2: AES-256-GCM
    nonce_i  = 0x00000000 || u64be(i)                                         # i = 0, 1, 2 ...
    aad_i    = header || room_id || final_i                                   # final_i: 0x01 on the last record, else 0x00
    blob     = header || record_0 || record_1 || ... || record_last

Readers take both versions. Writers write v2 unless the CPU is known to lack AES
instructions (:data:`WRITE_VERSION`): AES-256-GCM is four times as fast as
ChaCha20-Poly1305 with them, and several times slower without.

Every chunk is ``chunk_size`` (65536) plaintext bytes except the last, which
holds 0 to ``chunk_size`` bytes (an empty file is one empty final record). So:
reordering records breaks the nonce; dropping trailing records leaves a last
record whose flag says "not final"; appending turns the real final record
into a non-final one; a blob moved to another room (or relabelled with
another epoch) derives another key. Each of these fails authentication.

Helpers (async, on top of :class:`unibus.client.UnibusClient`)::

    blob_id = await put_blob(client, room_id, "report.pdf", progress=cb)   # encrypt, upload
    await get_blob(client, room_id, blob_id, "out.pdf", progress=cb)       # download, verify, decrypt
    await delete_blob(client, room_id, blob_id)

``progress(bytes_done, total)`` is called as bytes of ciphertext go over the
wire (``total`` is the ciphertext size). The plain transfers without
encryption are :func:`put_raw_blob` / :func:`get_raw_blob`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import itertools
import io
import os
import queue
import secrets
import stat
import struct
import tempfile
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..aio import retrieve_exception
from .sealing import validate_room_id

_T = TypeVar("_T")

__all__ = [
    "CHUNK_SIZE",
    "FORMATS",
    "HEADER_SIZE",
    "MAGIC",
    "TAG_SIZE",
    "WRITE_VERSION",
    "BlobCiphertext",
    "BlobDecryptor",
    "BlobEncryptor",
    "BlobFormat",
    "BlobFormatError",
    "BlobHeader",
    "BlobIntegrityError",
    "Progress",
    "blob_key",
    "ciphertext_size",
    "decrypt_stream",
    "delete_blob",
    "encrypt_file",
    "encrypt_stream",
    "get_blob",
    "get_raw_blob",
    "parse_header",
    "put_blob",
    "put_raw_blob",
    "sign_streamed_request",
]

_HEADER = struct.Struct(">14sQ16sI")
HEADER_SIZE = _HEADER.size  # 42
FILE_ID_SIZE = 16
TAG_SIZE = 16
CHUNK_SIZE = 64 * 1024
#: chunk sizes a reader accepts (the header names it, and the AAD binds it)
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
_EPOCH_MAX = 2**63 - 1
#: the epochs a room key can have (docs/http-api.md: from 1, JSON-safe integers); a blob naming
#: another one is refused before its key is asked for
_ROOM_EPOCH_MAX = 2**53 - 1
#: bytes read from disk / handed to a worker thread at a time
IO_BLOCK = 1024 * 1024
#: plaintext bytes sealed per block by the digest pass of :func:`put_blob`, hashed in a
#: second thread while the next ones are sealed, with up to ``DIGEST_AHEAD`` sealed
#: blocks queued for the hash, so that neither thread waits for the other's every
#: block. The fastest of the sizes and depths measured: 256 KiB with two queued took
#: the first pass from 0.91 to 0.72 ms per MB here, 1 MiB with two 0.85, 128 KiB with
#: two 0.76 (bench/probe_digest_pass.py; docs/benchmarks.md, "Blobs")
DIGEST_BLOCK = 256 * 1024
DIGEST_AHEAD = 2
#: plaintext bytes sealed per block for the upload (views of pooled buffers, handed to aiohttp)
UPLOAD_BLOCK = 4 * 1024 * 1024
#: bytes of a download handed to the hashing and the decrypting threads at a time, and
#: the size of the response's read buffer: a few hand-offs and writes per 16 MiB,
#: and the connection goes on receiving while a block is processed (docs/benchmarks.md)
DOWNLOAD_BLOCK = 4 * 1024 * 1024
#: blocks of a download each of its two threads may have queued (the one it works on
#: included), so that a thread done with its block takes the next without waiting for
#: the event loop to hand it over. Two against one took a 256 MiB ``get_blob`` from
#: 568 to 609 MB/s, and from 243 to 259 MB/s with OpenSSL's SHA-256 kept off the CPU's
#: SHA extensions (medians of 40 alternating runs, bench/probe_download_lanes.py;
#: docs/benchmarks.md, "Blobs")
DOWNLOAD_AHEAD = 2
#: bytes a download asks of the socket per ``recv`` (see _large_reads)
RECV_SIZE = 1024 * 1024
#: The most of an upload's answer, or of a refused download's problem details, the client reads.
PROBLEM_MAX_BYTES = 1024 * 1024
#: bytes a download writes between two starts of the kernel's writeback (see _FileSink)
WRITEBACK_EVERY = 8 * 1024 * 1024
#: Uploads larger than this send ``Expect: 100-continue``: membershipd answers
#: a refused upload (401, 403, 404, 413) before one byte of it is sent
#: (docs/http-api.md, "Slow and large bodies").
EXPECT_CONTINUE_OVER = 64 * 1024

Progress = Callable[[int, int], Any]


@dataclass(frozen=True)
class BlobFormat:
    """One version of the blob format: its magic, its AEAD and its HKDF ``info`` prefix."""

    version: int
    magic: bytes
    aead: type[ChaCha20Poly1305] | type[AESGCM]
    key_info_prefix: bytes


#: every version a reader takes, by number (docs/blobstore.md, "Versions")
FORMATS: dict[int, BlobFormat] = {
    1: BlobFormat(1, b"unibus-blob-v1", ChaCha20Poly1305, b"unibus/blob-key/v1|"),
    2: BlobFormat(2, b"unibus-blob-v2", AESGCM, b"unibus/blob-key/v2|"),
}
_BY_MAGIC = {f.magic: f for f in FORMATS.values()}


#: CPUs whose every model OpenSSL runs AES-GCM on in hardware, where no ``cpuinfo`` says otherwise
#: (macOS has no /proc/cpuinfo: every Mac CPU has AES instructions)
_AES_MACHINES = frozenset({"x86_64", "amd64", "arm64", "aarch64", "ppc64le", "s390x"})


def _aes_in_hardware(cpuinfo: str = "/proc/cpuinfo", machine: str | None = None) -> bool:
    """Whether this CPU has AES instructions: the ``aes`` flag of x86 (``flags``) or Arm
    (``Features``) in ``cpuinfo``; where no such line is found, whether ``machine``
    (``platform.machine()``) is one of :data:`_AES_MACHINES` (RISC-V, 32-bit Arm and
    others write v1).

    Without them OpenSSL's AES-GCM runs in constant-time software, several times
    slower than ChaCha20-Poly1305 (a Raspberry Pi 4, for one); with them, four
    times faster (docs/benchmarks.md, "Blobs").
    """
    import platform

    with contextlib.suppress(OSError), open(cpuinfo, "rb") as f:
        # The first CPU's block names the flags: read no further (the kernel formats the
        # file for every CPU as it is read, so a whole read grows with the CPU count).
        for _ in range(256):
            line = f.readline(64 * 1024)
            if not line:
                break
            name, sep, value = line.partition(b":")
            if sep and name.strip() in (b"flags", b"Features"):
                return b"aes" in value.split()
    return (machine if machine is not None else platform.machine()).lower() in _AES_MACHINES


#: the version this client writes: 2 (AES-256-GCM), or 1 (ChaCha20-Poly1305) on a
#: CPU without AES instructions. Readers take both, whoever wrote the blob.
WRITE_VERSION = 2 if _aes_in_hardware() else 1
#: the magic of the blobs this client writes
MAGIC = FORMATS[WRITE_VERSION].magic


def _format(version: int) -> BlobFormat:
    try:
        return FORMATS[version]
    except (KeyError, TypeError):
        raise ValueError(f"unknown blob format version {version!r}: expected one of {sorted(FORMATS)}") from None


class BlobFormatError(ValueError):
    """A blob is not a valid ``unibus-blob`` ciphertext for this room and key
    (tampered with, truncated, reordered, another room or epoch, wrong key)."""


class BlobIntegrityError(BlobFormatError):
    """A downloaded blob's bytes do not hash to its id (or its Content-Digest)."""


@dataclass(frozen=True)
class BlobHeader:
    epoch: int
    file_id: bytes
    chunk_size: int
    raw: bytes
    #: the format version its magic names (:data:`FORMATS`)
    version: int = 1


@dataclass(frozen=True)
class BlobCiphertext:
    """What :func:`encrypt_stream` wrote: its size and SHA-256 (the blob id is its hex)."""

    size: int
    sha256: bytes

    @property
    def blob_id(self) -> str:
        return self.sha256.hex()


# --------------------------------------------------------------------------- the format


def _check_key(room_key: Any) -> bytes:
    if not isinstance(room_key, (bytes, bytearray, memoryview)) or len(room_key) != 32:
        raise ValueError("a room key is 32 raw bytes")
    return bytes(room_key)


def _check_epoch(epoch: Any) -> int:
    if type(epoch) is not int or not 0 <= epoch <= _EPOCH_MAX:
        raise ValueError(f"invalid epoch {epoch!r}: expected a non-negative integer")
    return epoch


def blob_key(room_key: bytes, room_id: str, epoch: int, file_id: bytes, *, version: int = WRITE_VERSION) -> bytes:
    """The per-file key: HKDF-SHA256(room_key, salt=file_id, info=unibus/blob-key/v<version>|<room_id>|<epoch>)."""
    validate_room_id(room_id)
    prefix = _format(version).key_info_prefix
    info = prefix + room_id.encode("ascii") + b"|" + str(_check_epoch(epoch)).encode("ascii")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(file_id), info=info).derive(_check_key(room_key))


def _nonce(i: int) -> bytes:
    return b"\x00\x00\x00\x00" + i.to_bytes(8, "big")


def make_header(epoch: int, file_id: bytes, chunk_size: int = CHUNK_SIZE, *, version: int = WRITE_VERSION) -> bytes:
    magic = _format(version).magic
    if len(file_id) != FILE_ID_SIZE:
        raise ValueError("file_id is 16 bytes")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    return _HEADER.pack(magic, _check_epoch(epoch), bytes(file_id), chunk_size)


def parse_header(data: bytes) -> BlobHeader:
    """Parse the first :data:`HEADER_SIZE` bytes of a blob of any version in :data:`FORMATS`;
    :class:`BlobFormatError` if they are not such a header."""
    if len(data) < HEADER_SIZE:
        raise BlobFormatError(f"not a unibus blob: {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, epoch, file_id, chunk_size = _HEADER.unpack_from(data)
    fmt = _BY_MAGIC.get(magic)
    if fmt is None:
        if magic.startswith(b"unibus-blob-v") and magic[13:].isdigit():
            raise BlobFormatError(f"a {magic.decode('ascii')} blob: a format this client does not read; "
                                  "a newer unibus does")
        raise BlobFormatError("not a unibus blob (bad magic)")
    if epoch > _EPOCH_MAX or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise BlobFormatError(f"malformed {magic.decode('ascii')} header")
    return BlobHeader(epoch, file_id, chunk_size, bytes(data[:HEADER_SIZE]), fmt.version)


def ciphertext_size(plaintext_size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Size of the blob that ``plaintext_size`` bytes encrypt to."""
    records = max(1, -(-plaintext_size // chunk_size))
    return HEADER_SIZE + plaintext_size + TAG_SIZE * records


class BlobEncryptor:
    """Incremental encryption: ``header``, then ``update(data)`` as often as needed, then ``finish()``.

    ``update`` returns the records that are complete (the last full chunk is
    held back until more data or ``finish`` says whether it is the final one).
    """

    def __init__(self, room_key: bytes, room_id: str, epoch: int, *, chunk_size: int = CHUNK_SIZE,
                 file_id: bytes | None = None, version: int = WRITE_VERSION) -> None:
        self.room_id = validate_room_id(room_id)
        self.file_id = secrets.token_bytes(FILE_ID_SIZE) if file_id is None else bytes(file_id)
        self.version = version
        self.header = make_header(epoch, self.file_id, chunk_size, version=version)
        self.chunk_size = chunk_size
        self._aead = _format(version).aead(blob_key(room_key, room_id, epoch, self.file_id, version=version))
        self._aad = self.header + self.room_id.encode("ascii")
        self._buf = bytearray()
        self._i = 0
        self._done = False

    def _record(self, chunk: bytes, final: bool) -> bytes:
        out = self._aead.encrypt(_nonce(self._i), chunk, self._aad + (b"\x01" if final else b"\x00"))
        self._i += 1
        return out

    def update(self, data: bytes) -> bytes:
        if self._done:
            raise ValueError("finish() was already called")
        self._buf += data
        c = self.chunk_size
        if len(self._buf) <= c:
            return b""
        out = []
        n = (len(self._buf) - 1) // c  # always keep 1..c bytes back
        view = memoryview(self._buf)
        try:
            for k in range(n):
                out.append(self._record(bytes(view[k * c:(k + 1) * c]), False))
        finally:
            view.release()
        del self._buf[: n * c]
        return b"".join(out)

    def finish(self) -> bytes:
        if self._done:
            raise ValueError("finish() was already called")
        self._done = True
        last = bytes(self._buf)
        self._buf.clear()
        return self._record(last, True)

    def seal(self, plaintext: Any, final: bool, out: bytearray | None = None) -> bytearray | memoryview:
        """Seal a whole block of records at once (the fast path; not to be mixed with ``update``).

        ``plaintext`` (any buffer) is cut into records of ``chunk_size``: a block
        that is not ``final`` must be a whole number of them; the ``final`` one
        may end with a short record (or be empty: one empty final record). The
        records are written with ``encrypt_into`` into one new buffer, with no
        copy of the plaintext and none between records; the buffer is the
        caller's to keep. With ``out`` (a buffer at least as large as the
        records), they are written there instead and a view of them is returned.
        """
        if self._done or self._buf:
            raise ValueError("seal() after finish() or update()")
        view = memoryview(plaintext).cast("B")
        c, n = self.chunk_size, len(view)
        records = max(1, -(-n // c)) if final else n // c
        if not final and n % c:
            raise ValueError("a block that is not final must hold whole records")
        size = n + TAG_SIZE * records
        given = out is not None
        if out is None:
            out = bytearray(size)
        elif len(out) < size:
            raise ValueError("the output buffer is too small")
        dst = memoryview(out)[:size]
        into = getattr(self._aead, "encrypt_into", None)
        for k in range(records):
            last = final and k == records - 1
            pt = view[k * c:(k + 1) * c]
            o = k * (c + TAG_SIZE)
            aad = self._aad + (b"\x01" if last else b"\x00")
            if into is not None:
                into(_nonce(self._i), pt, aad, dst[o:o + len(pt) + TAG_SIZE])
            else:  # cryptography without encrypt_into
                dst[o:o + len(pt) + TAG_SIZE] = self._aead.encrypt(_nonce(self._i), bytes(pt), aad)
            self._i += 1
        if final:
            self._done = True
        return dst if given else out


def _readinto_full(f: IO[bytes], view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _unexported(buf: bytearray) -> bool:
    """True if no view of ``buf`` is alive: a bytearray with one cannot change its size.
    (``buf`` was made with room for one more byte, so this never reallocates it.)"""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


class _BufferPool:
    """Output buffers for sealed blocks, each reused once nothing holds a view of it any more.

    A new buffer's pages are first touched by the cipher writing into it;
    on this machine that made sealing into a new 4 MiB buffer per block cost
    2.4 times as much as sealing into a reused one (py-spy,
    docs/benchmarks.md, "Blobs"). :meth:`BlobEncryptor.seal` hands out a
    view made before the block leaves the sealing thread, and the consumer
    (aiohttp, the transport, the hashing thread) keeps its own views while it
    uses the block, so a buffer is never written while still being read; if
    every buffer is in use, a new one is made (at most ``keep`` are kept).
    """

    def __init__(self, size: int, keep: int = 4) -> None:
        self.size, self.keep = size, keep
        self.bufs: list[bytearray] = []

    def get(self) -> bytearray:
        for buf in self.bufs:
            if _unexported(buf):
                return buf
        buf = bytearray(self.size + 1)  # room for _unexported's one byte: it never reallocates
        del buf[-1]
        if len(self.bufs) < self.keep:
            self.bufs.append(buf)
        return buf


def _sealed_blocks(enc: BlobEncryptor, src: IO[bytes], block: int = IO_BLOCK,
                   reuse: bool = False) -> Iterator[bytes | bytearray | memoryview]:
    """The blob, block by block: the header, then blocks of about ``block`` bytes of
    plaintext (a whole number of records).

    The plaintext is read ahead one block (a full block is final only when
    nothing follows it) into two buffers that take turns. Every block yielded
    is a new buffer, never reused, so a consumer may hold on to it; with
    ``reuse``, each block is a view of a buffer of a :class:`_BufferPool`,
    written again only once no view of it is left: a consumer must keep a
    view (not a copy of its address) for as long as it reads the block.
    """
    size = enc.chunk_size * max(1, block // enc.chunk_size)
    yield enc.header
    cur, nxt = bytearray(size), bytearray(size)
    pool = _BufferPool(size + TAG_SIZE * (size // enc.chunk_size)) if reuse else None
    n = _readinto_full(src, memoryview(cur))
    while True:
        out = pool.get() if pool is not None else None
        if n < size:
            yield enc.seal(memoryview(cur)[:n], True, out)
            return
        m = _readinto_full(src, memoryview(nxt))
        yield enc.seal(cur, m == 0, out)
        if m == 0:
            return
        cur, nxt, n = nxt, cur, m


class BlobDecryptor:
    """Incremental decryption of a blob of room ``room_id``.

    ``feed(data)`` returns the plaintext that is authenticated so far. The
    key is needed once the header is in: pass ``room_key`` up front, or check
    :attr:`needs_key` after a ``feed``, read :attr:`header`\\ ``.epoch``, and
    :meth:`set_key`. ``finish()`` checks that the blob ended with its final
    record and returns the last plaintext. Every failure is :class:`BlobFormatError`;
    plaintext already returned is authentic but possibly incomplete, so a
    caller must discard its output unless ``finish()`` succeeds.
    """

    def __init__(self, room_id: str, room_key: bytes | None = None, *, epoch: int | None = None) -> None:
        self.room_id = validate_room_id(room_id)
        self._room_key = None if room_key is None else _check_key(room_key)
        self.expected_epoch = epoch
        self.header: BlobHeader | None = None
        self._aead: ChaCha20Poly1305 | AESGCM | None = None
        self._aad = b""
        self._buf = bytearray()
        self._i = 0
        self._done = False
        self._out = bytearray()
        self.ciphertext_bytes = 0

    @property
    def needs_key(self) -> bool:
        return self.header is not None and self._aead is None

    def set_key(self, room_key: bytes) -> None:
        if self.header is None:
            raise ValueError("the header has not been read yet")
        self._room_key = _check_key(room_key)
        h = self.header
        self._aead = _format(h.version).aead(blob_key(self._room_key, self.room_id, h.epoch, h.file_id,
                                                      version=h.version))
        self._aad = self.header.raw + self.room_id.encode("ascii")

    def _open(self, record: bytes, final: bool) -> bytes:
        assert self._aead is not None
        try:
            out = self._aead.decrypt(_nonce(self._i), record, self._aad + (b"\x01" if final else b"\x00"))
        except InvalidTag:
            raise BlobFormatError(
                f"blob record {self._i} does not authenticate: wrong room or key, "
                "truncated, reordered, or tampered with") from None
        self._i += 1
        return out

    def _open_into(self, record: memoryview, final: bool, out: memoryview) -> None:
        """Like :meth:`_open`, into ``out`` (``len(record) - 16`` bytes), with no copy of the record."""
        assert self._aead is not None
        aad = self._aad + (b"\x01" if final else b"\x00")
        try:
            into = getattr(self._aead, "decrypt_into", None)
            if into is not None:
                into(_nonce(self._i), record, aad, out)
            else:  # cryptography without decrypt_into
                out[:] = self._aead.decrypt(_nonce(self._i), bytes(record), aad)
        except InvalidTag:
            raise BlobFormatError(
                f"blob record {self._i} does not authenticate: wrong room or key, "
                "truncated, reordered, or tampered with") from None
        self._i += 1

    def feed(self, data: bytes) -> bytes | bytearray:
        return self.feed_parts((data,))

    def feed_parts(self, parts: Sequence[Any]) -> bytes | bytearray:
        """:meth:`feed` of several pieces at once: the plaintext of every record they
        complete, in one new buffer."""
        return bytearray(self.feed_view(parts))

    def feed_view(self, parts: Sequence[Any]) -> memoryview:
        """Like :meth:`feed_parts`, into the decryptor's own output buffer: the view
        returned is valid until the next call (the fast path of :func:`get_blob`).

        Records that lie whole inside one piece are decrypted straight out of
        it (``decrypt_into``, no copy); only a record cut between two pieces,
        and the record held back because it may be the final one, are copied
        into a carry buffer. The output buffer is reused from one call to the
        next, so a download allocates it once.
        """
        if self._done:
            raise BlobFormatError("data after the end of the blob")
        for data in parts:
            self.ciphertext_bytes += len(data)
        if self._aead is None:  # the header is not read or the key not set yet: keep everything
            for data in parts:
                self._buf += data
            parts = ()
            if not self._take_header():
                return memoryview(b"")
        assert self.header is not None
        c = self.header.chunk_size
        rec = c + TAG_SIZE
        carry = self._buf
        total = len(carry) + sum(len(p) for p in parts)
        n = (total - 1) // rec if total else 0  # keep the possibly-final record back
        if n == 0:
            for data in parts:
                carry += data
            return memoryview(b"")
        if len(self._out) < n * c:
            self._out = bytearray(n * c)
        dst = memoryview(self._out)[:n * c]
        self._open_records(parts, n, dst)
        return dst

    def _take_header(self) -> bool:
        """Parse the header once it is all in the carry buffer and set the key if it is known;
        True when records can be opened."""
        if self.header is None:
            if len(self._buf) < HEADER_SIZE:
                return False
            self.header = parse_header(self._buf)
            if self.expected_epoch is not None and self.header.epoch != self.expected_epoch:
                raise BlobFormatError(f"blob is of epoch {self.header.epoch}, expected {self.expected_epoch}")
            del self._buf[:HEADER_SIZE]
            if self._room_key is not None:
                self.set_key(self._room_key)
        return self._aead is not None

    def _open_records(self, parts: Sequence[Any], n: int, dst: memoryview) -> None:
        """Open the next ``n`` (not final) records into ``dst``: those waiting in the carry buffer
        first, then straight out of ``parts``; what is left of the pieces is carried over."""
        assert self.header is not None
        c = self.header.chunk_size
        rec = c + TAG_SIZE
        carry = self._buf
        k = 0
        off = 0
        with memoryview(carry) as cv:  # records already waiting (after the header or a key change)
            while k < n and len(carry) - off >= rec:
                self._open_into(cv[off:off + rec], False, dst[k * c:(k + 1) * c])
                off += rec
                k += 1
        del carry[:off]
        for data in parts:
            pv = memoryview(data).cast("B")
            i = 0
            if carry and k < n:  # a record cut between two pieces: complete it
                i = min(rec - len(carry), len(pv))
                carry += pv[:i]
                if len(carry) == rec:
                    with memoryview(carry) as cv:
                        self._open_into(cv, False, dst[k * c:(k + 1) * c])
                    k += 1
                    carry.clear()
            while k < n and len(pv) - i >= rec:
                self._open_into(pv[i:i + rec], False, dst[k * c:(k + 1) * c])
                i += rec
                k += 1
            if i < len(pv):
                carry += pv[i:]
        assert k == n

    def finish(self) -> bytes:
        if self._done:
            raise BlobFormatError("finish() was already called")
        if self.header is None:
            raise BlobFormatError("not a unibus blob: it ends before its header")
        if self._aead is None:
            raise ValueError("no key was set (see needs_key / set_key)")
        if len(self._buf) < TAG_SIZE:
            raise BlobFormatError("blob is truncated: its last record is incomplete")
        self._done = True
        last = bytes(self._buf)
        self._buf.clear()
        return self._open(last, True)


def _read_full(src: IO[bytes], n: int) -> bytes:
    data = src.read(n)
    if not data or len(data) == n:
        return data or b""
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def encrypt_stream(room_key: bytes, room_id: str, epoch: int, src: IO[bytes], dst: IO[bytes], *,
                   chunk_size: int = CHUNK_SIZE, file_id: bytes | None = None,
                   version: int = WRITE_VERSION) -> BlobCiphertext:
    """Encrypt everything readable from ``src`` into ``dst`` (binary file objects).

    Returns the ciphertext's size and SHA-256 (its future blob id), computed
    on the way so that no second pass is needed.
    """
    enc = BlobEncryptor(room_key, room_id, epoch, chunk_size=chunk_size, file_id=file_id, version=version)
    h = hashlib.sha256()
    size = 0
    if not hasattr(src, "readinto"):
        src = io.BufferedReader(_ReadOnly(src))  # type: ignore[arg-type]
    for block in _sealed_blocks(enc, src):
        h.update(block)
        dst.write(block)
        size += len(block)
    return BlobCiphertext(size, h.digest())


class _ReadOnly(io.RawIOBase):
    """A ``read``-only object seen as a raw stream (for :func:`encrypt_stream`)."""

    def __init__(self, src: Any) -> None:
        self._src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._src.read(len(b))
        b[:len(data)] = data
        return len(data)


def _record_tags(block: Any, chunk_size: int) -> bytes:
    """The tags of the records of a sealed block (whole records; the last may be short)."""
    view = memoryview(block).cast("B")
    rec = chunk_size + TAG_SIZE
    ends = list(range(rec, len(view) + 1, rec))
    if len(view) % rec:
        ends.append(len(view))
    return b"".join(view[e - TAG_SIZE:e] for e in ends)


def _encrypt_path(room_key: bytes, room_id: str, epoch: int, src: str | os.PathLike[str] | IO[bytes],
                  dst: str | os.PathLike[str] | None, *, chunk_size: int = CHUNK_SIZE,
                  file_id: bytes | None = None, version: int = WRITE_VERSION,
                  tags: bytearray | None = None, stop: threading.Event | None = None) -> BlobCiphertext:
    """Encrypt the file ``src`` (into ``dst``, if given) and hash the ciphertext.

    The sealing runs in this thread, the hashing (and writing) of the blocks
    already sealed in a second one, in order, up to ``DIGEST_AHEAD`` of them
    queued: both release the GIL, so they overlap. Each block is a view of a
    pooled buffer (:class:`_BufferPool`), which the queued job keeps alive, so
    no buffer is sealed into again before it was hashed. The first failed job
    is raised; the blocks queued after it are neither hashed nor written, and
    ``dst`` and ``src`` are closed only once no job runs. With ``tags``, every
    record's tag is appended to it (16 bytes per 64 KiB: what
    :class:`_SameRecords` checks the upload pass against). With ``stop``, the
    pass checks it before it hands each sealed block on (one block is read
    ahead) and ends with :class:`_Stopped` once it is set (its caller is gone:
    :func:`_then_close`); the blocks already queued, two at most, still run.

    When this thread's own error (a failed read of ``src``) ends the pass while
    a queued job had failed too, that job's error is added to it as a note, so
    neither is lost. An interrupt (or any exception a signal handler raises)
    that arrives while the pass waits for its queued jobs does not cut that wait
    short: it is raised once they returned (:class:`_Jobs`).
    """
    enc = BlobEncryptor(room_key, room_id, epoch, chunk_size=chunk_size, file_id=file_id, version=version)
    h = hashlib.sha256()
    size = 0
    failed = False  # a job failed: the blocks queued after it are neither hashed nor written
    given = hasattr(src, "readinto")  # a file put_blob opened (_open_source): the caller closes it
    jobs = _Jobs()
    try:
        # The jobs are entered last, so left first: leaving them waits for every queued one before
        # ``dst`` and ``src`` are closed, whatever ends the pass (an error, an interrupt).
        with (contextlib.nullcontext(src) if given else open(src, "rb", buffering=0)) as s, \
                (open(dst, "wb", buffering=0) if dst is not None else contextlib.nullcontext()) as d, \
                jobs:
            def out(b: bytes | bytearray) -> None:
                nonlocal failed
                if failed:
                    return
                try:
                    h.update(b)
                    if d is not None:
                        _write_all(d.fileno(), [b])
                except BaseException:
                    failed = True
                    raise

            k = 0  # not enumerate(): its reused tuple would keep the last block's view, and buffer, alive
            for block in _sealed_blocks(enc, s, DIGEST_BLOCK, reuse=True):
                if stop is not None and stop.is_set():
                    raise _Stopped("the digest pass was stopped: its caller is gone")
                if tags is not None and k:  # block 0 is the header
                    tags += _record_tags(block, enc.chunk_size)
                k += 1
                while jobs.in_flight >= DIGEST_AHEAD:
                    jobs.wait_one()
                size += len(block)
                jobs.submit(out, block)
                del block  # the queued job's reference alone keeps its buffer from being sealed into
            while jobs.in_flight:
                jobs.wait_one()
    except BaseException as e:
        _note_failed_job(e, jobs.errors)
        raise
    return BlobCiphertext(size, h.digest())


_LAST = object()  # the empty job that :class:`_Jobs` waits for last


class _Jobs:
    """One worker thread that runs the jobs given to it in order; leaving it (``with``) waits
    until every job given has returned, then lets the thread end.

    The wait is for a last, empty job: with one thread taking the jobs in order, once that
    one ran, every job queued before it has returned, including one that an interrupt left
    uncounted. Jobs and their outcomes go through two ``queue.SimpleQueue``, which have no
    lock written in Python: an interrupt in the middle of a ``ThreadPoolExecutor`` or a
    ``Future`` could leave one of their locks held, and the next wait hung for good (a
    review's timed signals did, once in about 300 runs). The thread is a daemon, so one that
    is left behind (below) never holds up the interpreter's exit; one whose ``start`` an
    interrupt cut short is told to end.

    One exception raised in this thread during that wait (a second Ctrl-C, or what another
    signal's handler raises) is held until the jobs have returned: cut short, the wait would
    let the caller close a file under a job still writing to it, or to whatever file was
    opened next under its number. It is then raised, unless an exception is leaving the
    block already (the first Ctrl-C, say). A second one (a third Ctrl-C) ends the wait, so
    there is always a way out (a job stuck on a dead disk). The wait lasts as long as the
    queued jobs, a few blocks of hashing and writing. An interrupt handled in the few
    bytecodes around the wait, not in it, can still cut it short: only blocking the signal
    in every thread would close that window. One handled right after a ``get`` took an
    outcome loses it: a job's error may then be missing from the note (the interrupt is
    raised), and a last job taken that way is asked for again (a review found that one
    interrupt there hung the wait)."""

    #: exceptions held while waiting; the next one ends the wait
    HELD = 1

    def __init__(self) -> None:
        self._todo: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.in_flight = 0  # jobs given whose outcome was not taken yet
        self.errors: list[BaseException] = []  # the jobs' errors, in order

    def _run(self) -> None:
        get, put = self._todo.get, self._done.put
        while True:
            job = get()
            if job is None:
                return
            if job is _LAST:
                put(_LAST)
                continue
            fn, arg = job
            del job  # no reference to the block is kept while the next one is awaited
            try:
                fn(arg)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                put(e)
            else:
                put(None)
            finally:
                del arg, fn

    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        self.in_flight += 1
        self._todo.put((fn, arg))

    def wait_one(self) -> None:
        """Take the oldest job's outcome; raise its error."""
        outcome = self._done.get()
        self.in_flight -= 1
        if outcome is not None:
            self.errors.append(outcome)
            raise outcome

    def __enter__(self) -> _Jobs:
        try:
            threading.Thread(target=self._run, name="unibus-digest", daemon=True).start()
        except BaseException:
            self._todo.put(None)  # an interrupt during start(): the thread may run; it ends at once
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        held: BaseException | None = None
        interrupted = 0
        while True:
            try:
                # A last job on every try: an interrupt right after the get below took the one
                # before, and the next get would wait for ever. The first one seen is enough.
                self._todo.put(_LAST)
                while (outcome := self._done.get()) is not _LAST:
                    if outcome is not None:
                        self.errors.append(outcome)
                break
            except BaseException as e:  # noqa: BLE001 - held, and raised once the jobs returned
                interrupted += 1
                if interrupted > self.HELD:
                    self._todo.put(None)
                    raise
                if held is None:
                    held = e
        self.in_flight = 0
        self._todo.put(None)  # every job returned: the thread ends
        if held is not None and kind is None:
            raise held


def _note_failed_job(e: BaseException, errors: Sequence[BaseException]) -> None:
    """Add to ``e`` a note with the first of the jobs' ``errors`` that is not ``e`` itself (the
    pass raises its own error, a failed read, and would otherwise lose the job's)."""
    for lost in errors:
        if lost is not e:
            e.add_note(f"hashing or writing the ciphertext had failed too: {lost or type(lost).__name__}")
            return


def encrypt_file(room_key: bytes, room_id: str, epoch: int, src: str | os.PathLike[str],
                 dst: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE,
                 version: int = WRITE_VERSION) -> BlobCiphertext:
    """:func:`encrypt_stream` from one path to another, with hashing and writing in a
    second thread so that they overlap with the encryption (same bytes out)."""
    return _encrypt_path(room_key, room_id, epoch, src, dst, chunk_size=chunk_size, version=version)


def _write_all(fd: int, parts: list[Any]) -> None:
    """``writev`` every part to ``fd``, short writes included (no join, no copy in Python)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.writev(fd, views[:1024])
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def decrypt_stream(room_key: bytes, room_id: str, epoch: int | None, src: IO[bytes], dst: IO[bytes]) -> int:
    """Decrypt a blob from ``src`` into ``dst``; return the plaintext size.

    ``epoch`` (if not None) must be the blob's: the caller holds the key of
    that epoch. Raises :class:`BlobFormatError`; then ``dst`` holds an
    incomplete prefix that must be discarded (see :func:`get_blob`, which
    writes to a temporary file and renames it only on success).
    """
    dec = BlobDecryptor(room_id, room_key, epoch=epoch)
    n = 0
    while True:
        data = src.read(IO_BLOCK)
        if not data:
            break
        pt = dec.feed(data)
        if pt:
            dst.write(pt)
            n += len(pt)
    pt = dec.finish()
    dst.write(pt)
    return n + len(pt)


def read_blob_header(path: str | os.PathLike[str]) -> BlobHeader:
    with open(path, "rb") as f:
        return parse_header(f.read(HEADER_SIZE))


# --------------------------------------------------------------------------- signing a streamed body


def sign_streamed_request(method: str, path_and_query: str, content_sha256: bytes, *, keyid: str,
                          private_key: Any, created: int | None = None, nonce: str | None = None,
                          tag: str | None = None) -> dict[str, str]:
    """Like :func:`unibus.signing.sign_request`, for a body given by its SHA-256
    only (a streamed upload): returns ``Content-Digest``, ``Signature-Input``
    and ``Signature`` covering ``@method @path @query content-digest``, with
    ``tag`` (the deployment's trust root) when given.
    """
    from .. import signing

    return signing.sign_request(method, path_and_query, None, keyid=keyid, private_key=private_key,
                                created=created, nonce=nonce, content_sha256=content_sha256, tag=tag)


# --------------------------------------------------------------------------- transfers


def _blobs_path(room_id: str, blob_id: str | None = None) -> str:
    validate_room_id(room_id)
    path = "/v1/rooms/" + urllib.parse.quote(room_id, safe="") + "/blobs"
    if blob_id is not None:
        if not isinstance(blob_id, str) or len(blob_id) != 64 or any(c not in "0123456789abcdef" for c in blob_id):
            raise ValueError(f"invalid blob id {blob_id!r}: 64 lowercase hex characters")
        path += "/" + blob_id
    return path


def _transfer_timeout(client: Any) -> Any:
    import aiohttp

    # The client's own timeout is per request in total; a big blob needs longer.
    # Only a stall (no byte read for a while) or a slow connect counts.
    return aiohttp.ClientTimeout(total=None, sock_connect=client.timeout, sock_read=max(60.0, client.timeout))


async def _file_body(path: Path, size: int, progress: Progress | None) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    done = 0
    try:
        if progress:
            progress(0, size)
        while done < size:
            data = await asyncio.to_thread(f.read, min(IO_BLOCK, size - done))
            if not data:
                raise OSError(f"{path} shrank while it was being uploaded")
            done += len(data)
            yield data
            if progress:
                progress(done, size)
    finally:
        f.close()


def _sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(IO_BLOCK):
            h.update(data)
    return h.digest()


async def put_raw_blob(client: Any, room_id: str, path: str | os.PathLike[str], *, sha256: bytes | None = None,
                       progress: Progress | None = None) -> str:
    """Upload the file at ``path`` as it is (no encryption); return its blob id.

    ``sha256`` saves a pass over the file when the caller already knows it.
    Raises :class:`unibus.client.ApiError` (413 too large, 403 not a member...)
    or :class:`unibus.client.ServerUnreachable`.
    """
    path = Path(path)
    size = (await asyncio.to_thread(path.stat)).st_size
    if sha256 is None:
        sha256 = await asyncio.to_thread(_sha256_file, path)
    return await _upload(client, room_id, sha256, size, lambda: _file_body(path, size, progress))


async def _upload(client: Any, room_id: str, sha256: bytes, size: int,
                  body: Callable[[], AsyncIterator[Any]]) -> str:
    """PUT ``size`` bytes whose SHA-256 is ``sha256``, from ``body()`` (called again for a retry)."""
    import aiohttp

    from .api import (AnswerTooLarge, ApiError, ServerUnreachable, _connect_reason, _parse_retry_after,
                      _problem_from, _read_capped, retry_503_delay)

    url = client.url_for(_blobs_path(room_id))
    # Bound to the deployment as every changing request is (a review: uploads went untagged, and a
    # compromised server that gave a new room the id of one on another deployment could replay them).
    tag = await client.deployment_tag()
    for attempt in itertools.count():
        headers = sign_streamed_request("PUT", url.raw_path_qs, sha256, keyid=client.identity.handle,
                                        private_key=client.identity.sign_key, tag=tag)
        headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(size),
                        "Accept": "application/json, application/problem+json"})
        try:
            async with client._http().put(url, data=body(), headers=headers,
                                          timeout=_transfer_timeout(client), allow_redirects=False,
                                          expect100=size > EXPECT_CONTINUE_OVER) as resp:
                raw = await _read_capped(resp, PROBLEM_MAX_BYTES)
                status, reason = resp.status, resp.reason
                retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
        except AnswerTooLarge as e:
            raise ServerUnreachable(client.base_url, f"upload of blob {sha256.hex()}: {e}") from None
        except aiohttp.ClientConnectorError as e:
            raise ServerUnreachable(client.base_url, _connect_reason(e)) from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ServerUnreachable(client.base_url, str(e) or type(e).__name__) from None
        if status == 201:
            import json

            doc = json.loads(raw)
            if doc.get("blob_id") != sha256.hex() or doc.get("size") != size:
                raise ApiError(status, {"title": "Bad response",
                                        "detail": f"the server stored {doc.get('blob_id')}, not {sha256.hex()}"})
            return sha256.hex()
        problem = _problem_from(status, reason, raw)
        delay = retry_503_delay("PUT", status, problem, retry_after, attempt)
        if delay is None:
            raise ApiError(status, problem)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class _Lane:
    """A serial worker: ``fn(block)`` runs in a thread of the lane's own, one block at a
    time, in order, while the event loop goes on receiving (two lanes use two threads).
    Up to ``ahead`` blocks wait or run at once (:data:`DOWNLOAD_AHEAD`); :meth:`submit`
    waits for the oldest beyond that.

    Its own thread, not the loop's shared pool: there, consecutive blocks of one lane
    went to whichever pool thread was idle, and a 256 MiB ``get_blob`` ran about a
    tenth slower (docs/benchmarks.md, "Blobs")."""

    def __init__(self, fn: Callable[[Any], Any], ahead: int | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.fn = fn
        self.ahead = DOWNLOAD_AHEAD if ahead is None else ahead  # read here: bench/probe_download_lanes.py sets it
        #: called in the event loop as soon as a block fails, before anyone awaits it
        self.on_error = on_error
        self._broken = False  # set and read in the lane's one thread only
        #: each block's future in the thread and the event loop's view of it, oldest first
        self.pending: collections.deque[tuple[concurrent.futures.Future[Any], asyncio.Future[Any]]] = \
            collections.deque()
        self._thread = _OwnThread()

    async def submit(self, data: Any) -> None:
        while len(self.pending) >= self.ahead:
            await self._oldest()
        work = self._thread.executor.submit(self._run, data)
        view = asyncio.wrap_future(work)
        if self.on_error is not None:
            view.add_done_callback(self._failed)
        self.pending.append((work, view))

    def _run(self, data: Any) -> Any:
        """In the lane's thread: a block after one that failed is not worked on (it would feed a
        decryptor that gave up, or write after a failed write); its error says so."""
        if self._broken:
            raise _AfterFailure("a block before it failed")
        try:
            return self.fn(data)
        except BaseException:
            self._broken = True
            raise

    def _failed(self, view: asyncio.Future[Any]) -> None:
        if self.on_error is not None and not view.cancelled() and view.exception() is not None:
            self.on_error(view.exception())

    async def _oldest(self) -> None:
        entry = self.pending[0]
        try:
            await entry[1]
        finally:
            if entry[1].done() and self.pending and self.pending[0] is entry:
                self.pending.popleft()

    def drop(self) -> None:
        """Cancel the blocks not started yet (the download failed or was cancelled: no use
        working on them); the one the thread is on goes on, and :meth:`drain` waits for it."""
        for work, view in self.pending:
            if work.cancel():
                view.add_done_callback(retrieve_exception)

    async def drain(self) -> None:
        """Wait for every block submitted and not dropped; the first block's error, if any, is
        raised once the others are done, and the blocks not started by then are dropped (a
        later block's error is taken as a consequence of it, and its work is of no use)."""
        first: BaseException | None = None
        while self.pending:
            if self.pending[0][0].cancelled():
                self.pending.popleft()
                continue
            try:
                await self._oldest()
            except Exception as e:  # noqa: BLE001 - raised below, after the rest
                if first is None:
                    first = e
                    self.drop()
        if first is not None:
            raise first

    def close(self) -> None:
        """End the thread, waiting for the block it may still be on: after a cancellation,
        :meth:`drain`'s await is gone but the thread is not, and the caller is about to close
        the file it writes to (found by a red-team test). Blocks for at most that one block's
        work (the blocks queued behind it are cancelled). An error of a block nobody awaits
        any more counts as retrieved."""
        self._thread.close(wait=True)
        while self.pending:
            self.pending.popleft()[1].add_done_callback(retrieve_exception)


class _AfterFailure(Exception):
    """A download's block that was not worked on, since one before it in its lane failed (the
    caller gets that one's error)."""


class _FirstFailure:
    """A download's lanes call it with a block's error: it keeps the first and closes
    :attr:`response`, so that a receive waiting on the server ends at once."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.response: Any = None

    def __call__(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            if self.response is not None:
                self.response.close()


class _OwnThread:
    """One worker thread, started when first used and ended by :meth:`close`."""

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unibus-blob")
        return self._executor

    def close(self, wait: bool = False) -> None:
        """End the thread; blocks not started yet are cancelled, and ``wait`` waits for the one
        it is on."""
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None


async def _receive(resp: Any, total: int, progress: Progress | None, hasher: _Lane, writer: _Lane,
                   first: Callable[[bytes], Awaitable[None]] | None) -> int:
    """Pass a response body on in blocks of about :data:`DOWNLOAD_BLOCK`, each a tuple of
    the pieces received (never joined: no copy): every block to ``hasher``, the first to
    ``first`` (if given, as one ``bytes``) and the others to ``writer``; return its size.

    ``readchunk`` hands over each piece as the connection received it
    (``readany`` joins the pieces waiting, a copy)."""
    done = 0
    pending: list[bytes] = []
    buffered = 0
    if progress:
        progress(0, total)

    async def flush() -> None:
        nonlocal buffered, first
        parts = tuple(pending)
        pending.clear()
        buffered = 0
        await hasher.submit(parts)
        if first is not None:
            await first(b"".join(parts))
            first = None
        else:
            await writer.submit(parts)

    read = resp.content.readchunk
    while True:
        data, _end_of_http_chunk = await read()
        if not data:
            if _end_of_http_chunk:
                continue
            break
        done += len(data)
        pending.append(data)
        buffered += len(data)
        if buffered >= DOWNLOAD_BLOCK:
            await flush()
        if progress:
            progress(done, total)
    if pending:
        await flush()
    await hasher.drain()
    await writer.drain()
    return done


@contextlib.contextmanager
def _large_reads(resp: Any) -> Iterator[None]:
    """Let the connection's transport read up to :data:`RECV_SIZE` bytes per ``recv`` while the
    body streams in (asyncio's default is 256 KiB), then put its default back (the
    connection returns to the pool for small requests)."""
    conn = getattr(resp, "connection", None)
    transport = getattr(conn, "transport", None)
    if transport is None or not isinstance(getattr(transport, "max_size", None), int):
        yield
        return
    transport.max_size = RECV_SIZE
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError):
            del transport.max_size  # the class's default again


async def _download(client: Any, room_id: str, blob_id: str, progress: Progress | None,
                    sink: Callable[[Sequence[bytes]], Any],
                    first: Callable[[bytes], Awaitable[None]] | None = None, max_size: int | None = None) -> int:
    """GET a blob and verify its SHA-256; return its size.

    Its bytes go, in blocks of about 1 MiB (a sequence of the pieces received)
    and in order, to ``sink`` (called in a worker thread), except the first
    block, which goes joined to ``await first(block)``
    when ``first`` is given. Hashing runs in another worker thread, so
    receiving, hashing and the sink overlap.
    """
    import aiohttp

    from ..signing import sign_request
    from .api import (AnswerTooLarge, ApiError, ServerUnreachable, _connect_reason, _parse_retry_after,
                      _problem_from, _read_capped, retry_503_delay)

    url = client.url_for(_blobs_path(room_id, blob_id))
    for attempt in itertools.count():
        headers = sign_request("GET", url.raw_path_qs, None, keyid=client.identity.handle,
                               private_key=client.identity.sign_key)
        headers["Accept"] = "application/octet-stream, application/problem+json"
        headers["Accept-Encoding"] = "identity"  # the blob's own bytes, which its id and length are of
        h = hashlib.sha256()
        # A block that fails (a record that does not open, a full disk) ends the download at once:
        # the response is closed, so a receive waiting on a server that stalls or resets ends too,
        # and the block's error is what the caller gets, never the closed connection's.
        failure = _FirstFailure()
        hasher = _Lane(functools.partial(_hash_parts, h), on_error=failure)
        writer = _Lane(sink, on_error=failure)
        try:
            async with client._http().get(url, headers=headers, timeout=_transfer_timeout(client),
                                          allow_redirects=False, read_bufsize=DOWNLOAD_BLOCK) as resp:
                failure.response = resp
                if resp.status != 200:
                    problem = _problem_from(resp.status, resp.reason, await _read_capped(resp, PROBLEM_MAX_BYTES))
                    delay = retry_503_delay("GET", resp.status, problem,
                                            _parse_retry_after(resp.headers.get("Retry-After")), attempt)
                    if delay is None:
                        raise ApiError(resp.status, problem)
                    await asyncio.sleep(delay)
                    continue
                want = "sha-256=:" + base64.b64encode(bytes.fromhex(blob_id)).decode() + ":"
                got = resp.headers.get("Content-Digest")
                if got is not None and got.replace(" ", "") != want:
                    raise BlobIntegrityError(f"the server's Content-Digest for blob {blob_id} names other bytes")
                # membershipd always says how long a blob is; a body without a length could go on
                # for ever, and get_raw_blob writes it all before the hash can refuse it (a red team)
                if resp.content_length is None:
                    raise BlobIntegrityError(f"the server sent blob {blob_id} without a Content-Length")
                total = resp.content_length
                if max_size is not None and total > max_size:
                    raise BlobIntegrityError(f"the server says blob {blob_id} holds {total} bytes, more than "
                                             f"max_size ({max_size})")
                with _large_reads(resp):
                    done = await _receive(resp, total, progress, hasher, writer, first)
        except AnswerTooLarge as e:
            raise ServerUnreachable(client.base_url, f"download of blob {blob_id}: {e}") from None
        except aiohttp.ClientConnectorError as e:
            raise ServerUnreachable(client.base_url, _connect_reason(e)) from None
        except (aiohttp.ClientError, TimeoutError) as e:
            # Bytes that were received and do not open (or could not be written) are the cause
            # whatever became of the connection after them: closed because a block failed, or
            # reset or stalled by the server before the failure was seen; so every block handed
            # over is finished first.
            for lane in (hasher, writer):
                if failure.error is not None:
                    lane.drop()  # a block failed already: what is queued is of no use
                try:
                    await lane.drain()
                except Exception as lane_error:  # noqa: BLE001 - kept as the cause, raised below
                    failure(lane_error)
            if failure.error is not None:
                raise failure.error from None
            raise ServerUnreachable(client.base_url, f"download of blob {blob_id} failed: "
                                    f"{str(e) or type(e).__name__}") from None
        finally:
            try:
                for lane in (hasher, writer):  # never leave a worker writing after we return
                    lane.drop()  # on success nothing is left; otherwise, what is queued is of no use
                    with contextlib.suppress(Exception):  # the first error is already on its way
                        await lane.drain()
            finally:
                hasher.close()
                writer.close()
        if total >= 0 and done != total:
            raise BlobIntegrityError(f"blob {blob_id}: got {done} of {total} bytes")
        if h.hexdigest() != blob_id:
            raise BlobIntegrityError(f"blob {blob_id}: the bytes received do not hash to its id")
        return done
    raise AssertionError("unreachable")


class _FileSink:
    """Writes the pieces it is given to ``fd`` (``writev``), and every :data:`WRITEBACK_EVERY`
    bytes starts the kernel's writeback of what it wrote, so that the fsync at
    the end waits only for the tail (as membershipd does with an upload)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = self.flushed = 0

    def __call__(self, parts: Sequence[Any]) -> None:
        _write_all(self.fd, parts)
        self.written += sum(len(p) for p in parts)
        if self.written - self.flushed >= WRITEBACK_EVERY:
            with contextlib.suppress(OSError, AttributeError):  # advice only (and Linux only)
                # from 0: the pages written back since the last call are dropped too, and recycled
                os.posix_fadvise(self.fd, 0, self.written, os.POSIX_FADV_DONTNEED)
            self.flushed = self.written


def _hash_parts(h: Any, parts: Sequence[bytes]) -> None:
    for p in parts:
        h.update(p)


def _temp_beside(out_path: Path) -> tuple[int, Path]:
    _replaceable(out_path)
    fd, name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".unibus-part", dir=out_path.parent)
    return fd, Path(name)


def _replaceable(out_path: Path) -> None:
    """Refuse an ``out_path`` that is there and is not a regular file: the rename would put the
    blob in place of a device, a pipe (`/dev/null`, as root, for every user) or a link."""
    try:
        st = os.lstat(out_path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):  # the rename would replace the link: `/dev/stdout`, as root (two reviews)
        raise FileExistsError(errno.EEXIST, f"is a symbolic link (to {os.readlink(out_path)}): give the file it "
                                            "names, or another path", str(out_path))
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory: give a file path to write", str(out_path))
    if not stat.S_ISREG(st.st_mode):
        raise FileExistsError(errno.EEXIST, "is not a regular file: give a file path to write", str(out_path))


async def get_raw_blob(client: Any, room_id: str, blob_id: str, out_path: str | os.PathLike[str], *,
                       progress: Progress | None = None, max_size: int | None = None) -> int:
    """Download a blob as it is stored (no decryption) to ``out_path``; return its size.

    Written to a temporary file beside ``out_path`` and renamed into place
    only once its SHA-256 matched ``blob_id``. Nothing checks the bytes before
    that, so a server may fill the disk up to the length it declares: give
    ``max_size`` (the size you expect, or the server's ``--blob-max-bytes``) to
    refuse a longer blob before a byte is written.
    """
    async with _replacing(Path(out_path)) as fd:
        return await _download(client, room_id, blob_id, progress, _FileSink(fd), max_size=max_size)


@contextlib.asynccontextmanager
async def _replacing(out_path: Path) -> AsyncIterator[int]:
    """The descriptor of a 0600 temporary file beside ``out_path``: fsynced and renamed over
    ``out_path`` when the block ends normally, removed when it raises."""
    fd, tmp = await _temp_in_thread(out_path)
    f = os.fdopen(fd, "wb", buffering=0)
    try:
        yield fd
        await asyncio.to_thread(_close_durably, f)
        await asyncio.to_thread(os.replace, tmp, out_path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


async def _temp_in_thread(out_path: Path) -> tuple[int, Path]:
    """:func:`_temp_beside` in a worker thread; a temporary file made for a caller that is gone
    (cancelled while the thread made it: a review) is closed and removed, not left beside
    ``out_path`` with its descriptor open."""
    return await _made_in_thread(lambda: _temp_beside(out_path), _remove_temp, str(out_path))


def _remove_temp(made: tuple[int, Path]) -> None:
    os.close(made[0])
    made[1].unlink(missing_ok=True)


def _close_durably(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


class _SourceChanged(OSError):
    pass


class _Stopped(Exception):
    """How the digest pass of a ``put_blob`` cancelled meanwhile ends (no caller sees it)."""


class _Gone(Exception):
    """How a worker's open for a ``put_blob``, or temporary file for a download, ends when its
    caller is gone (:func:`_made_in_thread`), the file closed (and the temporary one removed); no
    caller sees it."""


def _open_source(path: Path, same_as: tuple[int, int] | None = None) -> tuple[IO[bytes], tuple[int, int]]:
    """Open the file ``put_blob`` uploads, for one of its passes: a regular file only (a FIFO
    would block the open, a device such as /dev/zero never ends: red team), opened without
    blocking; with ``same_as``, it must be the file the first pass read (device and inode),
    else :class:`_SourceChanged`. Returns it, unbuffered, and its (device, inode)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file: put_blob uploads files", str(path))
        ident = (st.st_dev, st.st_ino)
        if same_as is not None and ident != same_as:
            raise _SourceChanged(f"{path} changed while it was being uploaded; nothing was stored")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0), ident
    except BaseException:
        os.close(fd)
        raise


class _SameRecords:
    """The upload pass of :func:`put_blob` may send only the records its digest pass sealed.

    Both passes seal with one key and one nonce per record, and the server
    sees the second (once per attempt: a 503 before the answer makes the
    client send it again). Were the file to change in between, the same key
    and nonce would seal other plaintext: two ciphertexts that XOR to the
    XOR of the plaintexts, and, for GCM, enough to forge tags under that key.
    Equal tags mean equal records (the same key, nonce and AAD), so every
    block's tags are compared with the digest pass's before it is handed
    over, in the worker thread that sealed it, and a block with another
    record is never sent: the upload stops (:attr:`changed`) instead.
    """

    def __init__(self, tags: bytes, chunk_size: int) -> None:
        self.tags = tags
        self.chunk_size = chunk_size
        self.changed = False

    def blocks(self, blocks: Iterator[Any]) -> Iterator[Any]:
        yield next(blocks)  # the header: the same file_id, epoch and version by construction
        done = 0
        for block in blocks:
            got = _record_tags(block, self.chunk_size)
            if self.tags[done:done + len(got)] != got:
                self.changed = True
                raise _SourceChanged("the file changed since it was sealed the first time; nothing was stored")
            done += len(got)
            yield block


async def _sealed_body(room_key: bytes, room_id: str, epoch: int, path: Path, ident: tuple[int, int],
                       file_id: bytes, version: int, size: int, same: _SameRecords,
                       progress: Progress | None) -> AsyncIterator[bytes | bytearray]:
    """The blob of ``path`` sealed again with the ``file_id`` and version of the digest pass: the
    same bytes, block by block, each sealed in a worker thread while the previous one is sent, and
    each checked to hold the records of the digest pass before it goes (:class:`_SameRecords`)."""
    loop = asyncio.get_running_loop()
    enc = BlobEncryptor(room_key, room_id, epoch, file_id=file_id, version=version)
    f, _ident = await _open_in_thread(path, ident)
    c = enc.chunk_size
    block = min(UPLOAD_BLOCK, max(c, -(-size // c) * c))  # a small file: buffers of its size only
    sealed = _sealed_blocks(enc, f, block, reuse=True)
    blocks = same.blocks(sealed)
    pending: asyncio.Future[Any] | None = None
    done = 0
    try:
        if progress:
            progress(0, size)
        pending = loop.run_in_executor(None, next, blocks, None)
        while True:
            # shielded: a cancelled caller leaves the job running, and ``pending`` not done
            # until it returns, so the close below waits for it
            block, pending = await asyncio.shield(pending), None
            if block is None:
                break
            done += len(block)
            if done > size:
                break
            pending = loop.run_in_executor(None, next, blocks, None)
            yield memoryview(block)  # a view: aiohttp slices it without a copy, and it keeps the buffer
            # from being reused (_BufferPool) until aiohttp and the transport let go of it
            if progress:
                progress(done, size)
        if done != size:
            raise _SourceChanged(f"{path} changed while it was being uploaded; nothing was stored")
    finally:
        def close(fut: asyncio.Future[Any] | None = None) -> None:
            if fut is not None:
                retrieve_exception(fut)  # the upload's own error is already on its way
            with contextlib.suppress(ValueError):
                blocks.close()
            with contextlib.suppress(ValueError):
                sealed.close()
            f.close()

        if pending is not None and not pending.done():
            pending.add_done_callback(close)  # never close the file under the worker reading it
        else:
            close(pending)


async def _then_close(f: IO[bytes], job: Callable[[], Any], stop: threading.Event) -> Any:
    """``job()`` in a worker thread; ``f`` is closed once that thread is done, even when the
    caller is cancelled first: a file closed under the thread would free its descriptor for
    the next open, which the thread would then read. A cancelled caller sets ``stop``, which
    the job checks before it queues each block for the hash, so that the thread ends
    within a few blocks (one read ahead, two queued at most), not at the file's end."""
    try:
        fut = asyncio.get_running_loop().run_in_executor(None, job)
    except BaseException:
        f.close()
        raise
    try:
        return await asyncio.shield(fut)  # cancelled, the caller leaves ``fut`` running, not done
    finally:
        if fut.done():
            f.close()
        else:
            stop.set()

            def close(done: asyncio.Future[Any]) -> None:
                retrieve_exception(done)  # the caller that wanted it is gone
                f.close()

            fut.add_done_callback(close)


async def _open_in_thread(path: Path, same_as: tuple[int, int] | None = None) -> tuple[IO[bytes], tuple[int, int]]:
    """:func:`_open_source` in a worker thread; a file opened for a caller that is gone is closed."""
    return await _made_in_thread(lambda: _open_source(path, same_as), lambda made: made[0].close(), str(path))


async def _made_in_thread(make: Callable[[], _T], undo: Callable[[_T], None], what: str) -> _T:
    """``make()`` in a worker thread. What it makes for a caller that is gone (cancelled, or the
    executor failed to start a thread for a job it had queued all the same) is undone with
    ``undo``: by the thread itself once made, or here if it was made already; never left to
    the garbage collector, never undone twice."""
    lock = threading.Lock()
    state: dict[str, Any] = {"gone": False, "made": None}

    def job() -> _T:
        made = make()
        with lock:
            if state["gone"]:
                undo(made)
                raise _Gone(what)
            state["made"] = (made,)
        return made

    fut: asyncio.Future[_T] | None = None
    try:
        fut = asyncio.get_running_loop().run_in_executor(None, job)
        return await asyncio.shield(fut)
    except BaseException:
        with lock:  # from here the thread undoes what it makes; what it made already is undone here
            state["gone"] = True
            made = state["made"]
        if made is not None:
            undo(made[0])
        if fut is not None:
            fut.add_done_callback(retrieve_exception)  # its _Gone, or make()'s own error: nobody waits for it
        raise


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


async def put_blob(client: Any, room_id: str, path: str | os.PathLike[str], progress: Progress | None = None, *,
                   tmp_dir: str | os.PathLike[str] | None = None) -> str:
    """Encrypt the file at ``path`` with the room's current key and upload it; return the blob id.

    Two passes over the file, no temporary file (docs/blobstore.md, "The
    client SDK"): the first seals it and hashes the ciphertext (the signed
    ``Content-Digest`` and the blob id need that hash before the body is
    sent); the second seals it again with the same file key and nonces, which
    gives the same bytes, and streams them up. A file that changes in
    between is refused (``OSError``) and nothing is stored: the server checks
    the digest. ``tmp_dir`` is accepted and unused (earlier releases wrote
    the ciphertext there). ``progress(bytes_done, total)`` follows the upload
    of the ciphertext. The key is the room's current one in the verified log
    (``UnibusClient.current_key``: a room that needs a rekey is rekeyed first
    when you may). Raises :class:`unibus.client.RekeyRequired`,
    :class:`unibus.client.VerificationError`, :class:`unibus.client.ApiError`, ``OSError``.
    """
    del tmp_dir
    validate_room_id(room_id)
    src = Path(path)
    epoch, key = await client.current_key(room_id)
    file_id = secrets.token_bytes(FILE_ID_SIZE)
    version = WRITE_VERSION
    tags = bytearray()
    before = await asyncio.to_thread(_stat_key, src)
    f, ident = await _open_in_thread(src)
    stop = threading.Event()
    ct = await _then_close(f, functools.partial(_encrypt_path, key, room_id, epoch, f, None, file_id=file_id,
                                                version=version, tags=tags, stop=stop), stop)
    same = _SameRecords(bytes(tags), CHUNK_SIZE)

    def changed() -> bool:
        try:
            return _stat_key(src) != before
        except OSError:
            return True

    try:
        return await _upload(client, room_id, ct.sha256, ct.size,
                             lambda: _sealed_body(key, room_id, epoch, src, ident, file_id, version, ct.size,
                                                  same, progress))
    except Exception:
        # A changed file stops the body before its first other record
        # (_SameRecords), or ends it early (another size), or is another file
        # (_open_source): nothing was stored.
        if same.changed or await asyncio.to_thread(changed):
            raise OSError(f"{src} changed while it was being uploaded; nothing was stored") from None
        raise


async def get_blob(client: Any, room_id: str, blob_id: str, out_path: str | os.PathLike[str],
                   progress: Progress | None = None) -> int:
    """Download a blob, verify it, decrypt it with the room key of its epoch into ``out_path``.

    Decrypts while downloading into a temporary file beside ``out_path``
    (mode 0600), which replaces ``out_path`` only when the whole blob
    authenticated and hashed to ``blob_id``; nothing is left behind on failure.
    Returns the plaintext size. Raises :class:`BlobFormatError` (not a blob of
    this room, tampered with, truncated), :class:`BlobIntegrityError`,
    :class:`unibus.client.KeyUnavailable` (the key of the blob's epoch was not
    sealed to you), :class:`unibus.client.VerificationError` (its key package
    does not verify), :class:`unibus.client.ApiError`.
    """
    async with _replacing(Path(out_path)) as fd:
        size, epoch = await _decrypt_into(client, room_id, blob_id, progress, fd)
    gone = client.verified.former_key_holders(room_id, epoch)
    if gone:  # a review: a removed member's blob, sealed with the key it kept, came through silently
        client.replica.notice(f"blob {blob_id} of room {room_id} was sealed under the key of epoch {epoch}, which "
                              f"these members also held and are not in the room now (or not as the member who "
                              f"held it): {', '.join(gone)}; a blob carries no signature of its uploader, so it "
                              "may be theirs")
    return size


async def _decrypt_into(client: Any, room_id: str, blob_id: str, progress: Progress | None,
                        fd: int) -> tuple[int, int]:
    """:func:`get_blob`'s download: verified, decrypted and written to ``fd``; the plaintext size
    and the epoch of its key."""
    dec = BlobDecryptor(room_id)
    written = 0
    sink = _FileSink(fd)

    def consume(parts: Sequence[bytes]) -> None:
        nonlocal written
        pt = dec.feed_view(parts)  # valid until the next call: written at once
        if pt:
            sink([pt])
            written += len(pt)

    async def first(data: bytes) -> None:
        consume([data])  # the header, and what follows it, held back until the key is set
        if dec.header is not None and not 1 <= dec.header.epoch <= _ROOM_EPOCH_MAX:
            raise BlobFormatError(f"blob {blob_id} names epoch {dec.header.epoch}, which no room key has "
                                  f"(epochs are 1 to {_ROOM_EPOCH_MAX}): not a blob of this room")
        if dec.needs_key:
            _epoch, key = await client.room_key(room_id, dec.header.epoch, legacy=True)  # a blob of 0.11 too
            dec.set_key(key)
            consume([])

    await _download(client, room_id, blob_id, progress, consume, first)
    last = dec.finish()
    _write_all(fd, [last])
    assert dec.header is not None  # finish() raised otherwise
    return written + len(last), dec.header.epoch


async def delete_blob(client: Any, room_id: str, blob_id: str) -> None:
    """``DELETE /v1/rooms/{id}/blobs/{blob_id}`` (the uploader, the room's owner, admins)."""
    await client.request("DELETE", _blobs_path(room_id, blob_id))
