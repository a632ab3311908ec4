"""Red team stop-r2: can a plugin, a client or the operator spoil a SIGTERM/SIGINT stop?

The contract (docs/operations.md, "Signals"; ``unibus.daemon.Daemon.stop``, ``serve``):
on SIGTERM/SIGINT membershipd exits 0 within 10 s (about 11 s when code ignores its
cancellation); every plugin's ``shutdown`` hook is called; nats-server is always stopped;
a stop still running 13 s after the signal dumps every stack and exits 1; signals during
and after the stop are ignored; nothing acknowledged is lost; a room deletion in flight
gives up at the stop and the next start empties ``blobs/.tmp``.

Real processes only (``membershipd_factory``), on 127.0.0.1, in temporary directories.
The first tests are the holes this round found, each fixed since (the docstrings say what
happened before); the others are attacks that held.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from helpers import room_ids, sigterm, plugin_modules, wait_gone

from unibus.client import UnibusClient
from unibus.client.blobs import sign_streamed_request
from unibus.client.keys import generate_identity
from unibus.testing import MembershipdProcess, SignedClient, bootstrap_member, nats_server_pids

#: docs/operations.md, "Signals": exit 0 within 10 s of the signal; the slack is the
#: test's own wait for the exit, not a performance allowance.
STOP_BUDGET = 10.0
SLACK = 0.5
#: ... and a stop still running then ends in the watchdog's stack dump, exit 1.
STOP_WATCHDOG = 13.0


def _hook_raiser(name: str, stmt: str, sync: bool = False) -> str:
    """A plugin, started first (so shut down last but one), whose shutdown hook runs ``stmt``."""
    return f'''
        import sys
        from unibus import hookimpl

        PLUGIN_NAME = "{name}"

        @hookimpl
        async def startup(app):
            pass

        @hookimpl
        {"def" if sync else "async def"} shutdown(app):
            {stmt}
    '''


MODULES = {
    # has no startup hook, so it is shut down last: after the misbehaving one
    "after_plugin": '''
        import logging
        from unibus import hookimpl

        PLUGIN_NAME = "after"

        @hookimpl
        async def shutdown(app):
            logging.getLogger("unibus.plugins.after").warning("after: shut down")
    ''',
    "kbi_plugin": _hook_raiser("kbi", "raise KeyboardInterrupt"),
    "sysexit_plugin": _hook_raiser("sysexit", "sys.exit(3)", sync=True),
    "genexit_plugin": _hook_raiser("genexit", "raise GeneratorExit"),
    # a worker process (multiprocessing, not daemonic) it forgets to stop: multiprocessing's
    # atexit handler joins it
    "mp_plugin": '''
        import multiprocessing, os, time
        from unibus import hookimpl

        PLUGIN_NAME = "mp"
        KEEP = []

        @hookimpl
        async def startup(app):
            p = multiprocessing.get_context("fork").Process(target=time.sleep, args=(40,), name="mp-worker")
            p.start()
            KEEP.append(p)
            with open(os.environ["STOP_R2_PIDFILE"], "w") as f:
                f.write(str(p.pid))
    ''',
    # the classic "SIGTERM means sys.exit(0)" handler, installed over the daemon's
    "sigexit_plugin": '''
        import signal, sys
        from unibus import hookimpl

        PLUGIN_NAME = "sigexit"

        @hookimpl
        async def startup(app):
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    ''',
}


@pytest.fixture(scope="module")
def pythonpath(tmp_path_factory) -> dict[str, str]:
    return plugin_modules(tmp_path_factory.mktemp("stop-r2-plugins"), MODULES)


# --------------------------------------------------------------------------- helpers


def _node(tmp_path: Path, alice=None) -> Path:
    data_dir = tmp_path / "node"
    bootstrap_member(data_dir, alice or generate_identity("alice"), "admin")
    return data_dir


def _plugin_args(*names: str) -> list[str]:
    return [a for n in names for a in ("--plugin", n)]


def _sigterm(proc: MembershipdProcess, timeout: float = 15.0) -> tuple[int | None, float, int | None]:
    return sigterm(proc, timeout)


def _kill(proc: MembershipdProcess) -> None:
    if proc.proc is not None and proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait(5)


def _rmdir_cost(under: Path) -> float:
    """Seconds one ``rmdir`` of an empty directory takes here (shutil.rmtree of 3,000)."""
    probe = under / "probe"
    probe.mkdir()
    for i in range(3000):
        (probe / str(i)).mkdir()
    started = time.monotonic()
    shutil.rmtree(probe)
    return max((time.monotonic() - started) / 3000, 1e-6)


def _many_dirs(root: Path, n: int) -> None:
    root.mkdir(mode=0o700, parents=True)
    for i in range(0, n, 1000):
        sub = root / f"{i // 1000:05d}"
        sub.mkdir()
        for j in range(min(1000, n - i)):
            os.mkdir(sub / f"{j:04d}")


async def _room_with_blobs(proc: MembershipdProcess, ident, n: int) -> str:
    async with UnibusClient(proc.base_url, ident) as c:
        rid = (await c.create_room("stop-r2"))["room_id"]
    target = f"/v1/rooms/{rid}/blobs"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        for i in range(n):
            data = f"blob-{i}".encode()
            h = sign_streamed_request("PUT", target, hashlib.sha256(data).digest(), keyid=ident.handle,
                                      private_key=ident.sign_key)
            async with s.put(proc.base_url + target, data=data, headers=h) as r:
                assert r.status == 201, (r.status, await r.text())
    return rid


# --------------------------------------------------------------------------- holes found, fixed since


@pytest.mark.parametrize("bad", ["kbi_plugin", "sysexit_plugin", "genexit_plugin"])
def test_a_shutdown_hook_raising_a_base_exception_does_not_end_the_stop(tmp_path, membershipd_factory, pythonpath,
                                                                        bad):
    """Who: a third-party plugin (trusted code, installed by the operator). Steps: its
    ``shutdown`` hook raises KeyboardInterrupt, calls ``sys.exit(3)`` (a sync hook), or
    raises GeneratorExit. ``_shutdown_plugins`` and ``run_bounded`` catch ``Exception``
    only: the BaseException leaves ``Daemon.stop`` through its ``finally`` (nats-server
    is stopped) and ends the process: exit 130, 3, or 1 with a traceback; the plugins
    after it get no ``shutdown`` call, and the nonce store, the store and the NATS
    connections are never closed (nats-server is killed under them); no
    ``stopped in`` line. Expected: logged as a failed hook like any other, the stop goes
    on, exit 0."""
    proc = membershipd_factory(*_plugin_args("after_plugin", bad), env=pythonpath, data_dir=_node(tmp_path))
    rc, took, nats = _sigterm(proc)
    wait_gone(nats)  # this part holds: the finally stops nats-server
    log = proc.log_text()
    assert rc == 0 and took <= STOP_BUDGET + SLACK, (rc, took, log[-3000:])
    assert "after: shut down" in log, log[-3000:]
    assert re.search(r"stopped in \d+\.\d s", log) and "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_a_plugin_worker_process_cannot_hold_the_exit_past_the_watchdog(tmp_path, membershipd_factory, pythonpath):
    """Who: a third-party plugin that starts a ``multiprocessing.Process`` (not daemonic)
    and does not stop it (or any plugin/library ``atexit`` handler that blocks). Steps:
    SIGTERM. The stop itself finishes at once (``stopped in 0.0 s``), ``serve`` sees no
    thread left and disarms the watchdog, and then the interpreter's exit runs
    multiprocessing's atexit handler, which joins the child: the process hangs for as
    long as the child lives (for ever), exit code none, no stack dump; under systemd
    the cgroup is killed at TimeoutStopSec=15 instead of the documented exit 1 at 13 s.
    Expected: exit within STOP_WATCHDOG (0, or 1 with the stacks)."""
    pidfile = tmp_path / "worker.pid"
    env = {**pythonpath, "STOP_R2_PIDFILE": str(pidfile)}
    proc = membershipd_factory(*_plugin_args("mp_plugin"), env=env, data_dir=_node(tmp_path))
    try:
        rc, took, nats = _sigterm(proc, timeout=STOP_WATCHDOG + 2)
        wait_gone(nats)
        assert rc is not None, f"still running {took:.1f} s after SIGTERM:\n{proc.log_text()[-2000:]}"
        assert rc in (0, 1) and took <= STOP_WATCHDOG + 1
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        _kill(proc)


@pytest.mark.slow
def test_sigterm_while_the_start_up_empties_a_big_staging_leftover(tmp_path, membershipd_factory):
    """Who: the operator. Steps: a previous stop gave up a big room deletion (the
    contract's own case), so ``blobs/.tmp/del-*`` holds a big tree; the next start
    empties it in ``FsBackend._scan`` -> ``clean_staging`` (``shutil.rmtree``, in
    ``asyncio.to_thread``), which, unlike ``remove_tree``, has no stop event; SIGTERM
    arrives meanwhile (``systemctl stop`` or a restart of a node that is slow to come
    up). The start-up task is cancelled at once, the stop runs, but the interpreter's
    exit waits for the rmtree thread, so the process runs on until the watchdog's stack
    dump and exit 1 at 13 s (exit 0 after more than 10 s with a smaller tree). The same
    holds for the start-up sweep of a deleted room's blobs (``delete_room`` before the
    blobstore has started: its ``close`` never sets ``_closing``). The tree here is made
    of empty directories, sized to take about 4 s to remove on the machine that runs it: the stop comes
    once the sweep has begun, and the sweep gives up (the tree is still there after the exit)."""
    data_dir = _node(tmp_path)
    blobs = data_dir / "blobs"
    blobs.mkdir(mode=0o700)
    (blobs / ".tmp").mkdir(mode=0o700)
    n = min(200_000, max(20_000, int(4.0 / _rmdir_cost(tmp_path))))
    leftover = blobs / ".tmp" / f"del-{secrets.token_hex(8)}"
    _many_dirs(leftover, n)
    proc = membershipd_factory(data_dir=data_dir, wait=False)
    try:
        deadline = time.monotonic() + 30
        while "nonce bucket: epoch" not in proc.log_text() and time.monotonic() < deadline:
            assert proc.proc.poll() is None, proc.log_text()[-3000:]
            time.sleep(0.05)
        def entries() -> int:  # the walk removes a block's entries before the block
            return sum(len(os.listdir(b)) for b in leftover.iterdir() if b.is_dir())

        while entries() == n and time.monotonic() < deadline:
            time.sleep(0.05)  # until the blobstore's start-up is emptying .tmp
        log = proc.log_text()
        assert "membershipd serving on" not in log and "unfinished upload" not in log, (n, log[-2000:])
        rc, took, nats = _sigterm(proc, timeout=STOP_WATCHDOG + 3)
        if nats is not None:
            wait_gone(nats)
        assert nats_server_pids(data_dir) == set()
        assert rc == 0 and took <= STOP_BUDGET + SLACK, (n, rc, took, proc.log_text()[-1500:])
        assert leftover.exists()  # the sweep gave up: the next start finishes it
    finally:
        _kill(proc)
        shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------- attacks that held


def test_a_plugin_sigterm_handler_calling_sys_exit_still_stops_nats_server(tmp_path, membershipd_factory, pythonpath):
    """A plugin installs ``signal.signal(SIGTERM, lambda *a: sys.exit(0))`` over the
    daemon's handler. SIGTERM: exit 0 at once, and nats-server is gone."""
    data_dir = _node(tmp_path)
    proc = membershipd_factory(*_plugin_args("sigexit_plugin"), env=pythonpath, data_dir=data_dir)
    rc, took, nats = _sigterm(proc)
    assert rc == 0 and took <= STOP_BUDGET + SLACK, (rc, took)
    wait_gone(nats)
    assert nats_server_pids(data_dir) == set()


def test_sigkill_of_nats_server_as_the_stop_begins(tmp_path, membershipd_factory):
    """The operator (or the OOM killer): SIGTERM to membershipd, SIGKILL to nats-server
    right after, while the supervisor would restart it. Exit 0 within the budget, and
    no nats-server of this data dir is left (no restart outlives the stop)."""
    data_dir = _node(tmp_path)
    proc = membershipd_factory(data_dir=data_dir)
    nats = proc.nats_pid()
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    os.kill(nats, signal.SIGKILL)
    rc = proc.wait(15)
    assert rc == 0 and time.monotonic() - started <= STOP_BUDGET + SLACK, (rc, proc.log_text()[-2000:])
    wait_gone(nats)
    assert nats_server_pids(data_dir) == set()


def test_sigkill_of_nats_server_just_before_sigterm(tmp_path, membershipd_factory):
    """nats-server SIGKILLed 0.3 s before SIGTERM: the supervisor is restarting it when
    the stop begins. Exit 0 within the budget, no nats-server left."""
    data_dir = _node(tmp_path)
    proc = membershipd_factory(data_dir=data_dir)
    os.kill(proc.nats_pid(), signal.SIGKILL)
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(15)
    assert rc == 0 and time.monotonic() - started <= STOP_BUDGET + SLACK, (rc, proc.log_text()[-2000:])
    deadline = time.monotonic() + 5
    while nats_server_pids(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nats_server_pids(data_dir) == set()


def test_sigint_then_a_storm_of_sigterm_and_sighup(tmp_path, membershipd_factory):
    """The operator: Ctrl-C, then SIGTERM and SIGHUP every 10 ms during the stop: exit 0,
    nats-server gone, no traceback."""
    proc = membershipd_factory(data_dir=_node(tmp_path))
    nats = proc.nats_pid()
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    for _ in range(30):
        time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGHUP)
    rc = proc.wait(15)
    assert rc == 0 and time.monotonic() - started <= STOP_BUDGET + SLACK
    wait_gone(nats)
    assert "Traceback" not in proc.log_text()


@pytest.mark.slow
def test_a_room_deletion_in_flight_gives_up_and_the_next_start_cleans_it(tmp_path, membershipd_factory):
    """A member deletes a big room (``DELETE /v1/rooms/{id}`` waits for its blobs to go)
    and SIGTERM arrives while the blobs are being removed. The HTTP step gives up on the
    request after 2 s, the blobstore's shutdown stops the removal between two
    directories, exit 0 within the budget. After a restart the room is gone (its deletion
    was committed before the blobs went), no blob is counted, no room directory is left
    and ``.tmp`` is empty. The room: 20 blobs through the API, one of them padded with
    40,000 empty directories so the removal outlasts the HTTP step here."""
    alice = generate_identity("alice")
    data_dir = _node(tmp_path, alice)
    proc = membershipd_factory(data_dir=data_dir)
    rid = asyncio.run(_room_with_blobs(proc, alice, 20))
    room_dir = data_dir / "blobs" / rid
    _many_dirs(next(p for p in room_dir.iterdir() if p.is_dir()) / "pad", 40_000)
    tmp = data_dir / "blobs" / ".tmp"
    answer: dict[str, object] = {}

    def delete() -> None:
        try:
            answer["r"] = SignedClient(proc.base_url, alice).delete(f"/v1/rooms/{rid}")
        except Exception as e:  # noqa: BLE001 - the connection may be cut by the stop
            answer["r"] = e

    deleter = threading.Thread(target=delete, name="stop-r2-delete", daemon=True)
    deleter.start()
    deadline = time.monotonic() + 10
    while not any(p.name.startswith("del-") for p in tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert not room_dir.exists()
    time.sleep(0.2)
    rc, took, nats = _sigterm(proc)
    deleter.join(10)
    assert rc == 0 and took <= STOP_BUDGET + SLACK, (rc, took, proc.log_text()[-2000:])
    wait_gone(nats)
    assert "left behind" not in proc.log_text()
    again = proc.again().start()
    status, health = again.healthz()
    assert status == 200 and health["blobstore"]["blobs"] == 0, health
    assert rid not in room_ids(again, alice)
    assert not room_dir.exists()
    assert list(tmp.iterdir()) == [], list(tmp.iterdir())
