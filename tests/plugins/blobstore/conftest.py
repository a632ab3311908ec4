"""Fixtures of the blobstore tests: a real daemon with four members, and raw signed HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from unibus.client import UnibusClient
from unibus.client.blobs import sign_streamed_request
from unibus.client.keys import Identity, generate_identity
from unibus.signing import sign_request
from unibus.testing import MembershipdProcess, bootstrap_member

#: The limit the shared daemon runs with: odd on purpose, a little over 3 MiB.
MAX_BYTES = 3 * 1024 * 1024 + 17
#: The shared daemon's body deadline (UNIBUS_BODY_TIMEOUT): a stalled upload is 408 after it.
BODY_TIMEOUT = 3


@dataclass
class World:
    server: MembershipdProcess
    people: dict[str, Identity]
    clients: dict[str, UnibusClient] = field(default_factory=dict)

    @property
    def blobs_dir(self) -> Path:
        return self.server.data_dir / "blobs"

    def staging(self) -> list[str]:
        tmp = self.blobs_dir / ".tmp"
        return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []

    def stored(self, room_id: str) -> list[str]:
        d = self.blobs_dir / room_id
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def blobstore_health(self) -> dict[str, Any]:
        status, body = self.server.healthz()
        assert status == 200, body
        return body["blobstore"]

    async def room(self, owner: str = "bob", members: tuple[str, ...] = ("carol",), keyed: bool = True) -> str:
        c = self.clients
        rid = (await c[owner].create_room("blobs"))["room_id"]
        for h in members:
            await c[owner].add_room_member(rid, h)
        if keyed:
            await c[owner].rekey(rid)
        return rid


def start_world(data_dir: Path, *args: str,
                env: dict[str, str] | None = None) -> tuple[MembershipdProcess, dict[str, Identity]]:
    people = {"alice": generate_identity("alice"), "bob": generate_identity("bob"),
              "carol": generate_identity("carol"), "dave": generate_identity("dave")}
    bootstrap_member(data_dir, people["alice"], "admin")
    server = MembershipdProcess(data_dir, args, env).start()

    async def add_members() -> None:
        async with UnibusClient(server.base_url, people["alice"]) as admin:
            for h in ("bob", "carol", "dave"):
                i = people[h]
                await admin.add_member(h, i.sign_pub_b64, i.enc_pub_b64, i.enc_suite, bus_pub=i.bus_pub)

    # In a thread of its own: a fixture may run while an event loop is running.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, add_members()).result(60)
        except BaseException:
            server.stop()
            raise
    return server, people


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon (``--blob-max-bytes MAX_BYTES``) for the module; each test makes its own rooms."""
    server, people = start_world(tmp_path_factory.mktemp("blobs") / "daemon", "--blob-max-bytes", str(MAX_BYTES),
                                 env={"UNIBUS_BODY_TIMEOUT": str(BODY_TIMEOUT)})
    try:
        yield server, people
    finally:
        server.stop()


@pytest.fixture
async def world(shared_daemon) -> AsyncIterator[World]:
    server, people = shared_daemon
    w = World(server, people, {h: UnibusClient(server.base_url, i) for h, i in people.items()})
    try:
        yield w
    finally:
        for c in w.clients.values():
            await c.close()


async def raw_request(base_url: str, method: str, target: str, identity: Identity | None, *,
                      body: Any = None, digest_of: bytes | None = None, headers: dict[str, str] | None = None,
                      sign: str = "streamed") -> tuple[int, Any, Any]:
    """One request with full control: ``sign`` is ``"streamed"`` (Content-Digest of
    ``digest_of`` or of ``body``), ``"no-digest"`` (signature covers no digest) or ``"none"``.
    ``body`` may be bytes or an async iterator (sent chunked unless a Content-Length is given)."""
    h: dict[str, str] = {}
    if sign == "streamed":
        if digest_of is None:
            assert isinstance(body, (bytes, type(None)))
            digest_of = body or b""
        h.update(sign_streamed_request(method, target, hashlib.sha256(digest_of).digest(),
                                       keyid=identity.handle, private_key=identity.sign_key))
    elif sign == "no-digest":
        h.update(sign_request(method, target, None, keyid=identity.handle, private_key=identity.sign_key))
    h.update(headers or {})
    async with aiohttp.ClientSession() as s:
        import yarl

        async with s.request(method, yarl.URL(base_url + target, encoded=True), data=body, headers=h) as r:
            raw = await r.read()
            ctype = r.headers.get("Content-Type", "")
            doc: Any = raw
            if "json" in ctype:
                import json

                doc = json.loads(raw)
            return r.status, doc, r.headers


async def agen(pieces):
    for p in pieces:
        await asyncio.sleep(0)
        yield p


class _SecondThreadStartFails(concurrent.futures.ThreadPoolExecutor):
    """An executor whose second thread start fails, as ``Thread.start`` does at the process's
    thread limit: ``submit`` has queued the job by then, so it runs once a busy thread is free."""

    starts = 0

    def _adjust_thread_count(self) -> None:
        self.starts += 1
        if self.starts == 2:
            raise RuntimeError("can't start new thread")
        super()._adjust_thread_count()


@pytest.fixture
async def second_thread_start_fails() -> concurrent.futures.ThreadPoolExecutor:
    """The test's event loop gets :class:`_SecondThreadStartFails` as its default executor
    (shut down with the loop). CPython's ``ThreadPoolExecutor`` starts its threads in
    ``_adjust_thread_count``; a Python that does not would make the tests using this fail here,
    not pass without testing anything."""
    assert hasattr(concurrent.futures.ThreadPoolExecutor, "_adjust_thread_count"), \
        "ThreadPoolExecutor no longer starts its threads in _adjust_thread_count: update this fixture"
    executor = _SecondThreadStartFails(max_workers=4)
    asyncio.get_running_loop().set_default_executor(executor)
    return executor
