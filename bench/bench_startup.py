"""Start-up benchmark: where the time to the first /healthz 200 goes.

Run with ``make bench`` or ``.venv/bin/python bench/bench_startup.py [--runs 5]``.
Not a test: it prints a markdown table and writes it into docs/benchmarks.md
between the ``bench:startup`` markers (other sections of that file are kept).

Parts, measured round-robin ``--runs`` times (min / median / max):

* ``membershipd serve`` (the venv's console script) from launch to the first
  ``/healthz`` 200, polled every 5 ms, on a fresh data dir (cold: the database
  and service key are created) and on the same data dir started a second time
  (warm: already migrated);
* interpreter start (``python -c pass``), ``python -c "import unibus.cli"``
  and the serve path (``unibus.cli`` + ``unibus.daemon`` + loading the plugins), as
  end-to-end process times; then, for diagnosis, the serve path step by step
  inside one process, its import time per package (``-X importtime``) and the
  top offenders by cumulative import time;
* a bare ``nats-server -js`` from launch until a JetStream KV bucket is usable
  (connect with retries, create a bucket, put, get): the floor any embedded
  start-up is compared against.

Every process started here is stopped in a ``finally``.
"""

from __future__ import annotations

import benchlib  # noqa: E402  (bench/ is on sys.path when run as a script)
from benchlib import PYTHON, child_pids, daemon_env, kill_nats_if_alive, proc_cpu_seconds, stop_process
import asyncio
import http.client
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nats
from unibus.supervisor import find_nats_server
from unibus.testing import free_port

MEMBERSHIPD = str(Path(sys.executable).parent / "membershipd")
POLL_INTERVAL = 0.005
HEALTHZ_TIMEOUT = 30.0


# -- measurement helpers ------------------------------------------------------


@dataclass
class Series:
    label: str
    samples: list[float]  # wall seconds
    cpu: list[float] | None = None  # CPU seconds (user + system) of the measured process

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def cells(self) -> str:
        return benchlib.cells(self.samples, scale=1000)

    def cpu_cell(self) -> str:
        return f"{statistics.median(self.cpu) * 1000:.0f}" if self.cpu else "–"


def healthz_status(port: int) -> int | None:
    """The /healthz status, or None while nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


# -- (a) membershipd serve to the first /healthz 200 --------------------------

_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ ([\w.]+): (.*)$")


@dataclass
class DaemonRun:
    seconds: float
    cpu: float  # CPU seconds membershipd itself (not nats-server) used until /healthz 200
    phases: list[tuple[float, str]]  # (offset from launch in s, log message)


def run_daemon_once(data_dir: Path, log_path: Path) -> DaemonRun:
    http_port, nats_port, monitor_port = free_port(), free_port(), free_port()
    argv = [MEMBERSHIPD, "serve", "--data-dir", str(data_dir),
            "--http-addr", f"127.0.0.1:{http_port}", "--nats-addr", f"127.0.0.1:{nats_port}",
            "--nats-monitor-port", str(monitor_port)]
    env = daemon_env("INFO")
    with open(log_path, "wb") as log:
        wall0 = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        nats_children: list[int] = []
        try:
            deadline = t0 + HEALTHZ_TIMEOUT
            while True:
                if healthz_status(http_port) == 200:
                    elapsed = time.perf_counter() - t0
                    cpu = proc_cpu_seconds(proc.pid)
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"membershipd exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"no /healthz 200 within {HEALTHZ_TIMEOUT} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(POLL_INTERVAL)
            nats_children = child_pids(proc.pid)
        finally:
            nats_children = nats_children or child_pids(proc.pid)
            stop_process(proc, 15.0)
            for pid in nats_children:  # membershipd stops its nats-server; this is a safety net
                kill_nats_if_alive(pid, str(data_dir))
    phases = []
    for line in log_path.read_text(errors="replace").splitlines():
        m = _LOG_TS.match(line)
        if not m:
            continue
        ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        msg = m.group(3).replace(str(data_dir), "<data-dir>")
        phases.append((ts - wall0, f"{m.group(2)}: {msg[:90]}"))
        if "serving on" in msg:  # what follows is the shutdown this script asked for
            break
    return DaemonRun(elapsed, cpu, phases)


def median_run(runs: list[DaemonRun]) -> DaemonRun:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


# -- (b) interpreter and import cost -------------------------------------------


def time_process(argv: Sequence[str]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of a child process run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def importtime_rows(stderr: str) -> list[tuple[int, int, str]]:
    """``(self µs, cumulative µs, module with its indentation)`` from ``-X importtime`` output."""
    rows = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (.*)$", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), m.group(3).rstrip()))
    return rows


def importtime_top(code: str, top: int = 8) -> list[tuple[int, int, str]]:
    """``(cumulative µs, self µs, module)`` of the ``top`` costliest imports."""
    res = subprocess.run([PYTHON, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True)
    rows = [(cum, self_, mod.strip()) for self_, cum, mod in importtime_rows(res.stderr)]
    rows.sort(key=lambda r: r[0], reverse=True)
    return rows[:top]


# One fresh process per run: import what `membershipd serve` imports, load the
# plugins from their entry points, then migrate an empty and a migrated DB.
# -X importtime attributes each module's own (self) time, so grouping it by
# top-level package partitions the import cost without double counting.
SERVE_PATH_PROBE = """
import json, sys, tempfile, time
from pathlib import Path
T = time.perf_counter
out = {}
t = T(); import unibus.cli; out["import unibus.cli"] = T() - t
from unibus.pluginmanager import PluginManager
t = T(); PluginManager(); out["PluginManager(): entry points found and loaded"] = T() - t
t = T(); import unibus.daemon; out["import unibus.daemon"] = T() - t
try:
    from unibus.store.db import migrate
    db = Path(tempfile.mkdtemp(dir=sys.argv[1])) / "membershipd.db"
    t = T(); migrate(db); out["migrate() an empty database"] = T() - t
    t = T(); migrate(db); out["migrate() an already-migrated database"] = T() - t
except Exception as e:  # the store API may move; the rest of the bench still runs
    print(f"migrate probe skipped: {e}", file=sys.stderr)
print(json.dumps(out))
"""


def _group(module: str) -> str:
    top = module.split(".")[0]
    if module.startswith("unibus.plugins"):
        return "unibus.plugins (built-in plugins)"
    if top == "unibus":
        return "unibus (core)"
    if top in sys.stdlib_module_names or top.startswith("_") or top == "encodings":
        return "stdlib"
    return top


@dataclass
class ServePathBreakdown:
    steps: list[dict[str, float]]  # per run: in-process step → seconds
    packages: list[dict[str, float]]  # per run: package → own import seconds

    def step_names(self) -> list[str]:
        return list(dict.fromkeys(k for run in self.steps for k in run))

    def step(self, name: str) -> list[float]:
        return [run[name] for run in self.steps if name in run]

    def package_medians(self) -> dict[str, float]:
        names = {k for run in self.packages for k in run}
        med = {n: statistics.median(run.get(n, 0.0) for run in self.packages) for n in names}
        return dict(sorted(med.items(), key=lambda kv: kv[1], reverse=True))


def run_probe(scratch: Path, importtime: bool) -> tuple[dict[str, float], str]:
    argv = [PYTHON, *(["-X", "importtime"] if importtime else []), "-c", SERVE_PATH_PROBE, str(scratch)]
    res = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def probe_packages(stderr: str) -> dict[str, float]:
    per_run: dict[str, float] = {}
    for self_us, _cum, mod in importtime_rows(stderr):
        g = _group(mod.strip())
        per_run[g] = per_run.get(g, 0.0) + self_us / 1e6
    return per_run


# -- (c) bare nats-server until a KV bucket is usable --------------------------


async def _kv_ready(url: str, timeout: float) -> None:
    async def quiet(_e: Exception) -> None:  # refused connections while the server starts
        pass

    # nats-py retries the initial connect itself, sleeping reconnect_time_wait
    # between attempts (2 s by default): poll every 2 ms instead.
    nc = await asyncio.wait_for(
        nats.connect(url, connect_timeout=1, reconnect_time_wait=0.002, allow_reconnect=False, error_cb=quiet),
        timeout,
    )
    try:
        js = nc.jetstream()
        deadline = time.perf_counter() + timeout
        while True:  # JetStream may answer a moment after the client port opens
            try:
                kv = await js.create_key_value(bucket="b")
                break
            except Exception:
                if time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(0.002)
        await kv.put("k", b"v")
        entry = await kv.get("k")
        assert entry.value == b"v"
    finally:
        await nc.close()


def run_nats_once(binary: Path, store: Path) -> tuple[float, float]:
    """``(wall seconds, nats-server CPU seconds)`` from launch until a KV bucket is usable."""
    port = free_port()
    argv = [str(binary), "-js", "-p", str(port), "-sd", str(store), "-a", "127.0.0.1"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        asyncio.run(_kv_ready(f"nats://127.0.0.1:{port}", HEALTHZ_TIMEOUT))
        return time.perf_counter() - t0, proc_cpu_seconds(proc.pid)
    finally:
        stop_process(proc, 15.0)


# -- report ----------------------------------------------------------------------


def render(runs: int, rows: dict[str, Series], cold: list[DaemonRun], warm: list[DaemonRun],
           breakdown: ServePathBreakdown, offenders: dict[str, list[tuple[int, int, str]]],
           environment: str) -> str:
    cold_s, warm_s = rows["cold"], rows["warm"]
    nats_s, py_s, cli_s = rows["nats"], rows["python"], rows["cli"]
    serve_full, serve_s = rows["serve_imports"], rows["serve_imports_only"]
    ms = lambda x: f"{x * 1000:.0f} ms"
    out = [environment, "",
           ("How to read it: the bare nats-server row is the floor of an embedded start; the gap up to the "
           "warm start is membershipd's own cost. When the serve-path imports come close to the warm start, "
           "start-up is import-bound and the per-package table below says which library to defer; the log "
           "offsets show what happens after the imports (migration, nats-server readiness, HTTP)."), ""]
    out += ["| part | min ms | median ms | max ms | CPU ms (median) |", "|---|---:|---:|---:|---:|"]
    for key in ("cold", "warm", "nats", "python", "cli", "serve_imports", "serve_imports_only"):
        out.append(f"| {rows[key].label} | {rows[key].cells()} | {rows[key].cpu_cell()} |")
    out += ["", ("Wall time is what a user waits; CPU time (user + system of the measured process: membershipd "
            "without its nats-server child, nats-server alone for the bare server, the interpreter for the "
            "imports; clock-tick resolution) is what the work costs, and barely moves when other processes "
            "compete for the two cores.")]
    c = {k: statistics.median(v.cpu) if v.cpu else float("nan") for k, v in rows.items()}
    out += ["", "| ratio / difference (of medians) | wall | CPU |", "|---|---:|---:|"]
    out.append(f"| cold start / bare nats-server → KV | {cold_s.median / nats_s.median:.0f}× | – |")
    out.append(f"| warm start / bare nats-server → KV | {warm_s.median / nats_s.median:.0f}× | – |")
    out.append(f"| `import unibus.cli` − interpreter start | {ms(cli_s.median - py_s.median)} "
               f"| {ms(c['cli'] - c['python'])} |")
    out.append(f"| serve-path imports − interpreter start (teardown skipped) | {ms(serve_s.median - py_s.median)} "
               f"| {ms(c['serve_imports_only'] - c['python'])} |")
    out.append(f"| interpreter teardown after the serve-path imports | {ms(serve_full.median - serve_s.median)} "
               f"| {ms(c['serve_imports'] - c['serve_imports_only'])} |")
    out.append(f"| serve-path imports with interpreter start / warm start | {serve_s.median / warm_s.median:.0%} "
               f"| {c['serve_imports_only'] / c['warm']:.0%} |")
    # membershipd's CPU time excludes its nats-server child, so the CPU column subtracts only the imports.
    out.append(f"| warm start − serve-path imports (− bare nats-server → KV for wall): plugins, migration check, "
               f"supervisor, NATS connect, store, HTTP | {ms(warm_s.median - serve_s.median - nats_s.median)} "
               f"| {ms(c['warm'] - c['serve_imports_only'])} |")
    out.append(f"| cold − warm (creating the database and the service key) | {ms(cold_s.median - warm_s.median)} "
               f"| {ms(c['cold'] - c['warm'])} |")

    out += ["", (f"Inside one process (fresh each run, median of {runs}, no `-X importtime`), "
            "the serve path step by step:"), "", "| step | min ms | median ms | max ms |", "|---|---:|---:|---:|"]
    for name in breakdown.step_names():
        out.append(f"| {name} | {Series(name, breakdown.step(name)).cells()} |")

    meds = breakdown.package_medians()
    total = sum(meds.values())
    shown = list(meds.items())[:10]
    out += ["", (f"Own import time by package on the serve path (`-X importtime` self times summed per "
            f"top-level package, median of {runs}; importtime itself adds some overhead; total "
            f"{total * 1000:.0f} ms):"), "", "| package | median ms | share |", "|---|---:|---:|"]
    for name, v in shown:
        out.append(f"| {name} | {v * 1000:.0f} | {v / total:.0%} |")
    rest = total - sum(v for _, v in shown)
    out.append(f"| everything else ({len(meds) - len(shown)} packages) | {rest * 1000:.0f} | {rest / total:.0%} |")

    for title, run in (("cold", median_run(cold)), ("warm", median_run(warm))):
        out += ["", (f"The median {title} start ({run.seconds * 1000:.0f} ms): membershipd's own log lines as "
                "offsets from launch (log clock resolution 1 ms; the first line is written only after the "
                "imports and the migration):"), "", "| at ms | log line |", "|---:|---|"]
        for offset, msg in run.phases:
            out.append(f"| {offset * 1000:.0f} | {msg.replace('|', '/')} |")
        out.append(f"| {run.seconds * 1000:.0f} | (first /healthz 200 seen by the poller) |")

    for code, rows_ in offenders.items():
        out += ["", (f"`python -X importtime -c \"{code}\"`, top {len(rows_)} by cumulative time "
                "(one run, so noisier than the medians):"), "",
                "| cumulative ms | self ms | module |", "|---:|---:|---|"]
        for cum, self_, mod in rows_:
            out.append(f"| {cum / 1000:.1f} | {self_ / 1000:.1f} | `{mod}` |")
    return "\n".join(out) + "\n"


def environment_line(runs: int, binary: Path, load_before: float, load_after: float) -> str:
    line = (f"{benchlib.measured_by(f'bench/bench_startup.py --runs {runs}')}, {benchlib.nats_server_version(binary)}; "
            f"{benchlib.load_average(load_before, load_after)} (other work on the machine shows up as noise in "
            "min/max).")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        line += (" PYTHONDONTWRITEBYTECODE was set, so unibus's own modules (an editable install) were "
                 "compiled from source on every start.")
    return line


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchlib.arg_parser(__doc__, "start-up", 5, "runs per measurement")
    ns = benchlib.parse(parser, argv)
    if not Path(MEMBERSHIPD).is_file():
        parser.error(f"{MEMBERSHIPD} not found; run this with the project venv's python")

    binary = find_nats_server()
    # What serve runs before its own work: the CLI, the daemon module, every plugin.
    serve_code = "import unibus.cli, unibus.daemon, unibus.pluginmanager as pm; pm.PluginManager()"
    # os._exit skips the interpreter's teardown, which the daemon has not reached
    # when /healthz answers and which costs a few hundred ms with this many modules.
    serve_code_no_teardown = serve_code + "; import os; os._exit(0)"
    load_before = os.getloadavg()[0]
    samples: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("nats", "python", "cli", "serve_imports", "serve_imports_only")}
    cold: list[DaemonRun] = []
    warm: list[DaemonRun] = []
    breakdown = ServePathBreakdown([], [])
    tmp = Path(tempfile.mkdtemp(prefix="unibus-bench-"))
    try:
        # Warm the page cache (binaries, site-packages) before anything is timed.
        run_nats_once(binary, tmp / "nats-warmup")
        time_process([PYTHON, "-c", serve_code])
        # Round-robin: each round measures every part once, so a burst of other
        # load on the machine spreads over all parts instead of skewing one.
        for i in range(ns.runs):
            samples["nats"].append(run_nats_once(binary, tmp / f"nats-{i}"))
            samples["python"].append(time_process([PYTHON, "-c", "pass"]))
            samples["cli"].append(time_process([PYTHON, "-c", "import unibus.cli"]))
            samples["serve_imports"].append(time_process([PYTHON, "-c", serve_code]))
            samples["serve_imports_only"].append(time_process([PYTHON, "-c", serve_code_no_teardown]))
            steps, _ = run_probe(tmp, importtime=False)
            breakdown.steps.append(steps)
            _, stderr = run_probe(tmp, importtime=True)
            breakdown.packages.append(probe_packages(stderr))
            data_dir = tmp / f"daemon-{i}"
            cold.append(run_daemon_once(data_dir, tmp / f"daemon-{i}-cold.log"))
            warm.append(run_daemon_once(data_dir, tmp / f"daemon-{i}-warm.log"))
            print(f"round {i + 1}/{ns.runs}: cold {cold[-1].seconds * 1000:.0f} ms, warm {warm[-1].seconds * 1000:.0f} ms, "
                  f"bare nats-server→KV {samples['nats'][-1][0] * 1000:.0f} ms, "
                  f"serve imports {samples['serve_imports'][-1][0] * 1000:.0f} ms", file=sys.stderr)
        offenders = {"import unibus.cli": importtime_top("import unibus.cli"),
                     serve_code: importtime_top(serve_code)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def series(label: str, key: str) -> Series:
        return Series(label, [w for w, _ in samples[key]], [c for _, c in samples[key]])

    rows = {
        "cold": Series("`membershipd serve` → first /healthz 200, fresh data dir (cold)",
                       [r.seconds for r in cold], [r.cpu for r in cold]),
        "warm": Series("`membershipd serve` → first /healthz 200, same data dir again (warm)",
                       [r.seconds for r in warm], [r.cpu for r in warm]),
        "nats": series("bare `nats-server -js` → KV bucket created, put, get", "nats"),
        "python": series("`python -c pass` (interpreter start)", "python"),
        "cli": series("`python -c \"import unibus.cli\"`", "cli"),
        "serve_imports": series(f"`python -c \"{serve_code}\"` (the serve path's imports and plugin loading)", "serve_imports"),
        "serve_imports_only": series(f"`python -c \"{serve_code_no_teardown}\"` (the same, without interpreter "
                                     "teardown)", "serve_imports_only"),
    }
    env_line = environment_line(ns.runs, binary, load_before, os.getloadavg()[0])
    body = render(ns.runs, rows, cold, warm, breakdown, offenders, env_line)
    return benchlib.publish(body, "startup", "## Start-up", ns.out, not ns.no_write, "start-up")


if __name__ == "__main__":
    sys.exit(main())
