"""membershipd's commands and its refusals: one line, the right exit code, nothing left running."""

from __future__ import annotations

import json
import socket
import sqlite3
import stat

import pytest

from unibus.client.keys import generate_identity
from unibus.testing import free_port, nats_server_pids, run_membershipd, run_membershipd_to_full_disk

BUILTINS = {"nats_monitor", "auth_enforce", "route_tls", "blobstore"}


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    if code == 2:  # and nothing else: no log line of a start that never began (a walk-through of the
        # docs saw "allocator: …" and "stopped in 0.0 s" above a refusal); argparse's usage line is the
        # one other. (A runtime failure, exit 1, comes after the start's log lines.)
        usage = [line for line in proc.stderr.splitlines() if line.startswith("usage: ")]
        assert proc.stderr.strip().splitlines() == usage + errors, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_version():
    proc = run_membershipd("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == "membershipd 0.12.0"


def test_plugins_json_lists_the_builtins():
    proc = run_membershipd("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {p["name"]: p for p in json.loads(proc.stdout)}
    assert BUILTINS <= set(listed)
    for name in BUILTINS:
        assert listed[name]["distribution"] == "unibus"
        assert listed[name]["version"] == "0.12.0"
        assert listed[name]["hooks"]
    assert "configure_nats" in listed["nats_monitor"]["hooks"]


def test_plugins_text_and_disable():
    proc = run_membershipd("plugins", "--disable-plugin", "blobstore")
    assert proc.returncode == 0
    assert "nats_monitor" in proc.stdout and "blocked: blobstore" in proc.stdout
    assert not any(line.startswith("blobstore") for line in proc.stdout.splitlines())


def test_migrate_creates_a_private_db_and_is_idempotent(tmp_path):
    first = run_membershipd("migrate", "--data-dir", str(tmp_path / "d"))
    assert first.returncode == 0, first.stderr
    db = tmp_path / "d" / "membershipd.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with sqlite3.connect(db) as conn:
        assert conn.execute("select version_num from alembic_version").fetchone()[0]
    second = run_membershipd("migrate", env={"UNIBUS_DATA_DIR": str(tmp_path / "d")})
    assert second.returncode == 0 and "already at revision" in second.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--no-such-flag"], "--no-such-flag"),
        (["--http-addr", "localhost"], "--http-addr"),
        (["--nats-addr", "127.0.0.1:99999"], "--nats-addr"),
        (["--bus-auth", "sometimes"], "--bus-auth"),
        (["--kv-replicas", "3"], "--kv-replicas"),
        (["--nats-server-bin", "/nonexistent/nats-server"], "--nats-server-bin"),
        (["--disable-plugin", "nope"], "--disable-plugin"),
        (["--disable-plugin", "auth_enforce"], "--bus-auth off"),
        (["--disable-plugin", "nats_monitor", "--nats-monitor-port", "9999"], "nats_monitor"),
        (["--routes", "nats://u:p@127.0.0.1:6250", "--cluster-name", "c"], "--routes"),
        # a red team's: a password in a query was quoted, digits that are not ASCII were read as a
        # port, an empty value took the default, a port out of range failed only once started
        (["--routes", "nats://127.0.0.1:6250/?password=Hunter2", "--cluster-name", "c"], "--routes"),
        (["--nats-url", "nats://127.0.0.1:4222/?pass=Hunter2"], "no path, query or fragment"),
        (["--nats-url", "nats://127.0.0.1:99999"], "the port must be a number from 1 to 65535"),
        (["--http-addr", "127.0.0.1:2\u0660\u0661\u0665\u0663"], "--http-addr"),
        (["--auth-skew="], "--auth-skew: give a value"),
        (["--http-addr", ""], "--http-addr: give a value"),
        (["--kv-replicas", "\u0663"], "--kv-replicas"),  # a review's: the digits of other scripts
        (["--nats-url", "nats://127.0.0.1:4222;password=Hunter2"], "--nats-url"),
        # an audit: enforcement asked for in so many words, on a server membershipd does not configure
        (["--nats-url", "nats://127.0.0.1:4222", "--bus-auth", "enforce"], "--bus-auth enforce: membershipd cannot"),
        (["--bus-auth=enforce", "--nats-url", "nats://127.0.0.1:4222"], "--nats-url"),
        # a review: the open bus's warning, now the core's, came before the refusal's one line
        (["--bus-auth", "off", "--nats-server-bin", "/nonexistent/nats-server"], "--nats-server-bin"),
        (["--bus-auth", "off", "--insecure-plaintext", "--http-addr", "0.0.0.0:1",
          "--nats-server-bin", "/nonexistent/nats-server"], "--nats-server-bin"),
    ],
)
def test_serve_refusals_exit_2(tmp_path, args, needle):
    proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), *args)
    assert_one_line_error(proc, 2, needle)
    assert "Hunter2" not in proc.stderr
    assert not nats_server_pids(tmp_path)
    assert not (tmp_path / "d" / "membershipd.db").exists()  # refused before anything was made


def test_unknown_command():
    proc = run_membershipd("frobnicate")
    assert_one_line_error(proc, 2, "frobnicate")


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_membershipd("serve", "--data-dir", str(blocker / "sub"), "--http-addr", f"127.0.0.1:{free_port()}",
                           "--nats-addr", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, 2, "--data-dir")


def test_cluster_gate_refuses_before_anything_starts(tmp_path):
    pw = tmp_path / "pass"
    pw.write_text("route-secret-123\n")
    pw.chmod(0o600)
    proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), "--cluster-name", "c",
                           "--routes", "nats://127.0.0.1:6250", "--cluster-pass-file", str(pw))
    assert_one_line_error(proc, 2, "enforce+acl+tls", "tls is false", "the routes listener is plaintext",
                          "--route-tls-cert")
    assert "route-secret-123" not in proc.stderr
    assert not (tmp_path / "d").exists()  # refused before the data dir was even touched


def test_posture_command(tmp_path):
    proc = run_membershipd("posture", "--bus-auth", "off")
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {
        "bus_auth": "off", "acl": False, "tls": True, "summary": "tls",
        "listeners": {"http": "loopback", "nats": "loopback", "routes": "none", "metrics": "none"},
    }
    bad = run_membershipd("posture", "--routes", "nats://u:p@127.0.0.1:1", "--cluster-name", "c")
    assert_one_line_error(bad, 2, "--routes")
    # cluster flags that the gate would refuse: 1, with the posture, whether or not a route password is given yet
    gated = run_membershipd("posture", "--cluster-name", "c", "--routes", "nats://127.0.0.1:6251")
    assert gated.returncode == 1 and json.loads(gated.stdout)["summary"] == "enforce+acl"
    assert gated.stderr.splitlines() == [
        "membershipd: refusing to join a cluster with posture 'enforce+acl'; a cluster needs enforce+acl+tls: "
        "tls is false: the routes listener is plaintext (mutual route TLS: --route-tls-cert/--route-tls-key/"
        "--route-tls-ca, route_tls plugin)",
        "membershipd: --cluster-name needs a route password: --cluster-pass-file PATH or UNIBUS_CLUSTER_PASS"]


def test_port_in_use_is_a_runtime_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), "--http-addr", f"127.0.0.1:{busy}",
                               "--nats-addr", f"127.0.0.1:{free_port()}")
        assert_one_line_error(proc, 1, "--http-addr", "in use")
        proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), "--http-addr", f"127.0.0.1:{free_port()}",
                               "--nats-addr", f"127.0.0.1:{busy}")
        assert_one_line_error(proc, 1, "--nats-addr", "in use")
        assert not nats_server_pids(tmp_path)


def test_nats_server_that_exits_at_once(tmp_path):
    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\necho '[1] 2026/01/01 00:00:00.000000 [FTL] simulated failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), "--nats-server-bin", str(fake),
                           "--http-addr", f"127.0.0.1:{free_port()}", "--nats-addr", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, 1, "nats-server failed to start", "simulated failure")


def test_flags_are_never_abbreviated():
    """argparse took --bus-a for --bus-auth: a plugin's own flag (--data) would then take over what an
    operator's abbreviation (--data for --data-dir) meant, once that plugin is installed."""
    proc = run_membershipd("posture", "--bus-a", "off")
    assert proc.returncode == 2 and "unrecognized arguments: --bus-a off" in proc.stderr, proc.stderr


def test_an_argument_error_is_one_usage_line_and_one_error_line():
    """argparse printed serve's whole synopsis first, 16 lines (an operations audit); the contract
    allows a usage line before the one that says what to change."""
    proc = run_membershipd("serve", "--no-such-flag")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["usage: membershipd serve [options] (membershipd serve --help lists them)",
                                        "membershipd serve: error: unrecognized arguments: --no-such-flag"]


@pytest.mark.parametrize("args", [["plugins", "--json"], ["plugins"], ["--version"], ["--help"],
                                  ["member", "--help"], ["restore", "--help"]])
def test_standard_output_that_cannot_be_written_is_one_error_line(args):
    """A red team: `membershipd plugins --json > /dev/full` ended in a traceback, and a command's
    `--help` to it exited 0 (argparse drops a failed write). (Linux's /dev/full, where every write
    fails with ENOSPC: the tests run on Linux.)"""
    proc = run_membershipd_to_full_disk(*args)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "membershipd: error: No space left on device"], proc.stderr


def test_a_member_added_whose_output_cannot_be_written_is_said_on_stderr(tmp_path):
    """A red team: `member add > /dev/full` added the member, then exited 1 with "No space left on
    device" alone: the trust root's fingerprint, printed once, was lost. The member stays added and
    what the command prints goes to stderr, after a line that says so; `migrate` does the same."""
    alice = generate_identity("alice")
    data_dir = tmp_path / "data"
    add = ("member", "add", "--data-dir", str(data_dir), "--handle", "alice", "--role", "admin",
           "--sign-pub", alice.sign_pub_b64, "--enc-pub", alice.enc_pub_b64, "--bus-pub", alice.bus_pub)
    proc = run_membershipd_to_full_disk(*add)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == ("membershipd: error: 'alice' was added, but standard output could not be written "
                        "(No space left on device); what it says follows here"), lines
    assert lines[1].startswith("added admin 'alice' to ") and lines[2].startswith("trust root fingerprint: "), lines
    fingerprint = lines[2].split()[3]
    again = run_membershipd(*add)
    assert again.returncode == 1 and "already exists" in again.stderr, again.stderr  # it was added
    proc = run_membershipd_to_full_disk("migrate", "--data-dir", str(data_dir))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    db = data_dir / "membershipd.db"
    assert len(lines) == 3 and lines[0].startswith(f"membershipd: error: {db} is at revision "), lines
    assert lines[0].endswith(", but standard output could not be written (No space left on device); what it "
                             "says follows here"), lines
    assert lines[1].startswith(f"{db}: already at revision "), lines
    assert lines[2].startswith(f"trust root fingerprint: {fingerprint} "), lines


def test_member_add_on_a_cluster_nodes_data_directory(tmp_path):
    """A walk-through of the cluster runbook ran `member add` on a joined node: it added the member to
    a membershipd.db the node does not serve from, said to send SIGHUP (which a cluster node does
    not read it for) and printed a trust root the cluster does not have. The first admin of a node
    (the runbook's bootstrap) is told to use migrate-to-kv; a second add there is refused."""
    data_dir = tmp_path / "n1"
    data_dir.mkdir(mode=0o700)
    conf = data_dir / "nats.conf"  # what serve writes on a cluster node: a cluster block
    conf.write_text(json.dumps({"server_name": "n1", "cluster": {"name": "unibus", "routes": []}}))
    conf.chmod(0o600)

    def add(who):
        return run_membershipd("member", "add", "--data-dir", str(data_dir), "--handle", who.handle, "--role", "admin",
                               "--sign-pub", who.sign_pub_b64, "--enc-pub", who.enc_pub_b64, "--bus-pub", who.bus_pub)

    first = add(generate_identity("alice"))
    assert first.returncode == 0, first.stderr
    assert "migrate-to-kv" in first.stdout and "SIGHUP" not in first.stdout, first.stdout
    assert "the cluster's once migrate-to-kv has copied this log into it" in first.stdout
    db = data_dir / "membershipd.db"
    before, files = db.read_bytes(), sorted(p.name for p in data_dir.iterdir())
    second = add(generate_identity("bob"))
    assert_one_line_error(second, 2, "is a cluster node's", "migrate-to-kv", "unibus members add",
                          "Bootstrapping the first admin")
    assert db.read_bytes() == before
    assert sorted(p.name for p in data_dir.iterdir()) == files  # no -wal or -shm of a read (a review)
    with sqlite3.connect(db) as conn:
        assert [h for (h,) in conn.execute("SELECT handle FROM members")] == ["alice"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--nats-url", "nats://192.0.2.7:4250", "n3"], "not a loopback address"),
    (["--nats-url", "nats://route:secret@127.0.0.1:4250", "n3"], "must not carry credentials"),
    (["--nats-url", "nats://127.0.0.1:4250", "--wait", "0", "n3"], "--wait: 0 must be more than 0"),
    (["--nats-url", "nats://127.0.0.1:4250", "n3"], "--nkey-seed-file"),  # no system.nkey: not a node's directory
    (["--nats-url", "nats://127.0.0.1:4250"], "NAME"),
    # a review printed a second "error:" line through a name with a line break
    (["--nats-url", "nats://127.0.0.1:4250", "n3\nerror: fake"], "NAME: 'n3\\nerror: fake' is not a server name"),
    (["--nats-url", "nats://127.0.0.1:4250", ""], "NAME: '' is not a server name"),
    (["--nats-url", "nats://127.0.0.1:4250", "n3.>"], "is not a server name"),
])
def test_remove_peer_refusals_before_connecting(tmp_path, args, needle):
    """`membershipd remove-peer` (deploy/cluster/README.md, "Replacing a dead node"; its work is
    tests/e2e/test_cluster_replace_node.py): what it refuses before it connects, exit 2."""
    data_dir = tmp_path / "node"
    data_dir.mkdir(mode=0o700)
    proc = run_membershipd("remove-peer", "--data-dir", str(data_dir), *args)
    assert_one_line_error(proc, 2, needle)
    assert "secret" not in proc.stderr
