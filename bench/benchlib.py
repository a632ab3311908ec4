"""What the bench scripts share: figures, /proc readings, processes, signed requests, the report.

Every ``bench/bench_*.py`` imports it (bench/ is on ``sys.path`` when a script
runs). The daemons themselves come from ``unibus.testing`` (``MembershipdProcess``,
``Cluster``, ``free_port``; docs/plugins.md, "Testing"); docs/benchmarks.md
sections are written by :mod:`benchdoc`. Nothing here imports unibus at module
level, so a script can run its roles under an earlier release's venv.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import benchdoc

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
#: Where every script writes its section by default.
DOCS = REPO / "docs" / "benchmarks.md"

# -- figures ---------------------------------------------------------------------------


def med(xs: Sequence[float]) -> float:
    """The median; NaN for no samples."""
    return statistics.median(xs) if xs else float("nan")


def pct(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks; NaN for no samples."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(x: float, digits: int = 0) -> str:
    """Seconds as milliseconds; ``–`` for NaN."""
    return "–" if math.isnan(x) else f"{x * 1000:.{digits}f}"


def min_med_max(xs: Sequence[float], fmt: str = "{:.0f}", scale: float = 1.0) -> tuple[str, str, str]:
    """``(min, median, max)`` of ``xs`` times ``scale``, each formatted with ``fmt``."""
    return fmt.format(min(xs) * scale), fmt.format(statistics.median(xs) * scale), fmt.format(max(xs) * scale)


def cells(xs: Sequence[float], fmt: str = "{:.0f}", scale: float = 1.0, sep: str = " | ",
          bold: bool = False) -> str:
    """min, median and max as table cells (``–`` each when there is no sample; NaN samples are left out)."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return sep.join("–" * 3)
    lo, mid, hi = min_med_max(xs, fmt, scale)
    return sep.join((lo, f"**{mid}**" if bold else mid, hi))


# -- /proc -----------------------------------------------------------------------------


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU time a live process has used so far (all its threads, clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU time a live process has used so far (clock-tick resolution)."""
    return sum(proc_cpu_split(pid))


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``...); KeyError when it has none."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def proc_status_mb(pid: int, key: str = "VmRSS") -> float:
    """A ``/proc/PID/status`` field in MiB; NaN when it has none."""
    try:
        return status_kib(pid, key) / 1024
    except KeyError:
        return float("nan")


def reset_hwm(pid: int) -> int:
    """Reset VmHWM to the current RSS; return that RSS (KiB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_kib(pid, "VmRSS")


def child_pids(pid: int) -> list[int]:
    """The children of ``pid`` (its main thread's), e.g. membershipd's nats-server."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (``unibus.testing.free_port`` for code that
    runs under an earlier release's venv, which has no ``unibus.testing``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int | None) -> bool:
    """The process exists and is not a zombie."""
    if not pid:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def sigkill(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(pid: int | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def kill_nats_if_alive(pid: int | None, marker: str) -> None:
    """SIGKILL ``pid`` if it is still a live nats-server whose argv names ``marker`` (no pid-reuse accidents)."""
    if not alive(pid):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return
    if "nats-server" in cmdline and marker in cmdline:
        sigkill(pid)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """``sig`` (SIGTERM), then SIGKILL if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stop_all(processes: Iterable[subprocess.Popen], daemons: Iterable[Any], scratch: Path) -> None:
    """A bench's clean-up: its baseline processes first (:func:`stop_process`), then its
    membershipd (``MembershipdProcess.stop``), then its scratch directory."""
    for p in processes:
        stop_process(p)
    for d in daemons:
        d.stop()
    shutil.rmtree(scratch, ignore_errors=True)


def wait_ready_line(proc: subprocess.Popen, timeout: float = 30.0, what: str = "baseline server") -> None:
    """Wait for a child's ``ready`` line on its stdout."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == b"ready":
            return
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
    raise TimeoutError(f"{what} did not become ready")


def daemon_env(log_level: str = "WARNING") -> dict[str, str]:
    """The environment membershipd runs with here: no UNIBUS_* from outside, quiet logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    env["UNIBUS_LOG_LEVEL"] = log_level
    return env


def start_membershipd(data_dir: Path, *args: str, timeout: float = 60.0) -> Any:
    """``unibus.testing.MembershipdProcess`` with :func:`daemon_env`, started and healthy."""
    from unibus.testing import MembershipdProcess

    d = MembershipdProcess(data_dir, args)
    d.env = daemon_env()
    try:
        return d.start(timeout=timeout)
    except BaseException:
        d.stop()  # it may have started and then failed its health check
        raise


# -- signed requests -------------------------------------------------------------------


def signed_headers(identity: Any, method: str = "GET", path: str = "/v1/me", body: bytes | None = None,
                   created: int | None = None) -> dict[str, str]:
    """The RFC 9421 headers of one request signed as ``identity`` (its own nonce; ``created`` = now by default)."""
    from unibus.signing import sign_request

    return sign_request(method, path, body, keyid=identity.handle, private_key=identity.sign_key, created=created)


def sign_batch(identity: Any, count: int, path: str = "/v1/me") -> list[dict[str, str]]:
    """``count`` signatures of ``GET path``, each with its own nonce, ``created`` = now."""
    created = int(time.time())
    return [signed_headers(identity, "GET", path, created=created) for _ in range(count)]


# -- the machine -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in info.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sha_extensions() -> bool:
    """The ``sha_ni`` flag (x86) or ``sha2`` feature (arm) in /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and {"sha_ni", "sha2"} & set(value.split()):
            return True
    return False


def machine() -> str:
    """The CPU model and whether it has SHA extensions, as every environment line names them.

    SHA-256 runs several times faster with the extensions, so a hashing path's figures
    say little without it (docs/benchmarks.md).
    """
    flag = "sha_ni" if platform.machine() in ("x86_64", "i686") else "sha2"
    return (f"**{cpu_model()}**, SHA extensions **{'yes' if sha_extensions() else 'no'}** "
            f"(`{flag}` in /proc/cpuinfo), {os.cpu_count()} CPUs")


def nats_server_version(binary: Path | str | None = None) -> str:
    """``nats-server --version`` of ``binary`` (the one membershipd runs by default)."""
    if binary is None:
        from unibus.supervisor import find_nats_server

        binary = find_nats_server()
    return subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def measured_by(command: str) -> str:
    """The start of every environment line: date, command, the machine and Python."""
    return f"Measured {datetime.now():%Y-%m-%d} by `{command}`: {machine()}, Python {platform.python_version()}"


def load_average(before: float, after: float) -> str:
    return f"1-minute load average {before:.1f} before and {after:.1f} after"


# -- py-spy ----------------------------------------------------------------------------------

FRAME = re.compile(r"^(.*) \((.*):(\d+)\)$")
#: Leaf frames of threads that are blocked, not working (py-spy's idle detection misses them).
IDLE_LEAVES = {("_worker", "concurrent/futures/thread.py"),
               ("ThreadedChildWatcher._do_waitpid", "asyncio/unix_events.py"),
               ("Condition.wait", "threading.py"), ("Event.wait", "threading.py")}


def pyspy_binary() -> str | None:
    local = Path(PYTHON).parent / "py-spy"
    return str(local) if local.is_file() else shutil.which("py-spy")


def parse_frames(stack: str) -> list[tuple[str, str, int]]:
    """A py-spy raw (collapsed) stack as ``(function, file, line)`` frames, root first."""
    out = []
    for raw in stack.split(";"):
        m = FRAME.match(raw)
        out.append((m.group(1), m.group(2), int(m.group(3))) if m else (raw, "", 0))
    return out


# -- the report ------------------------------------------------------------------------------


def arg_parser(doc: str, section: str, runs: int, runs_help: str = "runs") -> argparse.ArgumentParser:
    """The options every script has: ``--runs`` (at least 1: see :func:`parse`), ``--out`` and ``--no-write``.

    ``doc`` is the script's docstring (its first paragraph is the description).
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=runs, help=f"{runs_help} (default {runs})")
    parser.add_argument("--out", type=Path, default=DOCS,
                        help=f"markdown file whose {section} section is rewritten (default docs/benchmarks.md)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the markdown file alone")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, refusing ``--runs`` below 1 (exit 2, one line)."""
    ns = parser.parse_args(argv)
    if ns.runs < 1:
        parser.error("--runs must be at least 1")
    return ns


def publish(body: str, name: str, heading: str, out: Path = DOCS, write: bool = True,
            label: str | None = None) -> int:
    """Print the section; unless ``write`` is false, put it into ``out`` (bench:NAME) and say so. Returns 0."""
    print(body)
    if write:
        benchdoc.write_section(out, name, heading, body)
        print(f"wrote the {label or name} section of {out}", file=sys.stderr)
    return 0
