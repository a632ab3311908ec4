"""Probe: what other members lose while one member in many rooms logs in to the bus and out again, in a loop
(docs/bus-auth.md, "Login floods" and "Limits per member").

Not part of ``make bench`` (it writes no section; it prints). Every member login
to the embedded nats-server makes membershipd answer an auth callout on its one
event loop (plugins/auth_enforce/callout.py): a user JWT listing each room of the
member twice, built and signed there, then verified and parsed by nats-server.
For a member in 1,000 rooms (``MEMBER_MAX_ROOMS``) that answer is about 197 KB
and 5.65 ms of membershipd's CPU, against 0.13 ms in one room; any member may
create rooms, and nothing but the bound of 256 connections held at once limits
how often a member logs in. Here:

* a real single-node ``membershipd serve`` (``--bus-auth enforce``, its
  embedded nats-server) in a temporary data dir on free loopback ports, a
  fresh one per run; an admin (set-up only) adds the ordinary members mallory
  (the attacker), alice and bob (the observers), each with a bus key;
* mallory creates ``--rooms`` rooms herself (signed ``POST /v1/rooms``, a few
  at a time: she owns and is in each); alice creates one room and adds bob, so
  both are in one room. The set-up's time is printed;
* a control phase, then an attack phase, each ``--seconds`` long. In both,
  alice logs in to the bus with nats-py and closes again, one login at a time,
  about ``--alice-rate`` per second (each login's latency and every failure are
  kept: nats-py's ``connect_timeout`` is 5 s, so a refusal is nats-server's own
  verdict, its 1.5 s callout window), and bob sends a signed ``GET /v1/me``
  every ``--bob-interval`` s, open loop (each request started on its schedule,
  whatever the ones before it do; latency and every answer other than 200 kept);
* in the attack phase, mallory's flood too: ``--procs`` processes, each running
  ``--loops`` concurrent login loops in the NATS protocol itself (TCP, ``INFO``,
  its nonce signed with her bus key, ``CONNECT``, ``PING``; authorized at the
  ``PONG``, as bench/bench_bus_auth.py's storm: nats-py's connect costs ~1 ms
  of client CPU), closing each connection at once and starting the next.

Each role is a process of its own (this script, ``--role``), as each would be
on its own machine; they share the machine's cores with the daemon, which the
CPU figures show (mallory's processes' CPU is printed too). Over each phase's
window the probe reads the CPU of membershipd and of its nats-server from
/proc, and the callout counters of ``/healthz`` (authorized, refused, expired:
answered after nats-server gave up) before and after.

It prints, per run and phase: mallory's authorized and refused logins per
second (and why the others were not authorized), alice's login p50/p99/max and
failures, bob's ``/v1/me`` p50/p99/max and non-200s, the CPU of membershipd and
nats-server (in cores: CPU seconds per second of the window), the load
average; then the medians over ``--runs`` runs. It runs with whatever
``unibus`` the interpreter imports, so the same file measures two trees (a
checkout of another commit with its own venv, run from that checkout):

    .venv/bin/python bench/probe_login_flood.py --runs 3
    .venv/bin/python bench/probe_login_flood.py --runs 1 --rooms 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import daemon_env, med, pct, proc_cpu_seconds, stop_process, wait_ready_line  # noqa: E402
import probelib  # noqa: E402
from probelib import child_result, read_start_line, sleep_until, unibus_origin  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
PHASES = ("control", "attack")
#: Bounds of the set-up steps and of each child.
SETUP_TIMEOUT = 60.0
CHILD_SLACK = 60.0
#: How long mallory may take to create her rooms at most (they are made a few at a time).
ROOMS_TIMEOUT = 600.0
#: mallory's room creations in flight at once.
ROOM_CONCURRENCY = 8
#: One raw login's bound (connect, INFO, CONNECT, the answer); nats-server's own window is 1.5 s.
RAW_TIMEOUT = 5.0
#: nats-py's connect_timeout for alice (above the server's 1.5 s callout window) and her whole login's bound.
ALICE_CONNECT_TIMEOUT = 5.0
ALICE_BOUND = 10.0
#: bob's requests: the bound of each and the most in flight at once (past it a slot is skipped and counted).
BOB_TIMEOUT = 10.0
BOB_MAX_IN_FLIGHT = 400
#: Logins per loop (mallory) and per window (alice) at most: bounds never reached at the speeds seen.
MAX_LOGINS = 1_000_000


# -- the children ---------------------------------------------------------------------


def summary(xs: list[float]) -> dict[str, Any]:
    """p50, p99 and max of latencies in seconds (None for no samples)."""
    if not xs:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(xs), "p50": statistics.median(xs), "p99": pct(xs, 99), "max": max(xs)}


async def raw_login(host: str, port: int, public: str, secret: bytes, timeout: float) -> str:
    """One member login in the NATS protocol itself (as bench/bench_bus_auth.py's ``raw_connect``): read
    ``INFO``, sign its nonce with the bus key, send ``CONNECT`` and ``PING``; nats-server answers ``PONG``
    once the callout authorized it, or ``-ERR``. The connection is closed at once; returns the answer line."""
    import nacl.bindings

    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line.startswith(b"INFO "):
            return line.decode(errors="replace").strip() or "closed before INFO"
        nonce = json.loads(line[5:])["nonce"].encode("ascii")
        signed = nacl.bindings.crypto_sign(nonce, secret)[:64]
        connect = {"verbose": False, "pedantic": False, "protocol": 1, "headers": True, "no_responders": True,
                   "lang": "probe-raw", "version": "0", "nkey": public,
                   "sig": base64.urlsafe_b64encode(signed).rstrip(b"=").decode("ascii")}
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        for _ in range(100):
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                return "connection closed"
            if line.startswith((b"INFO ", b"+OK", b"PING")):
                continue
            return line.decode(errors="replace").strip()
        return "no answer in 100 lines"
    finally:
        writer.close()


async def role_mallory(cfg: dict[str, Any]) -> dict[str, Any]:
    """``loops`` concurrent login loops with her bus key until the window is over; counts per second."""
    import nacl.bindings
    from unibus.client.keys import load_identity

    identity = load_identity(cfg["identity"])
    _pk, secret = nacl.bindings.crypto_sign_seed_keypair(identity.bus_seed)
    public, host, port, seconds = identity.bus_pub, cfg["host"], cfg["port"], cfg["seconds"]
    first = await raw_login(host, port, public, secret, RAW_TIMEOUT)  # her key works (or says why not)
    if first != "PONG":
        raise RuntimeError(f"mallory's first login was not authorized: {first}")
    print("ready", flush=True)
    start = await read_start_line(CHILD_SLACK)
    await sleep_until(start)
    end = start + seconds
    per_second: list[collections.Counter[str]] = [collections.Counter() for _ in range(int(seconds) + 1)]
    outcomes: collections.Counter[str] = collections.Counter()
    ok_latencies: list[float] = []
    cpu0 = time.process_time()

    async def loop() -> None:
        for _ in range(MAX_LOGINS):
            if time.time() >= end:
                return
            t0 = time.monotonic()
            try:
                answer = await raw_login(host, port, public, secret, RAW_TIMEOUT)
            except (OSError, TimeoutError, ValueError, KeyError) as e:
                answer = f"client: {type(e).__name__}"
            done = time.time()
            if done >= end:
                return  # finished past the window: not counted
            kind = "authorized" if answer == "PONG" else answer
            outcomes[kind] += 1
            per_second[min(int(done - start), len(per_second) - 1)][kind == "authorized"] += 1
            if kind == "authorized":
                ok_latencies.append(time.monotonic() - t0)
            elif answer.startswith("client:"):
                await asyncio.sleep(0.01)  # no hot loop on a refused TCP connection

    await asyncio.gather(*(loop() for _ in range(cfg["loops"])))
    return {"outcomes": dict(outcomes), "latency": summary(ok_latencies), "cpu": time.process_time() - cpu0,
            "per_second_ok": [c[True] for c in per_second[:int(seconds)]],
            "per_second_not": [c[False] for c in per_second[:int(seconds)]]}


async def role_alice(cfg: dict[str, Any]) -> dict[str, Any]:
    """Log in with nats-py and close, one at a time, ``rate`` per second, until the window is over."""
    import nats
    from unibus.client.keys import load_identity

    identity = load_identity(cfg["identity"])
    seed, url, seconds, rate = identity.bus_nkey_seed(), cfg["nats_url"], cfg["seconds"], cfg["rate"]
    latencies: list[float] = []
    failures: list[tuple[float, float, str]] = []  # (seconds into the window, time taken, why)

    async def ignore(_e: Exception) -> None:
        pass

    async def login() -> None:
        nc = await nats.connect(url, nkeys_seed_str=seed, allow_reconnect=False, max_reconnect_attempts=0,
                                connect_timeout=ALICE_CONNECT_TIMEOUT, error_cb=ignore,
                                inbox_prefix=f"_INBOX_{identity.handle}")
        await nc.close()

    # a login before the window: nats-py imported and warmed up, her key works
    await asyncio.wait_for(login(), ALICE_BOUND)
    print("ready", flush=True)
    start = await read_start_line(CHILD_SLACK)
    await sleep_until(start)
    end = start + seconds
    for i in range(MAX_LOGINS):
        await sleep_until(start + i / rate)  # behind: the next at once
        if time.time() >= end:
            break
        t0 = time.monotonic()
        try:
            nc = await asyncio.wait_for(
                nats.connect(url, nkeys_seed_str=seed, allow_reconnect=False, max_reconnect_attempts=0,
                             connect_timeout=ALICE_CONNECT_TIMEOUT, error_cb=ignore,
                             inbox_prefix=f"_INBOX_{identity.handle}"), ALICE_BOUND)
        except Exception as e:  # noqa: BLE001 - every failure is what is measured
            failures.append((time.time() - start, time.monotonic() - t0, f"{type(e).__name__}: {e}"[:120]))
            continue
        latencies.append(time.monotonic() - t0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), ALICE_BOUND)
    return {"latency": summary(latencies), "failures": failures, "logins": len(latencies) + len(failures)}


async def role_bob(cfg: dict[str, Any]) -> dict[str, Any]:
    """A signed ``GET /v1/me`` every ``interval`` s, each on its own schedule, until the window is over."""
    import aiohttp
    import yarl
    from unibus.client.keys import load_identity
    from unibus.signing import sign_request

    identity = load_identity(cfg["identity"])
    seconds, interval = cfg["seconds"], cfg["interval"]
    url = yarl.URL(cfg["base_url"] + "/v1/me", encoded=True)
    latencies: list[float] = []
    answers: collections.Counter[str] = collections.Counter()
    slow: list[tuple[float, float]] = []  # (seconds into the window, latency) of the requests over 1 s
    skipped = 0
    in_flight: set[asyncio.Task] = set()
    timeout = aiohttp.ClientTimeout(total=BOB_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=BOB_MAX_IN_FLIGHT)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def get_me(start: float) -> None:
            headers = sign_request("GET", "/v1/me", None, keyid=identity.handle, private_key=identity.sign_key)
            headers["Accept"] = "application/json, application/problem+json"
            t0 = time.monotonic()
            try:
                async with session.get(url, headers=headers, allow_redirects=False) as resp:
                    await resp.read()
                    status = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as e:
                status = type(e).__name__
            took = time.monotonic() - t0
            answers[status] += 1
            if status == "200":
                latencies.append(took)
            if took > 1.0:
                slow.append((round(time.time() - start - took, 2), round(took, 3)))

        await asyncio.wait_for(get_me(time.time()), BOB_TIMEOUT)  # warm up: the connection, the member's record
        if answers.get("200") != 1:
            raise RuntimeError(f"bob's first GET /v1/me was answered {dict(answers)}")
        answers.clear()
        latencies.clear()
        slow.clear()
        print("ready", flush=True)
        start = await read_start_line(CHILD_SLACK)
        await sleep_until(start)
        end = start + seconds
        for i in range(int(seconds / interval) + 1):
            await sleep_until(start + i * interval)
            if time.time() >= end:
                break
            if len(in_flight) >= BOB_MAX_IN_FLIGHT:
                skipped += 1
                continue
            task = asyncio.create_task(get_me(start))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=BOB_TIMEOUT + 5)
    return {"latency": summary(latencies), "answers": dict(answers), "skipped": skipped,
            "requests": sum(answers.values()), "slow": slow[:20]}


def run_role(role: str, config: Path) -> int:
    return probelib.run_role({"mallory": role_mallory, "alice": role_alice, "bob": role_bob}, role, config,
                             lambda cfg: cfg["seconds"] + 2 * CHILD_SLACK)


# -- the orchestrator -----------------------------------------------------------------


async def set_up(base_url: str, admin: Any, people: dict[str, Any], rooms: int) -> dict[str, Any]:
    """The members; mallory's ``rooms`` rooms, made by herself; alice's room with bob. Times of each step."""
    from unibus.client import UnibusClient

    def sdk(identity: Any) -> UnibusClient:
        return UnibusClient(base_url, identity, notice=lambda _text: None)

    t0 = time.monotonic()
    async with sdk(admin) as a:
        for handle, identity in people.items():
            r = identity.public_record()
            await a.add_member(handle, r["sign_pub"], r["enc_pub"], r["enc_suite"], bus_pub=r["bus_pub"])
    async with sdk(people["alice"]) as al:
        shared = (await al.create_room("alice-bob"))["room_id"]
        await al.add_room_member(shared, "bob")
    t1 = time.monotonic()
    async with sdk(people["mallory"]) as m:
        gate = asyncio.Semaphore(ROOM_CONCURRENCY)

        async def create(i: int) -> None:
            async with gate:
                await m.create_room(f"m{i:04d}")

        await asyncio.wait_for(asyncio.gather(*(create(i) for i in range(rooms))), ROOMS_TIMEOUT)
        held = len(await m.list_rooms())
    t2 = time.monotonic()
    if held != rooms:
        raise RuntimeError(f"mallory is in {held} rooms, not {rooms}")
    return {"shared": shared, "members_s": t1 - t0, "rooms_s": t2 - t1, "mallory_rooms": held}


def callout_stats(daemon: Any) -> dict[str, int]:
    """The callout counters of ``/healthz`` (authorized, refused, throttled, expired, malformed)."""

    def find(doc: Any) -> Any:
        if isinstance(doc, dict):
            if isinstance(doc.get("callouts"), dict):
                return doc["callouts"]
            for v in doc.values():
                found = find(v)
                if found is not None:
                    return found
        return None

    try:
        status, body = daemon.healthz(timeout=30.0)
    except OSError:
        return {}
    return dict(find(body) or {}) if status == 200 else {}


def cpu_of(pids: dict[str, int | None]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        if pid:
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[name] = proc_cpu_seconds(pid)
    return out


def run_phase(phase: str, run: int, ns: argparse.Namespace, daemon: Any, files: dict[str, Path],
              scratch: Path) -> dict[str, Any]:
    tag = f"r{run}{phase}"
    common = {"seconds": ns.seconds, "tag": tag}
    host, port = "127.0.0.1", int(daemon.nats_url.rsplit(":", 1)[1])
    procs: list[subprocess.Popen] = []
    try:
        roles: dict[str, tuple[str, dict[str, Any]]] = {
            "alice": ("alice", {**common, "identity": str(files["alice"]), "nats_url": daemon.nats_url,
                                "rate": ns.alice_rate}),
            "bob": ("bob", {**common, "identity": str(files["bob"]), "base_url": daemon.base_url,
                            "interval": ns.bob_interval})}
        if phase == "attack":
            for p in range(ns.procs):
                roles[f"mallory{p}"] = ("mallory", {**common, "identity": str(files["mallory"]), "host": host,
                                                    "port": port, "loops": ns.loops})
        children = {name: probelib.start_child(SCRIPT, role, name, cfg, scratch, procs) for name, (role, cfg) in roles.items()}
        for name, proc in children.items():
            try:
                wait_ready_line(proc, SETUP_TIMEOUT, what=name)
            except (RuntimeError, TimeoutError) as e:
                stop_process(proc)
                err = (scratch / f"{name}-{tag}.stderr").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{e}:\n{err}") from None
        stats0 = callout_stats(daemon)
        load_before = os.getloadavg()[0]
        start = time.time() + 0.5
        for proc in children.values():
            assert proc.stdin is not None
            proc.stdin.write(f"{start!r}\n".encode())
            proc.stdin.flush()  # communicate() closes it
        pids = {"membershipd": daemon.pid, "nats-server": daemon.nats_pid()}
        pids.update({name: proc.pid for name, proc in children.items() if name.startswith("mallory")})
        time.sleep(max(0.0, start - time.time()))
        cpu0, t0 = cpu_of(pids), time.monotonic()
        time.sleep(max(0.0, start + ns.seconds - time.time()))
        cpu1, t1 = cpu_of(pids), time.monotonic()
        load_after = os.getloadavg()[0]
        results = {name: child_result(name, proc, scratch, tag, ns.seconds + 2 * CHILD_SLACK)
                   for name, proc in children.items()}
        stats1 = callout_stats(daemon)
    finally:
        for proc in procs:
            stop_process(proc)
    cores = {k: (cpu1[k] - cpu0[k]) / (t1 - t0) for k in cpu0 if k in cpu1}
    mallory_outcomes: collections.Counter[str] = collections.Counter()
    per_second_ok = [0] * int(ns.seconds)
    mallory_lat: list[float] = []
    for name, r in results.items():
        if name.startswith("mallory"):
            mallory_outcomes.update(r["outcomes"])
            per_second_ok = [a + b for a, b in zip(per_second_ok, r["per_second_ok"], strict=False)]
            if r["latency"]["p50"] is not None:
                mallory_lat.append(r["latency"]["p50"])
    authorized = mallory_outcomes.pop("authorized", 0)
    return {"phase": phase, "seconds": t1 - t0, "alice": results["alice"], "bob": results["bob"],
            "mallory_ok_s": authorized / ns.seconds, "mallory_not_s": sum(mallory_outcomes.values()) / ns.seconds,
            "mallory_not": dict(mallory_outcomes), "mallory_per_second_ok": per_second_ok,
            "mallory_p50": med(mallory_lat),
            "cpu_membershipd": cores.get("membershipd", float("nan")),
            "cpu_nats": cores.get("nats-server", float("nan")),
            "cpu_mallory": sum(v for k, v in cores.items() if k.startswith("mallory")),
            "callouts": {k: stats1.get(k, 0) - stats0.get(k, 0) for k in stats1},
            "load_before": load_before, "load_after": load_after}


def f_ms(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x * 1000:.0f}"


def print_phase(run: int, r: dict[str, Any]) -> None:
    alice, bob = r["alice"], r["bob"]
    non200 = sum(v for k, v in bob["answers"].items() if k != "200") + bob["skipped"]
    al, bl = alice["latency"], bob["latency"]
    print(f"  run {run} {r['phase']:7}: mallory {r['mallory_ok_s']:.0f} authorized/s, {r['mallory_not_s']:.1f} "
          f"refused/s; alice {alice['logins']} logins, p50/p99/max {f_ms(al['p50'])}/{f_ms(al['p99'])}/"
          f"{f_ms(al['max'])} ms, {len(alice['failures'])} failed; bob {bob['requests']} GET /v1/me, p50/p99/max "
          f"{f_ms(bl['p50'])}/{f_ms(bl['p99'])}/{f_ms(bl['max'])} ms, {non200} not 200; CPU (cores) membershipd "
          f"{r['cpu_membershipd']:.2f}, nats-server {r['cpu_nats']:.2f}"
          + (f", mallory's {r['cpu_mallory']:.2f}" if r["phase"] == "attack" else "")
          + f"; load {r['load_before']:.1f}→{r['load_after']:.1f}", flush=True)
    notes = []
    if r["mallory_not"]:
        notes.append(f"mallory not authorized: {r['mallory_not']}")
    if r["phase"] == "attack":
        per_s = r["mallory_per_second_ok"]
        notes.append(f"mallory's login p50 {f_ms(r['mallory_p50'])} ms, authorized per second "
                     f"{min(per_s) if per_s else 0}…{max(per_s) if per_s else 0}")
        logins = sum(r["callouts"].get(k, 0) for k in ("authorized", "refused", "throttled"))
        if logins:
            seconds = r["seconds"]
            notes.append(f"CPU per callout answered: membershipd {r['cpu_membershipd'] * seconds / logins * 1e3:.2f} "
                         f"ms, nats-server {r['cpu_nats'] * seconds / logins * 1e3:.2f} ms")
    if alice["failures"]:
        why = collections.Counter(f[2] for f in alice["failures"])
        notes.append(f"alice's failures {dict(why)} (first at {alice['failures'][0][0]:.1f} s, each after "
                     f"{statistics.median(f[1] for f in alice['failures']):.2f} s median)")
    if non200:
        notes.append(f"bob's answers {bob['answers']}, skipped {bob['skipped']}")
    if bob["slow"]:
        notes.append(f"bob's requests over 1 s (start s, took s): {bob['slow'][:6]}")
    if r["callouts"]:
        notes.append(f"callouts (healthz) {r['callouts']}")
    if notes:
        print("      " + "; ".join(notes), flush=True)


REFUSAL = re.compile(r"auth callout: refused a connection: (.*?)(?: \(\d+ more like it in the last window not logged\))?$")


def refusal_kinds(log_text: str) -> dict[str, int]:
    """Why membershipd refused logins, from its log (``auth callout: refused a connection: ...``, at most
    5 lines of a kind per 10 s: each line's count of the lines left out before it is added to it),
    numbers written as N."""
    kinds: collections.Counter[str] = collections.Counter()
    for line in log_text.splitlines():
        m = REFUSAL.search(line.rstrip())
        if m:
            left_out = re.search(r"\((\d+) more like it in the last window not logged\)$", line.rstrip())
            kinds[re.sub(r"\d+", "N", m.group(1))] += 1 + (int(left_out.group(1)) if left_out else 0)
    return dict(kinds)


def one_run(run: int, ns: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    from unibus.client.keys import generate_identity, save_identity
    from unibus.testing import MembershipdProcess, bootstrap_member

    run_dir = scratch / f"run{run}"
    run_dir.mkdir()
    admin = generate_identity("admin")
    people = {h: generate_identity(h) for h in ("mallory", "alice", "bob")}
    files = {h: save_identity(identity, run_dir / "ids" / f"{h}.json") for h, identity in people.items()}
    data_dir = run_dir / "data"
    bootstrap_member(data_dir, admin, "admin")
    # INFO: its refusals say why (5 lines of a kind per 10 s at most: unibus.logthrottle)
    daemon = MembershipdProcess(data_dir, ["--bus-auth", "enforce"], env=daemon_env("INFO"))
    try:
        daemon.start(timeout=SETUP_TIMEOUT)
        setup = asyncio.run(asyncio.wait_for(set_up(daemon.base_url, admin, people, ns.rooms),
                                             ROOMS_TIMEOUT + SETUP_TIMEOUT))
        print(f"  run {run} set-up: members {setup['members_s']:.1f} s; mallory's {setup['mallory_rooms']} rooms "
              f"{setup['rooms_s']:.1f} s ({setup['rooms_s'] / max(1, ns.rooms) * 1000:.1f} ms a room, "
              f"{ROOM_CONCURRENCY} at a time)", flush=True)
        results = []
        for phase in PHASES:
            r = run_phase(phase, run, ns, daemon, files, run_dir)
            r["setup"] = setup
            print_phase(run, r)
            results.append(r)
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise RuntimeError(f"membershipd exited with {daemon.proc.returncode}:\n{daemon.log_text()[-3000:]}")
            time.sleep(2.0)  # the flood's disconnects reach the enforcer before the next phase
        kinds = refusal_kinds(daemon.log_text())
        if kinds:
            print(f"  run {run} why membershipd refused logins (its log, both phases; counts are at least these: "
                  f"the log leaves lines out): {kinds}", flush=True)
        return results
    finally:
        daemon.stop()


def orchestrate(ns: argparse.Namespace) -> int:
    load0 = os.getloadavg()
    print(unibus_origin(), flush=True)
    print(f"{ns.runs} runs, each on a fresh membershipd: a control window, then an attack window, {ns.seconds:g} s "
          f"each; mallory in {ns.rooms} rooms, {ns.procs} processes × {ns.loops} login loops; alice ~{ns.alice_rate:g} "
          f"logins/s, bob a GET /v1/me every {ns.bob_interval * 1000:g} ms; {os.cpu_count()} CPUs, load average "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="unibus-probe-logins-"))
    by_phase: dict[str, list[dict[str, Any]]] = {p: [] for p in PHASES}
    try:
        for run in range(1, ns.runs + 1):
            for r in one_run(run, ns, scratch):
                by_phase[r["phase"]].append(r)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        # the migrated database bootstrap_member copies, made once per process in a directory of its own
        template = getattr(sys.modules.get("unibus.testing"), "_migrated_template", None)
        if template is not None and template.parent.name.startswith("unibus-testing-"):
            shutil.rmtree(template.parent, ignore_errors=True)
    print(f"medians over {ns.runs} runs:")
    for phase, rs in by_phase.items():

        def m(f: Any, rs: list[dict[str, Any]] = rs) -> float:
            xs = [f(r) for r in rs]
            return med([x for x in xs if x is not None and x == x])

        print(f"  {phase:7}: mallory {m(lambda r: r['mallory_ok_s']):.0f} authorized/s, "
              f"{m(lambda r: r['mallory_not_s']):.1f} refused/s; alice p50/p99/max "
              f"{f_ms(m(lambda r: r['alice']['latency']['p50']))}/{f_ms(m(lambda r: r['alice']['latency']['p99']))}/"
              f"{f_ms(m(lambda r: r['alice']['latency']['max']))} ms, failed "
              f"{m(lambda r: len(r['alice']['failures'])):.0f} of {m(lambda r: r['alice']['logins']):.0f}; bob "
              f"p50/p99/max {f_ms(m(lambda r: r['bob']['latency']['p50']))}/"
              f"{f_ms(m(lambda r: r['bob']['latency']['p99']))}/{f_ms(m(lambda r: r['bob']['latency']['max']))} ms, "
              f"not 200 {m(lambda r: sum(v for k, v in r['bob']['answers'].items() if k != '200')):.0f} of "
              f"{m(lambda r: r['bob']['requests']):.0f}; CPU membershipd {m(lambda r: r['cpu_membershipd']):.2f}, "
              f"nats-server {m(lambda r: r['cpu_nats']):.2f}", flush=True)
    setups = [r["setup"]["rooms_s"] for r in by_phase["control"]]
    load1 = os.getloadavg()
    print(f"mallory's rooms took {med(setups):.1f} s to create (median); load average at the end "
          f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs, each a control and an attack window (default 3)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each window (default 15)")
    parser.add_argument("--rooms", type=int, default=1000, help="mallory's rooms (default 1000, the bound)")
    parser.add_argument("--procs", type=int, default=2, help="mallory's processes (default 2)")
    parser.add_argument("--loops", type=int, default=16, help="concurrent login loops per process (default 16)")
    parser.add_argument("--alice-rate", type=float, default=5.0, help="alice's logins per second (default 5)")
    parser.add_argument("--bob-interval", type=float, default=0.05,
                        help="seconds between bob's GET /v1/me (default 0.05)")
    # hidden: the child roles
    parser.add_argument("--role", choices=("mallory", "alice", "bob"), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.role is not None:
        return run_role(ns.role, ns.config)
    if not (1 <= ns.runs <= 50 and 1 <= ns.seconds <= 600 and 1 <= ns.rooms <= 1000 and 1 <= ns.procs <= 16
            and 1 <= ns.loops <= 256 and 0.1 <= ns.alice_rate <= 100 and 0.005 <= ns.bob_interval <= 10):
        parser.error("need 1 ≤ --runs ≤ 50, 1 ≤ --seconds ≤ 600, 1 ≤ --rooms ≤ 1000, 1 ≤ --procs ≤ 16, "
                     "1 ≤ --loops ≤ 256, 0.1 ≤ --alice-rate ≤ 100 and 0.005 ≤ --bob-interval ≤ 10")

    def terminated(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # the finally blocks stop every process started

    signal.signal(signal.SIGTERM, terminated)
    return orchestrate(ns)


if __name__ == "__main__":
    sys.exit(main())
