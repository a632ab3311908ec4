"""Posture merge, summary and the cluster gate, with small test plugins."""

from __future__ import annotations

import itertools

import pytest

from unibus import hookimpl
from unibus.daemon import compute_posture
from unibus.errors import ConfigError
from unibus.posture import cluster_gate, merge_posture, posture_summary
from unibus.settings import Settings


class Reports:
    """A test plugin that reports the facts it is given."""

    def __init__(self, **facts):
        self.facts = facts
        self.PLUGIN_NAME = "reports-" + "-".join(f"{k}={v}" for k, v in facts.items())

    @hookimpl
    def posture(self, settings):
        return dict(self.facts)


BUS_AUTH = ["enforce", "off", None]  # None: no plugin reports it
BOOL = [True, False, None]


@pytest.mark.parametrize("bus_auth, acl, tls", list(itertools.product(BUS_AUTH, BOOL, BOOL)))
def test_every_combination(unibus_plugin_manager, bus_auth, acl, tls):
    plugins = []
    if bus_auth is not None or acl is not None:
        plugins.append(Reports(**{k: v for k, v in (("bus_auth", bus_auth), ("acl", acl)) if v is not None}))
    if tls is not None:
        plugins.append(Reports(tls=tls))
    pm = unibus_plugin_manager(*plugins)
    posture = compute_posture(Settings(), pm)

    assert posture["bus_auth"] == (bus_auth or "off")
    assert posture["acl"] is bool(acl)
    assert posture["tls"] is bool(tls)
    expected = [n for n, held in (("enforce", bus_auth == "enforce"), ("acl", acl is True), ("tls", tls is True)) if held]
    assert posture["summary"] == ("+".join(expected) or "open")

    if posture["summary"] == "enforce+acl+tls":
        cluster_gate(posture, clustered=True)
    else:
        with pytest.raises(ConfigError) as e:
            cluster_gate(posture, clustered=True)
        assert e.value.exit_code == 2
        msg = str(e.value)
        assert ("bus_auth" in msg) == (bus_auth != "enforce")
        assert ("acl is false" in msg) == (acl is not True)
        assert ("tls is false" in msg) == (tls is not True)
    cluster_gate(posture, clustered=False)  # a single node is never gated


def test_weakest_report_wins(unibus_plugin_manager):
    pm = unibus_plugin_manager(Reports(bus_auth="enforce", acl=True, tls=True), Reports(acl=False))
    assert compute_posture(Settings(), pm)["summary"] == "enforce+tls"


def test_odd_values_do_not_hold():
    posture = merge_posture([{"bus_auth": "ENFORCE", "acl": "yes", "tls": 1}])
    assert posture == {"bus_auth": "off", "acl": False, "tls": False, "summary": "open"}


def test_summary_order():
    assert posture_summary({"bus_auth": "enforce", "acl": False, "tls": True}) == "enforce+tls"
    assert posture_summary({"acl": True}) == "acl"


def test_hooks_never_see_the_route_password(unibus_plugin_manager):
    from unibus.settings import Secret

    seen = []

    class Spy:
        @hookimpl
        def posture(self, settings):
            seen.append(settings.cluster_pass)
            return {}

    compute_posture(Settings(cluster_name="c", cluster_pass=Secret("pw")), unibus_plugin_manager(Spy()))
    assert seen == [None]
