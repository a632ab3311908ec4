"""The compromised server of the red-team tests on the client (test_attack_e2e_r*.py).

:class:`Proxy` is a real aiohttp reverse proxy in front of a real membershipd:
it forwards each request, can answer chosen requests itself (serving a log it
extended with a request it held back, as a server that owns the store can) or
rewrite JSON answers. ``world`` is one daemon per test module (real nats-server,
real SQLite) with alice (admin), bob, carol and mallory.
"""


from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yarl
from aiohttp import web

from unibus import forkrun
from unibus.client import LogVerificationError, UnibusClient
from unibus.client.keys import generate_identity, save_identity
from unibus.memberlog import entry_hash
from unibus.signing import _signature_base, content_digest, sign_request
from unibus.testing import MembershipdProcess, bootstrap_member, free_port

Answer = Callable[[web.Request, bytes], Any]  # (status, doc), None, or a coroutine giving either
Rule = Callable[[str, str, str, Any], Any]


# --------------------------------------------------------------------------- the compromised server


class Proxy:
    """A reverse proxy in front of the daemon. ``answer(request, body)`` may answer ``(status, doc)``
    itself; otherwise the request is forwarded and each ``rule(method, path, query, doc)`` may
    rewrite a JSON answer."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.answer: Answer | None = None
        self.rules: list[Rule] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self) -> Proxy:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.session.close()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        answer = self.answer(request, body) if self.answer else None
        if asyncio.iscoroutine(answer):
            answer = await answer
        if answer is not None:
            ctype = "application/json" if 200 <= answer[0] < 300 else "application/problem+json"
            return web.Response(status=answer[0], text=json.dumps(answer[1]), content_type=ctype)
        keep = ("signature", "signature-input", "content-digest", "content-type")
        headers = {k: v for k, v in request.headers.items() if k.lower() in keep}
        url = yarl.URL(self.upstream + request.raw_path, encoded=True)
        async with self.session.request(request.method, url, data=body or None, headers=headers) as resp:
            raw, status = await resp.read(), resp.status
            ctype = resp.headers.get("Content-Type", "application/octet-stream").split(";")[0]
        path, _, query = request.raw_path.partition("?")
        if raw and "json" in ctype and 200 <= status < 300:
            doc = json.loads(raw)
            for rule in self.rules:
                new = rule(request.method, path, query, doc)
                if new is not None:
                    doc = new
                    raw = json.dumps(doc).encode()
        return web.Response(status=status, body=raw, content_type=ctype)


def keyid(request: web.Request) -> str | None:
    found = re.search(r'keyid="([^"]+)"', request.headers.get("Signature-Input", ""))
    return found.group(1) if found else None


def serve_log(entries: list[dict[str, Any]]) -> Answer:
    """Answer ``GET /v1/log/head`` and ``GET /v1/log`` with ``entries`` (a log the server made up)."""
    head = {"seq": entries[-1]["seq"], "hash": entry_hash(entries[-1])}

    def answer(request: web.Request, _body: bytes) -> tuple[int, Any] | None:
        if request.method != "GET":
            return None
        if request.path == "/v1/log/head":
            return 200, head
        if request.path == "/v1/log":
            q = urllib.parse.parse_qs(request.query_string)
            after = int(q.get("after", ["-1"])[0])
            limit = int(q.get("limit", ["500"])[0])
            return 200, {"entries": [e for e in entries if e["seq"] > after][:limit], "head": head}
        return None

    return answer


@contextlib.asynccontextmanager
async def serving(handler: Any) -> AsyncIterator[str]:
    """An aiohttp server on a free loopback port answering every path with ``handler``; yields its URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_proxy(world: World) -> AsyncIterator[Proxy]:
    """A :class:`Proxy` in front of ``world``'s daemon, stopped on the way out (the ``proxy`` fixture)."""
    p = await Proxy(world.daemon.base_url).start()
    try:
        yield p
    finally:
        await p.stop()


# --------------------------------------------------------------------------- the world


class World:
    def __init__(self, daemon: MembershipdProcess, people: dict[str, Any]) -> None:
        self.daemon = daemon
        self.people = people

    def sdk(self, handle: str, server: str | None = None, identity: Any = None,
            replica: Path | None = None) -> UnibusClient:
        return UnibusClient(server or self.daemon.base_url, identity or self.people[handle], replica_root=replica,
                            notice=lambda _text: None, timeout=15)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.daemon.data_dir / "membershipd.db")


def worlds(tmp_path_factory: Any) -> Iterator[World]:
    """One daemon and four members for a test module (the ``world`` fixture); stopped on the way out.
    bob's keys are MLKEM768_X25519, the others' X25519."""
    people = {"alice": generate_identity("alice"), "bob": generate_identity("bob", "MLKEM768_X25519"),
              "carol": generate_identity("carol"), "mallory": generate_identity("mallory")}
    data_dir = tmp_path_factory.mktemp("attack") / "daemon"
    bootstrap_member(data_dir, people["alice"], "admin")
    daemon = MembershipdProcess(data_dir).start()
    w = World(daemon, people)

    async def members() -> None:
        async with w.sdk("alice") as a:
            for h in ("bob", "carol", "mallory"):
                await add(a, people[h])

    try:
        asyncio.run(members())
        yield w
    finally:
        daemon.stop()


async def add(admin: UnibusClient, ident: Any, role: str = "member") -> None:
    r = ident.public_record()
    await admin.add_member(ident.handle, r["sign_pub"], r["enc_pub"], r["enc_suite"], role=role,
                           bus_pub=r["bus_pub"])


async def new_room(world: World, *handles: str, rekey: bool = True) -> str:
    async with world.sdk("alice") as a:
        rid = (await a.create_room("r"))["room_id"]
        for h in handles:
            await a.add_room_member(rid, h)
        if rekey:
            await a.rekey(rid)
    return rid


async def publish_raw(bus: Any, subject: str, payload: bytes, headers: dict[str, str]) -> None:
    """Publish, and return once nats-server has processed it (so what another connection
    publishes next arrives after it), a reconnect under way waited for, as ``Bus.send`` does: a
    CI run's module-wide daemon kicked mallory's bus (the sweep of an earlier test's removal),
    two bare flushes returned while it reconnected, and her replay reached the listener after
    the message alice published next."""
    nc = await bus.connected()
    await nc.publish(subject, payload, headers=headers)
    await bus._processed(nc)


async def subscribe_raw(bus: Any, subject: str, cb: Callable[[Any], Any]) -> Any:
    """A raw nats-py subscription on ``bus``, returned once nats-server has it (a reconnect under
    way waited for, as :func:`publish_raw` does)."""
    nc = await bus.connected()
    sub = await nc.subscribe(subject, cb=cb)
    await bus._processed(nc)
    return sub


def cli(server: str, identity: Any, home: Path) -> Callable[..., Any]:
    """``await unibus(*args)``: the real ``unibus`` CLI as ``identity`` (saved in ``home``, made
    0700, whose ``<identity>.log`` holds its replica) against ``server``, with no ``UNIBUS_*``
    of the environment; a ``CompletedProcess`` (text). It runs in a thread, since the proxy runs
    on the test's loop. ``unibus.argv`` and ``unibus.env`` start a process the test drives."""
    home.mkdir(mode=0o700, exist_ok=True)
    path = save_identity(identity, home / f"{identity.handle}.json", force=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}

    argv = [sys.executable, "-m", "unibus.client.cli", "--server", server, "--identity", str(path)]

    async def unibus(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(forkrun.run, "unibus.client.cli", [*argv[3:], *args], env=env)

    unibus.argv, unibus.env = argv, env  # for a process the test drives itself
    return unibus


# --------------------------------------------------------------------------- a log of its own


TIMEOUT = aiohttp.ClientTimeout(total=15)


def fresh_daemon(tmp_path: Path, *args: str) -> MembershipdProcess:
    """A daemon of its own, with alice (admin) bootstrapped and bob and carol made (not added), as
    ``proc.people``: a test that may break the log gets a log of its own (the ``daemon`` fixture)."""
    people = {h: generate_identity(h) for h in ("alice", "bob", "carol")}
    bootstrap_member(tmp_path / "daemon", people["alice"], "admin")
    proc = MembershipdProcess(tmp_path / "daemon", args=list(args)).start()
    proc.people = people  # type: ignore[attr-defined]
    return proc


async def send(base: str, ident: Any, method: str, path: str, body: Any = None, *,
               cover: dict[str, str] | None = None, created: int | None = None) -> tuple[int, str]:
    """A real signed request. ``cover``: extra request headers the signature also covers
    (RFC 9421 allows covering any header field; the server's verifier accepts it)."""
    data = None if body is None else json.dumps(body).encode()
    if cover is None:
        headers = sign_request(method, path, data, keyid=ident.handle, private_key=ident.sign_key, created=created)
    else:
        created = created or int(time.time())
        nonce = secrets.token_urlsafe(24)
        components = ["@method", "@path", "@query"]
        values = {"@method": method, "@path": path, "@query": "?"}
        headers = {}
        if data is not None:
            headers["Content-Digest"] = values["content-digest"] = content_digest(data)
            components.append("content-digest")
        for name, value in cover.items():
            components.append(name)
            values[name] = headers[name] = value
        params = ("(" + " ".join(f'"{c}"' for c in components) + f');created={created};nonce="{nonce}"'
                  f';keyid="{ident.handle}";alg="ed25519"')
        signature = ident.sign_key.sign(_signature_base([(c, values[c]) for c in components], params))
        headers["Signature-Input"] = "sig1=" + params
        headers["Signature"] = "sig1=:" + base64.b64encode(signature).decode() + ":"
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.request(method, yarl.URL(base + path, encoded=True), data=data, headers=headers) as r:
            return r.status, await r.text()


async def verification_error(base: str, ident: Any) -> str | None:
    """What a fresh client's full verification of the log says (None: it verifies)."""
    async with UnibusClient(base, ident, notice=lambda _t: None) as c:
        try:
            await c.verify_log()
        except LogVerificationError as e:
            return str(e)
    return None
