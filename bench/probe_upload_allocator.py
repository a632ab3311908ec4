"""Probe: membershipd's side of an upload with glibc's allocator as membershipd sets it, and as glibc leaves it.

Not part of ``make bench`` (it writes no section; it prints). ``membershipd
serve`` keeps the receive buffers of an upload on glibc's heap
(``unibus.allocator``: ``mallopt`` with a fixed mmap threshold of 4 MiB and
a trim threshold of 32 MiB), unless the environment sets the allocator
itself. The probe uploads one file, as a raw PUT and with ``put_blob``, to a
membershipd of this tree started afresh for each setting in every round,
the two settings alternating: as membershipd sets the allocator, and as glibc
leaves it (``GLIBC_TUNABLES=glibc.malloc.perturb=0``, glibc's own default
for a tunable that changes nothing, which makes membershipd leave the
allocator alone). It prints, medians over every upload of a setting: wall
time per MB, membershipd's CPU time per MB and its minor page faults per MB
(``/proc/<pid>/stat``), and its resident memory after the upload.

    .venv/bin/python bench/probe_upload_allocator.py --rounds 6 --per 3 --mib 256
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_blobs  # noqa: E402 - the daemon and bootstrap of the blob bench

MIB = 1024 * 1024
SETTINGS = {"as membershipd sets it (this tree)": {},
            "as glibc leaves it": {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}}
#: What each setting's membershipd must log (unibus.allocator.tune), checked at every start.
SAYS = {"as membershipd sets it (this tree)": "allocator: blocks under",
        "as glibc leaves it": "allocator left as the environment sets it (GLIBC_TUNABLES)"}


def _stat(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main(rounds: int, per: int, mib: int, tmp: Path) -> None:
    from unibus import allocator
    from unibus.client import UnibusClient
    from unibus.client.blobs import delete_blob, put_blob, put_raw_blob
    from unibus.client.keys import generate_identity

    src = tmp / "src"
    with open(src, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    sha = hashlib.sha256(src.read_bytes()).digest()
    alice = generate_identity("alice")
    bench_blobs._bootstrap(tmp / "daemon", alice)
    clean = {k: v for k, v in os.environ.items() if not allocator.operator_settings({k: v})}
    kinds = ("raw PUT", "put_blob")
    results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {
        (s, k): [] for s in SETTINGS for k in kinds}
    mb = mib * MIB / 1e6
    log = tmp / "daemon.log"
    room = None
    for r in range(rounds):
        for setting in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
            logged = log.stat().st_size if log.exists() else 0
            daemon = bench_blobs._Daemon(tmp / "daemon", ["--blob-max-bytes", str(2 * mib * MIB + MIB)],
                                         env={**clean, **SETTINGS[setting]})
            try:
                with open(log, "rb") as f:
                    f.seek(logged)
                    if SAYS[setting].encode() not in f.read():
                        raise RuntimeError(f"membershipd did not log {SAYS[setting]!r}: see {log}")
                async with UnibusClient(daemon.base_url, alice, timeout=60) as c:
                    if room is None:
                        room = (await c.create_room("probe"))["room_id"]
                        await c.rekey(room)
                    await put_raw_blob(c, room, src, sha256=sha)  # warm-up, untimed
                    await delete_blob(c, room, sha.hex())
                    for i in range(per):
                        for kind in (kinds if i % 2 == 0 else kinds[::-1]):
                            cpu0, faults0 = _stat(daemon.pid)
                            t0 = time.perf_counter()
                            if kind == "raw PUT":
                                await put_raw_blob(c, room, src, sha256=sha)
                                blob_id = sha.hex()
                            else:
                                blob_id = await put_blob(c, room, src)
                            wall = time.perf_counter() - t0
                            cpu1, faults1 = _stat(daemon.pid)
                            results[(setting, kind)].append((wall * 1000 / mb, (cpu1 - cpu0) * 1000 / mb,
                                                             (faults1 - faults0) / mb, _rss_mib(daemon.pid)))
                            await delete_blob(c, room, blob_id)
            finally:
                daemon.stop()
        print(f"round {r + 1}/{rounds} done, 1-minute load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(f"{mib} MiB, {rounds} rounds of {per} uploads of each kind per setting, alternating; "
          f"1-minute load average {os.getloadavg()[0]:.1f} at the end")
    for kind in kinds:
        for setting in SETTINGS:
            res = results[(setting, kind)]
            walls = [x[0] for x in res]
            print(f"{kind}, allocator {setting}: {statistics.median(walls):.2f} ms per MB "
                  f"({min(walls):.2f}–{max(walls):.2f}); membershipd per MB: CPU "
                  f"{statistics.median(x[1] for x in res):.2f} ms, {statistics.median(x[2] for x in res):.0f} "
                  f"minor page faults; resident after {statistics.median(x[3] for x in res):.0f} MiB "
                  f"(at most {max(x[3] for x in res):.0f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds, each starting both daemons (default 6)")
    parser.add_argument("--per", type=int, default=3, help="uploads of each kind per daemon and round (default 3)")
    parser.add_argument("--mib", type=int, default=256, help="file size, MiB (default 256)")
    parser.add_argument("--scratch", type=Path, default=None, help="directory for the data (default: a temp dir)")
    ns = parser.parse_args()
    if ns.rounds < 1 or ns.per < 1 or ns.mib < 1:
        parser.error("--rounds, --per and --mib must be positive")
    with tempfile.TemporaryDirectory(prefix="unibus-probe-alloc-", dir=ns.scratch) as tmp:
        asyncio.run(main(ns.rounds, ns.per, ns.mib, Path(tmp)))
