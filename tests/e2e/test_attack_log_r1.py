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
import time

from attackkit import add, fresh_daemon, send, verification_error

from unibus.client import UnibusClient
from unibus.client.keys import generate_identity

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
    proc = fresh_daemon(tmp_path, "--auth-skew", "600")
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
