"""Soak benchmark (docs/benchmarks.md, "Soak"): does membershipd hold steady over many signed requests?

Run with ``.venv/bin/python bench/bench_soak.py [--requests 200000] [--every 10000]
[--writes 50] [--concurrency 32] [--no-write]``. Not a test: it prints markdown and
writes it into docs/benchmarks.md between the ``bench:soak`` markers.

One real ``membershipd serve`` (SQLite store, embedded nats-server, loopback) takes
``--requests`` signed ``GET /v1/me`` (each with its own nonce: every one is a nonce
claim in JetStream), ``--concurrency`` in flight, and after each ``--every`` of them
``--writes`` membership writes (bob added to and removed from a room, alternately: logged
requests, a store transaction and a log entry each). After each slice it samples the
resident set size and the open file descriptors of membershipd and of its nats-server
(from /proc). The aim (docs/benchmarks.md): flat after warm-up, growth under 16 MiB.
The first two slices are the warm-up.

Every process started here is stopped in a ``finally``; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import benchlib  # noqa: E402

from unibus.client import UnibusClient  # noqa: E402
from unibus.client.keys import generate_identity  # noqa: E402
from unibus.testing import MembershipdProcess, bootstrap_member  # noqa: E402

WARMUP_SLICES = 2
AIM_MIB = 16


def proc_sample(pid: int | None) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of ``pid``, from /proc."""
    if pid is None:
        return float("nan"), -1
    return benchlib.proc_status_mb(pid), len(os.listdir(f"/proc/{pid}/fd"))


async def reads(base_url: str, identity, n: int, concurrency: int) -> int:
    """``n`` signed GET /v1/me, ``concurrency`` at a time; returns how many were not 200."""
    todo = iter(range(n))
    bad = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal bad
        for _ in todo:
            headers = benchlib.signed_headers(identity)
            async with session.get(base_url + "/v1/me", headers=headers) as r:
                await r.read()
                bad += r.status != 200

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return bad


async def soak(node: MembershipdProcess, admin, ns: argparse.Namespace) -> tuple[list[tuple], float]:
    bob = generate_identity("bob")
    async with UnibusClient(node.base_url, admin) as client:
        await client.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
        room = (await client.create_room("soak"))["room_id"]
        rows, done, started = [], 0, time.monotonic()
        rows.append((0, *proc_sample(node.pid), *proc_sample(node.nats_pid()), 0))
        added = False
        while done < ns.requests:
            n = min(ns.every, ns.requests - done)
            bad = await reads(node.base_url, admin, n, ns.concurrency)
            for _ in range(ns.writes):
                if added:
                    await client.remove_room_member(room, "bob")
                else:
                    await client.add_room_member(room, "bob")
                added = not added
            done += n
            rows.append((done, *proc_sample(node.pid), *proc_sample(node.nats_pid()), bad))
            print(f"{done:>8,} requests: membershipd {rows[-1][1]:.1f} MiB {rows[-1][2]} fds, "
                  f"nats-server {rows[-1][3]:.1f} MiB {rows[-1][4]} fds, non-200 {bad}", flush=True)
        return rows, time.monotonic() - started


def render(ns: argparse.Namespace, rows: list[tuple], seconds: float, load: tuple[float, float]) -> str:
    base = rows[WARMUP_SLICES] if len(rows) > WARMUP_SLICES else rows[0]
    last = rows[-1]
    growth, nats_growth = last[1] - base[1], last[3] - base[3]
    peak_after = max(r[1] for r in rows[WARMUP_SLICES:]) - base[1]
    verdict = "within" if max(growth, peak_after) < AIM_MIB else "over"
    lines = [
        benchlib.measured_by(f"bench/bench_soak.py --requests {ns.requests} --every {ns.every} --writes {ns.writes} "
                             f"--concurrency {ns.concurrency}")
        + f"; {benchlib.load_average(*load)}; "
        f"{ns.requests:,} signed requests and {ns.writes * (len(rows) - 1):,} membership writes in {seconds:.0f} s.",
        "",
        f"One membershipd (SQLite, embedded nats-server). Signed `GET /v1/me`, {ns.concurrency} in flight, each a "
        f"nonce claim; after every {ns.every:,}, {ns.writes} membership writes (a room member added or removed: "
        "a logged request, a store transaction, a log entry). Sampled from /proc after each slice; the first "
        f"{WARMUP_SLICES} slices are the warm-up.",
        "",
        "| requests | membershipd RSS MiB | membershipd fds | nats-server RSS MiB | nats-server fds | non-200 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r[0]:,} | {r[1]:.1f} | {r[2]} | {r[3]:.1f} | {r[4]} | {r[5]} |" for r in rows]
    lines += [
        "",
        f"After the warm-up, membershipd's RSS grew {growth:+.1f} MiB to the end (peak {peak_after:+.1f} MiB), "
        f"nats-server's {nats_growth:+.1f} MiB; membershipd's descriptors went from {base[2]} to {last[2]}: "
        f"membershipd is {verdict} the {AIM_MIB} MiB aim. nats-server's RSS follows the nonce bucket, which is in "
        "memory and holds every nonce of the last 2 × `--auth-skew` (here 120 s, about 120,000 nonces at this "
        "rate), bounded by `UNIBUS_NONCE_MAX_BYTES` (256 MiB); Go keeps the high-water mark of its heap, so it "
        "does not fall back within a run.",
        "",
        "Reproduce:",
        "",
        "```",
        f".venv/bin/python bench/bench_soak.py --requests {ns.requests} --every {ns.every}",
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--every", type=int, default=10_000)
    p.add_argument("--writes", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    ns = p.parse_args(argv)
    if ns.requests < 1 or ns.every < 1 or ns.writes < 0 or ns.concurrency < 1:
        p.error("--requests, --every and --concurrency must be at least 1, --writes at least 0")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="unibus-soak-") as tmp:
        admin = generate_identity("alice")
        data = Path(tmp) / "node"
        bootstrap_member(data, admin, "admin")
        node = MembershipdProcess(data)
        try:
            node.start()
            rows, seconds = asyncio.run(soak(node, admin, ns))
        finally:
            node.stop()
    body = render(ns, rows, seconds, (load_before, os.getloadavg()[0]))
    return benchlib.publish(body, "soak", "## Soak", write=not ns.no_write)


if __name__ == "__main__":
    raise SystemExit(main())
