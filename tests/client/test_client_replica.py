"""The verified replica on disk, `unibus trust` and `unibus log show|verify`, against a real daemon.

One daemon for the module (alice admin, bob member); the recovery-bootstrap
test starts its own, since a later bootstrap changes what every client must trust.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from unibus import forkrun
from unibus.client import UnibusClient
from unibus.client.keys import generate_identity, save_identity
from unibus.client.replica import VerificationError, server_id
from unibus.testing import MembershipdProcess, bootstrap_member, run_membershipd


def unibus(server: str, identity: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    proc = forkrun.run("unibus.client.cli", ["--server", server, "--identity", str(identity), *args], env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def error_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("replica")
    alice, bob = generate_identity("alice"), generate_identity("bob")
    bootstrap_member(base / "daemon", alice, "admin")
    daemon = MembershipdProcess(base / "daemon").start()
    daemon.people = {"alice": alice, "bob": bob}

    async def setup() -> None:
        async with UnibusClient(daemon.base_url, alice) as a:
            r = bob.public_record()
            await a.add_member("bob", r["sign_pub"], r["enc_pub"], r["enc_suite"], bus_pub=r["bus_pub"])
            rid = (await a.create_room("ops"))["room_id"]
            await a.add_room_member(rid, "bob")
            await a.rekey(rid)
            daemon.room = rid
            daemon.root = (await a.log())["entries"][0]

    try:
        asyncio.run(setup())
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def alice_file(server, tmp_path) -> Path:
    path = tmp_path / "ids" / "alice.json"
    save_identity(server.people["alice"], path)
    return path


def root_fp(server) -> str:
    from unibus.memberlog import entry_hash

    return entry_hash(server.root)


def test_first_contact_pins_the_root_and_says_so_once(server, alice_file):
    first = unibus(server.base_url, alice_file, "log", "show")
    assert first.returncode == 0, first.stderr
    fp = root_fp(server)
    assert f"on first use: its trust root fingerprint is {fp}" in first.stderr
    assert f"trust root:    {fp}" in first.stdout or fp in first.stdout
    second = unibus(server.base_url, alice_file, "log", "show", "--json")
    assert second.returncode == 0 and "first use" not in second.stderr
    doc = json.loads(second.stdout)
    assert doc["trust_root"] == fp
    # the files: <identity>.log/<server id>/, directories 0700, files 0600
    top = alice_file.with_name("alice.json.log")
    where = top / server_id(server.base_url)
    assert Path(doc["replica"]) == where
    assert stat.S_IMODE(top.stat().st_mode) == stat.S_IMODE(where.stat().st_mode) == 0o700
    assert {p.name for p in where.iterdir()} == {"log.jsonl", "state.json", "lock"}
    for p in where.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    state = json.loads((where / "state.json").read_text())
    lines = (where / "log.jsonl").read_bytes().splitlines()
    assert state["trust_root"] == fp and state["head"]["seq"] == len(lines) - 1
    assert state["epochs"] == {}  # no key accepted by this identity's CLI yet


def test_log_show_derives_what_the_server_says(server, alice_file):
    doc = json.loads(unibus(server.base_url, alice_file, "log", "show", "--json").stdout)

    async def served() -> tuple[list, list, dict]:
        async with UnibusClient(server.base_url, server.people["alice"]) as a:
            return await a.list_members(), await a.list_rooms(), await a.log_head()

    members, rooms, head = asyncio.run(served())
    assert doc["head"] == {"seq": head["seq"], "hash": head["hash"]}
    assert {m["handle"]: (m["role"], m["sign_pub"], m["enc_pub"], m["enc_suite"], m["bus_pub"]) for m in doc["members"]} \
        == {m["handle"]: (m["role"], m["sign_pub"], m["enc_pub"], m["enc_suite"], m["bus_pub"]) for m in members}
    assert {r["room_id"]: (r["owner"], r["epoch"], r["rekey_required"], r["members"]) for r in doc["rooms"]} == \
        {r["room_id"]: (r["owner"], r["epoch"], r["rekey_required"], sorted(m["handle"] for m in r["members"]))
         for r in rooms}
    fps = doc["members"][0]["fingerprints"]
    assert len(fps["sign"]) == len(fps["enc"]) == len(fps["bus"]) == 64
    text = unibus(server.base_url, alice_file, "log", "show").stdout
    assert "verified head:" in text and f"seq {head['seq']}" in text and server.room in text
    assert "members: (2)" in text and "owner=alice" in text and "epoch=1" in text


def test_trust_pins_before_first_contact(server, tmp_path):
    path = tmp_path / "bob.json"
    save_identity(server.people["bob"], path)
    wrong = "ab" * 32
    assert unibus(server.base_url, path, "trust", wrong).stdout.startswith(f"pinned {wrong}")
    line = error_line(unibus(server.base_url, path, "log", "show"))
    assert "entry 0" in line and f"not the trusted {wrong}" in line
    # a redeployed server (or a typo): --reset starts over with the right fingerprint
    fp = root_fp(server)
    assert "pinned" in unibus(server.base_url, path, "trust", fp.upper(), "--reset").stdout
    ok = unibus(server.base_url, path, "log", "show")
    assert ok.returncode == 0 and "first use" not in ok.stderr
    assert "already trusted" in unibus(server.base_url, path, "trust", fp).stdout
    for bad in ("abc", "g" * 64, fp + "0"):
        line = error_line(unibus(server.base_url, path, "trust", bad), 2)
        assert "FINGERPRINT" in line


def test_log_verify_and_a_damaged_replica(server, alice_file):
    assert unibus(server.base_url, alice_file, "log", "show").returncode == 0
    where = alice_file.with_name("alice.json.log") / server_id(server.base_url)
    log = where / "log.jsonl"
    data = log.read_bytes()
    log.write_bytes(data[: len(data) // 2])  # a disk problem
    again = unibus(server.base_url, alice_file, "log", "show", "--json")
    assert again.returncode == 0 and "is damaged" in again.stderr
    assert log.read_bytes() == data  # rebuilt from the server and verified
    # extra lines after the head (a crash between the two writes) are ignored and cut
    log.write_bytes(data + b'{"not": "an entry"}\n')
    assert unibus(server.base_url, alice_file, "log", "show").returncode == 0
    verified = unibus(server.base_url, alice_file, "log", "verify")
    assert verified.returncode == 0, verified.stderr
    n = len(data.splitlines())
    assert f"is valid: {n} entries, head seq {n - 1}" in verified.stdout
    assert log.read_bytes() == data
    doc = json.loads(unibus(server.base_url, alice_file, "log", "verify", "--json").stdout)
    assert doc["valid"] is True and doc["entries"] == n


def test_concurrent_processes_share_the_replica(server, alice_file):
    async def grow() -> None:
        async with UnibusClient(server.base_url, server.people["alice"]) as a:
            for i in range(5):
                await a.create_room(f"more{i}")

    assert unibus(server.base_url, alice_file, "log", "show").returncode == 0
    asyncio.run(grow())
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    procs = [subprocess.Popen([sys.executable, "-m", "unibus.client.cli", "--server", server.base_url, "--identity",
                               str(alice_file), "log", "show", "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
             for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    heads = {json.dumps(json.loads(out)["head"]) for out, _ in outs}
    assert len(heads) == 1
    where = alice_file.with_name("alice.json.log") / server_id(server.base_url)
    lines = (where / "log.jsonl").read_bytes().splitlines()
    assert json.loads((where / "state.json").read_text())["head"]["seq"] == len(lines) - 1
    assert "is valid" in unibus(server.base_url, alice_file, "log", "verify").stdout


def test_the_replica_directory_is_private(server, alice_file, tmp_path):
    top = alice_file.with_name("alice.json.log")
    top.mkdir(mode=0o755)
    os.chmod(top, 0o755)
    assert unibus(server.base_url, alice_file, "log", "show").returncode == 0
    assert stat.S_IMODE(top.stat().st_mode) == 0o700  # tightened
    # a link planted where the server's directory goes is refused, never followed
    other = tmp_path / "elsewhere"
    other.mkdir()
    path2 = tmp_path / "ids2" / "alice.json"
    save_identity(server.people["alice"], path2)
    top2 = path2.with_name("alice.json.log")
    top2.mkdir(mode=0o700)
    (top2 / server_id(server.base_url)).symlink_to(other, target_is_directory=True)
    line = error_line(unibus(server.base_url, path2, "log", "show"))
    assert "not a directory" in line and not any(other.iterdir())


def test_a_recovery_bootstrap_needs_explicit_trust(tmp_path, membershipd_factory):
    alice, eve = generate_identity("alice"), generate_identity("eve")
    data_dir = tmp_path / "daemon"
    bootstrap_member(data_dir, alice, "admin")
    daemon = membershipd_factory(data_dir=data_dir)
    path = tmp_path / "alice.json"
    save_identity(alice, path)
    assert unibus(daemon.base_url, path, "log", "show").returncode == 0
    # the operator recovers access offline: a second bootstrap entry
    added = run_membershipd("member", "add", "--data-dir", str(data_dir), "--handle", "eve", "--role", "admin",
                            "--sign-pub", eve.sign_pub_b64, "--enc-pub", eve.enc_pub_b64, "--bus-pub", eve.bus_pub)
    assert added.returncode == 0, added.stderr
    fp = re.search(r"fingerprint ([0-9a-f]{64})", added.stdout).group(1)
    daemon.send_signal(1)
    line = error_line(unibus(daemon.base_url, path, "log", "show"))
    assert "entry 1" in line and f"unibus trust {fp}" in line
    assert "accepted" in unibus(daemon.base_url, path, "trust", fp).stdout
    doc = json.loads(unibus(daemon.base_url, path, "log", "show", "--json").stdout)
    assert {m["handle"]: m["role"] for m in doc["members"]} == {"alice": "admin", "eve": "admin"}
    assert doc["accepted_bootstraps"] == [fp]
    # a new client pinning only the root refuses it too, until it trusts it
    path2 = tmp_path / "alice2.json"
    save_identity(alice, path2)
    unibus(daemon.base_url, path2, "trust", doc["trust_root"])
    assert "entry 1" in error_line(unibus(daemon.base_url, path2, "log", "verify"))
    # ... and, with nothing verified yet, `trust` of the recovery accepts it rather than re-pinning
    # the root with it (red team: a new member of a recovered deployment could never verify its log)
    assert "accepted" in unibus(daemon.base_url, path2, "trust", fp).stdout
    assert unibus(daemon.base_url, path2, "log", "verify").returncode == 0
    # the same before any contact at all: root first, then the recovery
    path3 = tmp_path / "alice3.json"
    save_identity(alice, path3)
    assert "pinned" in unibus(daemon.base_url, path3, "trust", doc["trust_root"]).stdout
    assert "accepted" in unibus(daemon.base_url, path3, "trust", fp).stdout
    assert unibus(daemon.base_url, path3, "log", "verify").returncode == 0
    # a first contact that meets the recovery: entry 0 is pinned on first use, as always, so the
    # error's advice works (before, `trust` of the recovery pinned it as the root, and the next sync
    # refused entry 0)
    path4 = tmp_path / "alice4.json"
    save_identity(alice, path4)
    first = unibus(daemon.base_url, path4, "log", "show")
    assert first.returncode == 1 and f"unibus trust {fp}" in error_line(first)
    assert f"its trust root fingerprint is {doc['trust_root']}" in first.stderr  # said, as on any first use
    assert "accepted" in unibus(daemon.base_url, path4, "trust", fp).stdout
    shown = unibus(daemon.base_url, path4, "log", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["trust_root"] == doc["trust_root"]


def served_root(daemon, identity) -> str:
    from unibus.memberlog import entry_hash

    async def first() -> dict:
        async with UnibusClient(daemon.base_url, identity) as c:
            return (await c.log(limit=1))["entries"][0]

    return entry_hash(asyncio.run(first()))


def test_a_deployment_started_over_is_not_taken_for_a_recovery_bootstrap(tmp_path):
    """An upgrade drill: the upgrade redone from the copy made before it gives the log a new entry 0
    (a new trust root). `unibus trust NEW` took it for a recovery bootstrap of the root pinned (exit
    0), and every later command failed as a rollback. Now `trust` refuses it, naming `--reset`; a
    fingerprint offered while the server cannot be asked is still accepted in advance."""
    alice = generate_identity("alice")
    data_dir = tmp_path / "daemon"
    bootstrap_member(data_dir, alice, "admin")
    daemon = MembershipdProcess(data_dir).start()
    try:
        old_root = served_root(daemon, alice)
        path = tmp_path / "alice.json"
        save_identity(alice, path)
        assert "pinned" in unibus(daemon.base_url, path, "trust", old_root).stdout
        assert unibus(daemon.base_url, path, "rooms", "create", "ops").returncode == 0
    finally:
        daemon.stop()
    shutil.rmtree(data_dir)
    bootstrap_member(data_dir, alice, "admin")  # started over: a new entry 0
    again = daemon.again().start()
    try:
        new_root = served_root(again, alice)
        assert new_root != old_root
        assert "rollback" in error_line(unibus(again.base_url, path, "whoami"))
        line = error_line(unibus(again.base_url, path, "trust", new_root))
        assert "started over" in line and f"unibus trust --reset {new_root}" in line
        assert "rollback" in error_line(unibus(again.base_url, path, "log", "show"))  # nothing accepted
        state_file = path.with_name("alice.json.log") / server_id(again.base_url) / "state.json"
        state = json.loads(state_file.read_text())
        assert state["trust_root"] == old_root and not state.get("accepted_bootstraps")
        # a client that took it for a recovery before this check: refused too, not "already trusted"
        state["accepted_bootstraps"] = [new_root]
        state_file.write_text(json.dumps(state))
        assert "started over" in error_line(unibus(again.base_url, path, "trust", new_root))
        state["accepted_bootstraps"] = []
        state_file.write_text(json.dumps(state))
        assert "forgot" in unibus(again.base_url, path, "trust", "--reset", new_root).stdout
        assert unibus(again.base_url, path, "whoami").returncode == 0
    finally:
        again.stop()
    # the server down: a recovery fingerprint given in advance is still accepted, as before, and
    # the notice says it was not checked (a review)
    recovery = "ab" * 32
    offline = unibus(again.base_url, path, "trust", recovery)
    assert offline.returncode == 0 and "accepted" in offline.stdout, offline.stderr
    assert "did not serve its entry 0" in offline.stderr and f"trust --reset {recovery}" in offline.stderr


def test_a_root_pinned_on_first_use_is_not_taken_for_the_operators_root(tmp_path, membershipd_factory):
    """A walk-through of the upgrade steps: `keygen --upgrade --server` (a changing request) pinned
    the server's entry 0 on first use, then `unibus trust <the operator's root>` took the operator's
    root for a recovery bootstrap, exit 0: against a server serving another log, the member was
    never protected by the pin. Now a fingerprint that is neither the root pinned on first use nor a
    bootstrap the server's log holds is refused, the replica left as it was; naming the root
    confirms it, and then a fingerprint is accepted in advance, as for a root pinned by hand."""
    alice = generate_identity("alice")
    data_dir = tmp_path / "daemon"
    bootstrap_member(data_dir, alice, "admin")
    daemon = membershipd_factory(data_dir=data_dir)
    path = tmp_path / "alice.json"
    save_identity(alice, path)
    first = unibus(daemon.base_url, path, "log", "show", "--json")
    assert first.returncode == 0 and "on first use" in first.stderr
    root = json.loads(first.stdout)["trust_root"]
    state = path.with_name("alice.json.log") / server_id(daemon.base_url) / "state.json"
    assert json.loads(state.read_text())["first_use"] is True
    before = state.read_bytes()
    operators = "ab" * 32  # the root an operator gave, which this server's log does not start with
    line = error_line(unibus(daemon.base_url, path, "trust", operators))
    assert f"pinned on first use ({root})" in line and f"unibus trust --reset {operators}" in line, line
    assert f"unibus trust {root}`" in line
    assert state.read_bytes() == before  # nothing accepted
    # naming the root confirms it ...
    assert "confirmed" in unibus(daemon.base_url, path, "trust", root).stdout
    assert "first_use" not in json.loads(state.read_text())
    assert "already" in unibus(daemon.base_url, path, "trust", root).stdout
    # ... and from then on another fingerprint is a recovery bootstrap, accepted in advance
    assert "accepted" in unibus(daemon.base_url, path, "trust", operators).stdout
    # --reset starts over with the operator's root, which this server's log then fails
    assert "pinned" in unibus(daemon.base_url, path, "trust", "--reset", operators).stdout
    assert "first_use" not in json.loads(state.read_text())
    assert "entry 0" in error_line(unibus(daemon.base_url, path, "log", "show"))


async def test_an_sdk_client_without_a_replica_directory_follows_a_recovery_it_trusts(tmp_path,
                                                                                     membershipd_factory):
    """A docs walk-through: the SDK's getting-started client (no replica_root) could not follow a
    deployment's recovery: only `trust_root=` was documented. `client.trust(FP)` accepts it."""
    from unibus.client.replica import LogVerificationError

    alice, eve = generate_identity("alice"), generate_identity("eve")
    data_dir = tmp_path / "daemon"
    bootstrap_member(data_dir, alice, "admin")
    daemon = membershipd_factory(data_dir=data_dir)
    added = run_membershipd("member", "add", "--data-dir", str(data_dir), "--handle", "eve", "--role", "admin",
                            "--sign-pub", eve.sign_pub_b64, "--enc-pub", eve.enc_pub_b64, "--bus-pub", eve.bus_pub)
    assert added.returncode == 0, added.stderr
    fp = re.search(r"fingerprint ([0-9a-f]{64})", added.stdout).group(1)
    daemon.send_signal(1)
    notes: list[str] = []
    async with UnibusClient(daemon.base_url, alice, notice=notes.append) as c:
        with pytest.raises(LogVerificationError, match=fp):
            await c.sync()
        assert any("on first use" in n for n in notes)  # entry 0 pinned, in memory
        with pytest.raises(VerificationError, match="pinned on first use"):
            await c.trust("ab" * 32)  # not a bootstrap of this log
        assert await c.trust(fp) == "accepted"
        state = await c.sync()
        assert set(state.members) == {"alice", "eve"}


async def test_a_bootstrap_is_looked_for_only_after_entry_0_and_only_in_a_log(monkeypatch):
    """The server's answers are not trusted: entry 0's hash is never a bootstrap's, and a page
    that is not a log (seqs that do not grow, no entries) ends the search."""
    import unibus.client.replica as replica_module
    from unibus.client.replica import Replica
    from unibus.memberlog import entry_hash

    entry0 = {"seq": 0, "prev": None, "at": 1, "kind": "bootstrap",
              "member": {"handle": "alice", "role": "admin", "sign_pub": "x", "enc_pub": "y",
                         "enc_suite": "X25519", "bus_pub": None}}
    later = {**entry0, "seq": 1, "prev": entry_hash(entry0)}

    class Served:
        def __init__(self, pages):
            self.pages = list(pages)

        async def log_head(self):
            return {"seq": 5, "hash": "0" * 64}

        async def log(self, after=None, limit=None):
            return self.pages.pop(0) if self.pages else {"entries": []}

    replica = Replica("http://server")
    assert not await replica._served_bootstrap(Served([{"entries": [later]}]), entry_hash(entry0))
    assert await replica._served_bootstrap(Served([{"entries": [later]}]), entry_hash(later))
    assert not await replica._served_bootstrap(Served([{"entries": [entry0, later]}]), entry_hash(later))
    assert not await replica._served_bootstrap(Served([{"entries": [later, later]}]), "0" * 64)
    assert not await replica._served_bootstrap(Served([{"entries": ["x"]}, {"entries": [later]}]), entry_hash(later))
    assert not await replica._served_bootstrap(Served([[]]), entry_hash(later))
    assert not await replica._served_bootstrap(None, entry_hash(later))

    # a log that never ends: the search is bounded, and made without the replica's lock (a review:
    # a server's endless log held it, and the identity's other commands timed out on it)
    class Endless(Served):
        async def log_head(self):
            return {"seq": 2 ** 53 - 1, "hash": "0" * 64}

        async def log(self, after=None, limit=None):
            async with replica.locked():  # free: trust() does not hold it while it searches
                pass
            return {"entries": [{**later, "seq": after + 1}]}

    monkeypatch.setattr(replica_module, "TRUST_SEARCH_WITHIN", 0.3)
    replica.trust_root, replica.first_use = "ef" * 32, True
    with pytest.raises(VerificationError, match="could not be searched"):
        await asyncio.wait_for(replica.trust("cd" * 32, client=Endless([])), 20)
    assert replica.accepted == set()


async def test_the_pinned_root_is_read_from_disk_each_time(tmp_path):
    """A review: a long-running process kept tagging its changing requests with the root it had
    in memory after another process's `unibus trust --reset` replaced it on disk, and a
    ``trust_root`` argument overrode the directory's own pin until the first sync."""
    from unibus.client.replica import Replica

    x, y = "aa" * 32, "bb" * 32
    old = Replica("http://127.0.0.1:9", tmp_path / "r")
    assert old.pinned_root() is None
    assert await old.trust(y) == "pinned" and old.pinned_root() == y
    assert await Replica("http://127.0.0.1:9", tmp_path / "r").trust(x, reset=True) == "reset"  # another process
    assert old.pinned_root() == x  # the code before: y, until this process synced again
    assert Replica("http://127.0.0.1:9", tmp_path / "r", trust_root=y).pinned_root() == x  # the directory's pin
    assert Replica("http://127.0.0.1:9", None, trust_root=y).pinned_root() == y  # in memory: the argument
