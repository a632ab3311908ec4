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
  and uploaded again, as ``bench_blobs.py`` orders its transfers.

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
            kinds = ["client, cached", "client, from disk", "threads, cached", "client, after upload"]
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
        print(f"{kind:20} median {med(xs):6.0f} MB/s  ({min(xs):.0f}-{max(xs):.0f})")
    print(f"{'disk, sequential':20} median {med(disk):6.0f} MB/s  ({min(disk):.0f}-{max(disk):.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--mib", type=int, default=256, help="the blob, MiB (default 256)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
