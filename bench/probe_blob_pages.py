"""Probe: is an uploaded blob still in the page cache, and what does a download right after it cost?

Not part of ``make bench`` (it writes no section; it prints). One membershipd
of this tree, one raw blob of ``--mib`` MiB. Each round:

1. ``PUT`` the blob (``put_raw_blob``), then count how much of its stored file
   is in the page cache (``fincore`` from util-linux, when installed);
2. ``GET`` it at once with a client that discards the bytes (``http.client``
   in a thread, 4 MiB ``readinto``): what membershipd's side of a download
   right after an upload costs, without the client's writes;
3. the same ``GET`` with the file's pages dropped (``POSIX_FADV_DONTNEED``)
   after they were read once: a read from disk of a file written a while ago;
4. the same ``GET`` from the page cache;
5. ``DELETE`` the blob.

docs/benchmarks.md ("Blobs: what was tried and not kept") has what it showed
for uploads that dropped their pages as they were written back and for
uploads that keep them (the code here). ``--daemon-python`` runs another
version's membershipd, e.g. the commit before uploads kept their pages, as
``bench/baseline.py`` builds it (the client and the data dir stay this tree's)::

    .venv/bin/python bench/probe_blob_pages.py --runs 5 --mib 256
    .venv/bin/python bench/probe_blob_pages.py --runs 5 --mib 256 \
        --daemon-python "$(.venv/bin/python bench/baseline.py prepare e24dd35)"
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_model, daemon_env, med
from probe_blob_get import drop

BUF = 4 << 20


def cached_mib(path: Path) -> str:
    """MiB of ``path`` in the page cache (``fincore``), or "?" without the tool."""
    tool = shutil.which("fincore")
    if tool is None:
        return "?"
    out = subprocess.run([tool, "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, timeout=30, check=False).stdout.split()
    return f"{int(out[0]) >> 20}" if out and out[0].isdigit() else "?"


def discarding_get(port: int, target: str, identity: Any) -> int:
    """GET ``target`` and throw the bytes away; the number of bytes."""
    from unibus.signing import sign_request

    headers = sign_request("GET", target, None, keyid=identity.handle, private_key=identity.sign_key)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"GET {target}: {resp.status}")
        buf, n = memoryview(bytearray(BUF)), 0
        while k := resp.readinto(buf):
            n += k
        return n
    finally:
        conn.close()


async def run(args: argparse.Namespace) -> None:
    from unibus.client import UnibusClient
    from unibus.client.blobs import delete_blob, put_raw_blob
    from unibus.client.keys import generate_identity
    from unibus.testing import MembershipdProcess, bootstrap_member

    size = args.mib << 20
    kinds = ("right after the upload", "pages dropped after a read", "from the page cache")
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    cached: list[str] = []
    with tempfile.TemporaryDirectory(prefix="probe-blob-pages-") as tmp:
        scratch = Path(tmp)
        alice = generate_identity("alice")
        bootstrap_member(scratch / "data", alice, "admin")
        daemon = MembershipdProcess(scratch / "data", ["--blob-max-bytes", str(size * 2)],
                                    command=[args.daemon_python, "-m", "unibus.cli"])
        daemon.env = daemon_env()
        try:
            daemon.start(timeout=60)
            port = int(daemon.base_url.rsplit(":", 1)[1])
            async with UnibusClient(daemon.base_url, alice) as client:
                room = (await client.create_room("probe"))["room_id"]
                src = scratch / "src"
                src.write_bytes(os.urandom(size))
                for rnd in range(args.runs):
                    print(f"round {rnd + 1}/{args.runs}", file=sys.stderr)
                    blob_id = await put_raw_blob(client, room, src)
                    stored = scratch / "data" / "blobs" / room / blob_id / "data"
                    cached.append(cached_mib(stored))
                    target = f"/v1/rooms/{room}/blobs/{blob_id}"
                    for kind in kinds:
                        if kind.startswith("pages dropped"):
                            drop(stored)
                        started = time.perf_counter()
                        got = await asyncio.to_thread(discarding_get, port, target, alice)
                        rates[kind].append(got / (time.perf_counter() - started) / 1e6)
                    await delete_blob(client, room, blob_id)
        finally:
            daemon.stop()
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, {args.mib} MiB, {args.runs} rounds, "
          f"1-minute load average {os.getloadavg()[0]:.1f} at the end")
    print(f"cached after each upload (MiB of {args.mib}): {', '.join(cached)}")
    for kind, xs in rates.items():
        print(f"GET {kind:28} median {med(xs):6.0f} MB/s  ({min(xs):.0f}-{max(xs):.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--mib", type=int, default=256, help="the blob, MiB (default 256)")
    parser.add_argument("--daemon-python", default=sys.executable,
                        help="the python whose unibus runs membershipd (default: this one)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
