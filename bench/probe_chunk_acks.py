"""Probe: the object store's put with its own chunk acknowledgements, against an earlier objectstore.py.

Not part of ``make bench`` (it writes no section; it prints). The blobstore's
chunks were published with nats-py's ``publish_async`` until 3251d68; since,
with :class:`unibus.plugins.blobstore.objectstore._ChunkAcks` (CHANGELOG.md).
This loads ``plugins/blobstore/objectstore.py`` of ``--before`` (git show) as a
module of the installed package beside this tree's, stores one random blob of
``--mib`` MiB with each in turn, ``--runs`` times each (alternating which goes
first), into a bucket of its own on one nats-server with JetStream, in this
process, handed over 4 MiB at a time as the HTTP handler does, and prints the
median MB/s and this process's CPU time per MB of each.

    .venv/bin/python bench/probe_chunk_acks.py --runs 10 --mib 128
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def load_before(commit: str, scratch: Path):
    """``objectstore.py`` of ``commit``, as ``unibus.plugins.blobstore._before`` (its relative imports
    then resolve to this tree's package)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:plugins/blobstore/objectstore.py"],
                            check=True, capture_output=True).stdout
    path = scratch / "objectstore_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("unibus.plugins.blobstore._before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def put(backend, data: bytes, piece: int = 4 * MIB) -> None:
    up = await backend.begin("probe")
    try:
        for i in range(0, len(data), piece):
            await up.write(data[i:i + piece])
        await up.finish()
        await up.commit("probe")
    finally:
        await up.abort()


async def probe(args: argparse.Namespace, scratch: Path) -> None:
    import nats

    from unibus.plugins.blobstore import objectstore
    from unibus.testing import NatsServer

    modules = {"this tree": objectstore, args.before: load_before(args.before, scratch)}
    server = NatsServer(scratch / "nats")
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream(timeout=30)
        data = os.urandom(args.mib * MIB)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in modules}
        for run in range(args.runs):
            for n, (name, module) in enumerate(modules.items() if run % 2 == 0 else reversed(modules.items())):
                bucket = f"probe{run}x{n}"
                backend = module.ObjectStoreBackend(js, scratch / bucket, bucket=bucket)
                await backend.start()
                cpu, wall = time.process_time(), time.perf_counter()
                await put(backend, data)
                results[name].append((time.perf_counter() - wall, time.process_time() - cpu))
                await backend.close()
                await js.delete_object_store(bucket)
        await nc.close()
    finally:
        server.stop()
    mb = len(data) / 1e6
    for name, runs in results.items():
        speeds = [mb / wall for wall, _ in runs]
        print(f"{name:>12}: {statistics.median(speeds):6.0f} MB/s ({min(speeds):.0f}-{max(speeds):.0f}), "
              f"CPU {statistics.median(cpu * 1e3 / mb for _, cpu in runs):.3f} ms/MB (median of {len(runs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--before", default="3251d68", help="a commit whose objectstore.py to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        asyncio.run(probe(args, Path(scratch)))


if __name__ == "__main__":
    main()
