"""The posture's facts hold in the nats.conf actually written, whatever a plugin's configure_nats did.

The posture (``tls``, ``listeners``) is computed from the flags, so the core
holds the config to them after every plugin ran (``unibus.natsconf.check_posture_facts``):
a plugin that removes or weakens the client or route TLS, moves a listener or
opens another one is refused with exit 2 and one line naming the key. Each
weakening below is a real plugin object running with the four built-in
plugins through ``nats_config``, as ``membershipd serve`` runs them; one real
``membershipd serve`` of a clustered node shows the refusal end to end. The
built-in plugins' own configs (single node, TLS node, clustered node with
route_tls) pass, and nats-server accepts them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from helpers import one_error_line, plugin_modules

from unibus import hookimpl
from unibus.cli import settings_for
from unibus.daemon import nats_config
from unibus.errors import ConfigError
from unibus.natsconf import check_config, write_config
from unibus.plugins import auth_enforce, blobstore, nats_monitor, route_tls
from unibus.servicekey import ensure_service_nkey
from unibus.supervisor import find_nats_server
from unibus.testing import free_port, make_plugin_manager, make_test_ca, make_test_cert, make_test_pki, run_membershipd

BUILT_INS = (auth_enforce, blobstore, nats_monitor, route_tls)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    route_ca = make_test_ca(d, "route-ca")
    client = make_test_pki(d / "client")
    other = make_test_cert(d / "client", "other-server", client.ca)
    node = make_test_cert(d, "n1", route_ca)
    pw = d / "cluster.pass"
    pw.write_text("correct-horse-route-pass\n")
    pw.chmod(0o600)
    return {"route_ca": route_ca, "client": client, "other": other, "node": node, "pass": pw}


def tls_args(pki) -> list[str]:
    client = pki["client"]
    return ["--tls-cert", str(client.server[0]), "--tls-key", str(client.server[1]), "--tls-ca", str(client.ca[0])]


def cluster_args(pki) -> list[str]:
    return ["--cluster-name", "c", "--cluster-addr", f"127.0.0.1:{free_port()}",
            "--routes", f"nats://127.0.0.1:{free_port()}", "--cluster-pass-file", str(pki["pass"]),
            "--route-tls-cert", str(pki["node"][0]), "--route-tls-key", str(pki["node"][1]),
            "--route-tls-ca", str(pki["route_ca"][0]), "--kv-replicas", "3"]


class Weakener:
    """A plugin whose configure_nats runs after the built-ins' (trylast) and changes the config."""

    PLUGIN_NAME = "weakener"

    def __init__(self, change) -> None:
        self.change = change

    @hookimpl(trylast=True)
    def configure_nats(self, settings, config: dict[str, Any]) -> None:
        self.change(config)


def build(tmp_path: Path, args: list[str], *extra: Any) -> dict[str, Any]:
    """``nats_config`` of ``membershipd serve ARGS`` with the built-ins and ``extra`` plugins."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    ensure_service_nkey(data)
    plugins = make_plugin_manager(*BUILT_INS, *extra)
    argv = ["--data-dir", str(data), "--nats-addr", f"127.0.0.1:{free_port()}",
            "--http-addr", f"127.0.0.1:{free_port()}", *args]
    return nats_config(settings_for("serve", argv, plugins, env={}), plugins)


def accepted_by_nats_server(config: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "check" / "nats.conf"
    path.parent.mkdir(mode=0o700)
    write_config(config, path)
    check_config(find_nats_server(), path)


def refused(tmp_path: Path, args: list[str], change, key: str) -> str:
    with pytest.raises(ConfigError) as info:
        build(tmp_path, args, Weakener(change))
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in message
    assert message.startswith(f"nats.conf: {key} "), message
    assert "configure_nats" in message and "--disable-plugin" in message
    assert "correct-horse" not in message
    return message


# -- the built-in configs pass ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["single", "tls", "clustered", "clustered-tls", "monitor"])
def test_the_built_in_plugins_configs_pass(tmp_path, pki, monkeypatch, kind):
    args = {"single": [], "tls": tls_args(pki), "clustered": cluster_args(pki),
            "clustered-tls": [*cluster_args(pki), *tls_args(pki)], "monitor": []}[kind]
    if kind == "monitor":
        monkeypatch.setenv(nats_monitor.ENV_MONITOR, "1")
        args = ["--nats-monitor-port", str(free_port())]
    config = build(tmp_path, args)
    assert ("tls" in config) == kind.endswith("tls")
    assert ("cluster" in config) == kind.startswith("clustered")
    if kind.startswith("clustered"):
        assert config["cluster"]["tls"]["verify"] is True
    accepted_by_nats_server(config, tmp_path)


# -- every weakening is refused, naming the key --------------------------------------------


def _pop(*path: str):
    def change(config):
        block = config
        for key in path[:-1]:
            block = block[key]
        del block[path[-1]]
    return change


def _set(value: Any, *path: str):
    def change(config):
        block = config
        for key in path[:-1]:
            block = block[key]
        block[path[-1]] = copy.deepcopy(value)
    return change


ROUTES = {
    "remove-cluster-tls": (_pop("cluster", "tls"), "cluster.tls"),
    "verify-false": (_set(False, "cluster", "tls", "verify"), "cluster.tls.verify"),
    "no-verify": (_pop("cluster", "tls", "verify"), "cluster.tls.verify"),
    "no-ca-file": (_pop("cluster", "tls", "ca_file"), "cluster.tls.ca_file"),
    "insecure": (_set(True, "cluster", "tls", "insecure"), "cluster.tls.insecure"),
    "second-spelling": (_set({}, "cluster", "TLS"), "cluster.tls"),
    "verify-second-spelling": (_set(False, "cluster", "tls", "Verify"), "cluster.tls.Verify"),
    "listen": (_set("0.0.0.0:6250", "cluster", "listen"), "cluster.listen"),
    "net": (_set("0.0.0.0", "cluster", "net"), "cluster.net"),
    "host": (_set("0.0.0.0", "cluster", "host"), "cluster.host"),
    "port": (_set(1, "cluster", "port"), "cluster.port"),
    "no-cluster": (_pop("cluster"), "cluster"),
}


@pytest.mark.parametrize("attack", list(ROUTES))
def test_a_clustered_nodes_routes_stay_on_mutual_tls(tmp_path, pki, attack):
    change, key = ROUTES[attack]
    refused(tmp_path, cluster_args(pki), change, key)


def test_the_route_ca_cannot_be_swapped_for_the_client_ca(tmp_path, pki):
    client_ca = str(pki["client"].ca[0])
    message = refused(tmp_path, [*cluster_args(pki), *tls_args(pki)], _set(client_ca, "cluster", "tls", "ca_file"),
                      "cluster.tls.ca_file")
    assert "--route-tls-ca" in message


CLIENT_TLS = {
    "remove-tls": (_pop("tls"), "tls"),
    "second-spelling": (_set({}, "TLS"), "tls"),
    "handshake-first-false": (_set(False, "tls", "handshake_first"), "tls.handshake_first"),
    "handshake-first-auto": (_set("auto", "tls", "handshake_first"), "tls.handshake_first"),
    "handshake-first-alias": (_set("300ms", "tls", "first"), "tls.first"),
    "verify-false": (_set(False, "tls", "verify"), "tls.verify"),
    "no-ca-file": (_pop("tls", "ca_file"), "tls.ca_file"),
    "insecure": (_set(True, "tls", "insecure"), "tls.insecure"),
    "cert-second-spelling": (_set("/tmp/other.crt", "tls", "Cert_File"), "tls.Cert_File"),
    "allow-non-tls": (_set(True, "allow_non_tls"), "allow_non_tls"),
}


@pytest.mark.parametrize("attack", list(CLIENT_TLS))
def test_the_client_listeners_tls_stays(tmp_path, pki, attack):
    change, key = CLIENT_TLS[attack]
    refused(tmp_path, tls_args(pki), change, key)


def test_the_client_certificate_cannot_be_swapped(tmp_path, pki):
    refused(tmp_path, tls_args(pki), _set(str(pki["other"][0]), "tls", "cert_file"), "tls.cert_file")


# nats-server reads every spelling below (measured with `nats-server -t`; core/natsconf.py lists them)
LISTENERS = {
    "websocket-no-tls": ("websocket", {"port": 8080, "no_tls": True}),
    "ws": ("WS", {"port": 8080, "no_tls": True}),
    "mqtt": ("mqtt", {"port": 1883}),
    "leafnodes": ("leafnodes", {"port": 7422}),
    "leaf": ("Leaf", {"port": 7422}),
    "gateway": ("gateway", {"name": "g", "port": 7522}),
    "prof_port": ("prof_port", 6060),
    "PROF_PORT": ("PROF_PORT", 6060),
    "listen": ("listen", "0.0.0.0:4222"),
    "net": ("net", "0.0.0.0"),
    "HOST": ("HOST", "0.0.0.0"),
    "host": ("host", "0.0.0.0"),
    "port": ("port", 1),
    "cluster-on-a-single-node": ("cluster", {"name": "c", "port": 6250}),
}


@pytest.mark.parametrize("tls", [False, True], ids=["loopback", "tls"])
@pytest.mark.parametrize("attack", list(LISTENERS))
def test_no_listener_moves_or_appears(tmp_path, pki, attack, tls):
    key, value = LISTENERS[attack]
    refused(tmp_path, tls_args(pki) if tls else [], _set(value, key), key)


def test_removing_the_client_listeners_host_is_refused(tmp_path):
    refused(tmp_path, [], _pop("host"), "host")


# -- harmless additions stay allowed ------------------------------------------------------------


def test_harmless_additions_pass(tmp_path, pki):
    def add(config):
        config["tls"].update(timeout=5, min_version="1.3")
        config["cluster"]["tls"]["connection_rate_limit"] = 100
        config["cluster"]["pool_size"] = 2
        config["max_payload"] = 64 * 1024
        config["allow_non_tls"] = False

    config = build(tmp_path, [*cluster_args(pki), *tls_args(pki)], Weakener(add))
    assert config["tls"]["min_version"] == "1.3" and config["max_payload"] == 64 * 1024
    accepted_by_nats_server(config, tmp_path)


def test_tls_the_flags_did_not_ask_for_may_be_added(tmp_path, pki):
    """A loopback listener the posture calls ``loopback`` only gets stronger."""
    server = pki["client"].server

    def add(config):
        config["tls"] = {"cert_file": str(server[0]), "key_file": str(server[1]), "handshake_first": True}

    config = build(tmp_path, [], Weakener(add))
    accepted_by_nats_server(config, tmp_path)


# -- end to end ---------------------------------------------------------------------------------


def test_serve_refuses_a_plugin_that_removes_route_tls(tmp_path, pki):
    """The red team's case: route_tls wrote cluster.tls, a plugin removed it; the node would have
    formed a plaintext route while its posture said routes: mtls. Now nothing starts."""
    (tmp_path / "mods").mkdir()
    env = plugin_modules(tmp_path / "mods", {"strip_route_tls": '''
        from unibus import hookimpl

        PLUGIN_NAME = "strip_route_tls"

        @hookimpl(trylast=True)
        def configure_nats(settings, config):
            config["cluster"].pop("tls", None)
    '''})
    data = tmp_path / "data"
    proc = run_membershipd("serve", "--data-dir", str(data), "--plugin", "strip_route_tls",
                           "--http-addr", f"127.0.0.1:{free_port()}", "--nats-addr", f"127.0.0.1:{free_port()}",
                           "--nats-monitor-port", str(free_port()), *cluster_args(pki), env=env, timeout=60)
    one_error_line(proc, 2, "nats.conf: cluster.tls is missing", "configure_nats", "--disable-plugin")
    assert not (data / "nats.conf").exists()
    assert "correct-horse" not in proc.stderr


def test_a_cluster_config_is_never_built_without_its_route_password(tmp_path):
    """serve refuses a cluster node without a route password after the cluster gate; the config
    itself refuses it too, so no caller of nats_config gets routes without authorization."""
    with pytest.raises(ConfigError, match="--cluster-name needs a route password"):
        build(tmp_path, ["--cluster-name", "c", "--routes", f"nats://127.0.0.1:{free_port()}"])
