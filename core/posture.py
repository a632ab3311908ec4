"""Posture: merge the facts plugins report, summarise them, gate the cluster.

SPEC §4: ``bus_auth`` ("enforce"/"off"), ``acl`` and ``tls`` (bools). A fact
no plugin reports counts as not holding. ``summary`` joins the facts that
hold in the order enforce, acl, tls, or says ``open``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConfigError

FACTS = ("bus_auth", "acl", "tls")
INSECURE: dict[str, Any] = {"bus_auth": "off", "acl": False, "tls": False}
CLUSTER_REQUIRED = "enforce+acl+tls"


def _holds(fact: str, value: Any) -> bool:
    if fact == "bus_auth":
        return value == "enforce"
    return value is True


def merge_posture(reports: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Merge plugin reports into the posture object of ``/healthz``.

    A fact reported by several plugins keeps the weakest value, so one plugin
    can never make another's missing enforcement look enforced. Unknown keys
    are ignored: the posture has exactly the SPEC's facts plus ``summary``.
    """
    merged: dict[str, Any] = {}
    for report in reports:
        for fact in FACTS:
            if not report or fact not in report:
                continue
            value = report[fact]
            if fact == "bus_auth" and value not in ("enforce", "off"):
                value = "off"
            elif fact != "bus_auth":
                value = value is True
            if fact in merged and _holds(fact, merged[fact]) and not _holds(fact, value):
                merged[fact] = value
            elif fact not in merged:
                merged[fact] = value
    posture = {fact: merged.get(fact, INSECURE[fact]) for fact in FACTS}
    posture["summary"] = posture_summary(posture)
    return posture


def posture_summary(posture: Mapping[str, Any]) -> str:
    names = {"bus_auth": "enforce", "acl": "acl", "tls": "tls"}
    held = [names[f] for f in FACTS if _holds(f, posture.get(f, INSECURE[f]))]
    return "+".join(held) if held else "open"


def missing_facts(posture: Mapping[str, Any]) -> list[str]:
    """Human names of the facts that do not hold, for the gate's message."""
    out = []
    if not _holds("bus_auth", posture.get("bus_auth")):
        out.append("bus_auth is not enforce (--bus-auth enforce, auth_enforce plugin)")
    if not _holds("acl", posture.get("acl")):
        out.append("acl is false (per-member ACLs from the auth_enforce plugin)")
    if not _holds("tls", posture.get("tls")):
        out.append("tls is false (mutual route TLS: --route-tls-cert/--route-tls-key/--route-tls-ca, route_tls plugin)")
    return out


def cluster_gate(posture: Mapping[str, Any], clustered: bool) -> None:
    """Refuse (exit 2) to join a cluster unless the posture is exactly enforce+acl+tls."""
    if clustered and posture["summary"] != CLUSTER_REQUIRED:
        raise ConfigError(
            f"refusing to join a cluster with posture {posture['summary']!r}; a cluster needs "
            f"{CLUSTER_REQUIRED}: " + "; ".join(missing_facts(posture))
        )
