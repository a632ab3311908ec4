"""NATS accounts against a real daemon, real nats-server and real nats-py (docs/bus-auth.md).

Members live in ``MEMBERS`` (no JetStream), membershipd and every bucket in
``UNIBUS``, the system user in ``SYS``; no ``allow_responses``. The attacker
is an ordinary member (bob) who tries to reach what is not his: the 0.11
reply-subject trick, direct publishes, JetStream, the system account. Also
the upgrade of a 0.11 single node's JetStream data (global account) and the
refusal of a clustered one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import stat
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import nats
import pytest
from nats.errors import NoServersError
from nats.js.api import KeyValueConfig, StorageType

from unibus.auth import NONCE_BUCKET
from unibus.bus import Bus
from unibus.client import UnibusClient
from unibus.client.keys import Identity, generate_identity
from unibus.servicekey import ensure_service_nkey
from unibus.signing import sign_request
from unibus.store.db import migrate, stored_revision
from unibus.testing import (MembershipdProcess, NatsServer, bootstrap_member, free_port, make_test_ca,
                            make_test_cert, run_membershipd)
from unibus.wire import nkey_from_sign_pub

WAIT = 10.0  # upper bound of every "eventually"; never a timing assertion


def run(coro: Any) -> Any:
    """Run ``coro`` from a sync fixture (an event loop may already run in this thread)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(120)


class Conn:
    """A NATS connection that records the server's -ERR lines."""

    def __init__(self, url: str, seed: str, inbox: str | None = None) -> None:
        self.url, self.seed, self.inbox = url, seed, inbox
        self.errors: list[str] = []
        self.nc: Any = None

    async def __aenter__(self) -> Conn:
        async def error_cb(e: Exception) -> None:
            self.errors.append(str(e).lower())

        kwargs = {"inbox_prefix": self.inbox} if self.inbox else {}
        self.nc = await nats.connect(self.url, nkeys_seed_str=self.seed, error_cb=error_cb, allow_reconnect=False,
                                     connect_timeout=2, **kwargs)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if not self.nc.is_closed:
            await self.nc.close()

    async def violation(self, subject: str) -> bool:
        """Wait (bounded) for the permissions violation of a publish to ``subject``."""
        await self.nc.flush(timeout=2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any("permissions violation" in e and "publish" in e and subject.lower() in e for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False


def seed_of(path) -> str:
    return path.read_text().strip()


class World:
    def __init__(self, daemon: MembershipdProcess, people: dict[str, Identity], room: str, other: str) -> None:
        self.daemon, self.people, self.room, self.other = daemon, people, room, other

    @property
    def service_seed(self) -> str:
        return seed_of(self.daemon.data_dir / "service.nkey")

    @property
    def system_seed(self) -> str:
        return seed_of(self.daemon.data_dir / "system.nkey")

    def member(self, handle: str) -> Conn:
        identity = self.people[handle]
        return Conn(self.daemon.nats_url, identity.bus_nkey_seed(), f"_INBOX_{handle}")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """One daemon: alice (admin) alone in room "other"; bob and carol with alice in room "ops"."""
    people = {h: generate_identity(h) for h in ("alice", "bob", "carol")}
    data_dir = tmp_path_factory.mktemp("accounts") / "daemon"
    bootstrap_member(data_dir, people["alice"], "admin")
    daemon = MembershipdProcess(data_dir).start()

    async def setup() -> tuple[str, str]:
        async with UnibusClient(daemon.base_url, people["alice"]) as a:
            for h in ("bob", "carol"):
                i = people[h]
                await a.add_member(h, i.sign_pub_b64, i.enc_pub_b64, bus_pub=i.bus_pub)
            room = (await a.create_room("ops"))["room_id"]
            other = (await a.create_room("other"))["room_id"]
            for h in ("bob", "carol"):
                await a.add_room_member(room, h)
            return room, other

    try:
        room, other = run(setup())
        yield World(daemon, people, room, other)
    finally:
        daemon.stop()


async def sys_request(w: World, subject: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    async with Conn(w.daemon.nats_url, w.system_seed) as sys:
        msg = await sys.nc.request(subject, json.dumps(payload or {}).encode(), timeout=5)
    return json.loads(msg.data)


async def streams(w: World) -> dict[str, int]:
    """Every stream of UNIBUS with its message count, read with the service user; the health
    probe's own claims in the nonce bucket (one a second, ``unibus.auth.HEALTH_KEY``) left out."""
    from unibus.auth import HEALTH_KEY, NONCE_PREFIX

    async with Conn(w.daemon.nats_url, w.service_seed) as svc:
        js = svc.nc.jetstream(timeout=5)
        out = {}
        for s in await js.streams_info():
            info = await js.stream_info(s.config.name, subjects_filter=">")  # one reading: counts by subject
            out[s.config.name] = sum(n for subject, n in (info.state.subjects or {}).items()
                                     if not subject.startswith(f"{NONCE_PREFIX}{HEALTH_KEY}."))
        return out


# -- the configuration ---------------------------------------------------------------


def test_the_config_has_three_accounts_and_nothing_open(world):
    path = world.daemon.data_dir / "nats.conf"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for name in ("service.nkey", "system.nkey"):
        assert stat.S_IMODE((world.daemon.data_dir / name).stat().st_mode) == 0o600
    conf = json.loads(path.read_text())
    assert set(conf["accounts"]) == {"UNIBUS", "MEMBERS", "SYS"} and conf["system_account"] == "SYS"
    assert conf["accounts"]["UNIBUS"]["jetstream"] == "enabled"
    assert "jetstream" not in conf["accounts"]["MEMBERS"] and "jetstream" not in conf["accounts"]["SYS"]
    # no member is listed: every member connection goes through the auth callout
    assert conf["accounts"]["MEMBERS"] == {"limits": {"max_subscriptions": 1024}}  # and no "users"
    assert all(p.bus_pub not in path.read_text() for p in world.people.values())
    service = ensure_service_nkey(world.daemon.data_dir)[1]
    callout = conf["authorization"]["auth_callout"]
    assert set(conf["authorization"]) == {"timeout", "auth_callout"}  # no user outside the three accounts
    assert callout["account"] == "UNIBUS" and callout["auth_users"] == [service]
    assert callout["allowed_accounts"] == ["MEMBERS"] and callout["issuer"].startswith("A")
    issuer = world.daemon.data_dir / "plugins" / "auth_enforce" / "issuer.nkey"
    assert stat.S_IMODE(issuer.stat().st_mode) == 0o600
    assert stat.S_IMODE(issuer.parent.stat().st_mode) == 0o700
    assert issuer.read_text().strip() not in path.read_text()
    text = json.dumps(conf)
    for absent in ("no_auth_user", "allow_responses", "exports", "imports"):
        assert absent not in text, absent


async def test_each_identity_lands_in_its_account(world):
    async with world.member("bob"), Conn(world.daemon.nats_url, world.service_seed):
        connz = (await sys_request(world, "$SYS.REQ.SERVER.PING.CONNZ", {"auth": True, "limit": 1024}))["data"]
    accounts = {c.get("authorized_user"): c.get("account") for c in connz["connections"]}
    assert accounts["bob"] == "MEMBERS"  # a callout user is named by its handle
    assert accounts[ensure_service_nkey(world.daemon.data_dir)[1]] == "UNIBUS"
    for kwargs in ({}, {"nkeys_seed_str": generate_identity("mallory").bus_nkey_seed()}):
        with pytest.raises((nats.errors.Error, NoServersError)):
            await nats.connect(world.daemon.nats_url, allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=2, **kwargs)


async def test_members_have_no_jetstream(world):
    jsz = (await sys_request(world, "$SYS.REQ.SERVER.PING.JSZ", {"accounts": True}))["data"]
    assert [a["name"] for a in jsz.get("account_details") or []] == ["UNIBUS"]
    async with world.member("bob") as bob:
        sub = await bob.nc.subscribe("_INBOX_bob.js.>")
        await bob.nc.publish("$JS.API.INFO", b"", reply="_INBOX_bob.js.1")
        assert await bob.violation("$JS.API.INFO")
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)


# -- the 0.11 reply-subject trick ----------------------------------------------------------


def targets(w: World) -> dict[str, bytes]:
    """Subjects a member must never reach, with what an attacker would send there."""
    return {
        f"$JS.API.STREAM.PURGE.KV_{NONCE_BUCKET}": b"",
        f"$JS.API.STREAM.DELETE.KV_{NONCE_BUCKET}": b"",
        "$JS.API.STREAM.CREATE.copy": json.dumps({"name": "copy", "subjects": [f"unibus.room.{w.other}.>"],
                                                  "storage": "memory"}).encode(),
        f"$KV.{NONCE_BUCKET}.alice.forged-nonce-000001": b"1",
        f"unibus.room.{w.other}.chat": b"injected",
        "$SYS.REQ.SERVER.PING.CONNZ": b"{}",
    }


async def test_the_reply_subject_trick_reaches_nothing(world):
    before = await streams(world)
    async with world.member("bob") as bob, world.member("alice") as alice:
        injected = await alice.nc.subscribe(f"unibus.room.{world.other}.>")
        await alice.nc.flush()
        own = await bob.nc.subscribe(f"unibus.room.{world.room}.>")
        await bob.nc.flush()
        for subject, payload in targets(world).items():
            # bob publishes in his own room with reply subject X, receives his own message ...
            await bob.nc.publish(f"unibus.room.{world.room}.t", b"bait", reply=subject)
            msg = await own.next_msg(timeout=5)
            assert msg.reply == subject
            # ... and answers it: refused, and nobody answers him either
            await bob.nc.publish(msg.reply, payload)
            assert await bob.violation(subject), subject
            # the same subjects, published to directly
            await bob.nc.publish(subject, payload)
            assert await bob.violation(subject), subject
        assert not bob.nc.is_closed
        with pytest.raises(nats.errors.TimeoutError):
            await injected.next_msg(timeout=0.5)
    # nothing changed on the server: no stream purged, deleted or created, no nonce forged
    assert await streams(world) == before
    async with Conn(world.daemon.nats_url, world.service_seed) as svc:
        kv = await svc.nc.jetstream(timeout=5).key_value(NONCE_BUCKET)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get("alice.forged-nonce-000001")
    # and signed requests still work (their nonces are written as before)
    async with UnibusClient(world.daemon.base_url, world.people["alice"]) as a:
        assert (await a.me())["handle"] == "alice"
    assert (await streams(world))[f"KV_{NONCE_BUCKET}"] > before[f"KV_{NONCE_BUCKET}"]


# -- upgrading a 0.11 data dir ---------------------------------------------------------------


def _old_single_node(data_dir, members: list[Identity]) -> Callable[[dict[str, Any]], None]:
    """Stand in for 0.11: its single-account config (service user + members with allow_responses)."""
    _seed, service = ensure_service_nkey(data_dir)

    def old_config(config: dict[str, Any]) -> None:
        users = [{"nkey": service}] + [
            {"nkey": nkey_from_sign_pub(m.sign_pub), "permissions": {"publish": {"deny": [">"]}, "subscribe": {"allow": ["_INBOX_x.>"]},
                                                "allow_responses": True}} for m in members]
        config["authorization"] = {"users": users}

    return old_config


async def test_a_011_single_node_keeps_its_nonce_history(tmp_path, membershipd_factory):
    alice = generate_identity("alice")
    data_dir = tmp_path / "node"
    bootstrap_member(data_dir, alice, "admin")
    seed, _ = ensure_service_nkey(data_dir)
    old = NatsServer(data_dir, config_hook=_old_single_node(data_dir, [alice]))
    nonce = "seen-before-the-upgrade-0001"
    try:
        bus = Bus(old.url, seed)
        await bus.connect()
        try:  # 0.11's nonce bucket: file storage, TTL 2 x skew; a claim creates the key
            kv = await bus.js.create_key_value(config=KeyValueConfig(
                bucket=NONCE_BUCKET, history=1, ttl=120.0, replicas=1, storage=StorageType.FILE))
            await kv.create(f"alice.{nonce}", b"1")
            claimed = time.time()
        finally:
            await bus.close()
    finally:
        old.stop()
    assert (data_dir / "jetstream" / "jetstream" / "$G" / "streams" / f"KV_{NONCE_BUCKET}").is_dir()

    daemon = membershipd_factory(data_dir=data_dir)
    assert "upgrade from 0.11: moved the 0.11 JetStream data" in daemon.log_text()
    assert not (data_dir / "jetstream" / "jetstream" / "$G" / "streams").exists()
    async with Conn(daemon.nats_url, seed_of(data_dir / "service.nkey")) as svc:
        kv = await svc.nc.jetstream(timeout=5).key_value(NONCE_BUCKET)
        assert (await kv.get(f"alice.{nonce}")).value == b"1"
        # moved to memory storage (docs/operations.md, "Durability"), its nonces carried over
        info = await svc.nc.jetstream(timeout=5).stream_info(f"KV_{NONCE_BUCKET}")
        assert info.config.storage == StorageType.MEMORY
    assert "nonce bucket moved from file to memory storage" in daemon.log_text()
    # the history is in force: a request signed with that nonce is a replay
    await assert_replay(daemon, sign_request("GET", "/v1/me", None, keyid="alice", private_key=alice.sign_key,
                                             nonce=nonce))
    async with UnibusClient(daemon.base_url, alice) as a:
        assert (await a.me())["handle"] == "alice"
    # A second start moves nothing. The nonce carried over was in memory, and went with it: the
    # start writes it again from the store, so a restart soon after the upgrade refuses nothing
    # fresh. It refused every request created up to the claim + the skew it was accepted under,
    # /healthz degraded for up to a minute (a black-box test of the upgrade).
    daemon.stop()
    again = daemon.again().start()  # /healthz 200
    try:
        assert time.time() < claimed + 40, "the start took longer than this test can tell apart"
        assert again.log_text().count("moved the 0.11 JetStream data") == 1
        assert "1 nonce(s) carried over from the moved bucket written into this one" in again.log_text()
        async with UnibusClient(again.base_url, alice) as a:
            assert (await a.me())["handle"] == "alice"
        # and is in force: one created ahead of every request accepted since (0.11 kept no
        # high-water mark) passes the floor, and its nonce is there
        await assert_replay(again, sign_request("GET", "/v1/me", None, keyid="alice", private_key=alice.sign_key,
                                                nonce=nonce, created=int(claimed) + 40))
    finally:
        again.stop()


async def assert_replay(daemon: MembershipdProcess, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as s, s.get(daemon.base_url + "/v1/me", headers=headers) as r:
        body = await r.json(content_type=None)
        assert r.status == 401 and "replayed nonce" in body["detail"], (r.status, body)


def test_a_011_cluster_node_refuses_to_start(tmp_path):
    pki = tmp_path / "pki"
    ca = make_test_ca(pki, "route-ca")
    cert = make_test_cert(pki, "n1", ca)
    pass_file = tmp_path / "pass"
    pass_file.write_text("route-secret\n")
    pass_file.chmod(0o600)
    data_dir = tmp_path / "n1"
    streams_dir = data_dir / "jetstream" / "jetstream" / "$G" / "streams" / "KV_unibus_state"
    streams_dir.mkdir(parents=True)
    (streams_dir / "meta.inf").write_text("{}")
    migrate(data_dir / "membershipd.db", "0002")  # 0.11's database, which 0.11 must still open afterwards
    proc = run_membershipd(
        "serve", "--data-dir", str(data_dir), "--http-addr", f"127.0.0.1:{free_port()}",
        "--nats-addr", f"127.0.0.1:{free_port()}", "--nats-monitor-port", str(free_port()),
        "--server-name", "n1", "--cluster-name", "c", "--cluster-addr", f"127.0.0.1:{free_port()}",
        "--routes", f"nats://127.0.0.1:{free_port()}", "--cluster-pass-file", str(pass_file), "--kv-replicas", "3",
        "--route-tls-cert", str(cert[0]), "--route-tls-key", str(cert[1]), "--route-tls-ca", str(ca[0]),
        timeout=60)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "docs/operations.md" in errors[0] and "Upgrading from 0.11" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert streams_dir.is_dir() and not (data_dir / "jetstream" / "jetstream" / "UNIBUS").exists()
    # refused before the database was touched: it was migrated first (an upgrade rehearsal)
    assert stored_revision(data_dir / "membershipd.db") == "0002"


# nats-server imports these system services into every account, MEMBERS included: answered, they would
# name every member's connection (handle, address) or the caller's own rights.
ACCOUNT_SERVICES = ("$SYS.REQ.ACCOUNT.PING.CONNZ", "$SYS.REQ.ACCOUNT.PING.STATZ", "$SYS.REQ.USER.INFO",
                    "$SYS.REQ.ACCOUNT.MEMBERS.CONNZ", "$SYS.REQ.SERVER.PING")


async def test_a_member_reaches_no_system_service_and_subscribes_nowhere_else(world):
    """Adversary: an ordinary member (bob, in "ops"), asking the account's imported system services and
    subscribing beyond its rooms and inbox: wildcards, another member's inbox, another room, $SYS."""
    async with world.member("bob") as bob, world.member("carol") as carol:
        for subject in ACCOUNT_SERVICES:
            with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
                await bob.nc.request(subject, b"{}", timeout=1)
            assert await bob.violation(subject), subject
        for subject in (">", "*.>", "$SYS.>", "_INBOX_carol.>", "_INBOX.>", f"unibus.room.{world.other}.>",
                        "unibus.room.*.>", "unibus.>"):
            await bob.nc.subscribe(subject)
            await bob.nc.flush(timeout=2)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(
                    "permissions violation" in e and "subscription" in e and subject.lower() in e for e in bob.errors):
                await asyncio.sleep(0.02)
            assert any("permissions violation" in e and "subscription" in e and subject.lower() in e
                       for e in bob.errors), (subject, bob.errors[-3:])
        # carol's inbox stays hers: bob may not publish into it either
        inbox = await carol.nc.subscribe("_INBOX_carol.x")
        await carol.nc.flush()
        await bob.nc.publish("_INBOX_carol.x", b"spoofed reply")
        assert await bob.violation("_INBOX_carol.x")
        with pytest.raises(nats.errors.TimeoutError):
            await inbox.next_msg(timeout=0.5)
