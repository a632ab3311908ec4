"""membershipd migrate-to-kv: what it copies, where it may connect, and idempotence."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from unibus.client import UnibusClient
from unibus.client.keys import generate_identity
from unibus.store.kv import KvStore
from unibus.testing import make_test_ca, make_test_cert, run_membershipd


def one_line(proc, code, needle):
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


async def test_copies_everything_once(daemon_with_admin, alice):
    server = daemon_with_admin()
    bob = generate_identity("bob", "MLKEM768_X25519")
    async with UnibusClient(server.base_url, alice) as a:
        await a.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, "MLKEM768_X25519", bus_pub=bob.bus_pub)
        room = (await a.create_room("ops"))["room_id"]
        await a.add_room_member(room, "bob")
        await a.rekey(room)
        await a.rekey(room)
    args = ["migrate-to-kv", "--data-dir", str(server.data_dir), "--nats-url", server.nats_url]
    first = await asyncio.to_thread(run_membershipd, *args)
    assert first.returncode == 0, first.stderr
    # The log: alice's bootstrap, bob's add, the room, its member, two rekeys.
    assert "copied 6 membership log entries, 2 member(s), 1 room(s), 2 sealed epoch(s)" in first.stdout
    second = await asyncio.to_thread(run_membershipd, *args)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    for run in (first, second):  # nothing to warn about (tests/e2e/test_backup_cluster.py: its own close)
        assert "warning" not in run.stderr.lower(), run.stderr
    async with UnibusClient(server.base_url, bob) as b:
        served = await b.log()
        packages = [await b.my_key(room, epoch) for epoch in (1, 2)]

    nc = await nats.connect(server.nats_url, nkeys_seed=str(server.data_dir / "service.nkey"))
    try:
        kv = KvStore(nc.jetstream())
        assert [m.handle for m in await kv.list_members()] == ["alice", "bob"]
        copied = await kv.get_room(room)
        assert copied.epoch == 2 and copied.handles == {"alice", "bob"}
        for epoch in (1, 2):
            got = await kv.get_sealed_key(room, "bob", epoch)
            assert got is not None and len(got[1]) == 1168
            # The key packages came along: the same sig, sealer and log head as the server serves.
            assert (await kv.get_key_package(room, "bob", epoch)).as_json() == packages[epoch - 1]
        # The log, byte for byte, and its head.
        texts = await kv.log_entries()
        assert [json.loads(t) for t in texts] == served["entries"]
        assert await kv.log_head() == (served["head"]["seq"], served["head"]["hash"]) == (5, served["head"]["hash"])
    finally:
        await nc.close()


@pytest.mark.parametrize("url, needle", [
    ("nats://192.0.2.7:4250", "not a loopback address"),
    ("nats://route:secret@127.0.0.1:4250", "credentials"),
    ("http://127.0.0.1:4250", "--nats-url"),
])
def test_refusals_before_connecting(tmp_path, url, needle):
    proc = run_membershipd("migrate-to-kv", "--data-dir", str(tmp_path), "--nats-url", url)
    one_line(proc, 2, needle)
    assert "secret" not in proc.stderr


def test_needs_a_store_and_a_private_seed(tmp_path):
    one_line(run_membershipd("migrate-to-kv", "--data-dir", str(tmp_path), "--nats-url", "nats://127.0.0.1:1"),
             2, "nothing to copy")


def test_ca_requires_verified_tls(tmp_path, daemon_with_admin):
    pki = tmp_path / "pki"
    ca = make_test_ca(pki, "client-ca")
    cert = make_test_cert(pki, "nats", ca)
    server = daemon_with_admin("--tls-cert", str(cert[0]), "--tls-key", str(cert[1]))
    url = f"nats://localhost:{server.nats_port}"
    ok = run_membershipd("migrate-to-kv", "--data-dir", str(server.data_dir), "--nats-url", url, "--ca", str(ca[0]))
    assert ok.returncode == 0, ok.stderr
    assert "eof_received" not in ok.stderr  # asyncio's warning at each close of a TLS connection: dropped
    other = make_test_ca(pki, "other-ca")
    bad = run_membershipd("migrate-to-kv", "--data-dir", str(server.data_dir), "--nats-url", url, "--ca", str(other[0]))
    one_line(bad, 1, "cannot connect")
    assert "(is --ca the CA that issued the node's NATS certificate?)" in bad.stderr, bad.stderr
    # What to change, where the cause says it (a walk-through got the bare TLS or protocol error).
    tls_url = f"tls://localhost:{server.nats_port}"
    no_ca = run_membershipd("migrate-to-kv", "--data-dir", str(server.data_dir), "--nats-url", tls_url)
    one_line(no_ca, 1, "(give --ca PATH, the CA of the node's NATS certificate")
    plain = run_membershipd("migrate-to-kv", "--data-dir", str(server.data_dir), "--nats-url", url)
    one_line(plain, 1, "(no greeting: if the listener wants TLS first, give a tls:// URL and --ca)")
    # backup --nats-url follows the same rules: verified TLS, or nothing read and nothing written.
    out = tmp_path / "kv.tar"
    bad = run_membershipd("backup", "--out", str(out), "--data-dir", str(server.data_dir), "--nats-url", url,
                          "--ca", str(other[0]))
    one_line(bad, 1, "cannot connect")
    assert not out.exists() and not list(tmp_path.glob(".kv.tar*"))
    ok = run_membershipd("backup", "--out", str(out), "--data-dir", str(server.data_dir), "--nats-url", url,
                         "--ca", str(ca[0]))
    assert ok.returncode == 0 and "cluster backup" in ok.stdout, ok.stderr


def test_an_nkey_the_node_does_not_know_is_said_at_once(tmp_path, daemon_with_admin):
    """Red team: with a seed the node does not know, migrate-to-kv and backup waited 10 s and said
    `cannot connect to NATS at …: TimeoutError:`, the server's authorization violation lost. The
    violation is permanent for that seed: they stop retrying and name it."""
    from unibus.servicekey import ensure_service_nkey

    server = daemon_with_admin()
    stranger = tmp_path / "stranger"
    stranger.mkdir(mode=0o700)
    ensure_service_nkey(stranger)  # a valid user seed, of no account on that node
    seed = str(stranger / "service.nkey")
    for args in (["migrate-to-kv"], ["backup", "--out", str(tmp_path / "b.tar")]):
        proc = run_membershipd(*args, "--data-dir", str(server.data_dir), "--nats-url", server.nats_url,
                               "--nkey-seed-file", seed)
        one_line(proc, 1, "'Authorization Violation' (the server does not know this nkey: is it this node's "
                          "service.nkey?)")
    assert not (tmp_path / "b.tar").exists()


def test_a_database_that_disagrees_with_its_log_is_not_copied(tmp_path):
    """Red team (the recovery on a cluster): a scratch database whose member row was edited after
    `member add` (another key pair under the recovered admin's handle), or had a row added behind
    the log's back, was copied into the cluster, where every client then refused the log and every
    backup failed. migrate-to-kv now runs restore's checks on its source first: exit 2, nothing
    copied, before it connects."""
    import sqlite3

    from unibus.testing import bootstrap_member

    alice, carol, mallory = generate_identity("alice"), generate_identity("carol"), generate_identity("mallory")
    data_dir = tmp_path / "scratch"
    bootstrap_member(data_dir, alice, "admin")
    bootstrap_member(data_dir, carol, "admin")  # a recovery bootstrap: the operator's own, so accepted
    with sqlite3.connect(data_dir / "membershipd.db") as conn:
        conn.execute("UPDATE members SET sign_pub = ? WHERE handle = 'carol'", (mallory.sign_pub,))
    from unibus.servicekey import ensure_service_nkey

    ensure_service_nkey(data_dir)
    proc = run_membershipd("migrate-to-kv", "--data-dir", str(data_dir), "--nats-url", "nats://127.0.0.1:1")
    one_line(proc, 2, "cannot be copied: member 'carol' in the store is not what its membership log establishes; "
                      "nothing copied")
