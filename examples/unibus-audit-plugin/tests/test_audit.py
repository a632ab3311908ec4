"""Tests for the audit plugin, written with unibus's own testing kit.

``unibus_app`` (from ``unibus.testing``, a pytest plugin installed with unibus)
runs a real membershipd in this process with only this plugin: nothing to
install for those. The last test runs the installed distribution
(``pip install -e .``) as membershipd and the client find it.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
import unibus_audit_plugin
from unibus.client.keys import generate_identity
from unibus.testing import bootstrap_member


@pytest.fixture
def audited(unibus_app):
    return unibus_app(plugins=[unibus_audit_plugin])


def events(app, **query):
    q = "&".join(f"{k}={v}" for k, v in query.items())
    status, body = app.admin.get("/v1/plugins/audit/events" + (f"?{q}" if q else ""))
    assert status == 200, body
    return body["events"]


def test_every_membership_change_is_recorded_with_its_actor(audited):
    bob = audited.member("bob")
    status, room = bob.post("/v1/rooms", {"name": "ops"})
    assert status == 201
    assert audited.admin.put(f"/v1/rooms/{room['room_id']}/members/admin")[0] == 200
    assert audited.admin.delete("/v1/members/bob")[0] == 204
    got = [(e["kind"], e["actor"], e["origin"], e["handle"]) for e in events(audited)]
    assert got == [("member_added", "admin", "local", "bob"), ("room_created", "bob", "local", "bob"),
                   ("room_member_added", "admin", "local", "admin"), ("member_deleted", "admin", "local", "bob")]
    records = events(audited)
    assert [e["id"] for e in records] == [1, 2, 3, 4]
    assert [e["seq"] for e in records] == sorted(e["seq"] for e in records)
    assert records[3]["before"]["handle"] == "bob" and records[3]["after"] is None
    assert events(audited, after=2, limit=1) == [records[2]]
    assert audited.anonymous.get("/healthz")[1]["audit"] == {"events": 4}
    assert audited.metric("unibus_audit_events_total", {"kind": "member_added"}) == 1
    assert audited.metric("unibus_audit_events_total", {"kind": "member_deleted"}) == 1


def test_only_admins_read_the_audit_log(audited):
    carol = audited.member("carol")
    status, problem = carol.get("/v1/plugins/audit/events")
    assert status == 403 and problem["detail"] == "this action needs the admin role"
    assert audited.anonymous.get("/v1/plugins/audit/events")[0] == 401
    audited.admin.delete("/v1/members/carol")
    assert carol.get("/v1/plugins/audit/events")[0] == 401  # a removed member is nobody
    status, problem = audited.admin.get("/v1/plugins/audit/events?limit=0")
    assert status == 422 and "limit" in problem["detail"]


def test_the_file_is_private(audited):
    audited.member("dave")
    path = audited.data_dir / "plugins" / "audit" / "events.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    [line] = path.read_text().splitlines()
    assert json.loads(line)["handle"] == "dave"


def test_an_offline_member_add_is_recorded_at_sighup(audited):
    bootstrap_member(audited.data_dir, generate_identity("erin"))
    audited.reload()  # what SIGHUP does
    [event] = events(audited)
    assert (event["kind"], event["actor"], event["origin"], event["handle"]) == (
        "member_added", None, "offline", "erin")


def test_unibus_audit_tail(audited, capsys):
    for name in ("f1", "f2", "f3"):
        audited.member(name)
    code, out = audited.client_command(audited.admin, "audit", "tail", "--limit", "2", plugins=[unibus_audit_plugin])
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert "member_added\tf2\tby admin (local)" in lines[0] and "f3" in lines[1]
    code, out = audited.client_command(audited.admin, "audit", "tail", "--json", plugins=[unibus_audit_plugin])
    assert code == 0 and [json.loads(x)["handle"] for x in out.splitlines()] == ["f1", "f2", "f3"]
    code, _ = audited.client_command(audited.admin, "audit", "tail", "--limit", "0", plugins=[unibus_audit_plugin])
    assert code == 2
    assert "--limit: must be a whole number from 1 to 1000" in capsys.readouterr().err
    carol = audited.member("carol")
    code, out = audited.client_command(carol, "audit", "tail", plugins=[unibus_audit_plugin])
    assert code == 1 and out == ""  # refused by the server: not an admin


def test_installed_it_is_found_by_membershipd_and_the_client() -> None:
    res = subprocess.run([sys.executable, "-m", "unibus.cli", "plugins", "--json"],
                         capture_output=True, text=True, check=True)
    [audit] = [p for p in json.loads(res.stdout) if p["name"] == "audit"]
    assert audit == {"name": "audit", "distribution": "unibus-audit-plugin", "version": "0.1.0",
                     "hooks": ["client_commands", "healthz_fields", "shutdown", "startup", "store_changed"]}
    helped = subprocess.run([sys.executable, "-m", "unibus.client.cli", "audit", "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "tail" in helped.stdout
