"""unibus.testing: a pytest plugin for unibus and its plugin authors.

Installed with unibus (entry point ``unibus`` in group ``pytest11``), so these
fixtures are available in any test suite that has unibus installed:

``unibus_plugin_manager``
    A factory: ``unibus_plugin_manager(plugin_module, ...)`` builds a
    :class:`unibus.pluginmanager.PluginManager` holding only the plugins given
    (no entry points are loaded).
``nats_server``
    A real nats-server (JetStream on) run by unibus's own supervisor on free
    loopback ports in a temporary directory. Attributes: ``url``, ``port``,
    ``supervisor``, ``restarts``; ``kill()`` simulates a crash.
``membershipd_factory`` / ``membershipd``
    A real ``membershipd serve`` process in a temporary data dir on free
    ports, started and waited for until ``/healthz`` answers 200. Attributes:
    ``base_url``, ``data_dir``, ``log_path``, ``log_text()``, ``healthz()``,
    ``stop()`` (SIGTERM, returns the exit code), ``nats_pid()``, ``again()``
    (the same node, unstarted, to start after a stop or crash). Every process
    a fixture started is stopped at teardown. An HTTPS daemon
    (``--http-tls-cert``) needs ``ca=`` (the CA file its health checks trust);
    its ``base_url`` is then ``https://...`` and ``ssl_context()`` verifies it.

``cluster_factory`` / ``cluster``
    Three ``membershipd serve`` nodes formed into one cluster on loopback
    (:class:`Cluster`: route TLS, a route password file, KV replicas 3), the
    admin bootstrapped and migrated into it; ``kill(i)``, ``restart(i)``
    (tracked), ``pause(i)``/``resume()`` (every thread stopped when ``pause``
    returns), signed clients per node. Every
    process of every node is stopped at teardown.
``unibus_app``
    membershipd in this process with only the plugins given (:class:`UnibusApp`).

``freeze(pid)`` stops a process (SIGSTOP) and returns once every thread of it
is stopped: until then a thread still running can answer.

``make_test_pki(directory)`` makes a client-facing CA with a server
certificate for 127.0.0.1, ::1 and localhost and a client certificate
(:class:`PKI`; ``pki.serve_args()`` are the matching ``serve`` flags), and
``make_test_ca``/``make_test_cert`` the pieces of any other test PKI.

Everything listens on 127.0.0.1 only; nothing assumes a fixed port is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import random
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import forkrun
from .aio import ForeignCancel, own_cancel_only, within
from .natsconf import base_config, finalize_config, write_config
from .pluginmanager import PluginManager
from .settings import HostPort, Settings
from .supervisor import NatsSupervisor, find_nats_server

DEFAULT_TIMEOUT = 30.0


#: Where :func:`free_port` looks first: below the kernel's ephemeral range (Linux
#: ``net.ipv4.ip_local_port_range``, 32768 to 60999 by default), which is where the
#: kernel picks the local port of every outgoing connection.
_PORTS_BELOW_EPHEMERAL = (20000, 32767)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_slice(low: int, high: int) -> tuple[int, int]:
    """This pytest-xdist worker's share of ``low..high`` (all of it outside xdist): two
    workers never pick the same port. Within one process nothing picks a port twice
    (``_HANDED_OUT``), but across workers a port picked by one could be bound by the
    other's daemon before its own child bound it: a CI run saw a daemon's health check
    answered by another worker's nats-server."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1):
        return low, high
    index, n = int(worker[2:]), int(count)
    size = (high - low + 1) // n
    if index >= n or size < 100:
        return low, high
    return low + index * size, low + (index + 1) * size - 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the kernel's ephemeral range.

    A port the kernel hands out for ``bind(("127.0.0.1", 0))`` comes from the same range as
    the local port of every outgoing connection, so between this call and the bind of the
    process it is for, any connection on the machine could take it (a nats-server whose
    route port was taken that way). A random port below that range can only be taken by
    another explicit bind; it is tried until one binds (bounded), and the kernel's choice is
    the fallback. A port is never handed out twice in one process.
    """
    low, high = _worker_slice(_PORTS_BELOW_EPHEMERAL[0], min(_PORTS_BELOW_EPHEMERAL[1], _ephemeral_start() - 1))
    rng = random.SystemRandom()
    with _HANDED_OUT_LOCK:
        for _ in range(50 if high > low else 0):
            port = rng.randint(low, high)
            if port in _HANDED_OUT or not _bindable(port):
                continue
            return _hand_out(port)
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                return _hand_out(port)
    raise OSError("no free loopback port found")


#: Ports :func:`free_port` handed out in this process, never handed out twice: nothing
#: holds a port between the pick and its bind, so two picks for one cluster (its nodes'
#: route ports) could be the same port, and a CI run saw exactly that (two nodes given
#: route port 26271, one of them unable to listen).
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _hand_out(port: int) -> int:
    _HANDED_OUT.add(port)
    return port


def run_membershipd(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``membershipd ARGS`` to completion and capture its output (forked: :mod:`unibus.forkrun`)."""
    return forkrun.run("unibus.cli", args, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def run_membershipd_to_full_disk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``membershipd ARGS`` with standard output on Linux's ``/dev/full``, where every write
    fails with ENOSPC (a full disk); only stderr is captured."""
    with open("/dev/full", "w") as full:
        return forkrun.run("unibus.cli", args, stdout=full, timeout=timeout)


_migrated_template: Path | None = None


def _migrated_db() -> Path:
    """An empty database at the newest revision, made once per process (alembic is slow to import)."""
    global _migrated_template
    if _migrated_template is None or not _migrated_template.exists():
        import atexit
        import shutil
        import tempfile

        from .store.db import migrate

        directory = tempfile.mkdtemp(prefix="unibus-testing-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        path = Path(directory) / "membershipd.db"
        migrate(path)
        _migrated_template = path
    return _migrated_template


def bootstrap_member(data_dir: Path | str, identity: Any, role: str = "member") -> None:
    """``membershipd member add`` an identity (``unibus.client.keys.Identity``) into a data dir, offline.

    It runs the command in this process (``unibus.cli.main``), on a database
    copied from one migrated once per process: the same code path as the
    command, without a Python start-up and a migration per call.
    """
    import io
    import shutil
    from contextlib import redirect_stderr, redirect_stdout

    from .cli import main

    if identity.bus_pub is None:
        raise ValueError(f"{identity.handle}: the identity has no bus key (membershipd member add needs --bus-pub)")
    data_dir = Path(data_dir)  # a str too
    db = data_dir / "membershipd.db"
    if not db.exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(_migrated_db(), db)
        db.chmod(0o600)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["member", "add", "--data-dir", str(data_dir), "--handle", identity.handle, "--role", role,
                     "--sign-pub", identity.sign_pub_b64, "--enc-pub", identity.enc_pub_b64,
                     "--enc-suite", identity.enc_suite, "--bus-pub", identity.bus_pub])
    if code != 0:
        raise RuntimeError(f"membershipd member add failed: {err.getvalue().strip()}")


async def accept_offline_bootstraps(client: Any) -> None:
    """Have ``client`` (a ``unibus.client.UnibusClient``) accept every offline ``member add``
    after the first, as each member does with ``unibus trust FINGERPRINT`` after a recovery
    (docs/client.md): a test that bootstraps several members offline, then changes membership
    through the SDK, whose changes are made and confirmed only on a log that verifies."""
    from .memberlog import entry_hash

    await client.deployment_tag()  # pins entry 0 on first use
    after = 0
    while True:
        page = await client.log(after=after, limit=1000)
        entries = page.get("entries") or []
        for entry in entries:
            if entry.get("kind") == "bootstrap":
                await client.trust(entry_hash(entry))
        if not entries:
            return
        after = entries[-1]["seq"]


def nats_server_pids(under: Path | str | None = None) -> set[int]:
    """PIDs of running nats-server processes, those whose config lies ``under`` a path if given.

    Tests use it to prove that nothing was left running.
    """
    pids = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"nats-server") and (under is None or any(str(under).encode() in a for a in argv)):
            pids.add(int(p.name))
    return pids


def make_plugin_manager(*plugins: Any) -> PluginManager:
    """A plugin manager holding only ``plugins`` (modules or objects with hookimpls).

    A plugin that fails the hook checks raises :class:`~unibus.pluginmanager.PluginError`; one whose
    ``cli_options`` raises or declares what ``serve`` refuses (not ``Option`` objects with ``--flags``,
    a flag the core or another plugin has) raises the error ``serve`` gives: before, the manager
    quietly held it as broken and ``pm.options()`` returned ``[]`` (a plugin author's walkthrough)."""
    from .options import reserved_flags

    pm = PluginManager(load_entry_points=False, plugins=plugins)
    pm.options(reserved=reserved_flags())
    pm.require_healthy()
    return pm


# -- a supervised nats-server run from synchronous tests ----------------------


class _LoopThread:
    """An asyncio loop in a daemon thread, so sync fixtures can drive async code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="unibus-testing-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = DEFAULT_TIMEOUT) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class NatsServer:
    """A real nats-server under :class:`NatsSupervisor`, for tests."""

    def __init__(self, data_dir: Path, *, config_hook: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.settings = Settings(data_dir=data_dir, nats_addr=HostPort("127.0.0.1", self.port), server_name="unibus-test")
        config = base_config(self.settings)
        if config_hook:
            config_hook(config)
        self.config = finalize_config(config, self.settings)
        data_dir.mkdir(parents=True, exist_ok=True)
        write_config(self.config, self.settings.nats_conf_path)
        self._loop = _LoopThread()
        self.supervisor = self._loop.run(self._make_supervisor())

    async def _make_supervisor(self) -> NatsSupervisor:
        sup = NatsSupervisor(find_nats_server(), self.settings.nats_conf_path, "127.0.0.1", self.port,
                             backoff_initial=0.1)
        await sup.start()
        return sup

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def pid(self) -> int | None:
        return self.supervisor.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self._loop.loop.call_soon_threadsafe(self.supervisor.kill, sig)

    def wait_running(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.supervisor.running:
                return
            time.sleep(0.02)
        raise TimeoutError("nats-server did not come back")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self.supervisor.stop(), timeout=15)
        self._loop.close()


# -- a membershipd process ------------------------------------------------------


class MembershipdProcess:
    """``membershipd serve`` as a process of its own, on free loopback ports: ``python -m
    unibus.cli`` forked from a zygote (:mod:`unibus.forkrun`) unless ``command`` is given or
    the environment needs a new interpreter."""

    def __init__(self, data_dir: Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 command: Sequence[str] | None = None, *, ca: Path | None = None, http_host: str = "127.0.0.1",
                 nats_host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.http_port = free_port()
        self.nats_port = free_port()
        self.monitor_port = free_port()
        self.args = list(args)
        self.ca = ca
        self.http_host = http_host
        self.nats_host = nats_host
        if self.https and ca is None:
            raise ValueError("an HTTPS membershipd (--http-tls-cert) needs ca= for its health checks")
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("UNIBUS_LOG_LEVEL", "INFO")
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        argv = list(command or [sys.executable, "-m", "unibus.cli"])
        argv += ["serve", "--data-dir", str(data_dir),
                 "--http-addr", f"{http_host}:{self.http_port}", "--nats-addr", f"{nats_host}:{self.nats_port}"]
        if "--nats-monitor-port" not in self.args and "nats_monitor" not in self.args:
            argv += ["--nats-monitor-port", str(self.monitor_port)]
        self.argv = argv + self.args
        self.proc: subprocess.Popen[bytes] | forkrun.ForkedProcess | None = None
        #: Every process of this node (this one and each ``again()``), so a
        #: fixture's teardown stops them all; ``restarts`` counts the starts after the first.
        self.family: list[MembershipdProcess] = [self]
        self._log: Any = None

    @property
    def restarts(self) -> int:
        return sum(1 for p in self.family if p.proc is not None) - 1

    def again(self) -> MembershipdProcess:
        """A new, unstarted process for the same data dir, ports, argv and
        environment: the same node after a crash or a stop. It joins this
        node's ``family``, so the fixture that started the first stops it too."""
        new = copy.copy(self)
        new.proc = None
        new._log = None
        new.args, new.argv, new.env = list(self.args), list(self.argv), dict(self.env)
        self.family.append(new)
        return new

    def restart(self, wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> MembershipdProcess:
        """Stop this process (SIGTERM) and start the same node again; returns the new process."""
        self.stop()
        return self.again().start(wait=wait, timeout=timeout)

    @property
    def https(self) -> bool:
        return any(a.split("=", 1)[0] == "--http-tls-cert" for a in self.args)

    @property
    def base_url(self) -> str:
        return f"{'https' if self.https else 'http'}://{_dial(self.http_host)}:{self.http_port}"

    @property
    def nats_url(self) -> str:
        scheme = "tls" if any(a.split("=", 1)[0] == "--tls-cert" for a in self.args) else "nats"
        return f"{scheme}://{_dial(self.nats_host)}:{self.nats_port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context that trusts ``ca`` (None when no CA was given)."""
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca is not None else None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> MembershipdProcess:
        self._log = open(self.log_path, "ab")
        if self.argv[:3] == [sys.executable, "-m", "unibus.cli"]:  # forked from a zygote when it can be
            before = [p.proc for p in self.family if p is not self and p.proc is not None]
            self.proc = forkrun.spawn("unibus.cli", self.argv[3:], env=self.env, stdout=self._log,
                                      stderr=subprocess.STDOUT, not_like=before[-1] if before else None)
        else:
            self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                         stdin=subprocess.DEVNULL)
        if wait:
            self.wait_healthy(timeout)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def healthz(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        """``(status, body)`` of GET /healthz."""
        return http_json("GET", self.base_url + "/healthz", timeout=timeout, context=self.ssl_context())

    def wait_healthy(self, timeout: float = DEFAULT_TIMEOUT, want: int = 200) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"membershipd exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                status, body = self.healthz(timeout=2.0)
                if status == want:
                    return body
                last = (status, body)
            except (OSError, urllib.error.URLError) as e:
                last = e
            time.sleep(0.05)
        raise TimeoutError(f"/healthz did not answer {want} within {timeout}s (last: {last})\n{self.log_text()[-4000:]}")

    def nats_pid(self) -> int | None:
        """The pid of the nats-server child, from /proc (None once membershipd has exited)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return None
        for c in children:
            with contextlib.suppress(OSError):
                if "nats-server" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace"):
                    return int(c)
        return None

    def nats_handle(self) -> int | None:
        """A pidfd of the nats-server child (close it with ``os.close``), or None.

        Taken while membershipd runs and checked to still be its child after
        it was opened, so the descriptor names that very process: a signal
        sent through it (:func:`signal_pidfd`) never reaches a process that
        reused the pid after nats-server exited.
        """
        pid = self.nats_pid()
        if pid is None:
            return None
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        if self.nats_pid() != pid:  # it exited between the look-up and the open: the pid may be another's
            os.close(fd)
            return None
        return fd

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time; then make sure its
        nats-server is gone, through a pidfd (never a signal to a reused pid)."""
        if self.proc is None:
            return None
        nats = self.nats_handle()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            if nats is not None:
                signal_pidfd(nats, signal.SIGKILL)
        finally:
            if nats is not None:
                os.close(nats)
            with contextlib.suppress(Exception):
                self._log.close()
        return self.proc.returncode

    def stop_family(self) -> None:
        """:meth:`stop` every process of this node: the first and each :meth:`again` of it."""
        for p in self.family:
            with contextlib.suppress(Exception):
                p.stop()


def signal_pidfd(fd: int, sig: int) -> bool:
    """Send ``sig`` to the process a pidfd names; False when it has already exited."""
    try:
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False


def freeze(pid: int, *, pidfd: int | None = None, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` (through ``pidfd`` when given) and return once every thread of it is stopped.

    ``kill()`` returns once the signal is queued: the process stops when one
    of its threads takes the signal, and its other threads only when that one
    has told them, so a thread still running can answer meanwhile (on a busy
    machine, for milliseconds). A test that froze nats-server and at once
    asked it for two PONGs got them, in two CI runs. Through its pidfd, a
    process that has exited counts as stopped; by pid, ``ProcessLookupError``
    once it is reaped. :class:`TimeoutError` after ``timeout`` seconds. It
    polls every millisecond in the calling thread (an event loop's too): a
    thread in uninterruptible sleep holds it until that sleep ends.
    """
    if pidfd is None:
        os.kill(pid, signal.SIGSTOP)
    elif not signal_pidfd(pidfd, signal.SIGSTOP):
        return
    wait_stopped(pid, pidfd=pidfd, timeout=timeout)


def _pidfd_pid(fd: int) -> int:
    """The pid a pidfd names (its ``Pid:`` line in /proc; -1 once that process is reaped)."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    raise OSError(f"descriptor {fd} is not a pidfd")


def wait_stopped(pid: int, *, pidfd: int | None = None, timeout: float = 10.0) -> None:
    """Return once no thread of ``pid`` can run: every one stopped (``T``, ``t``) or exited.

    With ``pidfd`` (of that process), a pid reused after it exited is never
    taken for it. :class:`TimeoutError` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if pidfd is not None and select.select([pidfd], [], [], 0)[0]:
            return  # a pidfd is readable once its process has exited
        states = []
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return
        for task in tasks:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t", "Z", "X") for state in states):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"process {pid} did not stop within {timeout:g} s (thread states {states})")
        time.sleep(0.001)


async def member_connections(daemon: MembershipdProcess, handle: str, *, servers: int = 1) -> set[tuple[str, int]]:
    """``(server id, client id)`` of every connection of ``handle`` that nats-server holds right now.

    Asked as membershipd's system user (``system.nkey``) of every server
    (``$SYS.REQ.SERVER.PING.CONNZ``, one answer per server: ``servers`` of
    them are awaited); a callout user is named by its handle.
    """
    import nats

    seed = (daemon.data_dir / "system.nkey").read_text().strip()
    nc = await nats.connect(daemon.nats_url, nkeys_seed_str=seed, allow_reconnect=False, connect_timeout=2,
                            tls=daemon.ssl_context())
    found: set[tuple[str, int]] = set()
    answered: set[str] = set()
    done = asyncio.Event()

    async def on_reply(msg) -> None:
        reply = json.loads(msg.data)
        server = reply["server"]["id"]
        answered.add(server)
        found.update((server, c["cid"]) for c in reply["data"].get("connections") or [])
        if len(answered) >= servers:
            done.set()

    try:
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_reply)
        await nc.publish("$SYS.REQ.SERVER.PING.CONNZ",
                         json.dumps({"acc": "MEMBERS", "auth": True, "user": handle}).encode(), reply=inbox)
        await within(done.wait(), 5)
        return found
    finally:
        with contextlib.suppress(ForeignCancel):  # closed during a reconnect (unibus.aio)
            await own_cancel_only(nc.close())


def _dial(host: str) -> str:
    """The host a test dials for a listener bound to ``host``: a wildcard is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 5.0, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    """A tiny synchronous JSON client for tests: ``(status, decoded body or text)``.

    ``context`` verifies an ``https://`` URL (e.g. ``MembershipdProcess.ssl_context()``).
    """
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


# -- an in-process membershipd with the plugins a test names ---------------------


class SignedClient:
    """A synchronous test client that signs every request as one member (RFC 9421).

    ``get/post/put/patch/delete(path, json=None)`` return ``(status, body)``;
    ``body`` is the decoded JSON (or text). ``signed=False`` sends the request
    without a signature, as an anonymous caller would.
    """

    def __init__(self, base_url: str, identity: Any = None, *, context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url
        self.identity = identity
        self.context = context  # verifies an https:// base_url (``MembershipdProcess.ssl_context()``)

    @property
    def handle(self) -> str | None:
        return self.identity.handle if self.identity is not None else None

    def request(self, method: str, path: str, json_body: Any = None, *, signed: bool = True,
                headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, Any]:
        from .signing import sign_request

        raw = json.dumps(json_body).encode() if json_body is not None else None
        h = dict(headers or {})
        if raw is not None:
            h["Content-Type"] = "application/json"
        if signed and self.identity is not None:
            h.update(sign_request(method, path, raw, keyid=self.identity.handle,
                                  private_key=self.identity.sign_key))
        return http_json(method, self.base_url + path, raw, h, timeout=timeout, context=self.context)

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> tuple[int, Any]:  # noqa: A002 - as in requests
        return self.request("POST", path, json, **kw)

    def put(self, path: str, json: Any = None, **kw: Any) -> tuple[int, Any]:  # noqa: A002
        return self.request("PUT", path, json, **kw)

    def patch(self, path: str, json: Any = None, **kw: Any) -> tuple[int, Any]:  # noqa: A002
        return self.request("PATCH", path, json, **kw)

    def delete(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("DELETE", path, **kw)


class UnibusApp:
    """membershipd in this process, with only the plugins a test names (docs/plugins.md, "Testing").

    It is the real daemon (:class:`unibus.daemon.Daemon`): a real nats-server
    child, SQLite in a temporary data dir, the HTTP port on loopback, every
    start-up step and hook in order, run on an event loop in a background
    thread, so tests (sync or async) call it synchronously. ``args`` are
    ``serve`` flags (a plugin's own flags included); the bus runs with
    ``--bus-auth off`` unless ``args`` say otherwise and ``auth_enforce`` is
    among the plugins.

    ``admin`` is a :class:`SignedClient` of the member ``admin`` (bootstrapped
    offline before the start); ``member(handle, role)`` adds a member through
    the API and returns its client; ``anonymous`` sends unsigned requests.
    ``app`` is the aiohttp application (``app[unibus.app.STORE]``...),
    ``run(coro)`` runs a coroutine on the daemon's loop, ``reload()`` does
    what SIGHUP does, ``stop()`` stops it (also at teardown).
    """

    def __init__(self, data_dir: Path, plugins: Sequence[Any] = (), args: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        from .cli import settings_for

        self.data_dir = data_dir
        self.plugins = make_plugin_manager(*plugins)
        argv = ["--data-dir", str(data_dir), "--http-addr", f"127.0.0.1:{free_port()}",
                "--nats-addr", f"127.0.0.1:{free_port()}", *args]
        if not any(a.split("=", 1)[0] == "--bus-auth" for a in args):
            argv += ["--bus-auth", "off"]
        self.settings = settings_for("serve", argv, self.plugins, {} if env is None else env)
        self.base_url = f"http://127.0.0.1:{self.settings.http_addr.port}"
        self.daemon: Any = None
        self._loop: _LoopThread | None = None
        self.admin = SignedClient(self.base_url, None)
        self.anonymous = SignedClient(self.base_url, None)

    @property
    def app(self) -> Any:
        return self.daemon.app

    def start(self) -> UnibusApp:
        from .client.keys import generate_identity
        from .daemon import Daemon

        identity = generate_identity("admin")
        bootstrap_member(self.data_dir, identity, "admin")
        self.admin = SignedClient(self.base_url, identity)
        self._loop = _LoopThread()
        self.daemon = Daemon(self.settings, self.plugins)
        try:
            self._loop.run(self.daemon.start())
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, coro: Any, timeout: float = DEFAULT_TIMEOUT) -> Any:
        assert self._loop is not None, "not started"
        return self._loop.run(coro, timeout)

    def member(self, handle: str, role: str = "member") -> SignedClient:
        """Add a member (as ``admin``, through ``POST /v1/members``) and return its client."""
        from .client.keys import generate_identity

        identity = generate_identity(handle)
        status, body = self.admin.post("/v1/members", {
            "handle": handle, "role": role, "sign_pub": identity.sign_pub_b64, "enc_pub": identity.enc_pub_b64,
            "enc_suite": identity.enc_suite, "bus_pub": identity.bus_pub})
        if status != 201:
            raise RuntimeError(f"adding member {handle!r} failed: {status} {body}")
        return SignedClient(self.base_url, identity)

    def reload(self) -> None:
        """What SIGHUP does: re-read the store, deliver offline changes, call ``reloaded``."""
        self.run(self.daemon._reload())

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The current value of one sample of the daemon's registry, as ``GET /metrics`` would show it.

        ``name`` is the sample's full name (``unibus_audit_events_total``), ``labels``
        its labels; None when there is no such sample (yet).
        """
        from .app import METRICS

        return self.app[METRICS].registry.get_sample_value(name, labels or {})

    def client_command(self, client: SignedClient, *argv: str, plugins: Sequence[Any] = (),
                       timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
        """Run ``unibus ARGV`` as ``client``'s member against this daemon: ``(exit code, stdout)``.

        The member's identity is written to a 0600 file in the data dir, and
        ``--server`` and ``--identity`` are added after the command, so
        ``argv`` is what a user types after ``unibus`` (``"audit", "tail",
        "--limit", "5"``). ``plugins`` are client plugin modules that are not
        installed (their ``client_commands``). The client runs in a thread of
        its own, so sync and async tests can call this; its output is captured
        by redirecting ``sys.stdout``, so whatever else prints on stdout
        meanwhile is captured too (the daemon logs on stderr).
        """
        import io

        from .client.cli import main
        from .client.keys import save_identity

        if client.identity is None:
            raise ValueError("client_command needs a signed client (admin or member(...)), not anonymous")
        path = save_identity(client.identity, self.data_dir / "test-identities" / f"{client.handle}.json",
                             force=True)
        out = io.StringIO()
        result: Future[int] = Future()

        def run() -> None:
            try:
                with contextlib.redirect_stdout(out):
                    code = main([*argv, "--server", self.base_url, "--identity", str(path)], plugins=plugins)
            except SystemExit as e:  # argparse refuses a bad argument with exit 2
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # noqa: BLE001 - handed to the test
                result.set_exception(e)
                return
            result.set_result(code)

        threading.Thread(target=run, name="unibus-client-command", daemon=True).start()
        return result.result(timeout), out.getvalue()

    def stop(self) -> None:
        """Stop the daemon; raise its :class:`~unibus.errors.RuntimeFailure` if it failed while it
        served (a NATS connection that ended for good: ``membershipd serve`` would exit 1)."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        try:
            if self.daemon is not None:
                loop.run(self.daemon.stop(), timeout=DEFAULT_TIMEOUT)
        finally:
            loop.close()
        if self.daemon is not None and self.daemon.failure is not None:
            raise self.daemon.failure


# -- a cluster of membershipd nodes -----------------------------------------------

CLUSTER_FORM_TIMEOUT = 120.0


class Cluster:
    """Three membershipd nodes that form one cluster on loopback (docs/plugins.md, "Testing").

    The nodes run as the operations guide builds one (docs/operations.md,
    "Flags and environment" and "Posture and the cluster gate"): a cluster
    name, routes to the other nodes, a route password in a 0600 file, mutual
    route TLS from a throwaway route CA, KV buckets of 3 replicas, and each
    its metrics listener (``metrics_ports``). ``args`` are extra ``serve``
    flags for every node (your plugin's own, ``--disable-plugin``...);
    ``plugins`` are module names loaded with ``--plugin`` (importable from
    this test's ``sys.path``, nothing to install).

    ``admin`` (an ``unibus.client.keys.Identity``) is bootstrapped offline on
    node 1; :meth:`migrate` then moves node 1's store into the formed
    cluster (``membershipd migrate-to-kv``, docs/operations.md, "Bootstrapping
    the first admin"). Without ``admin`` every node starts empty.

    ``tls_ca`` is the CA of the certificates the nodes' client listeners present
    when ``args`` give them TLS (``make_test_pki(...).serve_args()``, HTTPS,
    TLS on the NATS listener or both, as in production): the health checks,
    :meth:`client` and :meth:`migrate` (``--ca``) verify them against it.
    (``.ca`` is the route CA the cluster makes for itself.)

    Restarts are tracked: :meth:`restart` starts ``nodes[i].again()``, which
    joins the node's ``family``, and :meth:`stop` stops every process of every
    family. Signals to a nats-server, or to a paused node, go through pidfds:
    never to a pid another process reused.
    """

    def __init__(self, directory: Path, admin: Any = None, *, args: Sequence[str] = (),
                 plugins: Sequence[str] = (), env: dict[str, str] | None = None, size: int = 3,
                 name: str = "unibus-test", secret: str | None = None, metrics: bool = True,
                 data_dirs: Sequence[Path | None] = (), tls_ca: Path | None = None) -> None:
        import secrets

        if tls_ca is None and any(a.split("=", 1)[0] in ("--tls-cert", "--http-tls-cert") for a in args):
            raise ValueError("a cluster whose client listeners use TLS (--tls-cert, --http-tls-cert) needs "
                             "tls_ca=, the CA of their certificates, to verify them")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.identity = admin
        self.secret = secret or secrets.token_urlsafe(24)
        self.pass_file = directory / "cluster.pass"
        fd = os.open(self.pass_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file left in a reused directory keeps its mode otherwise
        with os.fdopen(fd, "w") as f:
            f.write(self.secret + "\n")
        pki = directory / "pki"
        self.ca = make_test_ca(pki, "route-ca")
        self.route_ports = [free_port() for _ in range(size)]
        self.metrics_ports = [free_port() for _ in range(size)] if metrics else []
        env = dict(env or {})
        if plugins:  # the nodes import --plugin modules from the same sys.path as this test
            env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        given = list(data_dirs) + [None] * size
        self.nodes: list[MembershipdProcess] = []
        self._paused: list[int] = []
        self._name, self._replicas, self._env, self._tls_ca = name, size, env, tls_ca
        self._common = [a for m in plugins for a in ("--plugin", m)] + list(args)
        for i in range(size):
            routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i)
            data = given[i] or directory / f"n{i + 1}"
            if i == 0 and admin is not None:
                bootstrap_member(data, admin, "admin")
            self.nodes.append(self._node(f"n{i + 1}", data, self.route_ports[i], routes,
                                         self.metrics_ports[i] if metrics else None))

    def _node(self, name: str, data: Path, route_port: int, routes: str, metrics_port: int | None) -> MembershipdProcess:
        cert = make_test_cert(self.directory / "pki", name, self.ca)
        node_args = ["--server-name", name, "--cluster-name", self._name,
                     "--cluster-addr", f"127.0.0.1:{route_port}", "--routes", routes,
                     "--cluster-pass-file", str(self.pass_file), "--kv-replicas", str(self._replicas),
                     "--route-tls-cert", str(cert[0]), "--route-tls-key", str(cert[1]),
                     "--route-tls-ca", str(self.ca[0])]
        if metrics_port is not None:
            node_args += ["--metrics-addr", f"127.0.0.1:{metrics_port}"]
        return MembershipdProcess(data, node_args + self._common, self._env, ca=self._tls_ca)

    def add_node(self, name: str, routes_to: Sequence[int]) -> MembershipdProcess:
        """A new node ``name`` (a new ``--server-name``: never a removed node's), made as the others
        with ``--routes`` to the nodes of ``routes_to`` (indexes), not started; appended to
        :attr:`nodes`, so that :meth:`stop` stops it (deploy/cluster/README.md, "Replacing a dead
        node")."""
        port = free_port()
        self.route_ports.append(port)
        metrics_port = None
        if self.metrics_ports:
            metrics_port = free_port()
            self.metrics_ports.append(metrics_port)
        routes = ",".join(f"nats://127.0.0.1:{self.route_ports[j]}" for j in routes_to)
        node = self._node(name, self.directory / name, port, routes, metrics_port)
        self.nodes.append(node)
        return node

    # -- life cycle

    def start(self, *indexes: int, timeout: float = CLUSTER_FORM_TIMEOUT) -> Cluster:
        """Start the nodes given (all by default) together and wait until each answers ``/healthz`` 200."""
        chosen = indexes or tuple(range(len(self.nodes)))
        for i in chosen:
            self.nodes[i].start(wait=False)
        for i in chosen:
            self.nodes[i].wait_healthy(timeout=timeout)
        return self

    def migrate(self) -> subprocess.CompletedProcess[str]:
        """``membershipd migrate-to-kv`` of node 1's store into the running cluster; raises if it fails."""
        n1 = self.nodes[0]
        tls = ["--ca", str(n1.ca)] if n1.ca is not None and n1.nats_url.startswith("tls://") else []
        proc = run_membershipd("migrate-to-kv", "--data-dir", str(n1.data_dir), "--nats-url", n1.nats_url, *tls,
                               timeout=CLUSTER_FORM_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"migrate-to-kv failed: {proc.stderr.strip()[-2000:]}")
        return proc

    def form(self, timeout: float = CLUSTER_FORM_TIMEOUT) -> Cluster:
        """Start every node, move node 1's store into the cluster and wait until every node serves the admin."""
        self.start(timeout=timeout)
        if self.identity is not None:
            self.migrate()
            for i in range(len(self.nodes)):
                self.wait_member(i, self.identity, timeout)
        return self

    def restart(self, i: int, wait: bool = False, timeout: float = CLUSTER_FORM_TIMEOUT) -> MembershipdProcess:
        """Start node ``i`` again (after :meth:`kill` or its ``stop()``); tracked, so teardown stops it."""
        self.nodes[i] = self.nodes[i].again().start(wait=wait, timeout=timeout)
        return self.nodes[i]

    def kill(self, i: int, timeout: float = 10.0) -> None:
        """A crash of node ``i``: its nats-server first (SIGKILL, no graceful hand-over), then membershipd."""
        node = self.nodes[i]
        fd = node.nats_handle()
        try:
            if fd is not None:
                signal_pidfd(fd, signal.SIGKILL)
            node.send_signal(signal.SIGKILL)
            node.wait(timeout)
            if fd is not None:  # a pidfd turns readable once its process exited
                select.select([fd], [], [], timeout)
        finally:
            if fd is not None:
                os.close(fd)

    def pids(self, i: int) -> list[int]:
        """membershipd's pid and its nats-server's (when it has one) of node ``i``."""
        node = self.nodes[i]
        nats_pid = node.nats_pid()
        return [node.pid] + ([nats_pid] if nats_pid else [])

    def pause(self, i: int) -> list[int]:
        """SIGSTOP the whole node (nats-server, then membershipd); returns the pidfds :meth:`resume` takes."""
        node = self.nodes[i]
        if node.proc is None or node.proc.poll() is not None:
            raise RuntimeError(f"node n{i + 1} is not running")
        fds = [os.pidfd_open(node.pid)]  # our child, not reaped: the pid is still its own
        self._paused.append(fds[0])  # recorded at once: stop() resumes and closes it, whatever follows
        pids = [node.pid]
        nats = node.nats_handle()
        if nats is not None:
            fds.append(nats)
            self._paused.append(nats)
            pids.append(_pidfd_pid(nats))
        for fd, pid in reversed(list(zip(fds, pids, strict=True))):
            freeze(pid, pidfd=fd)  # every thread stopped: none answers once this returns
        return fds

    def resume(self, fds: Sequence[int]) -> None:
        """SIGCONT what :meth:`pause` stopped (through its pidfds, which it closes)."""
        for fd in fds:
            if fd in self._paused:
                self._paused.remove(fd)
                signal_pidfd(fd, signal.SIGCONT)
                os.close(fd)

    def stop(self) -> None:
        """Stop every process of every node, restarts included (a paused node is resumed first)."""
        self.resume(list(self._paused))
        for node in self.nodes:
            node.stop_family()

    # -- clients

    @property
    def admin(self) -> SignedClient:
        """A :class:`SignedClient` of the admin, on node 1."""
        return self.client(0)

    def client(self, i: int, identity: Any = None) -> SignedClient:
        """A :class:`SignedClient` on node ``i``, signing as ``identity`` (the admin by default)."""
        node = self.nodes[i]
        return SignedClient(node.base_url, self.identity if identity is None else identity, context=node.ssl_context())

    def member(self, handle: str, role: str = "member", node: int = 0) -> Any:
        """Add a member through node ``node`` (as the admin); returns its ``Identity``."""
        from .client.keys import generate_identity

        identity = generate_identity(handle)
        status, body = self.client(node).post("/v1/members", {
            "handle": handle, "role": role, "sign_pub": identity.sign_pub_b64, "enc_pub": identity.enc_pub_b64,
            "enc_suite": identity.enc_suite, "bus_pub": identity.bus_pub})
        if status != 201:
            raise RuntimeError(f"adding member {handle!r} failed: {status} {body}")
        return identity

    def wait_member(self, i: int, identity: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Until node ``i`` answers a signed ``GET /v1/me`` of ``identity`` with 200 (its KV watch has the member)."""
        client = self.client(i, identity)
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = client.get("/v1/me", timeout=5.0)
                if last[0] == 200:
                    return
            except OSError as e:  # the node is (re)starting
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"node n{i + 1} did not serve {identity.handle!r} within {timeout}s (last: {last})")


# -- fixtures -------------------------------------------------------------------


class _Made:
    """What a factory fixture made: ``add(thing)`` it, and at the end of ``with`` each is stopped
    (``stop(thing)``), whatever the test did; ``directory()`` is a fresh one under ``tmp_path``."""

    def __init__(self, tmp_path: Path, prefix: str, stop: Callable[[Any], Any]) -> None:
        self.tmp_path, self.prefix, self.stop = tmp_path, prefix, stop
        self.things: list[Any] = []

    def directory(self) -> Path:
        return self.tmp_path / f"{self.prefix}-{len(self.things)}"

    def add(self, thing: Any) -> Any:
        self.things.append(thing)
        return thing

    def __enter__(self) -> _Made:
        return self

    def __exit__(self, *exc: Any) -> None:
        for thing in self.things:
            with contextlib.suppress(Exception):
                self.stop(thing)


@pytest.fixture
def unibus_plugin_manager() -> Callable[..., PluginManager]:
    """Factory: ``unibus_plugin_manager(plugin, ...)`` → a manager with only those plugins."""
    return make_plugin_manager


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real, supervised nats-server with JetStream on free loopback ports."""
    server = NatsServer(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def membershipd_factory(tmp_path: Path) -> Iterator[Callable[..., MembershipdProcess]]:
    """Factory: ``membershipd_factory(*args, env=None, wait=True)`` → a started daemon."""
    made = _Made(tmp_path, "membershipd", MembershipdProcess.stop_family)

    def make(*args: str, env: dict[str, str] | None = None, wait: bool = True,
             data_dir: Path | None = None, **kwargs: Any) -> MembershipdProcess:
        """``kwargs`` go to :class:`MembershipdProcess` (``ca``, ``http_host``, ``nats_host``)."""
        return made.add(MembershipdProcess(data_dir or made.directory(), args, env, **kwargs)).start(wait=wait)

    with made:
        yield make


@pytest.fixture
def unibus_app(tmp_path: Path) -> Iterator[Callable[..., UnibusApp]]:
    """Factory: ``unibus_app(plugins=[...], args=[...], env=None)`` → a started in-process :class:`UnibusApp`.

    Only the plugins given are loaded (no entry points); each is checked as at
    registration. Every app it started is stopped at teardown.
    """
    made = _Made(tmp_path, "unibus-app", UnibusApp.stop)

    def make(plugins: Sequence[Any] = (), args: Sequence[str] = (), env: dict[str, str] | None = None) -> UnibusApp:
        return made.add(UnibusApp(made.directory(), plugins, args, env)).start()

    with made:
        yield make


@pytest.fixture
def membershipd(membershipd_factory: Callable[..., MembershipdProcess]) -> MembershipdProcess:
    """A running membershipd with default settings (embedded NATS, free ports)."""
    return membershipd_factory()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Factory: ``cluster_factory(args=(), plugins=(), env=None, admin=None)`` → a formed :class:`Cluster`.

    Three nodes started together, node 1's store (the admin ``admin``, made
    here unless given) moved into the cluster, every node serving the admin.
    Every process of every cluster it made is stopped at teardown.
    """
    from .client.keys import generate_identity

    made = _Made(tmp_path, "cluster", Cluster.stop)

    def make(args: Sequence[str] = (), plugins: Sequence[str] = (), env: dict[str, str] | None = None,
             admin: Any = None, **kwargs: Any) -> Cluster:
        """``kwargs`` go to :class:`Cluster` (``size``, ``name``, ``secret``, ``metrics``, ``tls_ca``)."""
        return made.add(Cluster(made.directory(), admin or generate_identity("admin"), args=args, plugins=plugins,
                                env=env, **kwargs)).form()

    with made:
        yield make


@pytest.fixture
def cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    """Three formed membershipd nodes with default settings (``cluster_factory()``)."""
    return cluster_factory()


# -- a throwaway PKI for TLS tests ------------------------------------------------


def make_test_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (EC P-256) as ``<name>.crt``/``<name>.key`` in ``directory``."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _write_pair(directory, name, cert, key, serialization)


def make_test_cert(directory: Path, name: str, ca: tuple[Path, Path], *, ips: Sequence[str] = ("127.0.0.1",),
                   dns: Sequence[str] = ("localhost",), server_auth: bool = True, client_auth: bool = True,
                   valid_from_days: float = -1, valid_for_days: float = 30) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca`` with the given SANs and extended key usages."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=valid_from_days)
    usages = [u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server_auth),
                              (ExtendedKeyUsageOID.CLIENT_AUTH, client_auth)) if on]
    sans = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] + [x509.DNSName(d) for d in dns]
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + dt.timedelta(days=valid_for_days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName(sans), critical=False))
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return _write_pair(directory, name, builder.sign(ca_key, hashes.SHA256()), key, serialization)


@dataclass(frozen=True)
class PKI:
    """A client-facing test PKI: ``ca``, ``server`` and ``client`` as ``(cert, key)`` paths."""

    ca: tuple[Path, Path]
    server: tuple[Path, Path]
    client: tuple[Path, Path]

    def serve_args(self, *, http: bool = True, nats: bool = True, verify_clients: bool = False) -> list[str]:
        """``serve`` flags: HTTPS and/or TLS on the NATS listener (``--tls-ca`` with ``verify_clients``)."""
        args: list[str] = []
        if http:
            args += ["--http-tls-cert", str(self.server[0]), "--http-tls-key", str(self.server[1])]
        if nats:
            args += ["--tls-cert", str(self.server[0]), "--tls-key", str(self.server[1])]
            if verify_clients:
                args += ["--tls-ca", str(self.ca[0])]
        return args


def make_test_pki(directory: Path, *, ips: Sequence[str] = ("127.0.0.1", "::1"),
                  dns: Sequence[str] = ("localhost",)) -> PKI:
    """A CA, a server certificate (for ``ips``/``dns``; serverAuth + clientAuth, as
    membershipd presents it to its own NATS listener when that verifies clients)
    and a client certificate, in ``directory``; keys are 0600."""
    ca = make_test_ca(directory, "test-client-ca")
    server = make_test_cert(directory, "server", ca, ips=ips, dns=dns)
    client = make_test_cert(directory, "client", ca, ips=(), dns=("client",), server_auth=False)
    return PKI(ca, server, client)


def _write_pair(directory: Path, name: str, cert: Any, key: Any, serialization: Any) -> tuple[Path, Path]:
    crt, pem = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return crt, pem
