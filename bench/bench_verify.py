"""Verification benchmark: what verifying before trusting costs the client.

Run with ``.venv/bin/python bench/bench_verify.py [--runs 5] [--messages 20000] [--no-write]``.
Not a test: it prints markdown and writes it into docs/benchmarks.md between
the ``bench:verify`` markers (other sections of that file are kept).

Three measurements, each against a baseline timed in the same run (median,
min, max of ``--runs`` rounds):

* **Rekey of a 1,000-member room, end to end, from an empty replica**: a new
  ``UnibusClient`` with an empty replica directory runs ``await rekey(room)``:
  ``GET /v1/rooms/{id}``, the whole membership log fetched and verified
  (about 2,000 entries: every member's add and room add), the room compared
  with it, 1,000 seals to the log's keys, 1,000 key package signatures, the
  keys POST. Baselines in the same round: the unverified rekey (the same
  steps without the log: seal to the server's room record, sign at the served
  head, POST) and the verified rekey with a warm replica (only the head to
  check). One daemon per suite (X25519, MLKEM768_X25519), with the defaults
  (bus auth ``enforce``), each room of 1,000 members (the owner included),
  its store rows and log entries written offline before the daemon starts
  (bench/benchlog.py: each entry signed for real by its author, as the
  server would have appended it).
* **Verifying a 10,000-entry log from scratch**: ``client.verify_log()`` (HTTP
  pages of 1,000 entries and every check), and the same entries replayed
  through ``LogState`` alone, already fetched (CPU only). The log is what a
  deployment makes, written offline the same way: 1,000 members, 100 rooms of
  50, then rounds of a removal and a rekey per room.
* **Signed messages per second**, one sender process and one listener
  process on the bus: sign + encrypt → verify + decrypt (the listener is the
  SDK's ``bus.listen()``, every check included) against unsigned in the same
  run (encrypt → decrypt, the 0.11 path). Both senders publish without a
  round trip per message (``Bus.send`` waits for one, which measures the
  network instead). 256-byte payloads.

Then, for diagnosis, the per-message and per-entry costs timed alone in this
process (sign, verify, parse, canonical JSON, one entry's replay).

Every process started here is stopped in a ``finally``; everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import benchlib  # noqa: E402  (bench/ is on sys.path when run as a script)
from benchlib import daemon_env, med, start_membershipd, stop_all
from benchlog import entry_count
import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HEADING = "## Verification: rekeys, the log, signed messages"
SUITES = ("X25519", "MLKEM768_X25519")
ROOM_SIZE = 1000
AIMS = {"X25519": 0.5, "MLKEM768_X25519": 0.8}
LOG_AIM = 2.0
MSG_AIM, MSG_RATIO_AIM = 5000, 0.40
PAYLOAD = 256


def cells(xs: Sequence[float], scale: float = 1000.0, fmt: str = ".0f") -> str:
    return benchlib.cells(xs, "{:" + fmt + "}", scale, sep=" / ", bold=True)


# -- set-up, offline (bench/benchlog.py) ------------------------------------------------


def big_room(data_dir: Path, admin: Any, suite: str) -> str:
    """A room of ROOM_SIZE members (the admin owns it), with the ~2,000 log entries that made it."""
    from benchlog import OfflineWorld

    from unibus.client.keys import generate_identity

    people = [generate_identity(f"{suite[0].lower()}{i:04d}", suite) for i in range(1, ROOM_SIZE)]
    with OfflineWorld(data_dir) as w:
        for p in people:
            w.add_member(admin, p)
        rid = w.create_room(admin, f"bench-{suite}")
        for p in people:
            w.add_room_member(admin, rid, p.handle)
    return rid


def big_log(data_dir: Path, admin: Any, target: int = 10_000) -> None:
    """About ``target`` entries: 1,000 members, 100 rooms of 50, then a removal and a rekey per room per round."""
    from benchlog import OfflineWorld

    from unibus.client.keys import generate_identity

    people = [generate_identity(f"u{i:04d}") for i in range(1000)]
    with OfflineWorld(data_dir) as w:
        for p in people:
            w.add_member(admin, p)
        rooms = [w.create_room(admin, f"r{i}") for i in range(100)]
        rosters = {rid: [people[(i * 10 + j) % 1000].handle for j in range(49)] for i, rid in enumerate(rooms)}
        for rid, handles in rosters.items():
            for h in handles:
                w.add_room_member(admin, rid, h)
        while w.seq < target - 2 * len(rooms):
            for rid in rooms:
                w.remove_room_member(admin, rid, rosters[rid].pop())
                w.rekey_entry(admin, rid)


# -- the rekeys ---------------------------------------------------------------------------


async def rekey_unverified(c: Any, rid: str) -> int:
    """The rekey without the log: seal to the server's record, sign at the served head, POST."""
    from unibus.client.sealing import new_room_key, seal_for_members

    room = await c.get_room(rid)
    epoch = int(room["epoch"]) + 1
    sealed = seal_for_members(new_room_key(), room["members"], rid, epoch)
    head = await c.log_head()
    head = {"seq": head["seq"], "hash": head["hash"]}
    await c.post_keys(rid, epoch, sealed, c.sign_key_packages(rid, epoch, sealed, head), head)
    return epoch


async def measure_rekeys(base_url: str, admin: Any, rid: str, runs: int, scratch: Path,
                         out: dict[str, list[float]]) -> None:
    from unibus.client import UnibusClient

    async with UnibusClient(base_url, admin, timeout=120) as plain, \
            UnibusClient(base_url, admin, timeout=120, replica_root=scratch / "warm", notice=lambda _t: None) as warm:
        await warm.rekey(rid)  # warm-up: connections, the warm replica, imports
        await rekey_unverified(plain, rid)
        for i in range(runs):
            order = ("empty", "unverified", "warm") if i % 2 == 0 else ("warm", "unverified", "empty")
            for kind in order:
                t = time.perf_counter()
                if kind == "empty":
                    async with UnibusClient(base_url, admin, timeout=120, replica_root=scratch / f"empty{i}",
                                            notice=lambda _t: None) as fresh:
                        await fresh.rekey(rid)
                elif kind == "unverified":
                    await rekey_unverified(plain, rid)
                else:
                    await warm.rekey(rid)
                out[kind].append(time.perf_counter() - t)
            print(f"  round {i + 1}/{runs}: " + ", ".join(f"{k} {out[k][-1] * 1000:.0f} ms" for k in order),
                  file=sys.stderr)


async def rekey_phases(base_url: str, admin: Any, rid: str, scratch: Path, runs: int) -> dict[str, list[float]]:
    """Where an empty-replica rekey's time goes: its steps timed by wrapping the functions it calls."""
    import unibus.client.api as api
    from unibus.client import UnibusClient
    from unibus.client.replica import Replica
    from unibus.memberlog import LogState

    phases: dict[str, list[float]] = {}
    current: dict[str, float] = {}

    def wrap(owner: Any, name: str, label: str, is_async: bool) -> Any:
        fn = getattr(owner, name)
        if is_async:
            async def wrapper(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await fn(*a, **k)
                finally:
                    current[label] = current.get(label, 0.0) + time.perf_counter() - t
        else:
            def wrapper(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    current[label] = current.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, name, wrapper)
        return fn

    plan = [(UnibusClient, "get_room", "GET room", True), (UnibusClient, "log", "GET /v1/log pages", True),
            (LogState, "apply_canonical", "entries applied (every check but Ed25519)", False),
            (LogState, "run_deferred", "Ed25519 checks (2 threads)", False),
            (Replica, "_save", "replica files written", False),
            (UnibusClient, "room_differences", "server room compared", False),
            (api, "seal_room_key", "seal (HPKE)", False), (api, "sign_key_packages", "key packages signed", False),
            (UnibusClient, "post_keys", "POST keys", True)]
    saved = [(owner, name, wrap(owner, name, label, is_async)) for owner, name, label, is_async in plan]
    try:
        for i in range(runs):
            current.clear()
            async with UnibusClient(base_url, admin, timeout=120, replica_root=scratch / f"phases{i}",
                                    notice=lambda _t: None) as fresh:
                t = time.perf_counter()
                await fresh.rekey(rid)
                total = time.perf_counter() - t
            current["(total)"] = total
            current["(other)"] = total - sum(v for k, v in current.items() if not k.startswith("("))
            for k, v in current.items():
                phases.setdefault(k, []).append(v)
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    return phases


async def measure_log(base_url: str, admin: Any, runs: int, out: dict[str, list[float]]) -> int:
    from unibus.client import UnibusClient
    from unibus.memberlog import LogState

    entries: list[Any] = []
    async with UnibusClient(base_url, admin, timeout=120, notice=lambda _t: None) as c:
        after = None
        while True:
            page = (await c.log(after=after, limit=1000))["entries"]
            if not page:
                break
            entries += page
            after = page[-1]["seq"]
    texts = [json.dumps(e) for e in entries]
    for i in range(runs):
        async with UnibusClient(base_url, admin, timeout=120, notice=lambda _t: None) as c:
            t = time.perf_counter()
            await c.verify_log()
            out["http"].append(time.perf_counter() - t)
        for kind in ("deferred", "cpu"):
            docs = [json.loads(x) for x in texts]
            state = LogState()  # the client's bound: MAX_AUTH_SKEW, never the server's auth_skew
            t = time.perf_counter()
            if kind == "deferred":
                state.defer_checks()
            for e in docs:
                state.apply(e)
            if kind == "deferred":
                assert state.run_deferred() is None
            out[kind].append(time.perf_counter() - t)
        print(f"  round {i + 1}/{runs}: verify_log {out['http'][-1]:.2f} s, replay {out['deferred'][-1]:.2f} s "
              f"(deferred) {out['cpu'][-1]:.2f} s (sequential)", file=sys.stderr)
    return len(entries)


# -- messages ---------------------------------------------------------------------------


def role_worker(ns: argparse.Namespace) -> int:
    """A sender or a listener process (hidden ``--role``): prints one JSON line when done."""
    from unibus.client import UnibusClient
    from unibus.client.keys import load_identity
    from unibus.client.sealing import decrypt_message, encrypt_message, message_subject, parse_epoch_header
    from unibus.client.signed import message_headers

    identity = load_identity(ns.identity)

    async def main() -> dict[str, Any]:
        async with UnibusClient(ns.server, identity, timeout=60, notice=lambda _t: None) as c, c.bus() as bus:
            subject = message_subject(ns.room, "bench")
            if ns.role == "send":
                epoch, key = await c.current_key(ns.room)
                body = os.urandom(PAYLOAD)
                await c.sync()
                print("ready", flush=True)
                sys.stdin.readline()
                t0, cpu0 = time.time(), time.process_time()
                for i in range(ns.count):
                    payload = encrypt_message(key, subject, epoch, body)
                    if ns.signed:
                        headers = message_headers(identity, subject, epoch, payload, int(time.time() * 1000))
                    else:
                        headers = {"Unibus-Epoch": str(epoch)}
                    await bus.nc.publish(subject, payload, headers=headers)
                    if i % 256 == 255:
                        await asyncio.sleep(0)  # let nats-py's flusher run
                await bus.nc.flush(timeout=60)
                return {"start": t0, "end": time.time(), "cpu": time.process_time() - cpu0}
            got, first, last = 0, 0.0, 0.0
            cpu0 = time.process_time()
            if ns.signed:
                listener = bus.listen(ns.room, include_errors=False)
                await listener.start()
                await c.message_key(ns.room, (await c.verified_room(ns.room)).epoch)  # warm: key, replica
                print("ready", flush=True)
                async for _m in listener:
                    got += 1
                    last = time.time()
                    first = first or last
                    if got >= ns.count:
                        break
                rejected = dict(listener.rejected)
                await listener.stop()
            else:
                queue: asyncio.Queue[Any] = asyncio.Queue()
                await bus.nc.subscribe(subject, cb=queue.put)
                await bus.nc.flush()
                await bus.nc.flush()  # the SUB is live on the server (unibus.client.api._barrier)
                _, key = await c.current_key(ns.room)
                print("ready", flush=True)
                rejected = {}
                while got < ns.count:
                    msg = await queue.get()
                    decrypt_message(key, msg.subject, parse_epoch_header(msg.headers.get("Unibus-Epoch")), msg.data)
                    got += 1
                    last = time.time()
                    first = first or last
            return {"first": first, "end": last, "cpu": time.process_time() - cpu0, "rejected": rejected}

    print(json.dumps(asyncio.run(main())), flush=True)
    return 0


async def small_room(base_url: str, admin: Any, bob: Any) -> str:
    from unibus.client import UnibusClient

    async with UnibusClient(base_url, admin, notice=lambda _t: None) as c:
        r = bob.public_record()
        await c.add_member("bob", r["sign_pub"], r["enc_pub"], r["enc_suite"], bus_pub=r["bus_pub"])
        room = (await c.create_room("messages"))["room_id"]
        await c.add_room_member(room, "bob")
        await c.rekey(room)
        return room


def run_messages(server: str, room: str, ids: dict[str, Path], count: int, signed: bool) -> dict[str, float]:
    def worker(role: str, identity: Path) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, __file__, "--role", role, "--server", server, "--room", room,
                                 "--identity", str(identity), "--count", str(count)] + (["--signed"] if signed else []),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=daemon_env())

    listener = worker("listen", ids["bob"])
    sender = worker("send", ids["owner"])
    try:
        for p in (listener, sender):
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"worker not ready: {line!r}")
        assert sender.stdin is not None
        sender.stdin.write("go\n")
        sender.stdin.flush()
        s_out, _ = sender.communicate(timeout=600)
        l_out, _ = listener.communicate(timeout=600)
    finally:
        for p in (listener, sender):
            if p.poll() is None:
                p.kill()
                p.wait(5)
    s, r = json.loads(s_out.splitlines()[-1]), json.loads(l_out.splitlines()[-1])
    if r["rejected"]:
        raise RuntimeError(f"the listener rejected messages: {r['rejected']}")
    seconds = r["end"] - s["start"]
    return {"rate": count / seconds, "send_cpu_us": s["cpu"] / count * 1e6, "recv_cpu_us": r["cpu"] / count * 1e6,
            "send_rate": count / (s["end"] - s["start"])}


# -- costs alone ------------------------------------------------------------------------


def unit_costs() -> dict[str, float]:
    """µs per operation, timed alone in this process (median of 5 batches)."""
    import hashlib

    import nacl.bindings

    from unibus.client.keys import generate_identity
    from unibus.client.sealing import decrypt_message, encrypt_message
    from unibus.client.signed import message_headers, parse_envelope
    from unibus.memberlog import canonical, message_input, verify_ed25519
    import rfc8785

    me = generate_identity("alice")
    key, subject = os.urandom(32), "unibus.room.r1.bench"
    payload = encrypt_message(key, subject, 1, os.urandom(PAYLOAD))
    headers = message_headers(me, subject, 1, payload, int(time.time() * 1000))
    env = parse_envelope(headers)
    data = message_input(subject, 1, "alice", env.time_ms, env.msg_id, payload)
    entry = {"seq": 7, "prev": "ab" * 32, "at": 1796000000, "kind": "request", "result": {},
             "request": {"method": "PUT", "path": "/v1/rooms/abc/members/bob", "query": "", "content_digest": None,
                         "signature_input": 'sig1=("@method" "@path" "@query");created=1796000000;'
                                            'nonce="aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";keyid="alice";alg="ed25519"',
                         "signature": "sig1=:" + "A" * 86 + "==:", "body": None}}
    ops = {
        "encrypt (ChaCha20-Poly1305, 256 B)": lambda: encrypt_message(key, subject, 1, payload[:PAYLOAD]),
        "decrypt": lambda: decrypt_message(key, subject, 1, payload),
        "sign a message (headers included)": lambda: message_headers(me, subject, 1, payload, env.time_ms),
        "parse the five headers": lambda: parse_envelope(headers),
        "verify a signature (libsodium)": lambda: verify_ed25519(me.sign_pub, data, env.sig),
        "is_valid_point (a key check)": lambda: nacl.bindings.crypto_core_ed25519_is_valid_point(me.sign_pub),
        "canonical JSON of an entry (json.dumps path)": lambda: canonical(entry),
        "canonical JSON of an entry (rfc8785)": lambda: rfc8785.dumps(entry),
        "SHA-256 of an entry": lambda: hashlib.sha256(canonical(entry)).hexdigest(),
    }
    out = {}
    for name, fn in ops.items():
        batches = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(500):
                fn()
            batches.append((time.perf_counter() - t) / 500 * 1e6)
        out[name] = med(batches)
    return out


# -- the report -------------------------------------------------------------------------


def render(ns: argparse.Namespace, rk: dict[str, dict[str, list[float]]], phases: dict[str, dict[str, list[float]]],
           log_entries: int,
           lg: dict[str, list[float]], msgs: dict[str, list[dict[str, float]]], units: dict[str, float],
           env_line: str) -> str:
    out = [env_line, ""]
    out += [(f"Rekey of a {ROOM_SIZE:,}-member room, end to end (ms, min / **median** / max of {ns.runs}): from an "
             "empty replica (the whole log fetched and verified first), with a warm replica (the head checked, "
             "nothing new), and without verification (the baseline: seal to the server's record, sign, POST)."), "",
            "| suite | log entries | empty replica | warm replica | unverified | empty ÷ unverified | aim |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for s in SUITES:
        r = rk[s]
        e, u = med(r["empty"]), med(r["unverified"])
        verdict = "met" if e <= AIMS[s] else "missed"
        out.append(f"| {s} | {int(r['entries'][0]):,} | {cells(r['empty'])} | {cells(r['warm'])} | "
                   f"{cells(r['unverified'])} | {e / u:.2f}× | ≤ {AIMS[s] * 1000:.0f} ms: {verdict} |")
    labels = list(phases[SUITES[0]])
    out += ["", (f"Where an empty-replica rekey's time goes: {ns.runs} more runs, each step timed by wrapping the "
                 "function the client calls for it (ms, medians; \"other\" is the rest: the event loop, JSON, "
                 "the bits between the steps):"), "",
            "| step | " + " | ".join(SUITES) + " |", "|---|" + "---:|" * len(SUITES)]
    for label in labels:
        out.append(f"| {label} | " + " | ".join(f"{med(phases[s].get(label, [0.0])) * 1000:.0f}" for s in SUITES)
                   + " |")
    h, d, c = med(lg["http"]), med(lg["deferred"]), med(lg["cpu"])
    out += ["", (f"Verifying a {log_entries:,}-entry log from scratch (s, min / **median** / max of {ns.runs}): "
                 "`verify_log()` over HTTP (pages of 1,000), and the replay of the same entries through `LogState` "
                 "alone (already fetched and parsed), with its Ed25519 work on two threads or on one."), "",
            "| what | seconds | µs per entry | aim |", "|---|---:|---:|---|",
            f"| `verify_log()` | {cells(lg['http'], 1, '.2f')} | {h / log_entries * 1e6:.0f} | "
            f"≤ {LOG_AIM:.0f} s: {'met' if h <= LOG_AIM else 'missed'} |",
            f"| `LogState` replay alone, Ed25519 checks on 2 threads (as `verify_log()` does) | "
            f"{cells(lg['deferred'], 1, '.2f')} | {d / log_entries * 1e6:.0f} | |",
            f"| `LogState` replay alone, sequential (one core) | {cells(lg['cpu'], 1, '.2f')} | "
            f"{c / log_entries * 1e6:.0f} | |"]
    sig, uns = msgs["signed"], msgs["unsigned"]
    sr, ur = med([m["rate"] for m in sig]), med([m["rate"] for m in uns])
    out += ["", (f"Messages per second, one sender process and one listener process, {ns.messages:,} messages of "
                 f"{PAYLOAD} bytes per run (min / **median** / max of {ns.runs}), from the sender's start to the "
                 "listener's last message; CPU µs per message of each process (medians)."), "",
            "| messages | msg/s | sender CPU µs | listener CPU µs | aim |", "|---|---:|---:|---:|---|",
            f"| signed: sign + encrypt → verify + decrypt (`bus.listen()`) | {cells([m['rate'] for m in sig], 1)} | "
            f"{med([m['send_cpu_us'] for m in sig]):.0f} | {med([m['recv_cpu_us'] for m in sig]):.0f} | "
            f"≥ {MSG_AIM:,}: {'met' if sr >= MSG_AIM else 'missed'} |",
            f"| unsigned (baseline): encrypt → decrypt | {cells([m['rate'] for m in uns], 1)} | "
            f"{med([m['send_cpu_us'] for m in uns]):.0f} | {med([m['recv_cpu_us'] for m in uns]):.0f} | |",
            f"| signed ÷ unsigned | {sr / ur:.0%} | | | ≥ {MSG_RATIO_AIM:.0%}: "
            f"{'met' if sr / ur >= MSG_RATIO_AIM else 'missed'} |"]
    out += ["", "Where the time goes: each operation timed alone in this process (µs, median of 5 × 500):", "",
            "| operation | µs |", "|---|---:|"]
    out += [f"| {k} | {v:.1f} |" for k, v in units.items()]
    out += ["", ("A listener spends most of a message in the Ed25519 verification of its signature; a sender in "
                 "its signature. A log entry costs its signature verification plus, for a member's addition, the "
                 "`is_valid_point` check of its signing key (both on two threads, page by page), and about 100 µs of "
                 "Python for everything else (`check_request`'s parsing of the signature headers, the canonical "
                 "JSON and its hash, the body's JSON, the rules). The canonical JSON of an entry goes through "
                 "`json.dumps` when that is exactly RFC 8785 (every valid entry), several times faster than "
                 "`rfc8785`."),
            "", "Reproduce:", "", "```", f".venv/bin/python bench/bench_verify.py --runs {ns.runs} --messages {ns.messages}",
            "```"]
    return "\n".join(out) + "\n"


def environment_line(ns: argparse.Namespace, load_before: float, load_after: float) -> str:
    import cryptography
    import nacl

    return (f"{benchlib.measured_by(f'bench/bench_verify.py --runs {ns.runs} --messages {ns.messages}')}, "
            f"cryptography {cryptography.__version__}, PyNaCl {nacl.__version__}; membershipd with the SQLite store, "
            f"client and server on loopback; {benchlib.load_average(load_before, load_after)}.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchlib.arg_parser(__doc__, "verify", 5, "rounds")
    parser.add_argument("--messages", type=int, default=20000, help="messages per run (default 20000)")
    parser.add_argument("--role", choices=("send", "listen"), help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--room", help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--signed", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.role:
        return role_worker(ns)
    if ns.runs < 1 or ns.messages < 100:
        parser.error("--runs must be at least 1 and --messages at least 100")

    from unibus.client.keys import generate_identity, save_identity
    from unibus.testing import bootstrap_member

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="unibus-bench-verify-"))
    daemons: list[Any] = []
    rk: dict[str, dict[str, list[float]]] = {}
    lg: dict[str, list[float]] = {"http": [], "deferred": [], "cpu": []}
    phases: dict[str, dict[str, list[float]]] = {}
    msgs: dict[str, list[dict[str, float]]] = {"signed": [], "unsigned": []}
    try:
        for suite in SUITES:
            admin = generate_identity("owner", suite)
            t = time.perf_counter()
            bootstrap_member(tmp / suite, admin, "admin")
            rid = big_room(tmp / suite, admin, suite)
            print(f"{suite}: a {ROOM_SIZE}-member room written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            d = start_membershipd(tmp / suite)
            daemons.append(d)
            rk[suite] = {"empty": [], "unverified": [], "warm": []}
            rk[suite]["entries"] = [float(entry_count(tmp / suite))]
            asyncio.run(measure_rekeys(d.base_url, admin, rid, ns.runs, tmp / f"replicas-{suite}", rk[suite]))
            phases[suite] = asyncio.run(rekey_phases(d.base_url, admin, rid, tmp / f"replicas-{suite}", ns.runs))
            if suite == "X25519":
                bob = generate_identity("bob")
                ids = {"owner": tmp / "owner.json", "bob": tmp / "bob.json"}
                save_identity(admin, ids["owner"])
                save_identity(bob, ids["bob"])
                room = asyncio.run(small_room(d.base_url, admin, bob))
                for i in range(ns.runs):
                    for signed in ((True, False) if i % 2 == 0 else (False, True)):
                        m = run_messages(d.base_url, room, ids, ns.messages, signed)
                        msgs["signed" if signed else "unsigned"].append(m)
                        print(f"  messages round {i + 1}/{ns.runs}, {'signed' if signed else 'unsigned'}: "
                              f"{m['rate']:,.0f} msg/s", file=sys.stderr)
            d.stop()
        admin = generate_identity("owner")
        t = time.perf_counter()
        bootstrap_member(tmp / "log", admin, "admin")
        big_log(tmp / "log", admin)
        print(f"a {entry_count(tmp / 'log')}-entry log written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        d = start_membershipd(tmp / "log")
        daemons.append(d)
        log_entries = asyncio.run(measure_log(d.base_url, admin, ns.runs, lg))
    finally:
        stop_all((), daemons, tmp)
    units = unit_costs()
    body = render(ns, rk, phases, log_entries, lg, msgs, units,
                  environment_line(ns, load_before, os.getloadavg()[0]))
    return benchlib.publish(body, "verify", HEADING, ns.out, not ns.no_write)


if __name__ == "__main__":
    sys.exit(main())
