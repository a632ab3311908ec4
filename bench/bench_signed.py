"""Signed-request benchmark: what RFC 9421 + the replay-nonce claim cost per request, before and after, HTTP and HTTPS.

Run with ``.venv/bin/python bench/bench_signed.py [--runs 5] [--requests N] [--before REF | --no-before]
[--no-write]``. Not a test: it prints markdown and writes it into docs/benchmarks.md between
the ``bench:signed`` markers (other sections of that file are kept).

Seven servers, each loaded the same way, ``--runs`` times round-robin
(median, min, max):

* **signed**: a real ``membershipd serve`` of this code (embedded
  nats-server, default bus auth, skew 60 s) answering ``GET /v1/me`` for
  ``alice`` (bootstrapped as an admin with ``membershipd member add``), every
  request signed with a unique nonce by :func:`unibus.signing.sign_request`;
* **signed, 0.11.0** (``--before REF``, default ``v0.11.0``): the same, served
  by a real membershipd of that release from its own virtualenv, which
  ``bench/baseline.py`` builds once under ``bench/.baselines/`` (a git
  worktree at the tag, ``pip install -e``) and reuses; ``alice`` is
  bootstrapped by that release's own ``membershipd member add`` (0.11 has no
  ``--bus-pub``) on its own data dir. RFC 9421 signing did not change, so it
  gets the same kind of signed requests;
* **signed, HTTPS**: this code's membershipd with ``--http-tls-cert`` /
  ``--http-tls-key`` (a test CA and server certificate from
  :func:`unibus.testing.make_test_pki`);
* **baseline A**: a bare aiohttp handler returning the same JSON body (the
  bytes /v1/me answered), in a separate server process;
* **baseline B**: the same handler doing one Ed25519 verify of a 200-byte
  message per request (PyNaCl's ``crypto_sign_open``, as the server does):
  the irreducible cost of a signed request;
* **baseline B, HTTPS**: baseline B serving the same certificate through the
  same server context as membershipd (:func:`unibus.tls.server_context`).
* **baseline C**: baseline B plus the request's nonce claimed as docs/http-api.md
  requires of every signed request, by membershipd's own
  :class:`unibus.auth.NonceStore` (one JetStream write, acknowledged before the
  answer) against a bare ``nats-server -js`` of its own, and nothing else: the
  most any server that keeps the contract can serve, so the aim is weighed
  against it too.

Each server's throughput is also given as a ratio to baseline B of the same
transport, run by run, and the signed path of this code as a ratio to the
earlier release's (the before/after ratio).

The load comes from a second process (this script started with a hidden
``--role loadgen``): aiohttp's client, ``TCPConnector(limit=32)``, 32 workers
sharing one list of requests (over HTTPS it verifies the server against the
test CA with :func:`unibus.tls.client_context`). Every run signs a fresh batch just before it
starts (all signing outside the timed part; ``created`` stays well inside the
skew window) and the baselines get the very same signed requests, so all
of them parse the same headers. The first ``--warmup`` requests open the 32
connections and are not timed. Each process's CPU time is read from /proc
around the run, which gives CPU µs per request: the cost of a request
independent of how the two cores were shared.

Then, for diagnosis:

* a profile of the signed server (this code, HTTP), baselines A and B, and
  (with py-spy) the HTTPS pair during one extra, untimed run each, summed into cost
  centres (verify, ``check_request``, the nonce claim, JSON, aiohttp, the
  event loop): ``py-spy record --pid`` when py-spy is there (install it with
  ``.venv/bin/pip install py-spy``; it is not a project dependency), else
  cProfile on the CPU clock, switched on and off with SIGUSR1 / SIGUSR2 around
  the run (in the baselines, and in a second membershipd started through the
  hidden ``--role cprofile-daemon`` wrapper, since membershipd has no such switch);
* the nonce claim alone: :class:`unibus.auth.NonceStore` against a bare
  ``nats-server -js`` with the same bucket (memory storage as membershipd, and
  file as before durable writes): one at a time, 32 in flight, and rejected replays,
  with CPU per claim on both sides and /varz message counts per claim.

Every process started here is stopped in a ``finally``; everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import benchdoc  # noqa: E402, F401  (bench/ is on sys.path when run as a script)
import benchlib  # noqa: E402
from benchlib import (  # noqa: E402
    IDLE_LEAVES,
    PYTHON,
    REPO,
    daemon_env,
    machine,
    min_med_max,
    nats_server_version,
    parse_frames,
    proc_cpu_seconds,
    proc_cpu_split,
    pyspy_binary,
    sign_batch,
    stop_all,
    stop_process,
    wait_ready_line,
)
import argparse
import asyncio
import collections
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

SCRIPT = str(Path(__file__).resolve())
HEADING = "## Signed requests"
BEFORE_REF = "v0.11.0"  # the release the signed path is compared with (bench/baseline.py)
#: Every target, in the order of the tables.
KEYS = ("signed", "before", "claim", "verify", "plain", "https", "verify-https")
#: Profiled with py-spy (the cProfile fallback does the first three: membershipd needs its wrapper there).
PROFILED = ("signed", "before", "claim", "verify", "plain", "https", "verify-https")
#: The aim: signed GET /v1/me serves at least this share of baseline B's requests per second.
AIM = 0.85
#: What the signed path stopped doing in 0.12 (the profile above says what is left).
HOT_PATH = (
    "What 0.12 took off the signed path, found with this profile (none of it is a check; the checks, their order and "
    "their answers are those of docs/http-api.md, held by tests/core/test_signing.py, test_signed_requests.py and "
    "test_request_bodies.py): GET /v1/me encoded its JSON body on every request, now once per member record "
    "(`unibus.api.members.me_body`, the record object the member cache keeps until the member changes); the "
    "membership-log view of the request (the raw path split again, three header reads, a dataclass) was made for "
    "every request, now only when a logged route's handler asks for it or a body was read "
    "(`unibus.auth.logged_request`); a cached member was looked up through a coroutine and its PyNaCl key "
    "converted per request, now it is a dict hit carrying the raw 32-byte key; the nonce store's admission (epoch, "
    "floor, high-water mark) was a coroutine per request, now a plain test unless one of them needs a look "
    "(`NonceStore.admitted`); the metrics and problem+json middlewares and a coroutine between them are one "
    "middleware (`unibus.app.served_middleware`). Parsing stays one strict path through http_sfv plus the measured "
    "fast path for exactly what `sign_request` writes (`unibus.signing.check_request`). Measured on their own on "
    "2026-12-03 (this code against the commit before these changes, 7ad293a, built by bench/baseline.py; two "
    "membershipd loaded in turn with the load generator above, 9,000 signed requests a round; 6 and then 8 rounds, "
    "load average 1.2-3.1): server CPU per signed request 365 → 316 µs and 387 → 339 µs (medians), round by round "
    "82% and 94% of before (medians); nats-server's share unchanged (46-48 µs). `bench/bench_signed.py --before "
    "7ad293a` makes the same comparison in this bench."
)
#: The order of even runs (odd runs go backwards): the pairs that are compared run by run
#: (before/after, each signed server and the baseline B of its transport, B over both
#: transports) are loaded one right after the other.
RUN_ORDER = ("before", "signed", "claim", "verify", "verify-https", "https", "plain")
CONCURRENCY = 32
PATH = "/v1/me"
HANDLE = "alice"
VERIFY_MESSAGE_SIZE = 200
START_TIMEOUT = 30.0
PROFILE_RATE = 250  # py-spy samples per second


# =============================================================================
# Roles run in child processes (hidden --role): the baseline servers and the
# load generator. They import only what they need.
# =============================================================================


def install_profile_toggle(stats_path: Path) -> None:
    """SIGUSR1 starts a cProfile (CPU-time clock) of the main thread, SIGUSR2 stops it and writes ``stats_path``.

    The fallback when py-spy is missing: only the burst is profiled, not the start-up.
    """
    import cProfile

    prof = cProfile.Profile(time.process_time)

    def start(_sig: int, _frame: Any) -> None:
        prof.enable()

    def stop(_sig: int, _frame: Any) -> None:
        prof.disable()
        prof.dump_stats(str(stats_path))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def role_cprofile_daemon(argv: list[str]) -> int:
    """``membershipd`` (``unibus.cli.main``) with the profile toggle; argv: STATS_FILE serve ARGS..."""
    install_profile_toggle(Path(argv[0]))
    from unibus.cli import main as membershipd

    return membershipd(argv[1:])


def role_server(mode: str, port: int, body_path: Path, stats_path: Path | None = None,
                tls: tuple[Path, Path] | None = None, nats_url: str | None = None) -> int:
    """Baseline A (``plain``), B (``verify``) or C (``claim``): GET /v1/me → the same JSON as membershipd's.

    ``tls`` (certificate, key): serve HTTPS with the context membershipd's
    ``--http-tls-cert``/``--http-tls-key`` get (``unibus.tls.server_context``).
    ``claim`` adds to B the request's nonce claimed as membershipd claims it
    (:class:`unibus.auth.NonceStore` over ``nats_url``: the epoch, floor and
    high-water checks, then one JetStream write, acknowledged before the
    answer), and nothing else of membershipd.
    """
    if stats_path is not None:
        install_profile_toggle(stats_path)
    import nacl.bindings
    import nacl.signing
    from aiohttp import web

    body = json.loads(body_path.read_text())
    dumps = lambda o: json.dumps(o, separators=(",", ":"))  # what unibus.api.common uses
    sk = nacl.signing.SigningKey.generate()
    pub = bytes(sk.verify_key)
    signed = bytes(sk.sign(os.urandom(VERIFY_MESSAGE_SIZE)))  # signature (64) || message (200)

    async def plain(request: web.Request) -> web.Response:
        return web.json_response(body, dumps=dumps)

    async def verify(request: web.Request) -> web.Response:
        nacl.bindings.crypto_sign_open(signed, pub)  # what PendingSignature.verify calls
        return web.json_response(body, dumps=dumps)

    store: Any = None

    async def claim(request: web.Request) -> web.Response:
        nacl.bindings.crypto_sign_open(signed, pub)
        # the request's own nonce and created (sign_request writes `;created=...;nonce="..."`)
        params = request.headers["Signature-Input"]
        nonce = params.split('nonce="', 1)[1].split('"', 1)[0]
        created = int(params.split(";created=", 1)[1].split(";", 1)[0])
        if not store.admitted(created):  # the epoch, floor and high-water checks membershipd makes first
            await store.admit(created, time.time())
        if not await store.claim(HANDLE, nonce):
            raise web.HTTPUnauthorized()
        return web.json_response(body, dumps=dumps)

    async def main() -> None:
        nonlocal store
        bus = None
        if mode == "claim":
            from unibus.auth import NonceStore
            from unibus.bus import Bus
            from unibus.signing import DEFAULT_SKEW

            bus = Bus(nats_url)
            await bus.connect()
            store = NonceStore(bus, skew=DEFAULT_SKEW, replicas=1)  # memory storage, as membershipd's
            await store.ensure()
            await store.start()
        app = web.Application()
        app.router.add_get(PATH, {"plain": plain, "verify": verify, "claim": claim}[mode])
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        ssl_context = None
        if tls is not None:
            from unibus.tls import server_context

            ssl_context = server_context(*tls)
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, ssl_context=ssl_context).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()
        if store is not None:
            await store.close()
        if bus is not None:
            await bus.close()

    asyncio.run(main())
    return 0


def role_loadgen(url: str, requests_path: Path, warmup: int, concurrency: int, cafile: Path | None = None) -> int:
    """Send every request of the file (a JSON list of header dicts) once; print a JSON result line.

    ``cafile``: an ``https://`` URL is verified against this CA (host name included).
    """
    import aiohttp
    import yarl

    all_headers: list[dict[str, str]] = json.loads(requests_path.read_text())
    target = yarl.URL(url, encoded=True)
    ssl_context: Any = True
    if cafile is not None:
        from unibus.tls import client_context

        ssl_context = client_context(cafile)

    async def main() -> dict[str, Any]:
        statuses: collections.Counter[int] = collections.Counter()
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False, ssl=ssl_context)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            async def worker(it, record: bool) -> None:
                perf = time.perf_counter
                for headers in it:
                    t0 = perf()
                    async with session.get(target, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                    statuses[status] += 1
                    if record:
                        latencies.append(perf() - t0)

            warm = iter(all_headers[:warmup])
            await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
            timed = iter(all_headers[warmup:])
            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker(timed, True) for _ in range(concurrency)))
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        latencies.sort()
        n = len(latencies)
        return {"n": n, "seconds": elapsed, "rps": n / elapsed,
                "p50": latencies[n // 2], "p99": latencies[min(n - 1, int(n * 0.99))],
                "statuses": {str(k): v for k, v in statuses.items()}, "cpu": cpu}

    print(json.dumps(asyncio.run(main())), flush=True)
    return 0


# =============================================================================
# The orchestrating side
# =============================================================================


@dataclass
class Target:
    key: str  # one of KEYS
    label: str
    url: str
    pids: dict[str, int]  # process label → pid whose CPU time is counted
    cafile: Path | None = None  # HTTPS: the CA the load generator trusts


@dataclass
class RunResult:
    rps: float
    p50: float  # seconds
    p99: float
    n: int  # timed requests
    cpu_us: dict[str, float]  # process label → CPU µs per request


@dataclass
class Series:
    runs: list[RunResult] = field(default_factory=list)

    def values(self, attr: str) -> list[float]:
        return [getattr(r, attr) for r in self.runs]

    def med(self, attr: str) -> float:
        return statistics.median(self.values(attr))

    def cpu(self, proc: str) -> float | None:
        vals = [r.cpu_us[proc] for r in self.runs if proc in r.cpu_us]
        return statistics.median(vals) if vals else None


def run_load(target: Target, headers: list[dict[str, str]], warmup: int, scratch: Path) -> RunResult:
    """One load-generator process over ``headers``; CPU of the target's processes read around it."""
    req_file = scratch / f"requests-{target.key}.json"
    req_file.write_text(json.dumps(headers))
    argv = [PYTHON, SCRIPT, "--role", "loadgen", "--url", target.url + PATH, "--requests-file", str(req_file),
            "--warmup", str(warmup)]
    if target.cafile is not None:
        argv += ["--cafile", str(target.cafile)]
    before = {name: proc_cpu_split(pid) for name, pid in target.pids.items()}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        stop_process(proc)
    after = {name: proc_cpu_split(pid) for name, pid in target.pids.items()}
    req_file.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    bad = {k: v for k, v in res["statuses"].items() if k != "200"}
    if bad:
        raise RuntimeError(f"{target.label}: non-200 answers {bad}")
    # The servers are idle while the load generator imports and connects, so their CPU
    # over its whole life divided by every request sent (warm-up too) is per request.
    cpu_us = {k: (sum(after[k]) - sum(before[k])) / len(headers) * 1e6 for k in before}
    cpu_us["server kernel"] = (after["server"][1] - before["server"][1]) / len(headers) * 1e6
    cpu_us["load generator"] = res["cpu"] / res["n"] * 1e6
    return RunResult(rps=res["rps"], p50=res["p50"], p99=res["p99"], n=res["n"], cpu_us=cpu_us)


# -- where the time goes: py-spy (or cProfile) ----------------------------------------

SPECIFIC = [
    ("Ed25519 verify (libsodium `crypto_sign_open`)", lambda f, p: f.startswith("crypto_sign_open")),
    ("signature headers parsed and checked (`check_request`)",
     lambda f, p: p.endswith("signing.py") and f.startswith(("check_request", "split_path_query", "_"))),
    ("nonce claim, request side: `NonceStore.claim` → `PubAckClient.request` (HPUB command, future)",
     lambda f, p: f.startswith(("NonceStore.claim", "PubAckClient.request"))),
    ("nonce claim, connection side: `unibus.pubacks` (batched writes, `data_received` parsing the PubAck)",
     lambda f, p: p.endswith("pubacks.py")),
    ("nats-py (membershipd's main NATS connection; no claims go through it)",
     lambda f, p: p.startswith("nats/")),
    ("member lookup (`MemberDirectory.get`)", lambda f, p: f.startswith("MemberDirectory")),
    ("handler and JSON body (`json_response`, `as_json`, `json.dumps`)",
     lambda f, p: f in ("get_me", "me_body", "plain", "verify", "claim", "json_response", "Member.as_json", "iso",
                        "b64")
     or p.startswith("json/")),
]
AIOHTTP = "aiohttp: HTTP parsing, routing, middleware chain, response writing, socket I/O"
GLUE = ("unibus middlewares' own lines (`served_middleware`: problems and metrics, `auth_middleware`, `authenticate`, "
        "`path_params_middleware`)")
LOOP = "asyncio event loop (scheduling, epoll, callbacks)"
THREADS = "other threads (SQLite store)"
TLS = "TLS: asyncio's `sslproto`, the `ssl` module and the socket writes under them"
OTHER = "other"
_GLUE_FUNCS = ("problem_middleware", "served_middleware", "metrics_middleware", "auth_middleware", "Authenticator.",
               "NonceStore.admit", "current_member", "path_params_middleware", "Metrics.", "route_label")
CENTRES = [name for name, _ in SPECIFIC] + [GLUE, AIOHTTP, TLS, LOOP, THREADS, OTHER]


def _centre(frames: list[tuple[str, str]]) -> str:
    for name, pred in SPECIFIC:
        if any(pred(f, p) for f, p in frames):
            return name
    if frames and frames[0][0] == "Thread._bootstrap":
        return THREADS
    for f, p in reversed(frames):  # nearest owner from the leaf up
        if p.startswith(("aiohttp/", "multidict/", "yarl/", "propcache/")):
            return AIOHTTP
        if f.startswith(_GLUE_FUNCS):
            return GLUE
        if p == "asyncio/sslproto.py" or p == "ssl.py":
            return TLS
    if any(p.startswith(("asyncio/", "selectors")) for _, p in frames):
        return LOOP
    return OTHER


@dataclass
class Profile:
    tool: str
    samples: int
    cpu_us: float  # the profiled process's CPU µs per request during the profiled run
    centres: dict[str, int]  # cost centre → samples
    top_lines: list[tuple[int, str]]  # (samples, leaf frame)

    leaves: dict[tuple[str, str], int] = field(default_factory=dict)  # (cost centre, leaf frame) → samples (py-spy)

    def us(self, centre: str) -> float:
        return self.centres.get(centre, 0) / self.samples * self.cpu_us if self.samples else 0.0

    def line_us(self, centre: str, prefix: str) -> float:
        """µs per request in ``centre``'s leaf frames that start with ``prefix`` (own samples, any source line)."""
        n = sum(v for (c, leaf), v in self.leaves.items() if c == centre and leaf.startswith(prefix))
        return n / self.samples * self.cpu_us if self.samples else 0.0


def summarize_raw(path: Path, cpu_us: float) -> Profile:
    centres: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    by_centre: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [(f, p) for f, p, _ in parse_frames(stack)]
        if frames and frames[-1] in IDLE_LEAVES:
            continue
        n = int(count)
        total += n
        centre = _centre(frames)
        centres[centre] += n
        leaves[stack.split(";")[-1]] += n
        by_centre[(centre, stack.split(";")[-1])] += n
    return Profile("py-spy", total, cpu_us, dict(centres), [(n, f) for f, n in leaves.most_common(12)],
                   dict(by_centre))


def profile_target(target: Target, headers: list[dict[str, str]], warmup: int, scratch: Path,
                   spy: str) -> tuple[Profile, RunResult]:
    """An extra, untimed run with py-spy attached to the server process."""
    out = scratch / f"profile-{target.key}.txt"
    argv = [spy, "record", "--pid", str(target.pids["server"]), "--rate", str(PROFILE_RATE), "--format", "raw",
            "--output", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # py-spy attaches
        if proc.poll() is not None:
            raise RuntimeError(f"py-spy failed: {proc.stderr.read().decode(errors='replace')[-2000:]}")  # type: ignore[union-attr]
        result = run_load(target, headers, warmup, scratch)
    finally:
        stop_process(proc, sig=signal.SIGINT)  # py-spy writes its output on SIGINT
    return summarize_raw(out, result.cpu_us["server"]), result


def summarize_pstats(path: Path, cpu_us: float) -> Profile:
    """Fallback without py-spy: cProfile self time grouped by the same centres (by function, not by stack)."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    centres: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    for (filename, lineno, func), (_cc, _nc, tottime, _ct, _callers) in stats.items():
        rel = filename
        for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
            if marker in rel:
                rel = rel.split(marker, 1)[1].split("/", 1)[1] if marker == "/lib/python3" else rel.split(marker, 1)[1]
        us = int(tottime * 1e6)
        if func.startswith(("<built-in method", "<method")):
            rel = func
            if "crypto_sign_open" in func:
                func = "crypto_sign_open"
        elif rel.endswith("core/auth.py") and func == "claim":
            func = "NonceStore.claim"  # pstats has co_name only
        elif rel.endswith("core/pubacks.py") and func == "request":
            func = "PubAckClient.request"
        centres[_centre([(func, rel)])] += us
        lines[f"{func} ({rel}:{lineno})"] += us
    total = sum(centres.values())
    return Profile("cProfile on the CPU clock, self time grouped by function (not by stack, so the centres are "
                   "rougher than py-spy's)", total, cpu_us, dict(centres),
                   [(n, f) for f, n in lines.most_common(12)])


def profile_cprofile(target: Target, stats: Path, headers: list[dict[str, str]], warmup: int,
                     scratch: Path) -> tuple[Profile, RunResult]:
    """Fallback: an extra run with cProfile switched on (SIGUSR1) and off (SIGUSR2) around it."""
    pid = target.pids["server"]
    stats.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    try:
        result = run_load(target, headers, warmup, scratch)
    finally:
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not stats.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # dump_stats finishes writing
    return summarize_pstats(stats, result.cpu_us["server"]), result


# -- the nonce claim alone ---------------------------------------------------------------------


@dataclass
class ClaimPhase:
    storage: str
    phase: str
    wall_us: float  # wall µs per claim
    client_cpu_us: float  # this process's CPU µs per claim (what membershipd's event loop pays)
    server_cpu_us: float  # nats-server CPU µs per claim
    msgs_in: float  # messages nats-server received per claim (/varz in_msgs)
    msgs_out: float  # messages it sent per claim (/varz out_msgs)


def _varz(port: int) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as resp:
        return json.loads(resp.read())


async def _claims(url: str, monitor: int, server_pid: int, storage: str, n: int) -> list[ClaimPhase]:
    from nats.js.api import StorageType
    from unibus.auth import NonceStore
    from unibus.bus import Bus
    from unibus.signing import DEFAULT_SKEW, make_nonce

    logging.getLogger("unibus.bus").setLevel(logging.ERROR)  # "disconnected" on close is expected here

    class Store(NonceStore):
        def bucket_config(self):  # type: ignore[no-untyped-def]
            cfg = super().bucket_config()
            cfg.storage = StorageType.MEMORY if storage == "memory" else StorageType.FILE
            return cfg

    bus = Bus(url)
    await bus.connect()
    phases: list[ClaimPhase] = []
    store = None
    try:
        store = Store(bus, skew=DEFAULT_SKEW, replicas=1)
        await store.ensure()
        await store.start()
        for _ in range(200):  # warm-up
            assert await store.claim(HANDLE, make_nonce())
        fresh = [make_nonce() for _ in range(n)]
        more = [make_nonce() for _ in range(n)]
        replays = fresh[: max(100, n // 4)]

        async def one_at_a_time(nonces: list[str], want: bool) -> None:
            for nonce in nonces:
                if await store.claim(HANDLE, nonce) is not want:
                    raise RuntimeError("a fresh nonce was refused" if want else "a replayed nonce was accepted")

        async def in_flight(nonces: list[str]) -> None:
            it = iter(nonces)
            await asyncio.gather(*(one_at_a_time(it, True) for _ in range(CONCURRENCY)))  # type: ignore[arg-type]

        for phase, count, coro in (("fresh nonce, one at a time", n, lambda: one_at_a_time(fresh, True)),
                                   (f"fresh nonce, {CONCURRENCY} in flight", n, lambda: in_flight(more)),
                                   ("replayed nonce (rejected), one at a time", len(replays),
                                    lambda: one_at_a_time(replays, False))):
            v0, s0, c0, t0 = _varz(monitor), proc_cpu_seconds(server_pid), time.process_time(), time.perf_counter()
            await coro()
            t1, c1, s1, v1 = time.perf_counter(), time.process_time(), proc_cpu_seconds(server_pid), _varz(monitor)
            phases.append(ClaimPhase(storage, phase, (t1 - t0) / count * 1e6, (c1 - c0) / count * 1e6,
                                     (s1 - s0) / count * 1e6, (v1["in_msgs"] - v0["in_msgs"]) / count,
                                     (v1["out_msgs"] - v0["out_msgs"]) / count))
    finally:
        if store is not None:
            await store.close()
        await bus.close()
    return phases


def start_bare_nats(scratch: Path, name: str) -> tuple[subprocess.Popen, int, int]:
    """A bare ``nats-server -js`` on 127.0.0.1 with its own store dir, in the environment membershipd
    gives its own (``GOMAXPROCS`` one under the CPUs: ``unibus.supervisor.nats_server_environment``);
    (process, client port, monitor port)."""
    from unibus.supervisor import find_nats_server, nats_server_environment
    from unibus.testing import free_port

    port, monitor = free_port(), free_port()
    argv = [str(find_nats_server()), "-js", "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor),
            "-sd", str(scratch / f"nats-{name}")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            env=nats_server_environment())
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # ready once its monitor answers /varz
            try:
                _varz(monitor)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server for {name} did not start") from None
                time.sleep(0.05)
    except BaseException:
        stop_process(proc)
        raise
    return proc, port, monitor


def measure_claims(scratch: Path, storage: str, n: int) -> list[ClaimPhase]:
    """:class:`unibus.auth.NonceStore` against a bare ``nats-server -js`` (its own store dir)."""
    proc, port, monitor = start_bare_nats(scratch, f"claims-{storage}")
    try:
        return asyncio.run(_claims(f"nats://127.0.0.1:{port}", monitor, proc.pid, storage, n))
    finally:
        stop_process(proc)


# -- report ---------------------------------------------------------------------------------------


#: The baseline B of each target's transport: its ratio column divides by it.
SAME_TRANSPORT_B = {"signed": "verify", "before": "verify", "claim": "verify", "verify": "verify", "plain": "verify",
                    "https": "verify-https", "verify-https": "verify-https"}


def run_ratios(num: Series, den: Series, attr: str = "rps") -> list[float]:
    """``num / den`` run by run (both were loaded in the same run)."""
    return [getattr(x, attr) / getattr(y, attr) for x, y in zip(num.runs, den.runs)]


def cpu_ratios(num: Series, den: Series, nats: bool = False) -> list[float]:
    """Server CPU per request of ``den`` / that of ``num``, run by run (> 100%: ``num`` is the cheaper one)."""
    def cpu(r: RunResult) -> float:
        return r.cpu_us["server"] + (r.cpu_us.get("nats-server", 0.0) if nats else 0.0)

    return [cpu(y) / cpu(x) for x, y in zip(num.runs, den.runs)]


def verdict(series: dict[str, Series], before: Before | None) -> str:
    """The paragraph that reads the before/after and HTTPS ratios, with this run's numbers."""
    s, b, hs, hb = series["signed"], series["verify"], series["https"], series["verify-https"]
    med = statistics.median
    parts = []
    old = series.get("before")
    if old is not None and before is not None:
        ab = run_ratios(s, old)
        m = med(ab)
        drop = "no drop in the median" if m >= 1.0 else f"{1 - m:.0%} fewer in the median"
        cpu = med(cpu_ratios(s, old, nats=True))
        cost = ("the same cost within 5%" if abs(cpu - 1) < 0.05
                else "this code is the cheaper one" if cpu > 1 else "this code costs more")
        parts.append(
            f"Reading, before and after: signed / baseline B is {med(run_ratios(s, b)):.0%} with this code and "
            f"{med(run_ratios(old, b)):.0%} with {before.version} (medians of the run-by-run ratios); run by run "
            f"this code served {m:.0%} of {before.version}'s requests per second ({min(ab):.0%}–{max(ab):.0%}): "
            f"{drop}. That spread is the machine's (other work shares the two cores, see the load average "
            f"above); the CPU a signed request costs is the steadier measure: {s.cpu('server'):.0f} µs in "
            f"membershipd and {s.cpu('nats-server') or 0:.0f} µs in its nats-server now, against "
            f"{old.cpu('server'):.0f} and {old.cpu('nats-server') or 0:.0f} µs in {before.version} (medians); "
            f"run by run {before.version} ÷ this code is {cpu:.0%}: {cost}.")
    c = series.get("claim")
    if c is not None:
        cb, sc = run_ratios(c, b), run_ratios(s, c)
        reach = (f"in the median under the {AIM:.0%} aim before any of membershipd's own work is counted"
                 if med(cb) < AIM else f"in the median at or over the {AIM:.0%} aim")
        parts.append(
            "Baseline C, the verify and the nonce claim with nothing else around them (membershipd's claim "
            "client and checks, a nats-server in the environment membershipd gives its own, on the same two "
            f"cores as the load generator), served {med(cb):.0%} of "
            f"baseline B's requests per second ({min(cb):.0%}–{max(cb):.0%}), {reach}; its claim cost its "
            f"nats-server {c.cpu('nats-server') or 0:.0f} µs and the server {(c.cpu('server') or 0) - (b.cpu('server') or 0):+.0f} µs of CPU "
            f"per request over baseline B. membershipd served {med(sc):.0%} of baseline C ({min(sc):.0%}–"
            f"{max(sc):.0%}) at {(s.cpu('server') or 0) - (c.cpu('server') or 0):+.0f} µs of server CPU per request: "
            "what its own code (the signature's parsing and checks, the member lookup, the middlewares) costs.")
    tls_s, tls_b = med(run_ratios(hs, s)), med(run_ratios(hb, b))
    parts.append(
        f"Over HTTPS signed / baseline B is {med(run_ratios(hs, hb)):.0%} (median); TLS leaves membershipd "
        f"{tls_s:.0%} of its plain-HTTP throughput and baseline B {tls_b:.0%} of its own, at "
        f"{hs.cpu('server') - s.cpu('server'):+.0f} and {hb.cpu('server') - b.cpu('server'):+.0f} µs of server CPU "
        "per request.")
    return " ".join(parts)


def render(ns: argparse.Namespace, labels: dict[str, str], series: dict[str, Series],
           profiles: dict[str, Profile], claims: list[ClaimPhase], environment: str,
           before: Before | None = None) -> str:
    s, a, b = series["signed"], series["plain"], series["verify"]
    old = series.get("before")
    hs, hb = series["https"], series["verify-https"]
    n_targets = len(series)
    short = {"signed": "signed", "before": f"signed {before.version}" if before else "before",
             "claim": "baseline C", "verify": "baseline B", "plain": "baseline A", "https": "signed over HTTPS",
             "verify-https": "baseline B over HTTPS"}
    out = [environment, "",
           ("How to read it: baseline A is what aiohttp alone costs, baseline B adds the one Ed25519 verify that "
            "no signed request can avoid; baseline C adds to B the nonce checks and claim that docs/http-api.md "
            "requires of every signed request (the epoch, floor and high-water checks, then one JetStream write "
            "to the `unibus_nonces` bucket, acknowledged before the answer, made by membershipd's own "
            "`unibus.auth.NonceStore` against a bare `nats-server -js` of its own, started in the environment "
            "membershipd gives its own and whose CPU is counted as the signed rows' is) and nothing else; the "
            "signed row adds everything "
            "else membershipd does (signature parsing and checks, the member lookup, its middlewares). "
            "Throughput is noisy on a shared 2-core machine; the CPU µs per request columns (from /proc, per "
            "process) are the steadier measure of what a request costs, and the profile below splits the "
            "server's share."), ""]
    if before is not None:
        out += [(f"Before and after: the \"{before.version}\" row is a real membershipd {before.version} (git "
                 f"`{before.ref}`, commit `{before.commit[:12]}`) from its own virtualenv, built and cached by "
                 "`bench/baseline.py` (`python bench/baseline.py clean` removes it), with the member bootstrapped "
                 f"by its own `membershipd member add` on its own data dir; it gets the same load and the same "
                 "kind of signed requests (RFC 9421 signing is unchanged between the versions). The baselines "
                 "return this code's /v1/me body."), ""]
    out += [("HTTPS: membershipd with `--http-tls-cert`/`--http-tls-key` and baseline B serving the same "
             "certificate with the same server context (`unibus.tls.server_context`, TLS 1.2 or newer), both from "
             "a test CA made by `unibus.testing.make_test_pki`; the load generator verifies the server against "
             "that CA (`unibus.tls.client_context`). Connections are kept alive, so the 32 handshakes fall in the "
             "untimed warm-up and the timed part pays for record encryption only."), "",
            (f"Each run sends {ns.requests:,} timed requests (after {ns.warmup:,} untimed ones) to each of the "
             f"{n_targets} servers from a separate load-generator process (aiohttp client, "
             f"`TCPConnector(limit={CONCURRENCY})`, {CONCURRENCY} workers) over 32 keep-alive connections on "
             "loopback; the servers are loaded one after the other, in the order "
             f"{', '.join(short[k] for k in RUN_ORDER if k in series)} in even runs and backwards in odd ones (the pairs "
             "compared run by run are neighbours). Every request is pre-signed with its own nonce "
             "(`unibus.signing.sign_request`, right before the run, outside the timed part); the baselines get the "
             "same signed requests and ignore the signature. Latency is per request, as the load generator saw it. "
             "The ratio column divides each run's req/s by that of baseline B over the same transport in the same "
             "run: median (min–max) over the runs."), "",
            ("| server | min req/s | median req/s | max req/s | ÷ baseline B, same transport | p50 ms | p99 ms "
             "| server CPU µs/req | … of it in the kernel | nats-server CPU µs/req | load generator CPU µs/req |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in KEYS:
        if key not in series:
            continue
        ser = series[key]
        lo, med, hi = min_med_max(ser.values("rps"))
        rlo, rmed, rhi = min_med_max(run_ratios(ser, series[SAME_TRANSPORT_B[key]]), "{:.0%}")
        nats_cpu = ser.cpu("nats-server")
        out.append(f"| {labels[key]} | {lo} | {med} | {hi} | {rmed} ({rlo}–{rhi}) | {ser.med('p50') * 1e3:.1f} "
                   f"| {ser.med('p99') * 1e3:.1f} | {ser.cpu('server'):.0f} | {ser.cpu('server kernel'):.0f} "
                   f"| {'–' if nats_cpu is None else f'{nats_cpu:.0f}'} | {ser.cpu('load generator'):.0f} |")

    out += ["", (f"Ratios are taken run by run (the {n_targets} servers are loaded one after the other in each run), "
            "then min / median / max over the runs. The CPU ratios compare what one request costs the server "
            "process(es), whatever else competed for the two cores at the time (above 100%: the first-named "
            "server is the cheaper one)."), "",
            "| ratio | min | median | max |", "|---|---:|---:|---:|"]
    rows: list[tuple[str, list[float]]] = []
    if old is not None and before is not None:
        rows += [(f"**after / before**: signed (this code) / signed ({before.version}), throughput; the aim is no drop",
                  run_ratios(s, old)),
                 (f"signed / baseline B, this code (throughput; the aim is ≥ {AIM:.0%})", run_ratios(s, b)),
                 (f"signed / baseline B, {before.version} (throughput)", run_ratios(old, b)),
                 (f"after / before, server CPU per request ({before.version} ÷ this code; membershipd alone)",
                  cpu_ratios(s, old)),
                 (f"after / before, CPU per request ({before.version} ÷ this code; membershipd + its nats-server)",
                  cpu_ratios(s, old, nats=True))]
    else:
        rows.append((f"signed / baseline B (throughput; the aim is ≥ {AIM:.0%})", run_ratios(s, b)))
    c = series.get("claim")
    if c is not None:
        rows += [("**baseline C / baseline B**: the verify and the nonce claim alone (throughput)",
                  run_ratios(c, b)),
                 ("signed / baseline C: what membershipd's own code leaves of that (throughput)", run_ratios(s, c)),
                 ("baseline C server CPU / signed server CPU per request (membershipd alone)", cpu_ratios(s, c))]
    rows += [("signed / baseline B, both over HTTPS (throughput)", run_ratios(hs, hb)),
             ("signed over HTTPS / signed over HTTP (throughput)", run_ratios(hs, s)),
             ("baseline B over HTTPS / baseline B over HTTP (throughput)", run_ratios(hb, b)),
             ("signed / baseline A (throughput)", run_ratios(s, a)),
             ("baseline B / baseline A (throughput)", run_ratios(b, a)),
             ("baseline B server CPU / signed server CPU per request (membershipd alone)", cpu_ratios(s, b)),
             ("baseline B server CPU / signed CPU per request (membershipd + its nats-server)",
              cpu_ratios(s, b, nats=True)),
             ("baseline B server CPU / signed server CPU per request, both over HTTPS (membershipd alone)",
              cpu_ratios(hs, hb)),
             ("signed server CPU per request, HTTP / HTTPS (membershipd alone)", cpu_ratios(hs, s)),
             ("baseline B server CPU per request, HTTP / HTTPS", cpu_ratios(hb, b))]
    for label, vals in rows:
        out.append(f"| {label} | " + " | ".join(min_med_max(vals, "{:.0%}")) + " |")
    out += ["", verdict(series, before)]

    if profiles:
        tool = next(iter(profiles.values())).tool
        how = f"{tool}, {PROFILE_RATE} samples/s" if tool == "py-spy" else tool
        ps, pb, pa = profiles.get("signed"), profiles.get("verify"), profiles.get("plain")
        pc = profiles.get("claim")
        phs, phb = profiles.get("https"), profiles.get("verify-https")
        https = phs is not None and phb is not None
        cols = [ps, pc, pb, pa] + ([phs, phb] if https else [])
        out += ["", (f"Where the server's CPU goes ({how}; one extra untimed run per "
                "server with the profiler attached; idle threads dropped). Each cost centre's share of the profile "
                "times the server's CPU per request in that run gives µs per request; the difference columns are "
                "what the signed path costs beyond baseline C (what membershipd does besides the verify and "
                "the claim) and beyond baseline B of the same transport."), "",
                "| cost centre | signed µs/req | baseline C µs/req | baseline B µs/req | baseline A µs/req "
                "| signed − C | signed − B |"
                + (" signed HTTPS µs/req | baseline B HTTPS µs/req | signed HTTPS − B HTTPS |" if https else ""),
                "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if https else "")]

        def row(label: str, vals: list[float]) -> str:
            line = (f"| {label} | {vals[0]:.0f} | {vals[1]:.0f} | {vals[2]:.0f} | {vals[3]:.0f} "
                    f"| {vals[0] - vals[1]:+.0f} | {vals[0] - vals[2]:+.0f} |")
            if https:
                line += f" {vals[4]:.0f} | {vals[5]:.0f} | {vals[4] - vals[5]:+.0f} |"
            return line

        for centre in CENTRES:
            vals = [p.us(centre) if p else 0.0 for p in cols]
            if max(vals) < 0.5:
                continue
            out.append(row(centre, vals))
        out.append(row("**total (server CPU µs per request in the profiled run)**",
                       [p.cpu_us if p else 0.0 for p in cols]))
        if ps is not None and pb is not None:
            sc, bc = s.cpu("server") or 0.0, b.cpu("server") or 0.0
            # The verify is the same call in both: its difference is the profile's noise.
            diffs = sorted(((ps.us(c) - pb.us(c), c) for c in CENTRES if c != SPECIFIC[0][0]), reverse=True)
            top = [f"{c} {d:+.0f} µs" for d, c in diffs if d >= 5][:4]
            out += ["", (f"Reading: in the timed runs a signed request cost membershipd {sc:.0f} µs of CPU (median) "
                    f"against {bc:.0f} µs for baseline B. One event loop serves each process, so throughput follows "
                    f"that cost: {AIM:.0%} of baseline B needs the signed path at or under {bc / AIM:.0f} µs, "
                    + (f"{sc - bc / AIM:.0f} µs less than now" if sc > bc / AIM
                       else f"which it is, with {bc / AIM - sc:.0f} µs to spare")
                    + (f" (baseline C, which does nothing but the verify and the claim, cost {cc:.0f} µs). "
                       if (cc := series["claim"].cpu("server") if "claim" in series else None) is not None else ". ")
                    + "In the profile the difference to baseline B is mostly: "
                    + "; ".join(top) + (f". The verify, the same call in both, is left out of that list: it took "
                                        f"{ps.us(SPECIFIC[0][0]):.0f} and {pb.us(SPECIFIC[0][0]):.0f} µs in these "
                                        "two profiled runs, which shows how far one cost centre moves between "
                                        "runs of the same code."))]
        pbefore = profiles.get("before")
        if ps is not None and pbefore is not None and before is not None:
            out += ["", (f"Before and after, the same profile of the signed path: membershipd {before.version} "
                    "(the before row of the first table) and this code, µs per request by cost centre, each in its "
                    "own profiled run."), "",
                    f"| cost centre | signed {before.version} µs/req | signed, this code µs/req | after − before |",
                    "|---|---:|---:|---:|"]
            for centre in CENTRES:
                old_us, new_us = pbefore.us(centre), ps.us(centre)
                if max(old_us, new_us) >= 0.5:
                    out.append(f"| {centre} | {old_us:.0f} | {new_us:.0f} | {new_us - old_us:+.0f} |")
            out.append(f"| **total (server CPU µs per request in the profiled run)** | {pbefore.cpu_us:.0f} "
                       f"| {ps.cpu_us:.0f} | {ps.cpu_us - pbefore.cpu_us:+.0f} |")
            out += ["", HOT_PATH]
        if https:
            assert phs is not None and phb is not None
            tls_s, tls_b = phs.us(TLS), phb.us(TLS)
            write_s = phs.line_us(TLS, "_SelectorSocketTransport.write ")
            write_b = phb.line_us(TLS, "_SelectorSocketTransport.write ")
            out += ["", (f"Over HTTPS the TLS centre costs membershipd {tls_s:.0f} µs per request and baseline B "
                    f"{tls_b:.0f} µs, of which the send of the encrypted response (`_SelectorSocketTransport.write` "
                    f"under `sslproto`) {write_s:.0f} and {write_b:.0f} µs.")]
        if ps is not None and ps.tool == "py-spy":
            sends = sum(n for n, frame in ps.top_lines if frame.startswith("_SelectorSocketTransport.write "))
            out += ["", ("A caveat for every py-spy share here: py-spy counts a thread that is runnable but "
                    "waiting for a core as busy on its current line, and a send on loopback often hands the core "
                    "to the process it wakes (the load generator, nats-server), so socket sends "
                    f"(`_SelectorSocketTransport.write`: {sends / ps.samples if ps.samples else 0:.0%} of the "
                    "signed samples) are over-counted on a busy 2-core machine. What they cost in CPU is in the "
                    "kernel column of the first table (from /proc), which holds the system calls: "
                    f"{s.cpu('server kernel'):.0f} µs per signed request.")]
        if ps is not None:
            unit = "samples" if ps.tool == "py-spy" else "µs of self time"
            out += ["", f"Signed path, top {len(ps.top_lines)} source lines by own {unit} (of {ps.samples}):", "",
                    "| share | line |", "|---:|---|"]
            for n, frame in ps.top_lines:
                out.append(f"| {n / ps.samples:.1%} | `{frame}` |")

    if claims:
        out += ["", ("The nonce claim alone: `unibus.auth.NonceStore.claim` (a JetStream publish to "
                "`$KV.unibus_nonces.<handle>.<nonce>` with `Nats-Expected-Last-Subject-Sequence: 0`) from this "
                f"process against a bare `nats-server -js` and the same bucket config: {ns.claims:,} fresh nonces one "
                f"at a time, {ns.claims:,} more with {CONCURRENCY} in flight, then replays of some of the first. "
                "Client CPU is this process (`unibus.pubacks` and the asyncio loop: what membershipd pays per claim); "
                "messages per claim are nats-server's /varz counter deltas, so 1 / 1 is one round trip."), "",
                ("| bucket storage | claims | wall µs per claim | claims/s | client CPU µs/claim "
                 "| nats-server CPU µs/claim | msgs in / out per claim |"),
                "|---|---|---:|---:|---:|---:|---:|"]
        for c in claims:
            storage = ("memory (as membershipd: docs/operations.md, Durability)" if c.storage == "memory"
                       else f"{c.storage} (as before durable writes)")
            out.append(f"| {storage} | {c.phase} | {c.wall_us:.0f} | {1e6 / c.wall_us:,.0f} | {c.client_cpu_us:.0f} "
                       f"| {c.server_cpu_us:.0f} | {c.msgs_in:.2f} / {c.msgs_out:.2f} |")

    out += ["", "Reproduce with:", "", "```",
            ".venv/bin/pip install py-spy   # optional, for the profile; not a project dependency",
            f".venv/bin/python {command_line(ns)}", "```"]
    return "\n".join(out) + "\n"


def command_line(ns: argparse.Namespace) -> str:
    """The options this run was given, as a reader would type them."""
    cmd = f"bench/bench_signed.py --runs {ns.runs} --requests {ns.requests}"
    if ns.before is None:
        cmd += " --no-before"
    elif ns.before != BEFORE_REF:
        cmd += f" --before {ns.before}"
    return cmd


def environment_line(ns: argparse.Namespace, load_before: float, load_after: float, profiler: str,
                     before: Before | None = None) -> str:
    from importlib.metadata import version

    from unibus.supervisor import find_nats_server

    nats_version = nats_server_version(find_nats_server())
    here = {"aiohttp": version("aiohttp"), "pynacl": version("pynacl"), "nats-py": version("nats-py")}
    then = ""
    if before is not None:
        same = before.versions == here and before.nats_server == nats_version
        then = (f"; membershipd {before.version} in its own venv with "
                + ("the same aiohttp, PyNaCl, nats-py and nats-server" if same else
                   f"aiohttp {before.versions.get('aiohttp')}, PyNaCl {before.versions.get('pynacl')}, "
                   f"nats-py {before.versions.get('nats-py')}, {before.nats_server}"))
    return (f"Measured {datetime.now():%Y-%m-%d} by `{command_line(ns)}`: {machine()}, Python "
            f"{platform.python_version()} (default asyncio loop), aiohttp {here['aiohttp']}, PyNaCl {here['pynacl']}, "
            f"nats-py {here['nats-py']}, {nats_version}{then}; "
            f"{profiler}; 1-minute load average {load_before:.1f} before and {load_after:.1f} after (the server, its "
            "nats-server and the load generator share the two cores; other work on the machine shows up as "
            "noise in min/max).")


# -- main ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per server (default 5)")
    parser.add_argument("--requests", type=int, default=10000, help="timed requests per run (default 10000)")
    parser.add_argument("--warmup", type=int, default=1000, help="untimed requests first in each run (default 1000)")
    parser.add_argument("--claims", type=int, default=5000, help="nonce claims per phase when measured alone (default 5000)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="markdown file whose signed-requests section is rewritten (default docs/benchmarks.md)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the markdown file alone")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile")
    parser.add_argument("--before", default=BEFORE_REF, metavar="REF",
                        help=f"the release to compare with, a git tag or commit (default {BEFORE_REF}); built once "
                        "by bench/baseline.py under bench/.baselines/")
    parser.add_argument("--no-before", action="store_true", help="skip the earlier release (no build, no target)")
    # hidden: the child roles
    parser.add_argument("--role", choices=("loadgen", "plain", "verify", "claim"), help=argparse.SUPPRESS)
    parser.add_argument("--nats-url", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--requests-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--body-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stats-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cafile", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tls-key", type=Path, help=argparse.SUPPRESS)
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:2] == ["--role", "cprofile-daemon"]:  # membershipd's own flags follow: no parsing here
        return role_cprofile_daemon(args[2:])
    ns = parser.parse_args(args)
    if ns.role == "loadgen":
        return role_loadgen(ns.url, ns.requests_file, ns.warmup, CONCURRENCY, ns.cafile)
    if ns.role in ("plain", "verify", "claim"):
        tls = (ns.tls_cert, ns.tls_key) if ns.tls_cert else None
        return role_server(ns.role, ns.port, ns.body_file, ns.stats_file, tls, ns.nats_url)
    if ns.no_before:
        ns.before = None
    else:
        import baseline

        try:
            baseline.resolve(ns.before)
        except baseline.BadRef as e:
            parser.error(f"--before: {e}")
    if ns.runs < 1 or ns.requests < 100 or ns.warmup < CONCURRENCY or ns.claims < 100:
        parser.error("need --runs ≥ 1, --requests ≥ 100, --warmup ≥ 32, --claims ≥ 100")
    if ns.requests + ns.warmup > 25000:
        # signing runs at a few thousand per second and `created` must stay inside the 60 s window
        parser.error("--requests + --warmup must stay ≤ 25000 (each batch must be served within the 60 s skew window)")
    return orchestrate(ns)


def start_baseline_server(mode: str, body_file: Path, scratch: Path, tls: tuple[Path, Path] | None = None,
                          stats: bool = True, nats_url: str | None = None) -> tuple[subprocess.Popen, str]:
    """A baseline server process (``plain``, ``verify`` or ``claim``) on a free port, ready; (process, base URL)."""
    from unibus.testing import free_port

    port = free_port()
    argv = [PYTHON, SCRIPT, "--role", mode, "--port", str(port), "--body-file", str(body_file)]
    if nats_url is not None:
        argv += ["--nats-url", nats_url]
    if stats:
        argv += ["--stats-file", str(scratch / f"{mode}.pstats")]
    if tls is not None:
        argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_ready_line(p, START_TIMEOUT)
    except BaseException:
        stop_process(p)
        raise
    return p, f"{'https' if tls else 'http'}://127.0.0.1:{port}"


@dataclass
class Before:
    """The earlier release the signed path is compared with (bench/baseline.py)."""

    ref: str
    python: Path
    version: str
    commit: str
    versions: dict[str, str]  # distribution → version in its venv (aiohttp, PyNaCl, ...)
    nats_server: str


def prepare_before(ref: str) -> Before:
    import baseline

    python = baseline.prepare(ref)
    probe = ("import json, unibus; from importlib.metadata import version as v; "
             "print(json.dumps({'unibus': unibus.__version__, 'aiohttp': v('aiohttp'), 'pynacl': v('pynacl'), "
             "'nats-py': v('nats-py')}))")
    out = json.loads(subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True,
                                    timeout=60).stdout)
    nats = subprocess.run([str(python.parent / "nats-server"), "--version"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
    return Before(ref, python, out.pop("unibus"), baseline.resolve(ref), out, nats)


def bootstrap_before(before: Before, data_dir: Path, identity: Any) -> None:
    """That release's own ``membershipd member add`` (0.11 has no ``--bus-pub``: it is given only to a later
    one, which requires it)."""
    args = ["member", "add", "--data-dir", str(data_dir), "--handle", identity.handle, "--role", "admin",
            "--sign-pub", identity.sign_pub_b64, "--enc-pub", identity.enc_pub_b64, "--enc-suite", identity.enc_suite]
    if not before.version.startswith("0.11."):
        args += ["--bus-pub", identity.bus_pub]
    proc = subprocess.run([str(before.python), "-m", "unibus.cli", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=daemon_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{before.version} membershipd member add failed: {proc.stderr.strip()[-2000:]}")


def orchestrate(ns: argparse.Namespace) -> int:
    import urllib.request

    from unibus.client.keys import generate_identity
    from unibus.testing import MembershipdProcess, bootstrap_member, make_test_pki

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="unibus-bench-signed-"))
    daemons: list[MembershipdProcess] = []
    baselines: list[subprocess.Popen] = []
    keys = [k for k in RUN_ORDER if ns.before or k != "before"]
    series = {k: Series() for k in keys}
    profiles: dict[str, Profile] = {}
    claims: list[ClaimPhase] = []
    total = ns.requests + ns.warmup
    spy: str | None = None
    labels: dict[str, str] = {}
    before: Before | None = prepare_before(ns.before) if ns.before else None
    try:
        alice = generate_identity(HANDLE)
        pki = make_test_pki(tmp / "pki")
        spy = None if ns.no_profile else pyspy_binary()
        targets: dict[str, Target] = {}

        def daemon(key: str, label: str, args: Sequence[str] = (), command: Sequence[str] | None = None,
                   bootstrap: Any = None, ca: Path | None = None) -> MembershipdProcess:
            data_dir = tmp / f"membershipd-{key}"
            (bootstrap or (lambda d: bootstrap_member(d, alice, role="admin")))(data_dir)
            d = MembershipdProcess(data_dir, args, command=command, ca=ca)
            d.env = daemon_env()
            daemons.append(d)
            d.start(timeout=START_TIMEOUT)
            nats_pid = d.nats_pid()
            if nats_pid is None:
                raise RuntimeError(f"{label}: membershipd's nats-server child not found")
            targets[key] = Target(key, label, d.base_url, {"server": d.pid, "nats-server": nats_pid}, ca)
            return d

        labels["signed"] = "signed GET /v1/me (membershipd, this code)"
        plain_daemon = daemon("signed", labels["signed"])
        # The body the baselines return: exactly what /v1/me answers.
        req = urllib.request.Request(plain_daemon.base_url + PATH, headers=sign_batch(alice, 1, PATH)[0])
        with urllib.request.urlopen(req, timeout=5) as resp:
            body_file = tmp / "me.json"
            body_file.write_bytes(resp.read())
        if before is not None:
            labels["before"] = f"signed GET /v1/me (membershipd {before.version})"
            daemon("before", labels["before"], command=[str(before.python), "-m", "unibus.cli"],
                   bootstrap=lambda d: bootstrap_before(before, d, alice))
        labels["https"] = "signed GET /v1/me over HTTPS (membershipd, this code)"
        daemon("https", labels["https"], pki.serve_args(http=True, nats=False), ca=pki.ca[0])
        labels["plain"] = "baseline A: bare aiohttp handler, same JSON"
        labels["verify"] = f"baseline B: A + one Ed25519 verify of {VERIFY_MESSAGE_SIZE} B"
        labels["verify-https"] = "baseline B over HTTPS (same certificate)"
        labels["claim"] = "baseline C: B + the nonce claim (`NonceStore`, its own nats-server)"
        for key, mode, tls in (("plain", "plain", None), ("verify", "verify", None),
                               ("verify-https", "verify", pki.server)):
            p, url = start_baseline_server(mode, body_file, tmp, tls, stats=tls is None)
            baselines.append(p)
            targets[key] = Target(key, labels[key], url, {"server": p.pid}, pki.ca[0] if tls else None)
        nats_c, port_c, _monitor_c = start_bare_nats(tmp, "baseline-c")
        baselines.append(nats_c)
        p, url = start_baseline_server("claim", body_file, tmp, nats_url=f"nats://127.0.0.1:{port_c}")
        baselines.insert(0, p)  # stopped before its nats-server
        targets["claim"] = Target("claim", labels["claim"], url, {"server": p.pid, "nats-server": nats_c.pid})

        for i in range(ns.runs):
            order = keys if i % 2 == 0 else keys[::-1]
            for key in order:
                r = run_load(targets[key], sign_batch(alice, total, PATH), ns.warmup, tmp)
                series[key].runs.append(r)
                print(f"run {i + 1}/{ns.runs} {key}: {r.rps:.0f} req/s, p50 {r.p50 * 1e3:.2f} ms, "
                      f"p99 {r.p99 * 1e3:.2f} ms; CPU µs/req "
                      + ", ".join(f"{k} {v:.0f}" for k, v in r.cpu_us.items()), file=sys.stderr)

        if spy is not None:
            for key in (k for k in PROFILED if k in targets):
                prof, r = profile_target(targets[key], sign_batch(alice, total, PATH), ns.warmup, tmp, spy)
                profiles[key] = prof
                print(f"profiled {key}: {prof.samples} samples, {r.rps:.0f} req/s under py-spy", file=sys.stderr)
        elif not ns.no_profile:
            print("py-spy not found (.venv/bin/pip install py-spy); falling back to cProfile", file=sys.stderr)
            # membershipd itself has no profile switch: a second one, run through the toggle wrapper
            data_dir2 = tmp / "membershipd-cprofile"
            bootstrap_member(data_dir2, alice, role="admin")
            stats = tmp / "signed.pstats"
            daemon2 = MembershipdProcess(data_dir2, command=[PYTHON, SCRIPT, "--role", "cprofile-daemon", str(stats)])
            daemon2.env = daemon_env()
            try:
                daemon2.start()
                t2 = Target("signed", labels["signed"], daemon2.base_url, {"server": daemon2.pid})
                profiles["signed"], _ = profile_cprofile(t2, stats, sign_batch(alice, total, PATH), ns.warmup, tmp)
            finally:
                daemon2.stop()
            for key in ("verify", "plain"):
                profiles[key], _ = profile_cprofile(targets[key], tmp / f"{key}.pstats", sign_batch(alice, total, PATH),
                                                    ns.warmup, tmp)

        for storage in ("file", "memory"):
            for c in measure_claims(tmp, storage, ns.claims):
                claims.append(c)
                print(f"nonce claims, {storage}, {c.phase}: {c.wall_us:.0f} µs/claim, client CPU {c.client_cpu_us:.0f} µs,"
                      f" nats-server CPU {c.server_cpu_us:.0f} µs", file=sys.stderr)
    finally:
        stop_all(baselines, daemons, tmp)

    if spy is not None and profiles:
        version = subprocess.run([spy, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        profiler = f"profile by {version}"
    else:
        profiler = "profile by cProfile" if profiles else "no profile"
    body = render(ns, labels, series, profiles, claims,
                  environment_line(ns, load_before, os.getloadavg()[0], profiler, before), before)
    return benchlib.publish(body, "signed", HEADING, ns.out, not ns.no_write, "signed-requests")


if __name__ == "__main__":
    sys.exit(main())
