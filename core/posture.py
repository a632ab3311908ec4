"""Posture: merge the facts plugins and the core report, summarise them, gate the cluster.

docs/operations.md ("Posture and the cluster gate") is the operator's view of
what follows. Facts: ``bus_auth`` ("enforce"/"off"), ``acl`` and ``tls``
(bools), plus ``listeners``: the state of each listener (``http``, ``nats``,
``routes``, ``metrics``), one of ``loopback``, ``tls``, ``mtls``,
``plaintext`` or ``none`` (no such listener).

The core reports the listeners it opens itself (HTTP, the embedded NATS
client port, the metrics listener), and ``bus_auth: "off"``, ``acl: false``
when its own ``--bus-auth off`` or ``--nats-url`` leaves the bus open (so no
plugin can claim otherwise); the route_tls plugin reports the routes of a clustered node.
``tls`` holds when every listener is loopback, TLS or absent, a clustered
node's routes use mutual TLS, and no plugin reports ``tls: false``. A fact no
plugin reports counts as not holding. ``summary`` joins the facts that hold in
the order enforce, acl, tls, or says ``open``.

Fail closed: a flag that asks for a fact no loaded plugin reports is refused
(:func:`require_reporters`), so a broken install never silently runs an open bus.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .settings import LISTENER_TLS_FLAGS, Settings, is_loopback_host, plaintext_nats_link

log = logging.getLogger("unibus.posture")

if TYPE_CHECKING:  # pragma: no cover
    from .pluginmanager import PluginManager

FACTS = ("bus_auth", "acl", "tls")
INSECURE: dict[str, Any] = {"bus_auth": "off", "acl": False, "tls": False}
CLUSTER_REQUIRED = "enforce+acl+tls"

LISTENERS = ("http", "nats", "routes", "metrics")
#: Listener states from weakest to strongest; ``none`` (no listener) is outside the order.
LISTENER_STATES = ("plaintext", "loopback", "tls", "mtls")
SECURE_STATES = frozenset({"loopback", "tls", "mtls", "none"})
#: What fixes a plaintext listener, for the gate's message.
LISTENER_FIX = {
    **LISTENER_TLS_FLAGS,
    "routes": "mutual route TLS: --route-tls-cert/--route-tls-key/--route-tls-ca, route_tls plugin",
    "metrics": "--metrics-tls-cert/--metrics-tls-key, or bind --metrics-addr to 127.0.0.1",
}

#: The built-in plugin that reports each fact: named when a flag asks for a fact nobody reports.
FACT_OWNERS = {"bus_auth": "auth_enforce", "acl": "auth_enforce", "routes": "route_tls"}


def _holds(fact: str, value: Any) -> bool:
    if fact == "bus_auth":
        return value == "enforce"
    return value is True


def listener_state(host: str, *, tls: bool, mutual: bool = False) -> str:
    """``mtls``/``tls`` when the listener has TLS, else ``loopback`` or ``plaintext`` by its host."""
    if tls:
        return "mtls" if mutual else "tls"
    return "loopback" if is_loopback_host(host) else "plaintext"


def core_listeners(settings: Settings) -> dict[str, str]:
    """The listeners the core opens itself. Routes are the route_tls plugin's to report."""
    return {
        "http": listener_state(settings.http_addr.host, tls=bool(settings.http_tls_cert)),
        "nats": (listener_state(settings.nats_addr.host, tls=bool(settings.tls_cert), mutual=bool(settings.tls_ca))
                 if settings.embedded else "none"),
        "metrics": (listener_state(settings.metrics_addr.host, tls=bool(settings.metrics_tls_cert),
                                   mutual=bool(settings.metrics_tls_ca))
                    if settings.metrics_addr is not None else "none"),
    }


def core_facts(settings: Settings) -> dict[str, Any]:
    """What the core knows of bus authorization from its own flag: nothing enforces it with
    ``--bus-auth off`` or ``--nats-url``, whatever a plugin reports. ``--bus-auth`` is a core flag,
    and blocking auth_enforce is accepted with ``--bus-auth off``: another plugin's ``posture`` must
    not make that open bus read ``enforce+acl`` (and pass the cluster gate)."""
    if settings.bus_auth == "enforce" and settings.embedded:
        return {}  # the built-in auth_enforce reports it; without it the start is refused (require_reporters)
    return {"bus_auth": "off", "acl": False}


def bus_auth_warnings(settings: Settings) -> list[str]:
    """The start-up warnings of a bus that membershipd does not authorize (the core's flag, so the
    core's warning: it holds with auth_enforce blocked too)."""
    if settings.bus_auth == "off":
        return ["--bus-auth off: the bus is open to any client that reaches the NATS port (development only)"]
    if not settings.embedded:
        return ["--nats-url: bus authorization is the external NATS server's job; posture says bus_auth off"]
    return []


def _weaker(a: str | None, b: str) -> str:
    if a is None:
        return b
    return a if LISTENER_STATES.index(a) <= LISTENER_STATES.index(b) else b


def merge_posture(reports: Iterable[Mapping[str, Any] | None], settings: Settings) -> dict[str, Any]:
    """Merge the core's listeners and plugin reports into the posture object of ``/healthz``.

    A fact or listener reported several times keeps the weakest value, so one
    plugin can never make another's missing enforcement look enforced. An
    unknown listener state counts as ``plaintext``; unknown keys are ignored.
    A listener of another name than the four is not shown, but one that is
    not secure makes ``tls`` false (fail closed: a plugin's own plaintext
    listener was dropped, and ``tls`` held; a plugin author's walkthrough).
    """
    merged: dict[str, Any] = {}
    listeners: dict[str, str | None] = {}
    other_insecure = False
    for report in [{"listeners": core_listeners(settings), **core_facts(settings)}, *reports]:
        if not isinstance(report, Mapping):
            continue
        for fact in FACTS:
            if fact not in report:
                continue
            value = report[fact]
            if fact == "bus_auth" and value not in ("enforce", "off"):
                value = "off"
            elif fact != "bus_auth":
                value = value is True
            if fact not in merged or (_holds(fact, merged[fact]) and not _holds(fact, value)):
                merged[fact] = value
        reported = report.get("listeners")
        if isinstance(reported, Mapping):
            for name, state in reported.items():
                if state == "none":
                    continue
                if name not in LISTENERS:
                    other_insecure = other_insecure or not (isinstance(state, str) and state in SECURE_STATES)
                    continue
                if name == "routes" and not settings.clustered:
                    continue  # an unclustered node has no routes, whatever is claimed
                state = state if state in LISTENER_STATES else "plaintext"
                listeners[name] = _weaker(listeners.get(name), state)
    if settings.clustered and "routes" not in listeners:
        listeners["routes"] = "plaintext"  # nobody vouches for the routes
    final = {name: listeners.get(name) or "none" for name in LISTENERS}
    listeners_ok = all(state in SECURE_STATES for state in final.values()) and (
        not settings.clustered or final["routes"] == "mtls")
    # membershipd's own link to an external NATS counts too: nats:// to another host is not TLS.
    tls = listeners_ok and not other_insecure and merged.get("tls", True) is True and not plaintext_nats_link(settings)
    posture: dict[str, Any] = {
        "bus_auth": merged.get("bus_auth", INSECURE["bus_auth"]),
        "acl": merged.get("acl", INSECURE["acl"]),
        "tls": tls,
    }
    posture["summary"] = posture_summary(posture)
    posture["listeners"] = final
    return posture


def posture_summary(posture: Mapping[str, Any]) -> str:
    names = {"bus_auth": "enforce", "acl": "acl", "tls": "tls"}
    held = [names[f] for f in FACTS if _holds(f, posture.get(f, INSECURE[f]))]
    return "+".join(held) if held else "open"


def posture_reports(settings: Settings, plugins: PluginManager) -> list[tuple[str, Any]]:
    """Every plugin's ``posture`` answer as ``(plugin name, report)``; hooks see no secret."""
    return plugins.call_each("posture", settings=settings.for_plugins())


def owned_reports(reports: Iterable[tuple[str, Any]], plugins: PluginManager,
                  ignored: list[str] | None = None) -> list[tuple[str, Any]]:
    """The reports with every claim that a fact holds taken out unless it comes from the built-in
    plugin that owns the fact (:data:`FACT_OWNERS`, :meth:`PluginManager.is_builtin`): ``bus_auth:
    "enforce"`` and ``acl: true`` from ``unibus.plugins.auth_enforce``, a secure ``routes`` listener
    from ``unibus.plugins.route_tls``. Another plugin can still make a fact weaker, never hold.

    A claim's name alone proved nothing: a plugin registered as ``auth_enforce`` from another
    distribution or with ``--plugin``, or any plugin with the built-in left out
    (``UNIBUS_LOAD_PLUGINS``), made an open bus read ``enforce+acl+tls`` (a review). ``ignored``
    collects a line for each claim taken out."""
    out = []
    for name, report in reports:
        if isinstance(report, Mapping):
            kept = dict(report)
            for fact in ("bus_auth", "acl"):
                owner = FACT_OWNERS[fact]
                if fact in kept and _holds(fact, kept[fact]) and not (name == owner and plugins.is_builtin(owner)):
                    del kept[fact]
                    if ignored is not None:
                        ignored.append(f"plugin {name}: posture fact {fact}={report[fact]!r} ignored: only the "
                                       f"built-in {owner} plugin reports it")
            routes = kept.get("listeners")
            owner = FACT_OWNERS["routes"]
            if (isinstance(routes, Mapping) and routes.get("routes") in SECURE_STATES - {"none"}
                    and not (name == owner and plugins.is_builtin(owner))):
                kept["listeners"] = {k: v for k, v in routes.items() if k != "routes"}
                if ignored is not None:
                    ignored.append(f"plugin {name}: posture listener routes={routes['routes']!r} ignored: only the "
                                   f"built-in {owner} plugin reports it")
            report = kept
        out.append((name, report))
    return out


def compute_posture(settings: Settings, plugins: PluginManager) -> dict[str, Any]:
    return merge_posture((r for _, r in owned_reports(posture_reports(settings, plugins), plugins)), settings)


def require_reporters(settings: Settings, plugins: PluginManager, reports: Iterable[tuple[str, Any]]) -> None:
    """Refuse (exit 2) a flag that asks for a fact no loaded plugin reports.

    ``--bus-auth enforce`` (the default) needs the built-in auth_enforce, loaded
    and reporting ``bus_auth``: without it nothing writes the bus's
    authorization and the bus would be open. Another plugin that reports
    ``bus_auth``, or one registered under auth_enforce's name, does not do.
    """
    owner = FACT_OWNERS["bus_auth"]
    reported = any(name == owner and isinstance(r, Mapping) and "bus_auth" in r for name, r in reports)
    if settings.bus_auth == "enforce" and not (reported and plugins.is_builtin(owner)):
        raise ConfigError(
            f"--bus-auth enforce: no loaded plugin enforces bus authorization (the {owner} plugin "
            f"{plugins.why_not_loaded(owner)}); the bus would be open. Install or enable {owner}, "
            "or give --bus-auth off (development only)"
        )


def warn_unknown_keys(reports: Iterable[tuple[str, Any]]) -> list[str]:
    """The warnings for what a plugin's posture report holds that counts for nothing, or not as it
    may expect: keys that are no fact, listener names that are not shown. Logged at start-up."""
    out = []
    for name, report in reports:
        if not isinstance(report, Mapping):
            continue
        for key in sorted(set(report) - {*FACTS, "listeners"}, key=str):
            out.append(f"plugin {name}: posture key {key!r} is not a posture fact ({', '.join(FACTS)}, "
                       "listeners); ignored")
        reported = report.get("listeners")
        for listener in sorted(set(reported) - set(LISTENERS), key=str) if isinstance(reported, Mapping) else ():
            out.append(f"plugin {name}: listener {listener!r} is not shown in the posture (only "
                       f"{', '.join(LISTENERS)} are); a state other than loopback, tls, mtls or none makes tls false")
    for line in out:
        log.warning("%s", line)
    return out


def startup_posture(settings: Settings, plugins: PluginManager) -> dict[str, Any]:
    """The posture ``serve`` and ``membershipd posture`` start from, after the fail-closed checks."""
    reports = posture_reports(settings, plugins)
    warn_unknown_keys(reports)
    require_reporters(settings, plugins, reports)
    ignored: list[str] = []
    reports = owned_reports(reports, plugins, ignored)
    for line in ignored:
        log.warning("%s", line)
    return merge_posture((r for _, r in reports), settings)


def missing_facts(posture: Mapping[str, Any]) -> list[str]:
    """Human names of the facts that do not hold, for the gate's message; names the listeners at fault."""
    out = []
    if not _holds("bus_auth", posture.get("bus_auth")):
        out.append("bus_auth is not enforce (--bus-auth enforce, auth_enforce plugin)")
    if not _holds("acl", posture.get("acl")):
        out.append("acl is false (per-member ACLs from the auth_enforce plugin)")
    if not _holds("tls", posture.get("tls")):
        listeners = posture.get("listeners") or {}
        faults = [f"the {name} listener is {state} ({LISTENER_FIX.get(name, 'TLS')})"
                  for name, state in listeners.items() if state not in SECURE_STATES]
        if listeners.get("routes") not in (None, "none", "mtls", "plaintext"):
            faults.append(f"the routes listener is {listeners['routes']}, not mutual TLS ({LISTENER_FIX['routes']})")
        out.append("tls is false: " + "; ".join(faults) if faults else "tls is false (a plugin reports tls: false)")
    return out


def cluster_gate(posture: Mapping[str, Any], clustered: bool) -> None:
    """Refuse (exit 2) to join a cluster unless the posture is exactly enforce+acl+tls."""
    if clustered and posture["summary"] != CLUSTER_REQUIRED:
        raise ConfigError(
            f"refusing to join a cluster with posture {posture['summary']!r}; a cluster needs "
            f"{CLUSTER_REQUIRED}: " + "; ".join(missing_facts(posture))
        )
