"""Probe: the signed path and baseline B on asyncio's own event loop and on uvloop (docs/benchmarks.md).

Not part of ``make bench`` (it writes no section; it prints). uvloop is not a
dependency of unibus: the probe takes it from ``--uvloop-path`` (a directory
made with ``.venv/bin/pip install --target DIR uvloop``) and puts it only on
the ``sys.path`` of the processes that run on it.

Four servers, loaded in turn as ``bench_signed.py`` loads them (its load
generator, 32 keep-alive connections, every request signed with its own
nonce), ``--runs`` times, forwards in even runs and backwards in odd ones:

* ``signed``: a real ``membershipd serve`` of this tree answering a signed
  ``GET /v1/me``, on asyncio's default loop (as it runs);
* ``signed-uvloop``: the same membershipd started with ``uvloop.install()``
  first, so every loop it makes is a uvloop one;
* ``B`` and ``B-uvloop``: ``bench_signed.py``'s baseline B (aiohttp and one
  Ed25519 verify) on each loop.

It checks in ``/proc/PID/maps`` that each process runs on the loop it should,
and prints requests per second and CPU per request (medians), and run by run
the ratios: signed ÷ B on each loop, and each server on uvloop ÷ on asyncio.
The aim of docs/benchmarks.md is signed ÷ B on one loop: a loop that makes B
cheaper by more than it makes the signed path cheaper lowers it.

    .venv/bin/pip install --target /tmp/uvloop uvloop
    .venv/bin/python bench/probe_event_loop.py --uvloop-path /tmp/uvloop --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import bench_signed as bs
from benchlib import PYTHON, REPO, daemon_env, machine, stop_all, wait_ready_line

WARMUP = 1000


def on_uvloop(path: Path, run: str) -> list[str]:
    """``python -c`` that installs uvloop's policy from ``path``, then runs ``run`` (Python source)."""
    return [PYTHON, "-c", f"import sys; sys.path.insert(0, {str(path)!r}); import uvloop; uvloop.install(); {run}"]


def loop_of(pid: int) -> str:
    return "uvloop" if "/uvloop/" in Path(f"/proc/{pid}/maps").read_text() else "asyncio"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uvloop-path", type=Path, required=True,
                        help="a directory holding uvloop (pip install --target DIR uvloop)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10000, help="timed requests per run and server")
    ns = parser.parse_args(argv)
    if not (ns.uvloop_path / "uvloop").is_dir():
        parser.error(f"{ns.uvloop_path} holds no uvloop: make it with .venv/bin/pip install --target "
                     f"{ns.uvloop_path} uvloop")

    from unibus.client.keys import generate_identity
    from unibus.testing import MembershipdProcess, bootstrap_member, free_port

    tmp = Path(tempfile.mkdtemp(prefix="unibus-probe-loop-"))
    alice = generate_identity(bs.HANDLE)
    daemons: list[MembershipdProcess] = []
    baselines: list[subprocess.Popen] = []
    targets: dict[str, bs.Target] = {}
    results: dict[str, list[bs.RunResult]] = {}
    try:
        membershipd = "import runpy; runpy.run_module('unibus.cli', run_name='__main__', alter_sys=True)"
        for key, command in (("signed", None), ("signed-uvloop", on_uvloop(ns.uvloop_path, membershipd))):
            bootstrap_member(tmp / key, alice, role="admin")
            d = MembershipdProcess(tmp / key, command=command)
            d.env = daemon_env()
            daemons.append(d)
            d.start(timeout=bs.START_TIMEOUT)
            targets[key] = bs.Target(key, key, d.base_url, {"server": d.pid, "nats-server": d.nats_pid()}, None)
        req = urllib.request.Request(daemons[0].base_url + bs.PATH, headers=bs.sign_batch(alice, 1, bs.PATH)[0])
        with urllib.request.urlopen(req, timeout=5) as resp:
            (tmp / "me.json").write_bytes(resp.read())
        for key in ("B", "B-uvloop"):
            port = free_port()
            args = ["--role", "verify", "--port", str(port), "--body-file", str(tmp / "me.json")]
            if key == "B":
                argv_ = [PYTHON, bs.SCRIPT, *args]
            else:
                argv_ = on_uvloop(ns.uvloop_path, f"sys.path.insert(0, {str(REPO / 'bench')!r}); "
                                  f"sys.argv = [{bs.SCRIPT!r}, *{args!r}]; import runpy; "
                                  f"runpy.run_path({bs.SCRIPT!r}, run_name='__main__')")
            p = subprocess.Popen(argv_, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            baselines.append(p)
            wait_ready_line(p, bs.START_TIMEOUT)
            targets[key] = bs.Target(key, key, f"http://127.0.0.1:{port}", {"server": p.pid}, None)
        for key, t in targets.items():
            want = "uvloop" if key.endswith("uvloop") else "asyncio"
            if loop_of(t.pids["server"]) != want:
                raise RuntimeError(f"{key} does not run on {want}")
        keys = list(targets)
        results = {k: [] for k in keys}
        for i in range(ns.runs):
            for key in keys if i % 2 == 0 else keys[::-1]:
                r = bs.run_load(targets[key], bs.sign_batch(alice, ns.requests + WARMUP, bs.PATH), WARMUP, tmp)
                results[key].append(r)
                print(f"run {i + 1}/{ns.runs} {key}: {r.rps:.0f} req/s, server CPU {r.cpu_us['server']:.0f} µs/req",
                      file=sys.stderr)
    finally:
        stop_all(baselines, daemons, tmp)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    print(f"{machine()}; {ns.runs} runs of {ns.requests} requests")
    print("| server | req/s | server CPU µs/req | nats-server CPU µs/req |\n|---|---:|---:|---:|")
    for key, rs in results.items():
        nats = f"{med([r.cpu_us['nats-server'] for r in rs]):.0f}" if "nats-server" in rs[0].cpu_us else "–"
        print(f"| {key} | {med([r.rps for r in rs]):.0f} | {med([r.cpu_us['server'] for r in rs]):.0f} | {nats} |")
    print("| ratio, run by run | median | min | max |\n|---|---:|---:|---:|")
    for num, den in (("signed", "B"), ("signed-uvloop", "B-uvloop"), ("signed-uvloop", "signed"), ("B-uvloop", "B")):
        xs = [a.rps / b.rps for a, b in zip(results[num], results[den])]
        print(f"| {num} ÷ {den} | {med(xs):.0%} | {min(xs):.0%} | {max(xs):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
