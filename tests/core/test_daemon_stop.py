"""SIGTERM stops membershipd within its budget whatever a plugin does (docs/operations.md,
"Signals"): each step of the stop is a hard bound, nats-server is stopped all the same,
and a stop that still hangs ends in the watchdog's stack dump and exit 1."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess

import pytest
from helpers import plugin_modules, wait_gone

MODULES = {
    # a shutdown hook that ignores its cancellation: given up after the plugins' 5 s
    "stubborn_plugin": '''
        import asyncio
        from unibus import hookimpl

        PLUGIN_NAME = "stubborn"

        @hookimpl
        async def startup(app):  # started last of all, so shut down first
            pass

        @hookimpl
        async def shutdown(app):
            while True:
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    pass
    ''',
    # shut down after the stubborn one: it must still be called
    "after_plugin": '''
        import logging
        from unibus import hookimpl

        PLUGIN_NAME = "after"

        @hookimpl
        async def shutdown(app):
            logging.getLogger("unibus.plugins.after").warning("after: shut down")
    ''',
    # a shutdown hook that lets a CancelledError of its own out (t.cancel(); await t)
    "selfcancel_plugin": '''
        import asyncio
        from unibus import hookimpl

        PLUGIN_NAME = "selfcancel"

        @hookimpl
        async def startup(app):
            pass

        @hookimpl
        async def shutdown(app):
            t = asyncio.get_running_loop().create_task(asyncio.sleep(60))
            await asyncio.sleep(0)
            t.cancel()
            await t
    ''',
    # a task of its own that ignores its cancellation, never stopped: left at the loop's clean-up
    "stray_plugin": '''
        import asyncio
        from unibus import hookimpl

        PLUGIN_NAME = "stray"
        TASKS = set()

        async def linger():
            while True:
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    pass

        @hookimpl
        async def startup(app):
            TASKS.add(asyncio.get_running_loop().create_task(linger(), name="stray-linger"))
    ''',
    # a worker-thread job still running when the loop closes: the executor's shutdown overruns its bound
    "busy_executor_plugin": '''
        import asyncio
        import time
        from unibus import hookimpl

        PLUGIN_NAME = "busyexecutor"
        JOBS = []

        @hookimpl
        async def shutdown(app):
            JOBS.append(asyncio.get_running_loop().run_in_executor(None, time.sleep, 2.5))
    ''',
    # a route whose handler blocks the event loop (says so in a file first): the stop signal lands
    # while it blocks, so no handler of the loop's runs before the watchdog fires
    "blocking_route_plugin": '''
        import os
        import time
        from pathlib import Path
        from aiohttp import web
        from unibus import hookimpl
        from unibus.app import add_route

        PLUGIN_NAME = "blockingroute"

        async def blocks(request):
            Path(os.environ["BLOCKING_MARKER"]).write_text("blocking")
            time.sleep(60)
            return web.json_response({})

        @hookimpl
        async def startup(app):
            add_route(app, "GET", "/blocks", blocks, summary="blocks the loop", responses={200: "never"},
                      signed=False, namespaced=False)
    ''',
    # a shutdown hook that blocks the event loop: only the watchdog ends that
    "blocking_plugin": '''
        import time
        from unibus import hookimpl

        PLUGIN_NAME = "blocking"

        @hookimpl
        def shutdown(app):
            time.sleep(60)
    ''',
}


@pytest.fixture(scope="module")
def pythonpath(tmp_path_factory) -> dict[str, str]:
    return plugin_modules(tmp_path_factory.mktemp("stop-plugins"), MODULES)


def test_a_shutdown_hook_that_ignores_its_cancellation_is_left_behind(membershipd_factory, pythonpath):
    proc = membershipd_factory("--plugin", "after_plugin", "--plugin", "stubborn_plugin", env=pythonpath)
    nats = proc.nats_pid()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=12) == 0  # the budget is 10 s, 11 s for code that ignores its cancellation (a bound, not a benchmark)
    wait_gone(nats)
    log = proc.log_text()
    assert re.search(r"plugin stubborn: shutdown did not finish in time and ignores its cancellation; "
                     r"left behind: task .* in shutdown", log), log[-3000:]
    assert "at exit: a task ignores its cancellation, left behind" in log
    assert "after: shut down" in log  # the hooks after it are still called
    assert re.search(r"stopped in \d+\.\d s", log)
    assert "Traceback" not in log


def test_a_shutdown_hook_that_lets_its_own_cancellation_out_does_not_end_the_stop(membershipd_factory,
                                                                                   pythonpath):
    proc = membershipd_factory("--plugin", "after_plugin", "--plugin", "selfcancel_plugin", env=pythonpath)
    nats = proc.nats_pid()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=12) == 0
    wait_gone(nats)
    log = proc.log_text()
    assert "plugin selfcancel: shutdown failed: RuntimeError: it ended with CancelledError, uncaught" in log, \
        log[-3000:]
    assert "after: shut down" in log and re.search(r"stopped in \d+\.\d s", log)


def test_a_task_that_ignores_its_cancellation_does_not_hold_up_the_exit(membershipd_factory, pythonpath):
    proc = membershipd_factory("--plugin", "stray_plugin", env=pythonpath)
    nats = proc.nats_pid()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=12) == 0
    wait_gone(nats)
    log = proc.log_text()
    assert re.search(r"at exit: a task ignores its cancellation, left behind: task 'stray-linger' at "
                     r".*stray_plugin\.py:\d+ in linger", log), log[-3000:]


def test_a_worker_thread_past_the_loop_s_close_is_named_and_leaves_no_pending_task(membershipd_factory, pythonpath):
    """The default executor's shutdown ran as a task: overrunning its 1 s bound, it was left pending at
    the loop's close, and asyncio logged "Task was destroyed but it is pending!" (a red team)."""
    proc = membershipd_factory("--plugin", "busy_executor_plugin", env=pythonpath)
    nats = proc.nats_pid()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=12) == 0  # the interpreter's exit waits for the job (2.5 s)
    wait_gone(nats)
    log = proc.log_text()
    assert "at exit: the default executor did not finish within 1 s" in log, log[-3000:]
    assert "Task was destroyed" not in log, log[-3000:]


@pytest.mark.slow
def test_a_stop_that_blocks_the_event_loop_ends_in_the_watchdog(membershipd_factory, pythonpath):
    proc = membershipd_factory("--plugin", "blocking_plugin", env=pythonpath)
    nats = proc.nats_pid()
    proc.send_signal(signal.SIGTERM)
    # 13 s after the signal (STOP_WATCHDOG), before the unit's TimeoutStopSec=15
    assert proc.wait(timeout=20) == 1
    log = proc.log_text()
    assert "Timeout (0:00:13)!" in log, log[-3000:]  # faulthandler's dump: every thread's stack
    assert re.search(r'File ".*blocking_plugin\.py", line \d+ in shutdown', log), log[-3000:]
    wait_gone(nats)  # PR_SET_PDEATHSIG: the child gets SIGTERM when membershipd is gone


def _thread_signals(pid: int) -> dict[str, str]:
    """Each thread's state, pending and blocked signals (from /proc), for a failure's message."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            status = dict(line.split(":\t", 1) for line in
                          open(f"/proc/{pid}/task/{tid}/status").read().splitlines() if ":\t" in line)
            out[tid] = " ".join(f"{k}={status.get(k, '?').strip()}" for k in ("State", "SigPnd", "ShdPnd", "SigBlk"))
    return out


@pytest.mark.slow
def test_a_stop_signal_while_a_handler_blocks_the_event_loop_ends_in_the_watchdog(tmp_path, membershipd_factory,
                                                                                pythonpath):
    """The watchdog was armed by a handler of the loop's, which runs only when the loop turns: a
    signal that came while a plugin's handler blocked the loop left the process running (found by a
    plugin author's walkthrough: still there 30 s later). Now the signal arms it at once."""
    import threading
    import time
    import urllib.request

    marker = tmp_path / "blocking"
    proc = membershipd_factory("--plugin", "blocking_route_plugin", env={**pythonpath,
                                                                         "BLOCKING_MARKER": str(marker)})
    nats = proc.nats_pid()

    def request() -> None:
        with contextlib.suppress(OSError):  # the answer never comes: the process exits under it
            urllib.request.urlopen(proc.base_url + "/blocks", timeout=30)

    caller = threading.Thread(target=request, daemon=True)
    caller.start()
    deadline = time.monotonic() + 15
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.log_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=20) == 1
    except subprocess.TimeoutExpired:  # failed once in a full run, not reproduced: say what the process was doing
        raise AssertionError(f"still running 20 s after SIGTERM; threads: {_thread_signals(proc.pid)}; "
                             f"log: {proc.log_text()[-3000:]}") from None
    log = proc.log_text()
    assert "Timeout (0:00:13)!" in log, log[-3000:]
    assert re.search(r'File ".*blocking_route_plugin\.py", line \d+ in blocks', log), log[-3000:]
    wait_gone(nats)
    caller.join(timeout=35)
