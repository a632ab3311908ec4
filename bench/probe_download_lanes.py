"""Probe: how many blocks a download's two threads may have queued (docs/benchmarks.md, "Blobs").

Not part of ``make bench`` (it writes no section; it prints). A download hands
its blocks (``DOWNLOAD_BLOCK``, 4 MiB) to two threads, one hashing and one
decrypting and writing, each holding up to ``DOWNLOAD_AHEAD`` of them
(``unibus.client.blobs._Lane``). The probe starts one membershipd of this tree
on loopback (as ``bench_blobs.py`` starts it), uploads one blob with
``put_blob``, then downloads it with ``get_blob`` ``--runs`` times for each
setting of ``--ahead``, the settings alternating (forwards in even runs,
backwards in odd ones), and prints MB/s (median, worst–best) and CPU per MB of
the client and of membershipd (from ``/proc``).

``--no-sha-ext`` runs it as ``bench_blobs.py --no-sha-ext`` does: OpenSSL in
this process and membershipd told not to use the CPU's SHA extensions.

    .venv/bin/python bench/probe_download_lanes.py --runs 8 --mib 256
    .venv/bin/python bench/probe_download_lanes.py --runs 8 --mib 256 --no-sha-ext
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system time of ``pid``, its ended threads and waited-for children included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICKS


async def probe(mib: int, runs: int, settings: list[int]) -> dict[int, dict[str, list[float]]]:
    import bench_blobs
    import unibus.client.blobs as blobs
    from unibus.client import UnibusClient
    from unibus.client.keys import generate_identity

    out: dict[int, dict[str, list[float]]] = {a: {"mb_s": [], "client": [], "daemon": []} for a in settings}
    tmp = Path(tempfile.mkdtemp(prefix="unibus-probe-lanes-"))
    daemon = None
    try:
        src = tmp / "src"
        bench_blobs.write_random(src, mib * MIB)
        alice = generate_identity("alice")
        bench_blobs._bootstrap(tmp / "daemon", alice)
        daemon = bench_blobs._Daemon(tmp / "daemon", ["--blob-max-bytes", str(2 * mib * MIB + MIB)])
        async with UnibusClient(daemon.base_url, alice, timeout=60) as c:
            rid = (await c.create_room("probe"))["room_id"]
            await c.rekey(rid)
            blob_id = await blobs.put_blob(c, rid, src, tmp_dir=tmp)
            size = blobs.ciphertext_size(mib * MIB) / 1e6
            for r in range(runs):
                for ahead in settings if r % 2 == 0 else settings[::-1]:
                    blobs.DOWNLOAD_AHEAD = ahead
                    me, dm = cpu_seconds(os.getpid()), cpu_seconds(daemon.pid)
                    t = time.perf_counter()
                    await blobs.get_blob(c, rid, blob_id, tmp / "out")
                    wall = time.perf_counter() - t
                    out[ahead]["mb_s"].append(size / wall)
                    out[ahead]["client"].append((cpu_seconds(os.getpid()) - me) / size * 1000)
                    out[ahead]["daemon"].append((cpu_seconds(daemon.pid) - dm) / size * 1000)
                    (tmp / "out").unlink()
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="downloads per setting (default 8)")
    parser.add_argument("--mib", type=int, default=256, help="the blob's size, MiB (default 256)")
    parser.add_argument("--ahead", default="1,2", help="the settings of DOWNLOAD_AHEAD to compare (default 1,2)")
    parser.add_argument("--no-sha-ext", action="store_true", help="OpenSSL told not to use SHA extensions (x86)")
    args = parser.parse_args()
    try:
        settings = [int(a) for a in args.ahead.split(",")]
    except ValueError:
        settings = []
    if args.runs < 1 or args.mib < 1 or not settings or min(settings) < 1:
        print("probe_download_lanes.py: --runs, --mib and every --ahead must be positive integers", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_blobs

    if args.no_sha_ext and os.environ.get("OPENSSL_ia32cap") is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OPENSSL_ia32cap": bench_blobs.NO_SHA_MASK})
    out = asyncio.run(probe(args.mib, args.runs, settings))
    print(f"get_blob of {args.mib} MiB, {args.runs} runs per setting, OPENSSL_ia32cap="
          f"{os.environ.get('OPENSSL_ia32cap', '(unset)')}, 1-minute load {os.getloadavg()[0]:.1f} at the end")
    print("| DOWNLOAD_AHEAD | MB/s, median (worst–best) | client CPU ms/MB | membershipd CPU ms/MB |")
    print("|---:|---:|---:|---:|")
    for a, row in out.items():
        print(f"| {a} | {statistics.median(row['mb_s']):,.0f} ({min(row['mb_s']):,.0f}–{max(row['mb_s']):,.0f}) | "
              f"{statistics.median(row['client']):.2f} | {statistics.median(row['daemon']):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
