"""The membership log's replay rules, entry by entry (pure: no server).

Entries are built the way the server builds them: from requests signed by
``unibus.signing.sign_request`` with real keys. Each check of docs/formats.md
("The membership log") gets an entry that breaks it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unibus.client.keys import generate_identity
from unibus.client.replica import Replica, VerificationError
from unibus.memberlog import (
    MAX_AUTH_SKEW,
    KeptBack,
    LoggedRequest,
    LogError,
    LogState,
    bootstrap_entry,
    entry_hash,
    key_package_input,
    legacy_keys_json,
    member_json,
    request_entry,
    snapshot_entry,
)
from unibus.signing import sign_request

NOW = int(time.time())


def bus_pub(identity) -> str:
    return identity.bus_pub


def member_doc(identity, role="member"):
    return member_json(identity.handle, role, identity.sign_pub, identity.enc_pub, identity.enc_suite,
                       bus_pub(identity))


class Log:
    """Builds a log as a server would: seq, prev, at, verbatim signed requests."""

    def __init__(self, admin):
        self.entries = []
        self.append_raw(lambda seq, prev: bootstrap_entry(seq, prev, NOW, member_doc(admin, "admin")))

    @property
    def head(self):
        return len(self.entries) - 1, entry_hash(self.entries[-1])

    def append_raw(self, make):
        prev = entry_hash(self.entries[-1]) if self.entries else ""
        entry = make(len(self.entries), prev)
        self.entries.append(entry)
        return entry

    def request(self, who, method, path, body=None, result=None, created=None, nonce=None, at=None):
        raw = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = sign_request(method, path, raw, keyid=who.handle, private_key=who.sign_key,
                               created=created or NOW, nonce=nonce)
        req = LoggedRequest(method, path, "", headers.get("Content-Digest"), headers["Signature-Input"],
                            headers["Signature"], raw)
        return self.append_raw(lambda seq, prev: request_entry(seq, prev, at or NOW, req, result or {}))

    def add_member(self, admin, identity, role="member"):
        body = {"handle": identity.handle, "role": role, "sign_pub": identity.sign_pub_b64,
                "enc_pub": identity.enc_pub_b64, "enc_suite": identity.enc_suite, "bus_pub": bus_pub(identity)}
        return self.request(admin, "POST", "/v1/members", body)

    def create_room(self, who, room_id, name="ops"):
        return self.request(who, "POST", "/v1/rooms", {"name": name}, {"room_id": room_id})

    def rekey(self, who, room_id, epoch):
        body = {"epoch": epoch, "sealed": {}, "sigs": {}, "log_head": {"seq": 0, "hash": ""}}
        return self.request(who, "POST", f"/v1/rooms/{room_id}/keys", body, {"epoch": epoch})


def replay(entries, **kwargs) -> LogState:
    state = LogState(**kwargs)
    for e in entries:
        state.apply(copy.deepcopy(e))
    return state


@pytest.fixture(scope="module")
def people():
    return {h: generate_identity(h) for h in ("alice", "bob", "carol", "dave")}


@pytest.fixture
def world(people):
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    log = Log(alice)
    log.add_member(alice, bob)
    log.add_member(alice, carol)
    log.create_room(bob, "r1")
    log.request(bob, "PUT", "/v1/rooms/r1/members/carol")
    log.rekey(bob, "r1", 1)
    return log


def test_a_valid_log_derives_members_rooms_and_epochs(world, people):
    state = replay(world.entries)
    assert sorted(state.members) == ["alice", "bob", "carol"]
    assert state.members["alice"].role == "admin"
    room = state.rooms["r1"]
    assert (room.owner, room.epoch, room.rekey_required, room.members) == ("bob", 1, False, {"bob", "carol"})
    assert room.epochs[1].sealer == "bob" and room.epochs[1].roster == {"bob", "carol"}
    assert state.head == world.head and state.root == entry_hash(world.entries[0])


def test_removal_and_deletion_follow_the_server_rules(world, people):
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    world.request(carol, "DELETE", "/v1/rooms/r1/members/carol")  # a member may leave
    world.request(bob, "PUT", "/v1/rooms/r1/members/carol")
    world.request(alice, "DELETE", "/v1/members/bob")  # the owner goes: ownership dies with it
    state = replay(world.entries)
    room = state.rooms["r1"]
    assert room.members == {"carol"} and room.owner == "" and room.rekey_required
    assert state.may_rekey_at("r1", "alice", state.head[0]) and not state.may_rekey_at("r1", "carol", state.head[0])
    # history: bob was in the room (and could rekey it) at the rekey's seq
    rekey_seq = room.epochs[1].seq
    assert state.in_room_at("r1", "bob", rekey_seq) and state.may_rekey_at("r1", "bob", rekey_seq)
    assert not state.in_room_at("r1", "bob", state.head[0])


def test_entry_0_is_salted_so_no_two_deployments_share_a_trust_root(people):
    """Entry 0's hash is a deployment's trust root, which every signed request names
    (its tag). The same first admin bootstrapped on two deployments in the same second
    once wrote the same entry 0, so a request logged by one was accepted by the other.
    Every entry 0 now carries 128 random bits (``salt``), and a log without them is refused."""
    doc = member_doc(people["alice"], "admin")
    boots = [bootstrap_entry(0, "", NOW, doc) for _ in range(2)]
    snaps = [snapshot_entry(NOW, [doc], []) for _ in range(2)]
    for a, b in (boots, snaps):
        assert a["salt"] != b["salt"] and entry_hash(a) != entry_hash(b)
        assert {k: v for k, v in a.items() if k != "salt"} == {k: v for k, v in b.items() if k != "salt"}
    assert "salt" not in bootstrap_entry(3, "x" * 64, NOW, doc)  # a later bootstrap (a recovery) needs none
    for entry, why in ((dict(boots[0]), "exactly the fields"), ({**boots[0], "salt": "00" * 8}, "salt"),
                       ({**boots[0], "salt": "AB" * 16}, "salt"), ({**snaps[0], "salt": 7}, "salt")):
        entry.pop("salt") if why == "exactly the fields" else None
        with pytest.raises(LogError, match=why) as e:
            replay([entry])
        assert e.value.seq == 0


def _flip_signature(e):
    label, _, rest = e["request"]["signature"].partition("=:")
    raw = bytearray(base64.b64decode(rest[:-1]))
    raw[0] ^= 1
    e["request"]["signature"] = f"{label}=:{base64.b64encode(bytes(raw)).decode()}:"


@pytest.mark.parametrize("mutate, seq, why", [
    (lambda e: e["request"].__setitem__("path", "/v1/rooms/r2/members/carol"), 4, "does not verify"),
    (lambda e: e.__setitem__("at", e["at"] + 1), 5, "prev is not the hash"),  # the next entry no longer chains
    (lambda e: e["result"].__setitem__("extra", 1), 4, "result must have exactly"),
    (_flip_signature, 4, "does not verify"),
])
def test_tampered_entries_are_rejected(world, mutate, seq, why):
    entries = copy.deepcopy(world.entries)
    mutate(entries[4])  # PUT /v1/rooms/r1/members/carol
    with pytest.raises(LogError, match=why) as e:
        replay(entries)
    assert e.value.seq == seq


def test_a_broken_link_names_both_entries_and_entry_0_has_no_prev(world):
    entries = copy.deepcopy(world.entries)
    entries[4]["at"] += 1
    with pytest.raises(LogError, match="prev is not the hash of entry 4: one of the two was altered") as e:
        replay(entries)
    assert e.value.seq == 5
    with pytest.raises(LogError, match='the prev of entry 0 must be ""') as e:  # a review: it named entry -1
        replay([{**world.entries[0], "prev": "ab"}])
    assert e.value.seq == 0


def test_reordered_and_dropped_entries_are_rejected(world):
    swapped = copy.deepcopy(world.entries)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    with pytest.raises(LogError) as e:
        replay(swapped)
    assert e.value.seq == 3
    dropped = copy.deepcopy(world.entries)
    del dropped[2]
    with pytest.raises(LogError) as e:
        replay(dropped)
    assert e.value.seq == 2


def test_a_body_that_does_not_match_its_signed_digest_is_rejected(world, people):
    entries = copy.deepcopy(world.entries)
    body = json.loads(base64.b64decode(entries[1]["request"]["body"]))
    body["role"] = "admin"  # the server promotes bob behind alice's back
    entries[1]["request"]["body"] = base64.b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()
    for i in range(1, len(entries)):
        entries[i]["prev"] = entry_hash(entries[i - 1])
    with pytest.raises(LogError, match="Content-Digest does not match"):
        replay(entries)


def test_authority_is_checked_with_the_roles_the_log_established(world, people):
    bob, dave = people["bob"], people["dave"]
    world.add_member(bob, dave)  # bob is not an admin
    with pytest.raises(LogError, match="without being an admin") as e:
        replay(world.entries)
    assert e.value.seq == len(world.entries) - 1


def test_a_non_member_author_and_a_ghost_target_are_rejected(world, people):
    dave = people["dave"]
    log = copy.deepcopy(world)
    log.request(dave, "POST", "/v1/rooms", {"name": "x"}, {"room_id": "r9"})
    with pytest.raises(LogError, match="not a member"):
        replay(log.entries)
    log = copy.deepcopy(world)
    log.request(people["bob"], "PUT", "/v1/rooms/r1/members/dave")
    with pytest.raises(LogError, match="no member 'dave'"):
        replay(log.entries)


def test_a_replayed_nonce_and_a_held_back_request_are_rejected(world, people):
    alice, bob = people["alice"], people["bob"]
    log = copy.deepcopy(world)
    nonce = "n" * 32
    log.request(bob, "PUT", "/v1/rooms/r1/members/alice", nonce=nonce)
    log.request(bob, "DELETE", "/v1/rooms/r1/members/alice", nonce=nonce)
    with pytest.raises(LogError, match="appears twice"):
        replay(log.entries)
    log = copy.deepcopy(world)
    old = NOW - 3 * 60
    log.request(alice, "DELETE", "/v1/rooms/r1/members/carol", created=old, at=old + 1)
    with pytest.raises(LogError, match="older than an earlier entry"):
        replay(log.entries, skew=60)


def test_created_must_be_within_the_skew_of_the_server_time(world, people):
    world.request(people["bob"], "DELETE", "/v1/rooms/r1/members/carol", created=NOW, at=NOW + 3600)
    with pytest.raises(LogError, match="created is too old|expired"):
        replay(world.entries)


def _late_entry(world, people, age):
    """``world`` plus a request signed ``age`` s before the newest ``created`` (and appended 1 s later)."""
    log = copy.deepcopy(world)
    log.request(people["bob"], "DELETE", "/v1/rooms/r1/members/carol", created=NOW - age, at=NOW - age + 1)
    return log


def test_the_time_bound_is_the_constant_cap_of_auth_skew(world, people):
    """A client checks ``created`` against MAX_AUTH_SKEW by default: what a server with
    --auth-skew 600 could accept verifies, and nothing beyond it does (docs/formats.md)."""
    assert LogState().skew == MAX_AUTH_SKEW == 600
    replay(_late_entry(world, people, 2 * MAX_AUTH_SKEW - 5).entries)
    late = _late_entry(world, people, 2 * MAX_AUTH_SKEW + 5)
    with pytest.raises(LogError, match="older than an earlier entry") as e:
        replay(late.entries)
    assert e.value.seq == len(late.entries) - 1


class _Server:
    """What Replica.sync reads of a server: a log, its head, and any ``--auth-skew`` reported
    (``UnibusClient.reported_auth_skew``, from the head's ``Unibus-Auth-Skew`` header)."""

    def __init__(self, entries, auth_skew):
        self.entries, self.reported_auth_skew = entries, auth_skew

    async def log_head(self):
        return {"seq": len(self.entries) - 1, "hash": entry_hash(self.entries[-1])}

    async def log(self, after=None, limit=None):
        start = 0 if after is None else after + 1
        return {"entries": copy.deepcopy(self.entries[start:start + (limit or 500)])}


@pytest.mark.parametrize("reported", [10**9, 600, 1, "60", None])
async def test_the_replica_never_takes_the_skew_the_server_reports(world, people, reported):
    """A compromised server reports a huge auth_skew to get a late entry accepted; a server
    whose skew was lowered reports a small one. Neither changes the client's bound."""
    late = _late_entry(world, people, 2 * MAX_AUTH_SKEW + 5)
    with pytest.raises(VerificationError, match="older than an earlier entry") as e:
        await Replica("http://127.0.0.1:1").sync(_Server(late.entries, reported))
    assert e.value.seq == len(late.entries) - 1
    ok = _late_entry(world, people, 15 * 60)  # valid under a skew of 600 s, then lowered
    replica = Replica("http://127.0.0.1:1")
    await replica.sync(_Server(ok.entries, reported))
    assert replica.state.head == ok.head


def test_trust_root_and_later_bootstraps(world, people):
    root = entry_hash(world.entries[0])
    replay(world.entries, trust_root=root)
    with pytest.raises(LogError, match="not the trusted") as e:
        replay(world.entries, trust_root="0" * 64)
    assert e.value.seq == 0
    eve = generate_identity("eve")
    boot = world.append_raw(lambda seq, prev: bootstrap_entry(seq, prev, NOW, member_doc(eve, "admin")))
    with pytest.raises(LogError, match="unibus trust") as e:
        replay(world.entries, trust_root=root)
    assert e.value.seq == boot["seq"]
    state = replay(world.entries, trust_root=root, accepted_bootstraps=[entry_hash(boot)])
    assert state.members["eve"].role == "admin"


def test_a_snapshot_is_entry_zero_only_and_carries_state(people):
    alice, bob = people["alice"], people["bob"]
    snap = snapshot_entry(NOW, [member_doc(alice, "admin"), {**member_doc(bob), "bus_pub": None}],
                          [{"room_id": "r1", "name": "ops", "owner": "bob", "epoch": 3, "rekey_required": False,
                            "members": ["alice", "bob"]}])
    state = replay([snap])
    assert state.rooms["r1"].epoch == 3 and state.members["bob"].bus_pub is None
    assert state.rooms["r1"].epochs == {}  # pre-log keys carry no signature: not usable verified


def test_a_huge_snapshot_met_on_first_use_is_refused_but_taken_from_a_pinned_root(people):
    """A review: a server met on first use served a snapshot of 2,000 members in 3,400 rooms each,
    and every later command of that identity took 3.8 GiB and 35 s. A snapshot of more (room,
    member) pairs than ``first_use_pairs`` is refused on first use; a root the user pinned (the
    operator's) is taken whatever its size."""
    alice, bob = people["alice"], people["bob"]
    rooms = [{"room_id": f"r{i}", "name": "ops", "owner": "alice", "epoch": 0, "rekey_required": True,
              "members": ["alice", "bob"]} for i in range(6)]
    snap = snapshot_entry(NOW, [member_doc(alice, "admin"), member_doc(bob)], rooms)
    with pytest.raises(LogError, match="a snapshot of 12 room memberships met on first use, over the 11"):
        LogState(first_use_pairs=11).apply(snap)
    at_bound = LogState(first_use_pairs=12)
    at_bound.apply(snap)
    assert len(at_bound.rooms) == 6
    pinned = LogState(trust_root=entry_hash(snap), first_use_pairs=11)
    pinned.apply(snap)
    assert len(pinned.rooms) == 6


def legacy_snapshot(people, legacy, epoch=3):
    alice, bob = people["alice"], people["bob"]
    return snapshot_entry(NOW, [member_doc(alice, "admin"), member_doc(bob)],
                          [{"room_id": "r1", "name": "ops", "owner": "bob", "epoch": epoch, "rekey_required": False,
                            "members": ["alice", "bob"], "legacy_keys": legacy}])


def test_keys_sealed_before_the_log_are_usable_only_as_entry_0_records_them(people):
    """A 0.11 key has no sealer's signature: entry 0 (pinned) records one digest per member and room
    over all its epochs' keys; only those very keys pass, all of them together."""
    sealed = {("alice", 1): b"a1" * 40, ("bob", 1): b"b1" * 40, ("bob", 2): b"b2" * 40, ("bob", 3): b"b3" * 40}
    snap = legacy_snapshot(people, legacy_keys_json((e, h, v) for (h, e), v in sealed.items()))
    digest = hashlib.sha256(b"".join(hashlib.sha256(v).digest() for v in (b"b1" * 40, b"b2" * 40, b"b3" * 40)))
    assert snap["state"]["rooms"][0]["legacy_keys"] == {
        "alice": {"epochs": [[1, 1]], "sha256": hashlib.sha256(hashlib.sha256(b"a1" * 40).digest()).hexdigest()},
        "bob": {"epochs": [[1, 3]], "sha256": digest.hexdigest()}}
    state = replay([snap], trust_root=entry_hash(snap))
    assert state.legacy_epochs("r1", "bob") == (1, 2, 3) and state.legacy_epochs("r1", "alice") == (1,)
    state.check_legacy_keys("r1", "bob", {1: b"b1" * 40, 2: b"b2" * 40, 3: b"b3" * 40})
    state.check_legacy_keys("r1", "alice", {1: b"a1" * 40})
    assert state.rooms["r1"].epochs == {}  # still no verified key package: nothing is encrypted with them
    bad = [
        ("r1", "bob", {1: b"a1" * 40, 2: b"b2" * 40, 3: b"b3" * 40}, "not the ones entry 0 records"),  # alice's
        ("r1", "bob", {1: b"b1" * 40, 2: b"b2" * 40, 3: b"x" * 80}, "not the ones entry 0 records"),  # chosen
        ("r1", "bob", {1: b"b1" * 40, 2: b"b2" * 40}, r"for 3 epochs; missing \[3\], not recorded \[\]"),
        ("r2", "bob", {1: b"b1" * 40}, "records no key sealed to bob"),
    ]
    for room, me, keys, why in bad:
        with pytest.raises(LogError, match=why):
            state.check_legacy_keys(room, me, keys)


def test_legacy_keys_of_a_member_deleted_and_added_again_are_not_its_own(people):
    """The same handle added again is another member: entry 0's keys are not for it (a red team)."""
    alice, bob = people["alice"], people["bob"]
    log = Log.__new__(Log)
    log.entries = []
    log.append_raw(lambda seq, prev: snapshot_entry(NOW, [member_doc(alice, "admin"), member_doc(bob)], [
        {"room_id": "r1", "name": "ops", "owner": "alice", "epoch": 1, "rekey_required": False,
         "members": ["alice", "bob"], "legacy_keys": legacy_keys_json([(1, "bob", b"b" * 80)])}]))
    replay(log.entries).check_legacy_keys("r1", "bob", {1: b"b" * 80})
    log.request(alice, "DELETE", "/v1/members/bob")
    log.add_member(alice, bob)
    state = replay(log.entries)
    assert state.members["bob"].since != 0 and state.legacy_epochs("r1", "bob") == ()
    with pytest.raises(LogError, match="records no key sealed to bob"):
        state.check_legacy_keys("r1", "bob", {1: b"b" * 80})


@pytest.mark.parametrize("legacy, why", [
    ([], "is an object"),
    ({"bob": {"epochs": [[1, 4]], "sha256": "0" * 64}}, "within 1 to 3"),  # above the room's epoch
    ({"bob": {"epochs": [[0, 1]], "sha256": "0" * 64}}, "within 1 to 3"),
    ({"bob": {"epochs": [[2, 1]], "sha256": "0" * 64}}, "within 1 to 3"),
    ({"bob": {"epochs": [[1, 1], [2, 3]], "sha256": "0" * 64}}, "separate ranges"),  # not merged
    ({"bob": {"epochs": [[2, 3], [1, 1]], "sha256": "0" * 64}}, "ascending"),
    ({"bob": {"epochs": [], "sha256": "0" * 64}}, "ascending"),
    ({"bob": {"epochs": [[1, True]], "sha256": "0" * 64}}, "ascending"),
    ({"bob": {"epochs": [[1, 1]], "sha256": "0" * 63}}, "SHA-256"),
    ({"bob": {"epochs": [[1, 1]], "sha256": "A" * 64}}, "SHA-256"),
    ({"bob": {"epochs": [[1, 1]], "sha256": "0" * 64, "more": 1}}, "exactly"),
    ({"mallory": {"epochs": [[1, 1]], "sha256": "0" * 64}}, "a known member"),
])
def test_malformed_legacy_keys_are_refused(people, legacy, why):
    with pytest.raises(LogError, match=why) as e:
        replay([legacy_snapshot(people, legacy)])
    assert e.value.seq == 0


def test_a_hostile_entry_0_cannot_make_a_client_fetch_billions_of_keys(people):
    with pytest.raises(LogError, match="10000 epochs at most"):
        replay([legacy_snapshot(people, {"bob": {"epochs": [[1, 2**40]], "sha256": "0" * 64}}, epoch=2**41)])


def test_key_packages(world, people):
    bob = people["bob"]
    state = replay(world.entries)
    head_seq = 4  # the log head bob verified before his keys POST (entry 5)
    head = {"seq": head_seq, "hash": state.hash_at(head_seq)}
    sealed = b"s" * 80
    sig = bob.sign_key.sign(key_package_input("r1", 1, "carol", sealed, head_seq, head["hash"]))
    state.check_key_package("r1", 1, "carol", sealed, sig, "bob", head)
    bad = [
        ("r1", 1, "carol", b"t" * 80, sig, "bob", head, "does not verify"),  # another sealed value
        ("r1", 1, "carol", sealed, sig, "alice", head, "names alice"),  # a sealer the log does not name
        ("r1", 1, "carol", sealed, sig, "bob", {"seq": 4, "hash": "0" * 64}, "not in the verified log"),
        ("r1", 2, "carol", sealed, sig, "bob", head, "no rekey to epoch 2"),  # a server-chosen epoch
        ("r1", 1, "alice", sealed, sig, "bob", head, "not in the room"),
    ]
    for room, epoch, me, s, g, sealer, h, why in bad:
        with pytest.raises(LogError, match=why):
            state.check_key_package(room, epoch, me, s, g, sealer, h)


def test_a_package_is_refused_when_someone_it_was_sealed_to_is_gone_by_the_rekey(people):
    """Between the sealer's head and the logged rekey: a member removed, or deleted and added
    again (another member under the same handle), refuses the package; one added does not."""
    alice, bob, carol, dave = people["alice"], people["bob"], people["carol"], people["dave"]
    dave2 = generate_identity("dave")

    def package(state, me, head_seq):
        head = {"seq": head_seq, "hash": state.hash_at(head_seq)}
        sig = bob.sign_key.sign(key_package_input("r1", 1, me, b"s" * 80, head_seq, head["hash"]))
        state.check_key_package("r1", 1, me, b"s" * 80, sig, "bob", head)

    def room_with(*handles):
        log = Log(alice)
        for who in (bob, carol, dave):
            log.add_member(alice, who)
        log.create_room(bob, "r1")
        for h in handles:
            log.request(bob, "PUT", f"/v1/rooms/r1/members/{h}")
        return log

    log = room_with("carol")  # the head bob seals at: bob, carol
    head_seq = log.head[0]
    log.request(bob, "PUT", "/v1/rooms/r1/members/dave")  # added in between: no risk
    log.rekey(bob, "r1", 1)
    package(replay(log.entries), "carol", head_seq)

    log = room_with("carol", "dave")
    head_seq = log.head[0]
    log.request(bob, "DELETE", "/v1/rooms/r1/members/dave")  # dave left: his copy opens the same key
    log.rekey(bob, "r1", 1)
    with pytest.raises(LogError, match=r"sealed at seq \d+ to members who are gone by the rekey .*: dave \(removed"):
        package(replay(log.entries), "carol", head_seq)

    log = room_with("carol", "dave")
    head_seq = log.head[0]
    log.request(alice, "DELETE", "/v1/members/dave")
    log.add_member(alice, dave2)  # the same handle, other keys: another member
    log.request(bob, "PUT", "/v1/rooms/r1/members/dave")
    log.rekey(bob, "r1", 1)
    state = replay(log.entries)
    assert state.rooms["r1"].epochs[1].roster == {"bob", "carol", "dave"}  # the same names
    with pytest.raises(LogError, match="gone by the rekey .*: dave"):
        package(state, "carol", head_seq)
    # and the old dave's signing key speaks for nobody under a package of that head
    with pytest.raises(LogError, match="dave was deleted and added again"):
        state.check_sender("r1", "dave", head_seq)
    assert state.check_sender("r1", "carol", head_seq).handle == "carol"
    with pytest.raises(LogError, match="no rekey to epoch 2"):
        state.check_roster_kept("r1", 2, head_seq)


def test_every_entry_hash_is_over_the_canonical_json(world):
    e = world.entries[1]
    reordered = dict(reversed(list(e.items())))
    assert entry_hash(reordered) == entry_hash(e)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_single_byte_change_is_caught(people, data):
    alice, bob = people["alice"], people["bob"]
    log = Log(alice)
    log.add_member(alice, bob)
    log.create_room(bob, "r1")
    text = json.dumps(log.entries[1])
    i = data.draw(st.integers(0, len(text) - 1))
    ch = data.draw(st.sampled_from("aZ0 }\"9"))
    changed = text[:i] + ch + text[i + 1:]
    try:
        tampered = json.loads(changed)
    except ValueError:
        return  # not JSON any more: a transport error, not a log
    if tampered == log.entries[1]:
        return  # the change did not change the value (e.g. whitespace)
    with pytest.raises(LogError):
        replay([log.entries[0], tampered, log.entries[2]])


def test_a_trusted_replay_rebuilds_the_same_state_without_the_signature_checks(world, people):
    """A client's own replica (docs/client.md): hashes given, signatures and created not checked again."""
    import hashlib

    verified = LogState(skew=60)
    lines = []
    for e in world.entries:
        digest, raw = verified.apply_canonical(copy.deepcopy(e))
        assert hashlib.sha256(raw).hexdigest() == digest == entry_hash(e)
        lines.append(raw)
    trusted = LogState(skew=1)  # a later, smaller --auth-skew must not break the replay of old entries
    for raw in lines:
        trusted.apply(json.loads(raw), trusted_hash=hashlib.sha256(raw).hexdigest())
    assert trusted.head == verified.head and trusted.nonces == verified.nonces
    assert {h: m.as_json() for h, m in trusted.members.items()} == {h: m.as_json() for h, m in verified.members.items()}
    assert {r: x.as_json() for r, x in trusted.rooms.items()} == {r: x.as_json() for r, x in verified.rooms.items()}
    assert trusted.rooms["r1"].epochs == verified.rooms["r1"].epochs
    # the chain and the rules still hold in a trusted replay
    chained = LogState()
    chained.apply(json.loads(lines[0]), trusted_hash="0" * 64)  # a wrong hash for entry 0...
    with pytest.raises(LogError, match="prev is not the hash"):
        chained.apply(json.loads(lines[1]), trusted_hash=hashlib.sha256(lines[1]).hexdigest())  # ...breaks the chain
    bad = copy.deepcopy(world)
    bad.add_member(people["bob"], people["dave"])
    state = LogState()
    for raw in lines:
        state.apply(json.loads(raw), trusted_hash=hashlib.sha256(raw).hexdigest())
    with pytest.raises(LogError, match="without being an admin"):
        state.apply(bad.entries[-1], trusted_hash=entry_hash(bad.entries[-1]))


def test_deferred_checks_name_the_first_bad_entry(world, people):
    """defer_checks/run_deferred: the Ed25519 work in bulk, the verdict of a sequential replay."""
    big = copy.deepcopy(world)
    for i in range(40):  # enough entries for the parallel path
        big.request(people["bob"], "PUT", "/v1/rooms/r1/members/alice" if i % 2 == 0 else "/v1/rooms/r1/members/bob")
    state = LogState()
    state.defer_checks()
    for e in big.entries:
        state.apply(copy.deepcopy(e))
    assert state.run_deferred() is None
    assert state.head == replay(big.entries).head
    entries = copy.deepcopy(big.entries)
    _flip_signature(entries[20])
    _flip_signature(entries[30])
    for i in range(21, len(entries)):  # re-chained: only the signatures are wrong
        entries[i]["prev"] = entry_hash(entries[i - 1])
    state = LogState()
    state.defer_checks()
    for e in entries:
        state.apply(copy.deepcopy(e))
    assert state.run_deferred() == (20, "the signature does not verify with bob's signing key")
    with pytest.raises(LogError) as e:
        replay(entries)
    assert e.value.seq == 20
    # a signing key that is not a valid point, in a deferred replay
    bad_key = bytes(32)  # the identity... encoded: not a valid public key
    doc = {**member_doc(people["dave"]), "sign_pub": base64.b64encode(bad_key).decode()}
    log = Log(people["alice"])
    log.append_raw(lambda seq, prev: bootstrap_entry(seq, prev, NOW, doc))
    state = LogState(accepted_bootstraps=[entry_hash(log.entries[1])])
    state.defer_checks()
    for e in log.entries:
        state.apply(copy.deepcopy(e))
    found = state.run_deferred(workers=1)
    assert found is not None and found[0] == 1 and "not a valid Ed25519 public key" in found[1]
    with pytest.raises(LogError, match="sign_pub"):
        replay(log.entries, accepted_bootstraps=[entry_hash(log.entries[1])])


def test_a_body_that_is_not_a_string_is_refused(world):
    entries = copy.deepcopy(world.entries)
    entries[3]["request"]["body"] = 0.0  # falsy: must not pass for an empty body
    for i in range(4, len(entries)):
        entries[i]["prev"] = entry_hash(entries[i - 1])
    with pytest.raises(LogError, match="body must be a base64 string") as e:
        replay(entries)
    assert e.value.seq == 3


def test_legacy_keys_do_not_grow_with_the_epochs():
    """Entry 0 of a cluster is one KV value (max_payload, 1 MiB by default): a digest per key made a
    0.11 deployment of 20 members, 4 rooms and 200 rekeys each too big to write (a red team)."""
    sealed = [(e, f"m{i}", bytes([e % 256]) * 80) for e in range(1, 201) for i in range(20)]
    doc = legacy_keys_json(sealed)
    assert all(record["epochs"] == [[1, 200]] for record in doc.values())
    assert len(json.dumps(doc)) < 20 * 150  # per member, not per key: 4,000 keys in under 3 KB


def test_a_hostile_entry_0_s_ranges_are_kept_as_ranges(people):
    """A red team: every [[1, 10000]] of a hostile entry 0 (met on first use) became 10,000 ints, for
    every member and room: 187 MiB from 58 KB. Ranges are kept; only a member's own are listed."""
    snap = legacy_snapshot(people, {"bob": {"epochs": [[1, 5000], [5002, 10001]], "sha256": "0" * 64},
                                    "alice": {"epochs": [[3, 3]], "sha256": "1" * 64}}, epoch=10001)
    state = replay([snap])
    assert state._legacy[("r1", "bob")][0] == ((1, 5000), (5002, 10001))
    assert state.legacy_covers("r1", "bob", 10001) and not state.legacy_covers("r1", "bob", 5001)
    assert len(state.legacy_epochs("r1", "bob")) == 10000 and state.legacy_epochs("r1", "alice") == (3,)


def test_an_add_signed_before_a_removal_the_log_holds_earlier_is_flagged_held_back(world, people):
    """LogState.held_back (a rekey refuses to seal to such a member; docs/client.md, "Changes
    confirmed in the log"): an add signed HELD_BACK_MARGIN (30 s) or more before a removal of the
    member that the log holds earlier, by any author, is a try a server kept. A review of the first
    rule: it compared with the pair's latest removal only (another author's in between hid it),
    and an add that changed nothing raised or cleared the flag. The first rule took only the add's
    own author's removals; another author's kept add went through (stop 38's open list)."""
    alice, bob = people["alice"], people["bob"]
    world.request(bob, "DELETE", "/v1/rooms/r1/members/carol", created=NOW)
    world.request(alice, "PUT", "/v1/rooms/r1/members/carol", created=NOW + 1)  # an admin adds her back
    assert replay(world.entries).held_back == {}
    world.request(bob, "PUT", "/v1/rooms/r1/members/carol", created=NOW - 100)  # bob's kept add: a no-op now
    assert replay(world.entries).held_back == {}  # nothing added: no flag
    world.request(alice, "DELETE", "/v1/rooms/r1/members/carol", created=NOW + 2)
    kept = world.request(bob, "PUT", "/v1/rooms/r1/members/carol", created=NOW - 28)["seq"]  # 30 s before alice's
    state = replay(world.entries)
    assert "carol" in state.rooms["r1"].members and state.held_back == {("r1", "carol"): (kept, kept - 1)}
    world.request(alice, "PUT", "/v1/rooms/r1/members/carol", created=NOW + 3)  # a no-op add clears nothing
    assert replay(world.entries).held_back == {("r1", "carol"): (kept, kept - 1)}
    world.request(alice, "DELETE", "/v1/rooms/r1/members/carol", created=NOW + 4)  # a removal clears it
    world.request(bob, "PUT", "/v1/rooms/r1/members/carol", created=NOW - 25)  # within the margin: not flagged
    assert replay(world.entries).held_back == {}
    # the removal signed last counts, whatever the order the log holds removals in
    world.request(bob, "DELETE", "/v1/rooms/r1/members/carol", created=NOW + 40)
    world.request(alice, "PUT", "/v1/rooms/r1/members/carol", created=NOW + 41)
    world.request(alice, "DELETE", "/v1/rooms/r1/members/carol", created=NOW + 5)  # signed earlier, logged later
    kept = world.request(alice, "PUT", "/v1/rooms/r1/members/carol", created=NOW + 10)["seq"]
    assert replay(world.entries).held_back == {("r1", "carol"): (kept, kept - 3)}  # bob's removal, signed last


def test_a_change_its_client_gave_up_on_logged_after_a_later_one_is_kept_back(world, people):
    """LogState.kept_back (docs/client.md, "Changes confirmed in the log"): a change its author's
    client has not seen confirmed (``in_doubt``, which a client knows of its own requests only: in
    flight, or given up on with the head it read then) that the log holds after a request the same
    author signed later, or after that head, was held back by the server. Unlike held_back's 30 s
    rule it needs no margin. A room add that put the member back is also held_back; a change the
    log holds before both is not kept back."""
    alice = people["alice"]
    world.request(alice, "DELETE", "/v1/rooms/r1/members/carol", created=NOW, nonce="honest-timeout-00")
    world.request(alice, "PUT", "/v1/rooms/r1/members/carol", created=NOW + 1, nonce="n-later-add-00000")
    world.request(alice, "PATCH", "/v1/members/bob", {"role": "member"}, created=NOW + 2)
    head = len(world.entries) - 1
    in_doubt: dict = {("alice", "honest-timeout-00"): head}  # given up on, logged before anything later
    state = replay(world.entries, in_doubt=in_doubt)
    assert state.kept_back == {} and state.held_back == {}
    # alice's add of carol, signed at NOW + 3, is held by the server (in flight); she removes carol at NOW + 4
    world.request(alice, "DELETE", "/v1/rooms/r1/members/carol", created=NOW + 4)
    removal = len(world.entries) - 1
    kept = world.request(alice, "PUT", "/v1/rooms/r1/members/carol", created=NOW + 3, nonce="kept-add-0000000")["seq"]
    assert replay(world.entries).held_back == {}  # 1 s before the removal: within held_back's margin
    in_doubt[("alice", "kept-add-0000000")] = None  # still in flight: already caught
    state = replay(world.entries, in_doubt=in_doubt)
    assert "carol" in state.rooms["r1"].members
    assert state.kept_back == {kept: KeptBack("alice", "kept-add-0000000", "room.member_add", ("r1", "carol"),
                                              removal, None)}
    assert state.held_back == {("r1", "carol"): (kept, removal)}
    # another author's later request does not count: one identity's clock
    assert replay(world.entries, in_doubt={("bob", "kept-add-0000000"): None}).kept_back == {}
    # signed in the same second as the later request: not known to be before it, not flagged
    world.request(alice, "DELETE", "/v1/rooms/r1/members/carol", created=NOW + 6)
    world.request(alice, "PUT", "/v1/rooms/r1/members/carol", created=NOW + 6, nonce="same-second-0000")
    in_doubt[("alice", "same-second-0000")] = None
    assert ("r1", "carol") not in replay(world.entries, in_doubt=in_doubt).held_back
    # given up on with the log read up to `head`, appended after it, with no later request: kept back
    head = len(world.entries) - 1
    late = world.request(alice, "PATCH", "/v1/members/bob", {"role": "member"}, created=NOW + 7,
                         nonce="kept-role-000000")["seq"]
    in_doubt[("alice", "kept-role-000000")] = head
    state = replay(world.entries, in_doubt=in_doubt)
    assert state.kept_back[late] == KeptBack("alice", "kept-role-000000", "member.role", ("bob",), None, head)
    assert state.kept_back[late].after == head
    in_doubt[("alice", "kept-role-000000")] = late  # read after it was appended: in order, an honest one
    assert late not in replay(world.entries, in_doubt=in_doubt).kept_back


async def test_the_replica_keeps_changes_until_the_log_settles_them(world, people, tmp_path, monkeypatch):
    """Replica.begin_change / settle_change / give_up: kept in state.json (0600, replaced whole), so
    another command of the same identity knows them; a replay of the files finds a kept-back change
    again, and a settled one is replayed out of it; a change whose process ended is taken for given
    up; forgotten once the log holds it given up on in order, or can no longer take it (older than
    twice the skew before its newest); at most GAVE_UP_MAX; a malformed record is a damaged replica."""
    from unibus.client import replica as replica_mod
    from unibus.client.replica import ReplicaError

    alice = people["alice"]
    now = NOW + 10  # after the world's requests (signed at NOW)
    directory = tmp_path / "replica"
    replica = Replica("http://127.0.0.1:1", directory)
    await replica.sync(_Server(world.entries, 600))
    for nonce, created in (("logged-in-order-0", now - 5), ("kept-add-0000000", now - 4),
                           ("never-logged-000", now - 3), ("too-old-for-logs", now - 2 * MAX_AUTH_SKEW - 10),
                           ("confirmed-000000", now - 2), ("in-flight-000000", now + 1)):
        await replica.begin_change("alice", nonce, created)
    head = replica.state.head[0]
    for nonce in ("logged-in-order-0", "kept-add-0000000", "never-logged-000", "too-old-for-logs"):
        await replica.give_up("alice", nonce, head + 1)  # the first is logged at head + 1, before the read
    await replica.settle_change("alice", "confirmed-000000")
    assert replica.latest_in_flight() == now + 1
    world.request(alice, "PATCH", "/v1/members/bob", {"role": "member"}, created=now - 5, nonce="logged-in-order-0")
    world.request(alice, "DELETE", "/v1/rooms/r1/members/carol", created=now)
    kept = world.request(alice, "PUT", "/v1/rooms/r1/members/carol", created=now - 4, nonce="kept-add-0000000")["seq"]
    world.request(alice, "PUT", "/v1/rooms/r1/members/bob", created=now + 1, nonce="in-flight-000000")
    await replica.sync(_Server(world.entries, 600))
    assert set(replica.state.kept_back) == {kept} and ("r1", "carol") in replica.state.held_back
    assert set(replica._changes) == {("alice", "kept-add-0000000"), ("alice", "never-logged-000"),
                                     ("alice", "in-flight-000000")}  # in flight: kept until settled
    again = Replica("http://127.0.0.1:1", directory)  # another process: replays the files
    async with again.locked():
        assert again.in_doubt == replica.in_doubt and set(again.state.kept_back) == {kept}
    # a process that ended with a change in flight gave up on it (a kill): the next one says so
    state = directory / "state.json"
    doc = json.loads(state.read_text())
    assert doc["version"] == 2
    this_host = replica_mod._namespace()
    for record in doc["changes"]:
        if record["nonce"] == "in-flight-000000":
            record["process"] = f"{this_host}/999999999/1"  # no such pid
    state.write_text(json.dumps(doc))
    again = Replica("http://127.0.0.1:1", directory)
    async with again.locked():
        assert again._changes[("alice", "in-flight-000000")].process is None
        # given up with no head read after it: the log holding it is taken for held back (a kill
        # right after an honest server made it meets this too, as documented)
        assert {k.nonce for k in again.state.kept_back.values()} == {"kept-add-0000000", "in-flight-000000"}
    assert '"process": null' in state.read_text() and "999999999" not in state.read_text()
    # another host's or container's process cannot be looked at: taken to run while its change is fresh
    assert replica_mod._process_alive("b|another-host|ns/1/1", int(time.time()))
    assert not replica_mod._process_alive("b|another-host|ns/1/1", int(time.time()) - MAX_AUTH_SKEW - 5)
    monkeypatch.setattr(replica_mod, "GAVE_UP_MAX", 1)  # not counting the kept-back ones
    await again.begin_change("alice", "one-more-000000000", now + 2)
    assert set(again._changes) == {("alice", "kept-add-0000000"), ("alice", "in-flight-000000"),
                                   ("alice", "one-more-000000000")}
    doc = json.loads(state.read_text())
    doc["changes"][0]["given_up_at"] = "soon"
    state.write_text(json.dumps(doc))
    with pytest.raises(ReplicaError, match="damaged"):
        async with Replica("http://127.0.0.1:1", directory).locked():
            pass
