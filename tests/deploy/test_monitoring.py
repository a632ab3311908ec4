"""deploy/monitoring/: the alert rules, their unit tests, the example Prometheus config and the Grafana dashboard.

Two checks that need nothing but Python: the files parse, and every PromQL
expression in them names only metrics a real membershipd exports (scraped
here from a daemon that served signed requests and ran the built-in plugins;
cluster-only metrics from the collector with a cluster node's prober), plus
Prometheus's own ``up``. Then promtool, where installed (.ci/run installs it
from Debian's prometheus package): ``check rules``, ``check config`` and the
alerts' unit tests in tests/deploy/monitoring/unibus-alerts.test.yml.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from unibus.bus import Bus
from unibus.client import UnibusClient
from unibus.client.keys import generate_identity
from unibus.health import HealthProber
from unibus.metrics import Metrics
from helpers import require_tool
from unibus.testing import MembershipdProcess, bootstrap_member, free_port

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "unibus-alerts.yml"
DASHBOARD = MONITORING / "unibus-dashboard.json"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
RULE_TESTS = Path(__file__).parent / "monitoring" / "unibus-alerts.test.yml"

#: Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels, ranges and strings left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        following = text[m.end():].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_the_expression_parser_finds_what_it_should():
    assert metric_names('sum by (instance) (rate(unibus_x_total{status=~"5.."}[5m])) / sum(rate(b[1m])) > 0.05') \
        == {"unibus_x_total", "b"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[10m]))) > 1") == {"h_bucket"}
    assert metric_names('up{job="unibus"} == 0 and on(instance) y') == {"up", "y"}


def exported_by_a_cluster_node() -> set[str]:
    """What a cluster node exports beyond a single node: read from the collector itself."""

    prober = HealthProber(Bus("nats://127.0.0.1:1"), clustered=True)  # never probed: routes 0, still exported
    metrics = Metrics(process=False)
    metrics.health = prober
    text = metrics.registry.collect()
    return {s.name for family in text for s in family.samples}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every sample name a real daemon exports once it has served signed requests."""
    import asyncio

    root = tmp_path_factory.mktemp("monitoring")
    alice = generate_identity("alice")
    bootstrap_member(root / "data", alice, "admin")
    port = free_port()
    daemon = MembershipdProcess(root / "data", ["--metrics-addr", f"127.0.0.1:{port}"]).start()
    try:
        async def use() -> None:
            async with UnibusClient(daemon.base_url, alice) as admin:
                room = (await admin.create_room("dash"))["room_id"]
                await admin.get_room(room)

        asyncio.run(use())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        daemon.stop()
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    return names | exported_by_a_cluster_node() | exported_with_tls()


def exported_with_tls() -> set[str]:
    """What a node with TLS files exports beyond one without (tests/core/test_cert_expiry.py scrapes it)."""
    from unibus.certexpiry import CertificateExpiry

    metrics = Metrics(process=False)
    metrics.certificates = CertificateExpiry()
    metrics.certificates.expiry[("http", "cert")] = 1.0
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] if p["type"] != "row" for t in p["targets"]]


def test_the_rules_are_complete():
    found = rules()
    names = [r["alert"] for r in found]
    assert len(names) == len(set(names))
    for rule in found:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    # what docs/operations.md promises to alert on
    for alert in ("UnibusNodeDown", "UnibusNodeDegraded", "UnibusSignatureRejectionSpike", "UnibusNonceClaimFailures",
                  "UnibusBusChangeNotEnforced", "UnibusBusChangesUnconfirmed", "UnibusNatsServerRestarted",
                  "UnibusHTTP5xx", "UnibusClusterRoutesLost", "UnibusClusterIsolated", "UnibusCertificateExpiresSoon",
                  "UnibusCertificateExpired"):
        assert alert in names, alert


def test_every_rule_and_panel_names_metrics_the_daemon_exports(exported):
    exprs = [(r["alert"], r["expr"]) for r in rules()] + dashboard_exprs()
    assert len(exprs) > 30
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, (where, expr)
        unknown = names - exported - PROMETHEUS_OWN
        assert not unknown, f"{where}: {sorted(unknown)} not exported by membershipd ({expr})"


def test_the_dashboard_is_importable():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"]), panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_the_example_config_scrapes_the_units_address():
    doc = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert doc["rule_files"] == ["unibus-alerts.yml"]
    job = doc["scrape_configs"][0]
    assert job["job_name"] == "unibus"  # what UnibusNodeDown selects
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9470"]


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.usefixtures("promtool_installed")


@pytest.fixture
def promtool_installed() -> None:
    require_tool(None if PROMTOOL else "promtool not installed (.ci/run installs it from Debian's prometheus "
                 "package); the rules are still parsed and checked against a real scrape above")


@needs_promtool
def test_promtool_checks_the_rules_and_the_config():
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROMETHEUS_CONFIG)]):
        r = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SUCCESS" in r.stdout + r.stderr


@needs_promtool
def test_the_alerts_unit_tests_pass():
    r = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=60,
                       cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_catches_a_broken_rule(tmp_path):
    """Negative control: the checks above would see a mistake."""
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("unibus_healthy == 0", "unibus_healthy == ", 1))
    r = subprocess.run([PROMTOOL, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
