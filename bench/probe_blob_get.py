"""Probe: what bounds a raw blob download here (docs/benchmarks.md, "Blobs: what was tried and not kept").

Not part of ``make bench`` (it writes no section; it prints). One membershipd,
one raw blob of ``--mib`` MiB, then rounds of three downloads in alternating
order, each to its own file, fsynced:

- ``client, cached``: ``unibus.client.blobs.get_raw_blob`` (aiohttp), the
  blob's file in membershipd's page cache;
- ``client, from disk``: the same, the file's pages dropped first
  (``POSIX_FADV_DONTNEED``), as after an upload, whose early writeback drops
  them (docs/blobstore.md, "The data path");
- ``threads, cached``: a second transport, ``http.client`` in a worker thread
  reading with ``readinto`` into four reused 4 MiB buffers, SHA-256 and
  ``write`` in another thread.
- ``client, after upload``: ``get_raw_blob`` right after the blob was deleted
  and uploaded again, as ``bench_blobs.py`` orders its transfers;
- ``protocol, …``: no HTTP client library at all: an
  :class:`asyncio.BufferedProtocol` on the event loop receives straight into
  four reused 4 MiB buffers (``recv_into``, no ``bytes`` made per piece), and
  hands each to two threads as the client's lanes do (the writer is the
  client's own, ``_FileSink``). ``hash+write`` does
  both, as ``get_raw_blob``; ``receive only``, ``hash only`` and ``write
  only`` leave the others out, which splits a download into its parts
  (the page cache is warm for all of them).

And the disk itself: a plain sequential read of a dropped 256 MiB file.

    .venv/bin/python bench/probe_blob_get.py --runs 7 --mib 256
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_model, med, start_membershipd

BUF = 4 << 20


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def thread_get(port: int, target: str, identity: Any, out: Path) -> str:
    """GET ``target`` with a blocking http.client in this thread; hash and write in another."""
    from unibus.signing import sign_request

    headers = sign_request("GET", target, None, keyid=identity.handle, private_key=identity.sign_key)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", target, headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"GET {target}: {resp.status}")
    h = hashlib.sha256()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(4):
        free.put(bytearray(BUF))

    def consume() -> None:
        while (item := full.get()) is not None:
            buf, n = item
            view = memoryview(buf)[:n]
            h.update(view)
            os.write(fd, view)
            free.put(buf)

    worker = threading.Thread(target=consume)
    worker.start()
    try:
        while True:
            buf = free.get()
            view, n = memoryview(buf), 0
            while n < BUF and (k := resp.readinto(view[n:])):
                n += k
            if n:
                full.put((buf, n))
            if n < BUF:
                break
    finally:
        full.put(None)
        worker.join(60)
        os.fsync(fd)
        os.close(fd)
        conn.close()
    return h.hexdigest()


class _Receiver(asyncio.BufferedProtocol):
    """An HTTP/1.1 response received into reused buffers: ``blocks`` yields ``(buffer, n)``, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.free = [bytearray(BUF) for _ in range(4)]
        self.blocks: asyncio.Queue[tuple[bytearray, int] | None] = asyncio.Queue()
        self.head = bytearray()
        self.length = -1
        self.got = 0
        self.cur: bytearray | None = None
        self.pos = 0
        self.transport: Any = None
        self._scratch = bytearray(64 << 10)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> Any:
        if self.length < 0:
            return self._scratch
        if self.cur is None:
            self.cur, self.pos = self.free.pop(), 0
        return memoryview(self.cur)[self.pos:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.length < 0:
            self.head += self._scratch[:nbytes]
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.head[:end]).split(b"\r\n")
            if lines[0].split()[1] != b"200":
                raise RuntimeError(f"the probe's GET got {lines[0]!r}")
            self.length = next(int(v) for k, _, v in (x.partition(b":") for x in lines[1:])
                               if k.strip().lower() == b"content-length")
            rest = bytes(self.head[end + 4:])
            if rest:
                self.cur, self.pos = self.free.pop(), len(rest)
                self.cur[:len(rest)] = rest
                self.got = len(rest)
                self._maybe_full()
            return
        self.pos += nbytes
        self.got += nbytes
        self._maybe_full()

    def _maybe_full(self) -> None:
        assert self.cur is not None
        if self.pos == len(self.cur) or self.got >= self.length:
            self.blocks.put_nowait((self.cur, self.pos))
            self.cur = None
            if not self.free:
                self.transport.pause_reading()

    def give_back(self, buf: bytearray) -> None:
        self.free.append(buf)
        if len(self.free) == 1 and self.got < self.length:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.blocks.put_nowait(None)


async def protocol_get(port: int, target: str, identity: Any, out: Path, *, hash_it: bool,
                       write_it: bool) -> str:
    """GET ``target`` through :class:`_Receiver`; hash and write each block in a thread of its own."""
    from concurrent.futures import ThreadPoolExecutor

    from unibus.client.blobs import _FileSink
    from unibus.signing import sign_request

    loop = asyncio.get_running_loop()
    headers = sign_request("GET", target, None, keyid=identity.handle, private_key=identity.sign_key)
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    h = hashlib.sha256()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    hasher, writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    write = _FileSink(fd)  # the client's own writer: writev, and its writeback advice every 8 MiB

    transport, proto = await loop.create_connection(lambda: _Receiver(loop), "127.0.0.1", port)
    try:
        transport.write(request.encode())
        held: list[tuple[bytearray, list[asyncio.Future[Any]]]] = []
        got = 0
        while (item := await asyncio.wait_for(proto.blocks.get(), 60)) is not None:
            buf, n = item
            view = memoryview(buf)[:n]
            jobs = []
            if hash_it:
                jobs.append(loop.run_in_executor(hasher, h.update, view))
            if write_it:
                jobs.append(loop.run_in_executor(writer, write, [view]))
            held.append((buf, jobs))
            if len(held) > 1:  # one block in the threads while the next is received
                old, old_jobs = held.pop(0)
                await asyncio.gather(*old_jobs)
                proto.give_back(old)
            got += n
            if got >= proto.length:
                break
        for _, jobs in held:
            await asyncio.gather(*jobs)
        if got != proto.length:
            raise RuntimeError(f"the probe's GET ended after {got} of {proto.length} bytes")
    finally:
        transport.close()
        hasher.shutdown()
        writer.shutdown()
        if write_it:
            os.fsync(fd)
        os.close(fd)
    return h.hexdigest()


def disk_read_mb_s(scratch: Path, size: int = 256 << 20) -> float:
    path = scratch / "disk-probe"
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    drop(path)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = memoryview(bytearray(BUF))
        while f.readinto(buf):
            pass
    took = time.perf_counter() - started
    path.unlink()
    return size / took / 1e6


async def run(args: argparse.Namespace) -> None:
    from unibus.client import UnibusClient
    from unibus.client.blobs import delete_blob, get_raw_blob, put_raw_blob
    from unibus.client.keys import generate_identity
    from unibus.testing import bootstrap_member

    scratch = Path(tempfile.mkdtemp(prefix="probe-blob-get-"))
    alice = generate_identity("alice")
    bootstrap_member(scratch / "data", alice, "admin")
    daemon = start_membershipd(scratch / "data", "--blob-max-bytes", str(args.mib << 21))
    size = args.mib << 20
    try:
        async with UnibusClient(daemon.base_url, alice) as client:
            room = (await client.create_room("probe"))["room_id"]
            src = scratch / "src"
            src.write_bytes(os.urandom(size))
            blob_id = await put_raw_blob(client, room, src)
            stored = scratch / "data" / "blobs" / room / blob_id / "data"
            port = int(daemon.base_url.rsplit(":", 1)[1])
            target = f"/v1/rooms/{room}/blobs/{blob_id}"
            kinds = ["client, cached", "client, from disk", "threads, cached", "client, after upload",
                     "protocol, hash+write", "protocol, receive only", "protocol, hash only",
                     "protocol, write only"]
            results: dict[str, list[float]] = {k: [] for k in kinds}
            disk: list[float] = []
            for rnd in range(args.runs):
                print(f"round {rnd + 1}/{args.runs}", file=sys.stderr)
                for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                    out = scratch / "out"
                    if kind.endswith("after upload"):
                        await delete_blob(client, room, blob_id)
                        await put_raw_blob(client, room, src)
                    elif kind.endswith("from disk"):
                        drop(stored)
                    else:
                        stored.read_bytes()  # in the page cache
                    started = time.perf_counter()
                    if kind.startswith("client"):
                        await get_raw_blob(client, room, blob_id, out)
                    elif kind.startswith("protocol"):
                        part = kind.split(", ")[1]
                        hash_it, write_it = part in ("hash+write", "hash only"), part in ("hash+write", "write only")
                        digest = await protocol_get(port, target, alice, out, hash_it=hash_it, write_it=write_it)
                        if hash_it and digest != blob_id:
                            raise RuntimeError("the protocol download hashed to another id")
                    elif await asyncio.to_thread(thread_get, port, target, alice, out) != blob_id:
                        raise RuntimeError("the threaded download hashed to another id")
                    results[kind].append(size / (time.perf_counter() - started) / 1e6)
                    out.unlink()
                disk.append(disk_read_mb_s(scratch))
    finally:
        daemon.stop()
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, {args.mib} MiB, {args.runs} rounds, "
          f"1-minute load average {os.getloadavg()[0]:.1f} at the end")
    for kind, xs in results.items():
        print(f"{kind:24} median {med(xs):6.0f} MB/s  ({min(xs):.0f}-{max(xs):.0f})")
    print(f"{'disk, sequential':24} median {med(disk):6.0f} MB/s  ({min(disk):.0f}-{max(disk):.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--mib", type=int, default=256, help="the blob, MiB (default 256)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
