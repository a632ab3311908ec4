"""Blob benchmark: put and get next to the machine's floors (copy+fsync, one-core SHA-256), before and after.

Run with ``.venv/bin/python bench/bench_blobs.py [--runs 3] [--big-mib 256] [--before v0.11.0]``.
Not a test: it prints a markdown section and writes it into docs/benchmarks.md
between the ``bench:blobs`` markers (other sections of that file are kept).

What it measures, for each size (1 MiB and ``--big-mib``, 256 MiB by default:
the size the issue uses; ``--big-mib 1024`` for the 1 GiB memory bound), in
``--runs`` rounds (the 1 MiB case 10 transfers per round), medians with min
and max:

* **the machine**: the CPU model (``/proc/cpuinfo``) and whether it has the
  SHA extensions (the ``sha_ni`` flag on x86, ``sha2`` on arm): without them
  SHA-256 is the ceiling of every verified transfer, with them the disk is;
* **the floors, in every round**: ``shutil.copyfile`` + ``fsync`` of the same
  file (what a durable copy costs: the blob store fsyncs before its 201, the
  client fsyncs what it downloaded), the plain ``copyfile``, SHA-256 on one
  core (``hashlib`` over 1 MiB pieces of one buffer, in the CPU's cache, as
  the code hashes: the server hashes every uploaded byte, the client every
  downloaded one), and the two AEADs of the
  blob format on one core (64 KiB records): ChaCha20-Poly1305 (``unibus-blob-v1``)
  and AES-256-GCM (``-v2``, what clients write on a CPU with AES instructions);
* **the four transfers**, each against a real ``membershipd serve`` on
  loopback (fs backend) started for the round: ``put`` = ``put_blob`` (what
  ``unibus blob put`` runs: encrypt, hash, upload, the server hashing,
  fsyncing, renaming), ``get`` = ``get_blob`` (``unibus blob get``: download,
  verify, decrypt, fsync, rename), raw ``PUT`` = ``put_raw_blob`` of the file
  as it is (its SHA-256 computed before the clock starts) and raw ``GET`` =
  ``get_raw_blob``;
* **before/after in the same run**: each round runs the transfers twice, in a
  child process per version (alternating which goes first): this tree's
  code, and ``--before`` (default ``v0.11.0``, built once by
  ``bench/baseline.py`` in its own venv: its client and its daemon; ``none``
  skips it). The child is this same script (``--driver``), so both versions
  are driven by the same code;
* **memory**: membershipd's peak RSS (VmHWM, reset through
  ``/proc/<pid>/clear_refs`` before the big transfers) over its RSS before
  them, and the client process's peak over its RSS before each big transfer.

``--no-sha-ext`` measures the issue's other aim on a CPU that has SHA extensions:
the whole run (this process, which measures the floors, the drivers and every
membershipd they start) runs with ``OPENSSL_ia32cap`` set to leave them unused, so
OpenSSL's SHA-256, in ``hashlib`` and in ``cryptography``, takes its fastest code
without them (AVX2 where the CPU has it), as on a CPU that lacks them and has the
rest (AES instructions included). The section it writes is its own
(``bench:blobs-no-sha``), and the aim is 80% of that run's one-core SHA-256 floor.
x86 only, and only on a CPU that has the extensions (elsewhere the plain run
measures that aim already).

``--profile DIR`` instead records each big transfer of this tree's code with
``py-spy record --native`` (client and daemon, collapsed stacks in DIR) and
prints where the time goes.

Every process started here is stopped in a ``finally``.
"""

from __future__ import annotations

import benchlib  # noqa: E402  (bench/ is on sys.path when run as a script)
from benchlib import cpu_model, reset_hwm, sha_extensions, status_kib  # noqa: E402
import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
SMALL = MIB
SMALL_PER_ROUND = 10
BEFORE_REF = "v0.11.0"
PATHS = ("put", "get", "raw_put", "raw_get")
PATH_NAMES = {
    "put": "put: `put_blob` (`unibus blob put`)",
    "get": "get: `get_blob` (`unibus blob get`)",
    "raw_put": "raw PUT: `put_raw_blob`",
    "raw_get": "raw GET: `get_raw_blob`",
}
DRIVER_TIMEOUT = 1800.0
#: ``OPENSSL_ia32cap`` for --no-sha-ext: after the colon, the mask of CPUID leaf 7's EBX
#: (then ECX), whose bit 29 says the CPU has the SHA extensions; ``~`` clears it. OpenSSL
#: reads the variable once, when it is loaded, so it has to be there before Python starts.
NO_SHA_MASK = ":~0x20000000"


# --------------------------------------------------------------------------- floors


def write_random(path: Path, size: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            piece = os.urandom(min(left, MIB))
            h.update(piece)
            f.write(piece)
            left -= len(piece)
        f.flush()
        os.fsync(f.fileno())
    return h.digest()


def copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_BUF = 64 * MIB
#: The SHA-256 floor hashes pieces of this size, one buffer over and over, as the client
#: (1 MiB sealed blocks, just written) and membershipd (pieces of up to 1 MiB off the
#: socket) hash: in the CPU's cache. Hashing a 64 MiB buffer instead, as 0.12's first
#: runs did, measures memory bandwidth too (about 1,200 against 1,800 MB/s on the Xeon
#: of docs/benchmarks.md), and understates the floor by a third.
SHA_PIECE = 1 * MIB


def sha256_memory(size: int, buf: bytes) -> float:
    """Seconds to hash ``size`` bytes on one core (the first :data:`SHA_PIECE` bytes of ``buf``
    over and over)."""
    view = memoryview(buf)[:SHA_PIECE]
    t = time.perf_counter()
    h = hashlib.sha256()
    left = size
    while left > 0:
        n = min(left, len(view))
        h.update(view[:n])
        left -= n
    h.digest()
    return time.perf_counter() - t


def aead_memory(size: int, buf: bytes, name: str = "chacha") -> float:
    """Seconds to seal ``size`` bytes on one core in 64 KiB records, with ChaCha20-Poly1305
    (``chacha``, the blob format's v1) or AES-256-GCM (``aesgcm``, its v2)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    aead = {"chacha": ChaCha20Poly1305, "aesgcm": AESGCM}[name](os.urandom(32))
    rec = 64 * 1024
    out = bytearray(rec + 16)
    view = memoryview(buf)
    nonce = bytes(12)
    into = getattr(aead, "encrypt_into", None)
    t = time.perf_counter()
    done = 0
    off = 0
    while done < size:
        n = min(rec, size - done)
        if off + n > len(view):
            off = 0
        if into is not None:
            into(nonce, view[off:off + n], b"aad", out)
        else:
            aead.encrypt(nonce, bytes(view[off:off + n]), b"aad")
        off += n
        done += n
    return time.perf_counter() - t


def timed_sync(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def floors(src: Path, size: int, scratch: Path, reps: int, buf: bytes) -> dict[str, list[float]]:
    out = scratch / "floor-copy"
    rows: dict[str, list[float]] = {"copy+fsync": [], "copy": [], "sha256": [], "chacha": [], "aesgcm": []}
    for _ in range(reps):
        rows["copy+fsync"].append(timed_sync(lambda: copy_fsync(src, out)))
        out.unlink()
        rows["copy"].append(timed_sync(lambda: shutil.copyfile(src, out)))
        out.unlink()
        rows["sha256"].append(sha256_memory(size, buf))
        rows["chacha"].append(aead_memory(size, buf, "chacha"))
        rows["aesgcm"].append(aead_memory(size, buf, "aesgcm"))
    return rows


# --------------------------------------------------------------------------- the driver (any unibus version)


async def _timed(fn: Callable[[], Awaitable[object]]) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


class _PySpy:
    """``py-spy record --native`` on a set of pids while a block runs (the driver's --profile)."""

    def __init__(self, binary: str, out_dir: Path, label: str, pids: dict[str, int]) -> None:
        self.procs = []
        for who, pid in pids.items():
            out = out_dir / f"{label}-{who}.txt"
            self.procs.append(subprocess.Popen(
                [binary, "record", "--native", "--rate", "200", "--format", "raw", "--output", str(out),
                 "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL))
        time.sleep(1.0)  # attached

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            benchlib.stop_process(p, 30, signal.SIGINT)


class _Daemon:
    """``membershipd serve`` of this interpreter's unibus on free loopback ports (the driver cannot
    use ``unibus.testing``: an earlier release's venv lacks pytest)."""

    def __init__(self, data_dir: Path, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        free_port = benchlib.free_port
        self.data_dir = data_dir
        self.http_port = free_port()
        self.log = open(data_dir.parent / "daemon.log", "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "unibus.cli", "serve", "--data-dir", str(data_dir),
             "--http-addr", f"127.0.0.1:{self.http_port}", "--nats-addr", f"127.0.0.1:{free_port()}",
             "--nats-monitor-port", str(free_port()), *args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.pid = self.proc.pid
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        import urllib.request

        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"membershipd exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("membershipd was not healthy within 60 s")
            time.sleep(0.1)

    def stop(self) -> None:
        children = benchlib.child_pids(self.pid)
        benchlib.stop_process(self.proc, 30)
        for c in children:  # its nats-server, if it outlived it
            benchlib.kill_nats_if_alive(c, str(self.data_dir))
        self.log.close()


def _bootstrap(data_dir: Path, identity: Any) -> None:
    proc = subprocess.run([sys.executable, "-m", "unibus.cli", "member", "add", "--data-dir", str(data_dir),
                           "--handle", identity.handle, "--role", "admin", "--sign-pub", identity.sign_pub_b64,
                           "--enc-pub", identity.enc_pub_b64, "--enc-suite", identity.enc_suite,
                           *(["--bus-pub", identity.bus_pub] if getattr(identity, "bus_pub", None) else [])],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"membershipd member add failed: {proc.stderr.strip()}")


async def _measure(c: Any, rid: str, case: dict[str, Any], big: bool, scratch: Path, daemon_pid: int,
                   result: dict[str, Any], profile: tuple[str, Path] | None) -> None:
    """``case["runs"]`` rounds of the four transfers of one file; big: with the RSS peaks (and py-spy)."""
    from unibus.client.blobs import delete_blob, get_blob, get_raw_blob, put_blob, put_raw_blob

    src, size, sha = Path(case["src"]), case["size"], bytes.fromhex(case["sha"])
    me = os.getpid()
    out = scratch / "out"
    ids: list[str] = []
    secs: dict[str, list[float]] = {p: [] for p in PATHS}

    async def put() -> None:
        ids.append(await put_blob(c, rid, src, tmp_dir=scratch))

    steps: dict[str, Callable[[], Awaitable[object]]] = {
        "raw_put": lambda: put_raw_blob(c, rid, src, sha256=sha),
        "raw_get": lambda: get_raw_blob(c, rid, sha.hex(), out),
        "put": put,
        "get": lambda: get_blob(c, rid, ids[-1], out),
    }
    if big:
        result["daemon_rss_before_kib"] = reset_hwm(daemon_pid)
    for _ in range(case["runs"]):
        for name in ("raw_put", "raw_get", "put", "get"):
            spy = None
            if big:
                before = reset_hwm(me)
                if profile is not None:
                    spy = _PySpy(profile[0], profile[1], name, {"client": me, "daemon": daemon_pid})
            try:
                secs[name].append(await _timed(steps[name]))
            finally:
                if spy is not None:
                    spy.stop()
            if big:
                grown = status_kib(me, "VmHWM") - before
                result["client_peak_kib"][name] = max(grown, result["client_peak_kib"].get(name, 0))
            if name in ("raw_get", "get"):
                out.unlink(missing_ok=True)
                await delete_blob(c, rid, sha.hex() if name == "raw_get" else ids[-1])
    if big:
        result["daemon_hwm_kib"] = status_kib(daemon_pid, "VmHWM")
    result["seconds"][str(size)] = secs


async def _warm_up(c: Any, rid: str, src: Path, sha: bytes, scratch: Path) -> None:
    from unibus.client.blobs import delete_blob, get_raw_blob, put_raw_blob

    await put_raw_blob(c, rid, src, sha256=sha)
    await get_raw_blob(c, rid, sha.hex(), scratch / "warm")
    (scratch / "warm").unlink()
    await delete_blob(c, rid, sha.hex())


async def _backends(case: dict[str, Any], scratch: Path, runs: int) -> dict[str, dict[str, list[float]]]:
    """Both backends in this process, without HTTP: store (stage, fsync, commit) and read the big
    file ``runs`` times each; the object store on a nats-server with JetStream of its own."""
    import socket

    import nats
    from unibus.plugins.blobstore.fs import FsBackend
    from unibus.plugins.blobstore.objectstore import ObjectStoreBackend

    data = Path(case["src"]).read_bytes()
    sha = bytes.fromhex(case["sha"])
    pieces = [data[i:i + 64 * 1024] for i in range(0, len(data), 64 * 1024)]
    del data
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    js_dir = scratch / "js"
    nats_bin = Path(sys.executable).with_name("nats-server")
    proc = subprocess.Popen([str(nats_bin), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(js_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    out: dict[str, dict[str, list[float]]] = {}
    nc = None
    try:
        for _ in range(100):
            try:
                nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=1, max_reconnect_attempts=0)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.1)
        if nc is None:
            raise RuntimeError("nats-server did not start")
        for name in ("fs", "objectstore"):
            backend = (FsBackend(scratch / f"b-{name}") if name == "fs" else
                       ObjectStoreBackend(nc.jetstream(timeout=30), scratch / f"b-{name}"))
            await backend.start()
            rows: dict[str, list[float]] = {"store": [], "read": []}
            for _ in range(runs):
                t = time.perf_counter()
                up = await backend.begin("r1")
                for i in range(0, len(pieces), 64):  # what the PUT handler hands over: 4 MiB at a time
                    await up.write(b"".join(pieces[i:i + 64]))
                if await up.finish() != sha:
                    raise RuntimeError(f"{name}: wrong digest")
                await up.commit("bench")
                rows["store"].append(time.perf_counter() - t)
                t = time.perf_counter()
                reader = await backend.open("r1", sha.hex())
                async for _chunk in reader.chunks():
                    pass
                await reader.close()
                rows["read"].append(time.perf_counter() - t)
                await backend.delete("r1", sha.hex())
            await backend.close()
            out[name] = rows
    finally:
        if nc is not None:
            await nc.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return out


async def drive(cases: list[dict[str, Any]], scratch: Path, profile: tuple[str, Path] | None,
                backends: int = 0) -> dict[str, Any]:
    """Start a membershipd of this interpreter's unibus and time every transfer of every case."""
    import unibus
    from unibus.client import UnibusClient
    from unibus.client.keys import generate_identity

    alice = generate_identity("alice")
    data_dir = scratch / "daemon"
    _bootstrap(data_dir, alice)
    biggest = max(c["size"] for c in cases)
    server = _Daemon(data_dir, ["--blob-max-bytes", str(biggest * 2 + MIB)])
    result: dict[str, Any] = {"version": unibus.__version__, "seconds": {}, "client_peak_kib": {}}
    try:
        async with UnibusClient(server.base_url, alice, timeout=30) as c:
            rid = (await c.create_room("bench"))["room_id"]
            await c.rekey(rid)
            # One untimed upload and download of the big file first: membershipd is a
            # long-lived process, and its first big transfer pays for growing its heap.
            big_case = next(c for c in cases if c["size"] == biggest)
            await _warm_up(c, rid, Path(big_case["src"]), bytes.fromhex(big_case["sha"]), scratch)
            for case in cases:
                await _measure(c, rid, case, case["size"] == biggest, scratch, server.pid, result, profile)
            if backends:
                result["backends"] = await _backends(big_case, scratch, backends)
    finally:
        server.stop()
    return result


def driver_main(args: argparse.Namespace) -> int:
    cases = json.loads(args.driver)
    profile = (args.py_spy, args.profile) if args.profile is not None else None
    with tempfile.TemporaryDirectory(prefix="unibus-bench-blobs-drv-", dir=args.scratch) as tmp:
        res = asyncio.run(drive(cases, Path(tmp), profile, args.backend_runs))
    print(json.dumps(res))
    return 0


def run_driver(python: str, cases: list[dict[str, Any]], scratch: Path, backends: int = 0) -> dict[str, Any]:
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--driver", json.dumps(cases),
                           "--scratch", str(scratch), "--backend-runs", str(backends)], capture_output=True, text=True, timeout=DRIVER_TIMEOUT,
                          stdin=subprocess.DEVNULL, cwd=scratch)
    if proc.returncode != 0:
        raise RuntimeError(f"{python}: the driver failed: {proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the report


def rate(size: int, secs: Sequence[float], which: str = "median") -> float:
    s = {"median": statistics.median(secs), "best": min(secs), "worst": max(secs)}[which]
    return size / s / 1e6


def cell(size: int, secs: Sequence[float]) -> str:
    return f"**{rate(size, secs):,.0f}** ({rate(size, secs, 'worst'):,.0f}–{rate(size, secs, 'best'):,.0f})"


def _blob_format_written() -> str:
    """The blob format this tree's client writes on this machine (v2 where the CPU has AES instructions)."""
    from unibus.client.blobs import FORMATS, WRITE_VERSION

    return FORMATS[WRITE_VERSION].magic.decode("ascii")


def render(data: dict[str, Any]) -> str:
    big = data["big"]
    ext = data["sha_ext"]
    before = data.get("before")
    # a release is named by its version; any other ref by itself (its version says little mid-release)
    ref = data.get("before_ref")
    label = "" if not before else (before["version"] if not ref or ref == f"v{before['version']}"
                                   else f"`{ref}` ({before['version']})")
    loads = data["loads"]
    # measurements kept before the floor hashed pieces in cache hashed whole 64 MiB buffers
    piece = data.get("sha_piece")
    sha_piece = f"{piece // MIB} MiB pieces of one buffer, as the client and membershipd hash" if piece \
        else "64 MiB buffers"
    masked = data.get("sha_masked")
    if masked:
        sha_line = (f"SHA extensions **no: masked** (the CPU has `sha_ni`, but every process of the run started with "
                    f"`OPENSSL_ia32cap={masked}`, so OpenSSL's SHA-256, in `hashlib` and `cryptography`, ran its "
                    "fastest code without them (AVX2 where the CPU has it), as on a CPU that lacks them; AES "
                    "instructions stay in use)")
    else:
        sha_line = (f"SHA extensions **{'yes' if ext else 'no'}** "
                    f"(`{'sha_ni' if platform.machine() in ('x86_64', 'i686') else 'sha2'}` in /proc/cpuinfo)")
    env = (f"Measured {data['date']} by `{data['command']}`: **{data['cpu']}**, {sha_line}, {data['cpus']} CPUs"
           + (f", this tree's client writes `{data['writes']}` here (0.11.0's: `unibus-blob-v1`)"
              if data.get("writes") else "")
           + f", Python {data['python']}, {data['kernel']}, files in "
           f"{data['fs']}; client and daemon on loopback on the same machine, so they share the CPUs; 1-minute load "
           f"average {min(loads):.1f} to {max(loads):.1f} during the run (other work was running: the ratios are "
           "measured in the same rounds, the absolute figures are not comparable across runs).")
    aim_floor = "copy+fsync" if ext else "sha256"
    aim_share = 0.5 if ext else 0.8
    intro = (
        "How to read it: MB/s are 10^6 bytes per second of the blob (the ciphertext for put and get), median and "
        "(worst–best) over the rounds. Every round measures the floors and then both versions' transfers, each "
        "version in its own process with its own membershipd, alternating which goes first. The aim of the issue: "
        "put and get each at least 50% of copy+fsync on a CPU with SHA extensions, at least 80% of one-core "
        f"SHA-256 without; this machine's aim is therefore **{aim_share:.0%} of "
        f"{'copy+fsync' if ext else 'SHA-256'}**."
    )
    lines = [env, "", intro, ""]
    for size_s, secs in data["after"]["seconds"].items():
        size = int(size_s)
        fl = data["floors"][size_s]
        n = len(secs["put"])
        lines += [f"### {'Without SHA extensions: ' if masked else ''}{size // MIB} MiB ({n} transfers of each kind)", "",
                  "| floor | MB/s |", "|---|---:|",
                  f"| `shutil.copyfile` + fsync | {cell(size, fl['copy+fsync'])} |",
                  f"| `shutil.copyfile` | {cell(size, fl['copy'])} |",
                  f"| SHA-256, one core (`hashlib`, {sha_piece}) | {cell(size, fl['sha256'])} |",
                  f"| ChaCha20-Poly1305, one core (64 KiB records; blob format v1) | {cell(size, fl['chacha'])} |"]
        if fl.get("aesgcm"):  # measurements kept before 0.12's v2 have no such row
            lines.append(f"| AES-256-GCM, one core (64 KiB records; v2) | {cell(size, fl['aesgcm'])} |")
        lines.append("")
        cf, sh = rate(size, fl["copy+fsync"]), rate(size, fl["sha256"])
        head = "| path | this tree MB/s | vs copy+fsync | vs SHA-256 |"
        rule = "|---|---:|---:|---:|"
        if before:
            head += f" {label} MB/s | {label} vs copy+fsync | speed-up |"
            rule += "---:|---:|---:|"
        lines += [head, rule]
        for p in PATHS:
            r = rate(size, secs[p])
            row = f"| {PATH_NAMES[p]} | {cell(size, secs[p])} | {r / cf:.0%} | {r / sh:.0%} |"
            if before:
                b = before["seconds"][size_s][p]
                rb = rate(size, b)
                row += f" {cell(size, b)} | {rb / cf:.0%} | ×{r / rb:.2f} |"
            lines.append(row)
        lines.append("")
    bs = str(big)
    after = data["after"]
    floor = rate(big, data["floors"][bs][aim_floor])
    verdicts = []
    for p in ("put", "get"):
        share = rate(big, after["seconds"][bs][p]) / floor
        verdicts.append(f"{p} {share:.0%}")
    met = all(rate(big, after["seconds"][bs][p]) / floor >= aim_share for p in ("put", "get"))
    lines += [(f"Verdict for {big // MIB} MiB: {' and '.join(verdicts)} of "
               f"{'copy+fsync' if ext else 'one-core SHA-256'} (aim {aim_share:.0%}): "
               + ("**met**." if met else "**not met**.")), ""]
    sha = rate(big, data["floors"][bs]["sha256"])
    put = rate(big, after["seconds"][bs]["put"])
    ceiling = sha / 2 / floor
    lines += [(f"put's ceiling under the HTTP contract, from this run's floors: half the one-core SHA-256 rate, "
               f"{sha / 2:,.0f} MB/s, {ceiling:.0%} of {'copy+fsync' if ext else 'one-core SHA-256'}"
               + (f" (under the aim of {aim_share:.0%})" if ceiling < aim_share else
                  f" (the aim of {aim_share:.0%} lies within it)")
               + ". The signed `Content-Digest` needs the whole ciphertext hashed before the first byte of it "
               "is sent, and membershipd hashes every byte it receives before it answers, so the two hashes "
               "cannot overlap (docs/blobstore.md, \"The data path\"). put reached "
               f"{put / (sha / 2):.0%} of that ceiling."), ""]

    def mem(res: dict[str, Any]) -> str:
        d = (res["daemon_hwm_kib"] - res["daemon_rss_before_kib"]) / 1024
        cl = ", ".join(f"{p} {res['client_peak_kib'][p] / 1024:+.1f}" for p in PATHS)
        return f"membershipd **{d:+.1f} MiB** (from {res['daemon_rss_before_kib'] / 1024:.1f}); client, per transfer: {cl} MiB"

    if "backends" in after:
        cf = rate(big, data["floors"][bs]["copy+fsync"])
        head = "| backend, in process (no HTTP) | this tree MB/s | vs copy+fsync |"
        rule = "|---|---:|---:|"
        if before and "backends" in before:
            head += f" {label} MB/s | speed-up |"
            rule += "---:|---:|"
        lines += [f"Both backends alone, {big // MIB} MiB, in the driver's process: store = hand over 4 MiB at a "
                  "time, hash, commit (the fs backend stages the file and fsyncs it; the object store "
                  "publishes chunks of 1 MiB less 4 KiB as they come, up to 4 awaiting their acknowledgement); read = every chunk of the stored blob, in order (the fs backend's "
                  "HTTP GET uses sendfile instead; this row is its fallback). The object store runs on a "
                  "nats-server of its own (JetStream, R1).", "", head, rule]
        for b in ("fs", "objectstore"):
            for k in ("store", "read"):
                secs = after["backends"][b][k]
                r = rate(big, secs)
                row = f"| {b} {k} | {cell(big, secs)} | {r / cf:.0%} |"
                if before and "backends" in before:
                    rb = rate(big, before["backends"][b][k])
                    row += f" {cell(big, before['backends'][b][k])} | ×{r / rb:.2f} |"
                lines.append(row)
        lines.append("")
    lines += [f"Peak RSS over the {big // MIB} MiB transfers (VmHWM over the RSS before; the bound is +64 MiB for "
              "1 GiB): this tree: " + mem(after) + "."]
    if before:
        lines[-1] += f" {label}: " + mem(before) + "."
    lines += ["", f"Reproduce: `{data['command']}`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- profile


#: native frames where a thread waits (py-spy --native samples idle threads too)
_IDLE = {"PyThread_acquire_lock_timed", "pthread_cond_timedwait", "pthread_cond_wait", "epoll_wait", "wait4",
         "sem_wait", "sem_timedwait", "__futex_abstimed_wait_common", "nanosleep", "clock_nanosleep"}
_SYSCALLS = {"write": "write(2)", "read": "read(2)", "recv": "recv(2)", "send": "send(2)", "sendfile64": "sendfile(2)",
             "fdatasync": "fsync", "fsync": "fsync", "pread64": "read(2)", "readv": "read(2)", "writev": "write(2)",
             "sendmsg": "send(2)", "recvmsg": "recv(2)"}


def classify(frames: list[str]) -> str | None:
    """The bucket of one sampled stack, or None when the thread was waiting."""
    names = [f.split(" (")[0] for f in frames]
    if any(n in _IDLE for n in names):
        return None
    for n in names:
        low = n.lower()
        if "sha256" in low and not n.startswith("_hashlib"):
            return "SHA-256"
        if "chacha" in low or "poly1305" in low:
            return "ChaCha20-Poly1305"
        if "gcm" in low or "ghash" in low or low.startswith("aesni"):
            return "AES-256-GCM"
    for n in reversed(names):
        if n in _SYSCALLS:
            return _SYSCALLS[n]
    named = next((n for n in reversed(names) if not n.startswith("0x")), "?")
    if names[-1].startswith("0x"):
        return f"C (copies, allocation) in {named}"
    if frames[-1].split(" (")[-1].startswith(("lib", "_", "python")) and ".py:" not in frames[-1]:
        return f"C: {named}"
    return f"Python: {named}"


def summarize_profile(out_dir: Path, rate_hz: int = 200) -> str:
    """CPU time of each recorded process by bucket (hashing, cipher, syscalls, copies, Python)."""
    lines = []
    for f in sorted(out_dir.glob("*.txt")):
        buckets: Counter[str] = Counter()
        for line in f.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if n.isdigit():
                b = classify(stack.split(";"))
                if b is not None:
                    buckets[b] += int(n)
        busy = sum(buckets.values())
        lines.append(f"{f.stem}: {busy / rate_hz:.2f} s of CPU sampled")
        for name, n in buckets.most_common(10):
            lines.append(f"  {n / max(busy, 1):6.1%}  {n / rate_hz:5.2f} s  {name}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds (the big size once per round, 1 MiB 10x; default 3)")
    parser.add_argument("--big-mib", type=int, default=256, help="the big blob, MiB (default 256; 1024 for the 1 GiB "
                                                                  "memory bound)")
    parser.add_argument("--before", default=BEFORE_REF, help=f"the earlier release to compare with (default "
                                                              f"{BEFORE_REF}; 'none' skips it)")
    parser.add_argument("--scratch", type=Path, default=None, help="directory for the files (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="markdown file whose bench:blobs section is rewritten")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the markdown file alone")
    parser.add_argument("--save", type=Path, default=None, help="also keep the measurements as JSON (0600)")
    parser.add_argument("--render", type=Path, default=None, help="rewrite the section from kept measurements")
    parser.add_argument("--no-sha-ext", action="store_true",
                        help="run as on a CPU without SHA extensions (OpenSSL told not to use them in every process; "
                             "x86 only), into a section of its own, against the aim for such CPUs")
    parser.add_argument("--profile", type=Path, default=None, help="record each big transfer with py-spy into DIR")
    parser.add_argument("--py-spy", default=str(Path(sys.executable).with_name("py-spy")), help=argparse.SUPPRESS)
    parser.add_argument("--driver", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend-runs", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver is not None:
        return driver_main(args)
    for flag, value in (("--runs", args.runs), ("--big-mib", args.big_mib)):
        if value < 1:
            print(f"bench_blobs.py: {flag} must be a positive integer, not {value}", file=sys.stderr)
            return 2
    if args.render is not None:
        return _publish(json.loads(args.render.read_text()), args)
    problem = _sha_mask_problem(args.no_sha_ext, os.environ.get("OPENSSL_ia32cap"), platform.machine(),
                                sha_extensions())
    if problem:
        print(f"bench_blobs.py: {problem}", file=sys.stderr)
        return 2
    if args.no_sha_ext and os.environ.get("OPENSSL_ia32cap") is None:
        # OpenSSL reads the mask when it is loaded: start again with it (and every child inherits it)
        script = str(Path(__file__).resolve())
        os.execve(sys.executable, [sys.executable, script, *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, "OPENSSL_ia32cap": NO_SHA_MASK})
    big = args.big_mib * MIB
    command = f".venv/bin/python bench/bench_blobs.py --runs {args.runs} --big-mib {args.big_mib}"
    if args.before != BEFORE_REF:
        command += f" --before {args.before}"
    if args.no_sha_ext:
        command += " --no-sha-ext"
    with tempfile.TemporaryDirectory(prefix="unibus-bench-blobs-", dir=args.scratch) as tmp:
        scratch = Path(tmp)
        srcs = {}
        for size in (SMALL, big):
            src = scratch / f"src-{size}"
            srcs[size] = (src, write_random(src, size).hex())
        if args.profile is not None:
            if not Path(args.py_spy).exists():
                print(f"bench_blobs.py: --profile needs py-spy at {args.py_spy} (.venv/bin/pip install py-spy)",
                      file=sys.stderr)
                return 2
            args.profile.mkdir(parents=True, exist_ok=True)
            cases = [{"src": str(srcs[big][0]), "size": big, "sha": srcs[big][1], "runs": 1}]
            with tempfile.TemporaryDirectory(dir=scratch) as d:
                asyncio.run(drive(cases, Path(d), (args.py_spy, args.profile)))
            print(summarize_profile(args.profile))
            return 0
        python_before = None
        if args.before != "none":
            import baseline

            python_before = str(baseline.prepare(args.before))
        buf = os.urandom(_BUF)
        data: dict[str, Any] = {
            "date": date.today().isoformat(), "command": command, "cpu": cpu_model(),
            "sha_ext": sha_extensions() and not args.no_sha_ext,
            "sha_masked": NO_SHA_MASK if args.no_sha_ext and sha_extensions() else None,
            "writes": _blob_format_written(), "sha_piece": SHA_PIECE,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": f"{platform.system()} {platform.release()}",
            "fs": "a temp dir" if args.scratch is None else str(args.scratch),
            "big": big, "runs": args.runs, "loads": [], "floors": {}, "after": None, "before": None,
        }
        results: dict[str, dict[str, Any]] = {}
        for r in range(args.runs):
            data["loads"].append(os.getloadavg()[0])
            for size in (SMALL, big):
                fl = floors(srcs[size][0], size, scratch, 1 if size == big else SMALL_PER_ROUND, buf)
                acc = data["floors"].setdefault(str(size), {k: [] for k in fl})
                for k, v in fl.items():
                    acc[k] += v
            cases = [{"src": str(srcs[s][0]), "size": s, "sha": srcs[s][1],
                      "runs": 1 if s == big else SMALL_PER_ROUND} for s in (SMALL, big)]
            order = [("after", sys.executable)] + ([("before", python_before)] if python_before else [])
            if r % 2:
                order.reverse()
            for which, python in order:
                print(f"round {r + 1}/{args.runs}: {which}", file=sys.stderr, flush=True)
                res = run_driver(python, cases, scratch, backends=1)
                prev = results.get(which)
                if prev is None:
                    results[which] = res
                else:
                    for s, by_path in res["seconds"].items():
                        for p, v in by_path.items():
                            prev["seconds"][s][p] += v
                    for b, rows in res.get("backends", {}).items():
                        for k, v in rows.items():
                            prev["backends"][b][k] += v
                    for p, v in res["client_peak_kib"].items():
                        prev["client_peak_kib"][p] = max(v, prev["client_peak_kib"].get(p, 0))
                    if res["daemon_hwm_kib"] - res["daemon_rss_before_kib"] > \
                            prev["daemon_hwm_kib"] - prev["daemon_rss_before_kib"]:
                        prev["daemon_hwm_kib"] = res["daemon_hwm_kib"]
                        prev["daemon_rss_before_kib"] = res["daemon_rss_before_kib"]
        data["loads"].append(os.getloadavg()[0])
        data["after"], data["before"] = results["after"], results.get("before")
        data["before_ref"] = args.before if python_before else None
    if args.save is not None:
        fd = os.open(args.save, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
    return _publish(data, args)


def _publish(data: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the section and write it into its own markers: a run with SHA extensions masked has one
    of its own, beside the run on the CPU as it is."""
    name, heading = ("blobs-no-sha", "## Blobs without SHA extensions") if data.get("sha_masked") else \
        ("blobs", "## Blobs")
    return benchlib.publish(render(data), name, heading, args.out, not args.no_write, f"bench:{name}")


def _sha_mask_problem(no_sha_ext: bool, mask: str | None, machine: str, has_ext: bool = True) -> str | None:
    """What is wrong with running with ``--no-sha-ext`` (or without it) here, or None.

    ``OPENSSL_ia32cap`` set by hand would change what the figures mean without the report
    saying so; the mask itself is x86's (arm's ``OPENSSL_armcap`` replaces the whole word)."""
    if not no_sha_ext:
        if mask is not None:
            return (f"OPENSSL_ia32cap is set ({mask}): the figures would not be this CPU's; unset it, or give "
                    "--no-sha-ext to measure as without SHA extensions")
        return None
    if machine not in ("x86_64", "AMD64", "i686", "i386"):
        return f"--no-sha-ext masks SHA extensions with OPENSSL_ia32cap, which only x86 has (this is {machine})"
    if not has_ext:
        return ("this CPU has no SHA extensions (no sha_ni in /proc/cpuinfo): run without --no-sha-ext, whose aim "
                "that run already measures")
    if mask is not None and mask != NO_SHA_MASK:
        return f"OPENSSL_ia32cap is already set ({mask}); unset it: --no-sha-ext sets it to {NO_SHA_MASK}"
    return None


if __name__ == "__main__":
    sys.exit(main())
