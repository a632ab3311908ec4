"""route_tls: what it adds to nats.conf, and every certificate it refuses."""

from __future__ import annotations

import json
import subprocess

import pytest

from unibus.testing import free_port, make_test_ca, make_test_cert, run_membershipd


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    route_ca = make_test_ca(d, "route-ca")
    client_ca = make_test_ca(d, "client-ca")
    node = make_test_cert(d, "n1", route_ca)
    client = make_test_cert(d, "client", client_ca)
    pw = tmp_path / "cluster.pass"
    pw.write_text("correct-horse-route-pass\n")
    pw.chmod(0o600)
    return {"dir": d, "route_ca": route_ca, "client_ca": client_ca, "node": node, "client": client, "pass": pw}


def cluster_args(pki, node=None, ca=None):
    node = node or pki["node"]
    return ["--cluster-name", "c", "--cluster-addr", f"127.0.0.1:{free_port()}",
            "--routes", f"nats://127.0.0.1:{free_port()}", "--cluster-pass-file", str(pki["pass"]),
            "--route-tls-cert", str(node[0]), "--route-tls-key", str(node[1]),
            "--route-tls-ca", str((ca or pki["route_ca"])[0])]


def posture(*args):
    return run_membershipd("posture", *args)


def one_line(proc, code, needle):
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_good_route_tls_makes_the_full_posture(pki):
    proc = posture(*cluster_args(pki))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "bus_auth": "enforce", "acl": True, "tls": True, "summary": "enforce+acl+tls",
        "listeners": {"http": "loopback", "nats": "loopback", "routes": "mtls", "metrics": "none"},
    }
    assert "correct-horse" not in proc.stdout + proc.stderr


def test_config_has_verified_route_tls(pki, tmp_path):
    from unibus.cli import load_settings
    from unibus.daemon import nats_config
    from unibus.natsconf import check_config, write_config
    from unibus.servicekey import ensure_service_nkey
    from unibus.store.db import migrate
    from unibus.supervisor import find_nats_server

    data = tmp_path / "d"
    data.mkdir()
    migrate(data / "membershipd.db")
    ensure_service_nkey(data)
    settings, plugins = load_settings("serve", ["--data-dir", str(data), *cluster_args(pki)], env={})
    config = nats_config(settings, plugins)
    tls = config["cluster"]["tls"]
    assert tls["verify"] is True and tls["ca_file"] == str(pki["route_ca"][0].resolve())
    assert config["cluster"]["authorization"]["password"] == "correct-horse-route-pass"
    assert all(r.startswith("nats-route://route:correct-horse-route-pass@") for r in config["cluster"]["routes"])
    path = tmp_path / "nats.conf"
    write_config(config, path)
    check_config(find_nats_server(), path)
    # the core's certificate expiry gauge finds the route files where this plugin put them
    from unibus.certexpiry import nats_tls_files

    assert sorted(nats_tls_files(config)) == [("route", "ca", pki["route_ca"][0].resolve()),
                                              ("route", "cert", pki["node"][0].resolve())]


@pytest.mark.parametrize("case", ["ca-is-client-ca", "route-ca-bundle-holds-the-client-ca", "route-ca-given-the-client-ca", "client-cert-from-route-ca",
                                  "https-cert-from-route-ca",
                                  "metrics-cert-from-route-ca", "expired",
                                  "not-yet-valid", "other-ca", "no-client-auth", "wrong-key", "key-readable", "partial"])
def test_refusals(pki, case):
    d = pki["dir"]
    args = cluster_args(pki)
    extra: list[str] = []
    needle = {"ca-is-client-ca": "client CA",
              # a review: a bundle [route CA, client CA] passed (only its first was checked), and a node's
              # server.crt then joined the cluster as a route
              "route-ca-bundle-holds-the-client-ca": "--route-tls-ca is the client CA (--tls-ca), or holds it",
              # no --tls-ca: a walk-through was told --tls-cert was wrong, when --route-tls-ca was
              "route-ca-given-the-client-ca": f"--route-tls-ca: {pki['client_ca'][0]} issued --tls-cert, not "
                                              "--route-tls-cert: is it the client CA? give the route CA",
              "client-cert-from-route-ca": "--tls-cert is issued by the route CA",
              "https-cert-from-route-ca": "--http-tls-cert is issued by the route CA",
              "metrics-cert-from-route-ca": "--metrics-tls-cert is issued by the route CA",
              "expired": "expired", "not-yet-valid": "not valid before", "other-ca": "not signed by the route CA",
              "no-client-auth": "clientAuth", "wrong-key": "does not match", "key-readable": "chmod 600",
              "partial": "--route-tls-ca"}[case]
    if case == "ca-is-client-ca":
        extra = ["--tls-cert", str(pki["client"][0]), "--tls-key", str(pki["client"][1]),
                 "--tls-ca", str(pki["route_ca"][0])]
    elif case == "route-ca-bundle-holds-the-client-ca":
        bundle = d / "route-bundle.crt"
        bundle.write_bytes(pki["route_ca"][0].read_bytes() + pki["client_ca"][0].read_bytes())
        args = cluster_args(pki, ca=(bundle,))
        extra = ["--tls-cert", str(pki["client"][0]), "--tls-key", str(pki["client"][1]),
                 "--tls-ca", str(pki["client_ca"][0])]
    elif case == "route-ca-given-the-client-ca":
        args = cluster_args(pki, ca=pki["client_ca"])
        extra = ["--tls-cert", str(pki["client"][0]), "--tls-key", str(pki["client"][1])]
    elif case == "client-cert-from-route-ca":
        bad_client = make_test_cert(d, "client-from-route", pki["route_ca"])
        extra = ["--tls-cert", str(bad_client[0]), "--tls-key", str(bad_client[1]), "--tls-ca", str(pki["client_ca"][0])]
    elif case == "https-cert-from-route-ca":
        https = make_test_cert(d, "https-from-route", pki["route_ca"])
        extra = ["--http-tls-cert", str(https[0]), "--http-tls-key", str(https[1])]
    elif case == "metrics-cert-from-route-ca":
        metrics = make_test_cert(d, "metrics-from-route", pki["route_ca"])
        extra = ["--metrics-addr", "127.0.0.1:9470", "--metrics-tls-cert", str(metrics[0]),
                 "--metrics-tls-key", str(metrics[1])]
    elif case == "expired":
        args = cluster_args(pki, node=make_test_cert(d, "old", pki["route_ca"], valid_from_days=-60, valid_for_days=30))
    elif case == "not-yet-valid":
        args = cluster_args(pki, node=make_test_cert(d, "future", pki["route_ca"], valid_from_days=10))
    elif case == "other-ca":
        args = cluster_args(pki, node=make_test_cert(d, "stranger", make_test_ca(d, "other-ca")))
    elif case == "no-client-auth":
        args = cluster_args(pki, node=make_test_cert(d, "serveronly", pki["route_ca"], client_auth=False))
    elif case == "wrong-key":
        other = make_test_cert(d, "other", pki["route_ca"])
        args = cluster_args(pki)
        args[args.index("--route-tls-key") + 1] = str(other[1])
    elif case == "key-readable":
        pki["node"][1].chmod(0o644)
    elif case == "partial":
        args = args[: args.index("--route-tls-ca")]
    for command in ("posture", "serve"):
        proc = run_membershipd(command, "--data-dir", str(d / "data"), *args, *extra)
        one_line(proc, 2, needle)
    assert not (d / "data").exists()


@pytest.mark.parametrize("case", ["bus-auth-off", "no-route-tls", "password-in-routes"])
def test_cluster_gate(pki, case):
    args = cluster_args(pki)
    needle = {"bus-auth-off": "bus_auth is not enforce", "no-route-tls": "tls is false",
              "password-in-routes": "--routes"}[case]
    if case == "bus-auth-off":
        args += ["--bus-auth", "off"]
    elif case == "no-route-tls":
        args = args[: args.index("--route-tls-cert")]
    else:
        args[args.index("--routes") + 1] = "nats://route:correct-horse-route-pass@127.0.0.1:6250"
    proc = run_membershipd("serve", "--data-dir", str(pki["dir"] / "data"), *args)
    one_line(proc, 2, needle)
    assert "correct-horse" not in proc.stderr
    if case != "password-in-routes":
        assert run_membershipd("posture", *args).returncode == 1


def test_generate_cluster_certs_script(tmp_path):
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[3] / "deploy" / "cluster" / "generate-cluster-certs.sh"
    out = tmp_path / "pki"
    proc = subprocess.run(["bash", str(script), str(out), "n1=127.0.0.1,n1.local", "n2=127.0.0.2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("route-ca.key", "n1.key", "n2.key"):
        assert (out / name).stat().st_mode & 0o077 == 0
    pw = tmp_path / "pass"
    pw.write_text("x" * 24)
    pw.chmod(0o600)
    ok = run_membershipd("posture", "--cluster-name", "c", "--cluster-pass-file", str(pw),
                         "--routes", "nats://127.0.0.2:6250", "--route-tls-cert", str(out / "n1.crt"),
                         "--route-tls-key", str(out / "n1.key"), "--route-tls-ca", str(out / "route-ca.crt"))
    assert ok.returncode == 0, ok.stderr
    # the same node without its route password: the gate passes, and the configuration is refused
    no_password = run_membershipd("posture", "--cluster-name", "c", "--routes", "nats://127.0.0.2:6250",
                                  "--route-tls-cert", str(out / "n1.crt"), "--route-tls-key", str(out / "n1.key"),
                                  "--route-tls-ca", str(out / "route-ca.crt"))
    assert no_password.returncode == 2 and no_password.stdout == ""
    assert no_password.stderr.strip().splitlines() == [
        "membershipd: error: --cluster-name needs a route password: --cluster-pass-file PATH or UNIBUS_CLUSTER_PASS"]
    bad = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def test_routes_are_reported_only_on_a_clustered_node(pki):
    """An unclustered node has no routes: route_tls must not drag its tls down, whatever flags it got."""
    import unibus.plugins.route_tls as route_tls
    from unibus.cli import load_settings

    single, _ = load_settings("posture", [], env={})
    assert route_tls.posture(single.for_plugins()) == {}
    clustered, _ = load_settings("posture", cluster_args(pki), env={})
    assert route_tls.posture(clustered.for_plugins()) == {"tls": True, "listeners": {"routes": "mtls"}}
    plain = cluster_args(pki)
    plain = plain[: plain.index("--route-tls-cert")]
    clustered_plain, _ = load_settings("posture", plain, env={})
    assert route_tls.posture(clustered_plain.for_plugins()) == {"tls": False, "listeners": {"routes": "plaintext"}}


def test_a_cluster_node_without_routes_is_refused_naming_them(pki, tmp_path):
    """The docs said `--cluster-name` without `--routes` was the first node of a new cluster; nats-server
    starts no JetStream in a cluster without routes, and a walk-through of the runbook got exit 1
    after the start, naming nothing to change. serve refuses it before anything starts; posture,
    whose exit says the posture, warns."""
    args = [a for a in cluster_args(pki)]
    at = args.index("--routes")
    del args[at:at + 2]
    data_dir = tmp_path / "n1"
    serve = run_membershipd("serve", "--data-dir", str(data_dir), "--http-addr", f"127.0.0.1:{free_port()}",
                            "--nats-addr", f"127.0.0.1:{free_port()}", *args, timeout=60)
    assert serve.returncode == 2, serve.stderr
    assert serve.stderr.strip().splitlines() == [
        "membershipd: error: --cluster-name needs --routes: the route URLs of the other nodes (every node lists the "
        "others, the first one too: nats-server starts no JetStream in a cluster without routes)"]
    assert not (data_dir / "nats.conf").exists()
    checked = posture(*args)
    assert checked.returncode == 0 and json.loads(checked.stdout)["summary"] == "enforce+acl+tls", checked.stderr
    assert "warning: --cluster-name needs --routes" in checked.stderr and "serve refuses it" in checked.stderr
