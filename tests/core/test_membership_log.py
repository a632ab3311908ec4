"""The membership log against one real daemon: what is appended, what is refused, what is served.

One daemon for the module (real nats-server, real SQLite). The scripted
sequence runs every logged route through the SDK; the log the server serves
is then replayed through unibus.memberlog.LogState, the client's verifier,
and must give exactly the state the server answers with.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sqlite3
import time

import aiohttp
import pytest

from unibus.client import ApiError, UnibusClient
from unibus.client.keys import generate_identity
from unibus.client.sealing import new_room_key, seal_room_key
from unibus.memberlog import LogState, entry_hash, key_package_input, verify_ed25519
from unibus.signing import sign_request
from unibus.testing import MembershipdProcess, bootstrap_member


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    alice = generate_identity("alice")
    data_dir = tmp_path_factory.mktemp("log") / "daemon"
    bootstrap_member(data_dir, alice, "admin")
    proc = MembershipdProcess(data_dir).start()
    proc.alice = alice
    try:
        yield proc
    finally:
        proc.stop()


async def expect(status, coro):
    with pytest.raises(ApiError) as e:
        await coro
    assert e.value.status == status, e.value.problem
    return e.value.problem


async def post_raw(server, path: str, raw: bytes) -> tuple[int, dict]:
    """A signed POST of exactly ``raw`` as alice (untagged, as clients of the contract may send)."""
    headers = sign_request("POST", path, raw, keyid="alice", private_key=server.alice.sign_key)
    headers["Content-Type"] = "application/json"
    return await _post(server, path, raw, headers)


async def _post(server, path: str, raw: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(server.base_url + path, data=raw, headers=headers) as r:
        return r.status, await r.json(content_type=None)


def hand_signed(key, path: str, digest: str, label: str = "sig1") -> dict[str, str]:
    """RFC 9421 headers made by hand, over a ``Content-Digest`` value of the caller's choosing
    (``sign_request`` writes only the sha-256 member), as any client of the contract may."""
    params = (f'("@method" "@path" "@query" "content-digest");created={int(time.time())};'
              f'nonce="{secrets.token_urlsafe(24)}";keyid="alice";alg="ed25519"')
    base = (f'"@method": POST\n"@path": {path}\n"@query": ?\n"content-digest": {digest}\n'
            f'"@signature-params": {params}')
    signature = base64.b64encode(key.sign(base.encode())).decode()
    return {"Content-Digest": digest, "Content-Type": "application/json",
            "Signature-Input": f"{label}={params}", "Signature": f"{label}=:{signature}:"}


def stored_texts(server) -> list[str]:
    with sqlite3.connect(f"file:{server.data_dir / 'membershipd.db'}?mode=ro", uri=True) as conn:
        return [t for (t,) in conn.execute("select entry from log_entries order by seq")]


async def replay(client: UnibusClient, trust_root: str | None = None) -> LogState:
    head = await client.log_head()
    state = LogState(trust_root=trust_root, skew=client.reported_auth_skew)
    after = None
    while True:
        page = await client.log(after=after, limit=3)
        if not page["entries"]:
            break
        for entry in page["entries"]:
            state.apply(entry)
            after = entry["seq"]
    assert state.head == (head["seq"], head["hash"])
    return state


async def server_state(admin: UnibusClient) -> tuple[dict, dict]:
    members = {m["handle"]: (m["role"], m["sign_pub"], m["enc_pub"], m["enc_suite"], m["bus_pub"])
               for m in await admin.list_members()}
    rooms = {r["room_id"]: {"room_id": r["room_id"], "name": r["name"], "owner": r["owner"] or "",
                            "epoch": r["epoch"], "rekey_required": r["rekey_required"],
                            "members": sorted(m["handle"] for m in r["members"])}
             for r in await admin.list_rooms()}
    return members, rooms


def replayed_state(state: LogState) -> tuple[dict, dict]:
    members = {h: tuple(m.as_json()[k] for k in ("role", "sign_pub", "enc_pub", "enc_suite", "bus_pub"))
               for h, m in state.members.items()}
    return members, {rid: r.as_json() for rid, r in state.rooms.items()}


async def keys_for(client: UnibusClient, room: dict, epoch: int) -> tuple[dict, dict, dict]:
    key = new_room_key()
    sealed = {m["handle"]: base64.b64encode(seal_room_key(key, base64.b64decode(m["enc_pub"]), m["enc_suite"],
                                                          room["room_id"], epoch)).decode()
              for m in room["members"]}
    head = await client.log_head()
    head = {"seq": head["seq"], "hash": head["hash"]}
    return sealed, client.sign_key_packages(room["room_id"], epoch, sealed, head), head


async def test_every_logged_route_appends_one_entry_and_the_log_replays_to_the_server_state(server):
    people = {h: generate_identity(h) for h in ("bob", "carol", "dave")}
    async with UnibusClient(server.base_url, server.alice) as a:
        c = {h: UnibusClient(server.base_url, i) for h, i in people.items()}
        try:
            async def step(coro):
                before = (await a.log_head())["seq"]
                result = await coro
                assert (await a.log_head())["seq"] == before + 1, "one entry per accepted logged request"
                return result

            for h, i in people.items():
                await step(a.add_member(h, i.sign_pub_b64, i.enc_pub_b64, i.enc_suite, bus_pub=i.bus_pub))
            room = await step(c["bob"].create_room("ops"))
            rid = room["room_id"]
            await step(c["bob"].add_room_member(rid, "carol"))
            room = await step(c["bob"].add_room_member(rid, "dave"))
            sealed, sigs, head = await keys_for(c["bob"], room, 1)
            await step(c["bob"].post_keys(rid, 1, sealed, sigs, head))
            await step(a.set_role("carol", "admin"))
            rotated = generate_identity("carol").bus_pub
            await step(c["carol"].set_bus_key(rotated))
            await step(c["dave"].remove_room_member(rid, "dave"))  # leaving by oneself
            await step(c["carol"].remove_room_member(rid, "bob"))  # an admin removes the owner
            other = await step(c["dave"].create_room("tmp"))
            await step(c["dave"].delete_room(other["room_id"]))
            await step(a.remove_member("dave"))
            await step(c["carol"].rekey(rid))  # the SDK's rekey signs its packages at the served head

            state = await replay(a)
            assert replayed_state(state) == await server_state(a)
            assert state.rooms[rid].epoch == 2 and state.rooms[rid].epochs[2].sealer == "carol"
            # Pinning entry 0 (the bootstrap membershipd member add printed) gives the same.
            root = state.hashes[0]
            assert replayed_state(await replay(c["carol"], trust_root=root)) == replayed_state(state)
            # The served entries are the stored texts, byte for byte.
            async with aiohttp.ClientSession() as s:
                path = "/v1/log?limit=1000"
                headers = sign_request("GET", path, None, keyid="alice", private_key=server.alice.sign_key)
                async with s.get(server.base_url + path, headers=headers) as r:
                    raw = await r.text()
            texts = stored_texts(server)
            assert raw.startswith('{"entries":[' + ",".join(texts) + "]")
            assert [entry_hash(json.loads(t)) for t in texts] == state.hashes
        finally:
            for client in c.values():
                await client.close()


async def test_rejected_requests_append_nothing(server):
    bob, eve = generate_identity("bob2"), generate_identity("eve")
    async with UnibusClient(server.base_url, server.alice) as a, UnibusClient(server.base_url, bob) as b, \
            UnibusClient(server.base_url, eve) as e:
        await a.add_member("bob2", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
        room = await a.create_room("mine")
        rid = room["room_id"]
        head = await a.log_head()
        await expect(403, b.add_member("eve", eve.sign_pub_b64, eve.enc_pub_b64, bus_pub=eve.bus_pub))
        await expect(403, b.set_role("bob2", "admin"))
        await expect(403, b.remove_member("alice"))
        await expect(403, b.add_room_member(rid, "bob2"))
        await expect(403, b.delete_room(rid))
        sealed, sigs, h = await keys_for(b, room, 1)
        await expect(403, b.post_keys(rid, 1, sealed, sigs, h))
        await expect(404, a.delete_room("nosuchroom"))
        await expect(404, a.remove_room_member(rid, "bob2"))
        await expect(404, a.set_role("nobody", "admin"))
        await expect(409, a.add_member("bob2", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub))
        await expect(422, a.set_role("bob2", "owner"))
        await expect(422, a.create_room(""))
        await expect(401, e.create_room("not a member"))
        assert await a.log_head() == head


async def test_non_canonical_requests_are_refused_and_not_appended(server):
    async with UnibusClient(server.base_url, server.alice) as a:
        rid = (await a.create_room("canon"))["room_id"]
        head = await a.log_head()
        for method, path, body, query in [
            ("PUT", f"/v1/rooms/{rid}/members/%61lice", None, None),  # alice, spelled otherwise
            ("DELETE", f"/v1/rooms/{rid}/members/%61lice", None, None),
            ("POST", "/v1/room%73", {"name": "x"}, None),
            ("DELETE", f"/v1/rooms/{rid}", None, {"why": "1"}),  # a query string
            ("POST", "/v1/rooms", {"name": "x"}, {"a": "b"}),
            # a body where the route takes none, which the log would keep (a red team grew every
            # client's log 16 KiB an entry, 300 entries in 2 s, with a member's own leaves)
            ("PUT", f"/v1/rooms/{rid}/members/alice", {"junk": "x" * 16000}, None),
            ("DELETE", f"/v1/rooms/{rid}/members/alice", {}, None),
            ("DELETE", f"/v1/rooms/{rid}", {"why": 1}, None),
            ("DELETE", "/v1/members/nobody", {}, None),
        ]:
            problem = await expect(400, a.request(method, path, json_body=body, query=query))
            assert problem["type"].endswith("/non-canonical-request"), problem
        # nor padding in a body the log keeps (a review: 16,000 spaces in each room creation)
        for padded in (b'{"name": "x"' + b" " * 300 + b"}", b'{"name":\n' + b"\n" * 300 + b'"x"}',
                       b'{"name": "' + b"\\u0061" * 60 + b'"}' + b"\t" * 260,
                       # a second review: 200 emoji, raw, earned 1,600 bytes of padding under the first rule
                       json.dumps({"name": "\U0001F600" * 200}, ensure_ascii=False).encode() + b" " * 300):
            status, problem = await post_raw(server, "/v1/rooms", padded)
            assert status == 400 and "at most 256 bytes of whitespace outside its strings" in problem["detail"], \
                problem
        # nor in the signature headers, which the log keeps as sent too (a red team: a Content-Digest
        # member of 4 KB no check reads, and a label of 3,000 characters, kept twice)
        raw = b'{"name":"x"}'
        sha256 = f"sha-256=:{base64.b64encode(hashlib.sha256(raw).digest()).decode()}:"
        for digest, label, header in ((f"{sha256}, junk=:{base64.b64encode(b'j' * 3000).decode()}:", "sig1",
                                       "Content-Digest"),
                                      (sha256, "a" * 200, "Signature")):
            status, problem = await _post(server, "/v1/rooms", raw, hand_signed(server.alice.sign_key, "/v1/rooms",
                                                                                 digest, label))
            assert status == 400 and problem["type"].endswith("/non-canonical-request"), problem
            assert f"the {header} header of this request is kept in the membership log as sent" in problem["detail"]
        assert await a.log_head() == head
        # a sha-512 beside it and a label of 64 characters are fine
        sha512 = f"sha-512=:{base64.b64encode(hashlib.sha512(raw).digest()).decode()}:"
        status, room = await _post(server, "/v1/rooms", raw, hand_signed(server.alice.sign_key, "/v1/rooms",
                                                                           f"{sha256}, {sha512}", "l" * 64))
        assert status == 201, room
        head = await a.log_head()
        pretty = json.dumps({"name": "pretty \u00e9"}, indent=4).encode()  # indented, escaped: fine
        status, room = await post_raw(server, "/v1/rooms", pretty)
        assert status == 201 and room["name"] == "pretty \u00e9", room
        escaped = json.dumps({"name": "<b>" * 60}).replace("<", "\\u003c").replace(">", "\\u003e").encode()
        status, room = await post_raw(server, "/v1/rooms", escaped)  # as Go's encoding/json writes it
        assert status == 201 and room["name"] == "<b>" * 60, room
        head = await a.log_head()
        problem = await expect(413, a.create_room("x" * 20000))  # the log keeps bodies: bounded
        assert problem["max_bytes"] == 16 * 1024
        assert await a.log_head() == head
        assert rid in {r["room_id"] for r in await a.list_rooms()}


async def test_keys_post_validates_sigs_and_log_head_and_keys_me_returns_the_package(server):
    bob = generate_identity("bob3", "MLKEM768_X25519")
    async with UnibusClient(server.base_url, server.alice) as a, UnibusClient(server.base_url, bob) as b:
        await a.add_member("bob3", bob.sign_pub_b64, bob.enc_pub_b64, bob.enc_suite, bus_pub=bob.bus_pub)
        room = await a.create_room("keys")
        rid = room["room_id"]
        room = await a.add_room_member(rid, "bob3")
        sealed, sigs, head = await keys_for(a, room, 1)
        before = await a.log_head()
        path = f"/v1/rooms/{rid}/keys"
        body = {"epoch": 1, "sealed": sealed, "sigs": sigs, "log_head": head}
        short = base64.b64encode(b"s" * 63).decode()
        for bad in ({k: v for k, v in body.items() if k != "sigs"}, {k: v for k, v in body.items() if k != "log_head"},
                    {**body, "sigs": []}, {**body, "sigs": {"alice": sigs["alice"]}},
                    {**body, "sigs": {**sigs, "zed": sigs["alice"]}}, {**body, "sigs": {**sigs, "alice": short}},
                    {**body, "sigs": {**sigs, "alice": "not base64!"}}, {**body, "sigs": {**sigs, "alice": 7}},
                    {**body, "log_head": None}, {**body, "log_head": {"seq": head["seq"]}},
                    {**body, "log_head": {**head, "extra": 1}}, {**body, "log_head": {**head, "seq": -1}},
                    {**body, "log_head": {**head, "seq": "3"}}, {**body, "log_head": {**head, "seq": 2**60}},
                    {**body, "log_head": {**head, "hash": head["hash"].upper()}},
                    {**body, "log_head": {**head, "hash": "ab"}}):
            await expect(422, a.request("POST", path, json_body=bad))
        problem = await expect(409, a.post_keys(rid, 1, sealed, sigs, {"seq": head["seq"] + 100, "hash": head["hash"]}))
        assert problem["type"].endswith("/unknown-log-head")
        await expect(409, a.post_keys(rid, 1, sealed, sigs, {"seq": head["seq"], "hash": "0" * 64}))
        assert await a.log_head() == before
        await a.post_keys(rid, 1, sealed, sigs, head)
        got = await b.my_key(rid)
        assert got == {"epoch": 1, "sealed": sealed["bob3"], "sig": sigs["bob3"], "sealer": "alice",
                       "log_head": head}
        assert verify_ed25519(server.alice.sign_pub,
                              key_package_input(rid, 1, "bob3", base64.b64decode(got["sealed"]), head["seq"],
                                                head["hash"]), base64.b64decode(got["sig"]))
        assert await b.my_key(rid, 1) == got
        entry = (await a.log(after=before["seq"]))["entries"][0]
        assert entry["result"] == {"epoch": 1} and entry["request"]["body"] is None
        assert entry["request"]["path"] == path and entry["request"]["content_digest"].startswith("sha-256=:")


async def test_log_routes_page_validate_and_need_a_member(server):
    eve = generate_identity("eve2")
    async with UnibusClient(server.base_url, server.alice) as a, UnibusClient(server.base_url, eve) as e:
        head = await a.log_head()
        # the head alone, as GET /v1/log has it and a keys POST takes it back; the skew in a header
        assert set(head) == {"seq", "hash"} and head["seq"] >= 0 and a.reported_auth_skew == 60
        everything = await a.log()
        assert everything["head"] == head
        assert [x["seq"] for x in everything["entries"]] == list(range(head["seq"] + 1))[:500]
        assert [x["seq"] for x in (await a.log(after=0, limit=2))["entries"]] == [1, 2]
        assert (await a.log(after=head["seq"]))["entries"] == []
        assert (await a.log(after=2**53 - 1))["entries"] == []
        for query in ({"limit": 0}, {"limit": 1001}, {"after": -1}, {"after": "x"}, {"limit": "1.5"},
                      {"after": 99999999999999999999}):
            problem = await expect(422, a.request("GET", "/v1/log", query=query))
            assert problem["type"].endswith("/invalid-field")
        await expect(401, e.log())  # not a member
        await expect(401, e.log_head())
        await a.add_member("eve2", eve.sign_pub_b64, eve.enc_pub_b64, bus_pub=eve.bus_pub)
        assert (await e.log_head())["seq"] == head["seq"] + 1  # any member may read
        await a.remove_member("eve2")
        await expect(401, e.log())  # a removed member reads no more


async def test_lowering_auth_skew_does_not_break_the_log(tmp_path, membershipd_factory):
    """Adversary: an ordinary member (bob) who signs a logged request with ``created`` 50 s in the past
    (accepted: within the default 60 s skew). The operator later lowers ``--auth-skew`` to 20 s (the docs'
    advice is to keep clocks in sync); the log must still verify for every client (a LogState fed the
    served auth_skew, as this module's replay() helper does, refuses it: the client must not do that)."""
    import time

    alice, bob = generate_identity("alice"), generate_identity("bob")
    bootstrap_member(tmp_path / "d", alice, "admin")
    first = membershipd_factory(data_dir=tmp_path / "d")
    async with UnibusClient(first.base_url, alice) as admin:
        await admin.add_member("bob", bob.sign_pub_b64, bob.enc_pub_b64, bus_pub=bob.bus_pub)
    body = json.dumps({"name": "backdated"}).encode()
    headers = sign_request("POST", "/v1/rooms", body, keyid="bob", private_key=bob.sign_key,
                           created=int(time.time()) - 50)
    headers["Content-Type"] = "application/json"
    async with aiohttp.ClientSession() as s, s.post(first.base_url + "/v1/rooms", data=body, headers=headers) as r:
        assert r.status == 201, await r.text()
    first.stop()
    second = membershipd_factory("--auth-skew", "20", data_dir=tmp_path / "d")
    # The client's verified replica checks times against the cap of every server's --auth-skew, never
    # the auth_skew a server reports (docs/client.md, "The verified replica"): the entry still verifies.
    async with UnibusClient(second.base_url, bob, replica_root=tmp_path / "replica") as client:
        await client.log_head()
        assert client.reported_auth_skew == 20
        state = await client.verify_log()
        assert any(r.name == "backdated" for r in state.rooms.values())
