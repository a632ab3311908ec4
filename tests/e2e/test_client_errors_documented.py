"""The SDK's errors where docs/client.md's table says, against a real daemon: who gets
``NotARoomMember``, ``KeyUnavailable`` and ``ApiError`` for a room they are not in, and what a
deleted member's ``bus()`` raises. A walk-through of the docs by a developer found the table
silent on the last two and too broad on the first."""

from __future__ import annotations

import pytest
from unibus.client import ApiError, KeyUnavailable, NotARoomMember, UnibusClient
from unibus.client.keys import generate_identity


async def test_a_room_one_is_not_in_and_a_deleted_members_bus(daemon_with_admin, alice, tmp_path):
    server = daemon_with_admin()
    bob, carol = generate_identity("bob"), generate_identity("carol")
    async with UnibusClient(server.base_url, alice, replica_root=tmp_path / "a") as a:
        for who in (bob, carol):
            await a.add_member(who.handle, who.sign_pub_b64, who.enc_pub_b64, bus_pub=who.bus_pub)
        async with UnibusClient(server.base_url, bob, replica_root=tmp_path / "b") as b:
            room = (await b.create_room("bobs"))["room_id"]
            assert await b.rekey(room) == 1
        # An admin outside the room may read it: the verified log says it is not in it.
        with pytest.raises(NotARoomMember) as not_in:
            await a.current_key(room)
        assert (not_in.value.room_id, not_in.value.handle) == (room, "alice")
        async with UnibusClient(server.base_url, carol, replica_root=tmp_path / "c") as c:
            # Anyone else is refused the room by the server first.
            with pytest.raises(ApiError) as refused:
                await c.current_key(room)
            assert refused.value.status == 403 and not isinstance(refused.value, KeyUnavailable)
            with pytest.raises(KeyUnavailable) as no_key:
                await c.room_key(room)
            assert no_key.value.status == 403 and no_key.value.room_id == room
            with pytest.raises(KeyUnavailable) as no_key:
                await c.my_key(room)
            assert no_key.value.status == 403
            await a.remove_member("carol")
            with pytest.raises(ApiError) as gone:
                async with c.bus():
                    pass
            assert gone.value.status == 401
