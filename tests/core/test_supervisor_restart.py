"""The supervisor checks again before it restarts nats-server (docs/operations.md, "Posture and the cluster gate").

Adversary: whoever swaps a file the start-up checks passed (the route CA replaced by the client CA,
an expired route certificate) and waits for nats-server to crash: the restart read the files as they
are now, unchecked, while the posture still said ``mtls``."""

from __future__ import annotations

import logging
import threading
import time

from unibus.errors import ConfigError


def test_nats_server_stays_down_while_the_checks_fail_and_restarts_once_they_pass(nats_server, caplog):
    caplog.set_level(logging.ERROR, logger="unibus.supervisor")
    broken = threading.Event()
    broken.set()
    calls: list[float] = []

    def checks() -> None:
        calls.append(time.monotonic())
        if broken.is_set():
            raise ConfigError("--route-tls-ca is the client CA (--tls-ca); routes need a dedicated route CA")

    nats_server.supervisor.before_restart = checks
    nats_server.wait_running()
    pid = nats_server.pid
    nats_server.kill()
    deadline = time.monotonic() + 30
    while len(calls) < 3 and time.monotonic() < deadline:  # three refusals, each after its backoff
        time.sleep(0.05)
    assert len(calls) >= 3, calls
    assert nats_server.pid is None and nats_server.restarts == 0
    assert "nats-server not restarted: --route-tls-ca is the client CA" in caplog.text
    broken.clear()
    nats_server.wait_running()
    assert nats_server.restarts == 1 and nats_server.pid not in (None, pid)


def test_the_daemon_checks_its_plugins_again_before_nats_server_restarts(tmp_path, membershipd_factory):
    """membershipd's restarts run every plugin's validate_settings first (route_tls checks the route
    certificates and CA there); while one refuses, nats-server stays down and /healthz says so."""
    import os
    import signal

    from helpers import plugin_modules, wait_gone

    marker = tmp_path / "files-swapped"
    (tmp_path / "mods").mkdir()
    env = plugin_modules(tmp_path / "mods", {"checks_files": f'''
        from pathlib import Path
        from unibus import hookimpl
        from unibus.errors import ConfigError

        PLUGIN_NAME = "checks_files"

        @hookimpl
        def validate_settings(settings):
            if Path({str(marker)!r}).exists():
                raise ConfigError("--some-cert: the file changed since start-up and fails its checks")
    '''})
    proc = membershipd_factory("--plugin", "checks_files", env=env)
    pid = proc.nats_pid()
    assert pid
    marker.touch()
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    body = proc.wait_healthy(want=503, timeout=20)
    assert body["status"] == "degraded"
    deadline = time.monotonic() + 20
    while "nats-server not restarted" not in proc.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "nats-server not restarted: plugin checks_files" in proc.log_text(), proc.log_text()[-2000:]
    assert "the file changed since start-up" in proc.log_text()
    assert proc.nats_pid() is None
    marker.unlink()
    body = proc.wait_healthy(want=200, timeout=30)
    assert body["nats"]["restarts"] == 1 and proc.nats_pid() not in (None, pid)


def test_failed_restarts_back_off_after_a_long_run(nats_server, caplog):
    """A nats-server that ran for a while, then cannot start again (its port taken): the delay
    doubles from try to try. It stayed at 0.2 s, since the start time of the long run counted
    for every failed try (found by an operations audit: 87 tries, 3 ERROR lines each)."""
    import re
    import socket

    caplog.set_level(logging.ERROR, logger="unibus.supervisor")
    nats_server.wait_running()
    nats_server.supervisor.started_at -= 60  # as if it had run for a minute
    taker = socket.socket()
    try:
        nats_server.kill()
        deadline = time.monotonic() + 30
        while nats_server.pid is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taker.bind(("127.0.0.1", nats_server.port))
        taker.listen()
        delays: list[float] = []
        while len(delays) < 4 and time.monotonic() < deadline:
            delays = [float(d) for d in re.findall(r"nats-server exited with \S+; restarting in ([0-9.]+) s",
                                                    caplog.text)]
            time.sleep(0.05)
    finally:
        taker.close()
    first = nats_server.supervisor.backoff_initial
    assert delays[:4] == [first, 2 * first, 4 * first, 8 * first], caplog.text
    assert "nats-server failed to start" in caplog.text
    nats_server.wait_running()  # the port is free again: it comes back
