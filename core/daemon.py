"""``membershipd serve``: the start-up order (docs/operations.md), signals, and shutdown.

settings → plugins → posture → (cluster gate) → migrations → nats.conf written
→ nats-server started and ready → store and KV buckets ready → ``startup``
hooks → HTTP port opens → sd_notify READY=1. SIGTERM/SIGINT stop HTTP, then the
plugins, then NATS; SIGHUP re-reads the store (nats.conf does not depend on
membership: bus authorization is answered by the auth callout, docs/bus-auth.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import faulthandler
import fcntl
import inspect
import logging
import os
import signal
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from . import allocator
from .aio import ESCAPING, Overran, cancel_and_wait, describe, run_bounded
from .api import bus as bus_api
from .api import log as log_api
from .api import members as members_api
from .api import rooms as rooms_api
from .app import EVENTS, EXTRA, HEALTH, current_posture, make_app, server_options
from .auth import (DEFAULT_BODY_TIMEOUT, NONCE_BUCKET, Authenticator, MemberDirectory, NonceStore, auth_middleware,
                   body_timeout_from_env, nonce_max_bytes_from_env)
from .bus import CLUSTER_FORM_TIMEOUT, Bus, EmbeddedTLS, retry_until
from .certexpiry import CertificateExpiry
from .connlimits import (DEFAULT_IDLE_TIMEOUT, AcceptErrorLog, ConnectionLimiter, LimitedSite, MemberRequests,
                         descriptor_limit, idle_timeout_from_env, nofile_limit)
from .errors import ConfigError, RuntimeFailure
from .events import ChangeEvents, call_runtime_hook
from .health import HealthProber
from .metrics import Metrics, MetricsServer, StateCounts
from .natsconf import (adopt_global_jetstream, base_config, check_clustered_global_jetstream, finalize_config,
                       render_config, write_config)
from .pluginmanager import PluginManager, running_plugin
from .posture import bus_auth_warnings, cluster_gate, compute_posture, startup_posture
from .privatefiles import check_own_file, make_private_dirs
from .sdnotify import sd_notify
from .servicekey import SYSTEM_NKEY_FILE, ensure_service_nkey
from .settings import HostPort, Settings, insecure_plaintext_warnings, require_route_password, require_routes
from .store.base import ChangeNotEnforced, Store
from .store.db import migrate
from .store.kv import KvStore
from .store.sqlite import SqliteStore
from .tls import server_context
from .supervisor import ALL_LEVELS, QUIET_LEVELS, NatsSupervisor, find_nats_server, nats_server_environment

log = logging.getLogger("unibus.daemon")

#: SIGTERM to exit stays within STOP_BUDGET (docs/operations.md, "Signals"):
#: HTTP ≤ 2 s, every plugin's shutdown together ≤ 5 s, the store and the NATS
#: connections in what is left before nats-server's 2.5 s (then SIGKILL), and
#: at least CLOSE_MIN. Each step is a hard bound (``unibus.aio.run_bounded``):
#: a step or hook that ignores its cancellation is left behind after a grace of
#: 0.25 s, named in the log, and nats-server is stopped all the same. So the
#: bound is 10 s for code that ends when told, about 11 s at worst otherwise.
STOP_BUDGET = 10.0
HTTP_STOP_TIMEOUT = 2.0
SHUTDOWN_HOOKS_BUDGET = 5.0
NATS_STOP_TIMEOUT = 2.5
CLOSE_MIN = 0.5
#: How long the event loop's own clean-up may wait for tasks still running after the
#: stop (asyncio.run would wait for ever for one that ignores its cancellation).
LOOP_CLOSE_TIMEOUT = 1.0
#: The last resort, counted from SIGTERM: if the process still runs then (code that
#: blocks the event loop, a thread that never returns), every thread's stack goes to
#: stderr and the process exits 1 (``faulthandler``), before the unit's
#: TimeoutStopSec=15 kills the whole cgroup without a word.
STOP_WATCHDOG = 13.0


__all__ = ["Daemon", "compute_posture", "nats_config", "serve"]


def nats_config(settings: Settings, plugins: PluginManager) -> dict[str, Any]:
    """Base config, every plugin's ``configure_nats``, then the core's invariants."""
    config = base_config(settings)
    plugins.call_each("configure_nats", settings=settings.for_plugins(), config=config)
    return finalize_config(config, settings)


#: What a route error usually means, by what nats-server's line says: the first that matches, in
#: this order (a host with "tls" in its name that does not resolve is a dial error). Each with its
#: rank when a node saw several: the one that names a cause beats a peer that went away after it.
_ROUTE_HINTS = (
    (("connection refused", "no route to host", "i/o timeout", "no such host", "network is unreachable"), 2,
     "are the other nodes up, and their addresses in --routes right?"),
    (("authorization violation", "authentication error"), 0,
     "is the route password (--cluster-pass-file) the same on every node?"),
    (("first record does not look like a tls handshake",), 1,
     "is each port in --routes a peer's --cluster-addr, not its client port?"),
    (("certificate is valid for", "certificate is not valid for"), 1,
     "does each node's route certificate name the address the others dial?"),
    (("certificate has expired", "not yet valid"), 1, "is a route certificate out of its validity? renew it"),
    (("unknown authority", "bad certificate", "certificate"), 1,
     "are every node's route certificates from the one route CA (--route-tls-ca)?"),
)


def _route_hint(problem: str) -> tuple[int, str | None]:
    lowered = problem.lower()
    for needles, rank, hint in _ROUTE_HINTS:
        if any(n in lowered for n in needles):
            return rank, hint
    return 3, None


def with_route_problem(failure: str, problems: Sequence[str]) -> str:
    """A cluster node's start that found no JetStream quorum, with the route error nats-server
    logged that says most (the latest of the best rank) and what it usually means; ``failure``
    alone when there was none. (A review: the nodes with the right password quoted a peer's
    "connection refused", logged after the refused logins, once that peer had given up.)"""
    if not problems:
        return failure
    best = min(range(len(problems)), key=lambda i: (_route_hint(problems[i])[0], -i))
    hint = _route_hint(problems[best])[1]
    return f"{failure}; nats-server's route error: {problems[best]}" + (f" ({hint})" if hint else "")


def forward_levels(config: dict[str, Any]) -> frozenset[str]:
    """Quiet unless nats-server's own debug/trace is on (the nats_monitor switch)."""
    return ALL_LEVELS if config.get("debug") or config.get("trace") else QUIET_LEVELS


#: Files of the data directory that membershipd reads back: each must be this user's (0600 is made).
OWN_FILES = ("membershipd.db", "membershipd.db-wal", "membershipd.db-shm")


def prepare_data_dir(data_dir: Path) -> None:
    """Make ``data_dir`` private and check it (docs/operations.md, "The data directory"): missing
    directories are made 0700, one at a time; a directory of another user, or one that group or others
    may write to, is refused (exit 2), as is a database of another user; then a write is tried."""
    make_private_dirs(data_dir, "--data-dir")
    for name in OWN_FILES:
        check_own_file(data_dir / name, "--data-dir")
    try:
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"--data-dir: {data_dir} is not writable ({e.strerror}); choose a writable directory") from None


#: The file ``serve`` holds an exclusive ``flock`` on while it runs, with its pid in it.
LOCK_FILE = "membershipd.lock"


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory for this ``serve``: an exclusive ``flock`` on :data:`LOCK_FILE`,
    held until the process ends (the kernel lets go of it even after a SIGKILL), and this
    pid written in it. Returns the descriptor, to keep open.

    A second ``serve`` on the same directory rewrote ``nats.conf`` under the first, emptied
    its uploads in progress (``blobs/.tmp``), and each kept a nonce bucket of its own; the
    first's nats-server then restarted from the other's config (found by an operations
    audit). Now the second stops first [1], naming the first's pid. The file is not
    removed at the end: a removal would race the next start's lock."""
    path = data_dir / LOCK_FILE
    check_own_file(path, "--data-dir")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigError(f"--data-dir: cannot open {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise RuntimeFailure(f"--data-dir {data_dir}: another membershipd serves it{who}; stop it first, or give "
                             "this one a data directory of its own") from None
    except OSError as e:  # ENOLCK (NFS without lockd), EOPNOTSUPP (some FUSE file systems)
        os.close(fd)
        raise ConfigError(f"--data-dir: cannot lock {path} ({e.strerror}); use a local file system") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def check_port_free(flag: str, addr: HostPort) -> None:
    """Fail fast, naming the flag, when a listener's port is taken."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr.host, addr.port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RuntimeFailure(f"{flag} {addr}: address already in use; stop the other process or pick another port") from None
            raise RuntimeFailure(f"{flag} {addr}: cannot listen there ({e.strerror})") from None


def _https_context(settings: Settings) -> ssl.SSLContext | None:
    """The control plane's TLS context (--http-tls-cert/--http-tls-key), or None for plain HTTP."""
    if not (settings.http_tls_cert and settings.http_tls_key):
        return None
    try:
        return server_context(settings.http_tls_cert, settings.http_tls_key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"--http-tls-cert/--http-tls-key: cannot be used for HTTPS ({e})") from None


def _metrics_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The metrics listener's TLS context (--metrics-tls-cert/--metrics-tls-key; with
    --metrics-tls-ca a scraper must present a certificate signed by that CA), or None."""
    if not (settings.metrics_tls_cert and settings.metrics_tls_key):
        return None
    try:
        ctx = server_context(settings.metrics_tls_cert, settings.metrics_tls_key)
        if settings.metrics_tls_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(settings.metrics_tls_ca))
        return ctx
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"--metrics-tls-cert/--metrics-tls-key/--metrics-tls-ca: cannot be used for HTTPS "
                          f"({e})") from None


class Daemon:
    """One running membershipd: owns the supervisor, the bus connection and the HTTP site."""

    def __init__(self, settings: Settings, plugins: PluginManager) -> None:
        self.settings = settings
        self.plugins = plugins
        self.supervisor: NatsSupervisor | None = None
        self.store: Store | None = None
        self.bus: Bus | None = None
        self.system_bus: Bus | None = None
        #: membershipd's TLS to its embedded nats-server (--tls-cert), if any
        self.nats_tls: EmbeddedTLS | None = None
        self.nonces: NonceStore | None = None
        self._system_seed = None
        self._lock_fd: int | None = None  # the data directory's lock (lock_data_dir), held until exit
        #: keep the lock until the process exits (serve's own process): threads still at work in the
        #: data directory after the stop (a migration, a blob write) end with it (a review)
        self.keep_lock = False
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        #: UNIBUS_HTTP_IDLE_TIMEOUT (read by start): how long an HTTP connection may wait for a request head
        self.idle_timeout = DEFAULT_IDLE_TIMEOUT
        self.body_timeout = DEFAULT_BODY_TIMEOUT
        self.accept_errors: AcceptErrorLog | None = None
        self.metrics = Metrics(node=settings.server_name)
        self.certificates = self.metrics.certificates = CertificateExpiry()
        #: each member's signed requests in progress: at most a share of the listener (unibus.connlimits)
        self.member_requests = self.metrics.member_requests = MemberRequests()
        self.metrics.plugins = plugins
        self.metrics_server: MetricsServer | None = None
        self.health: HealthProber | None = None
        self._stop = asyncio.Event()
        #: why the daemon stops of its own accord, with exit 1 (a NATS connection ended for good)
        self.failure: RuntimeFailure | None = None
        #: the event loop's time of the stop signal: the stop budget counts from there
        self.stop_requested_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: the SIGHUP re-read under way (one at a time), and whether a SIGHUP came during it
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        #: False until start() is done; a SIGHUP before then is read once it is (on_sighup)
        self._serving = False
        self._reload_after_start = False
        #: Lines logged once the start passed its checks (``serve``'s allocator line): a start
        #: refused for its settings prints its one error line and nothing else.
        self.notes: list[str] = []
        self._began = False
        self._started_hooks = False
        #: plugins whose ``startup`` returned, in order; None until the startup hooks begin
        self._started: list[str] | None = None
        self.events: ChangeEvents | None = None

    async def start(self) -> None:
        s = self.settings
        body_timeout = self.body_timeout = body_timeout_from_env(os.environ)
        self.idle_timeout = idle_timeout_from_env(os.environ)
        self.plugins.validate_settings(s)  # a no-op when the CLI already did it for these settings
        nonce_max_bytes = nonce_max_bytes_from_env(os.environ)
        http_tls, metrics_tls, binary = self._preflight()
        self._began = True
        for note in self.notes:
            log.info("%s", note)
        await asyncio.to_thread(migrate, s.db_path)
        seed, _public = ensure_service_nkey(s.data_dir)
        self.nats_tls = EmbeddedTLS(s.tls_cert, s.tls_key, s.tls_ca) if s.embedded and s.tls_cert else None
        if binary is not None:  # embedded
            await self._start_nats(binary)
        tls = self.nats_tls.context if self.nats_tls is not None else None
        # A forming cluster has no JetStream until a quorum of nodes is up.
        js_wait = CLUSTER_FORM_TIMEOUT if s.clustered else 10.0
        try:
            await self._open_store(seed, tls, js_wait)
            nonces = await self._open_nonces(nonce_max_bytes, js_wait)
        except RuntimeFailure as e:
            if not s.clustered or self.supervisor is None:
                raise
            raise RuntimeFailure(with_route_problem(str(e), self.supervisor.route_problems())) from None
        counts = StateCounts(self.store)
        await counts.refresh()
        self.store.add_listener(counts.on_change)
        self.store.add_listener(self.metrics.store_changed)
        self.metrics.counts = counts
        authenticator = Authenticator(MemberDirectory(self.store), nonces, s.auth_skew)
        self.app = make_app(s, self.plugins, self.bus, self.supervisor, self.store,
                            middlewares=[auth_middleware(authenticator, body_timeout=body_timeout,
                                                         member_requests=self.member_requests)],
                            metrics=self.metrics)
        if self._system_seed is not None:
            self.system_bus = Bus(s.nats_client_url, self._system_seed, name="membershipd-system", tls=tls)
            self.system_bus.lost_listeners.append(self.connection_lost)
            await self.system_bus.connect(jetstream_timeout=0, check_jetstream=False)
            self.app[EXTRA]["system_bus"] = self.system_bus
        self.app[EXTRA]["nonces"] = nonces
        await self._start_health(nonces)
        app = self.app
        self.metrics.posture = lambda: current_posture(app)
        for register in (members_api.register, rooms_api.register, bus_api.register, log_api.register):
            register(self.app)
        await self.start_plugins()
        self.events = ChangeEvents(self.app, self.store, self.plugins)
        await retry_until(self.events.start, js_wait, "cannot read the head of the membership log")
        self.app[EVENTS] = self.events
        # A restart lost the nonces (they live in memory): a request signed now must be past the new
        # epoch's floor before the port opens, or a client's first request is refused (docs/operations.md).
        waited = await nonces.wait_past_floor()
        if waited >= 0.05:
            log.info("waited %.1f s for the replay floor of the new nonce epoch before opening HTTP", waited)
        await self._listen(http_tls, metrics_tls)
        log.info("membershipd serving on %s://%s (NATS %s, node %s)", s.http_scheme, s.http_addr,
                 s.nats_public_url, s.server_name)
        self._serving = True
        if self._reload_after_start:
            self.on_sighup()
        sd_notify("READY=1")

    def _preflight(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None, Path | None]:
        """What can fail before anything starts: the posture, the TLS files, nats-server, the data
        directory, the ports. Returns the HTTPS and metrics TLS contexts and the nats-server to run."""
        s = self.settings
        cluster_gate(startup_posture(s, self.plugins), s.clustered)
        require_route_password(s)
        require_routes(s)
        http_tls = _https_context(s)
        metrics_tls = _metrics_tls_context(s)
        for listener, kind, path in (("http", "cert", s.http_tls_cert), ("metrics", "cert", s.metrics_tls_cert),
                                     ("metrics", "ca", s.metrics_tls_ca)):
            if path is not None:
                self.certificates.loaded(listener, kind, path)
        binary = find_nats_server(s.nats_server_bin) if s.embedded else None
        prepare_data_dir(s.data_dir)
        if s.embedded:
            check_clustered_global_jetstream(s)  # before the database is migrated
        if self._lock_fd is None:
            self._lock_fd = lock_data_dir(s.data_dir)
        check_port_free("--http-addr", s.http_addr)
        if s.embedded:
            check_port_free("--nats-addr", s.nats_addr)
        if s.metrics_addr is not None:
            check_port_free("--metrics-addr", s.metrics_addr)
        # after every check that refuses the start (exit 2 is one line and nothing else)
        for warning in [*bus_auth_warnings(s), *insecure_plaintext_warnings(s)]:
            log.warning("%s", warning)
        return http_tls, metrics_tls, binary

    async def _start_nats(self, binary: Path) -> None:
        """The embedded nats-server: its config written, then supervised."""
        s = self.settings
        # membershipd's second identity, for bus authorization to place in
        # the system account (docs/bus-auth.md); the core uses it only if it did.
        system_seed, _ = ensure_service_nkey(s.data_dir, SYSTEM_NKEY_FILE)
        config = self.write_nats_config()
        self._system_seed = system_seed if config.get("system_account") else None
        moved = adopt_global_jetstream(s, config)
        if moved:
            log.warning("upgrade from 0.11: %s", moved)

        def before_restart() -> None:
            # the files checked at start-up (--tls-cert, the plugins' route TLS certificates and CA)
            # may have changed since: nats-server reads them as they are when it restarts
            self.plugins.call_each("validate_settings", settings=s.for_plugins())
            if self.nats_tls is not None and self.nats_tls.before_restart():
                log.info("--tls-cert %s changed since it was loaded: the restarted nats-server presents the new "
                         "certificate, and membershipd's own connections to it trust it", s.tls_cert)
            self.certificates.loaded_by_nats(config)

        self.supervisor = NatsSupervisor(
            binary, s.nats_conf_path, s.nats_addr.host, s.nats_addr.port,
            env=nats_server_environment(), forward_levels=forward_levels(config), before_restart=before_restart,
            pass_fds=(self._lock_fd,) if self._lock_fd is not None else ())
        self.certificates.loaded_by_nats(config)
        await self.supervisor.start()
        self.metrics.supervisor = self.supervisor

    async def _open_store(self, seed: str, tls: ssl.SSLContext | None, js_wait: float) -> None:
        """The service's NATS connection, then the state store: JetStream KV in a cluster, else SQLite."""
        s = self.settings
        self.bus = Bus(s.nats_client_url, seed, tls=tls)
        self.bus.lost_listeners.append(self.connection_lost)
        self.metrics.bus = self.bus
        await self.bus.connect(jetstream_timeout=js_wait)
        if s.clustered:
            # Cluster state lives in JetStream KV (replicated); each node watches it.
            kv = KvStore(self.bus.js, replicas=s.kv_replicas)
            await retry_until(kv.ensure, js_wait, "cannot create the KV state bucket")
            kv.start_watch()
            self.store = kv
        else:
            self.store = SqliteStore(s.db_path)

    async def _open_nonces(self, max_bytes: int, js_wait: float) -> NonceStore:
        """The nonce claims of signed requests."""
        s = self.settings
        # The high-water mark of signed requests lives in the store (durable); the
        # nonces in memory (docs/operations.md, "Durability"). A single node keeps the
        # nonces a 0.11 bucket carried over in its SQLite store (NonceStore.carry_over).
        exclusive = s.embedded and not s.clustered
        nonces = NonceStore(self.bus, skew=s.auth_skew, replicas=s.kv_replicas, high_water=self.store,
                            max_bytes=max_bytes, exclusive=exclusive, node=s.server_name,
                            carried=self.store if exclusive and isinstance(self.store, SqliteStore) else None)
        await retry_until(nonces.ensure, js_wait, f"cannot create the KV bucket {NONCE_BUCKET}")
        await retry_until(nonces.start, 10.0, "cannot open the nonce-claim connection to NATS")
        self.nonces = nonces
        self.metrics.nonces = nonces
        return nonces

    async def _start_health(self, nonces: NonceStore) -> None:
        # /healthz reads what this prober keeps; it makes no round trip itself (docs/http-api.md)
        s = self.settings
        self.health = HealthProber(self.bus, nonces=nonces, store=self.store, supervisor=self.supervisor,
                                   route_peers=self.system_bus.route_peers if self.system_bus is not None else None,
                                   clustered=s.clustered)
        self.bus.state_listeners.append(self.health.wake)
        await self.health.probe_once()
        self.health.start()
        self.app[HEALTH] = self.health
        self.metrics.health = self.health

    async def _listen(self, http_tls: ssl.SSLContext | None, metrics_tls: ssl.SSLContext | None) -> None:
        """Listen: the HTTP API, then the metrics endpoint if asked for. Each listener bounds its
        connections, and a failed accept() is logged once per interval (unibus.connlimits)."""
        s = self.settings
        self.accept_errors = AcceptErrorLog().install(asyncio.get_running_loop())
        self.metrics.accept_errors = self.accept_errors
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=HTTP_STOP_TIMEOUT,
                                    **server_options(self.idle_timeout))
        await self.runner.setup()
        nofile = descriptor_limit()
        limiter = ConnectionLimiter("http", nofile_limit, where=f"--http-addr {s.http_addr}")
        self.metrics.connections["http"] = limiter
        self.member_requests.limit = lambda: limiter.limit
        limiter.serving = self.member_requests.serving
        site = LimitedSite(self.runner, s.http_addr.host, s.http_addr.port, limiter=limiter, ssl_context=http_tls,
                           handshake_timeout=self.idle_timeout, stall_timeout=self.body_timeout)
        try:
            await site.start()
        except OSError as e:
            raise RuntimeFailure(f"--http-addr {s.http_addr}: cannot listen ({e.strerror})") from None
        log.info("HTTP connections: at most %d open (descriptor limit %s); a request head must arrive within %g s "
                 "(UNIBUS_HTTP_IDLE_TIMEOUT)", limiter.limit, nofile if nofile is not None else "unlimited",
                 self.idle_timeout)
        if s.metrics_addr is not None:
            self.metrics_server = MetricsServer(self.metrics, s.metrics_addr.host, s.metrics_addr.port, metrics_tls,
                                                idle_timeout=self.idle_timeout, stall_timeout=self.body_timeout)
            try:
                await self.metrics_server.start()
            except OSError as e:
                raise RuntimeFailure(f"--metrics-addr {s.metrics_addr}: cannot listen ({e.strerror})") from None
            log.info("metrics on %s://%s/metrics", s.metrics_scheme, s.metrics_addr)

    async def start_plugins(self) -> None:
        """Every ``startup``, in the call order (docs/plugins.md, "Order"), one at a time.

        A failure stops here: what already started is shut down by :meth:`stop`,
        in reverse; the plugin that failed and those after it are not.
        """
        assert self.app is not None
        self._started = []
        for name, impl in self.plugins._impls("startup"):
            await self.plugins.acall_one(name, impl, "startup", app=self.app)
            self._started.append(name)
        self._started_hooks = True

    def shutdown_order(self) -> list[str]:
        """Who gets ``shutdown``: the started plugins in reverse order, then those without a
        ``startup`` hook (nothing to wait for: they count as started first, so stop last)."""
        if self._started is None:
            return []
        with_startup = set(self.plugins.call_order("startup"))
        shut = self.plugins.call_order("shutdown")
        no_startup = [n for n in shut if n not in with_startup]
        return [n for n in reversed(self._started) if n in shut] + list(reversed(no_startup))

    def write_nats_config(self) -> dict[str, Any]:
        """The one nats.conf of this run: it does not depend on membership (docs/bus-auth.md)."""
        config = nats_config(self.settings, self.plugins)
        write_config(render_config(config), self.settings.nats_conf_path)
        return config

    def connection_lost(self, reason: str) -> None:
        """A NATS connection of membershipd's ended for good: stop, and exit 1 (systemd's
        ``Restart=on-failure`` starts it again, with new connections). The stop's budget counts
        from when :meth:`stop` begins (no signal started it)."""
        if self.failure is None and not self._stop.is_set():
            self.failure = RuntimeFailure(f"{reason}; membershipd stops, to be started again")
        self._stop.set()

    def request_stop(self) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = asyncio.get_running_loop().time()
        self._stop.set()

    def on_sighup(self) -> None:
        """Re-read the store, one re-read at a time (docs/operations.md, "Signals").

        A SIGHUP during a re-read asks for one more after it, which reads whatever was
        written before that signal; any number of them ask for just that one. SIGHUPs during
        the start-up ask for one re-read once it is done. A red team
        sent hundreds a second, each starting a full read of its own: they queued on the
        store's thread, signed requests waited behind them (503 and timeouts for tens of
        seconds) and the memory grew by gigabytes."""
        if self._stop.is_set():
            log.info("SIGHUP: ignored, the daemon is stopping")
            return
        if not self._serving:
            # Read part-way through the start, the store's changes would reach no plugin: the
            # change events and some plugins' listeners are set up after the store opens.
            if not self._reload_after_start:
                log.info("SIGHUP: start-up is under way; the store is re-read once it is done")
            self._reload_after_start = True
            return
        if self._reloading is not None:
            if not self._reload_again:
                log.info("SIGHUP: a re-read is under way; the store is read once more after it")
            self._reload_again = True
            return
        log.info("SIGHUP: re-reading the store")
        task = self._reloading = asyncio.get_running_loop().create_task(self._reload_while_asked())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_while_asked(self) -> None:
        try:
            while True:
                self._reload_again = False
                await self._reload()
                if not self._reload_again or self._stop.is_set():
                    return
                log.info("SIGHUP: re-reading the store again, for the SIGHUP that came during the last re-read")
        finally:
            self._reloading = None

    async def _reload(self) -> None:
        """Re-read the store (its listeners deliver the offline changes), then the ``reloaded`` hooks."""
        try:
            if self.store is not None:
                await self.store.reload()
        except ChangeNotEnforced:
            # Read, and the index follows it; some kicks are not confirmed yet and are retried until
            # they are (bus authorization logs which). The plugins are told of the re-read all the same.
            log.warning("SIGHUP: the store was re-read, but not every connection it changed was confirmed "
                        "kicked yet (retried)")
        except Exception as e:
            log.error("SIGHUP: reload failed: %s: %s", type(e).__name__, e)
            return
        if self.app is not None and self._started_hooks:
            await call_runtime_hook(self.plugins, "reloaded", app=self.app)

    async def _shutdown_plugins(self) -> None:
        """``shutdown`` in :meth:`shutdown_order`, all of them within SHUTDOWN_HOOKS_BUDGET; each once.

        A hook still running when its share is up is cancelled and given up, even one
        that ignores its cancellation (it is then left running, and named)."""
        impls = dict(self.plugins._impls("shutdown"))
        order, self._started = self.shutdown_order(), None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_HOOKS_BUDGET
        for name in order:
            remaining = max(0.1, deadline - loop.time())
            try:
                with running_plugin(name):
                    res = impls[name].function(**{a: self.app for a in impls[name].argnames})
                    if inspect.isawaitable(res):
                        await run_bounded(res, remaining)
            except Overran as e:
                self.plugins.hook_failed(name, "shutdown")
                if e.task.done():
                    log.error("plugin %s: shutdown did not finish in time; cancelled", name)
                else:
                    log.error("plugin %s: shutdown did not finish in time and ignores its cancellation; "
                              "left behind: %s", name, describe(e.task))
            except (Exception, *ESCAPING) as e:  # a sync hook's sys.exit() too: the next hooks still run
                # (not GeneratorExit: caught here it would also catch this coroutine's own closing)
                self.plugins.hook_failed(name, "shutdown")
                log.error("plugin %s: shutdown failed: %s: %s", name, type(e).__name__, e)

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop within STOP_BUDGET of the stop signal, each step bounded: HTTP and the
        metrics listener (together), then the plugins' shutdown hooks (each in turn, every
        one of them called), then the daemon's own tasks, the store and the NATS
        connections in what is left before nats-server's share, then nats-server, which
        is stopped whatever happened before."""
        loop = asyncio.get_running_loop()
        started = self.stop_requested_at or loop.time()
        try:
            await self._step("the HTTP listeners", self._stop_listeners(), HTTP_STOP_TIMEOUT + 0.25)
            if self.events is not None:
                self.events.stop()
            if self.app is not None:
                try:  # bounded hook by hook: a bound around them all would skip the later ones
                    await self._shutdown_plugins()
                except Exception as e:  # noqa: BLE001 - the stop goes on
                    log.error("stop: the plugins' shutdown hooks: %s: %s", type(e).__name__, e)
            left = STOP_BUDGET - NATS_STOP_TIMEOUT - (loop.time() - started)
            await self._step("the store and the NATS connections", self._close(), max(CLOSE_MIN, left))
        finally:
            try:
                if self.supervisor is not None:
                    await self.supervisor.stop(timeout=NATS_STOP_TIMEOUT)
            finally:
                if self._lock_fd is not None and not self.keep_lock:  # an in-process run (tests)
                    os.close(self._lock_fd)
                    self._lock_fd = None
        took = loop.time() - started
        if self._began:  # a start refused before it began has nothing to say besides its error
            (log.warning if took > STOP_BUDGET else log.info)("stopped in %.1f s", took)

    async def _step(self, what: str, aw: Any, timeout: float) -> None:
        try:
            await run_bounded(aw, timeout)
        except Overran as e:
            log.error("stop: %s took longer than %.1f s; %s", what, timeout,
                      "cancelled" if e.task.done() else f"left behind: {describe(e.task)}")
        except Exception as e:  # noqa: BLE001 - the stop goes on
            log.error("stop: %s: %s: %s", what, type(e).__name__, e)

    async def _stop_listeners(self) -> None:
        listeners = []
        if self.metrics_server is not None:
            listeners.append(self.metrics_server.stop())
        if self.runner is not None:
            listeners.append(self.runner.cleanup())
        try:
            await asyncio.gather(*listeners, return_exceptions=True)
        finally:
            if self.accept_errors is not None:
                self.accept_errors.uninstall()

    async def _close(self) -> None:
        """The daemon's own tasks, the health prober, the nonce store, the store and both
        NATS connections, in that order (each uses the ones after it: the nonce store
        keeps its high-water mark in the store)."""
        for task in list(self._tasks):
            task.cancel()
        if self.health is not None:
            await self.health.stop()
        if self.nonces is not None:
            await self.nonces.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.system_bus is not None:
            await self.system_bus.close()
        if self.bus is not None:
            await self.bus.close()


async def _serve(settings: Settings, plugins: PluginManager, watchdog: StopWatchdog | None = None,
                 sighup_before: Callable[[], bool] | None = None, notes: Sequence[str] = ()) -> None:
    """Serve until a stop signal. ``watchdog`` is :func:`serve`'s, for the process of its
    own (never a test's in-process run): the signal arms it, or a start-up that failed,
    and once the stop is done a further stop signal is ignored rather than ending the
    exit early (the watchdog bounds that). ``sighup_before()``: whether a SIGHUP came before
    the loop's handler was set (the CLI's); then the store is read once the start is done.
    ``notes``: lines to log once the start passed its checks."""
    daemon = Daemon(settings, plugins)
    daemon.notes = list(notes)
    loop = asyncio.get_running_loop()
    own_process = watchdog is not None
    daemon.keep_lock = own_process
    watchdog = watchdog or StopWatchdog(enabled=False)

    def on_stop_signal(_signum: int, _frame: Any) -> None:
        # A plain handler, not the loop's: the interpreter runs it between two bytecodes of
        # the main thread, also during a blocking call (which then goes on), so the watchdog
        # is armed even while the loop is blocked; a loop's handler ran only once the loop
        # turned again, and a plugin's handler blocking the loop held the stop for as long
        # as it blocked (a plugin author's walkthrough). The stop itself waits for the loop.
        watchdog.arm()
        if not loop.is_closed():
            loop.call_soon_threadsafe(daemon.request_stop)

    previous = {sig: signal.signal(sig, on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    loop.add_signal_handler(signal.SIGHUP, daemon.on_sighup)
    if sighup_before is not None and sighup_before():
        daemon.on_sighup()  # the start is not done: read once it is
    try:
        start = asyncio.create_task(daemon.start())
        stop = asyncio.create_task(daemon.wait())
        done, _ = await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            start.result()  # raise start-up errors
            await stop
        elif not await cancel_and_wait(start, HTTP_STOP_TIMEOUT):
            log.error("stop: the start-up ignores its cancellation, left behind: %s", describe(start))
        log.info("stopping")
        if daemon.failure is not None:
            raise daemon.failure  # after the stop below: exit 1
    finally:
        watchdog.arm()  # a start-up that failed stops too
        stop.cancel()
        try:
            await daemon.stop()
        finally:  # even if the stop itself was cut short: no handler of this run outlives it
            stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            if own_process:  # blocked while the handlers change: none lands on the default action
                signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
            try:
                for sig in stop_signals:
                    loop.remove_signal_handler(sig)
                    if own_process:
                        signal.signal(sig, signal.SIG_IGN)
                    elif sig in previous:
                        signal.signal(sig, previous[sig])
            finally:
                if own_process:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)


class StopWatchdog:
    """The last resort: from the stop signal on, at most STOP_WATCHDOG until the process
    is gone; then ``faulthandler`` writes every thread's stack to stderr and exits 1.

    Process-wide, so only ``membershipd serve`` arms one (``enabled``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.armed = False

    def arm(self) -> None:
        if self.enabled and not self.armed:  # once: arming again would restart the count
            self.armed = True
            faulthandler.dump_traceback_later(STOP_WATCHDOG, exit=True)


def serve(settings: Settings, plugins: PluginManager, *, sighup_before: Callable[[], bool] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code (errors raise).

    Not ``asyncio.run``: its clean-up waits for ever for a task that ignores its
    cancellation, and for a thread that never returns. Here the loop's clean-up is
    bounded (LOOP_CLOSE_TIMEOUT, what is left is named in the log), and a stop that
    runs past STOP_WATCHDOG after the signal ends in ``faulthandler``'s stack dump and
    exit 1. The watchdog stays armed until the process is gone: the interpreter's exit
    still waits for threads, ``atexit`` handlers and multiprocessing children.
    """
    tuned = allocator.tune()  # before the first request's buffers (unibus.allocator); said once the checks pass
    watchdog = StopWatchdog()
    loop = asyncio.new_event_loop()
    # The loop's default executor, made here so that _close_loop can shut it down in a thread of
    # its own: asyncio's shutdown_default_executor is a task, and one that overran the bound was
    # left pending at the loop's close ("Task was destroyed but it is pending!").
    executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
    loop.set_default_executor(executor)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(settings, plugins, watchdog, sighup_before, notes=(tuned,)))
    finally:
        try:
            _close_loop(loop, executor)
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            left = [t.name for t in threading.enumerate()
                    if t is not threading.current_thread() and not t.daemon and t.is_alive()]
            if left:
                log.warning("at exit: waiting for thread(s) %s", ", ".join(left))
    return 0


def _close_loop(loop: asyncio.AbstractEventLoop, executor: concurrent.futures.ThreadPoolExecutor) -> None:
    """What ``asyncio.run`` does after its coroutine, each wait bounded by LOOP_CLOSE_TIMEOUT.
    ``executor`` is the loop's default executor."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=LOOP_CLOSE_TIMEOUT))
        for task in tasks:
            if not task.done():
                log.error("at exit: a task ignores its cancellation, left behind: %s", describe(task))
            elif not task.cancelled() and task.exception() is not None:
                log.error("at exit: task %r failed: %s: %s", task.get_name(), type(task.exception()).__name__,
                          task.exception())
    done, _ = loop.run_until_complete(asyncio.wait({loop.create_task(loop.shutdown_asyncgens())},
                                                   timeout=LOOP_CLOSE_TIMEOUT))
    if not done:
        log.error("at exit: async generators did not finish within %.0f s", LOOP_CLOSE_TIMEOUT)
    # New jobs are refused from here on; those running go on (the interpreter's exit waits for them).
    shutdown = threading.Thread(target=executor.shutdown, name="executor-shutdown", daemon=True)
    shutdown.start()
    shutdown.join(LOOP_CLOSE_TIMEOUT)
    if shutdown.is_alive():
        log.error("at exit: the default executor did not finish within %.0f s", LOOP_CLOSE_TIMEOUT)
