"""What the multi-process probes share (bench/probe_member_changes.py, bench/probe_login_flood.py).

Each probe is one script that plays every role: the orchestrator starts a child process of
itself per role (``--role NAME --config FILE``), writes the time its window starts on the
child's stdin, and reads the child's result, one JSON line on its stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchlib import PYTHON, stop_process

# -- in a child -------------------------------------------------------------------------


async def read_start_line(timeout: float) -> float:
    """The time (``time.time()``) the window starts at, as the orchestrator writes it on stdin."""
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout)
    if not line.strip():
        raise RuntimeError("no start time on stdin (the orchestrator went away)")
    return float(line)


async def sleep_until(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def run_role(roles: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]], role: str, config: Path,
             bound: Callable[[dict[str, Any]], float]) -> int:
    """Run ``roles[role]`` with the child's config, within ``bound(config)`` seconds; print its result."""
    cfg = json.loads(config.read_text())
    result = asyncio.run(asyncio.wait_for(roles[role](cfg), bound(cfg)))
    print(json.dumps(result), flush=True)
    return 0


# -- in the orchestrator ------------------------------------------------------------------


def unibus_origin() -> str:
    """Which unibus this interpreter imports, and its git commit when it lies in a checkout."""
    import unibus

    where = Path(unibus.__file__).resolve().parent
    text = f"unibus {getattr(unibus, '__version__', '?')} from {unibus.__file__}"
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: never take the index lock of a shared checkout
    try:
        described = subprocess.run(["git", "-C", str(where), "describe", "--always", "--dirty", "--abbrev=12"],
                                   capture_output=True, text=True, timeout=10, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return text + " (git commit not found)"
    commit = described.stdout.strip()
    return text + (f" (git {commit})" if described.returncode == 0 and commit else " (git commit not found)")


def start_child(script: str, role: str, name: str, cfg: dict[str, Any], scratch: Path,
                procs: list[subprocess.Popen]) -> subprocess.Popen:
    """``script --role role`` with ``cfg`` in a file named after ``name``; added to ``procs``."""
    config = scratch / f"{name}-{cfg['tag']}.json"
    config.write_text(json.dumps(cfg))
    err = open(scratch / f"{name}-{cfg['tag']}.stderr", "wb")
    try:
        proc = subprocess.Popen([PYTHON, script, "--role", role, "--config", str(config)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err)
    finally:
        err.close()
    procs.append(proc)
    return proc


def child_result(name: str, proc: subprocess.Popen, scratch: Path, tag: str, timeout: float) -> dict[str, Any]:
    """The child's result (its last stdout line, JSON), within ``timeout`` seconds, else its stderr's end."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise RuntimeError(f"{name} did not finish within {timeout:.0f} s") from None
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (scratch / f"{name}-{tag}.stderr").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{err}")
    return json.loads(lines[-1])
