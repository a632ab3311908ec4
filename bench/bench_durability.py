"""Durability benchmark (docs/operations.md, "Durability"): what fsync-before-acknowledgement and memory nonces cost, before and after.

Run with ``.venv/bin/python bench/bench_durability.py [--runs 3] [--requests 6000] [--writes 150]
[--no-cluster] [--no-write]``. Not a test: it prints markdown and writes it into
docs/benchmarks.md between the ``bench:durability`` markers (other sections are kept).

Two configurations of the same code, measured in the same run, their runs
interleaved (before, after, after, before, ...):

* **before**: nats-server's default sync (``sync_interval`` 2 min: a write is
  acknowledged while it is only in the page cache) and the nonce bucket on
  file storage: what membershipd did before durable writes;
* **after**: ``sync_interval: always`` and the nonce bucket in memory with
  the epoch floor (docs/operations.md, "Durability"): what it does now.

Every daemon runs through a hidden wrapper (``--role daemon before|after``)
that, for ``before`` only, sets ``unibus.natsconf.JETSTREAM_SYNC`` and
``unibus.auth.NONCE_STORAGE`` back before membershipd's own ``main`` starts;
the configuration each one really got is read back (``/varz`` sync_always,
the nonce stream's storage) and printed.

Measured:

1. single node: signed ``GET /v1/me`` throughput and CPU per request (the
   load generator of bench_signed.py: 32 in flight, pre-signed requests);
2. single node: membership-write latency, ``PATCH /v1/members/bob`` one at a
   time (SQLite with ``synchronous=FULL`` either way; the nonce claim differs);
3. single node: after a restart, how long until a freshly signed request is
   served (the nonce floor; before, the file bucket survived the restart);
4. three nodes (R3, route TLS: ``unibus.testing.Cluster``), unless
   ``--no-cluster``: membership-write latency and signed throughput through
   one node; and, when strace can attach, the syscall order of one member
   change on every node (the Raft log's fsync against membershipd's ``201``).

Every process started here is stopped in a ``finally``; everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import benchlib  # noqa: E402  (bench/ is on sys.path when run as a script)
from benchlib import PYTHON, REPO
import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_signed

sys.path.insert(0, str(REPO / "tests"))  # the strace helpers of the tests (tests/straced.py)
SCRIPT = str(Path(__file__).resolve())
HEADING = "## Durability"
MODES = ("before", "after")
FORM_TIMEOUT = 120.0


# =============================================================================
# The wrapper role: membershipd, configured as before or as now
# =============================================================================


def role_daemon(mode: str, argv: list[str]) -> int:
    if mode == "before":
        from nats.js.api import StorageType

        import unibus.auth
        import unibus.natsconf

        unibus.natsconf.JETSTREAM_SYNC = "2m"  # nats-server's default: fsync every 2 minutes
        unibus.auth.NONCE_STORAGE = StorageType.FILE
    from unibus.cli import main as membershipd

    return membershipd(argv)


def wrapped(node: Any, mode: str) -> None:
    """Make a MembershipdProcess run through the wrapper role (argv: python -m unibus.cli serve ...)."""
    assert node.argv[1:3] == ["-m", "unibus.cli"], node.argv
    node.argv = [PYTHON, SCRIPT, "--role", "daemon", mode, *node.argv[3:]]
    node.env = benchlib.daemon_env()


# =============================================================================
# Measurements
# =============================================================================


@dataclass
class Mode:
    throughput: list[bench_signed.RunResult] = field(default_factory=list)
    writes: list[float] = field(default_factory=list)  # seconds per write, every write of every run
    restart_wait: list[float] = field(default_factory=list)  # healthy -> first fresh 200, seconds
    restart_refused: list[int] = field(default_factory=list)
    c_throughput: list[bench_signed.RunResult] = field(default_factory=list)
    c_writes: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    strace: list[str] = field(default_factory=list)


async def configuration(node: Any) -> dict[str, Any]:
    """What the node's nats-server and nonce bucket really run with."""
    import nats

    seed = (node.data_dir / "system.nkey").read_text().strip()
    nc = await nats.connect(node.nats_url, nkeys_seed_str=seed, allow_reconnect=False, connect_timeout=3)
    try:
        varz = json.loads((await nc.request("$SYS.REQ.SERVER.PING.VARZ", b"", timeout=5)).data)["data"]
    finally:
        await nc.close()
    nc = await nats.connect(node.nats_url, nkeys_seed=str(node.data_dir / "service.nkey"), allow_reconnect=False,
                            connect_timeout=3)
    try:
        info = await nc.jetstream(timeout=5).stream_info("KV_unibus_nonces")
    finally:
        await nc.close()
    return {"sync_always": bool(varz["jetstream"]["config"].get("sync_always")),
            "nonce storage": str(getattr(info.config.storage, "value", info.config.storage))}


async def write_latencies(base_url: str, admin: Any, target: str, n: int) -> list[float]:
    """``n`` role changes of ``target``, one at a time, each timed from send to answer."""
    from unibus.client import UnibusClient

    out = []
    async with UnibusClient(base_url, admin, timeout=30) as client:
        await client.me()  # the connection is open
        for i in range(n):
            t0 = time.perf_counter()
            await client.set_role(target, "admin" if i % 2 == 0 else "member")
            out.append(time.perf_counter() - t0)
    return out


async def first_fresh_200(base_url: str, identity: Any, limit: float = 120.0) -> tuple[float, int]:
    """Seconds until a freshly signed GET /v1/me is served, and how many were refused (503) before."""
    import aiohttp

    t0 = time.perf_counter()
    refused = 0
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() - t0 < limit:
            headers = benchlib.signed_headers(identity)
            async with s.get(base_url + "/v1/me", headers=headers) as r:
                await r.read()
                if r.status == 200:
                    return time.perf_counter() - t0, refused
                refused += 1
            await asyncio.sleep(0.02)
    raise TimeoutError(f"no fresh request served within {limit} s of the restart")


def throughput(node: Any, identity: Any, ns: argparse.Namespace, scratch: Path, label: str) -> bench_signed.RunResult:
    target = bench_signed.Target(label, label, node.base_url, {"server": node.pid, "nats-server": node.nats_pid()})
    return bench_signed.run_load(target, benchlib.sign_batch(identity, ns.requests + ns.warmup), ns.warmup, scratch)


def strace_one_change(cluster: Any, admin: Any, scratch: Path) -> list[str]:
    """One member change through node 1 with strace on every nats-server and node 1's membershipd."""
    from straced import SENDS, SYNCS, WRITES, Tracer, can_trace, first, synced_after

    from unibus.client import UnibusClient
    from unibus.client.keys import generate_identity

    reason = can_trace()
    if reason:
        return [f"strace could not run here ({reason.strip()})"]
    serving = cluster.nodes[0]
    handle = "strace" + os.urandom(3).hex()
    who = generate_identity(handle)
    pids = [n.nats_pid() for n in cluster.nodes]

    async def change() -> None:
        async with UnibusClient(serving.base_url, admin, timeout=30) as a:
            await a.me()
            with Tracer([serving.pid, *pids], scratch / f"trace-{handle}") as tracer:
                await a.add_member(handle, who.sign_pub_b64, who.enc_pub_b64, bus_pub=who.bus_pub)
            out.append(tracer)

    out: list[Any] = []
    asyncio.run(change())
    tracer = out[0]
    reply = first(tracer.calls(serving.pid), lambda c: c.name in SENDS and "HTTP/1.1 201" in c.args)
    lines = []
    for node, pid in zip(cluster.nodes, pids):
        calls = tracer.calls(pid)
        wal = first(calls, lambda c: c.name in WRITES and "/_js_/" in c.path and handle in c.args)
        sync = synced_after(calls, wal) if wal is not None else None
        syncs = sum(1 for c in calls if c.name in SYNCS)
        if wal is None:
            lines.append(f"{node.data_dir.name}: the change is not in its Raft log writes")
        elif sync is None or reply is None:
            lines.append(f"{node.data_dir.name}: Raft log written, **no fsync** of it in the trace "
                         f"({syncs} fsync-family calls in all)")
        else:
            when = (sync.end - reply.start) * 1e3
            lines.append(f"{node.data_dir.name}: Raft log written, fsync ended {abs(when):.1f} ms "
                         f"{'before' if when <= 0 else '**after**'} membershipd's 201 ({syncs} fsync-family calls "
                         "in all)")
    return lines


def single_node(ns: argparse.Namespace, tmp: Path, results: dict[str, Mode]) -> None:
    from unibus.client.keys import generate_identity
    from unibus.testing import MembershipdProcess, bootstrap_member

    alice, bob = generate_identity("alice"), generate_identity("bob")
    daemons: dict[str, Any] = {}
    try:
        for mode in MODES:
            data_dir = tmp / f"single-{mode}"
            bootstrap_member(data_dir, alice, role="admin")
            bootstrap_member(data_dir, bob, role="member")
            d = MembershipdProcess(data_dir)
            wrapped(d, mode)
            d.start(timeout=60)
            daemons[mode] = d
            results[mode].config["single node"] = asyncio.run(configuration(d))
            print(f"single node, {mode}: {results[mode].config['single node']}", file=sys.stderr)
        for i in range(ns.runs):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                d, m = daemons[mode], results[mode]
                r = throughput(d, alice, ns, tmp, f"single-{mode}")
                m.throughput.append(r)
                w = asyncio.run(write_latencies(d.base_url, alice, "bob", ns.writes))
                m.writes += w
                d.stop()
                d = daemons[mode] = d.again()
                d.start(timeout=60)
                wait, refused = asyncio.run(first_fresh_200(d.base_url, alice))
                m.restart_wait.append(wait)
                m.restart_refused.append(refused)
                print(f"run {i + 1}/{ns.runs} single {mode}: {r.rps:.0f} req/s (CPU µs/req {r.cpu_us}), write p50 "
                      f"{statistics.median(w) * 1e3:.2f} ms; after a restart the first fresh request served "
                      f"{wait:.2f} s after /healthz (503 × {refused})", file=sys.stderr)
    finally:
        for d in daemons.values():
            d.stop()


def cluster(ns: argparse.Namespace, tmp: Path, results: dict[str, Mode]) -> None:
    from bench_failover import wait_streams_ready
    from unibus.client.keys import generate_identity
    from unibus.testing import Cluster, bootstrap_member

    clusters: dict[str, Any] = {}
    alice, bob = generate_identity("alice"), generate_identity("bob")
    try:
        for mode in MODES:
            root = tmp / f"cluster-{mode}"
            c = Cluster(root, alice)
            bootstrap_member(c.nodes[0].data_dir, bob, role="member")
            for node in c.nodes:
                wrapped(node, mode)
            clusters[mode] = c
            c.start()
            c.migrate()
            results[mode].config["cluster"] = asyncio.run(configuration(c.nodes[0]))
            print(f"cluster, {mode}: {results[mode].config['cluster']}", file=sys.stderr)
        for c in clusters.values():
            seed = {"nkeys_seed": str(c.nodes[0].data_dir / "service.nkey")}
            asyncio.run(wait_streams_ready([c.nodes[0].nats_url], ["KV_unibus_state", "KV_unibus_nonces"], seed))
            deadline = time.monotonic() + 60
            while True:  # node 1 serves alice (the KV watch has her)
                try:
                    asyncio.run(write_latencies(c.nodes[0].base_url, alice, "bob", 1))
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        for i in range(ns.runs):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                c, m = clusters[mode], results[mode]
                r = throughput(c.nodes[0], alice, ns, tmp, f"cluster-{mode}")
                m.c_throughput.append(r)
                w = asyncio.run(write_latencies(c.nodes[0].base_url, alice, "bob", ns.writes))
                m.c_writes += w
                print(f"run {i + 1}/{ns.runs} cluster {mode}: {r.rps:.0f} req/s, write p50 "
                      f"{statistics.median(w) * 1e3:.2f} ms", file=sys.stderr)
        for mode, c in clusters.items():
            results[mode].strace = strace_one_change(c, alice, tmp)
            print(f"strace, cluster {mode}: " + "; ".join(results[mode].strace), file=sys.stderr)
    finally:
        for c in clusters.values():
            c.stop()


# =============================================================================
# Report
# =============================================================================


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def mmm(xs: Sequence[float], fmt: str = "{:,.0f}") -> str:
    return benchlib.cells(xs, fmt)


def throughput_row(mode: str, runs: Sequence[bench_signed.RunResult], writes: Sequence[float]) -> str:
    """req/s min | median | max, CPU µs per request of membershipd and nats-server, write p50 and p99 in ms."""
    return (f"| {mode} | {mmm([r.rps for r in runs])} "
            f"| {statistics.median([r.cpu_us['server'] for r in runs]):.0f} "
            f"| {statistics.median([r.cpu_us['nats-server'] for r in runs]):.0f} "
            f"| {pct(writes, 0.5) * 1e3:.2f} | {pct(writes, 0.99) * 1e3:.2f} |")


def cpu_ratios(after: Sequence[bench_signed.RunResult], before: Sequence[bench_signed.RunResult]) -> str:
    """CPU per request after / before, median over runs, per process: the steadier figure on a loaded machine."""
    parts = []
    for key, label in (("server", "membershipd"), ("nats-server", "nats-server"), ("load generator", "load generator")):
        x = statistics.median([r.cpu_us[key] for r in after])
        y = statistics.median([r.cpu_us[key] for r in before])
        parts.append(f"{label} {x / y:.0%}")
    return ", ".join(parts)


def render(ns: argparse.Namespace, results: dict[str, Mode], environment: str) -> str:
    b, a = results["before"], results["after"]
    out = [environment, "",
           ("**before**: nats-server's default `sync_interval` (2 min: acknowledged before any fsync), nonce bucket on "
            "file storage. **after**: `sync_interval: always`, nonce bucket in memory with the epoch floor "
            "([operations.md, Durability](operations.md#durability)). Same code, same machine, runs interleaved; "
            "the configuration each daemon really ran with was read back from it:"), ""]
    for mode in MODES:
        out.append(f"- {mode}: " + "; ".join(f"{k}: {v}" for k, v in results[mode].config.items()))
    out += ["", "### Single node", "",
            (f"Signed `GET /v1/me`, {ns.requests:,} timed requests per run after {ns.warmup:,} untimed, 32 in flight "
             "(bench_signed.py's load generator). Membership writes: `PATCH /v1/members/bob` (a logged change, one "
             f"SQLite transaction with `synchronous=FULL` in both), {ns.writes} one at a time per run."), "",
            "| | req/s min | median | max | CPU µs/req membershipd | nats-server | write p50 ms | write p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    out += [throughput_row(mode, results[mode].throughput, results[mode].writes) for mode in MODES]
    ratios = [x.rps / y.rps for x, y in zip(a.throughput, b.throughput)]
    out += ["", (f"Signed throughput after / before, run by run: {mmm(ratios, '{:.0%}').replace(' | ', ' / ')} "
                 f"(min / median / max; the aim: a drop of at most 5%, i.e. ≥ 95%). CPU per request after / before "
                 f"(medians): {cpu_ratios(a.throughput, b.throughput)}. The load generator does the same work in "
                 "both configurations, so its change is this machine's noise (CPU frequency, cache and scheduler "
                 "contention from other work): read the others against it."), "",
            ("After a restart of the node (SIGTERM, start, `/healthz` 200), freshly signed requests until one is "
             "served: before, the file bucket survived and the first one is; after, the memory bucket is new and its "
             "floor is the high-water mark (the last second a request was accepted in): a request created at or "
             "before it is refused (`503`, retried by clients). A start waits for the floor to pass (at most 3 s) "
             "before it opens HTTP, so a freshly signed request is past it by the time `/healthz` answers; a client "
             "whose clock runs ahead of the server's pushes the floor further (docs/operations.md, \"The nonce "
             "epoch rule\"):"), "",
            "| | first fresh request served after (s): min | median | max | refused before it (median) |",
            "|---|---:|---:|---:|---:|"]
    for mode in MODES:
        m = results[mode]
        out.append(f"| {mode} | {mmm(m.restart_wait, '{:.2f}')} | {statistics.median(m.restart_refused):.0f} |")
    if a.c_throughput:
        out += ["", "### Three nodes (R3)", "",
                ("Through node 1 of three on this one machine (route TLS, `--kv-replicas 3`): the same signed load, "
                 "and the same role changes, now written to the state bucket's Raft group: after, the leader fsyncs "
                 "its log, then a follower fsyncs its own before the write is acknowledged."), "",
                "| | req/s min | median | max | CPU µs/req membershipd | nats-server | write p50 ms | write p99 ms |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        out += [throughput_row(mode, results[mode].c_throughput, results[mode].c_writes) for mode in MODES]
        cr = [x.rps / y.rps for x, y in zip(a.c_throughput, b.c_throughput)]
        out += ["", (f"Signed throughput after / before (cluster, run by run): {mmm(cr, '{:.0%}').replace(' | ', ' / ')}. "
                        f"CPU per request after / before (medians): {cpu_ratios(a.c_throughput, b.c_throughput)}.")]
        if a.strace or b.strace:
            out += ["", ("The proof, one member change through node 1 with `strace -f -ttt -T -yy -e "
                         "trace=fsync,fdatasync,…,pwrite64,writev,sendto` attached to every nats-server and to node "
                         "1's membershipd (tests/straced.py; the same check as tests/e2e/test_cluster_faults.py):"),
                    ""]
            for mode in MODES:
                out.append(f"- {mode}: " + "; ".join(results[mode].strace))
    out += ["", "Reproduce with:", "", "```",
            f".venv/bin/python bench/bench_durability.py --runs {ns.runs} --requests {ns.requests} --writes {ns.writes}",
            "```"]
    return "\n".join(out) + "\n"


def environment_line(ns: argparse.Namespace, load_before: float, load_after: float) -> str:
    from importlib.metadata import version

    cmd = f"bench/bench_durability.py --runs {ns.runs} --requests {ns.requests} --writes {ns.writes}"
    return (f"{benchlib.measured_by(cmd)}, nats-py {version('nats-py')}, {benchlib.nats_server_version()}; "
            f"{benchlib.load_average(load_before, load_after)} (everything shares the two cores, other work on the machine included; the "
            "disk is a virtio disk whose fsync returns in well under a millisecond, so a disk that really flushes "
            "costs more per fsync).")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:2] == ["--role", "daemon"]:  # membershipd's own flags follow
        return role_daemon(args[2], args[3:])
    parser = benchlib.arg_parser(__doc__, "durability", 3, "runs per configuration")
    parser.add_argument("--requests", type=int, default=6000, help="timed signed requests per run (default 6000)")
    parser.add_argument("--warmup", type=int, default=600, help="untimed requests first in each run (default 600)")
    parser.add_argument("--writes", type=int, default=150, help="membership writes per run (default 150)")
    parser.add_argument("--no-cluster", action="store_true", help="single node only")
    ns = parser.parse_args(args)
    if ns.runs < 1 or ns.requests < 100 or ns.warmup < 32 or ns.writes < 10:
        parser.error("need --runs ≥ 1, --requests ≥ 100, --warmup ≥ 32, --writes ≥ 10")
    if ns.requests + ns.warmup > 25000:
        parser.error("--requests + --warmup must stay ≤ 25000 (each batch must be served within the 60 s skew window)")
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="unibus-bench-durability-"))
    results = {mode: Mode() for mode in MODES}
    try:
        single_node(ns, tmp, results)
        if not ns.no_cluster:
            cluster(ns, tmp, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    body = render(ns, results, environment_line(ns, load_before, os.getloadavg()[0]))
    return benchlib.publish(body, "durability", HEADING, ns.out, not ns.no_write)


if __name__ == "__main__":
    sys.exit(main())
