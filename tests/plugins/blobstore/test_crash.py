"""kill -9 of membershipd in the middle of an upload, then a restart on the same data dir."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from pathlib import Path

from unibus.client import UnibusClient
from unibus.client.blobs import get_raw_blob, put_raw_blob
from unibus.plugins.blobstore.backend import WRITE_CHUNK, WRITEBACK_EVERY
from unibus.testing import MembershipdProcess, http_json

from .conftest import raw_request, start_world


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def kill_9(server: MembershipdProcess) -> None:
    """SIGKILL membershipd (no shutdown hook runs) and the nats-server it left behind."""
    nats = server.nats_pid()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    if nats is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(nats, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _gone(nats) and time.monotonic() < deadline:
            time.sleep(0.02)


async def test_kill_9_during_an_upload_leaves_no_partial_blob(tmp_path):
    data_dir = tmp_path / "daemon"
    server, people = start_world(data_dir)
    again = None
    try:
        async with UnibusClient(server.base_url, people["bob"]) as bob:
            rid = (await bob.create_room("crash"))["room_id"]
            done = tmp_path / "done"
            done.write_bytes(os.urandom(123_456))
            committed = await put_raw_blob(bob, rid, done)

            # 13 MiB before the stall, three hand-offs to the writer (WRITE_CHUNK, 4 MiB) on disk:
            # past the first early writeback (WRITEBACK_EVERY, 8 MiB), which must not make any
            # of it visible either.
            assert WRITEBACK_EVERY < 9 * 1024 * 1024 <= 3 * WRITE_CHUNK
            first = os.urandom(3 * WRITE_CHUNK + 1024 * 1024)
            whole = first + os.urandom(6 * 1024 * 1024)
            stall = asyncio.Event()

            async def body():
                yield first
                await stall.wait()  # never set: the daemon dies while waiting for the rest

            upload = asyncio.create_task(raw_request(
                server.base_url, "PUT", f"/v1/rooms/{rid}/blobs", people["bob"], body=body(), digest_of=whole,
                headers={"Content-Length": str(len(whole))}))
            staging = data_dir / "blobs" / ".tmp"
            deadline = time.monotonic() + 30
            partial = []
            while time.monotonic() < deadline:
                partial = [p for p in staging.glob("up-*/data") if p.stat().st_size >= 9 * 1024 * 1024]
                if partial:
                    break
                await asyncio.sleep(0.02)
            assert partial, "the upload never reached the disk"
            kill_9(server)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(upload, 10)
            upload.cancel()
            assert list(staging.iterdir()), "the crash left its partial upload in the staging directory"

        again = MembershipdProcess(data_dir).start()
        assert list((data_dir / "blobs" / ".tmp").iterdir()) == []  # cleaned at start-up
        status, health = http_json("GET", again.base_url + "/healthz")
        assert status == 200
        assert health["blobstore"] == {"backend": "fs", "blobs": 1, "bytes": 123_456}
        assert sorted(p.name for p in (data_dir / "blobs" / rid).iterdir()) == [committed]
        async with UnibusClient(again.base_url, people["bob"]) as bob:
            out = tmp_path / "out"
            await get_raw_blob(bob, rid, committed, out)
            assert out.read_bytes() == done.read_bytes()
            status, _doc, _ = await raw_request(again.base_url, "GET",
                                               f"/v1/rooms/{rid}/blobs/{hashlib.sha256(whole).hexdigest()}",
                                               people["bob"], sign="no-digest")
            assert status == 404
            # and uploads work again, the interrupted one included
            src = tmp_path / "whole"
            src.write_bytes(whole)
            assert await put_raw_blob(bob, rid, src) == hashlib.sha256(whole).hexdigest()
    finally:
        server.stop()
        if again is not None:
            again.stop()
