"""/healthz and /metrics latency: does /healthz answer within 50 ms whatever NATS is doing?

The results are in docs/benchmarks.md ("/healthz under a frozen NATS").

Run with ``make bench`` or ``.venv/bin/python bench/bench_healthz.py [--requests 200]``.
Not a test: it prints a markdown table and writes it into docs/benchmarks.md
between the ``bench:healthz`` markers (other sections of that file are kept).

One real ``membershipd serve`` (embedded nats-server, ``--metrics-addr``) on
free loopback ports. ``GET /healthz`` and ``GET /metrics`` are timed one after
another over a kept-alive connection, ``--requests`` times each, in three
phases: NATS serving; nats-server frozen with SIGSTOP (its sockets stay open
and nothing answers: the worst case for a health check that asks NATS); and
after SIGCONT. For the frozen phase it also records how long /healthz took to
turn 503 after the freeze, and after the thaw how long until it is 200 again.
Every process started here is stopped in a ``finally``.
"""

from __future__ import annotations

import benchlib  # noqa: E402  (bench/ is on sys.path when run as a script)
import argparse
import http.client
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from unibus.testing import MembershipdProcess, free_port

BUDGET_MS = 50.0


def timed_gets(conn: http.client.HTTPConnection, path: str, n: int) -> tuple[list[float], dict[int, int]]:
    """``n`` sequential GETs; (wall ms of each, {status: count})."""
    samples, statuses = [], {}
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        samples.append((time.perf_counter() - t0) * 1000)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return samples, statuses


def wait_status(conn: http.client.HTTPConnection, want: int, timeout: float = 30.0) -> float:
    """Seconds until GET /healthz answers ``want`` (polled every 10 ms)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        r.read()
        if r.status == want:
            return time.monotonic() - t0
        time.sleep(0.01)
    raise TimeoutError(f"/healthz did not answer {want} within {timeout} s")


def row(phase: str, path: str, samples: list[float], statuses: dict[int, int]) -> str:
    q = statistics.quantiles(samples, n=100)
    codes = ", ".join(f"{k}×{v}" for k, v in sorted(statuses.items()))
    return (f"| {phase} | `{path}` | {statistics.median(samples):.1f} | {q[98]:.1f} | {max(samples):.1f} | "
            f"{codes} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per path and phase (default 200)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows: list[str] = []
    worst_healthz = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-healthz-") as tmp:
        port = free_port()
        daemon = MembershipdProcess(Path(tmp) / "data", ["--metrics-addr", f"127.0.0.1:{port}"]).start()
        try:
            api = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=30)
            metrics = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            timed_gets(api, "/healthz", 20)  # warm up
            timed_gets(metrics, "/metrics", 5)
            for path, conn in (("/healthz", api), ("/metrics", metrics)):
                samples, statuses = timed_gets(conn, path, args.requests)
                rows.append(row("NATS serving", path, samples, statuses))
                if path == "/healthz":
                    worst_healthz = max(worst_healthz, max(samples))
            nats_pid = daemon.nats_pid()
            assert nats_pid is not None
            os.kill(nats_pid, signal.SIGSTOP)
            try:
                to_degraded = wait_status(api, 503)
                for path, conn in (("/healthz", api), ("/metrics", metrics)):
                    samples, statuses = timed_gets(conn, path, args.requests)
                    rows.append(row("nats-server frozen (SIGSTOP)", path, samples, statuses))
                    if path == "/healthz":
                        worst_healthz = max(worst_healthz, max(samples))
            finally:
                os.kill(nats_pid, signal.SIGCONT)
            to_ok = wait_status(api, 200)
            samples, statuses = timed_gets(api, "/healthz", args.requests)
            rows.append(row("after SIGCONT", "/healthz", samples, statuses))
            worst_healthz = max(worst_healthz, max(samples))
        finally:
            daemon.stop()
    load_after = os.getloadavg()[0]
    verdict = "within" if worst_healthz <= BUDGET_MS else "**over**"
    body = (
        f"{benchlib.measured_by(f'bench/bench_healthz.py --requests {args.requests}')}; "
        f"{benchlib.load_average(load_before, load_after)}.\n\n"
        "Sequential GETs over one kept-alive connection to a real `membershipd serve` (embedded nats-server, "
        "`--metrics-addr`), in milliseconds. /healthz reads what the background prober last saw (every 1 s, "
        "each probe within 1 s) and makes no NATS round trip itself, so freezing nats-server changes its "
        "answer, not its latency.\n\n"
        "| phase | path | median ms | p99 ms | max ms | statuses |\n|---|---|---:|---:|---:|---|\n"
        + "\n".join(rows) + "\n\n"
        f"/healthz turned 503 {to_degraded:.2f} s after the freeze and 200 again {to_ok:.2f} s after SIGCONT. "
        f"The slowest /healthz of all phases took {worst_healthz:.1f} ms: {verdict} the {BUDGET_MS:.0f} ms "
        "budget.\n"
    )
    return benchlib.publish(body, "healthz", "## /healthz under a frozen NATS", write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
