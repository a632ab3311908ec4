"""Probe: the first pass of ``put_blob``, its block size and queue depth (docs/benchmarks.md, "Blobs").

Not part of ``make bench`` (it writes no section; it prints). The first pass
of :func:`unibus.client.blobs.put_blob` seals the file block by block in one
thread and hashes the sealed blocks in a second (``_encrypt_path``), with up
to ``DIGEST_AHEAD`` blocks of ``DIGEST_BLOCK`` bytes queued for the hash. The
probe runs that pass over one file in the page cache for each setting, the
settings alternating (forwards in even runs, backwards in odd ones), and
prints the wall time per MB (median, best–worst) and this process's CPU time
per MB (median) next to the two floors of the same runs: SHA-256 of the file read in 1 MiB
pieces in one thread (the pass cannot be faster than its hash) and the
setting of the tree before (1 MiB blocks, one queued).

With ``--put``, it times whole ``put_blob`` uploads instead, against a
membershipd of this tree on loopback (started as ``bench_blobs.py`` starts
it), the tree's setting and the one before alternating, each blob deleted
after its upload; membershipd's CPU comes from ``/proc``.

    .venv/bin/python bench/probe_digest_pass.py --runs 7 --mib 256
    .venv/bin/python bench/probe_digest_pass.py --put --runs 10 --mib 256
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
#: (block, queued): the tree's setting first, then the one before it, then the neighbours
SETTINGS = [(256 * 1024, 2), (1024 * 1024, 1), (256 * 1024, 1), (256 * 1024, 3), (128 * 1024, 2),
            (512 * 1024, 2), (1024 * 1024, 2)]


def read_and_hash(path: Path) -> None:
    h = hashlib.sha256()
    buf = bytearray(MIB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def puts(runs: int, mib: int, tmp: Path) -> None:
    """Whole ``put_blob`` uploads, the tree's setting and the one before alternating."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_blobs
    from unibus.client import UnibusClient, blobs
    from unibus.client.keys import generate_identity

    src = tmp / "src"
    with open(src, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    alice = generate_identity("alice")
    bench_blobs._bootstrap(tmp / "daemon", alice)
    kinds = {f"put_blob, {blobs.DIGEST_BLOCK // 1024} KiB, {blobs.DIGEST_AHEAD} queued (this tree)":
             (blobs.DIGEST_BLOCK, blobs.DIGEST_AHEAD), "put_blob, 1024 KiB, 1 queued (before)": (MIB, 1)}
    tree = (blobs.DIGEST_BLOCK, blobs.DIGEST_AHEAD)
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    mb = mib * MIB / 1e6
    daemon = None
    try:
        daemon = bench_blobs._Daemon(tmp / "daemon", ["--blob-max-bytes", str(2 * mib * MIB + MIB)])
        async with UnibusClient(daemon.base_url, alice, timeout=60) as c:
            rid = (await c.create_room("probe"))["room_id"]
            await c.rekey(rid)
            await blobs.delete_blob(c, rid, await blobs.put_blob(c, rid, src))  # warm-up, untimed
            for r in range(runs):
                for name in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):
                    blobs.DIGEST_BLOCK, blobs.DIGEST_AHEAD = kinds[name]
                    t0, c0, d0 = time.perf_counter(), time.process_time(), _cpu_seconds(daemon.pid)
                    blob_id = await blobs.put_blob(c, rid, src)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    results[name].append((wall * 1000 / mb, cpu * 1000 / mb,
                                          (_cpu_seconds(daemon.pid) - d0) * 1000 / mb))
                    await blobs.delete_blob(c, rid, blob_id)
                print(f"run {r + 1}/{runs} done", file=sys.stderr)
    finally:
        blobs.DIGEST_BLOCK, blobs.DIGEST_AHEAD = tree
        if daemon is not None:
            daemon.stop()
    print(f"{mib} MiB put_blob, {runs} of each, alternating; 1-minute load average {os.getloadavg()[0]:.1f} at the end")
    for name, res in results.items():
        walls = [x[0] for x in res]
        print(f"{name}: {statistics.median(walls):.2f} ms per MB ({min(walls):.2f}–{max(walls):.2f}), "
              f"{1000 / statistics.median(walls):,.0f} MB/s; CPU per MB: client "
              f"{statistics.median(x[1] for x in res):.2f} ms, membershipd {statistics.median(x[2] for x in res):.2f} ms")


def main(runs: int, mib: int, scratch: Path | None) -> None:
    from unibus.client import blobs

    key = secrets.token_bytes(32)
    tree = (blobs.DIGEST_BLOCK, blobs.DIGEST_AHEAD)
    kinds = ["read and SHA-256 only"] + [f"{b // 1024} KiB, {a} queued" for b, a in SETTINGS]
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="unibus-probe-digest-", dir=scratch) as tmp:
        src = Path(tmp) / "src"
        with open(src, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MIB))
        read_and_hash(src)  # in the page cache from here on
        mb = mib * MIB / 1e6
        try:
            for r in range(runs):
                order = list(range(len(kinds))) if r % 2 == 0 else list(range(len(kinds)))[::-1]
                for i in order:
                    t0, c0 = time.perf_counter(), time.process_time()
                    if i == 0:
                        read_and_hash(src)
                    else:
                        blobs.DIGEST_BLOCK, blobs.DIGEST_AHEAD = SETTINGS[i - 1]
                        blobs._encrypt_path(key, "probe1", 1, src, None, tags=bytearray())
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    results[kinds[i]].append((wall * 1000 / mb, cpu * 1000 / mb))
                print(f"run {r + 1}/{runs} done", file=sys.stderr)
        finally:
            blobs.DIGEST_BLOCK, blobs.DIGEST_AHEAD = tree
    print(f"{mib} MiB, {runs} runs of each, alternating; this tree: {tree[0] // 1024} KiB, {tree[1]} queued; "
          f"1-minute load average {os.getloadavg()[0]:.1f} at the end")
    for name, res in results.items():
        walls = [x[0] for x in res]
        print(f"{name}: {statistics.median(walls):.3f} ms per MB ({min(walls):.3f}–{max(walls):.3f}), "
              f"CPU {statistics.median(x[1] for x in res):.3f} ms per MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="passes of each setting (default 7)")
    parser.add_argument("--mib", type=int, default=256, help="file size, MiB (default 256)")
    parser.add_argument("--scratch", type=Path, default=None, help="directory for the file (default: a temp dir)")
    parser.add_argument("--put", action="store_true", help="time whole put_blob uploads to a membershipd instead")
    ns = parser.parse_args()
    if ns.runs < 1 or ns.mib < 1:
        parser.error("--runs and --mib must be positive")
    if ns.put:
        with tempfile.TemporaryDirectory(prefix="unibus-probe-digest-", dir=ns.scratch) as tmp:
            asyncio.run(puts(ns.runs, ns.mib, Path(tmp)))
    else:
        main(ns.runs, ns.mib, ns.scratch)
