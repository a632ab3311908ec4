"""Helpers several test files share (fixtures live in tests/conftest.py and unibus.testing)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import nats
import pytest

#: Set by .ci/run, which installs every tool a test needs (promtool, systemd-analyze,
#: strace): there a missing tool fails its tests instead of skipping them.
REQUIRE_TOOLS = os.environ.get("UNIBUS_TEST_REQUIRE_TOOLS") == "1"


@contextlib.contextmanager
def serving_cleanly(proc: Any) -> Iterator[Any]:
    """Start a ``MembershipdProcess``, yield it, stop it; then its log must hold no traceback and no
    unhandled error, whatever the tests sent it. Yields the started process."""
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
    log = proc.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]


def require_tool(missing: str | None) -> None:
    """Skip the calling test when ``missing`` says why a tool it needs cannot run here;
    under ``UNIBUS_TEST_REQUIRE_TOOLS=1`` (.ci/run) fail it instead."""
    if not missing:
        return
    if REQUIRE_TOOLS:
        pytest.fail(f"{missing}; UNIBUS_TEST_REQUIRE_TOOLS=1 says it must run here (.ci/run installs it)")
    pytest.skip(missing)


def one_error_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command exited ``code`` with exactly one ``error:`` line on stderr, holding every needle,
    and no traceback anywhere (docs/operations.md, "Exit codes"); returns that line."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@contextlib.asynccontextmanager
async def service_js(daemon: Any) -> AsyncIterator[Any]:
    """JetStream as a daemon's own service user (its nkey is a user of that node only)."""
    nc = await nats.connect(daemon.nats_url, nkeys_seed=str(daemon.data_dir / "service.nkey"), allow_reconnect=False,
                            connect_timeout=3)
    try:
        yield nc.jetstream(timeout=5)
    finally:
        await nc.close()


async def whole_log(client: Any) -> list[dict[str, Any]]:
    """Every entry of the membership log ``client`` can read, page after page.

    ``GET /v1/log`` answers at most 1,000 entries a page (docs/http-api.md), and a test
    whose writers run for as long as something else takes can pass that bound.
    """
    entries: list[dict[str, Any]] = []
    for _page in range(10_000):  # bounded: ten million entries
        page = await client.log(after=entries[-1]["seq"] if entries else None, limit=1000)
        if not page["entries"]:
            return entries
        entries += page["entries"]
    raise AssertionError("the log did not end within 10,000 pages")


def plugin_modules(directory: Path, modules: Mapping[str, str]) -> dict[str, str]:
    """Write each ``name: source`` (dedented) as ``directory/name.py``; returns the environment
    a ``membershipd --plugin name`` needs to import them."""
    for name, source in modules.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return {"PYTHONPATH": str(directory)}


@contextlib.asynccontextmanager
async def small_nonce_store(url: str, max_bytes: int = 8192) -> AsyncIterator[tuple[Any, Any]]:
    """``(bus, store)``: a started ``NonceStore`` whose bucket holds ``max_bytes``, on the nats-server at ``url``."""
    from unibus.auth import NonceStore
    from unibus.bus import Bus

    bus = Bus(url)
    await bus.connect()
    store = NonceStore(bus, skew=60, replicas=1, timeout=1.0, max_bytes=max_bytes)
    try:
        await store.ensure()
        await store.start()
        yield bus, store
    finally:
        await store.close()
        await bus.close()


async def fill_nonce_bucket(store: Any, limit: int = 1000) -> None:
    """Claim new nonces until ``store`` (a small ``NonceStore``) refuses one: its bucket is full."""
    from unibus.auth import NonceStoreUnavailable
    from unibus.signing import make_nonce

    for _ in range(limit):
        try:
            await store.claim("alice", make_nonce())
        except NonceStoreUnavailable:
            return
    raise AssertionError(f"the nonce bucket took {limit} claims")


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Until process ``pid`` has exited (a zombie counts: its parent has not reaped it yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.005)
    raise TimeoutError(f"pid {pid} still running")


def sigterm(proc: Any, timeout: float) -> tuple[int | None, float, int | None]:
    """SIGTERM to a ``MembershipdProcess``: ``(exit code, or None if it still runs after
    ``timeout``; seconds it took; the pid its nats-server had)``."""
    nats_pid = proc.nats_pid()
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
    return rc, time.monotonic() - started, nats_pid


def room_ids(proc: Any, ident: Any, timeout: float = 20.0) -> list[str]:
    """The ids of ``GET /v1/rooms`` as ``ident``. Right after a restart signed requests get
    503 until the nonce floor has passed (docs/operations.md, "Durability"): retried, bounded."""
    from unibus.testing import SignedClient

    deadline = time.monotonic() + timeout
    while True:
        status, body = SignedClient(proc.base_url, ident).get("/v1/rooms")
        if status == 200:
            return [r["room_id"] for r in body["rooms"]]
        assert status == 503 and time.monotonic() < deadline, (status, body)
        time.sleep(0.25)
