"""Cluster failover benchmark: kill -9 the nonce stream's leader, time until signed writes work again.

Run with ``.venv/bin/python bench/bench_failover.py [--runs 5] [--disable-plugin blobstore]``. Not a test:
it prints a markdown table and writes it into docs/benchmarks.md between the
``bench:failover`` markers (other sections of that file are kept).

Two three-node clusters on loopback, both up for the whole run, measured
round-robin (one kill of each kind per round):

* **membershipd, node crash**: three ``membershipd serve`` nodes built as in
  tests/e2e/test_cluster.py (route TLS from a test-made route CA, a cluster
  pass file, ``--kv-replicas 3``, the bootstrapped admin moved into KV with
  ``migrate-to-kv``). Each round asks JetStream (service-nkey connection)
  which server leads the stream ``KV_unibus_nonces``, kill -9s that node's
  nats-server and then its membershipd, and from that instant sends freshly
  signed ``GET /v1/me`` requests (a new nonce each, one at a time, each with a
  short client timeout) through a survivor until one answers 200.
  Concurrently, for diagnosis, a raw JetStream publish of a fresh nonce key
  (``Nats-Expected-Last-Subject-Sequence: 0``, what NonceStore sends) goes
  through the same survivor's nats-server: the gap between the two is
  membershipd's own share. The order of the kills matters: membershipd
  killed first makes the kernel send its nats-server SIGTERM
  (PR_SET_PDEATHSIG), which may start a graceful shutdown that hands the Raft
  leaderships over before the second SIGKILL lands.
* **membershipd alone**: the same, but only membershipd is kill -9ed; its
  nats-server gets SIGTERM from PDEATHSIG and exits gracefully (a daemon
  crash, not a machine crash).
* **bare**: three plain nats-servers (``find_nats_server()``) clustered on
  loopback, no TLS, no auth, a KV bucket with 3 replicas; kill -9 its stream's
  leader and send the same raw publish through a survivor until it succeeds.

For every kill the new leader's ``leader_since`` gives the election time on
its own. The killed node is restarted on the same ports and data dir, and the
next kill waits until the streams have a leader and two current followers
again (for membershipd also until the node is healthy and serves signed
requests). Every process started here is stopped in a ``finally``.
"""

from __future__ import annotations

import benchlib  # noqa: E402  (bench/ is on sys.path when run as a script)
from benchlib import kill_nats_if_alive, ms, sigkill, wait_gone
import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import yarl
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, NoStreamResponseError
from unibus.client.keys import Identity, generate_identity
from unibus.supervisor import find_nats_server
from unibus.testing import Cluster, free_port, nats_server_pids

TITLE = "## Cluster failover"
NONCE_STREAM = "KV_unibus_nonces"
NONCE_SUBJECT = "$KV.unibus_nonces"
STATE_STREAM = "KV_unibus_state"
BARE_BUCKET = "bench_nonces"
FORM_TIMEOUT = 120.0
#: Give up on one failover measurement after this long (counted as a failure of the run).
FAILOVER_LIMIT = 60.0
#: Pause after a failed attempt (both probes alike): keeps two cores from being
#: saturated by fast failures, and is the resolution of the measurement.
RETRY_PAUSE = 0.01


# -- small helpers -----------------------------------------------------------------


def cells(samples: Sequence[float]) -> str:
    """min | median | max in ms."""
    return benchlib.cells(samples, scale=1000)


def monitor_json(port: int, path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def meta_leader(monitor_ports: Sequence[int]) -> str | None:
    """The JetStream meta leader, from the first monitoring endpoint that answers."""
    for port in monitor_ports:
        doc = monitor_json(port, "/jsz")
        leader = ((doc or {}).get("meta_cluster") or {}).get("leader")
        if leader:
            return leader
    return None


async def quiet(_e: Exception) -> None:
    pass


async def connect(url: str, **kwargs: Any) -> nats.aio.client.Client:
    """A client pinned to one server: no reconnects, no discovery of the others."""
    return await nats.connect(servers=[url], allow_reconnect=False, connect_timeout=2, dont_randomize=True,
                              error_cb=quiet, **kwargs)


async def stream_ready(js: Any, stream: str) -> tuple[Any, bool]:
    """``(cluster info or None, healthy)``: healthy when the stream has a leader and two current, online followers."""
    try:
        info = await asyncio.wait_for(js.stream_info(stream), 2.0)
    except (TimeoutError, nats.errors.Error):
        return None, False
    cl = info.cluster
    if cl is None or not cl.leader:
        return None, False
    reps = cl.replicas or []
    return cl, len(reps) == 2 and all(r.current and not r.offline for r in reps)


async def wait_streams_ready(urls: Sequence[str], streams: Sequence[str], connect_kwargs: dict[str, Any],
                             timeout: float = FORM_TIMEOUT) -> dict[str, Any]:
    """Wait until every stream has a leader and 2 current followers; ``{stream: ClusterInfo}``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for url in urls:
            try:
                nc = await connect(url, **connect_kwargs)
            except (OSError, TimeoutError, nats.errors.Error) as e:
                last = e
                continue
            try:
                js = nc.jetstream(timeout=2.0)
                found = {}
                for s in streams:
                    cl, ok = await stream_ready(js, s)
                    if not ok:
                        last = f"{s}: leader {cl.leader if cl else None}, not all replicas current"
                        break
                    found[s] = cl
                else:
                    return found
            finally:
                await nc.close()
            break
        await asyncio.sleep(0.2)
    raise TimeoutError(f"streams {streams} not back to 3 current replicas within {timeout:.0f} s (last: {last})")


async def new_leader(url: str, stream: str, connect_kwargs: dict[str, Any], killed_at: float) -> tuple[str, float]:
    """``(leader, seconds from the kill until it became leader)`` of ``stream``, asked through ``url``.

    Asked right after the first success, which a stream info request can still
    miss (a leader in its graceful exit does not answer): retried for a while,
    then ``("?", nan)``.
    """
    deadline = time.monotonic() + 15.0
    nc = await connect(url, **connect_kwargs)
    try:
        while True:
            try:
                info = await nc.jetstream(timeout=2.0).stream_info(stream)
                break
            except (TimeoutError, nats.errors.Error):
                if time.monotonic() > deadline:
                    return "?", float("nan")
                await asyncio.sleep(0.1)
    finally:
        await nc.close()
    cl = info.cluster
    since = cl.leader_since.timestamp() - killed_at if cl and cl.leader_since else float("nan")
    # A leader elected before the kill is the killed node's own nats-server, still
    # serving during its graceful exit: no election happened (yet).
    return (cl.leader if cl else "?"), since if since >= 0 else float("nan")


# -- probes --------------------------------------------------------------------------


@dataclass
class Probe:
    """The attempts of one probe after a kill: when it first succeeded, when for good, how the failures went."""
    name: str
    success_at: float | None = None  # end of the first successful attempt (s after the kill)
    stable_at: float | None = None  # end of the first success after the last failure seen
    failures_after_first: int = 0
    attempts: int = 0
    outcomes: Counter = field(default_factory=Counter)  # class → count
    time_in: Counter = field(default_factory=Counter)  # class → seconds spent waiting on it
    slow_failures: list[tuple[float, float, str]] = field(default_factory=list)  # (sent at, took, class)

    def record(self, sent: float, took: float, outcome: str) -> None:
        self.attempts += 1
        self.outcomes[outcome] += 1
        self.time_in[outcome] += took
        if outcome == "ok":
            if self.success_at is None:
                self.success_at = sent + took
            if self.stable_at is None:
                self.stable_at = sent + took
            return
        self.stable_at = None
        if self.success_at is not None:
            self.failures_after_first += 1
        if took > 0.1:
            self.slow_failures.append((sent, took, outcome))

    def finished(self, elapsed: float, hold: float) -> bool:
        """Stop after the first success, or with ``hold``, once ``hold`` s have passed and the last attempt succeeded."""
        if elapsed > FAILOVER_LIMIT:
            return True
        return self.stable_at is not None and elapsed >= hold

    def summary(self) -> str:
        parts = [f"{k}×{v} ({self.time_in[k]:.1f} s)" for k, v in self.outcomes.most_common()]
        return ", ".join(parts)


async def raw_publish_probe(nc: Any, t0: float, probe: Probe, timeout: float, stop: asyncio.Event,
                            subject_prefix: str, hold: float = 0.0) -> None:
    """Fresh-key publishes with Nats-Expected-Last-Subject-Sequence: 0 through ``nc`` until one is acked.

    ``nc`` is connected (to one survivor) before the kill, so that the clock
    measures JetStream, not a connect. With ``hold`` it goes on until ``hold``
    seconds after the kill (and the last attempt succeeded).
    """
    js = nc.jetstream(timeout=timeout)
    n = 0
    while not stop.is_set():
        n += 1
        sent = time.perf_counter()
        try:
            await js.publish(f"{subject_prefix}.probe{os.getpid()}.{int(sent * 1e6)}x{n}", b"1", timeout=timeout,
                             headers={"Nats-Expected-Last-Subject-Sequence": "0"})
            outcome = "ok"
        except (NoStreamResponseError, NoRespondersError):
            outcome = "no responders"
        except (TimeoutError, NatsTimeoutError):
            outcome = f"timeout ({timeout:g} s)"
        except APIError as e:
            outcome = f"JetStream error {e.err_code}"
        except Exception as e:  # noqa: BLE001 - every other failure is one more failed attempt
            outcome = type(e).__name__
        if await _recorded(probe, t0, sent, outcome, hold):
            return


async def _recorded(probe: Probe, t0: float, sent: float, outcome: str, hold: float) -> bool:
    """Record one attempt; True when the probe is finished, else after the pause before the next one."""
    now = time.perf_counter()
    probe.record(sent - t0, now - sent, outcome)
    if probe.finished(now - t0, hold):
        return True
    await asyncio.sleep(RETRY_PAUSE)
    return False


async def signed_get_probe(base_url: str, identity: Identity, t0: float, probe: Probe, timeout: float,
                           hold: float = 0.0) -> None:
    """Freshly signed GET /v1/me (a new nonce each) through one node until one answers 200 (see ``hold`` above)."""
    url = yarl.URL(base_url.rstrip("/") + "/v1/me", encoded=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        while True:
            sent = time.perf_counter()
            headers = benchlib.signed_headers(identity, path=url.raw_path_qs)
            try:
                async with session.get(url, headers=headers, allow_redirects=False) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        outcome = "ok"
                    else:
                        detail = ""
                        with contextlib.suppress(ValueError, AttributeError):
                            detail = json.loads(body).get("type", "").rsplit("/", 1)[-1]
                        outcome = f"{resp.status} {detail}".strip()
            except TimeoutError:
                outcome = f"client timeout ({timeout:g} s)"
            except aiohttp.ClientError as e:
                outcome = type(e).__name__
            if await _recorded(probe, t0, sent, outcome, hold):
                return


# -- the bare cluster -------------------------------------------------------------------


class BareCluster:
    """Three plain nats-servers clustered on loopback: no TLS, no auth."""

    def __init__(self, root: Path, binary: Path) -> None:
        self.root = root
        self.binary = binary
        self.names = ["b1", "b2", "b3"]
        self.client_ports = [free_port() for _ in range(3)]
        self.route_ports = [free_port() for _ in range(3)]
        self.monitor_ports = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen | None] = [None, None, None]
        self.confs = []
        for i, name in enumerate(self.names):
            d = root / name
            (d / "js").mkdir(parents=True, exist_ok=True)
            routes = ", ".join(f'"nats://127.0.0.1:{p}"' for j, p in enumerate(self.route_ports) if j != i)
            conf = d / "nats.conf"
            conf.write_text(
                f'server_name: "{name}"\nlisten: "127.0.0.1:{self.client_ports[i]}"\n'
                f'http: "127.0.0.1:{self.monitor_ports[i]}"\n'
                f'jetstream {{ store_dir: "{d / "js"}" }}\n'
                f'cluster {{ name: "bare", listen: "127.0.0.1:{self.route_ports[i]}", routes: [{routes}] }}\n')
            self.confs.append(conf)

    def url(self, i: int) -> str:
        return f"nats://127.0.0.1:{self.client_ports[i]}"

    def start(self, i: int) -> None:
        with open(self.root / f"{self.names[i]}.log", "ab") as log:
            self.procs[i] = subprocess.Popen([str(self.binary), "-c", str(self.confs[i])], stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    async def form(self) -> None:
        for i in range(3):
            self.start(i)
        deadline = time.monotonic() + FORM_TIMEOUT
        while True:
            try:
                nc = await connect(self.url(0))
                try:
                    await nc.jetstream(timeout=2.0).create_key_value(config=KeyValueConfig(
                        bucket=BARE_BUCKET, history=1, ttl=600.0, replicas=3, storage=StorageType.FILE))
                finally:
                    await nc.close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)
        await wait_streams_ready([self.url(i) for i in range(3)], [f"KV_{BARE_BUCKET}"], {})

    async def leader(self) -> tuple[int, Any]:
        found = await wait_streams_ready([self.url(i) for i in range(3)], [f"KV_{BARE_BUCKET}"], {})
        cl = found[f"KV_{BARE_BUCKET}"]
        return self.names.index(cl.leader), cl


@dataclass
class Failover:
    """One kill: what was killed, who took over and when."""
    seconds: float  # kill → first success of the measured probe
    killed: str
    killed_meta_leader: bool
    leader_age: float  # how long the killed node had led the stream
    new_leader: str
    election: float  # kill → the new leader's leader_since

    @property
    def probe_of_record(self) -> Probe:
        raise NotImplementedError

    @property
    def stable(self) -> float:
        """Kill → the first success after the last failure seen within the hold window."""
        at = self.probe_of_record.stable_at
        return float("nan") if at is None else at


@dataclass
class BareRun(Failover):
    probe: Probe = field(default_factory=lambda: Probe("bare"))

    @property
    def probe_of_record(self) -> Probe:
        return self.probe


def age(cl: Any, now: float) -> float:
    return now - cl.leader_since.timestamp() if cl is not None and cl.leader_since else float("nan")


async def bare_round(cluster: BareCluster, timeout: float, hold: float) -> BareRun:
    victim, cl = await cluster.leader()
    was_meta = meta_leader(cluster.monitor_ports) == cluster.names[victim]
    survivor = next(i for i in range(3) if i != victim)
    probe = Probe("bare")
    nc = await connect(cluster.url(survivor))
    try:
        killed_at = time.time()
        t0 = time.perf_counter()
        cluster.kill(victim)
        await raw_publish_probe(nc, t0, probe, timeout, asyncio.Event(), f"$KV.{BARE_BUCKET}", hold)
    finally:
        await nc.close()
    leader, election = await new_leader(cluster.url(survivor), f"KV_{BARE_BUCKET}", {}, killed_at)
    cluster.procs[victim].wait(10)
    cluster.start(victim)
    await wait_streams_ready([cluster.url(i) for i in range(3)], [f"KV_{BARE_BUCKET}"], {})
    if probe.success_at is None:
        raise RuntimeError(f"bare cluster: no successful publish within {FAILOVER_LIMIT} s ({probe.summary()})")
    return BareRun(probe.success_at, cluster.names[victim], was_meta, age(cl, killed_at), leader, election, probe)


# -- the membershipd cluster ---------------------------------------------------------------


class DaemonCluster(Cluster):
    """Three membershipd nodes (``unibus.testing.Cluster``, as in tests/e2e/test_cluster.py), no metrics listener."""

    def __init__(self, root: Path, admin: Identity, extra_args: Sequence[str]) -> None:
        super().__init__(root, admin, args=extra_args, name="unibus-bench", metrics=False)

    @property
    def names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(3)]

    def service(self, i: int) -> dict[str, Any]:
        return {"nkeys_seed": str(self.nodes[i].data_dir / "service.nkey")}

    async def form(self) -> None:  # type: ignore[override]
        """Start every node, ``migrate-to-kv`` node 1's store, until every node serves the admin."""
        await asyncio.to_thread(Cluster.form, self)

    async def meta_leader(self) -> str | None:
        """The JetStream meta leader, asked through the system account (the nodes run no monitor)."""
        for node in self.nodes:
            try:
                nc = await connect(node.nats_url, nkeys_seed=str(node.data_dir / "system.nkey"))
            except (OSError, TimeoutError, nats.errors.Error):
                continue  # that node is down: ask the next
            try:
                msg = await nc.request("$SYS.REQ.SERVER.PING.JSZ", b"{}", timeout=1.0)
                return (json.loads(msg.data).get("data", {}).get("meta_cluster") or {}).get("leader")
            except (TimeoutError, ValueError, nats.errors.Error):
                continue  # no answer through this node: ask the next
            finally:
                await nc.close()
        return None

    async def leaders(self) -> dict[str, Any]:
        urls = [n.nats_url for n in self.nodes]
        # any node's service key is a member of the same account on every node
        deadline = time.monotonic() + FORM_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            for i in range(3):
                try:
                    return await wait_streams_ready([urls[i]], [NONCE_STREAM, STATE_STREAM], self.service(i),
                                                    timeout=5.0)
                except (OSError, TimeoutError, nats.errors.Error) as e:
                    last = e
        raise TimeoutError(f"streams not healthy: {last}")


@dataclass
class DaemonRun(Failover):
    raw_seconds: float | None = None
    survivor: str = ""
    killed_state_leader: bool = False
    http: Probe = field(default_factory=lambda: Probe("membershipd"))
    raw: Probe = field(default_factory=lambda: Probe("raw"))
    survivor_log: list[str] = field(default_factory=list)

    @property
    def probe_of_record(self) -> Probe:
        return self.http


def read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


_LOG_MSG = re.compile(r"^\S+ \S+ \w+ ([\w.]+): (.*)$")


def log_digest(text: str) -> list[str]:
    """Distinct log messages (numbers and hex masked), with counts, in first-seen order."""
    seen: Counter = Counter()
    order: list[str] = []
    for line in text.splitlines():
        m = _LOG_MSG.match(line)
        msg = f"{m.group(1)}: {m.group(2)}" if m else line
        msg = re.sub(r"\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "#", msg)[:140]
        if msg not in seen:
            order.append(msg)
        seen[msg] += 1
    return [f"{seen[m]}× {m}" for m in order]


async def daemon_round(cluster: DaemonCluster, timeout: float, hold: float, raw_probe: bool,
                       whole_node: bool = True) -> DaemonRun:
    """One kill of the node leading the nonce stream, measured through a survivor.

    ``whole_node``: a crash of the node, both processes kill -9ed, nats-server
    first. Otherwise only membershipd is kill -9ed: its nats-server then gets
    SIGTERM (PR_SET_PDEATHSIG) and shuts down gracefully, handing its Raft
    leaderships over on the way out.
    """
    found = await cluster.leaders()
    cl = found[NONCE_STREAM]
    victim = cluster.names.index(cl.leader)
    killed_state = found[STATE_STREAM].leader == cluster.names[victim]
    was_meta = await cluster.meta_leader() == cluster.names[victim]
    survivor = next(i for i in range(3) if i != victim)
    node, surv = cluster.nodes[victim], cluster.nodes[survivor]
    log_offset = surv.log_path.stat().st_size if surv.log_path.exists() else 0
    nats_pid = node.nats_pid()
    http, raw = Probe("membershipd"), Probe("raw")
    stop = asyncio.Event()

    raw_nc = await connect(surv.nats_url, **cluster.service(survivor)) if raw_probe else None
    killed_at = time.time()
    t0 = time.perf_counter()
    if whole_node:
        # nats-server first: killed second, it would get SIGTERM from PDEATHSIG in
        # between and might start its graceful shutdown (a leadership handover).
        sigkill(nats_pid)
        sigkill(node.pid)
    else:
        sigkill(node.pid)
    tasks = [asyncio.create_task(signed_get_probe(surv.base_url, cluster.identity, t0, http, timeout, hold))]
    if raw_nc is not None:
        tasks.append(asyncio.create_task(raw_publish_probe(raw_nc, t0, raw, timeout, stop, f"{NONCE_SUBJECT}.bench")))
    try:
        await tasks[0]
        if raw_probe:  # let the raw probe finish too, but not forever
            try:
                await asyncio.wait_for(asyncio.shield(tasks[1]), FAILOVER_LIMIT)
            except TimeoutError:
                stop.set()
                await tasks[1]
    finally:
        stop.set()
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if raw_nc is not None:
            await raw_nc.close()
    leader, election = await new_leader(surv.nats_url, NONCE_STREAM, cluster.service(survivor), killed_at)
    await asyncio.to_thread(node.wait, 10)
    await asyncio.to_thread(wait_gone, nats_pid, 15.0)
    kill_nats_if_alive(nats_pid, str(node.data_dir))  # a graceful exit that hangs
    survivor_log = log_digest(await asyncio.to_thread(read_from, surv.log_path, log_offset))

    cluster.restart(victim)
    await asyncio.to_thread(cluster.nodes[victim].wait_healthy, FORM_TIMEOUT)
    await asyncio.to_thread(cluster.wait_member, victim, cluster.identity, 60.0)
    await cluster.leaders()
    if http.success_at is None:
        raise RuntimeError(f"membershipd: no signed request succeeded within {FAILOVER_LIMIT} s ({http.summary()})")
    return DaemonRun(http.success_at, cluster.names[victim], was_meta, age(cl, killed_at), leader, election,
                     raw_seconds=raw.success_at, survivor=cluster.names[survivor], killed_state_leader=killed_state,
                     http=http, raw=raw, survivor_log=survivor_log)


# -- report ------------------------------------------------------------------------------


def render(runs: int, timeout: float, hold: float, res: Results, env_line: str, extra_args: Sequence[str],
           note: str = "") -> str:
    bare, node, alone = res.bare, res.node, res.daemon_only
    b = [r.seconds for r in bare]
    d = [r.seconds for r in node]
    raw = [r.raw_seconds for r in node if r.raw_seconds is not None]
    out = [env_line, ""]
    out.append(
        "From kill -9 of the node whose nats-server leads the stream (for membershipd: `KV_unibus_nonces`) until the "
        f"first success through a survivor; attempts one at a time, each with a {timeout:g} s client timeout, "
        f"{RETRY_PAUSE * 1000:.0f} ms apart. The probing goes on until {hold:g} s after the kill: \"for good\" is "
        "the first success after the last failure. The membershipd cluster is built as in "
        "tests/e2e/test_cluster.py (route TLS, route password, `--kv-replicas 3`, admin migrated into KV"
        + (f", `{' '.join(extra_args)}`" if extra_args else "") + "); the bare one is three plain nats-servers "
        "(no TLS, no auth) with one R3 KV bucket. A node crash kill -9s nats-server, then membershipd; \"membershipd "
        "alone\" kill -9s only the daemon, whose nats-server then gets SIGTERM (PR_SET_PDEATHSIG) and exits "
        "gracefully. The killed node is restarted and the streams are back to three current replicas before the "
        "next kill. \"New leader\" is the stream's `leader_since` as its new leader reports it, minus the moment "
        "of the kill: the election alone, before any client notices." + (f" {note}" if note else ""))
    out += ["", f"| after kill -9 of the stream leader ({runs} kills each) | min ms | median ms | max ms |",
            "|---|---:|---:|---:|"]
    out.append(f"| bare nats-servers: new leader elected | {cells([r.election for r in bare])} |")
    out.append(f"| **bare nats-servers: first raw JetStream publish acked** (expected last subject sequence 0) | "
               f"{cells(b)} |")
    out.append(f"| bare nats-servers: publishes succeed for good | {cells([r.stable for r in bare])} |")
    out.append(f"| membershipd, node crash: new leader of `KV_unibus_nonces` elected | "
               f"{cells([r.election for r in node])} |")
    if raw:
        out.append(f"| membershipd, node crash: first raw publish to `$KV.unibus_nonces.…` through the survivor's "
                   f"nats-server (service nkey, concurrently; diagnosis) | {cells(raw)} |")
    out.append(f"| **membershipd, node crash: first freshly signed `GET /v1/me` through a survivor answers 200** | "
               f"{cells(d)} |")
    out.append(f"| membershipd, node crash: signed requests succeed for good | {cells([r.stable for r in node])} |")
    if alone:
        out.append(f"| membershipd alone kill -9ed: new leader elected | {cells([r.election for r in alone])} |")
        out.append(f"| membershipd alone kill -9ed: first signed `GET /v1/me` answers 200 | "
                   f"{cells([r.seconds for r in alone])} |")
        out.append(f"| membershipd alone kill -9ed: signed requests succeed for good | "
                   f"{cells([r.stable for r in alone])} |")
    diff = statistics.median(d) - statistics.median(b)
    election_diff = (statistics.median([r.election for r in node if not math.isnan(r.election)] or [math.nan])
                     - statistics.median([r.election for r in bare if not math.isnan(r.election)] or [math.nan]))
    out += ["", (f"Node crash, difference of the medians, first signed request on membershipd − first raw publish "
                 f"on bare nats-servers: **{diff * 1000:+.0f} ms** (aim: at most +1000 ms); of the elections alone: "
                 f"{election_diff * 1000:+.0f} ms.")]
    lag_b = [r.seconds - r.election for r in bare if not math.isnan(r.election)]
    lag_d = [r.seconds - r.election for r in node if not math.isnan(r.election)]
    if lag_b and lag_d:
        out.append(f"From the new leader to the first success (per kill, median [min–max]): bare publish "
                   f"{ms(statistics.median(lag_b))} ms [{ms(min(lag_b))}–{ms(max(lag_b))}], membershipd signed "
                   f"request {ms(statistics.median(lag_d))} ms [{ms(min(lag_d))}–{ms(max(lag_d))}].")
    if raw and len(raw) == len(d):
        own = [r.seconds - r.raw_seconds for r in node]
        out.append(f"First signed request − first raw publish through the same survivor, per kill (membershipd's "
                   f"own share): median {ms(statistics.median(own))} ms [{ms(min(own))}–{ms(max(own))}].")
    out += ["", ("How to read it: until the stream has a new leader every attempt fails fast (\"no responders\" on "
                 "the bare cluster, a 503 `nonce-store-unavailable` from membershipd, a few ms each), so both series "
                 "are the Raft election plus one round trip; \"from the new leader to the first success\" and "
                 "\"signed − raw\" are what membershipd adds. An attempt sent in the first milliseconds after the "
                 "kill can still be routed to the dead leader and then waits for its whole timeout (the "
                 f"{timeout:g} s client timeout here; NonceStore's claim waits 2 s before its 503).")]

    out += ["", ("Per kill (\"led\": how long the killed node had led the stream; \"meta\": it was also the "
                 "JetStream meta leader; \"state\": it also led `KV_unibus_state`). Bare nats-servers:"), "",
            "| run | killed | new leader ms | first publish ms | for good ms | failed publishes |",
            "|---:|---|---:|---:|---:|---|"]
    for i, r in enumerate(bare):
        out.append(f"| {i + 1} | {_who(r)} | {ms(r.election)} | {ms(r.seconds)} | {ms(r.stable)} | "
                   f"{_failures(r.probe)} |")
    for title, series in (("membershipd, node crash", node), ("membershipd alone kill -9ed", alone)):
        if not series:
            continue
        out += ["", f"{title}:", "",
                ("| run | killed → survivor | new leader ms | raw ms | first signed ms | for good ms | failed signed "
                "requests |"), "|---:|---|---:|---:|---:|---:|---|"]
        for i, r in enumerate(series):
            elected = (f"none: {r.killed} still led it" if r.new_leader == r.killed else ms(r.election))
            out.append(f"| {i + 1} | {_who(r)} → {r.survivor} | {elected} | "
                       f"{ms(r.raw_seconds) if r.raw_seconds is not None else '–'} | {ms(r.seconds)} | "
                       f"{ms(r.stable)} | {_failures(r.http)} |")
    return "\n".join(out) + "\n"


def _who(r: Failover) -> str:
    flags = [f for f, on in (("meta", r.killed_meta_leader),
                             ("state", getattr(r, "killed_state_leader", False))) if on]
    return f"{r.killed} (led {r.leader_age:.0f} s{''.join(', ' + f for f in flags)})"


def _failures(p: Probe) -> str:
    fails = {k: v for k, v in p.outcomes.items() if k != "ok"}
    if not fails:
        return "none"
    return ", ".join(f"{k} ×{v} ({p.time_in[k]:.1f} s)" for k, v in sorted(fails.items(), key=lambda kv: -kv[1]))


def environment_line(runs: int, binary: Path, load_before: float, load_after: float, argv: Sequence[str]) -> str:
    cmd = " ".join(["bench/bench_failover.py", *argv])
    return (f"{benchlib.measured_by(cmd)}, {benchlib.nats_server_version(binary)}; "
            f"{benchlib.load_average(load_before, load_after)}. nats-server's Raft followers start an election 4–9 s (random) after the last "
            f"heartbeat they heard (one a second), so single kills spread over seconds whatever the client does; "
            f"compare medians, and the per-kill gaps after the election.")


def report_daemon_run(label: str, r: DaemonRun, verbose: bool) -> None:
    raw_s = f"{r.raw_seconds * 1000:.0f} ms" if r.raw_seconds is not None else "–"
    print(f"{label}: {r.killed} killed (led {r.leader_age:.1f} s, state leader too: {r.killed_state_leader}, "
          f"meta: {r.killed_meta_leader}) → {r.new_leader} leads after {r.election * 1000:.0f} ms; signed GET via "
          f"{r.survivor} ok after {r.seconds * 1000:.0f} ms, for good after {r.stable * 1000:.0f} ms, raw publish {raw_s}\n  signed: [{r.http.summary()}]\n"
          f"  raw:    [{r.raw.summary()}]", file=sys.stderr)
    for sent, took, what in r.http.slow_failures[:10]:
        print(f"  slow signed failure: sent at {sent:.2f} s, took {took:.2f} s: {what}", file=sys.stderr)
    for sent, took, what in r.raw.slow_failures[:10]:
        print(f"  slow raw failure: sent at {sent:.2f} s, took {took:.2f} s: {what}", file=sys.stderr)
    if verbose:
        print("  survivor log after the kill:\n    " + "\n    ".join(r.survivor_log[:40]), file=sys.stderr)


@dataclass
class Results:
    bare: list[BareRun] = field(default_factory=list)
    node: list[DaemonRun] = field(default_factory=list)  # whole node kill -9ed
    daemon_only: list[DaemonRun] = field(default_factory=list)  # membershipd alone kill -9ed


async def run(ns: argparse.Namespace, tmp: Path) -> Results:
    binary = find_nats_server()
    extra = [a for name in ns.disable_plugin for a in ("--disable-plugin", name)]
    bare_cluster = BareCluster(tmp / "bare", binary)
    daemon_cluster = DaemonCluster(tmp / "daemon", generate_identity("alice"), extra)
    res = Results()
    try:
        t = time.perf_counter()
        await asyncio.gather(bare_cluster.form(), daemon_cluster.form())
        print(f"both clusters formed in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        await daemon_cluster.leaders()
        # Round-robin: a burst of other load on the machine spreads over every series.
        for i in range(ns.runs):
            if ns.only in (None, "bare"):
                res.bare.append(await bare_round(bare_cluster, ns.timeout, ns.hold))
                r = res.bare[-1]
                print(f"round {i + 1}: bare {r.killed} killed (led {r.leader_age:.1f} s, meta {r.killed_meta_leader}) → "
                      f"{r.new_leader} leads after {r.election * 1000:.0f} ms, publish ok after "
                      f"{r.seconds * 1000:.0f} ms, for good after {r.stable * 1000:.0f} ms [{r.probe.summary()}]", file=sys.stderr)
            if ns.only in (None, "membershipd"):
                res.node.append(await daemon_round(daemon_cluster, ns.timeout, ns.hold, not ns.no_raw_probe))
                report_daemon_run(f"round {i + 1}: membershipd node", res.node[-1], ns.verbose)
                if not ns.no_daemon_only:
                    res.daemon_only.append(await daemon_round(daemon_cluster, ns.timeout, ns.hold,
                                                              not ns.no_raw_probe, whole_node=False))
                    report_daemon_run(f"round {i + 1}: membershipd alone", res.daemon_only[-1], ns.verbose)
    finally:
        daemon_cluster.stop()
        bare_cluster.stop()
        for pid in nats_server_pids(tmp):  # a safety net: nothing under our temp dir survives
            sigkill(pid)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchlib.arg_parser(__doc__, "failover", 5, "kills per cluster")
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="client timeout of each attempt in seconds (default 1.0)")
    parser.add_argument("--hold", type=float, default=15.0,
                        help="keep probing until this many seconds after each kill, to see failures after the "
                             "first success (default 15)")
    parser.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                        help="passed to every membershipd node (repeatable), e.g. blobstore")
    parser.add_argument("--no-raw-probe", action="store_true",
                        help="membershipd cluster: skip the concurrent raw publish through the survivor")
    parser.add_argument("--no-daemon-only", action="store_true",
                        help="skip the kills of membershipd alone (nats-server left to its PDEATHSIG SIGTERM)")
    parser.add_argument("--only", choices=("bare", "membershipd"), help="measure one cluster only (implies --no-write)")
    parser.add_argument("--note", default="", help="one sentence added to the description in the markdown")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the survivor's log after each kill")
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    ns = benchlib.parse(parser, raw_argv)
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="unibus-bench-failover-"))
    try:
        res = asyncio.run(run(ns, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ns.only:
        return 0
    shown_argv = []
    skip = False
    for a in raw_argv:  # the command line as shown in the markdown: without -v, --no-write, --note TEXT
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif a not in ("-v", "--verbose", "--no-write") and not a.startswith("--note="):
            shown_argv.append(a)
    body = render(ns.runs, ns.timeout, ns.hold, res,
                  environment_line(ns.runs, find_nats_server(), load_before, os.getloadavg()[0], shown_argv),
                  [a for name in ns.disable_plugin for a in ("--disable-plugin", name)], ns.note)
    return benchlib.publish(body, "failover", TITLE, ns.out, not ns.no_write)


if __name__ == "__main__":
    sys.exit(main())
