"""Red team log-r1: requests a real membershipd accepts and appends to the membership log,
after which every client's verification of the log fails (a deployment-wide denial of service).

Each test asserts the safe behaviour: either the server refuses the request, or a fresh
client still verifies the whole log (``UnibusClient.verify_log``). The first three were
holes this round found, fixed since (the server replays a logged request's signature
check before it appends, and the store checks the author's rights in the write itself).
One daemon per hole: a log broken once stays broken. Real nats-server, real SQLite.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Any

import aiohttp
import pytest
import yarl

from unibus.client import LogVerificationError, UnibusClient
from unibus.client.keys import generate_identity
from unibus.signing import _signature_base, content_digest, sign_request
from unibus.testing import MembershipdProcess, bootstrap_member

TIMEOUT = aiohttp.ClientTimeout(total=15)


def _daemon(tmp_path, *args: str):
    people = {h: generate_identity(h) for h in ("alice", "bob", "carol")}
    bootstrap_member(tmp_path / "daemon", people["alice"], "admin")
    proc = MembershipdProcess(tmp_path / "daemon", args=list(args)).start()
    proc.people = people
    return proc


@pytest.fixture
def daemon(tmp_path):
    proc = _daemon(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


async def add(admin: UnibusClient, ident: Any, role: str = "member") -> None:
    await admin.add_member(ident.handle, ident.sign_pub_b64, ident.enc_pub_b64, ident.enc_suite, role=role,
                           bus_pub=ident.bus_pub)


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


# --------------------------------------------------------------------------- holes


async def test_a_logged_request_whose_signature_covers_another_header_is_refused(daemon):
    people, base = daemon.people, daemon.base_url
    async with UnibusClient(base, people["alice"]) as a:
        await add(a, people["bob"])
    # bob, an ordinary member: one room creation whose signature also covers a header "x-a".
    status, text = await send(base, people["bob"], "POST", "/v1/rooms", {"name": "x"}, cover={"x-a": "1"})
    assert status == 400 and "non-canonical-request" in text, (status, text)
    assert await verification_error(base, people["alice"]) is None


async def test_an_owner_leaving_while_adding_a_member_cannot_break_the_log(daemon):
    people, base = daemon.people, daemon.base_url
    bob = people["bob"]
    async with UnibusClient(base, people["alice"]) as a:
        await add(a, bob)
        await add(a, people["carol"])
    async with UnibusClient(base, bob) as b:
        for _attempt in range(15):
            rid = (await b.create_room("r"))["room_id"]
            # All bob's own requests: leave the room, and add carol to it, at once.
            await asyncio.gather(send(base, bob, "PUT", f"/v1/rooms/{rid}/members/carol"),
                                 send(base, bob, "DELETE", f"/v1/rooms/{rid}/members/bob"),
                                 send(base, bob, "PUT", f"/v1/rooms/{rid}/members/carol"))
            err = await verification_error(base, people["alice"])
            assert err is None, f"every client now fails: {err}"


async def test_an_admin_demoting_itself_while_adding_a_member_cannot_break_the_log(daemon):
    people, base = daemon.people, daemon.base_url
    carol = people["carol"]
    async with UnibusClient(base, people["alice"]) as a:
        await add(a, carol, "admin")
        for n in range(15):
            new = generate_identity(f"n{n}")
            body = {"handle": new.handle, "role": "member", "sign_pub": new.sign_pub_b64, "enc_pub": new.enc_pub_b64,
                    "enc_suite": new.enc_suite, "bus_pub": new.bus_pub}
            await asyncio.gather(send(base, carol, "PATCH", "/v1/members/carol", {"role": "member"}),
                                 send(base, carol, "POST", "/v1/members", body))
            err = await verification_error(base, people["alice"])
            assert err is None, f"every client now fails: {err}"
            await a.set_role("carol", "admin")


# --------------------------------------------------------------------------- attacks that held


async def test_created_at_both_edges_of_the_largest_skew_verifies(tmp_path):
    """--auth-skew at its cap (600): a request created ~590 s ahead, then one ~590 s behind
    (1180 s apart, under 2 x 600) are both accepted, and the log still verifies."""
    proc = _daemon(tmp_path, "--auth-skew", "600")
    try:
        people, base = proc.people, proc.base_url
        async with UnibusClient(base, people["alice"]) as a:
            await add(a, people["bob"])
        now = int(time.time())
        assert (await send(base, people["bob"], "POST", "/v1/rooms", {"name": "ahead"}, created=now + 590))[0] == 201
        assert (await send(base, people["bob"], "POST", "/v1/rooms", {"name": "behind"}, created=now - 590))[0] == 201
        assert await verification_error(base, people["alice"]) is None
    finally:
        proc.stop()


async def test_sequential_self_demotion_then_add_is_refused(daemon):
    """Without a race the role check holds: demoted first, the add is 403 and nothing is logged."""
    people, base = daemon.people, daemon.base_url
    carol, new = people["carol"], generate_identity("dave")
    async with UnibusClient(base, people["alice"]) as a:
        await add(a, carol, "admin")
        head = (await a.log_head())["seq"]
        assert (await send(base, carol, "PATCH", "/v1/members/carol", {"role": "member"}))[0] == 200
        body = {"handle": "dave", "role": "member", "sign_pub": new.sign_pub_b64, "enc_pub": new.enc_pub_b64,
                "enc_suite": new.enc_suite, "bus_pub": new.bus_pub}
        assert (await send(base, carol, "POST", "/v1/members", body))[0] == 403
        assert (await a.log_head())["seq"] == head + 1
    assert await verification_error(base, people["alice"]) is None
