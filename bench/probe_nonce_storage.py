"""Probe: the nonce bucket in memory or on file, on a 3-node cluster (docs/operations.md, "The nonce epoch rule").

Not part of ``make bench`` (it writes no section; it prints). The bucket is
in memory so that a claim costs no fsync; on a cluster that has a price in
availability (after two of three nodes were down, a node that comes back
holds an empty copy, whose vote nats-server does not count toward a quorum),
and file storage would have a price in throughput. This measures the second.

Each round starts a cluster (``unibus.testing.Cluster``: three nodes on this
host, mutual route TLS, R3 buckets), with the bucket in memory as shipped or
on file (each node imports a ``sitecustomize`` that sets
``unibus.auth.NONCE_STORAGE``: nothing in membershipd reads a knob for it),
and sends signed ``GET /v1/me`` through node 1 from ``--threads`` threads for
``--seconds``; memory and file alternate, ``--runs`` rounds each. It prints
requests per second per round and the medians, with file's ratio to memory.

    .venv/bin/python bench/probe_nonce_storage.py --runs 3 --seconds 8 --threads 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = """import unibus.auth as _a
from nats.js.api import StorageType as _S
_a.NONCE_STORAGE = _S.FILE
"""


def one_round(directory: Path, storage: str, seconds: float, threads: int) -> float:
    from unibus.client.keys import generate_identity
    from unibus.testing import Cluster

    env = {}
    if storage == "file":
        site = directory / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITE)
        env["PYTHONPATH"] = str(site)
    cluster = Cluster(directory / "c", generate_identity("alice"), env=env)
    try:
        cluster.start()
        cluster.migrate()
        clients = [cluster.client(i) for i in range(3)]
        deadline = time.monotonic() + 60
        while not all(c.get("/v1/me")[0] == 200 for c in clients):  # every node serves the admin
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not serve the admin within 60 s")
            time.sleep(0.2)
        served, failed = [0] * threads, [0] * threads
        stop = time.monotonic() + seconds

        def work(i: int) -> None:
            while time.monotonic() < stop:
                status, _ = clients[0].get("/v1/me")
                if status == 200:
                    served[i] += 1
                else:
                    failed[i] += 1

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if sum(failed):
            print(f"  ({sum(failed)} requests not served)")
        return sum(served) / seconds
    finally:
        cluster.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    rates: dict[str, list[float]] = {"memory": [], "file": []}
    with tempfile.TemporaryDirectory(prefix="probe-nonce-storage-") as tmp:
        for run in range(args.runs):
            for storage in ("memory", "file"):
                directory = Path(tmp) / f"{storage}{run}"
                directory.mkdir()
                rate = one_round(directory, storage, args.seconds, args.threads)
                rates[storage].append(rate)
                print(f"round {run + 1} {storage:6} {rate:7.0f} signed requests/s", flush=True)
    memory, file = statistics.median(rates["memory"]), statistics.median(rates["file"])
    print(f"median: memory {memory:.0f}/s, file {file:.0f}/s, file/memory {file / memory:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
