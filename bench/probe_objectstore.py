"""Probe: what a 256 MiB blob costs the object store backend, in process (docs/benchmarks.md, "Blobs").

Not part of ``make bench`` (it writes no section; it prints). One nats-server
with JetStream of its own, one :class:`~unibus.plugins.blobstore.objectstore.ObjectStoreBackend`
in this process, one random blob of ``--mib`` MiB stored once, then ``--runs``
reads of it (``read``) or deletes and stores (``store``, handed over 4 MiB at a
time as the HTTP handler does). It prints the median MB/s and the CPU time per MB of
this process and of nats-server (from ``/proc``, which the machine's load
disturbs less than MB/s).

The knobs set the module's constants for the run, to compare them in one sitting
(run the settings alternately, a few times each: the VM's figures drift):
``--chunk`` (``CHUNK_SIZE``; the server's ``max_payload`` must take it, see
``--max-payload``), ``--read-ahead``, ``--put-window``, and ``--nats-read``
(nats-py's read size, a module global of that library, 32 KiB). ``--perf FILE``
records nats-server with ``perf record -g`` during the measured runs.

    .venv/bin/python bench/probe_objectstore.py --mode read --runs 5
    .venv/bin/python bench/probe_objectstore.py --mode store --runs 5 --put-window 8
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def probe(args: argparse.Namespace, scratch: Path) -> str:
    import nats
    import nats.aio.client as nats_client
    from unibus.plugins.blobstore import objectstore
    from unibus.plugins.blobstore.objectstore import ObjectStoreBackend

    if args.chunk:
        objectstore.CHUNK_SIZE = args.chunk
    if args.read_ahead:
        objectstore.READ_AHEAD = args.read_ahead
    if args.put_window:
        objectstore.PUT_WINDOW = args.put_window
    if args.nats_read:
        nats_client.DEFAULT_BUFFER_SIZE = args.nats_read
    size = args.mib * MIB
    data = os.urandom(size)
    sha = hashlib.sha256(data).digest()
    port = free_port()
    conf = scratch / "nats.conf"
    conf.write_text(f"max_payload: {args.max_payload}\n")
    server = subprocess.Popen([str(Path(sys.executable).with_name("nats-server")), "-c", str(conf), "-a", "127.0.0.1",
                               "-p", str(port), "-js", "-sd", str(scratch / "js")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    perf = None
    nc = None
    try:
        async def quiet(_e: Exception) -> None:  # "connection refused" until the server listens
            pass

        for _ in range(100):
            try:
                nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=1, max_reconnect_attempts=0,
                                        error_cb=quiet)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.1)
        if nc is None:
            raise RuntimeError("nats-server did not start")
        backend = ObjectStoreBackend(nc.jetstream(timeout=30), scratch / "blobs")
        await backend.start()
        parts = [data[i:i + 4 * MIB] for i in range(0, size, 4 * MIB)]  # what the HTTP handler hands over

        async def store() -> None:
            up = await backend.begin("r1")
            for part in parts:
                await up.write(part)
            if await up.finish() != sha:
                raise RuntimeError("wrong digest")
            await up.commit("probe")

        async def read() -> None:
            reader = await backend.open("r1", sha.hex())
            assert reader is not None
            async for _chunk in reader.chunks():
                pass
            await reader.close()

        await store()
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", str(args.perf), "-p", str(server.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(0.5)
        times = []
        server0, own0 = cpu_seconds(server.pid), time.process_time()
        for _ in range(args.runs):
            if args.mode == "store":
                await backend.delete("r1", sha.hex())
            t = time.perf_counter()
            await (store() if args.mode == "store" else read())
            times.append(time.perf_counter() - t)
        server1, own1 = cpu_seconds(server.pid), time.process_time()
        await backend.close()
        mb = size / 1e6
        return (f"{args.mode}: {mb / statistics.median(times):.0f} MB/s (median of {args.runs}; "
                f"{', '.join(f'{mb / t:.0f}' for t in times)}); CPU per MB: this process "
                f"{(own1 - own0) / (mb * args.runs) * 1e3:.2f} ms, nats-server "
                f"{(server1 - server0) / (mb * args.runs) * 1e3:.2f} ms")
    finally:
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        if nc is not None:
            await nc.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("read", "store"), default="read")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=0, help="CHUNK_SIZE for this run (bytes)")
    parser.add_argument("--read-ahead", type=int, default=0, help="READ_AHEAD for this run")
    parser.add_argument("--put-window", type=int, default=0, help="PUT_WINDOW for this run")
    parser.add_argument("--nats-read", type=int, default=0, help="nats-py's read size for this run (bytes)")
    parser.add_argument("--max-payload", default="1MB", help="the nats-server's max_payload (default 1MB, its own)")
    parser.add_argument("--perf", type=Path, default=None, help="record nats-server with perf into FILE")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.mib < 1:
        parser.error("--runs and --mib must be at least 1")
    with tempfile.TemporaryDirectory(prefix="unibus-probe-") as d:
        print(asyncio.run(probe(args, Path(d))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
