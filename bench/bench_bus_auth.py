"""Bus authorization benchmark: how fast a membership change reaches the bus, and what enforcing costs.

Run with ``.venv/bin/python bench/bench_bus_auth.py [--runs 5]``. Not a test:
it prints markdown tables and writes them into docs/benchmarks.md between the
``bench:busauth`` markers (other sections of that file are kept). With
``--only throughput`` it measures only the publish throughput (the last part
below) and rewrites only its subsection, between the ``bench:busauth-throughput``
markers nested in that section.

At each membership size (10, 1,000 and 10,000 members by default; members are
written straight into a fresh SQLite store before the daemon starts, each in
one or two rooms of ten) a real ``membershipd serve`` (embedded nats-server,
``--bus-auth enforce``) is started and, with real nats-py connections:

* (a) revocation: a member subscribed to its room is removed from it
  (``DELETE /v1/rooms/{id}/members/{h}``). A second member publishes numbered
  probes in the room every 2 ms while the request runs; afterwards a barrier
  (the publisher's own echo, then a PING/PONG on the revoked connection) makes
  sure every probe that was going to be delivered has been. The first probe
  that did not arrive marks when the revocation took effect, given as an
  offset from the 2xx (negative: before the client had its answer). Also the
  arrival of the server's permissions-violation error, whether any probe sent
  after the 2xx still arrived (a leak), and the HTTP latency of the DELETE;
* (b) grant: ``PUT /v1/rooms/{id}/members/{h}``, then a fresh subscription
  right after the 2xx, retried every 2 ms while nats-server refuses it (a
  permissions violation before the PONG of a round trip): time from the 2xx
  to the first accepted subscription, whether it then receives the room's
  next message, and the HTTP latency of the PUT;
* (c) deletion: ``DELETE /v1/members/{h}`` of a member with a live
  connection: time from the 2xx to the connection's close (negative: closed
  before the answer), and the HTTP latency;
* where the time of a change goes: a signed request that changes nothing
  (``GET /v1/me``: signature check and nonce in JetStream KV) as the HTTP
  floor, a write that needs no reload (``PATCH`` of a role), and the first
  signed request after a member change (the member directory reloads); ``unibus.daemon.nats_config`` run in this process against the same
  database (what the daemon does before every reload), split into reading the
  membership, building the authorization block, rendering and writing the
  file; and nats-server's own reload, timed on a bare nats-server started with
  a copy of the daemon's generated nats.conf (own ports and store dir) from
  ``kill -HUP`` to its "Reloaded server configuration" line, alternating
  between two configs that differ in one user's permissions, with the
  permission blocks and, for comparison, with the same users without them;
  plus ``nats-server -t`` on both (parsing and checking only), and what cutting
  one connection without a reload costs: ``$SYS.REQ.SERVER.<id>.KICK`` (on a
  bare server with the generated config plus a system account) to the close.

The daemon's log is checked for 2xx answers sent before nats-server confirmed
the reload (the store's ``CHANGE_APPLY_TIMEOUT``).

Then publish throughput through the embedded server, enforce on and off in the
same script: one member publishes ``--msgs`` messages of ``--msg-size`` bytes on
its room's subject (or cycling through 1,000 subjects of the room, which
defeats nats-server's per-connection permission cache) while another member
of the room receives them; msgs/s end to end and nats-server CPU per message.
With enforce both log in with their bus keys (``MEMBERS`` account); with off
they connect anonymously. The ratios enforce/off are taken run by run.

Every process started here is stopped in a ``finally``; everything listens on
127.0.0.1.
"""

from __future__ import annotations

import benchdoc  # noqa: E402  (bench/ is on sys.path when run as a script)
import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
from sqlalchemy.orm import Session
from unibus.client import UnibusClient
from unibus.client.keys import Identity, generate_identity
from unibus.daemon import RECONFIGURE_DEBOUNCE
from unibus.natsconf import render_config, write_config
from unibus.store import models as m
from unibus.store.db import make_engine, migrate
from unibus.store.sqlite import (
    add_member_sync,
    new_member,
    new_room_id,
    read_membership,
)
from unibus.supervisor import RELOADED_MARKER, find_nats_server
from unibus.testing import MembershipdProcess, free_port
from unibus.wire import nkey_from_public_key

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Bus authorization"
TP_SECTION = "busauth-throughput"  # nested in the busauth section; --only throughput rewrites it alone
ROOM_SIZE = 10  # members per filler room
PROBE_INTERVAL = 0.002
AIM_MS = {1000: 100.0, 10000: 1000.0}  # issue 5: revocation in effect within this long of the 2xx
HEALTHY_TIMEOUT = 120.0


def now() -> float:
    return time.perf_counter()


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(x: float, digits: int = 0) -> str:
    return "–" if math.isnan(x) else f"{x * 1000:.{digits}f}"


def cell(xs: Sequence[float], digits: int = 0) -> str:
    """median (min…max) in ms."""
    if not xs:
        return "–"
    return f"{ms(med(xs), digits)} ({ms(min(xs), digits)}…{ms(max(xs), digits)})"


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- a world: members written straight into a fresh store ------------------------


@dataclass
class World:
    data_dir: Path
    members: int
    rooms: int
    memberships: int
    room_id: str  # the room the probes happen in
    ids: dict[str, Identity]


def build_world(data_dir: Path, total: int, specials: Sequence[str], in_room: Sequence[str]) -> World:
    """A migrated store with ``total`` members: an admin, the ``specials`` (real
    identities) and fillers (random keys, never connected), every filler in one
    room of ten and every other filler in a second one; the specials named in
    ``in_room`` share one room. One transaction."""
    data_dir.mkdir(mode=0o700, parents=True)
    db = data_dir / "membershipd.db"
    migrate(db)
    ids = {h: generate_identity(h) for h in ("admin", *specials)}
    fillers = max(0, total - len(ids))
    t = datetime.now(UTC)
    engine = make_engine(db)
    memberships = 0
    try:
        with Session(engine) as s, s.begin():
            add_member_sync(s, new_member("admin", "admin", ids["admin"].sign_pub, ids["admin"].enc_pub, "X25519",
                                          ids["admin"].bus_pub))
            for h in specials:
                add_member_sync(s, new_member(h, "member", ids[h].sign_pub, ids[h].enc_pub, "X25519", ids[h].bus_pub))
            room_id = new_room_id()
            s.add(m.Room(room_id=room_id, name="bench", owner="admin", epoch=0, rekey_required=True, created_at=t))
            s.add_all(m.RoomMember(room_id=room_id, handle=h, added_at=t) for h in in_room)
            memberships += len(in_room)
            handles = [f"f{j:05d}" for j in range(fillers)]
            s.add_all(m.Member(handle=h, role="member", sign_pub=os.urandom(32), enc_pub=os.urandom(32),
                               enc_suite="X25519", created_at=t, bus_pub=nkey_from_public_key(os.urandom(32)))
                      for h in handles)
            n_rooms = (fillers + ROOM_SIZE - 1) // ROOM_SIZE
            rooms = [new_room_id() for _ in range(n_rooms)]
            s.add_all(m.Room(room_id=r, name=f"r{i}", owner=handles[i * ROOM_SIZE], epoch=0, rekey_required=True,
                             created_at=t) for i, r in enumerate(rooms))
            s.flush()
            links = []
            for j, h in enumerate(handles):
                home = j // ROOM_SIZE
                links.append((rooms[home], h))
                if j % 2 == 0 and n_rooms > 1:
                    links.append((rooms[(home + 1) % n_rooms], h))
            s.add_all(m.RoomMember(room_id=r, handle=h, added_at=t) for r, h in links)
            memberships += len(links)
    finally:
        engine.dispose()
    return World(data_dir, len(ids) + fillers, n_rooms + 1, memberships, room_id, ids)


# -- nats-py connections ----------------------------------------------------------


class Conn:
    """A member's NATS connection that timestamps the server's errors and its own close."""

    def __init__(self, url: str, identity: Identity | None) -> None:
        self.url, self.identity = url, identity
        self.errors: list[tuple[float, str]] = []
        self.closed_at: float | None = None
        self.nc: Any = None

    async def connect(self) -> Conn:
        async def error_cb(e: Exception) -> None:
            self.errors.append((now(), str(e)))

        async def gone() -> None:
            if self.closed_at is None:
                self.closed_at = now()

        creds: dict[str, Any] = {}
        if self.identity is not None:
            creds = {"nkeys_seed_str": self.identity.bus_nkey_seed(), "inbox_prefix": f"_INBOX_{self.identity.handle}"}
        self.nc = await nats.connect(self.url, error_cb=error_cb, disconnected_cb=gone, closed_cb=gone,
                                     allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5,
                                     pending_size=8 * 1024 * 1024, **creds)
        return self

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()

    def violations_since(self, t: float) -> list[float]:
        return [ts for ts, e in self.errors if ts >= t and "permissions violation" in e.lower()]


async def server_saw_everything(conn: Conn) -> None:
    """Return once nats-server has processed everything sent so far on ``conn`` and
    everything it queued for ``conn`` before that has arrived.

    Two flushes: nats-py 2.16 writes the PING of ``flush()`` to the socket at
    once while SUB/PUB wait in its pending buffer for the flusher task, so one
    PONG can come back before the server saw a SUB sent just before (the
    project's client does the same in ``unibus.client.api._barrier``).
    """
    await conn.nc.flush(timeout=10)
    await conn.nc.flush(timeout=10)


class Echo:
    """The publisher's own subscription to the room: a barrier for "the server routed it"."""

    def __init__(self, pub: Conn, subject: str) -> None:
        self.pub, self.subject = pub, subject
        self.waiting: dict[bytes, asyncio.Future[None]] = {}
        self.counter = 0

    async def start(self) -> None:
        async def cb(msg: Any) -> None:
            fut = self.waiting.pop(msg.data, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

        await self.pub.nc.subscribe(f"{self.subject}.mark", cb=cb)
        await server_saw_everything(self.pub)

    async def barrier(self, *others: Conn, drain: Sequence[Any] = ()) -> None:
        """Publish a marker, wait for its echo (everything published before it has
        been routed), then PING/PONG each other connection (everything routed to
        it has arrived), then wait until the callbacks of the ``drain``
        subscriptions have run for every message that arrived."""
        self.counter += 1
        token = f"m{self.counter}".encode()
        fut = asyncio.get_running_loop().create_future()
        self.waiting[token] = fut
        await self.pub.nc.publish(f"{self.subject}.mark", token)
        await asyncio.wait_for(fut, 10)
        for o in others:
            if o.nc.is_connected:
                await server_saw_everything(o)
        for sub in drain:  # nats-py runs callbacks in a task of their own
            await asyncio.wait_for(sub._pending_queue.join(), 10)


# -- (a) (b) (c) against a running daemon --------------------------------------------


@dataclass
class ChangeSamples:
    http_floor: list[float] = field(default_factory=list)  # GET /v1/me
    write_floor: list[float] = field(default_factory=list)  # PATCH /v1/members/{h} (role): a write, no reload
    after_member_change: list[float] = field(default_factory=list)  # GET /v1/me right after a member change
    revoke_http: list[float] = field(default_factory=list)
    revoke_effect: list[float] = field(default_factory=list)  # first undelivered probe − 2xx
    revoke_total: list[float] = field(default_factory=list)  # first undelivered probe − request sent
    revoke_err: list[float] = field(default_factory=list)  # permissions violation arrival − 2xx
    revoke_leaks: int = 0  # runs where a probe sent after the 2xx was still delivered
    revoke_after: list[float] = field(default_factory=list)  # how long after the 2xx probes still arrived
    revoke_probe_gap: list[float] = field(default_factory=list)  # probe spacing around the effect
    grant_http: list[float] = field(default_factory=list)
    grant_effect: list[float] = field(default_factory=list)
    grant_tries: list[int] = field(default_factory=list)
    grant_missed: int = 0  # accepted subscription that did not receive the next message in the room
    delete_http: list[float] = field(default_factory=list)
    delete_closed: list[float] = field(default_factory=list)  # connection closed − 2xx
    reloads: int | None = None
    answered_anyway: int = 0  # daemon log: a 2xx sent before nats-server confirmed (CHANGE_APPLY_TIMEOUT)
    reload_failures: int = 0  # daemon log: reload not confirmed / config refused


async def measure_changes(daemon: MembershipdProcess, world: World, runs: int) -> ChangeSamples:
    out = ChangeSamples()
    room = world.room_id
    subj = f"unibus.room.{room}"
    url = daemon.nats_url
    conns: list[Conn] = []
    async with UnibusClient(daemon.base_url, world.ids["admin"], timeout=30) as admin:
        try:
            pub = await Conn(url, world.ids["pub"]).connect()
            conns.append(pub)
            probe = await Conn(url, world.ids["probe"]).connect()
            conns.append(probe)
            victims = []
            for i in range(runs):
                v = await Conn(url, world.ids[f"victim{i}"]).connect()
                conns.append(v)
                await v.nc.subscribe(f"{subj}.>")
                victims.append(v)
            echo = Echo(pub, subj)
            await echo.start()
            for _ in range(2):  # warm up: connections, HTTP keep-alive, nonce bucket
                await admin.me()
            for _ in range(runs):
                t0 = now()
                await admin.me()
                out.http_floor.append(now() - t0)
            for _ in range(runs):
                for role in ("admin", "member"):
                    # a committed write that does not touch the bus (no reload) ...
                    t0 = now()
                    await admin.set_role("pub", role)
                    out.write_floor.append(now() - t0)
                    # ... after which the next signed request reloads the member directory
                    t0 = now()
                    await admin.me()
                    out.after_member_change.append(now() - t0)

            received: set[int] = set()

            async def on_probe(msg: Any) -> None:
                received.add(int(msg.data))

            probe_sub = await probe.nc.subscribe(f"{subj}.>", cb=on_probe)
            await echo.barrier(probe, drain=[probe_sub])
            for i in range(runs):
                # (a) revocation, with probes every 2 ms while the request runs
                received.clear()
                sent: list[tuple[int, float]] = []
                stop = asyncio.Event()

                async def prober(stop: asyncio.Event = stop, sent: list[tuple[int, float]] = sent) -> None:
                    seq = 0
                    while not stop.is_set():
                        seq += 1
                        sent.append((seq, now()))
                        await pub.nc.publish(f"{subj}.probe", str(seq).encode())
                        await asyncio.sleep(PROBE_INTERVAL)

                task = asyncio.create_task(prober())
                await asyncio.sleep(0.03)
                t0 = now()
                await admin.remove_room_member(room, "probe")
                t2 = now()
                await asyncio.sleep(0.01)  # a few probes after the 2xx
                stop.set()
                await task
                await echo.barrier(probe, drain=[probe_sub])
                # Not in effect yet (the last probe still arrived)? Keep probing until it is.
                seq = sent[-1][0]
                while seq in received:
                    if now() - t2 > 30:
                        raise TimeoutError("a revocation did not take effect within 30 s of its 2xx")
                    await asyncio.sleep(PROBE_INTERVAL)
                    seq += 1
                    sent.append((seq, now()))
                    await pub.nc.publish(f"{subj}.probe", str(seq).encode())
                    await echo.barrier(probe, drain=[probe_sub])
                out.revoke_http.append(t2 - t0)
                delivered = [seq for seq, _ in sent if seq in received]
                last = max(delivered, default=0)
                first_gone = next(((seq, ts) for seq, ts in sent if seq > last), None)
                if first_gone is not None:
                    out.revoke_effect.append(first_gone[1] - t2)
                    out.revoke_total.append(first_gone[1] - t0)
                    prev = dict(sent).get(last)
                    if prev is not None:
                        out.revoke_probe_gap.append(first_gone[1] - prev)
                if any(ts > t2 and seq in received for seq, ts in sent):
                    out.revoke_leaks += 1
                    out.revoke_after.append(max(0.0, first_gone[1] - t2) if first_gone else float("nan"))
                else:
                    out.revoke_after.append(0.0)
                errs = probe.violations_since(t0)
                if errs:
                    out.revoke_err.append(errs[0] - t2)
                with contextlib.suppress(Exception):
                    await probe_sub.unsubscribe()  # the server already dropped it

                # (b) grant: subscribe right after the 2xx, retried until nats-server accepts it
                t0 = now()
                await admin.add_room_member(room, "probe")
                t2 = now()
                out.grant_http.append(t2 - t0)
                tries = 0
                while True:
                    tries += 1
                    ts = now()
                    probe_sub = await probe.nc.subscribe(f"{subj}.>", cb=on_probe)
                    await server_saw_everything(probe)  # a refusal (-ERR) arrives before this returns
                    if not [t for t, e in probe.errors
                            if t >= ts and "permissions violation for subscription" in e.lower()]:
                        out.grant_effect.append(ts - t2)
                        out.grant_tries.append(tries)
                        break
                    await probe_sub.unsubscribe()
                    if now() - t2 > 30:
                        raise TimeoutError("a granted subscription was still refused 30 s after the 2xx")
                    await asyncio.sleep(PROBE_INTERVAL)
                # ... and it receives the room's next message
                received.clear()
                await pub.nc.publish(f"{subj}.probe", b"-1")
                await echo.barrier(probe, drain=[probe_sub])
                if -1 not in received:
                    out.grant_missed += 1

                # (c) deletion of a member with a live connection
                v = victims[i]
                assert v.nc.is_connected and v.closed_at is None
                t0 = now()
                await admin.remove_member(f"victim{i}")
                t2 = now()
                out.delete_http.append(t2 - t0)
                deadline = now() + 30
                while v.closed_at is None and now() < deadline:
                    await asyncio.sleep(0.001)
                if v.closed_at is None:
                    raise TimeoutError(f"victim{i}'s connection was not closed within 30 s of its deletion")
                out.delete_closed.append(v.closed_at - t2)
                # the member directory is stale now: pay its reload here, not in the next revocation
                t0 = now()
                await admin.me()
                out.after_member_change.append(now() - t0)
                print(f"    run {i + 1}/{runs}: revoke http {ms(out.revoke_http[-1])} ms "
                      f"(effect {ms(out.revoke_effect[-1], 1) if out.revoke_effect else '?'} ms), "
                      f"grant http {ms(out.grant_http[-1])} ms, delete http {ms(out.delete_http[-1])} ms "
                      f"(closed {ms(out.delete_closed[-1], 1)} ms)", file=sys.stderr)
            assert not probe.nc.is_closed, "a revoked member must keep its connection"
        finally:
            for c in conns:
                await c.close()
    status, body = daemon.healthz()
    if status == 200 and isinstance(body, dict):
        out.reloads = _find(body, "auth_enforce", {}).get("reloads")
    return out


def _find(doc: Any, key: str, default: Any) -> Any:
    """``doc[key]`` wherever healthz nests plugin fields."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for v in doc.values():
            found = _find(v, key, None)
            if found is not None:
                return found
    return default


# -- config generation in this process --------------------------------------------


@dataclass
class GenSamples:
    total: list[float] = field(default_factory=list)  # unibus.daemon.nats_config
    read: list[float] = field(default_factory=list)  # read_membership
    block: list[float] = field(default_factory=list)  # auth_enforce.authorization
    nkeys: list[float] = field(default_factory=list)  # … of which nkey_from_sign_pub for every member
    rooms_of: list[float] = field(default_factory=list)  # … of which Membership.rooms_of for every member
    finalize: list[float] = field(default_factory=list)  # natsconf.finalize_config (a deep copy)
    render: list[float] = field(default_factory=list)
    write: list[float] = field(default_factory=list)
    config_bytes: int = 0


def measure_config_generation(daemon: MembershipdProcess, runs: int, scratch: Path) -> GenSamples:
    from unibus.cli import load_settings
    from unibus.client.keys import nkey_from_sign_pub
    from unibus.daemon import nats_config
    from unibus.natsconf import base_config, finalize_config
    from unibus.plugins.auth_enforce import accounts, service_public_key, system_public_key

    argv = daemon.argv[daemon.argv.index("serve") + 1:]
    settings, plugins = load_settings("serve", argv, env={})
    out = GenSamples()
    scratch.mkdir(parents=True, exist_ok=True)
    nats_config(settings, plugins)  # warm: engine, imports
    service, system = service_public_key(settings), system_public_key(settings)
    for _ in range(runs):
        t0 = now()
        config = nats_config(settings, plugins)
        out.total.append(now() - t0)
        t0 = now()
        membership = read_membership(settings.db_path)
        out.read.append(now() - t0)
        t0 = now()
        block = accounts(service, system, membership)
        out.block.append(now() - t0)
        t0 = now()
        for mb in membership.members:
            nkey_from_sign_pub(mb.sign_pub)  # 0.12 stores bus_pub as an nkey: kept as the cost 0.11 paid
        out.nkeys.append(now() - t0)
        t0 = now()
        for mb in membership.members:
            membership.rooms_of(mb.handle)
        out.rooms_of.append(now() - t0)
        t0 = now()
        finalize_config({**base_config(settings), "accounts": block, "system_account": "SYS"}, settings)
        out.finalize.append(now() - t0)
        t0 = now()
        text = render_config(config)
        out.render.append(now() - t0)
        t0 = now()
        write_config(config, scratch / "nats.conf")
        out.write.append(now() - t0)
        out.config_bytes = len(text.encode())
    return out


# -- a bare nats-server with a copy of the generated config ----------------------------


class LogTail:
    """nats-server's merged output, line by line with arrival times, from a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.lines.put((now(), raw.decode("utf-8", "replace").rstrip()))

    def wait_for(self, marker: str, timeout: float) -> float:
        deadline = now() + timeout
        while True:
            left = deadline - now()
            if left <= 0:
                raise TimeoutError(f"nats-server did not log {marker!r} within {timeout} s")
            try:
                ts, line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if marker in line:
                return ts
            if "[FTL]" in line or "Failed to reload" in line:
                raise RuntimeError(f"nats-server: {line}")


def bare_variant(config: dict[str, Any], store: Path, strip_permissions: bool) -> tuple[dict, dict]:
    """Two configs that differ in one user (A: as given; B: one more subject for the last user,
    or, without permission blocks, the last user removed), on their own ports and store dir."""
    a = json.loads(json.dumps(config))
    a["port"] = free_port()
    a["http"] = f"127.0.0.1:{free_port()}"
    a["server_name"] = "bench-bare"
    a["jetstream"] = {"store_dir": str(store)}
    users = a.get("accounts", {}).get("MEMBERS", {}).get("users", [])
    if strip_permissions:
        for u in users:
            u.pop("permissions", None)
    b = json.loads(json.dumps(a))
    b_users = b.get("accounts", {}).get("MEMBERS", {}).get("users", [])
    if strip_permissions:
        b_users.pop()
    else:
        b_users[-1]["permissions"]["subscribe"]["allow"].append("unibus.room.zzzzzz.>")
    return a, b


def measure_bare_reload(binary: Path, config: dict[str, Any], scratch: Path, runs: int,
                        strip_permissions: bool) -> tuple[list[float], float]:
    """(SIGHUP → "Reloaded server configuration" seconds, start → ready seconds)."""
    scratch.mkdir(parents=True, exist_ok=True)
    a, b = bare_variant(config, scratch / "js", strip_permissions)
    conf = scratch / "nats.conf"
    write_config(a, conf)
    t0 = now()
    proc = subprocess.Popen([str(binary), "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    times: list[float] = []
    try:
        tail = LogTail(proc)
        started = tail.wait_for("Server is ready", 60) - t0
        for i in range(runs + 1):  # the first reload is a warm-up
            write_config(b if i % 2 == 0 else a, conf)
            ts = now()
            proc.send_signal(signal.SIGHUP)
            done = tail.wait_for(RELOADED_MARKER, 60)
            if i:
                times.append(done - ts)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    return times, started


def measure_kick(binary: Path, config: dict[str, Any], scratch: Path, runs: int, member: Identity) -> list[float]:
    """Seconds from a ``$SYS.REQ.SERVER.<id>.KICK`` request to the member's connection closing, on a bare
    nats-server with the generated config plus a system account: what cutting one connection costs
    without a reload."""
    scratch.mkdir(parents=True, exist_ok=True)
    a, _ = bare_variant(config, scratch / "js", strip_permissions=False)
    password = os.urandom(12).hex()
    a["accounts"]["SYS"] = {"users": [{"user": "sys", "password": password}]}  # replaces membershipd's system user
    a["system_account"] = "SYS"
    conf = scratch / "nats.conf"
    write_config(a, conf)
    proc = subprocess.Popen([str(binary), "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)

    async def kick_all() -> list[float]:
        url = f"nats://127.0.0.1:{a['port']}"
        sysc = await nats.connect(url, user="sys", password=password, allow_reconnect=False, connect_timeout=5)
        times = []
        try:
            for _ in range(runs + 1):  # the first one is a warm-up
                c = await Conn(url, member).connect()
                try:
                    server_id = c.nc._server_info["server_id"]
                    t0 = now()
                    await sysc.request(f"$SYS.REQ.SERVER.{server_id}.KICK",
                                       json.dumps({"cid": c.nc._client_id}).encode(), timeout=10)
                    while c.closed_at is None and now() - t0 < 10:
                        await asyncio.sleep(0.0005)
                    if c.closed_at is None:
                        raise TimeoutError("KICK did not close the connection within 10 s")
                    times.append(c.closed_at - t0)
                finally:
                    await c.close()
        finally:
            await sysc.close()
        return times[1:]

    try:
        LogTail(proc).wait_for("Server is ready", 60)
        return asyncio.run(kick_all())
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def measure_check(binary: Path, config: dict[str, Any], path: Path, runs: int) -> list[float]:
    """``nats-server -t -c`` wall time: parse and check the config, nothing else."""
    write_config(config, path)
    times = []
    for _ in range(runs):
        t0 = now()
        subprocess.run([str(binary), "-t", "-c", str(path)], check=True, capture_output=True)
        times.append(now() - t0)
    return times


# -- one membership size -------------------------------------------------------------


@dataclass
class SizeResult:
    world: World
    start: float  # daemon launch → /healthz 200
    nats_rss_mb: float
    changes: ChangeSamples
    gen: GenSamples
    reload_perms: list[float]
    reload_noperms: list[float]
    bare_start_perms: float
    bare_start_noperms: float
    check_perms: list[float]
    check_noperms: list[float]
    check_floor: list[float]
    kick: list[float]


def run_size(n: int, runs: int, tmp: Path, binary: Path) -> SizeResult:
    print(f"== {n} members", file=sys.stderr)
    victims = [f"victim{i}" for i in range(runs)]
    specials = ["pub", "probe", *victims]
    t0 = now()
    world = build_world(tmp / f"d{n}", n, specials, in_room=specials)
    print(f"  store written in {now() - t0:.1f} s ({world.members} members, {world.rooms} rooms, "
          f"{world.memberships} room memberships)", file=sys.stderr)
    daemon = MembershipdProcess(world.data_dir, ["--bus-auth", "enforce"])
    copied: dict[str, Any] | None = None
    try:
        t0 = now()
        daemon.start(wait=True, timeout=HEALTHY_TIMEOUT)
        start = now() - t0
        nats_pid = daemon.nats_pid()
        rss = proc_rss_mb(nats_pid) if nats_pid else float("nan")
        print(f"  daemon healthy after {start:.2f} s", file=sys.stderr)
        changes = asyncio.run(measure_changes(daemon, world, runs))
        copied = json.loads((world.data_dir / "nats.conf").read_text())
    finally:
        daemon.stop()
    log = daemon.log_text()
    changes.answered_anyway = log.count("answering anyway")
    changes.reload_failures = log.count("did not confirm the config reload") + log.count("refused the new config")
    gen = measure_config_generation(daemon, runs, tmp / f"gen{n}")  # daemon stopped: a quiet machine
    print(f"  config generation {ms(med(gen.total))} ms ({gen.config_bytes / 1e6:.1f} MB)", file=sys.stderr)
    assert copied is not None
    reload_perms, start_perms = measure_bare_reload(binary, copied, tmp / f"bare{n}p", runs, strip_permissions=False)
    reload_noperms, start_noperms = measure_bare_reload(binary, copied, tmp / f"bare{n}n", runs,
                                                        strip_permissions=True)
    print(f"  bare reload {ms(med(reload_perms))} ms with permission blocks, "
          f"{ms(med(reload_noperms))} ms without", file=sys.stderr)
    kick = measure_kick(binary, copied, tmp / f"kick{n}", runs, world.ids["probe"])
    checks = max(1, min(runs, 3))
    a, _ = bare_variant(copied, tmp / "unused", strip_permissions=False)
    c, _ = bare_variant(copied, tmp / "unused", strip_permissions=True)
    floor = {"port": free_port(), "server_name": "floor"}
    check_perms = measure_check(binary, a, tmp / f"check{n}p.conf", checks)
    check_noperms = measure_check(binary, c, tmp / f"check{n}n.conf", checks)
    check_floor = measure_check(binary, floor, tmp / f"check{n}f.conf", checks)
    shutil.rmtree(world.data_dir / "jetstream", ignore_errors=True)
    return SizeResult(world, start, rss, changes, gen, reload_perms, reload_noperms, start_perms, start_noperms,
                      check_perms, check_noperms, check_floor, kick)


# -- throughput, enforce on vs off -----------------------------------------------------


@dataclass
class TpSamples:
    rate: list[float] = field(default_factory=list)  # msgs/s, first publish → last message received
    pub_rate: list[float] = field(default_factory=list)  # msgs/s, publishing alone
    cpu_us: list[float] = field(default_factory=list)  # nats-server CPU µs per message


async def throughput_once(daemon: MembershipdProcess, world: World, enforce: bool, subjects: list[str],
                          n: int, size: int, out: TpSamples) -> None:
    pub = await Conn(daemon.nats_url, world.ids["pub"] if enforce else None).connect()
    sub = await Conn(daemon.nats_url, world.ids["sub"] if enforce else None).connect()
    try:
        done = asyncio.get_running_loop().create_future()
        count = 0

        async def cb(_msg: Any) -> None:
            nonlocal count
            count += 1
            if count == n and not done.done():
                done.set_result(now())

        await sub.nc.subscribe(f"unibus.room.{world.room_id}.>", cb=cb, pending_msgs_limit=n + 10,
                               pending_bytes_limit=0)
        await server_saw_everything(sub)
        payload = os.urandom(size)
        pid = daemon.nats_pid()
        assert pid is not None
        cpu0 = proc_cpu_seconds(pid)
        k = len(subjects)
        t0 = now()
        publish = pub.nc.publish
        for i in range(n):
            await publish(subjects[i % k], payload)
        await pub.nc.flush(timeout=60)
        t_pub = now()
        t_end = await asyncio.wait_for(done, 120)
        cpu1 = proc_cpu_seconds(pid)
        errors = [e for _, e in pub.errors + sub.errors]
        if errors:
            raise RuntimeError(f"throughput run saw errors: {errors[:3]}")
        out.rate.append(n / (t_end - t0))
        out.pub_rate.append(n / (t_pub - t0))
        out.cpu_us.append((cpu1 - cpu0) / n * 1e6)
    finally:
        await pub.close()
        await sub.close()


def run_throughput(tmp: Path, runs: int, n: int, size: int) -> dict[tuple[str, bool], TpSamples]:
    print(f"== throughput: {n} × {size} B, enforce on and off", file=sys.stderr)
    worlds = {mode: build_world(tmp / f"tp-{mode}", 10, ["pub", "sub"], in_room=["pub", "sub"])
              for mode in ("enforce", "off")}
    daemons = {mode: MembershipdProcess(w.data_dir, ["--bus-auth", mode]) for mode, w in worlds.items()}
    results: dict[tuple[str, bool], TpSamples] = {}
    variants = {
        "one subject": lambda room: [f"unibus.room.{room}.chat"],
        "1,000 subjects": lambda room: [f"unibus.room.{room}.t{j}" for j in range(1000)],
    }
    try:
        for d in daemons.values():
            d.start(wait=True, timeout=HEALTHY_TIMEOUT)
        for mode, daemon in daemons.items():  # warm-up
            w = worlds[mode]
            asyncio.run(throughput_once(daemon, w, mode == "enforce", variants["one subject"](w.room_id),
                                        min(n, 20000), size, TpSamples()))
        for r in range(runs):  # round-robin, so load bursts spread over every cell
            for vname, subjects_of in variants.items():
                for mode in ("enforce", "off"):
                    w = worlds[mode]
                    s = results.setdefault((vname, mode == "enforce"), TpSamples())
                    asyncio.run(throughput_once(daemons[mode], w, mode == "enforce", subjects_of(w.room_id), n, size, s))
                    print(f"  run {r + 1}/{runs} {vname}, bus-auth {mode}: {s.rate[-1]:,.0f} msgs/s, "
                          f"nats-server {s.cpu_us[-1]:.2f} µs CPU/msg", file=sys.stderr)
    finally:
        for d in daemons.values():
            d.stop()
    return results


# -- report ------------------------------------------------------------------------


def render(sizes: list[SizeResult], tp: dict[tuple[str, bool], TpSamples], ns: argparse.Namespace,
           env_line: str, tp_env_line: str) -> str:
    out = [env_line, ""]
    out += [
        ("All times in ms, median (min…max) of the runs. Offsets are taken from the moment the admin's client "
        "had the 2xx of the change; a negative offset means the bus enforced the change before the answer "
        "arrived (membershipd answers only after nats-server confirmed the reload)."),
        "",
        "### A membership change reaching live connections",
        "",
        ("| members (rooms, room memberships) | (a) revocation: `DELETE` room member, HTTP | (a) first undelivered "
        "probe, offset from 2xx | (a) permissions-violation error, offset | (a) probes sent after the 2xx that "
        "still arrived | (b) grant: `PUT` room member, HTTP | (b) 2xx → first accepted subscribe | (c) `DELETE` "
        "member, HTTP | (c) connection closed, offset | 2xx sent before nats-server confirmed (daemon log) "
        "| reloads (`/healthz`) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sizes:
        c = r.changes
        out.append(
            f"| {r.world.members:,} ({r.world.rooms:,}, {r.world.memberships:,}) | {cell(c.revoke_http)} "
            f"| {cell(c.revoke_effect, 1)} | {cell(c.revoke_err, 1)} | {c.revoke_leaks} of {len(c.revoke_http)} "
            f"| {cell(c.grant_http)} | {cell(c.grant_effect, 1)} | {cell(c.delete_http)} "
            f"| {cell(c.delete_closed, 1)} | {c.answered_anyway} of {3 * len(c.revoke_http)} "
            f"| {'–' if c.reloads is None else c.reloads} |")
    gaps = [g for r in sizes for g in r.changes.revoke_probe_gap]
    tries = [t for r in sizes for t in r.changes.grant_tries]
    missed = sum(r.changes.grant_missed for r in sizes)
    out += ["", (f"Probes were published every {PROBE_INTERVAL * 1000:.0f} ms (measured spacing around the "
            f"moment of effect: median {ms(med(gaps), 1)} ms), so the first undelivered probe places the moment "
            f"of effect to within that spacing. Grants: {sum(1 for t in tries if t == 1)} of {len(tries)} first "
            f"subscriptions after the 2xx were accepted at once; {len(tries) - missed} of {len(tries)} then "
            "received the next message published in the room.")]

    out += ["", "### Where the time of a change goes", "",
            ("membershipd's side: the HTTP floors of a signed request, then what it does before every reload "
            "(`unibus.daemon.nats_config`, run in this process against the same database, and its parts)."), "",
            ("| members | signed no-op (`GET /v1/me`), HTTP | signed write without reload (`PATCH` role), HTTP "
            "| first signed request after a member change (member directory reloaded) | config generation (`nats_config`) | … read membership | … build authorization (of it: nkey "
            "encoding + `rooms_of`, for every member) | … `finalize_config` (deep copy) | render JSON "
            "| write file (render again + fsync) | generated nats.conf |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sizes:
        g = r.gen
        out.append(
            f"| {r.world.members:,} | {cell(r.changes.http_floor, 1)} | {cell(r.changes.write_floor, 1)} "
            f"| {cell(r.changes.after_member_change, 1)} "
            f"| {cell(g.total)} | {ms(med(g.read))} | {ms(med(g.block))} ({ms(med(g.nkeys))} + {ms(med(g.rooms_of))}) | {ms(med(g.finalize))} | {ms(med(g.render))} | {ms(med(g.write))} "
            f"| {g.config_bytes / 1e6:.2f} MB |")
    out += ["", ("The daemon, per reload, runs `nats_config`, renders the result to compare it with the last "
            "config, then `write_config` renders it again and fsyncs it: generation + render + write."), ""]
    out += ["", ("nats-server's side, on a bare nats-server started with a copy of the daemon's generated config "
            "(reload: SIGHUP → \"Reloaded server configuration\", alternating between two configs that differ in "
            "one user; `-t`: a process that parses and checks the config and exits, the empty config being the "
            "process floor):"), "",
            ("| members | reload, generated config | reload, same users without permission blocks "
            "| `nats-server -t`: generated / without permission blocks / empty | start → ready: generated / "
            "without permission blocks | `$SYS` KICK of one connection → closed | daemon start → /healthz 200 "
            "| nats-server RSS in the daemon |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sizes:
        out.append(
            f"| {r.world.members:,} | {cell(r.reload_perms)} | {cell(r.reload_noperms)} "
            f"| {ms(med(r.check_perms))} / {ms(med(r.check_noperms))} / {ms(med(r.check_floor))} "
            f"| {ms(r.bare_start_perms)} / {ms(r.bare_start_noperms)} | {cell(r.kick, 1)} | {ms(r.start)} "
            f"| {r.nats_rss_mb:.0f} MB |")

    # growth and the aim
    by_n = {r.world.members: r for r in sizes}
    out += ["", "### Growth and the aim", ""]
    out += [("| members | revocation, HTTP | ≈ write floor + debounce + generation + render + write + bare reload "
            "| revocation: request sent → first undelivered probe | revocation in effect after the 2xx (worst run) "
            "| aim (issue 5) | met (from the 2xx) |"),
            "|---|---:|---:|---:|---:|---:|---|"]
    for r in sizes:
        c = r.changes
        parts = (med(c.write_floor) + RECONFIGURE_DEBOUNCE + med(r.gen.total) + med(r.gen.render) + med(r.gen.write)
                 + med(r.reload_perms))
        after = max(c.revoke_after, default=float("nan"))
        aim = next((v for k, v in AIM_MS.items() if abs(r.world.members - k) <= 10), None)
        met = "–" if aim is None else ("yes" if after * 1000 <= aim else "no")
        out.append(f"| {r.world.members:,} | {ms(med(c.revoke_http))} | {ms(parts)} | {cell(c.revoke_total)} "
                   f"| {ms(after, 1)} "
                   f"| {'–' if aim is None else f'{aim:.0f}'} | {met} |")
    ordered = sorted(by_n)
    for a, b in itertools.pairwise(ordered):
        ra, rb = by_n[a], by_n[b]
        k = b / a
        out.append("")
        out.append(
            f"From {a:,} to {b:,} members ({k:.0f}× as many): revocation HTTP ×{med(rb.changes.revoke_http) / med(ra.changes.revoke_http):.1f}, "
            f"config generation ×{med(rb.gen.total) / med(ra.gen.total):.1f}, bare nats-server reload "
            f"×{med(rb.reload_perms) / med(ra.reload_perms):.1f} (×{med(rb.reload_noperms) / med(ra.reload_noperms):.1f} "
            f"without permission blocks), generated config ×{rb.gen.config_bytes / ra.gen.config_bytes:.1f} in size.")

    out += ["", "### Findings", "", *findings(sizes, tp), ""]
    # the throughput part has its own markers: --only throughput rewrites it alone
    return "\n".join(out) + "\n" + benchdoc.section(TP_SECTION, tp_heading(ns), render_throughput(tp, ns, tp_env_line))


def tp_heading(ns: argparse.Namespace) -> str:
    return (f"### Publish throughput, enforce on vs off ({ns.msgs:,} messages of {ns.msg_size} B, "
            f"median of {ns.tp_runs})")


def render_throughput(tp: dict[tuple[str, bool], TpSamples], ns: argparse.Namespace, env_line: str) -> str:
    """The throughput subsection's body: its own measured-by line, the table, what it says."""
    out = [env_line, "",
           ("One member publishes on its room's subject (or cycling through 1,000 subjects of the room) while "
            "another member of the room receives everything, through the embedded nats-server of a "
            "`membershipd serve --bus-auth enforce` (both log in with their bus keys into the `MEMBERS` account) "
            "and of a `--bus-auth off` one (anonymous, global account). The four cells are measured round-robin "
            "in every run, enforce right before off; the ratios are taken run by run, then median (min…max). "
            "The aim: enforce/off ≥ 0.95 in msgs/s."), "",
           ("| subjects | bus-auth | msgs/s end to end | msgs/s publishing | nats-server CPU µs/msg "
            "| ratio on/off (msgs/s) | ratio on/off (server CPU) |"), "|---|---|---:|---:|---:|---:|---:|"]

    def per_run(a: list[float], b: list[float]) -> str:
        r = [x / y for x, y in zip(a, b) if y > 0]
        return f"{med(r):.2f} ({min(r):.2f}…{max(r):.2f})" if r else "–"

    for vname in ("one subject", "1,000 subjects"):
        on, off = tp.get((vname, True)), tp.get((vname, False))
        if not on or not off:
            continue
        for label, s in (("enforce", on), ("off", off)):
            ratio = per_run(on.rate, off.rate) if label == "enforce" else ""
            cpu_ratio = per_run(on.cpu_us, off.cpu_us) if label == "enforce" else ""
            out.append(f"| {vname} | {label} | {med(s.rate):,.0f} ({min(s.rate):,.0f}…{max(s.rate):,.0f}) "
                       f"| {med(s.pub_rate):,.0f} | {med(s.cpu_us):.2f} | {ratio} | {cpu_ratio} |")
    on, off = tp.get(("one subject", True)), tp.get(("one subject", False))
    on_k, off_k = tp.get(("1,000 subjects", True)), tp.get(("1,000 subjects", False))
    if on and off and on_k and off_k:
        r1 = med([x / y for x, y in zip(on.rate, off.rate)])
        rk = med([x / y for x, y in zip(on_k.rate, off_k.rate)])
        met = "met" if min(r1, rk) >= 0.95 else "missed"
        out += ["", (
            f"Reading: enforce/off {r1:.2f} on one subject and {rk:.2f} across 1,000 subjects (msgs/s end to "
            f"end, medians of the run-by-run ratios): the aim of ≥ 0.95 is {met}. The Python client is the "
            f"bottleneck at ~{med(off.rate) / 1000:.0f}k msgs/s, so nats-server's CPU per message is the sharper "
            f"measure: {med(on.cpu_us):.2f} vs {med(off.cpu_us):.2f} µs on one subject (the per-connection "
            f"permission cache hits), {med(on_k.cpu_us):.2f} vs {med(off_k.cpu_us):.2f} µs across 1,000 subjects "
            "(more than the 128 subjects nats-server caches per connection, so publishes are matched against the "
            "allow list again and the cache is pruned). CPU is read from /proc in clock ticks "
            f"({1000 / os.sysconf('SC_CLK_TCK'):.0f} ms), which "
            "limits its resolution at these message counts.")]
    return "\n".join(out) + "\n"


def findings(sizes: list[SizeResult], tp: dict[tuple[str, bool], TpSamples]) -> list[str]:
    """The conclusions, with this run's numbers in them."""
    out: list[str] = []
    f = ms
    clean = [r for r in sizes if r.changes.answered_anyway == 0 and r.changes.revoke_leaks == 0]
    dirty = [r for r in sizes if r not in clean]
    if clean:
        labels = [f"{r.world.members:,}" for r in clean]
        names = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
        eff = [e for r in clean for e in r.changes.revoke_effect]
        closed = [e for r in clean for e in r.changes.delete_closed]
        out.append(
            f"- **In force at the 2xx.** At {names} members every revocation, grant and deletion was enforced when "
            f"the client had its 2xx: no probe published after it was delivered (the first undelivered probe "
            f"was sent at a median offset of {ms(med(eff), 1)} ms from the 2xx), the first subscription after a "
            f"grant was accepted, and deleted members' connections closed at a median offset of "
            f"{ms(med(closed), 1)} ms (nats-server logs \"Reloaded "
            "server configuration\" only after `reloadAuthorization` has dropped forbidden subscriptions and "
            "closed removed users, and membershipd answers after that line). Measured from the 2xx the aim is "
            "met at once; the latency that matters is the request itself, which now "
            "contains the reload: " + ", ".join(f"{f(med(r.changes.revoke_http))} ms at {r.world.members:,}"
                                               for r in sizes) + " (median revocation `DELETE`).")
    for r in dirty:
        c = r.changes
        worst = max(c.revoke_after, default=float("nan"))
        out.append(
            f"- **Not in force at the 2xx at {r.world.members:,} members.** {c.answered_anyway} of "
            f"{3 * len(c.revoke_http)} changes took longer than the store's `CHANGE_APPLY_TIMEOUT` (5 s) and were "
            f"answered before nats-server confirmed the reload (`Store._changed` stops waiting after "
            f"`CHANGE_APPLY_TIMEOUT` and answers anyway); {c.revoke_leaks} of {len(c.revoke_http)} revocations "
            f"still delivered probes published after the 2xx, for up to {ms(worst)} ms after it, and deleted "
            f"members' connections closed up to {ms(max(c.delete_closed))} ms after their 2xx.")
    big = max(sizes, key=lambda r: r.world.members)
    g, c = big.gen, big.changes
    out.append(
        f"- **Where a change's time goes at {big.world.members:,} members** (revocation `DELETE` "
        f"{f(med(c.revoke_http))} ms): membershipd regenerates the whole config, {f(med(g.total))} ms in this "
        f"process (reading the membership {f(med(g.read))}, building the authorization block {f(med(g.block))} "
        f"of which nkey encoding {f(med(g.nkeys))} and `rooms_of` {f(med(g.rooms_of))}, `finalize_config`'s deep "
        f"copy {f(med(g.finalize))}), renders it to compare ({f(med(g.render))}) and renders it again to write it "
        f"({f(med(g.write))} with fsync); then nats-server reloads, {f(med(big.reload_perms))} ms on a bare server "
        f"with the same config. Every part is proportional to all members, not to the change: a one-member change "
        f"costs as much as rewriting everyone.")
    if len(sizes) >= 2:
        small = sorted(sizes, key=lambda r: r.world.members)
        a, b = small[-2], small[-1]
        k = b.world.members / a.world.members
        out.append(
            f"- **Growth** from {a.world.members:,} to {b.world.members:,} members (×{k:.0f}): revocation HTTP "
            f"×{med(b.changes.revoke_http) / med(a.changes.revoke_http):.1f}, config generation "
            f"×{med(b.gen.total) / med(a.gen.total):.1f} (`rooms_of` ×{med(b.gen.rooms_of) / max(med(a.gen.rooms_of), 1e-6):.0f}: "
            f"it scans every room for every member, O(members × rooms)), nats-server reload "
            f"×{med(b.reload_perms) / med(a.reload_perms):.1f} with permission blocks and "
            f"×{med(b.reload_noperms) / med(a.reload_noperms):.1f} without, `nats-server -t` "
            f"×{med(b.check_perms) / med(a.check_perms):.1f}: roughly linear in the membership, as everything is "
            "rebuilt on every change, apart from `rooms_of`.")
    aim_rows = [(r, AIM_MS[k]) for r in sizes for k in AIM_MS if abs(r.world.members - k) <= 10]
    for r, aim in aim_rows:
        http = med(r.changes.revoke_http) * 1000
        verdict = "within" if max(http, med(r.changes.revoke_total) * 1000) <= aim else "over"
        total = med(r.changes.revoke_total) * 1000
        capped = " (capped by `CHANGE_APPLY_TIMEOUT`)" if r.changes.answered_anyway else ""
        out.append(
            f"- **The aim at {r.world.members:,} members** ({aim:.0f} ms): from the 2xx, "
            f"{'met' if r in clean else 'missed'}; from the request, {http:.0f} ms to the 2xx{capped} and "
            f"{total:.0f} ms until the revocation was in force (medians), {verdict} it.")
    out.append(
        f"- **What would fix {big.world.members:,} members.** (1) membershipd's own cost, cheaply: index rooms by "
        f"member once instead of `rooms_of` per member ({f(med(g.rooms_of))} ms), `binascii.crc_hqx(body, 0)` (the "
        f"same CRC-16/XMODEM, ~100× faster) or a per-key cache in `nkey_from_sign_pub` ({f(med(g.nkeys))} ms), "
        f"render once and write those bytes, and skip the deep copy ({f(med(g.render))} + {f(med(g.finalize))} ms): "
        f"about {f(med(g.rooms_of) + med(g.nkeys) * 0.95 + med(g.render) + med(g.finalize))} ms of "
        f"{f(med(g.total) + med(g.render) + med(g.write))} ms. Outside the reload path, the member directory "
        f"reloads every member after any member change, so the next signed request of anyone takes "
        f"{f(med(c.after_member_change))} ms instead of {ms(med(c.http_floor), 1)} ms; refreshing only the "
        f"changed handle would fix that. (2) That still leaves about "
        f"{f(med(g.total) + med(g.write) - med(g.rooms_of) - med(g.nkeys) * 0.95 - med(g.finalize))} ms in "
        f"membershipd and nats-server's reload, {f(med(big.reload_perms))} ms for a config whose users carry permission blocks against "
        f"{f(med(big.reload_noperms))} ms for the same users without them (`-t`: {f(med(big.check_perms))} vs "
        f"{f(med(big.check_noperms))} ms): the per-user permission blocks are most of it, and any design that keeps "
        "every member's permissions in the server config pays it on every change. Accounts do not map rooms "
        "(a user belongs to one account, a member to several rooms). **Auth callout** does: the config keeps "
        "only the service user and a callout account, nats-server asks membershipd at connect time and gets a "
        "user JWT with that member's permissions, and a membership change needs no reload at all: membershipd "
        "kicks the affected member's connections (`$SYS.REQ.SERVER.<id>.KICK`, measured "
        + ", ".join(f"{ms(med(r.kick), 1)} ms at {r.world.members:,}" for r in sizes)
        + " members from request to close) and the client reconnects with its new permissions. The cost of a "
        "change becomes proportional to the connections it affects, not to the membership; grants need the same "
        "kick (permissions are fixed per connection), so clients must reconnect on a server-initiated close.")
    return out


def write_section(path: Path, body: str) -> None:
    benchdoc.write_section(path, "busauth", HEADING, body)


def command_line(ns: argparse.Namespace) -> str:
    """The options of this run, as a reader would type them."""
    if ns.only == "throughput":
        return (f"bench/bench_bus_auth.py --only throughput --msgs {ns.msgs} --msg-size {ns.msg_size} "
                f"--tp-runs {ns.tp_runs}")
    sizes = ",".join(str(s) for s in ns.sizes)
    return (f"bench/bench_bus_auth.py --runs {ns.runs} --sizes {sizes} --msgs {ns.msgs} --msg-size {ns.msg_size} "
            f"--tp-runs {ns.tp_runs}")


def environment_line(ns: argparse.Namespace, binary: Path, load_before: float, load_after: float,
                     seconds: float) -> str:
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    nats_py = getattr(nats, "__version__", None)
    if nats_py is None:
        from importlib.metadata import version as dist_version

        nats_py = dist_version("nats-py")
    return (f"Measured {datetime.now():%Y-%m-%d} by `{command_line(ns)}` in {seconds / 60:.1f} min: "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {version}, nats-py {nats_py}; 1-minute "
            f"load average {load_before:.1f} before and {load_after:.1f} after.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per change measurement (default 5)")
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[10, 1000, 10000],
                        help="membership sizes, comma-separated (default 10,1000,10000)")
    parser.add_argument("--msgs", type=int, default=200_000, help="messages per throughput run (default 200000)")
    parser.add_argument("--msg-size", type=int, default=128, help="payload bytes (default 128)")
    parser.add_argument("--tp-runs", type=int, default=3, help="throughput runs per cell (default 3)")
    parser.add_argument("--only", choices=("throughput",),
                        help="run only this part (throughput: publish throughput, enforce on vs off) and rewrite "
                        "only its subsection of the markdown file")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="markdown file whose bus authorization section is rewritten")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the markdown file alone")
    ns = parser.parse_args(argv)
    if ns.runs < 1 or ns.tp_runs < 1 or ns.msgs < 1:
        parser.error("--runs, --tp-runs and --msgs must be at least 1")

    binary = find_nats_server()
    load_before = os.getloadavg()[0]
    t_begin = now()
    tmp = Path(tempfile.mkdtemp(prefix="unibus-bench-busauth-"))
    sizes: list[SizeResult] = []
    try:
        if ns.only is None:
            sizes = [run_size(n, ns.runs, tmp, binary) for n in ns.sizes]
        t_tp = now()
        tp = run_throughput(tmp, ns.tp_runs, ns.msgs, ns.msg_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()[0]
    env_line = environment_line(ns, binary, load_before, load_after, now() - t_begin)
    if ns.only == "throughput":
        body = render_throughput(tp, ns, env_line)
        print(benchdoc.section(TP_SECTION, tp_heading(ns), body))
        if not ns.no_write:
            benchdoc.write_section(ns.out, TP_SECTION, tp_heading(ns), body)
            print(f"wrote the throughput part of the bus authorization section of {ns.out}", file=sys.stderr)
        return 0
    tp_line = (f"Throughput measured in the same run, in {(now() - t_tp) / 60:.1f} min "
               f"(`bench/bench_bus_auth.py --only throughput` reruns only this part).")
    body = render(sizes, tp, ns, env_line, tp_line)
    print(body)
    if not ns.no_write:
        write_section(ns.out, body)
        print(f"wrote the bus authorization section of {ns.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
