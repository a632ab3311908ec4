"""The trust root a client binds its requests to (docs/formats.md, "The membership log";
docs/http-api.md, ``tag``).

Adversary: a server (or whoever answers in its place) that serves an entry 0 the client
would refuse when it verifies the log: here one without its ``salt``, which is what keeps
two deployments from sharing a trust root. Before the client had pinned a root, it hashed
whatever entry 0 it was served and signed its first changing request with that tag. Now
it checks entry 0 as a verified sync does, and sends nothing.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from attackkit import serving

from unibus.client import UnibusClient
from unibus.client.keys import generate_identity
from unibus.client.replica import LogVerificationError
from unibus.memberlog import bootstrap_entry, entry_hash, member_json


@pytest.mark.parametrize("salt", [None, "00" * 8, "AB" * 16])
async def test_a_client_signs_no_change_against_an_entry_0_it_would_refuse(tmp_path, salt):
    alice, eve = generate_identity("alice"), generate_identity("eve")
    entry0 = bootstrap_entry(0, "", 1796000000, member_json(alice.handle, "admin", alice.sign_pub, alice.enc_pub,
                                                            alice.enc_suite, alice.bus_pub))
    if salt is None:
        del entry0["salt"]
    else:
        entry0["salt"] = salt
    asked: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        asked.append((request.method, request.path))
        head = {"seq": 0, "hash": entry_hash(entry0)}
        if request.method == "GET" and request.path == "/v1/log/head":
            return web.json_response(head, headers={"Unibus-Auth-Skew": "60"})
        if request.method == "GET" and request.path == "/v1/log":
            return web.json_response({"entries": [entry0], "head": head})
        return web.json_response({"handle": "eve"}, status=201)

    async with serving(handler) as url, UnibusClient(url, alice, replica_root=tmp_path / "replicas") as client:
        with pytest.raises(LogVerificationError, match="salt"):
            await client.add_member("eve", eve.sign_pub_b64, eve.enc_pub_b64, bus_pub=eve.bus_pub)
    assert ("POST", "/v1/members") not in asked, "the change was sent, tagged with an unverified trust root"
