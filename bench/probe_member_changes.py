"""Probe: what a member loses while another adds it to a room and removes it again, in a loop (docs/bus-auth.md,
"How often one member may change another's rooms"; docs/benchmarks.md, "Member changes").

Not part of ``make bench`` (it writes no section; it prints). Every change of a
member's rooms kicks all of that member's NATS connections, and any member may
create a room and add or remove any other member. Here:

* a real single-node ``membershipd serve`` (``--bus-auth enforce``, its
  embedded nats-server) in a temporary data dir on free loopback ports, a
  fresh one per run; an admin (set-up only) adds the ordinary members alice
  (the attacker), bob (the victim) and carol (the sender);
* carol owns room ``work`` with bob in it (rekeyed); bob listens on it with
  the SDK's ``Bus`` (its normal reconnects), carol sends numbered messages on
  it at ``--rate`` per second for ``--seconds``;
* alice owns a room of her own and, during the same window, adds bob to it and
  removes him again, as fast as the server answers (or at ``--pace`` changes per
  second at most), with signed requests. A ``429`` is counted apart and waited
  out (its ``Retry-After``, at most 10 s); any other refusal is counted too;
* a control phase first: the same window with alice idle.

Each of bob, carol and alice is a process of its own (this script, ``--role``),
as each would be on its own machine. carol's Bus looks the room's epoch up
once for the whole window (``key_ttl``): the room never changes, and her
sends are not slowed by syncing the log that alice's changes grow.

The probe prints, per run and phase: messages sent, received by bob, lost %,
the outages (runs of consecutive lost messages) and their median length, bob's
reconnects, alice's changes done, 429s and other errors; then the median and
range of the loss over ``--runs`` runs. It runs with whatever ``unibus`` the
interpreter imports, so the same file measures two trees (``before/`` a
checkout of the commit before, with its own venv):

    before/.venv/bin/python bench/probe_member_changes.py --runs 3 --seconds 20
    .venv/bin/python bench/probe_member_changes.py --runs 3 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
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

from benchlib import daemon_env, stop_process, wait_ready_line  # noqa: E402
import probelib  # noqa: E402
from probelib import child_result, read_start_line, sleep_until, unibus_origin  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
PHASES = ("control", "attack")
#: The longest a 429's Retry-After is waited out.
RETRY_AFTER_CAP = 10.0
#: How long bob keeps listening after the window (what is in flight arrives well within it).
GRACE = 1.5
#: Bounds of the set-up steps and of each child.
SETUP_TIMEOUT = 60.0
CHILD_SLACK = 60.0
#: alice's changes in one window at most (a bound; never reached at the speeds seen).
MAX_CHANGES = 200_000


# -- the children ---------------------------------------------------------------------


def client_for(cfg: dict[str, Any]) -> Any:
    from unibus.client import UnibusClient
    from unibus.client.keys import load_identity

    return UnibusClient(cfg["base_url"], load_identity(cfg["identity"]), notice=lambda _text: None)


async def role_bob(cfg: dict[str, Any]) -> dict[str, Any]:
    """Listen on the room until the window (plus GRACE) is over; the numbers received."""
    from unibus.client import BusError

    room, seconds = cfg["room"], cfg["seconds"]
    numbers: list[int] = []
    rejected: collections.Counter[str] = collections.Counter()
    foreign = 0
    bus_error: str | None = None
    async with client_for(cfg) as client:
        await client.sync()
        await client.room_key(room)  # the key of the room's epoch, before the window
        async with client.bus() as bus:
            listener = await bus.listen(room).start()

            async def consume() -> None:
                nonlocal foreign
                async for m in listener:
                    if not m.ok:
                        rejected[m.reason or "?"] += 1
                        continue
                    tag, _, n = (m.text or "").partition(":")
                    if tag == cfg["tag"] and n.isdigit():
                        numbers.append(int(n))
                    else:
                        foreign += 1

            print("ready", flush=True)
            start = await read_start_line(CHILD_SLACK)
            task = asyncio.create_task(consume())
            try:
                await asyncio.wait_for(asyncio.shield(task), max(0.0, start + seconds + GRACE - time.time()))
            except TimeoutError:
                pass  # the window is over
            except BusError as e:
                bus_error = f"{time.time() - start:.1f} s into the window: {e}"
            reconnects = bus.reconnects
            await listener.stop()  # what is queued is still taken, then the iteration ends
            with contextlib.suppress(TimeoutError, BusError):
                await asyncio.wait_for(task, 10)
            if not task.done():
                task.cancel()
    return {"numbers": numbers, "reconnects": reconnects, "rejected": dict(rejected), "foreign": foreign,
            "dropped": listener.dropped, "bus_error": bus_error}


async def role_carol(cfg: dict[str, Any]) -> dict[str, Any]:
    """Send ``tag:i`` on the room, i = 0, 1, ..., at ``rate`` per second for the window."""
    from unibus.client import BusError

    room, seconds, rate = cfg["room"], cfg["seconds"], cfg["rate"]
    sent = errors = 0
    first_error: str | None = None
    async with client_for(cfg) as client:
        async with client.bus(key_ttl=seconds + CHILD_SLACK) as bus:
            await bus.current_key(room)  # the room's epoch and key, looked up before the window
            print("ready", flush=True)
            start = await read_start_line(CHILD_SLACK)
            await sleep_until(start)
            end = start + seconds
            t0 = time.time()
            while time.time() < end:
                await sleep_until(start + sent / rate)  # behind: catch up at once
                if time.time() >= end:
                    break
                try:
                    await asyncio.wait_for(bus.send(room, "n", f"{cfg['tag']}:{sent}"), 10)
                    sent += 1
                except (BusError, TimeoutError) as e:
                    errors += 1
                    first_error = first_error or str(e)
                    await asyncio.sleep(0.05)
            elapsed = time.time() - t0
    return {"sent": sent, "errors": errors, "first_error": first_error, "seconds": elapsed}


async def role_alice(cfg: dict[str, Any]) -> dict[str, Any]:
    """Add bob to her room and remove him again until the window is over; count the answers."""
    import aiohttp
    import yarl
    from unibus.signing import sign_request

    room, victim, seconds, pace = cfg["room"], cfg["victim"], cfg["seconds"], cfg["pace"]
    path = f"/v1/rooms/{room}/members/{victim}"
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    retry_afters: list[float] = []
    details: set[str] = set()  # what the first few other refusals said
    adds = removes = too_many = 0
    waited = 0.0
    in_room = False
    async with client_for(cfg) as client:
        tag = await client.deployment_tag()  # changing requests are bound to the deployment, as the SDK does
        identity = client.identity
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def change(method: str) -> tuple[int, str | None]:
                headers = sign_request(method, path, None, keyid=identity.handle, private_key=identity.sign_key,
                                       tag=tag)
                headers["Accept"] = "application/json, application/problem+json"
                url = yarl.URL(cfg["base_url"] + path, encoded=True)
                async with session.request(method, url, headers=headers, allow_redirects=False) as resp:
                    raw = await resp.read()
                    if resp.status >= 300 and resp.status not in (429, 503) and len(details) < 3:
                        with contextlib.suppress(ValueError, AttributeError):
                            details.add(f"{resp.status} {json.loads(raw).get('detail')}")
                    return resp.status, resp.headers.get("Retry-After")

            print("ready", flush=True)
            start = await read_start_line(CHILD_SLACK)
            await sleep_until(start)
            end = start + seconds
            for _ in range(MAX_CHANGES):
                if pace > 0:
                    await sleep_until(start + (adds + removes) / pace)
                if time.time() >= end:
                    break
                method = "DELETE" if in_room else "PUT"
                t0 = time.monotonic()
                try:
                    status, retry_after = await change(method)
                except (aiohttp.ClientError, TimeoutError) as e:
                    statuses[type(e).__name__] += 1
                    await asyncio.sleep(0.05)
                    continue
                if 200 <= status < 300 or status == 503:
                    # a 503 (change-not-enforced) is a change saved whose kicks are still being retried
                    latencies.append(time.monotonic() - t0)
                    in_room = not in_room
                    adds += method == "PUT"
                    removes += method == "DELETE"
                    if status == 503:
                        statuses["503 (saved, kicks unconfirmed)"] += 1
                elif status == 429:
                    too_many += 1
                    try:
                        wait = float(retry_after) if retry_after is not None else 1.0
                    except ValueError:
                        wait = 1.0
                    retry_afters.append(wait)
                    wait = max(0.0, min(wait, RETRY_AFTER_CAP, end - time.time()))
                    waited += wait
                    await asyncio.sleep(wait)
                else:
                    statuses[str(status)] += 1
                    if status == 404 and method == "DELETE":
                        in_room = False  # not in the room after all: add him next
                    await asyncio.sleep(0.05)
    return {"adds": adds, "removes": removes, "too_many": too_many, "errors": dict(statuses), "details": sorted(details),
            "retry_after": sorted(set(retry_afters)), "waited": waited,
            "latency_p50": statistics.median(latencies) if latencies else None,
            "latency_max": max(latencies) if latencies else None}


def run_role(role: str, config: Path) -> int:
    return probelib.run_role({"bob": role_bob, "carol": role_carol, "alice": role_alice}, role, config,
                             lambda cfg: cfg["seconds"] + 2 * CHILD_SLACK)


# -- the orchestrator -----------------------------------------------------------------


async def set_up(base_url: str, admin: Any, people: dict[str, Any]) -> dict[str, str]:
    """Members, carol's room ``work`` with bob (rekeyed), alice's own room; their ids."""
    from unibus.client import UnibusClient

    def sdk(identity: Any) -> UnibusClient:
        return UnibusClient(base_url, identity, notice=lambda _text: None)

    async with sdk(admin) as a:
        for handle, identity in people.items():
            r = identity.public_record()
            await a.add_member(handle, r["sign_pub"], r["enc_pub"], r["enc_suite"], bus_pub=r["bus_pub"])
    async with sdk(people["carol"]) as c:
        work = (await c.create_room("work"))["room_id"]
        await c.add_room_member(work, "bob")
        await c.rekey(work)
    async with sdk(people["alice"]) as al:
        own = (await al.create_room("alice-own"))["room_id"]
    return {"work": work, "own": own}


def outages(numbers: list[int], sent: int) -> list[int]:
    """The lengths of the runs of consecutive numbers in 0..sent-1 that bob did not receive."""
    got = set(numbers)
    runs, length = [], 0
    for n in range(sent):
        if n in got:
            if length:
                runs.append(length)
            length = 0
        else:
            length += 1
    if length:
        runs.append(length)
    return runs


def run_phase(phase: str, run: int, ns: argparse.Namespace, base_url: str, ids: dict[str, str],
              files: dict[str, Path], scratch: Path) -> dict[str, Any]:
    tag = f"r{run}{phase}"
    common = {"base_url": base_url, "seconds": ns.seconds, "tag": tag}
    procs: list[subprocess.Popen] = []
    try:
        roles = {"bob": {**common, "identity": str(files["bob"]), "room": ids["work"]},
                 "carol": {**common, "identity": str(files["carol"]), "room": ids["work"], "rate": ns.rate}}
        if phase == "attack":
            roles["alice"] = {**common, "identity": str(files["alice"]), "room": ids["own"], "victim": "bob",
                              "pace": ns.pace}
        children = {role: probelib.start_child(SCRIPT, role, role, cfg, scratch, procs) for role, cfg in roles.items()}
        for role, proc in children.items():
            try:
                wait_ready_line(proc, SETUP_TIMEOUT, what=role)
            except (RuntimeError, TimeoutError) as e:
                stop_process(proc)
                err = (scratch / f"{role}-{tag}.stderr").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{e}:\n{err}") from None
        start = time.time() + 0.5
        for proc in children.values():
            assert proc.stdin is not None
            proc.stdin.write(f"{start!r}\n".encode())
            proc.stdin.flush()  # communicate() closes it
        load = os.getloadavg()[0]
        results = {role: child_result(role, proc, scratch, tag, ns.seconds + 2 * CHILD_SLACK)
                   for role, proc in children.items()}
    finally:
        for proc in procs:
            stop_process(proc)
    carol, bob = results["carol"], results["bob"]
    alice = results.get("alice", {"adds": 0, "removes": 0, "too_many": 0, "errors": {}})
    sent = carol["sent"]
    received = len({n for n in bob["numbers"] if 0 <= n < sent})
    runs = outages(bob["numbers"], sent)
    return {"phase": phase, "sent": sent, "received": received,
            "lost": (sent - received) / sent if sent else float("nan"), "outages": runs,
            "send_rate": sent / carol["seconds"] if carol["seconds"] else float("nan"),
            "load_before": load, "load_after": os.getloadavg()[0], "carol": carol, "bob": bob, "alice": alice}


def print_phase(run: int, r: dict[str, Any]) -> None:
    alice, bob, carol = r["alice"], r["bob"], r["carol"]
    runs = r["outages"]
    ms_per_msg = 1000 / r["send_rate"] if r["send_rate"] else float("nan")
    gaps = (f"{len(runs)} outages, median {statistics.median(runs) * ms_per_msg:.0f} ms, "
            f"longest {max(runs) * ms_per_msg:.0f} ms" if runs else "no outage")
    errors = sum(v for k, v in alice["errors"].items() if not k.startswith("503"))
    line = (f"  run {run} {r['phase']:7}: sent {r['sent']} ({r['send_rate']:.0f}/s), bob received {r['received']}, "
            f"lost {r['lost']:.1%} ({gaps}); bob's reconnects {bob['reconnects']}; "
            f"alice: {alice['adds'] + alice['removes']} changes, {alice['too_many']} × 429, {errors} other errors; "
            f"load {r['load_before']:.1f}→{r['load_after']:.1f}")
    print(line, flush=True)
    notes = []
    if r["phase"] == "attack":
        p50 = alice.get("latency_p50")
        if p50 is not None:
            notes.append(f"alice's change p50 {p50 * 1e3:.1f} ms, max {alice['latency_max'] * 1e3:.0f} ms")
        if alice["too_many"]:
            notes.append(f"Retry-After seen {alice['retry_after']}, waited {alice['waited']:.1f} s in all")
        if alice["errors"]:
            notes.append(f"alice's other answers {alice['errors']}{' ' if alice['details'] else ''}"
                         f"{'; '.join(alice['details'])}")
    if bob["rejected"] or bob["dropped"] or bob["foreign"]:
        notes.append(f"bob rejected {bob['rejected']}, dropped {bob['dropped']}, other {bob['foreign']}")
    if bob["bus_error"]:
        notes.append(f"bob's bus stopped {bob['bus_error']}")
    if carol["errors"]:
        notes.append(f"carol's send errors {carol['errors']} (first: {carol['first_error']})")
    if notes:
        print("      " + "; ".join(notes), flush=True)


def one_run(run: int, ns: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    from unibus.client.keys import generate_identity, save_identity
    from unibus.testing import MembershipdProcess, bootstrap_member

    run_dir = scratch / f"run{run}"
    run_dir.mkdir()
    admin = generate_identity("admin")
    people = {h: generate_identity(h) for h in ("alice", "bob", "carol")}
    files = {h: save_identity(identity, run_dir / "ids" / f"{h}.json") for h, identity in people.items()}
    data_dir = run_dir / "data"
    bootstrap_member(data_dir, admin, "admin")
    daemon = MembershipdProcess(data_dir, ["--bus-auth", "enforce"], env=daemon_env())
    try:
        daemon.start(timeout=SETUP_TIMEOUT)
        ids = asyncio.run(asyncio.wait_for(set_up(daemon.base_url, admin, people), SETUP_TIMEOUT))
        results = []
        for phase in PHASES:
            r = run_phase(phase, run, ns, daemon.base_url, ids, files, run_dir)
            print_phase(run, r)
            results.append(r)
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise RuntimeError(f"membershipd exited with {daemon.proc.returncode}:\n{daemon.log_text()[-3000:]}")
        return results
    finally:
        daemon.stop()


def spread(xs: list[float], fmt: str) -> str:
    return f"median {fmt.format(statistics.median(xs))} (range {fmt.format(min(xs))} to {fmt.format(max(xs))})"


def orchestrate(ns: argparse.Namespace) -> int:
    print(unibus_origin(), flush=True)
    print(f"{ns.runs} runs, each on a fresh membershipd: a control window, then an attack window; "
          f"{ns.seconds:g} s each, carol sends {ns.rate:g}/s, alice's pace "
          f"{'as fast as answered' if ns.pace <= 0 else f'≤ {ns.pace:g} changes/s'}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="unibus-probe-changes-"))
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
    print(f"over {ns.runs} runs:")
    for phase, rs in by_phase.items():
        lost = [r["lost"] * 100 for r in rs]
        changes = [float(r["alice"]["adds"] + r["alice"]["removes"]) for r in rs]
        too_many = [float(r["alice"]["too_many"]) for r in rs]
        reconnects = [float(r["bob"]["reconnects"]) for r in rs]
        print(f"  {phase:7}: bob lost {spread(lost, '{:.1f}%')}; bob's reconnects {spread(reconnects, '{:.0f}')}; "
              f"alice's changes {spread(changes, '{:.0f}')}, 429s {spread(too_many, '{:.0f}')}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs, each a control and an attack window (default 3)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each window (default 30)")
    parser.add_argument("--rate", type=float, default=200.0, help="carol's messages per second (default 200)")
    parser.add_argument("--pace", type=float, default=0.0,
                        help="alice's changes per second at most (default 0: as fast as the server answers)")
    # hidden: the child roles
    parser.add_argument("--role", choices=("bob", "carol", "alice"), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.role is not None:
        return run_role(ns.role, ns.config)
    if not (1 <= ns.runs <= 50 and 1 <= ns.seconds <= 600 and 1 <= ns.rate <= 5000 and 0 <= ns.pace <= 1000):
        parser.error("need 1 ≤ --runs ≤ 50, 1 ≤ --seconds ≤ 600, 1 ≤ --rate ≤ 5000 and 0 ≤ --pace ≤ 1000")

    def terminated(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # the finally blocks stop every process started

    signal.signal(signal.SIGTERM, terminated)
    return orchestrate(ns)


if __name__ == "__main__":
    sys.exit(main())
