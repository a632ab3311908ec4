"""Probe: nonce claims gathered into deeper batches, against ``unibus.pubacks`` as it is (docs/benchmarks.md, "Signed requests: reading").

Not part of ``make bench`` (it writes no section; it prints). Both servers
are bench_signed.py's baseline C: one Ed25519 verify and the request's nonce
claimed through :class:`unibus.auth.NonceStore`, each against a bare
nats-server of its own started in membershipd's environment.

* ``as is``: :class:`unibus.pubacks.PubAckClient` unchanged. A write goes out
  on the next loop tick once the replies to the last one are in (about 4 to 9
  claims per write under bench_signed.py's load).
* ``gathered``: the variant defined here. After the replies to a write of
  more than 4 claims, the next write waits until as many claims are queued
  as that write carried, or ``--cap-ms`` at most. Smaller writes go out as
  before, so a lightly loaded server is not delayed.

Each load alternates the two servers, ``--runs`` times each.

* Closed loop (bench_signed.py's load generator): ``--concurrency`` workers,
  each sending its next request when its last one is answered.
* Open loop: requests start at a fixed ``--rate`` per second, answered or
  not, over up to 64 connections, the way independent clients arrive.

The probe prints, for each load, requests per second, its ratio to ``as
is`` run by run, p50 and p99 latency, and CPU µs per request of the server
and of its nats-server (medians).

    .venv/bin/python bench/probe_claim_gather.py --runs 8 --concurrency 2,8,32 --rate 1000,3000,6000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_signed  # noqa: E402
from benchlib import PYTHON, proc_cpu_split, sign_batch, stop_process, wait_ready_line  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
VARIANTS = ("as is", "gathered")
#: Writes of at most this many claims never make the next one wait.
GATHER_OVER = 4
OPEN_LOOP_CONNECTIONS = 64


def gather_claims(cap: float) -> None:
    """Patch :class:`unibus.pubacks.PubAckClient` in this process into the ``gathered`` variant."""
    from unibus.pubacks import PubAckClient

    flush = PubAckClient._flush

    def _maybe_flush(self: Any) -> None:
        if self._proto is None or self._unreplied or not self._outbox:
            return
        last = getattr(self, "_last_write", 0)
        enough = last <= GATHER_OVER or len(self._outbox) >= last
        if self._flush_handle is not None:
            if not enough or not isinstance(self._flush_handle, asyncio.TimerHandle):
                return
            self._flush_handle.cancel()  # a timed wait that the queue has now filled
            self._flush_handle = None
        loop = self._proto.loop
        self._flush_handle = loop.call_soon(self._flush) if enough else loop.call_later(cap, self._flush)

    def _flush(self: Any) -> None:
        self._last_write = len(self._outbox)
        flush(self)

    PubAckClient._maybe_flush = _maybe_flush
    PubAckClient._flush = _flush


def role_open_loop(url: str, requests_path: Path, warmup: int, rate: float) -> int:
    """Start every request of the file at ``rate`` per second; print bench_signed's JSON result line."""
    import aiohttp
    import yarl

    all_headers: list[dict[str, str]] = json.loads(requests_path.read_text())
    target = yarl.URL(url, encoded=True)

    async def main() -> dict[str, Any]:
        statuses: collections.Counter[int] = collections.Counter()
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=OPEN_LOOP_CONNECTIONS)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            async def one(headers: dict[str, str], record: bool) -> None:
                t0 = time.perf_counter()
                async with session.get(target, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                if record:
                    latencies.append(time.perf_counter() - t0)

            loop = asyncio.get_running_loop()
            start, cpu0, t0 = loop.time(), time.process_time(), time.perf_counter()
            tasks = []
            for i, headers in enumerate(all_headers):
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(headers, i >= warmup)))
            await asyncio.gather(*tasks)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        latencies.sort()
        n = len(latencies)
        return {"n": n, "seconds": elapsed, "rps": len(all_headers) / elapsed, "p50": latencies[n // 2],
                "p99": latencies[min(n - 1, int(n * 0.99))], "statuses": {str(k): v for k, v in statuses.items()},
                "cpu": cpu}

    print(json.dumps(asyncio.run(main())), flush=True)
    return 0


def run_load(url: str, pids: dict[str, int], headers: list[dict[str, str]], warmup: int, load: tuple[str, float],
             scratch: Path) -> dict[str, float]:
    """One load-generator process; its result with the servers' CPU µs per request."""
    req_file = scratch / "requests.json"
    req_file.write_text(json.dumps(headers))
    kind, amount = load
    argv = [PYTHON, SCRIPT, "--role", kind, "--url", url + bench_signed.PATH, "--requests-file", str(req_file),
            "--warmup", str(warmup), "--amount", str(amount)]
    before = {k: sum(proc_cpu_split(pid)) for k, pid in pids.items()}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        stop_process(proc)
    after = {k: sum(proc_cpu_split(pid)) for k, pid in pids.items()}
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    if set(res["statuses"]) != {"200"}:
        raise RuntimeError(f"non-200 answers: {res['statuses']}")
    res.update({k: (after[k] - before[k]) / len(headers) * 1e6 for k in pids})
    return res


def start_server(variant: str, cap_ms: float, body: Path, nats_url: str) -> tuple[subprocess.Popen, str]:
    from unibus.testing import free_port

    port = free_port()
    proc = subprocess.Popen([PYTHON, SCRIPT, "--role", "serve", "--variant", variant, "--amount", str(cap_ms),
                             "--port", str(port), "--body-file", str(body), "--url", nats_url],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_ready_line(proc, bench_signed.START_TIMEOUT)
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"http://127.0.0.1:{port}"


def orchestrate(ns: argparse.Namespace) -> int:
    from unibus.client.keys import generate_identity

    loads = [("loadgen", c) for c in ns.concurrency] + [("open", r) for r in ns.rate]
    identity = generate_identity(bench_signed.HANDLE)
    scratch = Path(tempfile.mkdtemp(prefix="unibus-probe-gather-"))
    procs: list[subprocess.Popen] = []
    try:
        body = scratch / "body.json"
        body.write_text(json.dumps({"handle": bench_signed.HANDLE}))
        servers = {}
        for variant in VARIANTS:
            nats, port, _monitor = bench_signed.start_bare_nats(scratch, variant.replace(" ", "-"))
            procs.append(nats)
            server, url = start_server(variant, ns.cap_ms, body, f"nats://127.0.0.1:{port}")
            procs.append(server)
            servers[variant] = (url, {"server": server.pid, "nats-server": nats.pid})
        for load in loads:
            results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
            for r in range(ns.runs):
                for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                    headers = sign_batch(identity, ns.requests + ns.warmup)
                    url, pids = servers[variant]
                    results[variant].append(run_load(url, pids, headers, ns.warmup, load, scratch))
            what = f"closed loop, {load[1]:g} workers" if load[0] == "loadgen" else f"open loop, {load[1]:g} req/s"
            print(f"{what} ({ns.runs} runs each, alternating; load average {os.getloadavg()[0]:.1f}):")
            for variant in VARIANTS:
                res, base = results[variant], results["as is"]
                ratio = [a["rps"] / b["rps"] for a, b in zip(res, base, strict=True)]
                med = lambda key, res=res: statistics.median(x[key] for x in res)  # noqa: E731
                print(f"  {variant:9} {med('rps'):7,.0f} req/s, ÷ as is {statistics.median(ratio):.0%} "
                      f"({min(ratio):.0%}–{max(ratio):.0%}), p50 {med('p50') * 1e3:.2f} ms, "
                      f"p99 {med('p99') * 1e3:.2f} ms, CPU µs/req: server {med('server'):.0f}, "
                      f"nats-server {med('nats-server'):.0f}", flush=True)
    finally:
        for proc in reversed(procs):  # each server before its nats-server
            stop_process(proc)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def numbers(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of numbers") from None
    if any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: every number must be positive")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="runs of each variant per load (default 8)")
    parser.add_argument("--requests", type=int, default=10000, help="timed requests per run (default 10000)")
    parser.add_argument("--warmup", type=int, default=1000, help="untimed requests first in each run (default 1000)")
    parser.add_argument("--concurrency", type=numbers, default=[2.0, 8.0, 32.0],
                        help="closed-loop loads: workers, comma-separated (default 2,8,32)")
    parser.add_argument("--rate", type=numbers, default=[1000.0, 3000.0, 6000.0],
                        help="open-loop loads: requests per second, comma-separated (default 1000,3000,6000)")
    parser.add_argument("--cap-ms", type=float, default=2.0, help="the longest a gathered write waits (default 2)")
    # hidden: the child roles
    parser.add_argument("--role", choices=("serve", "loadgen", "open"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--amount", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--requests-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--body-file", type=Path, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.role == "serve":
        if ns.variant == "gathered":
            gather_claims(ns.amount / 1000)
        return bench_signed.role_server("claim", ns.port, ns.body_file, nats_url=ns.url)
    if ns.role == "loadgen":
        return bench_signed.role_loadgen(ns.url, ns.requests_file, ns.warmup, int(ns.amount))
    if ns.role == "open":
        return role_open_loop(ns.url, ns.requests_file, ns.warmup, ns.amount)
    if ns.runs < 1 or ns.requests < 100 or ns.warmup < 32 or not 0 < ns.cap_ms <= 100:
        parser.error("need --runs ≥ 1, --requests ≥ 100, --warmup ≥ 32 and 0 < --cap-ms ≤ 100")
    if ns.requests + ns.warmup > 25000:
        parser.error("--requests + --warmup must stay ≤ 25000 (each batch must be served within the 60 s skew window)")
    return orchestrate(ns)


if __name__ == "__main__":
    sys.exit(main())
