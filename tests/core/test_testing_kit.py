"""unibus.testing itself: tracked restarts, PID-safe teardown (docs/plugins.md, "Testing")."""

from __future__ import annotations

import os
import select
import signal

from unibus.testing import MembershipdProcess, nats_server_pids, signal_pidfd


def test_restarts_are_tracked_and_all_stopped(tmp_path):
    first = MembershipdProcess(tmp_path / "d", ["--bus-auth", "off"]).start()
    try:
        second = first.restart()
        assert second.healthz()[0] == 200
        third = second.again()  # made, never started: nothing to stop
        assert first.family == [first, second, third] and first.restarts == 1
        assert second.family is first.family
    finally:
        for p in first.family:
            p.stop()
    assert not nats_server_pids(tmp_path)


def test_a_pidfd_never_signals_a_reused_pid(tmp_path):
    daemon = MembershipdProcess(tmp_path / "d", ["--bus-auth", "off"]).start()
    try:
        fd = daemon.nats_handle()
        assert fd is not None
        try:
            assert signal_pidfd(fd, signal.SIGKILL)  # the nats-server it names: killed (the supervisor restarts one)
            readable, _, _ = select.select([fd], [], [], 10)  # a pidfd is readable once its process exited
            assert readable == [fd]
            new_fd = None
            for _ in range(200):  # the supervisor reaped it and started another (bounded wait)
                new_fd = daemon.nats_handle()
                if new_fd is not None:
                    break
                select.select([], [], [], 0.05)
            assert new_fd is not None
            os.close(new_fd)
            # whatever process now has that pid, the descriptor still names the dead one
            assert signal_pidfd(fd, signal.SIGKILL) is False
        finally:
            os.close(fd)
        assert daemon.wait_healthy()["nats"]["restarts"] >= 1
    finally:
        daemon.stop()
    assert daemon.nats_handle() is None and daemon.nats_pid() is None  # nothing to signal once it exited
    assert not nats_server_pids(tmp_path)
