"""Red team log-r2: attacks on the fix of log-r1 (da5286e: the server replays a logged request's
signature check before it appends it, and the store re-checks the author's rights in the write).

A request's signature is verified when its headers arrive; its body is read after that
(``Expect: 100-continue`` even says when the signature was accepted), and the store writes
it only then. The store's re-check (``check_authority``) looked at the author's *role* and
rooms at the write, not at the *key* that verified the signature: a member deleted and
added again under the same handle with new keys (the recovery of a lost device) while a
request signed with the old key was on its way got that request appended, and every
client then refused the log (the signature does not verify with the member's key). Fixed
since: the key must still be the author's at the write (``LogRecord.sign_pub``).

Each test asserts the safe behaviour. Real membershipd (unibus.testing), real nats-server,
real SQLite, 127.0.0.1 only; one daemon per test (a log broken once stays broken).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import yarl
from attackkit import add, verification_error

from unibus.client import UnibusClient
from unibus.client.keys import generate_identity
from unibus.signing import sign_request


STEP = 5.0  # bound of every socket read


class SlowBody:
    """A signed request sent over a raw socket: headers first (with ``Expect: 100-continue``),
    the body only when :meth:`finish` is called. ``open`` returns once the server answered
    ``100 Continue``, i.e. once it accepted the signature (auth.send_continue)."""

    def __init__(self, base: str, ident: Any, method: str, path: str, body: Any) -> None:
        self.url = yarl.URL(base)
        self.ident, self.method, self.path = ident, method, path
        self.body = json.dumps(body).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        headers = sign_request(self.method, self.path, self.body, keyid=self.ident.handle,
                               private_key=self.ident.sign_key)
        self.reader, self.writer = await asyncio.open_connection(self.url.host, self.url.port)
        head = (f"{self.method} {self.path} HTTP/1.1\r\nHost: {self.url.host}:{self.url.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n"
                "Expect: 100-continue\r\nConnection: close\r\n")
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode())
        await self.writer.drain()
        first = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), STEP)
        assert first.startswith(b"HTTP/1.1 100 "), first

    async def finish(self) -> int:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.body)
        await self.writer.drain()
        try:
            status_line = await asyncio.wait_for(self.reader.readline(), STEP)
            return int(status_line.split()[1])
        finally:
            self.writer.close()


def _member_body(ident: Any, role: str = "member") -> dict[str, Any]:
    return {"handle": ident.handle, "role": role, "sign_pub": ident.sign_pub_b64, "enc_pub": ident.enc_pub_b64,
            "enc_suite": ident.enc_suite, "bus_pub": ident.bus_pub}


# --------------------------------------------------------------------------- holes


async def test_a_request_signed_with_a_replaced_key_cannot_be_appended(daemon):
    people, base = daemon.people, daemon.base_url
    bob = people["bob"]
    async with UnibusClient(base, people["alice"]) as a:
        await add(a, bob)
        # Whoever holds bob's (old) signing key, e.g. a lost device: a room creation whose
        # signature the server accepts now, and whose body follows later.
        late = SlowBody(base, bob, "POST", "/v1/rooms", {"name": "late"})
        await late.open()
        # The admin recovers bob's account: delete, and add again under the same handle with new keys.
        await a.remove_member("bob")
        await add(a, generate_identity("bob"))
        status = await late.finish()
    err = await verification_error(base, people["alice"])
    assert err is None, f"answered {status}; every client now fails: {err}"
    assert status in (401, 403), status


# --------------------------------------------------------------------------- attacks that held


async def test_an_admin_demoted_while_its_member_add_body_is_on_the_way_is_refused(daemon):
    """The body held back past a demotion (no tight race needed): the write's re-check refuses it."""
    people, base = daemon.people, daemon.base_url
    carol = people["carol"]
    async with UnibusClient(base, people["alice"]) as a:
        await add(a, carol, "admin")
        pending = SlowBody(base, carol, "POST", "/v1/members", _member_body(generate_identity("dave")))
        await pending.open()
        await a.set_role("carol", "member")
        assert await pending.finish() == 403
    assert await verification_error(base, people["alice"]) is None


async def test_held_requests_of_an_owner_who_left_and_of_a_deleted_member_are_refused(daemon):
    """Two held requests: an owner's room member add after the owner left the room (refused: 400, as
    it carries a body, which that route takes none of), and a
    member's room creation after the member was deleted for good (403); the log still verifies."""
    people, base = daemon.people, daemon.base_url
    bob, carol = people["bob"], people["carol"]
    async with UnibusClient(base, people["alice"]) as a:
        await add(a, bob)
        await add(a, carol)
        async with UnibusClient(base, bob) as b:
            rid = (await b.create_room("r"))["room_id"]
        # PUT has no JSON body of its own: send one anyway, to hold the request. A body there is now
        # refused (400 non-canonical-request: the log would keep it), which comes before the 403.
        held_add = SlowBody(base, bob, "PUT", f"/v1/rooms/{rid}/members/carol", {})
        await held_add.open()
        held_create = SlowBody(base, carol, "POST", "/v1/rooms", {"name": "gone"})
        await held_create.open()
        await a.remove_room_member(rid, "bob")
        await a.remove_member("carol")
        assert await held_add.finish() == 400
        assert await held_create.finish() == 403
    assert await verification_error(base, people["alice"]) is None
