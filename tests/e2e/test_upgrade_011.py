"""Upgrading from 0.11: a 0.11 database and 0.11 identity files against a real 0.12 daemon.

Members keep everything but have no bus key, hence no bus access, until they
run ``unibus keygen --upgrade --server URL`` (docs/operations.md#upgrading-from-011).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
import nkeys
import pytest
from alembic import command
from nats.errors import NoServersError

from unibus import forkrun
from unibus.client import ApiError, BusError, UnibusClient
from unibus.client.keys import Identity, generate_identity, identity_to_json, load_identity
from unibus.store.db import alembic_config, make_engine
from unibus.testing import MembershipdProcess


def write_v1_identity(path: Path, identity: Identity) -> Path:
    """The identity file 0.11 wrote: version 1, no bus key."""
    doc = {k: v for k, v in identity_to_json(identity).items() if k not in ("bus_seed", "bus_pub")}
    doc["version"] = 1
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    return path


def build_011_database(db: Path, admins: list[Identity], members: list[Identity], room: str) -> None:
    """alembic at revision 0002 (0.11's head) and rows with 0.11's columns only."""
    db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = make_engine(db)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    engine.dispose()
    now = datetime.now(UTC).isoformat()
    people = [(i, "admin") for i in admins] + [(i, "member") for i in members]
    with sqlite3.connect(db) as conn:
        conn.executemany("insert into members (handle, role, sign_pub, enc_pub, enc_suite, created_at) "
                         "values (?, ?, ?, ?, ?, ?)",
                         [(i.handle, role, i.sign_pub, i.enc_pub, i.enc_suite, now) for i, role in people])
        conn.execute("insert into rooms (room_id, name, owner, epoch, rekey_required, created_at) "
                     "values (?, 'ops', ?, 0, 1, ?)", (room, admins[0].handle, now))
        conn.executemany("insert into room_members (room_id, handle, added_at) values (?, ?, ?)",
                         [(room, i.handle, now) for i, _ in people])


def unibus(*args: str, identity: Path, server: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    argv = ["--identity", str(identity)]
    if server:
        argv += ["--server", server]
    return forkrun.run("unibus.client.cli", [*argv, *args], env=env)


async def test_a_011_deployment_upgrades_members_regain_the_bus_with_a_bus_key(tmp_path, membershipd_factory):
    room = "r0ld"
    alice, bob = generate_identity("alice"), generate_identity("bob", "MLKEM768_X25519")
    files = {i.handle: write_v1_identity(tmp_path / f"{i.handle}.json", i) for i in (alice, bob)}
    data_dir = tmp_path / "node"
    build_011_database(data_dir / "membershipd.db", [alice], [bob], room)
    daemon: MembershipdProcess = membershipd_factory(data_dir=data_dir)
    url = daemon.base_url
    old = {h: load_identity(p) for h, p in files.items()}
    assert all(i.bus_key is None for i in old.values())

    # migrated: everything kept, no bus key, so no bus
    async with UnibusClient(url, old["alice"]) as a:
        me = await a.me()
        assert (me["handle"], me["role"], me["sign_pub"], me["enc_pub"], me["bus_pub"]) == (
            "alice", "admin", alice.sign_pub_b64, alice.enc_pub_b64, None)
        members = {m["handle"]: m for m in await a.list_members()}
        assert members["bob"]["enc_suite"] == "MLKEM768_X25519" and members["bob"]["bus_pub"] is None
        assert {m["handle"] for m in (await a.get_room(room))["members"]} == {"alice", "bob"}
        with pytest.raises(ApiError) as e:
            await a.bus_info()
        assert e.value.status == 409 and e.value.problem["type"].endswith("/no-bus-key")
        assert f"unibus keygen --upgrade --server {url}" in e.value.detail
        with pytest.raises(BusError, match="keygen --upgrade"):
            async with a.bus():
                pass
        assert await a.rekey(room) == 1  # the control plane works as before
    conf = json.loads((data_dir / "nats.conf").read_text())
    assert "users" not in conf["accounts"]["MEMBERS"]  # members come in by the auth callout only
    for i in (alice, bob):  # 0.11's login (the signing key as nkey) is gone
        with pytest.raises((nats.errors.Error, NoServersError)):
            await nats.connect(daemon.nats_url, nkeys_seed_str=nkeys.encode_seed(i.sign_seed, nkeys.PREFIX_BYTE_USER)
                               .decode(), allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    sent = unibus("send", room, "chat", "hello", identity=files["alice"], server=url)
    assert sent.returncode == 1 and "keygen --upgrade" in sent.stderr, sent.stderr
    # whoami with the 0.11 file: no Python None on screen, and the way on (an upgrade drill)
    who = unibus("whoami", identity=files["alice"], server=url)
    assert who.returncode == 0 and "bus_pub:" in who.stdout and "None" not in who.stdout, who.stdout
    assert "(none)" in who.stdout and f"unibus keygen --upgrade --server {url}" in who.stderr, who.stderr

    # bob upgrades and uploads in one step
    up = unibus("keygen", "--upgrade", identity=files["bob"], server=url)
    assert up.returncode == 0, up.stderr
    new_bob = load_identity(files["bob"])
    backup = load_identity(tmp_path / "bob.json.v1.bak")
    assert backup == old["bob"] and up.stdout.strip() == new_bob.bus_pub
    assert (new_bob.sign_seed, new_bob.enc_key, new_bob.enc_suite) == (backup.sign_seed, backup.enc_key,
                                                                       backup.enc_suite)
    async with UnibusClient(url, new_bob) as b:
        assert (await b.me())["bus_pub"] == new_bob.bus_pub
        async with b.bus() as bus, bus.listen(room, include_errors=False) as msgs:
            # A new bus key kicks bob's connections again 2.7 s after the upload (docs/bus-auth.md),
            # and a send in that instant goes out at most once (docs/client.md, "Reconnects"): send
            # until one is heard (a review: one lost message hung this test, with no timeout)
            deadline = time.monotonic() + 20
            while True:
                assert await bus.send(room, "chat", "after the upgrade") == 1
                try:
                    msg = await asyncio.wait_for(anext(aiter(msgs)), 1)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "bob's bus heard nothing after the upgrade"
            assert msg.text == "after the upgrade" and msg.sender == "bob"

    # alice upgrades without --server first (nothing sent), then uploads with it
    local = unibus("keygen", "--upgrade", identity=files["alice"], server=None)
    assert local.returncode == 0 and "upload it with" in local.stderr, local.stderr
    async with UnibusClient(url, old["alice"]) as a:
        assert (await a.me())["bus_pub"] is None
    again = unibus("keygen", "--upgrade", "--json", identity=files["alice"], server=url)
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["upgraded"] is False and doc["uploaded"] is True
    new_alice = load_identity(files["alice"])
    async with UnibusClient(url, new_alice) as a:
        assert (await a.me())["bus_pub"] == new_alice.bus_pub == doc["bus_pub"]
        async with a.bus():
            pass
    assert json.loads((data_dir / "nats.conf").read_text()) == conf  # no member ever written to nats.conf


async def test_blobs_0_11_stored_stay_readable_over_https_and_no_other_key_opens(tmp_path, membershipd_factory):
    """A 0.11 room keyed at epochs 1 and 2 (keys sealed without a signature) and a blob under epoch 1.

    After the upgrade, over HTTPS with a private CA as the units serve it: ``keygen --upgrade``
    takes ``--ca`` (it ignored it, and failed against every such server), and the blob 0.11
    stored still downloads and decrypts, since entry 0 records a digest of each member's keys
    (docs/formats.md). A compromised server that swaps in another key sealed to the same member,
    with a blob under that key, is refused. Nothing new is encrypted with such a key: a member
    who may not rekey is told who may, and the owner's first send rekeys the room.
    """
    from unibus.client import RekeyRequired, UnsignedKey, tls_context
    from unibus.client.blobs import encrypt_file, get_blob, put_raw_blob
    from unibus.client.sealing import new_room_key, seal_room_key
    from unibus.testing import make_test_ca, make_test_cert

    room = "r0ld"
    alice, bob = generate_identity("alice"), generate_identity("bob", "MLKEM768_X25519")
    files = {i.handle: write_v1_identity(tmp_path / f"{i.handle}.json", i) for i in (alice, bob)}
    data_dir = tmp_path / "node"
    db = data_dir / "membershipd.db"
    build_011_database(db, [alice], [bob], room)
    keys = {1: new_room_key(), 2: new_room_key()}
    with sqlite3.connect(db) as conn:  # 0.11 keyed the room twice
        conn.execute("update rooms set epoch = 2, rekey_required = 0 where room_id = ?", (room,))
        conn.executemany("insert into sealed_keys (room_id, epoch, handle, sealed) values (?, ?, ?, ?)",
                         [(room, e, i.handle, seal_room_key(k, i.enc_pub, i.enc_suite, room, e))
                          for e, k in keys.items() for i in (alice, bob)])
    pki = tmp_path / "pki"
    ca = make_test_ca(pki, "ca")
    cert = make_test_cert(pki, "https", ca)
    daemon: MembershipdProcess = membershipd_factory("--http-tls-cert", str(cert[0]), "--http-tls-key", str(cert[1]),
                                                     data_dir=data_dir, ca=ca[0])
    url = daemon.base_url
    assert url.startswith("https://")

    up = unibus("keygen", "--upgrade", "--ca", str(ca[0]), identity=files["bob"], server=url)
    assert up.returncode == 0, up.stderr
    assert "uploaded the bus key of bob" in up.stderr

    plain = tmp_path / "report.bin"
    plain.write_bytes(os.urandom(300_000))
    stored = encrypt_file(keys[1], room, 1, plain, tmp_path / "report.blob", version=1)  # as 0.11 wrote it
    ssl = tls_context(ca[0])
    async with UnibusClient(url, load_identity(files["alice"]), ssl=ssl) as a:
        blob_id = await put_raw_blob(a, room, tmp_path / "report.blob")
    assert blob_id == stored.sha256.hex()

    got = unibus("blob", "get", room, blob_id, str(tmp_path / "out.bin"), "--ca", str(ca[0]),
                 identity=files["bob"], server=url)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "out.bin").read_bytes() == plain.read_bytes()
    async with UnibusClient(url, load_identity(files["bob"]), ssl=ssl) as b:
        with pytest.raises(RekeyRequired) as e:  # nothing new under a 0.11 key: the room needs a rekey
            await b.current_key(room)
        assert e.value.rekeyers == ["alice"]
        with pytest.raises(UnsignedKey, match="nothing new is encrypted with it"):
            await b.room_key(room, 2)  # not for reading: no legacy=True

    # the server turns: another key for epoch 1, sealed to bob as validly, and a blob under it
    forged = new_room_key()
    with sqlite3.connect(db) as conn:
        conn.execute("update sealed_keys set sealed = ? where room_id = ? and epoch = 1 and handle = 'bob'",
                     (seal_room_key(forged, bob.enc_pub, bob.enc_suite, room, 1), room))
    encrypt_file(forged, room, 1, plain, tmp_path / "forged.blob", version=1)
    async with UnibusClient(url, load_identity(files["alice"]), ssl=ssl) as a:
        forged_id = await put_raw_blob(a, room, tmp_path / "forged.blob")
    async with UnibusClient(url, load_identity(files["bob"]), ssl=ssl) as b:
        with pytest.raises(UnsignedKey, match="not the ones entry 0 records"):
            await get_blob(b, room, forged_id, tmp_path / "forged.out")
    assert not (tmp_path / "forged.out").exists()

    # the owner's first send rekeys the room: a signed key package from then on
    async with UnibusClient(url, load_identity(files["alice"]), ssl=ssl) as a:
        epoch, _key = await a.current_key(room)
        assert epoch == 3 and 3 in a.verified.rooms[room].epochs
