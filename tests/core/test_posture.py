"""Posture merge, summary, listeners and the cluster gate, with small test plugins."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from unibus import hookimpl
from unibus.daemon import compute_posture
from unibus.errors import ConfigError
from unibus.posture import cluster_gate, merge_posture, posture_summary, require_reporters, startup_posture
from unibus.plugins import auth_enforce
from unibus.settings import HostPort, Settings, is_loopback_host


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
LOOPBACK_ONLY = {"http": "loopback", "nats": "loopback", "routes": "none", "metrics": "none"}


@pytest.mark.parametrize("bus_auth, acl, tls", list(itertools.product(BUS_AUTH, BOOL, BOOL)))
def test_every_combination(bus_auth, acl, tls):
    """The merge of every combination of reports (as the built-in owners would make them)."""
    reports = []
    if bus_auth is not None or acl is not None:
        reports.append({k: v for k, v in (("bus_auth", bus_auth), ("acl", acl)) if v is not None})
    if tls is not None:
        reports.append({"tls": tls})
    posture = merge_posture(reports, Settings())

    assert posture["bus_auth"] == (bus_auth or "off")
    assert posture["acl"] is bool(acl)
    # the core reports tls for its own listeners: all loopback here, so only a plugin's false drags it down
    assert posture["tls"] is (tls is not False)
    assert posture["listeners"] == LOOPBACK_ONLY
    expected = [n for n, held in (("enforce", bus_auth == "enforce"), ("acl", acl is True), ("tls", tls is not False))
                if held]
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
        assert ("tls is false" in msg) == (tls is False)
    cluster_gate(posture, clustered=False)  # a single node is never gated


def test_weakest_report_wins(unibus_plugin_manager):
    pm = unibus_plugin_manager(auth_enforce, Reports(tls=True), Reports(acl=False))
    assert compute_posture(Settings(), pm)["summary"] == "enforce+tls"


def test_odd_values_do_not_hold():
    posture = merge_posture([{"bus_auth": "ENFORCE", "acl": "yes", "tls": 1}], Settings())
    assert posture == {"bus_auth": "off", "acl": False, "tls": False, "summary": "open", "listeners": LOOPBACK_ONLY}


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


# -- listeners ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.8.7", "::1", "localhost", "LOCALHOST", "::ffff:127.0.0.1"])
def test_loopback_hosts(host):
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "192.0.2.7", "fd00::2", "example.net", "vm",
                                  "localhost.example.net", "127.1"])
def test_exposed_hosts(host):
    assert not is_loopback_host(host)


EXPOSED = HostPort("0.0.0.0", 8470)


@pytest.mark.parametrize("settings, listeners", [
    (Settings(), LOOPBACK_ONLY),
    (Settings(http_addr=EXPOSED, insecure_plaintext=True), {**LOOPBACK_ONLY, "http": "plaintext"}),
    (Settings(nats_addr=HostPort("::", 4250), insecure_plaintext=True), {**LOOPBACK_ONLY, "nats": "plaintext"}),
    (Settings(http_addr=EXPOSED, http_tls_cert=Path("c"), http_tls_key=Path("k")), {**LOOPBACK_ONLY, "http": "tls"}),
    (Settings(tls_cert=Path("c"), tls_key=Path("k")), {**LOOPBACK_ONLY, "nats": "tls"}),
    (Settings(tls_cert=Path("c"), tls_key=Path("k"), tls_ca=Path("ca")), {**LOOPBACK_ONLY, "nats": "mtls"}),
    (Settings(nats_url="nats://127.0.0.1:4222"), {**LOOPBACK_ONLY, "nats": "none"}),
], ids=["default", "http-exposed", "nats-exposed", "https", "nats-tls", "nats-mtls", "external-nats"])
def test_core_listeners(unibus_plugin_manager, settings, listeners):
    posture = compute_posture(settings, unibus_plugin_manager())
    assert posture["listeners"] == listeners
    assert posture["tls"] is ("plaintext" not in listeners.values())
    assert list(posture) == ["bus_auth", "acl", "tls", "summary", "listeners"]


CLUSTERED = {"cluster_name": "c", "routes": ("nats://127.0.0.1:6250",)}


def test_clustered_routes_without_a_reporter_are_plaintext_and_gated(unibus_plugin_manager):
    pm = unibus_plugin_manager(auth_enforce)
    posture = compute_posture(Settings(**CLUSTERED), pm)
    assert posture["listeners"]["routes"] == "plaintext" and posture["tls"] is False
    with pytest.raises(ConfigError) as e:
        cluster_gate(posture, clustered=True)
    assert "the routes listener is plaintext" in str(e.value) and "--route-tls-cert" in str(e.value)


def test_clustered_routes_need_mutual_tls():
    """As the built-in owners report them (route_tls's own checks: tests/plugins/route_tls)."""
    enforced = {"bus_auth": "enforce", "acl": True}
    mtls = merge_posture([enforced, {"listeners": {"routes": "mtls"}}], Settings(**CLUSTERED))
    assert mtls["listeners"]["routes"] == "mtls" and mtls["summary"] == "enforce+acl+tls"
    cluster_gate(mtls, clustered=True)
    one_way = merge_posture([enforced, {"listeners": {"routes": "tls"}}], Settings(**CLUSTERED))
    assert one_way["tls"] is False
    with pytest.raises(ConfigError, match="routes listener is tls, not mutual TLS"):
        cluster_gate(one_way, clustered=True)


def test_exposed_http_is_named_by_the_gate():
    posture = merge_posture([{"bus_auth": "enforce", "acl": True}, {"listeners": {"routes": "mtls"}}],
                            Settings(http_addr=EXPOSED, insecure_plaintext=True, **CLUSTERED))
    with pytest.raises(ConfigError) as e:
        cluster_gate(posture, clustered=True)
    msg = str(e.value)
    assert "the http listener is plaintext" in msg and "--http-tls-cert" in msg and "routes" not in msg


def test_a_plugin_can_weaken_a_listener_but_never_strengthen_it(unibus_plugin_manager):
    liar = Reports(listeners={"http": "mtls", "nats": "tls"})
    posture = compute_posture(Settings(http_addr=EXPOSED, insecure_plaintext=True), unibus_plugin_manager(liar))
    assert posture["listeners"]["http"] == "plaintext" and posture["listeners"]["nats"] == "loopback"
    odd = Reports(listeners={"nats": "encrypted-ish", "metrics": "loopback"})
    posture = compute_posture(Settings(), unibus_plugin_manager(odd))
    assert posture["listeners"]["nats"] == "plaintext" and posture["listeners"]["metrics"] == "loopback"
    assert posture["tls"] is False


def test_a_plugin_s_own_listener_outside_the_table_still_counts_for_tls(unibus_plugin_manager, caplog):
    """A plugin that opens a plaintext listener of its own and reports it under its own name: the
    report was dropped without a word and tls held (a plugin author's walkthrough). Fail closed."""
    import logging

    caplog.set_level(logging.WARNING, logger="unibus.posture")
    own = Reports(listeners={"badhealth": "plaintext"}, bogus=1)
    pm = unibus_plugin_manager(own, auth_enforce)
    posture = startup_posture(Settings(), pm)
    assert posture["tls"] is False and "badhealth" not in posture["listeners"]
    assert "posture key 'bogus' is not a posture fact" in caplog.text
    assert "listener 'badhealth' is not shown in the posture" in caplog.text
    odd = Reports(listeners={"badhealth": {"state": "tls"}})  # not a state at all: plaintext, and no TypeError
    assert compute_posture(Settings(), unibus_plugin_manager(odd))["tls"] is False
    fine = Reports(listeners={"badhealth": "loopback"})
    assert compute_posture(Settings(), unibus_plugin_manager(fine))["tls"] is True


def test_unclustered_routes_claims_are_ignored(unibus_plugin_manager):
    posture = compute_posture(Settings(), unibus_plugin_manager(Reports(listeners={"routes": "plaintext"})))
    assert posture["listeners"]["routes"] == "none" and posture["tls"] is True


# -- fail closed ------------------------------------------------------------------------


def test_enforce_needs_a_plugin_that_reports_bus_auth(unibus_plugin_manager):
    pm = unibus_plugin_manager(Reports(tls=True))
    with pytest.raises(ConfigError) as e:
        startup_posture(Settings(bus_auth="enforce"), pm)
    assert e.value.exit_code == 2 and "auth_enforce" in str(e.value) and "--bus-auth" in str(e.value)
    assert startup_posture(Settings(bus_auth="off"), pm)["bus_auth"] == "off"
    pm = unibus_plugin_manager(auth_enforce)
    require_reporters(Settings(), pm, [("auth_enforce", {"bus_auth": "enforce"})])
    assert startup_posture(Settings(), pm)["summary"] == "enforce+acl+tls"


def test_an_open_bus_reads_open_whatever_a_plugin_claims(unibus_plugin_manager):
    """Adversary: a third-party plugin that reports ``enforce``/``acl`` while auth_enforce is blocked
    (accepted with ``--bus-auth off``). Its claim made the open bus read ``enforce+acl+tls``, and a
    cluster node passed the gate with no authorization in nats.conf (a black-box test of the
    contract). ``--bus-auth`` and ``--nats-url`` are the core's flags: the core reports them."""
    liar = Reports(bus_auth="enforce", acl=True, tls=True)
    for settings, plugins in ((Settings(bus_auth="off"), [liar]),
                              (Settings(nats_url="nats://127.0.0.1:4222"), [liar, auth_enforce])):
        posture = startup_posture(settings, unibus_plugin_manager(*plugins))
        assert (posture["bus_auth"], posture["acl"], posture["summary"]) == ("off", False, "tls")
    clustered = Settings(bus_auth="off", cluster_name="c1", routes=("nats://127.0.0.2:6250",))
    with pytest.raises(ConfigError) as e:
        cluster_gate(merge_posture([{**liar.facts, "listeners": {"routes": "mtls"}}], clustered), clustered.clustered)
    assert e.value.exit_code == 2 and "bus_auth" in str(e.value) and "acl is false" in str(e.value)
    # the same plugin beside auth_enforce on an enforcing node changes nothing
    assert startup_posture(Settings(), unibus_plugin_manager(liar, auth_enforce))["summary"] == "enforce+acl+tls"


CLAIMS_ENFORCE = {"claims_enforce": '''
    from unibus import hookimpl

    PLUGIN_NAME = "claims_enforce"

    @hookimpl
    def posture(settings):
        return {"bus_auth": "enforce", "acl": True, "tls": True}
'''}


def test_a_blocked_auth_enforce_leaves_the_posture_off_and_the_warning_on(tmp_path):
    """``membershipd posture`` and ``serve`` with auth_enforce blocked and a plugin claiming its facts:
    the posture says off (exit 1), and the start still warns that the bus is open (the warning
    lived in auth_enforce, so blocking it silenced the most open setup there is)."""
    from helpers import plugin_modules

    from unibus.testing import MembershipdProcess, run_membershipd

    env = plugin_modules(tmp_path, CLAIMS_ENFORCE)
    args = ["--plugin", "claims_enforce", "--bus-auth", "off", "--disable-plugin", "auth_enforce"]
    proc = run_membershipd("posture", "--data-dir", str(tmp_path / "p"), *args, env=env)
    assert proc.returncode == 1, proc.stderr
    posture = json.loads(proc.stdout)
    assert (posture["bus_auth"], posture["acl"], posture["summary"]) == ("off", False, "tls")
    daemon = MembershipdProcess(tmp_path / "d", args, env=env).start()
    try:
        assert daemon.healthz()[1]["posture"]["bus_auth"] == "off"
        assert "--bus-auth off: the bus is open to any client that reaches the NATS port" in daemon.log_text()
    finally:
        daemon.stop()


IMPERSONATES = {"impersonates": '''
    from unibus import hookimpl

    PLUGIN_NAME = "auth_enforce"

    @hookimpl
    def posture(settings):
        return {"bus_auth": "enforce", "acl": True, "tls": True, "listeners": {"routes": "mtls"}}
'''}


@pytest.mark.parametrize("module, load", [("claims_enforce", "route_tls"), ("impersonates", "")],
                         ids=["auth_enforce-left-out", "registered-under-its-name"])
def test_only_the_built_in_auth_enforce_vouches_for_the_bus(tmp_path, module, load):
    """Adversary: a plugin that claims auth_enforce's facts while the built-in is left out
    (``UNIBUS_LOAD_PLUGINS``), or registers under its name (``PLUGIN_NAME``). Either made the
    default ``--bus-auth enforce`` read ``enforce+acl+tls`` with no authorization in nats.conf (a
    review): the name of a reporter proved nothing. The start is refused, naming auth_enforce."""
    from helpers import one_error_line, plugin_modules

    from unibus.testing import run_membershipd

    env = {**plugin_modules(tmp_path, {**CLAIMS_ENFORCE, **IMPERSONATES}), "UNIBUS_LOAD_PLUGINS": load}
    for command in ("posture", "serve"):
        proc = run_membershipd(command, "--data-dir", str(tmp_path / command), "--plugin", module, env=env)
        line = one_error_line(proc, 2, "--bus-auth enforce", "auth_enforce")
        if module == "impersonates":
            assert "not the built-in module unibus.plugins.auth_enforce" in line
        assert not (tmp_path / command).exists()
    # with the open bus asked for, the claims count for nothing (routes included), and a warning says so
    clustered = ["--cluster-name", "c1", "--routes", "nats://127.0.0.2:6250", "--cluster-pass-file",
                 str(tmp_path / "pass")]
    (tmp_path / "pass").write_text("a-route-password-long-enough\n")
    (tmp_path / "pass").chmod(0o600)
    proc = run_membershipd("posture", "--plugin", module, "--bus-auth", "off", *clustered, env=env)
    posture = json.loads(proc.stdout)
    assert proc.returncode == 1 and posture["summary"] == "open" and posture["listeners"]["routes"] == "plaintext", \
        (proc.stdout, proc.stderr)
    assert "posture fact bus_auth='enforce' ignored: only the built-in auth_enforce plugin reports it" in proc.stderr


RAISING_POSTURE = {"raising_posture": '''
    from unibus import hookimpl

    PLUGIN_NAME = "raising_posture"

    @hookimpl
    def posture(settings):
        raise RuntimeError("posture at start")
'''}


def test_a_posture_hook_that_raises_is_exit_2_on_posture(tmp_path):
    """``membershipd posture``'s exit 1 means "not enforce+acl+tls": a plugin whose posture hook
    raises is a refused configuration there (exit 2, naming the plugin), as a raising
    ``cli_options`` is, not an open posture (a plugin author's walk-through found exit 1)."""
    from helpers import one_error_line, plugin_modules

    from unibus.testing import run_membershipd

    env = plugin_modules(tmp_path, RAISING_POSTURE)
    proc = run_membershipd("posture", "--plugin", "raising_posture", "--bus-auth", "off", env=env)
    one_error_line(proc, 2, "plugin raising_posture", "posture", "posture at start")
    assert proc.stdout == ""
    serve = run_membershipd("serve", "--plugin", "raising_posture", "--bus-auth", "off", "--data-dir",
                            str(tmp_path / "d"), env=env)
    one_error_line(serve, 1, "plugin raising_posture", "posture at start")


def test_a_plaintext_nats_url_to_another_host_is_not_called_tls(tmp_path):
    """Adversary: a network attacker between membershipd and an external NATS (``--nats-url nats://...``)."""
    from unibus.cli import load_settings

    def posture(*args: str):
        settings, plugins = load_settings("posture", ["--data-dir", str(tmp_path / "d"), *args], env={})
        return startup_posture(settings, plugins)

    assert posture("--nats-url", "nats://127.0.0.1:4222")["tls"] is True  # loopback: nothing to protect
    with pytest.raises(ConfigError) as e:  # refused, naming the flag and the fix
        posture("--nats-url", "nats://192.0.2.1:4222")
    assert "--nats-url" in str(e.value) and "tls://" in str(e.value) and e.value.exit_code == 2
    doc = posture("--nats-url", "nats://192.0.2.1:4222", "--insecure-plaintext")
    assert doc["tls"] is False
    assert posture("--nats-url", "tls://192.0.2.1:4222")["tls"] is True
