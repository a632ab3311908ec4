"""Rekey benchmark: what ``UnibusClient.rekey`` costs for rooms of 10 to 1,000 members.

Run with ``.venv/bin/python bench/bench_rekey.py [--runs 7] [--no-profile] [--no-write]``.
Not a test: it prints markdown and writes it into docs/benchmarks.md between
the ``bench:rekey`` markers (other sections of that file are kept).

Set-up, not timed: 999 X25519 and 999 MLKEM768_X25519 members plus one admin
owner per suite are written straight into a fresh SQLite store
(``unibus.store.db.migrate`` then ``add_member_sync`` and
``unibus.store.models`` rows in one session), with eight rooms: 10, 100,
500 and 1,000 members (the owner included; 500 is an extra point to tell
linear growth from noise), all of X25519 members or all of MLKEM768_X25519
members. Then a real ``membershipd serve`` (embedded
nats-server, default bus auth ``enforce``) is started on that data dir, on
free loopback ports. Bulk-loading before the start matters: with bus auth
enforced every membership change made through the API reloads nats-server.

Measured ``--runs`` times, round-robin over the eight rooms (median, min, max):

* **rekey, instrumented**: exactly the steps of ``UnibusClient.rekey``, timed
  one by one with the client's own methods: ``get_room`` (GET, fetch the
  members), ``new_room_key`` + ``seal_for_members`` (seal), ``post_keys``
  (upload: JSON encoding, request signing, the POST and the server's work).
  The POST alone is the server's time to accept the keys, seen from the client;
  membershipd's CPU time (user + system, all threads, without its nats-server
  child, from /proc; clock-tick resolution) is read around it too.
* **rekey, as shipped**: ``await client.rekey(room_id)`` timed as one call,
  right after the instrumented one on the same room: the end-to-end figure.
  Since 0.12 it also checks the server's room against the verified
  membership log (here one snapshot entry, written by the server at the
  first logged request and verified at the warm-up; a verified rekey from an
  empty replica of a real log is in bench/bench_verify.py).
* **baselines** (same round, same process): the raw HPKE seal rate per suite
  (``hpke.Suite.encrypt`` of a 32-byte key to 1,000 already-parsed public keys
  of distinct members, info and suite built once), and ``seal_room_key`` (the
  same plus the public key's parsing and checks) for comparison. A rekey is
  reported as a multiple of N raw seals. The raw seals are timed in every
  round right before each room's rekeys, to exactly that room's members.

Then, for diagnosis: a py-spy profile (``py-spy record --pid``, attached to
membershipd during extra, untimed 1,000-member rekeys of both suites; install
it with ``.venv/bin/pip install py-spy``, it is not a project dependency),
summed into cost centres of the keys POST; and the client-side request
preparation (``json.dumps`` of the body + ``sign_request``) timed alone.

Every process started here is stopped in a ``finally``; everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import benchlib  # noqa: E402  (bench/ is on sys.path when run as a script)
from benchlib import IDLE_LEAVES, med, parse_frames, proc_cpu_seconds, pyspy_binary
import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HEADING = "## Rekey"
SUITES = ("X25519", "MLKEM768_X25519")
SIZES = (10, 100, 500, 1000)  # 500: an extra point to tell linear growth from noise
BASELINE_SEALS = 1000
PROFILE_RATE = 250  # py-spy samples per second
PROFILE_REKEYS = 6  # per suite, 1,000-member rooms
AIM_SECONDS = 1.0


# -- helpers -------------------------------------------------------------------------


def handle_of(suite: str, i: int) -> str:
    return f"{'x' if suite == 'X25519' else 'm'}{i:04d}"


def owner_of(suite: str) -> str:
    return f"owner{'x' if suite == 'X25519' else 'm'}"


def room_name(suite: str, n: int) -> str:
    return f"bench-{suite}-{n}"


# -- set-up: members and rooms straight into the store --------------------------------


@dataclass
class World:
    owners: dict[str, Any]  # suite -> Identity (admin, owner of that suite's rooms)
    rooms: dict[tuple[str, int], str]  # (suite, N) -> room_id
    # suite -> raw enc_pub bytes / parsed HPKE public keys of [owner, *members]: the room of N
    # members holds the first N of them (for the baselines)
    raws: dict[str, list[bytes]]
    pubs: dict[str, list[Any]]


def build_world(data_dir: Path) -> World:
    from sqlalchemy.orm import Session
    from unibus.client.keys import enc_public_key, generate_identity
    from unibus.settings import Settings
    from unibus.store import models as m
    from unibus.store.db import make_engine, migrate
    from unibus.store.sqlite import add_member_sync, new_member, new_room_id

    data_dir.mkdir(parents=True, mode=0o700)
    db = Settings(data_dir=data_dir).db_path
    migrate(db)
    biggest = max(SIZES)
    owners = {s: generate_identity(owner_of(s), s) for s in SUITES}
    members = {s: [generate_identity(handle_of(s, i), s) for i in range(1, biggest)] for s in SUITES}
    rooms: dict[tuple[str, int], str] = {}
    engine = make_engine(db)
    try:
        with Session(engine) as s, s.begin():
            for suite in SUITES:
                for ident in [owners[suite], *members[suite]]:
                    role = "admin" if ident is owners[suite] else "member"
                    add_member_sync(s, new_member(ident.handle, role, ident.sign_pub, ident.enc_pub, suite,
                                                  ident.bus_pub))
            now = datetime.now().astimezone()
            for suite in SUITES:
                for n in SIZES:
                    rid = new_room_id()
                    rooms[(suite, n)] = rid
                    s.add(m.Room(room_id=rid, name=room_name(suite, n), owner=owners[suite].handle, epoch=0,
                                 rekey_required=True, created_at=now))
                    for ident in [owners[suite], *members[suite][: n - 1]]:
                        s.add(m.RoomMember(room_id=rid, handle=ident.handle, added_at=now))
                s.flush()
    finally:
        engine.dispose()
    raws = {s: [i.enc_pub for i in [owners[s], *members[s]]] for s in SUITES}
    pubs = {s: [enc_public_key(r, s, check_low_order=False) for r in raws[s]] for s in SUITES}
    return World(owners, rooms, raws, pubs)


# -- baselines -------------------------------------------------------------------------


def raw_seals(suite: str, pubs: list[Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``hpke.Suite.encrypt`` to each of ``pubs``: suite, key and info built
    once, public keys already parsed. Pure sealing, nothing else."""
    from unibus.client.sealing import hpke_suite, new_room_key, room_key_info

    hs, key, info = hpke_suite(suite), new_room_key(), room_key_info("baseline", 1)
    t, c = time.perf_counter(), time.process_time()
    for pub in pubs:
        hs.encrypt(key, pub, info=info)
    return time.perf_counter() - t, time.process_time() - c


def seal_room_key_rate(suite: str, raws: list[bytes]) -> float:
    """seals/s of ``seal_room_key`` (parses and checks the raw public key, builds info, seals)."""
    from unibus.client.sealing import new_room_key, seal_room_key

    key = new_room_key()
    t = time.perf_counter()
    for raw in raws:
        seal_room_key(key, raw, suite, "baseline", 1)
    return len(raws) / (time.perf_counter() - t)


# -- the measured rekeys -------------------------------------------------------------


@dataclass
class Rekey:
    get: float  # wall seconds of each part, as the client sees them
    seal: float
    post: float
    get_cpu: float  # this (client) process's CPU seconds in each part
    seal_cpu: float
    post_cpu: float
    get_server_cpu: float  # membershipd's CPU seconds around the GET / the POST
    post_server_cpu: float
    body_bytes: int
    room_bytes: int

    @property
    def total(self) -> float:
        return self.get + self.seal + self.post


@dataclass
class Results:
    instrumented: dict[tuple[str, int], list[Rekey]] = field(default_factory=lambda: collections.defaultdict(list))
    shipped: dict[tuple[str, int], list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    # raw seals to exactly the room's N members, timed right before that room's rekeys: (wall, CPU) seconds
    raw: dict[tuple[str, int], list[tuple[float, float]]] = field(default_factory=lambda: collections.defaultdict(list))
    srk_rate: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    prep: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))


async def instrumented_rekey(client: Any, room_id: str, server_pid: int) -> tuple[Rekey, dict[str, str], int]:
    """The steps of ``UnibusClient.rekey`` (no 409 retry: nothing else writes here), timed one by one."""
    from unibus.client.sealing import new_room_key, seal_for_members

    clock, cpu, srv = time.perf_counter, time.process_time, lambda: proc_cpu_seconds(server_pid)
    s0, c0, t0 = srv(), cpu(), clock()
    room = await client.get_room(room_id)
    t1, c1, s1 = clock(), cpu(), srv()
    epoch = int(room["epoch"]) + 1
    key = new_room_key()
    sealed = seal_for_members(key, room.get("members") or [], room_id, epoch)
    t2, c2 = clock(), cpu()
    s2 = srv()
    head = await client.log_head()  # 0.12: each member's key package signed at the log head
    sigs = client.sign_key_packages(room_id, epoch, sealed, head)
    c2b, t2b = cpu(), clock()
    await client.post_keys(room_id, epoch, sealed, sigs, head)
    t3, c3, s3 = clock(), cpu(), srv()
    room_bytes = len(json.dumps(room, separators=(",", ":")))
    body_bytes = len(json.dumps({"epoch": epoch, "sealed": sealed}, separators=(",", ":")))
    return Rekey(t1 - t0, t2 - t1, t3 - t2b, c1 - c0, c2 - c1, c3 - c2b, s1 - s0, s3 - s2,
                 body_bytes, room_bytes), sealed, epoch


def request_prep_seconds(identity: Any, room_id: str, epoch: int, sealed: dict[str, str]) -> float:
    """What ``post_keys`` does before the bytes leave: compact JSON and the RFC 9421 signature."""
    from unibus.signing import sign_request

    t = time.perf_counter()
    body = json.dumps({"epoch": epoch, "sealed": dict(sealed)}, separators=(",", ":"), ensure_ascii=False).encode()
    sign_request("POST", f"/v1/rooms/{room_id}/keys", body, keyid=identity.handle, private_key=identity.sign_key)
    return time.perf_counter() - t


async def measure(base_url: str, world: World, server_pid: int, runs: int, results: Results) -> None:
    from unibus.client import UnibusClient

    clients = {s: UnibusClient(base_url, world.owners[s], timeout=60, notice=lambda _t: None) for s in SUITES}
    try:
        # The store was written without a membership log: its first logged request makes the
        # server write entry 0, a snapshot of that state (docs/store.md), which `rekey()`
        # verifies (and keeps in memory) before it seals to anyone. A role set to what it is.
        await clients[SUITES[0]].set_role(owner_of(SUITES[1]), "admin")
        # warm-up: open connections, fill the server's member cache, first import of everything
        for s in SUITES:
            await clients[s].rekey(world.rooms[(s, min(SIZES))])
        for i in range(runs):
            for s in SUITES:
                results.srk_rate[s].append(seal_room_key_rate(s, world.raws[s][:BASELINE_SEALS]))
            line = []
            for s in SUITES:
                for n in SIZES:
                    rid = world.rooms[(s, n)]
                    results.raw[(s, n)].append(raw_seals(s, world.pubs[s][:n]))
                    r, sealed, epoch = await instrumented_rekey(clients[s], rid, server_pid)
                    results.instrumented[(s, n)].append(r)
                    if n == max(SIZES):
                        results.prep[s].append(request_prep_seconds(world.owners[s], rid, epoch, sealed))
                    t = time.perf_counter()
                    await clients[s].rekey(rid)
                    results.shipped[(s, n)].append(time.perf_counter() - t)
                    line.append(f"{s}/{n}: {results.shipped[(s, n)][-1] * 1000:.0f} ms")
            print(f"round {i + 1}/{runs}: " + ", ".join(line), file=sys.stderr)
    finally:
        for c in clients.values():
            await c.close()


# -- where the server's time goes: py-spy ------------------------------------------------

_IDLE_LEAVES = IDLE_LEAVES | {("select", "selectors.py"), ("EpollSelector.select", "selectors.py")}


def _has(frames: list[tuple[str, str, int]], pred: Callable[[str, str], bool]) -> bool:
    return any(pred(f, p) for f, p, _ in frames)


#: put_keys's statements, found in its source by these snippets (in source order), and their centre names.
PUT_KEYS_MARKS = [
    ("self._get_room_row(", "put_keys: SELECT the room row"),
    ("self._room_members(", "put_keys: SELECT the room's members"),
    ("check_new_epoch(", "put_keys: the epoch and roster checks"),
    ("done = s.execute(update(", "put_keys: UPDATE rooms (epoch, conditional)"),
    ("s.execute(insert(m.SealedKey", "put_keys: INSERT the sealed keys (executemany)"),
    ("s.execute(insert(m.RoomEpoch", "put_keys: INSERT the epoch's sealer and log head"),
    ("log_end(", "put_keys: the log entry"),
    ("return (Room(", "put_keys: the Room returned"),
]


def put_keys_statements() -> list[tuple[int, str]]:
    """(first line, centre name) of the statements of ``SqliteStore._put_keys``, sorted."""
    import inspect

    from unibus.store import sqlite

    src, start = inspect.getsourcelines(sqlite.SqliteStore._put_keys)
    out = []
    for needle, name in PUT_KEYS_MARKS:
        for i, line in enumerate(src):
            if needle in line:
                out.append((start + i, name))
                break
    return sorted(out)


STORE = "store thread: "
COMMIT = STORE + "COMMIT (WAL append + fsync, synchronous=FULL)"


def classify(thread: str, frames: list[tuple[str, str, int]], pk_lines: list[tuple[int, str]]) -> str:
    """The cost centre of one membershipd stack sample (first rule that matches)."""
    funcs = [f for f, _, _ in frames]
    if thread.startswith("unibus-sqlite"):
        for f, p, ln in frames:
            if f.startswith("SqliteStore._put_keys") and p.endswith("sqlite.py"):
                name = "put_keys: (other lines)"
                for at, centre in pk_lines:
                    if ln >= at:
                        name = centre
                return STORE + name
        if any(f.startswith("SqliteStore.get_room") for f in funcs):
            return STORE + "get_room for the handler's `load_room` (room + members as ORM objects → `Member`)"
        if any(f.startswith("SqliteStore.list_members") for f in funcs):
            return STORE + "list_members (member cache refresh)"
        if any("commit" in f.lower() for f in funcs):
            return COMMIT
        return STORE + "other (session and connection begin/close)"
    if _has(frames, lambda f, p: f.startswith("crypto_sign_open") or p.endswith("signing.py")):
        return "signature check (Content-Digest SHA-256 of the body, Ed25519, headers)"
    if _has(frames, lambda f, p: f.startswith("NonceStore.claim") or p.startswith("nats/")):
        return "nonce claim (JetStream KV)"
    if "json_object" in funcs and _has(frames, lambda f, p: p.startswith("json/")):
        return "handler: `json.loads` of the body"
    if any(f.endswith("as_json") or f in ("room_entry", "b64", "iso", "Member.room_entry") for f in funcs):
        return "handler: response document (`room.as_json`: base64 of every member's enc_pub)"
    if "json_response" in funcs:
        return "handler: response serialised (`json.dumps`) and written"
    if _has(frames, lambda f, p: f == "post_keys" and p.endswith("rooms.py")):
        return "handler: base64 decode + size check of every sealed value"
    if _has(frames, lambda f, p: p.startswith("aiohttp/") and "read" in f.lower()) or "json_object" in funcs:
        return "aiohttp: reading the request body"
    if _has(frames, lambda f, p: p.startswith(("aiohttp/", "multidict/", "yarl/"))):
        return "aiohttp: parsing, routing, middlewares, writing"
    if _has(frames, lambda f, p: p.startswith(("asyncio/", "selectors"))):
        return "asyncio event loop (scheduling, waiting on the store thread)"
    return "other"


@dataclass
class Profile:
    samples: int
    posts: int
    post_wall: list[float]  # the profiled POSTs, client wall seconds
    cpu_seconds: float  # membershipd CPU during the profiled POSTs
    centres: dict[str, int]
    top: list[tuple[int, str]]

    def ms_per_post(self, samples: int) -> float:
        """A centre's share of the samples × membershipd's CPU per POST."""
        return samples / self.samples * self.cpu_seconds / self.posts * 1000 if self.posts and self.samples else 0.0


def summarize(path: Path, posts: int, post_wall: list[float], cpu_seconds: float) -> Profile:
    pk = put_keys_statements()
    centres: collections.Counter[str] = collections.Counter()
    top: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread = ""
        if stack.startswith("thread ("):  # --threads: the first frame names the thread
            head, _, stack = stack.partition(";")
            thread = head.partition("): ")[2]
        frames = parse_frames(stack)
        if not frames or (frames[-1][0], frames[-1][1]) in _IDLE_LEAVES:
            continue
        n = int(count)
        total += n
        centres[classify(thread, frames, pk)] += n
        top[re.sub(r":\d+\)$", ")", stack.split(";")[-1])] += n
    return Profile(total, posts, post_wall, cpu_seconds, dict(centres), [(n, f) for f, n in top.most_common(12)])


async def profile_workload(base_url: str, world: World, server_pid: int,
                           attached: Callable[[], None]) -> tuple[int, list[float], float]:
    """Extra 1,000-member keys POSTs of both suites, sealed outside the POST; ``attached()`` is
    called (it waits for py-spy) after the rooms are fetched. Returns (POSTs, their walls, server CPU)."""
    from unibus.client import UnibusClient
    from unibus.client.sealing import new_room_key, seal_for_members

    clients = {s: UnibusClient(base_url, world.owners[s], timeout=60) for s in SUITES}
    cpu, wall = 0.0, []
    try:
        prepared = []
        for s in SUITES:
            rid = world.rooms[(s, max(SIZES))]
            room = await clients[s].get_room(rid)
            prepared.append((s, rid, int(room["epoch"]), room["members"]))
        await asyncio.to_thread(attached)
        for k in range(PROFILE_REKEYS):
            for s, rid, epoch, members in prepared:
                e = epoch + 1 + k
                sealed = seal_for_members(new_room_key(), members, rid, e)
                head = await clients[s].log_head()
                sigs = clients[s].sign_key_packages(rid, e, sealed, head)
                c0, t0 = proc_cpu_seconds(server_pid), time.perf_counter()
                await clients[s].post_keys(rid, e, sealed, sigs, head)
                wall.append(time.perf_counter() - t0)
                cpu += proc_cpu_seconds(server_pid) - c0
    finally:
        for c in clients.values():
            await c.close()
    return len(wall), wall, cpu


def profile_posts(spy: str, base_url: str, world: World, server_pid: int, scratch: Path) -> Profile:
    """py-spy attached to membershipd (``record --pid``, all threads) during :func:`profile_workload`."""
    out = scratch / "profile.txt"
    # --nonblocking: sample without pausing membershipd
    argv = [spy, "record", "--pid", str(server_pid), "--rate", str(PROFILE_RATE), "--format", "raw",
            "--threads", "--nonblocking", "--output", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def attached() -> None:
        time.sleep(1.0)  # py-spy attaches
        if proc.poll() is not None:
            raise RuntimeError(f"py-spy failed: {proc.stderr.read().decode(errors='replace')[-2000:]}")  # type: ignore[union-attr]

    try:
        posts, wall, cpu = asyncio.run(profile_workload(base_url, world, server_pid, attached))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {proc.stderr.read().decode(errors='replace')[-2000:]}")  # type: ignore[union-attr]
    return summarize(out, posts, wall, cpu)


# -- report --------------------------------------------------------------------------------


def slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (fixed, per-member) of y = fixed + per * x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    per = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - per * mx, per


def linearity(by_step: Sequence[float]) -> str:
    """Compare the CPU cost per member of the last step with the step before (the first step, from
    10 members, is left out: fixed costs and clock ticks dominate it)."""
    first, last = by_step[0], by_step[-1]
    if first <= 0:
        return "not measurable here (no CPU growth between the larger sizes)"
    r = last / first
    kind = "linear" if 0.75 <= r <= 1.33 else ("super-linear" if r > 1 else "sub-linear")
    steps = " → ".join(f"{n:,}" for n in SIZES[-3:])
    return f"{kind} (CPU per member {first * 1e6:.0f} then {last * 1e6:.0f} µs over {steps} members)"


def render(ns: argparse.Namespace, res: Results, prof: Profile | None, env_line: str, load: float) -> str:
    big = max(SIZES)
    rate = {s: [big / w for w, _ in res.raw[(s, big)]] for s in SUITES}
    rate_cpu = {s: [big / c for _, c in res.raw[(s, big)]] for s in SUITES}
    raw = {s: med(rate[s]) for s in SUITES}
    raw_cpu = {s: med(rate_cpu[s]) for s in SUITES}
    srk = {s: med(res.srk_rate[s]) for s in SUITES}

    def paired(s: str, n: int, xs: Sequence[float]) -> float:
        """median over the rounds of x / (that round's raw seals to the same N members)"""
        return med([x / w for x, (w, _) in zip(xs, res.raw[(s, n)], strict=True)])

    ms = lambda x: f"{x * 1000:.1f}"
    out = [env_line, ""]
    out += [("How to read it: a rekey is `GET /v1/rooms/{id}` (fetch the members' keys), a fresh 32-byte key "
             "sealed to each member (HPKE, docs/formats.md), and `POST /v1/rooms/{id}/keys`. The baseline is the raw "
             "HPKE seal: in every round, right before a room's rekeys, this process seals a key to exactly that "
             "room's N members with `hpke.Suite.encrypt` alone (keys parsed in advance); \"× raw seals\" is the "
             "median over the rounds of a time divided by that round's raw seals, so it is the cost in units of "
             "pure sealing. Wall times depend on what else the two "
             "cores are doing (see the load average); CPU times (this client's `process_time`, membershipd's "
             "user + system from /proc) do not, and their sum is what a rekey costs on an idle machine."), ""]
    out += [(f"Baseline, seals per second on one core (min / **median** / max of the rounds; {big:,} distinct "
             "members' keys per round):"), "",
            "| suite | raw `hpke.Suite.encrypt`, wall | raw, per CPU second | `seal_room_key` (+ key parse/check), wall |",
            "|---|---:|---:|---:|"]
    for s in SUITES:
        r, c, k = rate[s], rate_cpu[s], res.srk_rate[s]
        out.append(f"| {s} | {min(r):,.0f} / **{raw[s]:,.0f}** / {max(r):,.0f} "
                   f"| {min(c):,.0f} / **{raw_cpu[s]:,.0f}** / {max(c):,.0f} "
                   f"| {min(k):,.0f} / **{srk[s]:,.0f}** / {max(k):,.0f} |")

    out += ["", (f"Rekey end to end: `await client.rekey(room_id)` (min / **median** / max ms of {ns.runs}), then "
                 "the instrumented run's parts (medians, ms):"), "",
            ("| suite | members | `rekey()` | instrumented total | GET room | seal | POST keys | rekey × raw seals "
             "| seal × raw seals |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in SUITES:
        for n in SIZES:
            e2e, ins = res.shipped[(s, n)], res.instrumented[(s, n)]
            v = [x * 1000 for x in e2e]
            se = [r.seal for r in ins]
            out.append(f"| {s} | {n:,} | {min(v):.0f} / **{med(v):.0f}** / {max(v):.0f} "
                       f"| {ms(med([r.total for r in ins]))} | {ms(med([r.get for r in ins]))} | {ms(med(se))} "
                       f"| {ms(med([r.post for r in ins]))} | {paired(s, n, e2e):.1f}× | {paired(s, n, se):.2f}× |")

    out += ["", ("CPU of the same instrumented runs (medians, ms; membershipd's at clock-tick resolution, 10 ms, "
                 "so small rooms read 0 or 10), and the sizes on the wire:"), "",
            ("| suite | members | client: GET | client: seal | client: POST | server: GET | server: POST "
             "| client + server CPU | POST body | GET answer |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in SUITES:
        for n in SIZES:
            ins = res.instrumented[(s, n)]
            parts = [med([getattr(r, a) for r in ins]) for a in
                     ("get_cpu", "seal_cpu", "post_cpu", "get_server_cpu", "post_server_cpu")]
            out.append(f"| {s} | {n:,} | " + " | ".join(f"{p * 1000:.0f}" for p in parts)
                       + f" | **{sum(parts) * 1000:.0f}** | {ins[-1].body_bytes / 1e3:,.0f} kB "
                       f"| {ins[-1].room_bytes / 1e3:,.0f} kB |")
    out += ["", "The POST answers 201 with the whole room document, the same size as the GET answer."]

    steps = " → ".join(f"{n:,}" for n in SIZES)
    out += ["", (f"How it grows: a least-squares line through the medians at {steps} members (fixed cost + cost "
                 "per member, wall and CPU), the CPU cost per member of each step on its own (a linear cost gives "
                 "the same figure for every step; CPU, because wall steps move with the machine's load; the first "
                 "step is coarse: 10 ms clock ticks over 90 members), and the share of the "
                 f"{big:,}-member instrumented total (wall)."), "",
            ("| suite | part | fixed ms | µs per member, wall | µs per member, CPU (client + server) "
             f"| CPU µs per member by step ({steps}) | share at {big:,} |"),
            "|---|---|---:|---:|---:|---:|---:|"]
    xs = [float(n) for n in SIZES]
    parts = {
        "whole rekey": (lambda r: r.total,
                        lambda r: r.get_cpu + r.seal_cpu + r.post_cpu + r.get_server_cpu + r.post_server_cpu),
        "GET room": (lambda r: r.get, lambda r: r.get_cpu + r.get_server_cpu),
        "seal": (lambda r: r.seal, lambda r: r.seal_cpu),
        "POST keys": (lambda r: r.post, lambda r: r.post_cpu + r.post_server_cpu),
    }
    growth: dict[tuple[str, str], tuple[float, ...]] = {}
    for s in SUITES:
        total_big = med([r.total for r in res.instrumented[(s, big)]])
        for label, (wall_of, cpu_of) in parts.items():
            ys = [med([wall_of(r) for r in res.instrumented[(s, n)]]) for n in SIZES]
            cs = [med([cpu_of(r) for r in res.instrumented[(s, n)]]) for n in SIZES]
            fixed, per = slope(xs, ys)
            _, per_cpu = slope(xs, cs)
            by_step = [(cs[i + 1] - cs[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
            growth[(s, label)] = (fixed, per, per_cpu, ys[-1] / total_big, *by_step)
            out.append(f"| {s} | {label} | {fixed * 1000:.1f} | {per * 1e6:.0f} | {per_cpu * 1e6:.0f} "
                       f"| {' / '.join(f'{b * 1e6:.0f}' for b in by_step)} | {ys[-1] / total_big:.0%} |")
        out.append(f"| {s} | (baseline: one raw seal) | – | {1e6 / raw[s]:.0f} | {1e6 / raw_cpu[s]:.0f} | – | – |")

    out += ["", f"The {big:,}-member keys POST alone (medians, ms):", "",
            ("| suite | POST, client wall | request prep (JSON + signature, timed apart) | client CPU in the POST "
             "| membershipd CPU | wall − client CPU − server CPU (wire, fsync, waiting for a core) |"),
            "|---|---:|---:|---:|---:|---:|"]
    for s in SUITES:
        ins = res.instrumented[(s, big)]
        p, prep = med([r.post for r in ins]), med(res.prep[s])
        cc, sc = med([r.post_cpu for r in ins]), med([r.post_server_cpu for r in ins])
        out.append(f"| {s} | {ms(p)} | {ms(prep)} | {cc * 1000:.0f} | {sc * 1000:.0f} | {(p - cc - sc) * 1000:.0f} |")

    if prof is not None and prof.samples:
        store = sum(n for c, n in prof.centres.items() if c.startswith(STORE))
        out += ["", (f"Where membershipd's time goes in a {big:,}-member keys POST: py-spy at {PROFILE_RATE} Hz on "
                     f"every thread, {prof.posts} extra POSTs (both suites, pre-sealed, untimed by the tables "
                     f"above; their client wall median {med(prof.post_wall) * 1000:.0f} ms, membershipd CPU "
                     f"{prof.cpu_seconds / prof.posts * 1000:.0f} ms per POST), {prof.samples} non-idle samples, "
                     f"{store / prof.samples:.0%} of them on the SQLite thread. \"CPU ms per POST\" is the centre's share "
                     "of the samples × membershipd's CPU per POST (the COMMIT's samples include its fsync, which "
                     "is not CPU, so it is slightly overstated)."),
                "", "| cost centre | samples | share | CPU ms per POST |", "|---|---:|---:|---:|"]
        for name, cnt in sorted(prof.centres.items(), key=lambda kv: -kv[1]):
            out.append(f"| {name} | {cnt} | {cnt / prof.samples:.0%} | {prof.ms_per_post(cnt):.1f} |")
        out += ["", "Hottest leaf frames (all threads):", "", "| samples | frame |", "|---:|---|"]
        for n, f in prof.top:
            out.append(f"| {n} | `{f.replace('|', '/')}` |")

    # findings, computed
    out += ["", "Findings of this run:", ""]
    for s in SUITES:
        e2e = med(res.shipped[(s, big)])
        ins = res.instrumented[(s, big)]
        cpu_sum = med([r.get_cpu + r.seal_cpu + r.post_cpu + r.get_server_cpu + r.post_server_cpu for r in ins])
        verdict = "meets" if e2e < AIM_SECONDS else "misses"
        verdict += f" the {AIM_SECONDS:.0f} s aim on this machine at load {load:.1f}"
        shares = {k: growth[(s, k)][3] for k in ("GET room", "seal", "POST keys")}
        top = max(shares, key=shares.get)  # type: ignore[arg-type]
        out.append(f"* {s}: a {big:,}-member rekey takes {e2e * 1000:.0f} ms end to end (median), {verdict}; "
                   f"{cpu_sum * 1000:.0f} ms of CPU (client + server): on an idle machine, about that plus the "
                   f"fsync and the loopback round trips. It costs {paired(s, big, res.shipped[(s, big)]):.1f}× the pure sealing; the "
                   f"largest part is "
                   f"{top} ({shares[top]:.0%}; GET {shares['GET room']:.0%}, seal {shares['seal']:.0%}, POST "
                   f"{shares['POST keys']:.0%}). Growth is {linearity(growth[(s, 'whole rekey')][5:])}: "
                   f"{growth[(s, 'whole rekey')][1] * 1e6:.0f} µs per member (wall; "
                   f"{growth[(s, 'whole rekey')][2] * 1e6:.0f} µs CPU) on top of "
                   f"{growth[(s, 'whole rekey')][0] * 1000:.0f} ms fixed, against {1e6 / raw[s]:.0f} µs (wall) and {1e6 / raw_cpu[s]:.0f} µs (CPU) per raw seal.")
    if prof is not None and prof.samples:
        orm = sum(n for c, n in prof.centres.items() if c.startswith(STORE) and c != COMMIT)
        out.append(f"* membershipd's CPU in a {big:,}-member keys POST: {prof.cpu_seconds / prof.posts * 1000:.0f} ms, "
                   f"{orm / prof.samples:.0%} of its samples in the store's SQLAlchemy work other than the COMMIT "
                   "(the handler's `load_room`, `add_all` + `flush` of the sealed keys, the room re-read for the "
                   "answer); the answer is the whole room document again.")
    out += ["", "Reproduce:", "", "```",
            ".venv/bin/pip install py-spy   # optional, for the profile; not a project dependency",
            f".venv/bin/python bench/bench_rekey.py --runs {ns.runs}", "```"]
    return "\n".join(out) + "\n"


def environment_line(runs: int, load_before: float, load_after: float) -> str:
    import cryptography

    return (f"{benchlib.measured_by(f'bench/bench_rekey.py --runs {runs}')}, cryptography {cryptography.__version__}, "
            f"{benchlib.nats_server_version()}; membershipd with the SQLite store and bus auth enforce, client and "
            f"server on loopback; {benchlib.load_average(load_before, load_after)}.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchlib.arg_parser(__doc__, "rekey", 7, "rounds")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--keep-profile", type=Path, help="copy py-spy's raw (collapsed) stacks to this file")
    ns = benchlib.parse(parser, argv)

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="unibus-bench-rekey-"))
    daemon = None
    results = Results()
    prof = None
    try:
        t = time.perf_counter()
        world = build_world(tmp / "data")
        print(f"set-up: {2 * max(SIZES)} members, {len(world.rooms)} rooms in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        daemon = benchlib.start_membershipd(tmp / "data")
        asyncio.run(measure(daemon.base_url, world, daemon.pid, ns.runs, results))
        spy = None if ns.no_profile else pyspy_binary()
        if spy:
            prof = profile_posts(spy, daemon.base_url, world, daemon.pid, tmp)
            if ns.keep_profile:
                shutil.copyfile(tmp / "profile.txt", ns.keep_profile)
            print(f"profiled {prof.posts} POSTs: {prof.samples} samples", file=sys.stderr)
        elif not ns.no_profile:
            print("py-spy not found (.venv/bin/pip install py-spy): no profile", file=sys.stderr)
    finally:
        if daemon is not None:
            code = daemon.stop()
            if code not in (0, None):
                print(f"membershipd exited with {code}:\n{daemon.log_text()[-3000:]}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()[0]
    body = render(ns, results, prof, environment_line(ns.runs, load_before, load_after), (load_before + load_after) / 2)
    return benchlib.publish(body, "rekey", HEADING, ns.out, not ns.no_write)


if __name__ == "__main__":
    sys.exit(main())
