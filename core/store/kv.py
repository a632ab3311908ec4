"""The JetStream KV store: cluster-mode state in one KV bucket, written with atomic batches.

:class:`KvStore` is the domain store: members, rooms, sealed keys and the
membership log, each operation a read, a check and one conditional atomic
batch. It is built from one module per concern:

- :mod:`unibus.store.kv_layout`: the keys of the bucket and their JSON records;
- :mod:`unibus.store.kv_txn`: reads, conditional writes, atomic batches, retries;
- :mod:`unibus.store.kv_watch`: other nodes' writes, reported as ``reloaded``;
- :mod:`unibus.store.kv_migrate`: ``migrate-to-kv`` (:func:`copy_store`) and backup snapshots.

A logged change (``logged=``) adds to its batch the entry ``log.<seq>``, its
``lognonce.`` key (created only if absent) and ``meta.loghead``, conditional
on the head revision it read: every logged change through every node is
serialised by that head, and the log cannot fork (docs/store.md, "The
membership log in KV").

Where a reference must stay valid (a room's member, a room's owner at creation), the
batch also rewrites the referenced member record unchanged with its revision as
condition (a "touch"): a concurrent ``delete_member`` then loses, or makes this
write lose. ``docs/store.md`` lists each operation's batch and its crash behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..aio import within
from ..errors import RuntimeFailure
from ..memberlog import snapshot_entry
from ..wire import nkey_from_sign_pub
from .base import (
    Conflict,
    KeyPackage,
    LogRecord,
    LogRejected,
    Member,
    Membership,
    NotFound,
    Room,
    StoreUnavailable,
    authority_room,
    check_appendable,
    check_authority,
    check_new_epoch,
    entry_text,
    snapshot_member,
    snapshot_room,
)
from .kv_layout import (
    ADMINS_KEY,
    HIGH_WATER_KEY,
    IMPORTING_FIELD,
    LOG_HEAD_KEY,
    SCHEMA_KEY,
    SCHEMA_VERSION,
    STATE_BUCKET,
    _b64d,
    _bkey,
    _gkey,
    _keys_record,
    _kkey,
    _lkey,
    _member,
    _member_json,
    _mkey,
    _nonce_key,
    _rkey,
    _room_state,
    _sign_key_of_nkey,
    _skey,
    _ts,
    _valid,
)
from .kv_migrate import KvMigrate, KvSnapshot, copy_store
from .kv_txn import MAX_BATCH, _CasLost, _none, _Write
from .kv_watch import KvWatch
from .sqlite import new_room_id

log = logging.getLogger("unibus.store.kv")

#: Log entries read at once by ``log_entries``.
LOG_READ_CHUNK = 64
#: Rounds of writes one :meth:`KvStore._sweep_gone` makes at most (a room rewritten
#: concurrently makes its batch lose, and it is read and written again in the next round).
#: A member rewriting a room of its own in a loop makes each round lose with some odds
#: (measured in the store's contract test: about 0.75, and every one of 12 rounds lost in a
#: CI run on 2 busy cores): 64 rounds, each after a pause of up to 20 ms.
SWEEP_ROUNDS = 64
#: Seconds after which :meth:`KvStore._sweep_gone` tries no more rooms that lost (each costs
#: a read and a write, one after the other: a member rewriting many rooms makes rounds long).
SWEEP_SECONDS = 3.0
#: Reads of every room one :meth:`KvStore._sweep_gone` makes at most (a later deletion of
#: the handle makes it read them again).
SWEEP_SCANS = 12
#: Rooms read again and written at once after a batch of the first read lost; a batch
#: read again that loses is tried next one room at a time, so that the room rewritten in
#: a loop holds back no other.
SWEEP_RETRY_CHUNK = 16
#: Seconds a node's start spends at most finishing clean-ups a crash cut short.
CLEAR_ON_START = 30.0


@dataclass(frozen=True)
class _LogPosition:
    """Where the next log entry goes, and the revisions its batch is conditional on."""

    seq: int
    prev: str
    head_rev: int
    max_created: int
    nonce_rev: int


def _seq(pos: _LogPosition | None) -> int | None:
    """The log seq a logged write took (None: nothing was logged)."""
    return pos.seq if pos is not None else None


@dataclass
class _Cleared:
    """What :meth:`KvStore._sweep_gone` took out of room records: the rooms a deleted member
    was in, and the ``(room_id, first, last)`` epochs sealed to it."""

    left: set[str] = field(default_factory=set)
    strip: set[tuple[str, int, int]] = field(default_factory=set)


def _leave_rooms(handle: str, rooms: dict[str, tuple[dict[str, Any], int]]
                 ) -> tuple[list[_Write], list[str], list[tuple[str, int, int]]]:
    """What deleting ``handle`` writes to the room records of ``rooms`` (``_scan("room")``): the writes,
    the rooms it was a member of, and the ``(room_id, first, last)`` epochs sealed to it."""
    writes: list[_Write] = []
    left: list[str] = []
    strip: list[tuple[str, int, int]] = []
    for room, rrev in rooms.values():
        was_member = handle in room["members"]
        rng = room.get("sealed", {}).get(handle)
        if not (was_member or rng or room.get("owner") == handle):
            continue
        new = dict(room)
        new["members"] = [h for h in room["members"] if h != handle]
        new["sealed"] = {h: r for h, r in room.get("sealed", {}).items() if h != handle}
        if was_member:
            new["rekey_required"] = True
            left.append(room["room_id"])
        if room.get("owner") == handle:
            # Ownership dies with the member: a later member reusing the handle must not inherit it.
            new["owner"] = ""
        if rng:
            strip.append((room["room_id"], rng[0], rng[1]))
        writes.append(_Write(_rkey(room["room_id"]), new, rrev))
    return writes, left, strip


def _live_room(room: dict[str, Any], known: dict[str, Any] | set[str] | frozenset[str]) -> dict[str, Any]:
    """``room`` as readers see it, ``known`` holding every member that exists among its roster
    and owner: a handle of no member is not in its roster, a room that names one in its roster
    needs a rekey, and an owner that is no member is ``""``.

    A deletion leaves its handle in room records until :meth:`KvStore._sweep_gone`
    removes it, just after (docs/store.md, "Each operation").
    """
    roster = room["members"]
    live = [h for h in roster if h in known]
    owner = room.get("owner", "")
    if len(live) == len(roster) and (not owner or owner in known):
        return room
    return {**room, "members": live, "owner": owner if owner in known else "",
            "rekey_required": bool(room["rekey_required"]) or len(live) != len(roster)}


def _named(room: dict[str, Any]) -> list[str]:
    """The handles a room record names that readers must look up: its roster and its owner."""
    owner = room.get("owner", "")
    return [*room["members"], owner] if owner and _valid(owner) else list(room["members"])


def _unsigned(room: dict[str, Any], keys: dict[str, tuple[dict[str, Any], int]]) -> list[tuple[int, str, bytes]]:
    """``(epoch, handle, sealed)`` of the room's keys sealed before the log (no signature) that its
    record still lets each member read (its ``sealed`` range), for entry 0's ``legacy_keys``."""
    out = []
    for handle, (first, last) in sorted(room.get("sealed", {}).items()):
        for epoch in range(int(first), int(last) + 1):
            record = keys.get(_kkey(room["room_id"], epoch), ({}, 0))[0]
            value = record.get("sealed", {}).get(handle)
            if value is not None and handle not in record.get("sigs", {}):
                out.append((epoch, handle, _b64d(value)))
    return out


class KvStore(KvWatch, KvMigrate):
    """Members, rooms, room members and sealed keys in a JetStream KV bucket.

    ``js`` is a nats-py JetStream context (``Bus.js``). Every call is bounded by
    ``timeout`` seconds; when JetStream cannot answer (no connection, no stream
    leader, no quorum) it raises :class:`StoreUnavailable` — the HTTP layer's 503.
    """

    cluster_wide = True

    # -- the membership log ----------------------------------------------------------

    async def _log_position(self, logged: LogRecord | None) -> _LogPosition | None:
        """Read the head (writing entry 0 first if the bucket has state but no log) and
        check ``logged`` against the log; None when nothing is to be logged."""
        if logged is None:
            return None
        if not _valid(logged.keyid, logged.nonce):  # handles and nonces are KV-safe: this is a bug guard
            raise LogRejected("this keyid or nonce cannot be recorded in the membership log")
        (head, hrev), (seen, nrev) = await asyncio.gather(self._read(LOG_HEAD_KEY),
                                                          self._read(_nonce_key(logged.keyid, logged.nonce)))
        if head is None:
            if await self._write_root():
                raise _CasLost()  # the log has its entry 0 now: read the head again
            head = {"seq": -1, "hash": "", "max_created": 0}
        if IMPORTING_FIELD in head:
            raise StoreUnavailable(f"membershipd migrate-to-kv is copying into KV bucket {self.bucket}, or was cut "
                                   "short: changes wait until it has finished (run it again if it stopped)")
        max_created = int(head.get("max_created", 0))
        check_appendable(logged, max_created, seen is not None)
        # Read after the head: a write committed since makes this one's head CAS fail (retried).
        room_id = authority_room(logged)
        (author, _arev), (room, _rrev) = await asyncio.gather(
            self._read(_mkey(logged.keyid)),
            self._read(_rkey(room_id)) if room_id is not None and _valid(room_id) else _none())
        check_authority(logged, author.get("role") if author is not None else None,
                        room.get("owner", "") if room is not None else None,
                        room is not None and logged.keyid in room.get("members", ()),
                        _member(author).sign_pub if author is not None else None)
        return _LogPosition(int(head["seq"]) + 1, str(head["hash"]), hrev, max_created, nrev)

    @staticmethod
    def _log_writes(pos: _LogPosition | None, logged: LogRecord | None, result: dict[str, Any]) -> list[_Write]:
        """The writes that append ``logged``'s entry at ``pos``: entry, nonce, head (conditional on the head read)."""
        if pos is None or logged is None:
            return []
        digest, text = logged.entry(pos.seq, pos.prev, result)
        head = {"seq": pos.seq, "hash": digest, "max_created": max(pos.max_created, logged.created)}
        return [_Write(_lkey(pos.seq), None, 0, raw=text.encode("utf-8")),
                _Write(_nonce_key(logged.keyid, logged.nonce), {"seq": pos.seq}, pos.nonce_rev),
                _Write(LOG_HEAD_KEY, head, pos.head_rev)]

    async def _write_root(self) -> bool:
        """Entry 0, a snapshot of the bucket's state, when the bucket has members but no log
        (a cluster upgraded from 0.11). True when the log has a head afterwards."""
        head, hrev = await self._read(LOG_HEAD_KEY)
        if head is not None:
            return True
        members, rooms, keys = await asyncio.gather(self._scan("member"), self._scan("room"), self._scan("keys"))
        if not members:
            return False
        ms = sorted((_member(v) for v, _rev in members.values()), key=lambda m: m.handle)
        known = frozenset(m.handle for m in ms)
        lives = [(_live_room(v, known), v) for v, _rev in rooms.values()]
        entry = snapshot_entry(int(time.time()), [snapshot_member(m) for m in ms],
                               [snapshot_room(r["room_id"], r["name"], r.get("owner", ""), r["epoch"],
                                              r["rekey_required"], set(r["members"]), known, _unsigned(v, keys))
                                for r, v in lives])
        digest, text = entry_text(entry)
        limit = getattr(self._nc, "max_payload", None)
        if isinstance(limit, int) and len(text.encode("utf-8")) > limit - 1024:
            # Entry 0 is one KV value: a snapshot past max_payload (a 0.11 state with very many rooms,
            # members and keys of 0.11) could never be written, and every logged write failed on it.
            raise RuntimeFailure(f"entry 0 of the membership log (the snapshot of this bucket's state) is "
                                 f"{len(text.encode('utf-8'))} bytes, more than NATS carries in one message "
                                 f"(max_payload {limit}): keep this state on a single node, or raise max_payload "
                                 "on every nats-server of the cluster (docs/operations.md, \"Upgrading from "
                                 "0.11\")")
        try:
            # Conditional on no head and no entry 0: of two nodes starting at once, one writes it.
            await self._commit([_Write(_lkey(0), None, 0, raw=text.encode("utf-8")),
                                _Write(LOG_HEAD_KEY, {"seq": 0, "hash": digest, "max_created": 0}, hrev)])
            log.info("membership log: wrote entry 0 (snapshot of %d members, %d rooms); trust root fingerprint %s",
                     len(ms), len(rooms), digest)
        except _CasLost:
            head, _hrev = await self._read(LOG_HEAD_KEY)
            if head is None:
                raise StoreUnavailable(f"KV bucket {self.bucket} has membership log entries but no head (an "
                                       "interrupted membershipd migrate-to-kv?): run migrate-to-kv again") from None
        return True

    async def log_head(self) -> tuple[int, str]:
        head, _rev = await self._read(LOG_HEAD_KEY)
        return (int(head["seq"]), str(head["hash"])) if head is not None else (-1, "")

    async def log_entries(self, after: int = -1, limit: int = 500) -> list[str]:
        last, _hash = await self.log_head()
        seqs = list(range(max(after, -1) + 1, min(last, after + limit) + 1))
        out: list[str] = []
        for i in range(0, len(seqs), LOG_READ_CHUNK):
            got = await asyncio.gather(*(self._read_raw(_lkey(q)) for q in seqs[i:i + LOG_READ_CHUNK]))
            for q, (raw, _rev) in zip(seqs[i:i + LOG_READ_CHUNK], got):
                if raw is None:
                    raise StoreUnavailable(f"membership log entry {q} is missing from KV bucket {self.bucket}")
                out.append(raw.decode("utf-8"))
        return out

    async def log_hash_at(self, seq: int) -> str | None:
        if seq < 0:
            return None
        raw, _rev = await self._read_raw(_lkey(seq))
        # The stored text is the entry's canonical JSON: its hash is the entry's hash.
        return hashlib.sha256(raw).hexdigest() if raw is not None else None

    # -- replay protection's high-water mark ------------------------------------------

    async def nonce_high_water(self) -> int:
        value, _rev = await self._read(HIGH_WATER_KEY)
        return int(value["created"]) if value is not None else 0

    async def raise_nonce_high_water(self, value: int) -> int:
        async def attempt() -> int:
            stored, rev = await self._read(HIGH_WATER_KEY)
            current = int(stored["created"]) if stored is not None else 0
            if current >= value:
                return current
            # Conditional on the revision read: of two nodes raising it at once,
            # the loser re-reads and keeps the larger mark.
            await self._commit([_Write(HIGH_WATER_KEY, {"created": value}, rev)])
            return value

        return await self._retrying(attempt)

    # -- the bucket --------------------------------------------------------------

    async def ensure(self) -> None:
        """Create or update the bucket (:meth:`KvBucket._ensure_bucket`), check its schema,
        and write the log's entry 0 if the bucket has members but no log."""
        await self._ensure_bucket()
        _schema, rev = await self._read(SCHEMA_KEY)
        if _schema is None:
            with contextlib.suppress(_CasLost):
                await self._commit([_Write(SCHEMA_KEY, {"version": SCHEMA_VERSION}, rev)])
        elif _schema.get("version", 0) > SCHEMA_VERSION:
            raise StoreUnavailable(f"KV bucket {self.bucket} holds schema {_schema['version']}; "
                                   f"this membershipd knows {SCHEMA_VERSION}: upgrade it")
        await self._write_root()
        await self._clear_gone()

    async def _clear_gone(self) -> None:
        """Finish clearing the room records of deletions cut short after their batch (a crash, a
        store that could not answer): each ``gone.<handle>`` left, on one read of the rooms, for
        at most :data:`CLEAR_ON_START` seconds. Best effort: readers and ``add_member`` do not
        depend on it, and the next start goes on."""
        async def clear() -> None:
            marks = await self._scan("gone")
            if not marks:
                return
            rooms = await self._scan("room")  # after the marks: it is valid for each of them
            for key, (mark, _rev) in sorted(marks.items()):
                handle = key.split(".", 1)[1]
                cleared = _Cleared()
                try:  # one handle's failure (a refused write) leaves the others to clear
                    done = await self._sweep_gone(handle, cleared, (mark, rooms))
                    why = "rooms kept changing while they were rewritten"
                except StoreUnavailable as e:
                    done, why = False, str(e)
                if done:
                    await self._strip_sealed(handle, cleared.strip)
                    log.info("cleared deleted member %s from the room records that still named it", handle)
                else:
                    log.warning("deleted member %s is still named in some room records (readers take it as "
                                "gone): %s", handle, why)

        try:
            await within(clear(), CLEAR_ON_START)
        except Exception as e:  # noqa: BLE001 - best effort (see above)
            log.warning("could not clear every deleted member from the room records that name it (readers take "
                        "them as gone; the next start goes on): %s", f"{type(e).__name__} {e}".strip())

    # -- bus authorization's reads (with revisions) ----------------------------------

    async def bus_member(self, handle: str) -> tuple[bool, str | None, int]:
        if not _valid(handle):
            return False, None, 0
        value, rev = await self._read(_mkey(handle))
        return value is not None, (value or {}).get("bus_pub"), rev

    async def room_handles(self, room_id: str) -> tuple[frozenset[str] | None, int]:
        if not _valid(room_id):
            return None, 0
        value, rev = await self._read(_rkey(room_id))
        return (frozenset(value["members"]) if value is not None else None), rev

    # -- members ---------------------------------------------------------------

    async def list_members(self) -> list[Member]:
        rows = await self._scan("member")
        return sorted((_member(v) for v, _rev in rows.values()), key=lambda m: m.handle)

    async def get_member(self, handle: str) -> Member | None:
        if not _valid(handle):
            return None
        value, _rev = await self._read(_mkey(handle))
        return _member(value) if value else None

    async def _bus_pub_taken(self, bus_pub: str, handle: str) -> tuple[str | None, int]:
        """Why ``bus_pub`` cannot be ``handle``'s bus key (or None), and the revision of ``bus.<bus_pub>``.

        The ``bus.`` index holds every member's bus key and the nkey of every
        member's signing key; ``sign.<hex>`` is read too, for members whose
        signing key was indexed before the ``bus.`` index existed.
        """
        if not _valid(bus_pub):
            raise ValueError(f"bus_pub {bus_pub!r} cannot be a KV key")
        skey = _sign_key_of_nkey(bus_pub)
        (entry, rev), (signer, _srev) = await asyncio.gather(
            self._read(_bkey(bus_pub)), self._read(skey) if skey else _none())
        if entry is not None:
            if entry.get("key") == "sign":
                return "this bus_pub is the nkey of a member's sign_pub; a signing key never logs in to the bus", rev
            if entry.get("handle") != handle:
                return "another member already has this bus_pub", rev
        if signer is not None:
            return "this bus_pub is the nkey of a member's sign_pub; a signing key never logs in to the bus", rev
        return None, rev

    async def _add_member(self, member: Member, logged: LogRecord | None) -> tuple[Member, int | None]:
        if not _valid(member.handle):
            raise ValueError(f"handle {member.handle!r} cannot be a KV key")
        sign_nkey = nkey_from_sign_pub(member.sign_pub)
        if member.bus_pub is not None and member.bus_pub == sign_nkey:
            raise Conflict("bus_pub is the nkey of the member's own sign_pub; the bus key must be a separate key")

        async def attempt() -> tuple[Member, int | None]:
            pos = await self._log_position(logged)
            (m, mrev), (s, srev), (sb, sbrev), (admins, arev) = await asyncio.gather(
                self._read(_mkey(member.handle)), self._read(_skey(member.sign_pub)), self._read(_bkey(sign_nkey)),
                self._read(ADMINS_KEY))
            # The mark is read after the record, not with it: a deletion's tombstone and its mark
            # are one batch, so a record read as deleted by it is followed by a read of its mark.
            # Read together, the answers came in either order, and a review's add committed
            # beside a mark it had not seen (the batch depends on the record's revision only).
            gone, _grev = await self._read(_gkey(member.handle))
            if m is not None:
                raise Conflict(f"a member with handle {member.handle!r} already exists")
            if gone is not None:
                # A deleted member of this handle is still named in room records: a new member
                # must inherit none of its rooms, ownership or keys. Remove the names, then read
                # everything again (the deletion that left them cannot come back: it needs a member).
                cleared = _Cleared()
                if not await self._sweep_gone(member.handle, cleared):
                    raise Conflict(f"the rooms of a deleted member {member.handle!r} are still being cleared; "
                                   "try again")
                await self._strip_sealed(member.handle, cleared.strip)
                raise _CasLost()
            if s is not None:
                raise Conflict("another member already has this sign_pub")
            if sb is not None:
                raise Conflict("the nkey of this sign_pub is a member's bus_pub; a signing key never logs in to the bus")
            writes = [_Write(_mkey(member.handle), _member_json(member), mrev),
                      _Write(_skey(member.sign_pub), {"handle": member.handle}, srev),
                      _Write(_bkey(sign_nkey), {"handle": member.handle, "key": "sign"}, sbrev)]
            if member.bus_pub is not None:
                why, brev = await self._bus_pub_taken(member.bus_pub, member.handle)
                if why:
                    raise Conflict(why)
                writes.append(_Write(_bkey(member.bus_pub), {"handle": member.handle, "key": "bus"}, brev))
            if member.role == "admin":
                current = set((admins or {}).get("admins", []))
                writes.append(_Write(ADMINS_KEY, {"admins": sorted(current | {member.handle})}, arev))
            await self._commit(writes + self._log_writes(pos, logged, {}))
            return member, _seq(pos)

        return await self._retrying(attempt)

    async def _set_bus_key(self, handle: str, bus_pub: str,
                           logged: LogRecord | None) -> tuple[Member, Member | None, int | None]:
        if not _valid(handle):
            raise NotFound(f"no member {handle!r}")

        async def attempt() -> tuple[Member, Member | None, int | None]:
            pos = await self._log_position(logged)
            m, mrev = await self._read(_mkey(handle))
            if m is None:
                raise NotFound(f"no member {handle!r}")
            old = m.get("bus_pub")
            if old == bus_pub:
                if pos is not None:
                    await self._commit(self._log_writes(pos, logged, {}))
                return _member(m), None, _seq(pos)
            why, brev = await self._bus_pub_taken(bus_pub, handle)
            if why:
                raise Conflict(why)
            new = {**m, "bus_pub": bus_pub}
            writes = [_Write(_mkey(handle), new, mrev),
                      _Write(_bkey(bus_pub), {"handle": handle, "key": "bus"}, brev)]
            if old and _valid(old):
                entry, orev = await self._read(_bkey(old))
                if entry is not None and entry.get("handle") == handle and entry.get("key") == "bus":
                    writes.append(_Write(_bkey(old), None, orev))  # the old key is free again
            await self._commit(writes + self._log_writes(pos, logged, {}))
            return _member(new), _member(m), _seq(pos)

        return await self._retrying(attempt)

    async def _set_role(self, handle: str, role: str, logged: LogRecord | None) -> tuple[Member, Member, int | None]:
        if not _valid(handle):
            raise NotFound(f"no member {handle!r}")

        async def attempt() -> tuple[Member, Member, int | None]:
            pos = await self._log_position(logged)
            (m, mrev), (admins, arev) = await asyncio.gather(self._read(_mkey(handle)), self._read(ADMINS_KEY))
            if m is None:
                raise NotFound(f"no member {handle!r}")
            current = set((admins or {}).get("admins", []))
            if m["role"] == "admin" and role != "admin" and not (current - {handle}):
                raise Conflict(f"{handle!r} is the last admin; make another member admin first")
            if m["role"] == role:
                if pos is not None:
                    await self._commit(self._log_writes(pos, logged, {}))
                return _member(m), _member(m), _seq(pos)
            new = {**m, "role": role}
            after = current | {handle} if role == "admin" else current - {handle}
            await self._commit([_Write(_mkey(handle), new, mrev), _Write(ADMINS_KEY, {"admins": sorted(after)}, arev)]
                               + self._log_writes(pos, logged, {}))
            return _member(new), _member(m), _seq(pos)

        return await self._retrying(attempt)

    async def _delete_member(self, handle: str, logged: LogRecord | None) -> tuple[list[str], Member, int | None]:
        if not _valid(handle):
            raise NotFound(f"no member {handle!r}")
        if (await self._read(_mkey(handle)))[0] is None:
            raise NotFound(f"no member {handle!r}")
        # The rooms it is in, for the change's report: read before the batch, which must not
        # depend on them (a room joined since is left all the same: bus authorization drops a
        # deleted member from every room).
        left = sorted(v["room_id"] for v, _rev in (await self._scan("room")).values() if handle in v["members"])

        async def attempt() -> tuple[Member, int | None]:
            pos = await self._log_position(logged)
            m, mrev = await self._read(_mkey(handle))
            if m is None:
                raise NotFound(f"no member {handle!r}")
            sign_pub = _b64d(m["sign_pub"])
            skey = _skey(sign_pub)
            bkeys = [_bkey(nkey_from_sign_pub(sign_pub))]
            if m.get("bus_pub") and _valid(m["bus_pub"]):
                bkeys.append(_bkey(m["bus_pub"]))
            (s, srev), (admins, arev), (_gone, grev), *bus = await asyncio.gather(
                self._read(skey), self._read(ADMINS_KEY), self._read(_gkey(handle)), *(self._read(k) for k in bkeys))
            writes = [_Write(_mkey(handle), None, mrev)]
            if s is not None and s.get("handle") == handle:
                writes.append(_Write(skey, None, srev))
            for key, (entry, rev) in zip(bkeys, bus):
                if entry is not None and entry.get("handle") == handle:
                    writes.append(_Write(key, None, rev))
            current = set((admins or {}).get("admins", []))
            if m["role"] == "admin" and not (current - {handle}):
                raise Conflict(f"{handle!r} is the last admin and cannot be deleted")
            if handle in current:
                writes.append(_Write(ADMINS_KEY, {"admins": sorted(current - {handle})}, arev))
            # The rooms that name it are rewritten after this batch (_sweep_gone), and readers
            # take them as without it until then (_live_room): the batch holds however many rooms
            # name the member, reads no room, and depends on a few keys and the log's head only.
            # With the rooms in it, it read every room first, and a member that kept writing
            # (each write moves the head) made every try lose: no admin could delete it.
            # The mark names this deletion: a clean-up reads the rooms after the mark it clears,
            # and what it read says nothing of a later deletion of the handle (a review had an old
            # clean-up delete a newer deletion's mark, and a room kept naming the handle).
            writes.append(_Write(_gkey(handle), {"handle": handle, "deletion": secrets.token_hex(8)}, grev))
            await self._commit(writes + self._log_writes(pos, logged, {}))
            return _member(m), _seq(pos)

        before, seq = await self._retrying(attempt)
        return left, before, seq

    async def _after_delete_member(self, handle: str) -> None:
        cleared = _Cleared()
        try:
            done = await self._sweep_gone(handle, cleared)
            why = "rooms kept changing while it rewrote them"
        except Exception as e:  # noqa: BLE001 - readers and add_member do not depend on it
            done, why = False, str(e)
        if not done:
            log.warning("deleted member %s is still named in some room records (readers take it as gone; cleared "
                        "at the next start, or when a member with its handle is added): %s", handle, why)
        await self._strip_sealed(handle, cleared.strip)

    async def _sweep_gone(self, handle: str, cleared: _Cleared | None = None,
                          seen: tuple[dict[str, Any], dict[str, tuple[dict[str, Any], int]]] | None = None) -> bool:
        """Remove a deleted member's handle from the room records that still name it (in a
        roster, as owner, or by a sealed range), then its ``gone.<handle>`` mark; True once no
        mark is left. ``cleared`` collects the rooms it was in and its sealed ranges; ``seen`` is
        a mark and a read of every room made after it (``_scan("room")``), or None to read both.

        Each batch is conditional on the mark's revision as well as each room's:
        the mark exists only while no member has the handle, so no batch can
        touch the rooms of a member added again since. A read of the rooms is
        used only for the deletion whose mark was read before it: no room can
        come to name a deleted member, so every room that names it is in that
        read, but a later deletion of the handle (a member added again, put in
        rooms, deleted) has a new mark, and the rooms are read again for it. The
        rooms of a batch that lost (one of them rewritten since) are read again,
        :data:`SWEEP_RETRY_CHUNK` at a time and written at once, and one at a time
        when such a batch loses again, so that a member that keeps rewriting one room
        cannot hold the others back (a review made a clean-up that read every room
        again give up), and that room is tried again for up to :data:`SWEEP_ROUNDS`
        rounds and :data:`SWEEP_SECONDS`. The mark goes once every
        room of the read is clear. (Bus authorization's index needs no report of
        these writes: it counts only members that exist in a room, and drops a
        deleted member from every room.)
        """
        if not _valid(handle):
            return True
        gone, grev = await self._read(_gkey(handle))
        if gone is None:
            return True
        rooms = seen[1] if seen is not None and seen[0] == gone else await self._scan("room")
        scans = 1
        retry: list[list[str]] = []  # rooms of batches that lost, read again and written a few at a time
        give_up = time.monotonic() + SWEEP_SECONDS
        for _ in range(SWEEP_ROUNDS):
            if retry and time.monotonic() >= give_up:
                return False
            fresh = bool(retry)
            if fresh:
                parts = retry
            else:
                named = [w.key for w in _leave_rooms(handle, rooms)[0]]
                parts = [named[i:i + MAX_BATCH - 1] for i in range(0, len(named), MAX_BATCH - 1)]
            retry, newer = [], False
            for n, keys in enumerate(parts):
                if fresh and time.monotonic() >= give_up:  # the rest is tried no more
                    retry += parts[n:]
                    break
                if fresh:
                    got = await asyncio.gather(*(self._read(k) for k in keys))
                    part = {k: (v, rev) for k, (v, rev) in zip(keys, got) if v is not None}
                else:
                    part = {k: rooms[k] for k in keys}
                writes, left, strip = _leave_rooms(handle, part)
                if cleared is not None:
                    cleared.left.update(left)
                    cleared.strip.update(strip)
                if not writes:
                    continue
                try:
                    grev = await self._commit(writes + [_Write(_gkey(handle), gone, grev)])
                except _CasLost:  # a room was rewritten since it was read, or the mark
                    now, grev = await self._read(_gkey(handle))
                    if now is None:
                        return True  # another clean-up finished
                    if now != gone:
                        newer = True
                        break
                    if fresh:
                        retry += [[k] for k in keys]
                    else:
                        retry += [keys[i:i + SWEEP_RETRY_CHUNK] for i in range(0, len(keys), SWEEP_RETRY_CHUNK)]
            if newer:  # a later deletion of the handle: what was read says nothing of it
                gone, grev = await self._read(_gkey(handle))
                if gone is None:
                    return True
                if scans >= SWEEP_SCANS:
                    return False
                rooms, retry, scans = await self._scan("room"), [], scans + 1
                continue
            if retry:
                await asyncio.sleep(random.uniform(0, 0.02))
                continue
            try:  # every room of the read is clear
                await self._commit([_Write(_gkey(handle), None, grev)])
                return True
            except _CasLost:  # another clean-up moved the mark, or a later deletion made one
                now, grev = await self._read(_gkey(handle))
                if now is None:
                    return True
                # the same deletion's: every room of the read is clear; a later one's: read again
                if now != gone:
                    if scans >= SWEEP_SCANS:
                        return False
                    rooms, scans = await self._scan("room"), scans + 1
                else:
                    rooms = {}
                gone = now
        return False

    async def _strip_sealed(self, handle: str, ranges: Iterable[tuple[str, int, int]]) -> None:
        """Remove a deleted member's sealed keys from the epochs' entries (hygiene, best effort).

        They are already unreachable: no request is signed by a deleted member,
        and a member added again under its handle comes after :meth:`_sweep_gone`
        took its sealed ranges out of every room record (``get_sealed_key`` reads
        only inside them).
        """
        async def strip_one(room_id: str, epoch: int) -> None:
            key = _kkey(room_id, epoch)

            async def attempt() -> None:
                entry, rev = await self._read(key)
                if entry is None or handle not in entry.get("sealed", {}):
                    return
                entry = {**entry, "sealed": {h: v for h, v in entry["sealed"].items() if h != handle}}
                if "sigs" in entry:
                    entry["sigs"] = {h: v for h, v in entry["sigs"].items() if h != handle}
                await self._commit([_Write(key, entry, rev)])

            try:
                await self._retrying(attempt)
            except Exception as e:  # noqa: BLE001 - hygiene only: the keys are unreachable already
                log.warning("could not remove %s's sealed key from %s: %s", handle, key, e)

        todo = [(r, e) for r, first, last in sorted(ranges) for e in range(first, last + 1)]
        for i in range(0, len(todo), 16):
            await asyncio.gather(*(strip_one(r, e) for r, e in todo[i:i + 16]))

    # -- rooms -----------------------------------------------------------------

    def _room(self, d: dict[str, Any], members: dict[str, Member]) -> Room:
        """The room of record ``d``; ``members`` holds every member among its roster and owner (:func:`_named`)."""
        d = _live_room(d, members)
        inside = tuple(members[h] for h in sorted(d["members"]))
        return Room(d["room_id"], d["name"], d.get("owner", ""), int(d["epoch"]), bool(d["rekey_required"]),
                    _ts(d["created_at"]), inside)

    async def _members_of(self, handles: Iterable[str]) -> dict[str, Member]:
        handles = sorted(set(handles))
        reads = await asyncio.gather(*(self._read(_mkey(h)) for h in handles))
        return {h: _member(v) for h, (v, _rev) in zip(handles, reads) if v is not None}

    async def _create_room(self, name: str, owner: str, logged: LogRecord | None) -> tuple[Room, int | None]:
        if not _valid(owner):
            raise NotFound(f"no member {owner!r}")

        async def attempt() -> tuple[Room, int | None]:
            pos = await self._log_position(logged)
            m, mrev = await self._read(_mkey(owner))
            if m is None:
                raise NotFound(f"no member {owner!r}")
            room_id = new_room_id()
            record = {"room_id": room_id, "name": name, "owner": owner, "epoch": 0, "rekey_required": True,
                      "created_at": datetime.now(UTC).isoformat(), "members": [owner], "sealed": {}}
            # The touch of the owner's record makes a concurrent delete_member of the owner lose (or this).
            await self._commit([_Write(_rkey(room_id), record, 0), _Write(_mkey(owner), m, mrev)]
                               + self._log_writes(pos, logged, {"room_id": room_id}))
            return self._room(record, {owner: _member(m)}), _seq(pos)

        return await self._retrying(attempt)

    async def list_rooms(self, handle: str | None = None) -> list[Room]:
        rooms, members = await asyncio.gather(self._scan("room"), self._scan("member"))
        by_handle = {v["handle"]: _member(v) for v, _rev in members.values()}
        out = [self._room(v, by_handle) for v, _rev in rooms.values() if handle is None or handle in v["members"]]
        return sorted(out, key=lambda r: (r.created_at, r.room_id))

    async def get_room(self, room_id: str) -> Room | None:
        if not _valid(room_id):
            return None
        room, _rev = await self._read(_rkey(room_id))
        if room is None:
            return None
        return self._room(room, await self._members_of(_named(room)))

    async def _room_or_404(self, room_id: str) -> tuple[dict[str, Any], int]:
        if not _valid(room_id):
            raise NotFound(f"no room {room_id!r}")
        room, rev = await self._read(_rkey(room_id))
        if room is None:
            raise NotFound(f"no room {room_id!r}")
        return room, rev

    async def _delete_room(self, room_id: str, logged: LogRecord | None) -> tuple[dict[str, Any], int | None]:
        async def attempt() -> tuple[dict[str, Any], int | None]:
            pos = await self._log_position(logged)
            room, rev = await self._room_or_404(room_id)
            await self._commit([_Write(_rkey(room_id), None, rev)] + self._log_writes(pos, logged, {}))
            return room, _seq(pos)

        room, seq = await self._retrying(attempt)
        # The room as readers saw it, for the change's report (its members are read after the
        # write, which does not depend on them: a deleted member named by the record is left out).
        try:
            before = _room_state(_live_room(room, await self._members_of(_named(room))))
        except StoreUnavailable:
            before = _room_state(room)  # committed all the same: the record as it was
        # The sealed keys are unreachable once the room record is gone (room ids are
        # never reused); purging them is hygiene, and a crash here only leaves garbage.
        try:
            await self._io(self.js.purge_stream(self.stream, subject=f"{self._prefix}keys.{room_id}.>"),
                           "purge sealed keys")
        except Exception as e:  # noqa: BLE001 - hygiene only: the keys are unreachable already
            log.warning("could not purge the sealed keys of deleted room %s: %s", room_id, e)
        return before, seq

    async def _add_room_member(self, room_id: str, handle: str,
                               logged: LogRecord | None) -> tuple[Room, dict[str, Any] | None, int | None]:
        async def attempt() -> tuple[Room, dict[str, Any] | None, int | None]:
            pos = await self._log_position(logged)
            room, rrev = await self._room_or_404(room_id)
            m, mrev = await self._read(_mkey(handle)) if _valid(handle) else (None, 0)
            if m is None:
                raise NotFound(f"no member {handle!r}")
            known = await self._members_of(_named(room))
            if handle in room["members"]:
                if pos is not None:
                    await self._commit(self._log_writes(pos, logged, {}))
                return self._room(room, known), None, _seq(pos)
            live = _live_room(room, known)
            new = {**live, "members": sorted(set(live["members"]) | {handle}), "rekey_required": True}
            # The touch of the member's record: a concurrent delete_member of it cannot miss this room.
            await self._commit([_Write(_rkey(room_id), new, rrev), _Write(_mkey(handle), m, mrev)]
                               + self._log_writes(pos, logged, {}))
            return self._room(new, {**known, handle: _member(m)}), _room_state(live), _seq(pos)

        return await self._retrying(attempt)

    async def _remove_room_member(self, room_id: str, handle: str,
                                  logged: LogRecord | None) -> tuple[Room, dict[str, Any], int | None]:
        async def attempt() -> tuple[Room, dict[str, Any], int | None]:
            pos = await self._log_position(logged)
            room, rrev = await self._room_or_404(room_id)
            known = await self._members_of(_named(room))
            live = _live_room(room, known)
            # A handle of no member is in no room, whatever a record not yet cleared names
            # (_live_room): the log would refuse its removal.
            if handle not in live["members"]:
                raise NotFound(f"{handle!r} is not a member of room {room_id!r}")
            new = {**live, "members": [h for h in live["members"] if h != handle], "rekey_required": True}
            await self._commit([_Write(_rkey(room_id), new, rrev)] + self._log_writes(pos, logged, {}))
            return self._room(new, known), _room_state(live), _seq(pos)

        return await self._retrying(attempt)

    async def _put_keys(self, room_id: str, epoch: int, sealed: dict[str, bytes], sigs: dict[str, bytes] | None,
                        sealer: str | None, log_head: dict[str, Any] | None,
                        logged: LogRecord | None) -> tuple[Room, dict[str, Any], int | None]:
        if not _valid(room_id):
            raise NotFound(f"no room {room_id!r}")

        async def attempt() -> tuple[Room, dict[str, Any], int | None]:
            pos = await self._log_position(logged)
            (room, rrev), (_old, krev) = await asyncio.gather(self._room_or_404(room_id),
                                                             self._read(_kkey(room_id, epoch)))
            known = await self._members_of(_named(room))
            room = _live_room(room, known)  # the rekey seals to the members that exist
            check_new_epoch(room["epoch"], epoch, set(room["members"]), sealed)
            # krev: 0 in a consistent store (no entry beyond the room's epoch); read
            # anyway, so that garbage left by an interrupted import cannot wedge the room.
            ranges = dict(room.get("sealed", {}))
            for h in sealed:
                first = ranges[h][0] if h in ranges else epoch
                ranges[h] = [first, epoch]
            new = {**room, "epoch": epoch, "rekey_required": False, "sealed": ranges}
            entry = _keys_record(room_id, epoch, sealed, sigs, sealer, log_head)
            # One batch, both conditional: of two writers for the same epoch exactly one commits.
            await self._commit([_Write(_kkey(room_id, epoch), entry, krev), _Write(_rkey(room_id), new, rrev)]
                               + self._log_writes(pos, logged, {"epoch": epoch}))
            return self._room(new, known), _room_state(room), _seq(pos)

        return await self._retrying(attempt)

    async def get_key_package(self, room_id: str, handle: str, epoch: int | None = None) -> KeyPackage | None:
        if not _valid(room_id, handle):
            return None
        room, _rev = await self._read(_rkey(room_id))
        if room is None:
            return None
        rng = room.get("sealed", {}).get(handle)
        if not rng:
            return None
        e = rng[1] if epoch is None else epoch
        if not (rng[0] <= e <= rng[1]):
            return None
        entry, _rev = await self._read(_kkey(room_id, e))
        value = (entry or {}).get("sealed", {}).get(handle)
        if value is None:
            return None
        assert entry is not None
        sig = entry.get("sigs", {}).get(handle)
        head = entry.get("log_head")
        return KeyPackage(room_id, e, _b64d(value), _b64d(sig) if sig is not None else None, entry.get("sealer"),
                          dict(head) if head is not None else None)

    async def membership(self) -> Membership:
        rooms, members = await asyncio.gather(self._scan("room"), self._scan("member"))
        ms = tuple(sorted((_member(v) for v, _rev in members.values()), key=lambda m: m.handle))
        known = {m.handle for m in ms}
        return Membership(ms, {v["room_id"]: frozenset(h for h in v["members"] if h in known)
                               for v, _rev in rooms.values()})


__all__ = ["STATE_BUCKET", "KvSnapshot", "KvStore", "copy_store"]
