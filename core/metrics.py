"""Prometheus metrics: one registry per daemon, the core's metrics, the plugins' namespaces, ``GET /metrics``.

docs/operations.md ("Metrics") is the operator's view, docs/plugins.md ("Metrics")
the plugin author's. What this module keeps:

* :class:`Metrics`, one per daemon (``app[unibus.app.METRICS]``), never the
  process-wide default registry of prometheus-client: tests run several
  daemons in one process. It holds the request counters the HTTP middleware
  feeds, the signature rejections, the store writes, and a collector that
  reads, at scrape time, state the daemon keeps anyway (the NATS connection,
  the supervisor's restarts, the nonce store's counters, the plugins' hook
  errors, :class:`StateCounts`, the health prober); plus the process collector.
* :class:`PluginMetrics`, what ``metrics.plugin(name)`` gives a plugin: its
  own Counter/Gauge/Histogram named ``unibus_<plugin>_<name>``.
* :func:`metrics_app`, the aiohttp application of the ``--metrics-addr``
  listener.

Every label has a bounded set of values: a route is its template
(``/v1/rooms/{room_id}``, never a raw path; unmatched requests are one
``unmatched`` route), a method outside the usual ones is ``other``, a
signature rejection is one of :data:`SIGNATURE_REJECTION_REASONS`, never the
free-text detail. No label ever carries a handle, a key or a room id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from . import __version__

if TYPE_CHECKING:  # pragma: no cover
    from .store.base import Change, Store

log = logging.getLogger("unibus.metrics")

#: Every metric name starts with this.
NAMESPACE = "unibus"
#: The ``route`` of a request that matched no route (404, 405): one label value, whatever the path.
UNMATCHED_ROUTE = "unmatched"
#: Methods counted by name; any other (a client may send any token) is ``other``.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Why a signed request was refused (401), as ``unibus_signature_rejections_total{reason}``:
#: ``missing`` (no signature headers), ``malformed`` (headers that do not parse, a parameter
#: or covered component refused), ``expired`` (``created`` outside the skew window),
#: ``digest`` (Content-Digest missing, malformed or not the body's), ``bad_signature``
#: (an unknown keyid or a signature that does not verify: one reason, as one 401 detail),
#: ``replay`` (a nonce already claimed, or already in the membership log), ``log_order``
#: (``created`` too old for the membership log's order), ``other``.
SIGNATURE_REJECTION_REASONS = ("missing", "malformed", "expired", "digest", "bad_signature", "replay",
                               "log_order", "other")
#: ``unibus_nonce_claims_total{result}``: first use, replay (401), the bucket could not be written (503).
NONCE_RESULTS = ("claimed", "replay", "unavailable")
#: ``unibus_store_writes_total{kind}``: the kinds of committed changes (unibus.store.base.Change).
STORE_WRITE_KINDS = ("member_added", "member_updated", "member_bus_key", "member_deleted", "room_created",
                     "room_deleted", "room_member_added", "room_member_removed", "keys_posted")
#: Seconds; a signed request is ~1 ms, a blob transfer can take seconds.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Names the documented contract (docs/operations.md, "Metrics") gives to a built-in
#: plugin; only that plugin may create them, spelled in full. Any other plugin metric
#: is ``unibus_<plugin>_<name>``.
PLUGIN_OWNED_NAMES = {
    "unibus_bus_auth_changes_total": "auth_enforce",
    "unibus_bus_auth_change_duration_seconds": "auth_enforce",
    "unibus_bus_auth_changes_unconfirmed_total": "auth_enforce",
    "unibus_bus_auth_kicks_total": "auth_enforce",
    "unibus_bus_auth_kicks_pending": "auth_enforce",
    "unibus_bus_auth_callouts_total": "auth_enforce",
    "unibus_bus_auth_connections": "auth_enforce",
    "unibus_blobs": "blobstore",
    "unibus_blob_bytes": "blobstore",
}

_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def http_method_label(method: str) -> str:
    return method if method in HTTP_METHODS else "other"


def _counter_name(name: str) -> str:
    """prometheus-client adds ``_total`` to a counter's name itself."""
    return name[: -len("_total")] if name.endswith("_total") else name


class PluginMetrics:
    """A plugin's metrics, in the daemon's registry (``app[unibus.app.METRICS].plugin("hello")``).

    ``counter("greetings_total", "…", ["lang"])`` makes ``unibus_hello_greetings_total``.
    Asking again for a name it already made returns the same object (same kind
    and labels), anything else that clashes raises ``ValueError``. Keep label
    values bounded: never a handle, a room id or a raw path.
    """

    def __init__(self, metrics: Metrics, plugin: str) -> None:
        self._metrics = metrics
        self.plugin = plugin
        self.prefix = f"{NAMESPACE}_{re.sub(r'[^a-zA-Z0-9_]', '_', plugin)}_"

    def full_name(self, name: str) -> str:
        """The exposed name of this plugin's metric ``name`` (see the class docstring)."""
        if not _NAME_RE.match(name):
            raise ValueError(f"plugin {self.plugin}: metric name {name!r} must match [a-zA-Z_][a-zA-Z0-9_]*")
        owner = PLUGIN_OWNED_NAMES.get(name) or PLUGIN_OWNED_NAMES.get(name + "_total")
        if owner is not None:
            if owner != self.plugin:
                raise ValueError(f"plugin {self.plugin}: metric {name} belongs to the {owner} plugin")
            return name
        if name.startswith(f"{NAMESPACE}_"):
            raise ValueError(f"plugin {self.plugin}: names starting with {NAMESPACE}_ are the core's; "
                             f"give {name[len(NAMESPACE) + 1:]!r}, exposed as {self.prefix}…")
        full = self.prefix + name
        owner = PLUGIN_OWNED_NAMES.get(full) or PLUGIN_OWNED_NAMES.get(full + "_total")
        if owner is not None and owner != self.plugin:  # plugin "bus" asking for "auth_changes_total"
            raise ValueError(f"plugin {self.plugin}: metric {full} belongs to the {owner} plugin")
        return full

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._metrics._make(Counter, _counter_name(self.full_name(name)), documentation, labelnames,
                                   owner=self.plugin)

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
              function: Callable[[], float] | None = None) -> Gauge:
        """A gauge; ``function`` (no labels only) is called at every scrape for its value:
        read in-memory state there, never do I/O."""
        gauge = self._metrics._make(Gauge, self.full_name(name), documentation, labelnames, owner=self.plugin)
        if function is not None:
            if labelnames:
                raise ValueError(f"plugin {self.plugin}: a gauge with labels cannot have a function")
            gauge.set_function(function)
        return gauge

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                  buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS) -> Histogram:
        return self._metrics._make(Histogram, self.full_name(name), documentation, labelnames, buckets=buckets,
                                   owner=self.plugin)


class StateCounts:
    """Members, rooms and membership log entries, kept current from the store's changes.

    Loaded once at start; a local change updates the sets at once (no I/O); a
    change another cluster node made (``reloaded`` with keys) re-reads only
    those keys, and a ``reloaded`` without keys (SIGHUP, a missed KV watch) the
    whole membership, once, at the next :meth:`refresh`. The log's length is
    its head's seq + 1, one cheap read after a change. ``/metrics`` calls
    :meth:`refresh`, which does no I/O at all when nothing changed.
    """

    REFRESH_TIMEOUT = 2.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self.members: set[str] = set()
        self.rooms: set[str] = set()
        self.log_entries = 0
        self._stale = True
        self._log_stale = True
        self._keys: set[str] = set()
        self._lock = asyncio.Lock()

    def on_change(self, change: Change) -> None:
        """Store listener: synchronous, no I/O."""
        self._log_stale = True
        if change.kind == "reloaded":
            if change.keys:
                self._keys.update(k for k in change.keys if k.startswith(("member.", "room.")))
            else:
                self._stale = True
        elif change.kind == "member_added" and change.handle:
            self.members.add(change.handle)
        elif change.kind == "member_deleted" and change.handle:
            self.members.discard(change.handle)
        elif change.kind == "room_created" and change.room_id:
            self.rooms.add(change.room_id)
        elif change.kind == "room_deleted" and change.room_id:
            self.rooms.discard(change.room_id)

    async def refresh(self) -> None:
        """Bring the counts up to date where a change made them stale (bounded; old values stay on failure)."""
        if not (self._stale or self._log_stale or self._keys):
            return
        try:
            async with asyncio.timeout(self.REFRESH_TIMEOUT), self._lock:
                await self._refresh()
        except Exception as e:  # noqa: BLE001 - a scrape shows the last known counts rather than failing
            log.debug("metrics: counts not refreshed: %s", e)

    async def _refresh(self) -> None:
        if self._stale:
            self._stale, self._keys = False, set()
            try:
                membership = await self.store.membership()
            except BaseException:
                self._stale = True
                raise
            self.members = {m.handle for m in membership.members}
            self.rooms = set(membership.rooms)
        while self._keys:
            key = self._keys.pop()
            kind, _, name = key.partition(".")
            try:
                if kind == "member":
                    exists, _bus, _rev = await self.store.bus_member(name)
                    (self.members.add if exists else self.members.discard)(name)
                else:
                    handles, _rev = await self.store.room_handles(name)
                    (self.rooms.add if handles is not None else self.rooms.discard)(name)
            except BaseException:
                self._keys.add(key)
                raise
        if self._log_stale:
            self._log_stale = False
            try:
                seq, _hash = await self.store.log_head()
            except BaseException:
                self._log_stale = True
                raise
            self.log_entries = seq + 1


class _DaemonCollector:
    """Families read at scrape time from the daemon's own state (no I/O)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with what the daemon runs; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        m = self.m
        info = GaugeMetricFamily(f"{NAMESPACE}_info", "membershipd's version and node name (always 1)",
                                 labels=["version", "node"])
        info.add_metric([__version__, m.node], 1)
        yield info
        bus = m.bus
        yield GaugeMetricFamily(f"{NAMESPACE}_nats_connected", "1 while membershipd is connected to NATS",
                                value=1 if bus is not None and bus.connected else 0)
        supervisor = m.supervisor
        yield CounterMetricFamily(f"{NAMESPACE}_nats_server_restarts", "restarts of the supervised nats-server "
                                  "(0 with --nats-url)", value=getattr(supervisor, "restarts", 0) or 0)
        health = m.health
        if health is not None:
            state = health.state()
            yield GaugeMetricFamily(f"{NAMESPACE}_healthy", "1 while /healthz answers 200 (0: degraded)",
                                    value=1 if state.ok else 0)
            yield GaugeMetricFamily(f"{NAMESPACE}_nats_jetstream_available", "1 while the nonce bucket answers "
                                    "(/healthz nats.jetstream)", value=1 if state.jetstream else 0)
            if state.routes is not None:
                yield GaugeMetricFamily(f"{NAMESPACE}_cluster_routes", "peers this node's nats-server has "
                                        "routes to (/healthz nats.cluster.routes)", value=state.routes)
        if m.posture is not None:
            try:
                secure = m.posture()["summary"] == "enforce+acl+tls"
            except Exception:  # noqa: BLE001 - a failing posture counts as not secure
                secure = False
            yield GaugeMetricFamily(f"{NAMESPACE}_posture_secure", "1 while the posture is enforce+acl+tls",
                                    value=1 if secure else 0)
        counts = m.counts
        if counts is not None:
            yield GaugeMetricFamily(f"{NAMESPACE}_members", "members", value=len(counts.members))
            yield GaugeMetricFamily(f"{NAMESPACE}_rooms", "rooms", value=len(counts.rooms))
            yield GaugeMetricFamily(f"{NAMESPACE}_log_entries", "entries of the membership log",
                                    value=counts.log_entries)
        yield from _connection_families(m)
        if m.certificates is not None:
            expiry = GaugeMetricFamily(f"{NAMESPACE}_tls_certificate_expiry_timestamp_seconds", "when the "
                                       "earliest certificate of a TLS file in use expires (Unix time), by listener "
                                       "(http, metrics, nats, route, ...) and kind (cert, ca)",
                                       labels=["listener", "kind"])
            for (listener, kind), when in m.certificates.items():
                expiry.add_metric([listener, kind], when)
            yield expiry
        nonces = m.nonces
        claims = CounterMetricFamily(f"{NAMESPACE}_nonce_claims", "nonce claims of signed requests by result: "
                                     "claimed, replay (401), unavailable (503: fail closed)", labels=["result"])
        for result, attr in zip(NONCE_RESULTS, ("claims", "replays", "failures")):
            claims.add_metric([result], getattr(nonces, attr, 0) if nonces is not None else 0)
        yield claims
        plugins = m.plugins
        if plugins is not None:
            errors = CounterMetricFamily(f"{NAMESPACE}_plugin_hook_errors", "plugin hook calls that raised",
                                         labels=["plugin", "hook"])
            seen = dict(plugins.hook_errors)
            for info_ in plugins.list_plugins():
                for hook in info_.hooks:
                    seen.setdefault((info_.name, hook), 0)
            for (plugin, hook), n in sorted(seen.items()):
                errors.add_metric([plugin, hook], n)
            yield errors


def _connection_families(m: Metrics) -> Iterator[Metric]:
    """The HTTP listeners' connections (unibus.connlimits), by listener: open, the limit, those
    closed early to make room or at once; and the failed accept()s of any listener."""
    families = (
        (GaugeMetricFamily, "http_connections", "open connections of the HTTP listener", len),
        (GaugeMetricFamily, "http_connections_limit", "most connections the HTTP listener keeps open at once",
         lambda c: c.limit),
        (CounterMetricFamily, "http_connections_evicted", "idle connections (no request in progress) closed to "
         "make room for a new one, the listener being at its limit", lambda c: c.evicted),
        (CounterMetricFamily, "http_connections_refused", "new connections closed at once, the listener being at "
         "its limit with every connection serving a request", lambda c: c.refused),
        (CounterMetricFamily, "http_connections_stalled", "connections dropped because their client took nothing "
         "of what waited to be sent to it for a whole body deadline", lambda c: getattr(c, "stalled", 0)),
    )
    listeners = sorted(m.connections.items())
    for kind, name, doc, read in families:
        family = kind(f"{NAMESPACE}_{name}", doc, labels=["listener"])
        for listener, limiter in listeners:
            family.add_metric([listener], read(limiter))
        yield family
    yield CounterMetricFamily(f"{NAMESPACE}_http_member_requests_refused", "signed requests refused with 429, "
                              "their member having its share of the control plane's connections busy already",
                              value=getattr(m.member_requests, "refused", 0))
    yield CounterMetricFamily(f"{NAMESPACE}_http_member_changes_refused", "changes of another member's rooms "
                              "refused with 429, their author having changed that member's rooms too often",
                              value=getattr(m.change_limit, "refused", 0))
    yield CounterMetricFamily(f"{NAMESPACE}_http_responses_dropped", "connections dropped because their client "
                              "took too little of a response in time (the body deadline, plus a second per 32 KiB)",
                              value=m.responses_dropped + getattr(m.member_requests, "stalled", 0))
    yield CounterMetricFamily(f"{NAMESPACE}_accept_errors", "accept() failures of any listener for lack of "
                              "descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)",
                              value=getattr(m.accept_errors, "count", 0))


class Metrics:
    """The metrics of one daemon (see the module docstring).

    The daemon fills in what the collector reads (``bus``, ``supervisor``,
    ``nonces``, ``plugins``, ``counts``, ``health``, ``posture``); anything
    left ``None`` is not exported (or exported as 0 where a series must exist).
    """

    def __init__(self, *, node: str = "", process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: id(metric) -> the plugin that made it (one not here is the core's)
        self._owners: dict[int, str] = {}
        self.node = node
        self.bus: Any = None
        self.supervisor: Any = None
        self.nonces: Any = None
        self.plugins: Any = None
        self.counts: StateCounts | None = None
        self.health: Any = None
        self.posture: Callable[[], dict[str, Any]] | None = None
        #: each HTTP listener's :class:`unibus.connlimits.ConnectionLimiter`, by listener (``http``, ``metrics``)
        self.connections: dict[str, Any] = {}
        #: the daemon's :class:`unibus.connlimits.AcceptErrorLog` (its ``count``)
        self.accept_errors: Any = None
        #: each member's signed requests in progress (:class:`unibus.connlimits.MemberRequests`)
        self.member_requests: Any = None
        #: how often one member may change another's rooms (:class:`unibus.changelimit.ChangeLimit`)
        self.change_limit: Any = None
        #: responses dropped by the outermost middleware, their client taking too little in time
        self.responses_dropped = 0
        #: the expiry of the certificates in use (:class:`unibus.certexpiry.CertificateExpiry`)
        self.certificates: Any = None
        self._plugins: dict[str, PluginMetrics] = {}
        if process:
            ProcessCollector(registry=self.registry)
        self.registry.register(_DaemonCollector(self))
        self.http_requests = Counter(f"{NAMESPACE}_http_requests", "HTTP requests by route template, method and "
                                     "status", ["route", "method", "status"], registry=self.registry)
        self.http_duration = Histogram(f"{NAMESPACE}_http_request_duration_seconds", "HTTP request duration by "
                                       "route template", ["route"], buckets=HTTP_BUCKETS, registry=self.registry)
        self.signature_rejections = Counter(f"{NAMESPACE}_signature_rejections", "signed requests refused with "
                                            "401, by reason", ["reason"], registry=self.registry)
        for reason in SIGNATURE_REJECTION_REASONS:
            self.signature_rejections.labels(reason)
        self.store_writes = Counter(f"{NAMESPACE}_store_writes", "committed store changes made by this node, "
                                    "by kind", ["kind"], registry=self.registry)
        for kind in STORE_WRITE_KINDS:
            self.store_writes.labels(kind)
        # labels() takes a lock and builds a tuple; the request path reuses the children
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._duration_children: dict[str, Any] = {}

    # -- what the core feeds ---------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # keyed by the label, never the raw method: a client may send any token as a method,
        # and this cache must stay as bounded as the label set
        key = (route, http_method_label(method), status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.http_requests.labels(route, key[1], str(status))
        child.inc()
        duration = self._duration_children.get(route)
        if duration is None:
            duration = self._duration_children[route] = self.http_duration.labels(route)
        duration.observe(seconds)

    def signature_rejected(self, reason: str) -> None:
        self.signature_rejections.labels(reason if reason in SIGNATURE_REJECTION_REASONS else "other").inc()

    def store_changed(self, change: Change) -> None:
        """Store listener: count this node's committed writes (another node's arrive as ``reloaded``)."""
        if change.kind == "reloaded":
            return
        self.store_writes.labels(change.kind if change.kind in STORE_WRITE_KINDS else "other").inc()

    # -- plugins ---------------------------------------------------------------------------

    def plugin(self, name: str) -> PluginMetrics:
        """The namespace of plugin ``name`` (the same object every time)."""
        found = self._plugins.get(name)
        if found is None:
            found = self._plugins[name] = PluginMetrics(self, name)
        return found

    def _make(self, kind: type, name: str, documentation: str, labelnames: Sequence[str], *,
              owner: str | None = None, **kw: Any) -> Any:
        """The metric ``name``, made for ``owner`` (a plugin; None: the core) or given back to it.
        A metric another owner made is refused: a plugin named ``http`` asking for
        ``requests_total`` got the core's ``unibus_http_requests_total`` and could write to it
        (red team), and plugins ``a-b`` and ``a_b`` share one prefix."""
        existing = self.registry._names_to_collectors.get(name)  # noqa: SLF001 - the registry's own index
        if existing is None and kind is Counter:
            existing = self.registry._names_to_collectors.get(name + "_total")  # noqa: SLF001
        if existing is not None:
            made_by = self._owners.get(id(existing))
            if made_by != owner:
                raise ValueError(f"metric {name} belongs to " + (f"plugin {made_by}" if made_by else "the core")
                                 + (f", not to plugin {owner}" if owner else ""))
            if isinstance(existing, kind) and tuple(existing._labelnames) == tuple(labelnames):  # noqa: SLF001
                return existing
            raise ValueError(f"metric {name} exists already, as another kind or with other labels")
        made = kind(name, documentation, list(labelnames), registry=self.registry, **kw)
        if owner is not None:
            self._owners[id(made)] = owner  # the registry keeps it as long as this object lives
        return made

    # -- exposition ------------------------------------------------------------------------

    async def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when ``accept`` asks for it) and its content type."""
        if self.counts is not None:
            await self.counts.refresh()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


#: The ``status`` of a request whose client went away before the answer (nginx's code for it).
CLIENT_GONE = 499


def route_label(request: web.BaseRequest) -> str:
    """The route template of a request, or :data:`UNMATCHED_ROUTE`."""
    match_info = getattr(request, "match_info", None)
    if match_info is None or match_info.http_exception is not None:
        return UNMATCHED_ROUTE
    resource = match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


# -- the --metrics-addr listener -----------------------------------------------------------

METRICS_KEY = web.AppKey("unibus_metrics", Metrics)


async def _serve_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    body, content_type = await metrics.render(request.headers.get("Accept"))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    return response


async def _not_here(request: web.Request) -> web.Response:
    from .problems import problem_response

    return problem_response(404, f"no route for {request.method} {request.path}; this listener serves "
                            "GET /metrics only")


def metrics_app(metrics: Metrics) -> web.Application:
    """The application of the ``--metrics-addr`` listener: ``GET /metrics`` and nothing else."""
    from .app import problem_middleware

    app = web.Application(middlewares=[problem_middleware], client_max_size=1024)
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", _serve_metrics, allow_head=False)
    app.router.add_route("*", "/{tail:.*}", _not_here)
    return app


class MetricsServer:
    """Runs :func:`metrics_app` on an address, with TLS when given a context; at most
    METRICS_MAX_CONNECTIONS connections, each waiting at most ``idle_timeout`` for a
    request head (unibus.connlimits)."""

    def __init__(self, metrics: Metrics, host: str, port: int, ssl_context: Any = None, *,
                 idle_timeout: float | None = None, stall_timeout: float | None = None) -> None:
        from .auth import DEFAULT_BODY_TIMEOUT
        from .connlimits import DEFAULT_IDLE_TIMEOUT, METRICS_MAX_CONNECTIONS, ConnectionLimiter

        self.metrics = metrics
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.idle_timeout = DEFAULT_IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        #: a scraper that takes nothing of its answer for this long is dropped (the body deadline)
        self.stall_timeout = DEFAULT_BODY_TIMEOUT if stall_timeout is None else stall_timeout
        self.limiter = ConnectionLimiter("metrics", METRICS_MAX_CONNECTIONS, where=f"--metrics-addr {host}:{port}")
        # a scraper that showed its certificate is never pushed out by connections that did not
        self.limiter.verified = ssl_context is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        from .app import server_options
        from .connlimits import LimitedSite

        self.runner = web.AppRunner(metrics_app(self.metrics), access_log=None, handle_signals=False,
                                    shutdown_timeout=1.0, **server_options(self.idle_timeout))
        await self.runner.setup()
        self.metrics.connections["metrics"] = self.limiter
        site = LimitedSite(self.runner, self.host, self.port, limiter=self.limiter, ssl_context=self.ssl_context,
                           handshake_timeout=self.idle_timeout, stall_timeout=self.stall_timeout)
        await site.start()

    async def stop(self) -> None:
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await self.runner.cleanup()
            self.runner = None
