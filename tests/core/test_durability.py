"""Durable acknowledged writes and the nonce epoch rule (docs/operations.md, "Durability").

Real daemons, real nats-servers, real SQLite. The attacker here holds a
request a member signed and the server accepted, and replays it after the
nonce bucket (memory storage) was lost: by a nats-server restart, a daemon
restart, a purge or a deletion of the bucket, or a reset that the claim
connection never saw. Each time the replay must be refused, and a freshly
signed request served again within seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from nats.js.api import KeyValueConfig, StorageType

from helpers import service_js
from unibus.auth import (DEFAULT_NONCE_MAX_BYTES, EPOCH_KEY, HIGH_WATER_STEP, NONCE_BUCKET, NONCE_MAX_BYTES_ENV,
                         NONCE_PREFIX, NONCE_STREAM, MemoryCarriedNonces, MemoryHighWater, NonceStore,
                         NonceStoreUnavailable,
                         ReplayFloorError, nonce_max_bytes_from_env)
from unibus.app import EXTRA
from unibus.bus import Bus
from unibus.client.keys import generate_identity
from unibus.errors import ConfigError
from unibus.natsconf import JETSTREAM_SYNC, base_config, check_config, finalize_config, render_config, write_config
from unibus.settings import HostPort, Settings
from unibus.signing import make_nonce, sign_request
from unibus.store.sqlite import HIGH_WATER_KEY
from unibus.supervisor import find_nats_server
from unibus.testing import MembershipdProcess, bootstrap_member, free_port, run_membershipd
from unibus.wire import MAX_AUTH_SKEW

WAIT = 20.0  # upper bound of every "eventually"; never a timing assertion


# -- helpers -----------------------------------------------------------------------------------


def signed(identity: Any, *, created: int | None = None) -> dict[str, str]:
    """Headers of a signed ``GET /v1/me`` (kept, to be replayed byte for byte)."""
    return sign_request("GET", "/v1/me", None, keyid=identity.handle, private_key=identity.sign_key, created=created)


async def send(daemon: MembershipdProcess, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as s, s.get(daemon.base_url + "/v1/me", headers=headers) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text else None), r.headers


async def fresh_until_served(daemon: MembershipdProcess, identity: Any) -> list[dict[str, Any]]:
    """Freshly signed requests until one is served; returns the refusals met on the way: each a 503,
    or a 401 ``nonce-lost`` for one signed in the second the loss was noticed in, both with
    ``Retry-After`` (sign it again)."""
    refusals = []
    deadline = time.monotonic() + WAIT
    while True:
        status, body, headers = await send(daemon, signed(identity))
        if status == 200:
            return refusals
        assert (status, body["type"].rsplit("/", 1)[-1]) in {(503, "nonce-store-unavailable"), (401, "nonce-lost")}, (
            status, body)
        assert headers.get("Retry-After"), body
        refusals.append(body)
        assert time.monotonic() < deadline, f"no fresh request served in {WAIT} s: {body}"
        await asyncio.sleep(0.25)


async def assert_refused_as_unverifiable(daemon: MembershipdProcess, request: dict[str, str]) -> None:
    """A request created at or before the floor after a loss, sent: never served. Its ``created``
    second began before the bucket's epoch was written (signed before the loss): 401 ``nonce-lost``,
    as a replay. Later (a clock behind the floor): 503, sign it again (docs/http-api.md)."""
    status, body, headers = await send(daemon, request)
    async with service_js(daemon) as js:
        epoch = json.loads((await js.get_msg(NONCE_STREAM, subject=NONCE_PREFIX + EPOCH_KEY)).data)
    assert created_of(request) <= epoch["floor"], (epoch, request)
    if created_of(request) < epoch["at"]:
        assert status == 401 and body["type"].endswith("/nonce-lost"), (status, body, epoch)
        assert headers.get("WWW-Authenticate") and int(headers["Retry-After"]) >= 1, headers
    else:
        assert status == 503 and body["type"].endswith("/nonce-store-unavailable"), (status, body, epoch)
        assert int(headers["Retry-After"]) >= 1


async def jetstream_config(daemon: MembershipdProcess) -> dict[str, Any]:
    """/varz ``jetstream.config`` of the daemon's nats-server, asked as membershipd's system user."""
    seed = (daemon.data_dir / "system.nkey").read_text().strip()
    nc = await nats.connect(daemon.nats_url, nkeys_seed_str=seed, allow_reconnect=False, connect_timeout=3)
    try:
        reply = await nc.request("$SYS.REQ.SERVER.PING.VARZ", b"", timeout=5)
        return json.loads(reply.data)["data"]["jetstream"]["config"]
    finally:
        await nc.close()


def stored_high_water(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'membershipd.db'}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT value FROM unibus_meta WHERE key = ?", (HIGH_WATER_KEY,)).fetchone()
    return int(row[0]) if row else 0


async def wait_for_log(daemon: MembershipdProcess, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + WAIT
    while daemon.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{daemon.log_text()[-3000:]}"
        await asyncio.sleep(0.05)


def start_daemon(tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None):
    alice = generate_identity("alice")
    data_dir = tmp_path / name
    bootstrap_member(data_dir, alice, "admin")
    daemon = MembershipdProcess(data_dir, args, env).start()
    return daemon, alice


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One fresh daemon for the checks that change nothing of its buckets."""
    daemon, alice = start_daemon(tmp_path_factory.mktemp("durable"), "daemon")
    daemon.identity = alice
    try:
        yield daemon
    finally:
        daemon.stop()


# -- JetStream fsyncs before it acknowledges -------------------------------------------------------


async def test_the_embedded_nats_server_fsyncs_every_acknowledged_write(shared):
    conf = json.loads((shared.data_dir / "nats.conf").read_text())
    assert conf["jetstream"]["sync_interval"] == JETSTREAM_SYNC == "always"
    js = await jetstream_config(shared)
    assert js["sync_always"] is True


def test_no_plugin_can_make_acknowledged_writes_lazy_again(tmp_path, caplog):
    settings = Settings(data_dir=tmp_path, nats_addr=HostPort("127.0.0.1", free_port()), server_name="t")
    for spelling in ({"sync_interval": "2m"}, {"SYNC": "10s"}, {"Sync_Interval": "always", "sync": "1s"}, {}):
        config = base_config(settings)
        js = config["jetstream"]
        js.pop("sync_interval")
        js.update(spelling)  # what a plugin's configure_nats might write
        finalize_config(config, settings)
        assert {k: v for k, v in config["jetstream"].items() if k.lower() in ("sync", "sync_interval")} == \
            {"sync_interval": "always"}, spelling
    assert "replaced by sync_interval='always'" in caplog.text
    path = tmp_path / "nats.conf"
    write_config(render_config(config), path)
    check_config(find_nats_server(), path)  # nats-server -t accepts it


# -- the nonce bucket ---------------------------------------------------------------------------------


async def test_the_nonce_bucket_is_memory_with_a_bound_and_an_epoch(shared):
    async with service_js(shared) as js:
        info = await js.stream_info(NONCE_STREAM)
        assert info.config.storage == StorageType.MEMORY
        assert info.config.max_bytes == DEFAULT_NONCE_MAX_BYTES
        assert info.config.max_age == 120.0  # 2 x --auth-skew
        assert info.config.num_replicas == 1
        epoch = await js.get_msg(NONCE_STREAM, subject=NONCE_PREFIX + EPOCH_KEY, direct=False)
    assert epoch.headers["Nats-TTL"] == "never"  # outlives the bucket's max age
    record = json.loads(epoch.data)
    assert record["floor"] == 0  # a new deployment: no request was ever accepted, nothing to refuse
    assert record["node"] and len(record["id"]) == 32


def test_nonce_max_bytes_from_the_environment():
    assert nonce_max_bytes_from_env({}) == DEFAULT_NONCE_MAX_BYTES
    assert nonce_max_bytes_from_env({NONCE_MAX_BYTES_ENV: " "}) == DEFAULT_NONCE_MAX_BYTES
    assert nonce_max_bytes_from_env({NONCE_MAX_BYTES_ENV: "8388608"}) == 8388608
    for bad in ("0", "1023", "-1", "1e9", "64MiB", "9" * 30, "x" * 100):
        with pytest.raises(ConfigError) as e:
            nonce_max_bytes_from_env({NONCE_MAX_BYTES_ENV: bad})
        assert str(e.value).startswith(f"{NONCE_MAX_BYTES_ENV}: ") and len(str(e.value)) < 160


def test_a_bad_nonce_max_bytes_is_refused_with_one_line(tmp_path):
    proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), env={NONCE_MAX_BYTES_ENV: "lots"}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"membershipd: error: {NONCE_MAX_BYTES_ENV}: ") and "number of bytes" in last
    assert "Traceback" not in proc.stderr


# -- the epoch rule, single node ------------------------------------------------------------------------


def created_of(headers: dict[str, str]) -> int:
    return int(headers["Signature-Input"].split("created=")[1].split(";")[0])


async def lose_nonces(daemon: MembershipdProcess, how: str) -> MembershipdProcess:
    """Lose the nonce bucket ``how``; returns the daemon serving afterwards (a new one for ``restart``)."""
    if how == "kill -9 nats-server":  # the supervisor restarts it; the memory bucket went with it
        old_pid = daemon.nats_pid()
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while daemon.nats_pid() in (None, old_pid):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        daemon.wait_healthy(timeout=WAIT)
        return daemon
    if how == "restart":
        assert daemon.stop() == 0
        return daemon.again().start()
    # Under a running nats-server, the claim connection up: emptied (as when every node
    # of a cluster crashed: the stream stays, with nothing in it), or deleted.
    epochs = daemon.log_text().count("nonce bucket: new epoch")
    async with service_js(daemon) as js:
        if how == "purge":
            await js.purge_stream(NONCE_STREAM)
        else:
            await js.delete_stream(NONCE_STREAM)
    await wait_for_log(daemon, "nonce bucket: new epoch", epochs + 1)
    return daemon


async def test_a_request_accepted_before_a_nonce_loss_is_refused_after_it(tmp_path):
    daemon, alice = start_daemon(tmp_path, "node", env={NONCE_MAX_BYTES_ENV: str(8 * 1024 * 1024)})
    served = [daemon]
    try:
        for how in ("kill -9 nats-server", "purge", "delete", "restart"):
            # accepted from a client whose clock runs 3 s ahead: the mark covers its created
            accepted = signed(alice, created=int(time.time()) + 3)
            assert (await send(daemon, accepted))[0] == 200, how
            assert stored_high_water(daemon.data_dir) >= created_of(accepted), how  # in SQLite before the claim
            unsent = signed(alice)  # signed before the loss, sent after it
            async with service_js(daemon) as js:
                before = json.loads((await js.get_msg(NONCE_STREAM, subject=NONCE_PREFIX + EPOCH_KEY)).data)
            daemon = await lose_nonces(daemon, how)
            served.append(daemon)
            # its nonce went with the bucket: without the floor these would be served
            await assert_refused_as_unverifiable(daemon, accepted)
            await assert_refused_as_unverifiable(daemon, unsent)
            refusals = await fresh_until_served(daemon, alice)
            # seconds (the 3 s this client signed ahead), not --auth-skew: a bound on retries, not a timing
            assert len(refusals) <= 4 * (HIGH_WATER_STEP + 5), how
            await assert_refused_as_unverifiable(daemon, accepted)  # and it stays refused
            async with service_js(daemon) as js:
                info = await js.stream_info(NONCE_STREAM)
                after = json.loads((await js.get_msg(NONCE_STREAM, subject=NONCE_PREFIX + EPOCH_KEY)).data)
            assert info.config.storage == StorageType.MEMORY and info.config.max_bytes == 8 * 1024 * 1024, how
            assert after["id"] != before["id"] and after["floor"] >= created_of(accepted), how
        assert "Traceback" not in daemon.log_text()
    finally:
        for d in served:
            d.stop()


async def test_the_first_request_signed_after_a_restart_is_served(tmp_path):
    """A restart of membershipd loses the nonces (memory), and the new epoch's floor is the last
    second a request may have been accepted in. The floor was 2 s past it, and the port opened
    before it had passed: the first request signed after a restart, as an acceptance test makes
    it once ``/healthz`` answers, was refused 503 (8 restarts of 8, 0.7 s each). A start now
    waits for the floor before it opens HTTP, and the floor is that second itself.

    And the replay of a request accepted before the restart is a replay, 401, as the contract has
    it: it was 503 (sign it again), since its nonce went with the bucket (a black-box test)."""
    daemon, alice = start_daemon(tmp_path, "node")
    try:
        for _ in range(3):
            accepted = signed(alice)
            assert (await send(daemon, accepted))[0] == 200
            daemon.stop()
            daemon = daemon.again().start()  # /healthz answers 200
            status, body, _headers = await send(daemon, signed(alice))
            assert status == 200, body
            status, body, headers = await send(daemon, accepted)  # the replay still is not served
            assert status == 401 and body["type"].endswith("/nonce-lost"), (status, body)
            assert headers["WWW-Authenticate"] == 'Signature alg="ed25519"' and int(headers["Retry-After"]) >= 1
            await assert_refused_as_unverifiable(daemon, accepted)
    finally:
        daemon.stop()


async def test_healthz_is_degraded_while_the_floor_refuses_every_fresh_request(tmp_path):
    """A restart whose floor is still ahead of the clock once the start's 3 s wait is over (a
    client signed ahead of it) refuses every request signed now (503) until it passes: /healthz
    said ``ok`` meanwhile (a black-box test of the contract, after an upgrade: the move of a 0.11
    bucket raised the mark a minute ahead). It is ``degraded`` now, and a warning says until when."""
    daemon, alice = start_daemon(tmp_path, "node")
    try:
        ahead = signed(alice, created=int(time.time()) + 12)  # inside the 60 s skew: accepted
        assert (await send(daemon, ahead))[0] == 200
        daemon.stop()
        daemon = daemon.again().start(wait=False)
        daemon.wait_healthy(timeout=WAIT, want=503)
        status, body = daemon.healthz()
        floor = created_of(ahead)
        if status == 503:  # else the floor passed in between (a very slow start): nothing left to see
            assert body["status"] == "degraded" and body["nats"]["connected"] and body["nats"]["jetstream"], body
            assert any(f"created at or before {floor} are refused for about" in w for w in body["warnings"]), body
            await assert_refused_as_unverifiable(daemon, signed(alice))  # what the warning says
        assert time.time() < floor + 1 + WAIT
        body = daemon.wait_healthy(timeout=WAIT)  # the floor passed: ok again, no warning
        assert time.time() >= floor + 1 and "warnings" not in body, body
        assert (await send(daemon, signed(alice)))[0] == 200
        await assert_refused_as_unverifiable(daemon, ahead)
    finally:
        daemon.stop()


def test_a_request_claimed_after_its_window_closed_is_refused(unibus_app):
    """A request is served only if it is still fresh once its nonce is claimed. One that waited
    for a lost bucket to be made again was claimed after its window had closed: a nonce kept only
    as long as its request is fresh (the ones carried over from 0.11) may have expired by then,
    and a review replayed such a request that way. Here the recovery is held while the window
    closes; the claim then succeeds (a new nonce), and the request is refused as expired."""
    app = unibus_app(args=["--auth-skew", "1"])
    nonces = app.app[EXTRA]["nonces"]

    async def hold() -> int:
        nonces._lost("the test holds the recovery")
        await nonces._lock.acquire()
        return nonces.claims

    async def release() -> int:
        nonces._lock.release()
        return nonces.claims

    claims = app.run(hold())
    try:
        headers = signed(app.admin.identity, created=int(time.time()) + 1)  # fresh for 1 to 2 s more
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(asyncio.run, send(app, headers))
            deadline = time.monotonic() + WAIT
            while time.time() <= created_of(headers) + 1.5:  # its window closes while it waits
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert not answer.done()
            claimed = app.run(release())
            status, body, _headers = answer.result(WAIT)
    finally:
        if nonces._lock.locked():
            app.run(release())
    assert status == 401 and body["detail"] == "signature expired (created is too old)", (status, body)
    assert app.run(claims_of(nonces)) == claims + 1 and claimed == claims  # its claim went through first
    assert asyncio.run(send(app, signed(app.admin.identity)))[0] == 200


async def claims_of(nonces: NonceStore) -> int:
    return nonces.claims


# -- NonceStore alone, against a bare nats-server ---------------------------------------------------------


@contextlib.asynccontextmanager
async def nonce_stores(url: str, n: int, *, skew: int = 60, watch: bool = False, mark: MemoryHighWater | None = None,
                       **kwargs: Any):
    """``n`` NonceStores (as many nodes) sharing one high-water mark (``mark``, else a new one), each
    with its own connections."""
    mark = MemoryHighWater() if mark is None else mark
    buses, stores = [], []
    try:
        for i in range(n):
            bus = Bus(url, name=f"node{i}")
            buses.append(bus)
            await bus.connect()
            store = NonceStore(bus, skew=skew, replicas=1, high_water=mark, timeout=2.0, **kwargs)
            stores.append(store)
            await store.ensure()
            if watch:
                await store.start()
            else:
                await store.acks.connect()  # claims without the periodic epoch check
        yield stores, mark
    finally:
        for store in stores:
            await store.close()
        for bus in buses:
            await bus.close()


async def test_a_claim_that_lands_in_a_new_bucket_is_refused(nats_server):
    """The reset no connection saw: the claim's sequence goes backwards, the epoch is checked."""
    async with nonce_stores(nats_server.url, 2) as ((a, b), mark):
        now = time.time()
        seen = []
        for _ in range(5):
            nonce = make_nonce()
            await a.admit(int(now), now)
            assert await a.claim("alice", nonce)
            seen.append(nonce)
        assert mark.value >= int(now)
        await b.bus.js.delete_stream(NONCE_STREAM)
        await b.ensure()  # node b re-creates the bucket: new epoch, floor = the shared mark
        assert b.floor == mark.value
        # node a still believes in the old bucket: the replay passes its floor, lands in the new bucket...
        await a.admit(int(now), now)
        with pytest.raises(NonceStoreUnavailable, match="reset"):
            await a.claim("alice", seen[0])
        # ... and is refused; from now on a knows the new floor
        with pytest.raises(ReplayFloorError) as e:
            await a.admit(int(now), time.time())
        assert e.value.floor == b.floor and a.floor == b.floor and a.resets == 1


class _SlowMark(MemoryHighWater):
    """A shared high-water mark whose writes take a while (a KV write of a cluster's)."""

    async def raise_nonce_high_water(self, value: int) -> int:
        await asyncio.sleep(0.05)
        return await super().raise_nonce_high_water(value)


async def _adopt_current_epoch(store: NonceStore) -> None:
    """What a node's epoch watch does when another node wrote a new ``_epoch``."""
    raw = await store._read_epoch()
    async with store._lock:
        store._adopt(raw, await store.high_water_store.nonce_high_water(), store._reconnects)


async def test_a_new_epoch_adopted_while_a_request_is_admitted_or_claimed_is_checked(nats_server):
    """A review (two nodes sharing the mark, a reset of the bucket by the other node): a node that
    adopted the new epoch while it raised the mark for a replay never checked the replay against
    the new floor, and its claim, in the new bucket, passed the sequence check (the adopt reset
    it): the replay was served. Admission now checks the epoch again after the raise, and a claim
    whose epoch changed while it was out is refused."""
    async with nonce_stores(nats_server.url, 2, mark=_SlowMark()) as ((a, b), _mark):
        for _ in range(20):  # a is busy at an earlier second (its sequence check has a high mark)
            await a.admit(int(time.time()) - 5, time.time())
            assert await a.claim("bob", make_nonce())
        now = time.time()
        created, nonce = int(now) + 1, make_nonce()  # from a client a second ahead, accepted by b
        await b.admit(created, now)
        assert await b.claim("alice", nonce)
        await b.bus.js.delete_stream(NONCE_STREAM)
        await b.ensure()  # b makes the bucket again: new epoch, its floor covers the request
        assert b.floor >= created
        replay = asyncio.create_task(a.admit(created, time.time()))  # a raises the mark for it (50 ms) ...
        await asyncio.sleep(0.01)
        await _adopt_current_epoch(a)  # ... while its watch adopts b's epoch
        with pytest.raises(ReplayFloorError):
            await replay
        # the claim's own window: the epoch changes between the claim's send and its answer
        later, fresh = a.floor + 1, make_nonce()  # past the new floor
        await a.admit(later, time.time())
        real = a.acks.request

        async def request_then_reset(*args: Any) -> Any:
            answer = await real(*args)
            await b.bus.js.delete_stream(NONCE_STREAM)
            await b.ensure()
            await _adopt_current_epoch(a)
            return answer

        a.acks.request = request_then_reset
        with pytest.raises(NonceStoreUnavailable, match="epoch changed during the claim"):
            await a.claim("alice", fresh)


async def test_the_epoch_outlives_the_bucket_ttl(nats_server):
    async with nonce_stores(nats_server.url, 1, skew=1, watch=True) as ((store,), _mark):
        epoch = store._epoch_raw
        now = time.time()
        await store.admit(int(now), now)
        nonce = make_nonce()
        assert await store.claim("alice", nonce)
        js = store.bus.js
        deadline = time.monotonic() + WAIT
        while (await js.stream_info(NONCE_STREAM)).state.messages > 1:  # the nonce expires (2 s max age)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        msg = await js.get_msg(NONCE_STREAM, subject=NONCE_PREFIX + EPOCH_KEY, direct=False)
        assert bytes(msg.data) == epoch
        await asyncio.sleep(1.5)  # a check of the epoch ran: no loss seen
        assert store.resets == 0 and store._epoch_raw == epoch and store.floor is not None


@pytest.mark.parametrize("exclusive", [True, False])
async def test_a_file_bucket_moves_to_memory_with_its_nonces(nats_server, exclusive):
    bus = Bus(nats_server.url)
    await bus.connect()
    try:
        kv = await bus.js.create_key_value(config=KeyValueConfig(
            bucket=NONCE_BUCKET, history=1, ttl=120.0, replicas=1, storage=StorageType.FILE))
        old = [make_nonce() for _ in range(300)]
        t0 = int(time.time())
        for nonce in old:
            await kv.create(f"alice.{nonce}", b"1")
    finally:
        await bus.close()
    async with nonce_stores(nats_server.url, 1, exclusive=exclusive) as ((store,), mark):
        info = await store.bus.js.stream_info(NONCE_STREAM)
        assert info.config.storage == StorageType.MEMORY
        assert info.state.messages == len(old) + 1  # every nonce, and the _epoch
        assert mark.value >= t0 + 60  # raised before the old bucket went: a crash there loses nothing
        for nonce in old[:20]:
            assert await store.claim("alice", nonce) is False  # still replays
        # nothing keeps the nonces across the next loss here (membershipd's store does: the next
        # tests): the floor covers them until they cannot be fresh any more
        assert store.floor == mark.value >= t0 + 60


@pytest.mark.parametrize(("claims", "old_ttl"), [(0, 120), (50, 120), (50, 600), (50, 60)])
async def test_a_move_of_its_own_bucket_raises_the_mark_only_as_far_as_its_nonces_need(nats_server, claims, old_ttl):
    """On a single node (the bucket is its own) the move raised the mark to now + skew whatever
    the bucket held, and the mark is the floor after the next restart: a restart within a minute
    of an upgrade from 0.11 refused every signed request for up to a minute (a black-box test of
    the contract). A nonce claimed at t came with a ``created`` of at most t + the skew it was
    accepted under: the mark is raised that far for the latest claim, and not at all for an empty
    bucket but to now minus that skew (a request whose nonce expired before the move was created
    before that, and a longer window would take it again: a review). Nothing keeps the nonces
    across the next loss here (membershipd's store does: the tests below), so the new bucket's
    floor is the mark."""
    bus = Bus(nats_server.url)
    await bus.connect()
    try:
        kv = await bus.js.create_key_value(config=KeyValueConfig(
            bucket=NONCE_BUCKET, history=1, ttl=float(old_ttl), replicas=1, storage=StorageType.FILE))
        for _ in range(claims):
            await kv.create(f"alice.{make_nonce()}", b"1")
        last_claim = time.time()
    finally:
        await bus.close()
    await asyncio.sleep(2.5)  # the move comes later than the claims, as an upgrade does
    moved_at = int(time.time())
    old_skew = old_ttl // 2  # what the bucket's requests were accepted under
    async with nonce_stores(nats_server.url, 1, exclusive=True) as ((store,), mark):  # skew 60
        info = await store.bus.js.stream_info(NONCE_STREAM)
        assert info.config.storage == StorageType.MEMORY and info.config.max_age == 120.0
        assert info.state.messages == claims + 1  # every nonce, and the _epoch
        if claims:
            assert int(last_claim) + old_skew <= mark.value <= math.ceil(last_claim) + old_skew
        else:
            assert moved_at - old_skew <= mark.value <= int(time.time()) - old_skew  # nothing fresh refused
        if old_ttl <= 120:
            assert mark.value < moved_at + 60
        assert store.floor == mark.value  # refused until their requests cannot be fresh


async def file_bucket(url: str, ttl: float, claims: int) -> tuple[list[str], float]:
    """A bucket as 0.11 made it (file storage, max age ``ttl``) with ``claims`` of alice's nonces;
    returns them and the time of the last claim."""
    bus = Bus(url)
    await bus.connect()
    try:
        kv = await bus.js.create_key_value(config=KeyValueConfig(
            bucket=NONCE_BUCKET, history=1, ttl=ttl, replicas=1, storage=StorageType.FILE))
        nonces = [make_nonce() for _ in range(claims)]
        for nonce in nonces:
            await kv.create(f"alice.{nonce}", b"1")
        return nonces, time.time()
    finally:
        await bus.close()


@pytest.mark.parametrize("old_ttl", [120, 60, 240])
async def test_a_single_node_gives_the_nonces_it_carried_over_to_every_new_bucket(nats_server, old_ttl):
    """The move of a single node's 0.11 bucket raised the mark for the latest claim + the skew it
    was accepted under: the floor of the bucket after the next restart, so a restart within a
    minute of the upgrade refused every fresh request (a black-box test of the upgrade). The
    nonces are kept in the store with their claims, each new bucket gets them again, and the
    mark is now minus the old skew, which refuses nothing fresh (a request whose nonce expired
    before the move was created before that)."""
    old_skew = old_ttl // 2
    old, last_claim = await file_bucket(nats_server.url, float(old_ttl), 50)
    carried = MemoryCarriedNonces()
    moved_at = int(time.time())
    async with nonce_stores(nats_server.url, 1, exclusive=True, carried=carried) as ((store,), mark):  # skew 60
        info = await store.bus.js.stream_info(NONCE_STREAM)
        if old_skew > 60:  # fresh for longer than a bucket of 60 s keeps anything: the floor covers them
            assert info.state.messages == 1 and store.floor == math.ceil(last_claim + old_skew)
            assert mark.value < store.floor and carried.record is not None
            return
        assert info.config.storage == StorageType.MEMORY and info.state.messages == len(old) + 1
        assert carried.record is not None
        record = json.loads(carried.record)
        assert record["skew"] == old_skew
        assert sorted(key for key, _claimed in record["nonces"]) == sorted(f"alice.{n}" for n in old)
        assert all(moved_at - 10 <= claimed <= last_claim + 0.001 for _key, claimed in record["nonces"])
        assert moved_at - old_skew <= mark.value == store.floor <= int(time.time()) - old_skew
        for nonce in old[:10]:
            assert await store.claim("alice", nonce) is False
        await store.bus.js.delete_stream(NONCE_STREAM)  # lost, as a restart of its nats-server loses it
    floor = mark.value
    for _restart in range(2):
        async with nonce_stores(nats_server.url, 1, exclusive=True, carried=carried, mark=mark) as ((store,), _):
            assert store.floor == floor  # refuses nothing fresh
            for nonce in old:
                assert await store.claim("alice", nonce) is False  # written again
            assert await store.claim("alice", make_nonce()) is True
            await store.bus.js.delete_stream(NONCE_STREAM)
    # once no skew can make their requests fresh again, the record goes and nothing is written
    record = json.loads(carried.record)
    record["nonces"] = [[key, int(time.time()) - old_skew - MAX_AUTH_SKEW - 1] for key, _c in record["nonces"]]
    carried.record = json.dumps(record)
    async with nonce_stores(nats_server.url, 1, exclusive=True, carried=carried, mark=mark) as ((store,), _):
        assert carried.record is None and store.floor == mark.value
        assert (await store.bus.js.stream_info(NONCE_STREAM)).state.messages == 1  # the epoch


async def test_a_later_start_keeps_the_carried_nonces_as_long_as_its_own_skew_needs(nats_server):
    """A 0.11 request claimed at t was created at most t + the old skew, and is fresh until that +
    the skew of whichever start serves it: the expiries were fixed at the move, and a restart with
    a longer --auth-skew let such a request be replayed once its nonce had gone; with a shorter
    one the bucket's max age dropped it early (a review). Each start works them out again: written
    with what its skew needs, or, past its bucket's max age, covered by the floor."""
    old, last_claim = await file_bucket(nats_server.url, 120.0, 20)  # 0.11 ran with the default 60 s
    carried, mark = MemoryCarriedNonces(), MemoryHighWater()
    async with nonce_stores(nats_server.url, 1, exclusive=True, carried=carried, mark=mark) as ((store,), _):
        await store.bus.js.delete_stream(NONCE_STREAM)
    async with nonce_stores(nats_server.url, 1, skew=300, exclusive=True, carried=carried, mark=mark) as ((s,), _):
        assert s.floor == mark.value  # nothing fresh refused
        msg = await s.bus.js.get_msg(NONCE_STREAM, subject=f"{NONCE_PREFIX}alice.{old[0]}")
        # fresh until the claim + 60 (its created at most) + 300 (this skew)
        assert int(msg.headers["Nats-TTL"]) >= last_claim + 360 - time.time() - 5
        for nonce in old:
            assert await s.claim("alice", nonce) is False
        await s.bus.js.delete_stream(NONCE_STREAM)
    async with nonce_stores(nats_server.url, 1, skew=10, exclusive=True, carried=carried, mark=mark) as ((s,), _):
        # needed for about 70 s, and a bucket of this skew keeps nothing past 20 s: the floor covers them
        assert s.floor == math.ceil(last_claim + 60)
        assert (await s.bus.js.stream_info(NONCE_STREAM)).state.messages == 1
        with pytest.raises(ReplayFloorError):
            await s.admit(math.ceil(last_claim + 60), time.time())
    assert carried.record is not None  # a later start with a longer skew needs them again


async def test_nonces_carried_over_that_cannot_be_written_leave_the_floor_at_their_cover(nats_server):
    """Fail safe: a kept nonce that does not make it into the new bucket (here a key JetStream
    refuses) could be replayed; the floor is then the latest claim + the old skew, as without
    them. An unreadable record refuses the longest skew, durably, and is removed."""
    carried = MemoryCarriedNonces()
    now = int(time.time())
    carried.record = json.dumps({"skew": 30, "nonces": [["alice.kept-nonce-00000001", now],
                                                        ["alice..not-a-key", now]]})
    async with nonce_stores(nats_server.url, 1, exclusive=True, carried=carried) as ((store,), mark):
        assert store.floor == now + 30 and mark.value == 0
        assert await store.claim("alice", "kept-nonce-00000001") is False
        await store.bus.js.delete_stream(NONCE_STREAM)
    carried.record = '{"skew": '  # only membershipd writes it; should it be cut short
    async with nonce_stores(nats_server.url, 1, exclusive=True, carried=carried) as ((store,), mark):
        # whatever skew 0.11 ran with (its claims were at most now, their created at most 600 s later)
        assert now + MAX_AUTH_SKEW <= store.floor == mark.value <= int(time.time()) + MAX_AUTH_SKEW
        assert carried.record is None


async def test_the_store_keeps_carried_nonces_durably(tmp_path):
    """membershipd's SQLite store keeps the record (a row of ``unibus_meta``) and removes it."""
    from unibus.store.db import migrate
    from unibus.store.sqlite import SqliteStore

    db = tmp_path / "membershipd.db"
    migrate(db)
    store = SqliteStore(db)
    try:
        assert await store.carried_nonces() is None
        await store.keep_carried_nonces('{"skew": 1, "nonces": []}')
        await store.keep_carried_nonces('{"skew": 2, "nonces": []}')
    finally:
        await store.close()
    store = SqliteStore(db)
    try:
        assert await store.carried_nonces() == '{"skew": 2, "nonces": []}'
        await store.keep_carried_nonces(None)
        assert await store.carried_nonces() is None
        await store.keep_carried_nonces(None)
    finally:
        await store.close()


@pytest.mark.parametrize("at", ["Infinity", "NaN", "1e400", "-1", "true", '"1796670000"', "null", "FUTURE"])
async def test_an_epoch_whose_at_is_no_time_leaves_a_floor_refusal_a_503(nats_server, at):
    """Whoever can write the bucket writes ``_epoch``; an ``at`` that is not a finite time at most
    a few seconds ahead says nothing of when the epoch began (Infinity made ``int()`` raise, a 500;
    a review): a request under the floor is then 503, sign it again, as before ``at`` was read."""
    async with nonce_stores(nats_server.url, 1) as ((store,), _mark):
        now = time.time()
        text = str(int(now) + 3600) if at == "FUTURE" else at
        raw = f'{{"floor": {int(now) - 10}, "at": {text}, "id": "x", "node": "y"}}'.encode()
        store._adopt(raw, 0, store.acks.reconnects)
        assert store.epoch_at is None and store.floor == int(now) - 10
        with pytest.raises(ReplayFloorError) as e:
            await store.admit(int(now) - 20, now)
        assert e.value.before_epoch is False
        # a good one is used: created in a second before it is refused as a replay would be
        store._adopt(f'{{"floor": {int(now) - 10}, "at": {now - 5}, "id": "z", "node": "y"}}'.encode(), 0,
                     store.acks.reconnects)
        assert store.epoch_at == now - 5
        with pytest.raises(ReplayFloorError) as e:
            await store.admit(int(now) - 20, now)
        assert e.value.before_epoch is True
