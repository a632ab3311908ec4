"""Copying the KV store's state in and out: ``membershipd migrate-to-kv`` and backups.

In: :func:`copy_store` copies a SQLite store into the bucket, idempotently
(docs/store.md, "`membershipd migrate-to-kv`: `copy_store(src, dst)`"). Out:
:meth:`KvMigrate.snapshot` reads every live key as of one stream sequence, for
``membershipd backup`` (docs/store.md, "Backups: a point-in-time read of the
bucket"); :mod:`unibus.store.fromkv` turns it into SQLite rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import secrets
import time
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.js.errors import APIError

from ..aio import within
from .base import Change, Conflict, Member, Room, Store, StoreUnavailable
from .kv_layout import IMPORTING_FIELD, LOG_HEAD_KEY, _keys_record, _kkey, _lkey, _mkey, _nonce_key, _rkey, _valid
from .kv_txn import KvBucket, _CasLost, _Write

if TYPE_CHECKING:
    from .kv import KvStore

#: Log entries and nonces read, then written in one batch, at once by ``import_log``.
IMPORT_CHUNK = 256


@dataclass(frozen=True)
class KvSnapshot:
    """The live keys of the state bucket as of stream sequence ``seq`` (:meth:`KvStore.snapshot`).

    ``entries`` maps each key to its stored bytes and revision. ``exact``: no
    write at all happened while it was read.
    """

    seq: int
    entries: dict[str, tuple[bytes, int]]
    exact: bool
    attempts: int = 1


def _bootstrap_handle(text: str) -> str | None:
    """The member handle a bootstrap entry adds; None for any other entry."""
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and doc.get("kind") == "bootstrap":
            return str(doc["member"]["handle"])
    except (ValueError, KeyError, TypeError):
        pass
    return None


def _ends_a_logged_batch(entries: dict[str, tuple[bytes, int]], newest: int) -> bool:
    """The read's last message is the log head's: it ended on a whole logged batch.

    Every logged write is one atomic batch whose last message is the head, and
    JetStream gives a batch consecutive sequences; but a consumer is not
    isolated from a batch being applied (message gets are), so a read can end
    inside one. Ending on the head proves it did not.
    """
    head = entries.get(LOG_HEAD_KEY)
    return head is not None and head[1] == newest


def _snapshot_complete(entries: dict[str, tuple[bytes, int]]) -> bool:
    """What a purge during a read could have taken is there: every log entry up to the
    head, and every sealed epoch that a live room's ranges cover."""
    try:
        head = json.loads(entries[LOG_HEAD_KEY][0]) if LOG_HEAD_KEY in entries else None
        if head is not None and any(_lkey(q) not in entries for q in range(int(head["seq"]) + 1)):
            return False
        for key, (raw, _rev) in entries.items():
            if not key.startswith("room."):
                continue
            room = json.loads(raw)
            epochs = {e for first, last in room.get("sealed", {}).values() for e in range(int(first), int(last) + 1)}
            if any(_kkey(room["room_id"], e) not in entries for e in epochs):
                return False
    except (ValueError, KeyError, TypeError):
        return False  # unreadable: let the exact read decide
    return True


class KvMigrate(KvBucket):
    """The imports ``copy_store`` makes, and the backup's snapshot, of a :class:`KvBucket`."""

    # -- out: the backup's snapshot (membershipd backup) -------------------------------

    async def _scan_raw(self, timeout: float) -> tuple[dict[str, tuple[bytes, int]], int]:
        """The last message of every key: ``({key: (stored bytes, revision)} of live keys,
        the largest stream sequence delivered, tombstones included)``."""
        self._check_connected()
        try:
            return await within(self._last_messages(">", 5.0), timeout)
        except (TimeoutError, nats.errors.Error, APIError, OSError) as e:
            raise StoreUnavailable(f"reading KV bucket {self.bucket}: {type(e).__name__} {e}".rstrip()) from None

    async def snapshot(self, *, budget: float = 60.0, exact_for: float = 10.0) -> KvSnapshot:
        """Every live key of the bucket with its stored bytes, as of one stream sequence
        (``membershipd backup``; docs/operations.md, "Backups").

        The bucket keeps one message per key (``history=1``), so an older value
        is gone once a key is rewritten. Each attempt reads the stream's last
        sequence ``L``, then the last message of every key, then ``L`` again.
        When no message read is newer than ``L`` and ``L`` has not moved, the
        read is exactly the state at ``L`` (``exact``).

        Under writes, the read itself is still a state: the consumer delivers
        every message stored while it runs, and ends when nothing is pending,
        so each key has its value as of the last message delivered, ``N``. It
        is accepted, as the state at ``N`` (not ``exact``), when ``N`` is the
        log head's message (:func:`_ends_a_logged_batch`: not inside a batch)
        and what a purge could have taken (the sealed keys of a room deleted
        during the read) is all there. Waiting for a read that no write
        overtook starved for the whole budget under a tight loop of writes on
        every node of a cluster. After ``exact_for`` seconds a read whose
        messages are all at or before ``L`` is accepted too, on the same purge
        check. :class:`StoreUnavailable` when no attempt succeeds within
        ``budget`` seconds.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        pause = 0.01
        attempts = 0
        while True:
            attempts += 1
            before = await self._last_seq()
            entries, newest = await self._scan_raw(timeout=max(self.timeout, 30.0))
            after = await self._last_seq()
            if newest <= before and after == before:
                return KvSnapshot(before, entries, True, attempts)
            if _ends_a_logged_batch(entries, newest) and _snapshot_complete(entries):
                return KvSnapshot(newest, entries, False, attempts)
            if newest <= before and loop.time() - start > exact_for and _snapshot_complete(entries):
                return KvSnapshot(before, entries, False, attempts)
            if loop.time() - start > budget:
                raise StoreUnavailable(f"KV bucket {self.bucket} kept changing for {budget:.0f} s ({attempts} "
                                       "reads); try again when fewer writes are under way")
            await asyncio.sleep(random.uniform(0, pause))
            pause = min(pause * 2, 0.5)

    # -- in: the imports of migrate-to-kv ----------------------------------------------

    _import_mark: dict[str, Any] | None = None

    async def begin_import(self, texts: list[str]) -> None:
        """Hold every node's logged writes until :meth:`end_import`: the log head carries
        :data:`IMPORTING_FIELD`, and a logged write that sees it is a 503.

        A copy cut short left a partial state that nodes served and wrote on;
        the run that finished it then copied rooms as the database had them,
        not as the cluster had changed them since (a member deleted and added
        again came back into a room the log says they left: red team). The
        mark goes on the head with a compare-and-set, so a logged write under
        way (conditional on the head it read) fails and reads the mark when
        it tries again. A bucket without a head gets the mark with the head
        :meth:`import_log` writes.

        ``texts`` is the log being copied; the mark names its last entry. A
        :class:`Conflict`, before anything is written, when the bucket's log
        does not contain it, or when a copy of another log was cut short here:
        only a run of that same copy may finish it and lift the mark (a run
        from another data directory, even an empty one, lifted it on a partial
        state: red team on the fix).
        """
        source = ({"seq": len(texts) - 1, "hash": hashlib.sha256(texts[-1].encode("utf-8")).hexdigest()}
                  if texts else None)
        mark = {"token": secrets.token_hex(8), "since": int(time.time()), "source": source}

        async def attempt() -> None:
            head, rev = await self._read(LOG_HEAD_KEY)
            if head is None:
                return
            held = head.get(IMPORTING_FIELD)
            if isinstance(held, dict) and held.get("source") != source:
                was = held.get("source") or {}
                raise Conflict(f"KV bucket {self.bucket}: a migrate-to-kv of another membership log (entry "
                               f"{was.get('seq')}, {was.get('hash')}) was cut short here; run that copy again, from "
                               "its data directory, to its end first; nothing copied")
            await self._entries_to_append(head, texts)
            await self._commit([_Write(LOG_HEAD_KEY, {**head, IMPORTING_FIELD: mark}, rev)])

        await self._retrying(attempt)
        self._import_mark = mark

    async def _entries_to_append(self, head: dict[str, Any], texts: list[str]) -> int:
        """How many of the last entries of ``texts`` the bucket's log (at ``head``) lacks: 0 when
        it holds them all. :class:`Conflict` unless the one log contains the other, and unless
        what the bucket lacks is recovery bootstraps only.

        Appending is for a recovery on a cluster: a backup restored into a scratch
        directory, ``membershipd member add`` there (a bootstrap entry after the
        cluster's head), and this copy back (docs/operations.md). Anything else
        after the bucket's head would be an entry whose change the copy does
        not make: rooms and members are copied only where KV has none.
        """
        if not texts:
            raise Conflict(f"KV bucket {self.bucket} has a membership log and the database being copied has none; "
                           "nothing copied")
        last = len(texts) - 1
        at = int(head["seq"])
        if at >= last:
            if await self.log_hash_at(last) == hashlib.sha256(texts[last].encode("utf-8")).hexdigest():
                return 0
        elif hashlib.sha256(texts[at].encode("utf-8")).hexdigest() == head.get("hash"):
            added = [_bootstrap_handle(text) for text in texts[at + 1:]]
            if None in added:
                raise Conflict(f"KV bucket {self.bucket}: its membership log ends at entry {at}, and the database "
                               "being copied goes on with entries that are not recovery bootstraps (only those, from "
                               "membershipd member add, are appended); nothing copied")
            for handle in added:
                _value, rev = await self._read(_mkey(str(handle)))
                if rev:  # import_member would skip it: the log would name a member KV does not have
                    raise Conflict(f"KV bucket {self.bucket}: handle {handle!r} of the recovery bootstrap was a "
                                   "member of this cluster before; add the admin under another handle; nothing "
                                   "copied")
            return last - at
        raise Conflict(f"KV bucket {self.bucket} has a membership log of its own (head {at}) that neither contains "
                       f"the one being copied (entry {last}) nor is the start of it; nothing copied (if the cluster "
                       "logged changes since the backup this database was restored from, take a new backup)")

    async def end_import(self) -> None:
        """Take this run's mark off the head (another run's, which replaced it, stays)."""
        mark, self._import_mark = self._import_mark, None
        if mark is None:
            return

        async def attempt() -> None:
            head, rev = await self._read(LOG_HEAD_KEY)
            if head is not None and head.get(IMPORTING_FIELD) == mark:
                await self._commit([_Write(LOG_HEAD_KEY, {k: v for k, v in head.items() if k != IMPORTING_FIELD},
                                           rev)])

        await self._retrying(attempt)

    async def import_member(self, member: Member) -> bool:
        """Add ``member`` unless its handle was ever written here (present, or deleted since)."""
        if not _valid(member.handle):
            raise ValueError(f"handle {member.handle!r} cannot be a KV key")
        existing, rev = await self._read(_mkey(member.handle))
        if existing is not None or rev:
            return False  # copied before (and maybe deleted here since: do not resurrect it)
        try:
            await self.add_member(member)
        except Conflict:
            if await self.get_member(member.handle) is not None:
                return False  # a concurrent copy won
            raise
        return True

    async def import_room(self, room: Room, epochs: dict[int, dict[str, Any]]) -> bool:
        """Copy a room with its id, epoch, members and every sealed epoch; False if it is already here.

        ``epochs``: ``{epoch: {"sealed": {handle: bytes}, "sigs": {handle: bytes},
        "sealer": str | None, "log_head": {seq, hash} | None}}`` (the key packages).

        The sealed keys go first, each entry created only if absent; the room
        record last, as the commit point: until it exists nothing reads the
        entries, and a re-run after a crash finishes the copy.
        """
        if not _valid(room.room_id):
            raise ValueError(f"room id {room.room_id!r} cannot be a KV key")
        existing, rrev = await self._read(_rkey(room.room_id))
        if existing is not None:
            return False
        if rrev:
            # A tombstone: the room was deleted here after an earlier copy. Do not resurrect it.
            return False
        for e, package in sorted(epochs.items()):
            key = _kkey(room.room_id, e)
            entry = _keys_record(room.room_id, e, package["sealed"], package.get("sigs"), package.get("sealer"),
                                 package.get("log_head"))

            async def put(key: str = key, entry: dict[str, Any] = entry) -> None:
                old, krev = await self._read(key)
                if old != entry:
                    await self._commit([_Write(key, entry, krev)])

            await self._retrying(put)
        ranges: dict[str, list[int]] = {}
        for e, package in sorted(epochs.items()):
            for h in package["sealed"]:
                ranges.setdefault(h, [e, e])[1] = e
        members = await self._members_of(m.handle for m in room.members)
        owner = room.owner if room.owner and await self.get_member(room.owner) is not None else ""
        created = room.created_at if room.created_at.tzinfo else room.created_at.replace(tzinfo=UTC)
        record = {"room_id": room.room_id, "name": room.name, "owner": owner, "epoch": room.epoch,
                  "rekey_required": room.rekey_required, "created_at": created.isoformat(),
                  "members": sorted(members), "sealed": ranges}
        try:
            await self._commit([_Write(_rkey(room.room_id), record, 0)])
        except _CasLost:
            return False  # a concurrent import won
        await self._changed(Change("room_created", handle=owner or None, room_id=room.room_id))
        return True

    async def import_log(self, texts: list[str], nonces: list[tuple[str, str, int]], max_created: int) -> int:
        """Copy a membership log (entry texts from seq 0 on, the (keyid, nonce, seq) of
        its requests, its largest ``created``); returns the entries written.

        Entries and nonces first, each written only if absent; the head last, as
        the commit point, so a re-run after a crash finishes the copy. A bucket
        whose log already holds the last entry is left alone (a second run, or
        a cluster that has moved on since); one whose log is the start of this
        one gets the rest appended if the rest is recovery bootstraps
        (:meth:`_entries_to_append`); any other log of its own is a
        :class:`Conflict`.
        """
        if not texts:
            return 0
        last = len(texts) - 1
        last_hash = hashlib.sha256(texts[-1].encode("utf-8")).hexdigest()
        head, hrev = await self._read(LOG_HEAD_KEY)
        start = 0
        if head is not None:
            missing = await self._entries_to_append(head, texts)
            if not missing:
                return 0
            start = last + 1 - missing
            max_created = max(max_created, int(head.get("max_created", 0)))
        written = await self._import_log_entries(texts, start)
        await self._import_log_nonces([n for n in nonces if n[2] >= start])
        head = {"seq": last, "hash": last_hash, "max_created": max_created}
        if self._import_mark is not None:
            head[IMPORTING_FIELD] = self._import_mark
        try:
            await self._commit([_Write(LOG_HEAD_KEY, head, hrev)])
        except _CasLost:
            raise Conflict(f"KV bucket {self.bucket}: its membership log head changed during the copy") from None
        return written

    async def _import_log_entries(self, texts: list[str], start: int = 0) -> int:
        """Write ``log.<seq>`` of each text from ``start`` on where absent; :class:`Conflict` where one differs."""
        written = 0
        for i in range(start, len(texts), IMPORT_CHUNK):
            part = [(_lkey(q), texts[q].encode("utf-8")) for q in range(i, min(i + IMPORT_CHUNK, len(texts)))]
            got = await asyncio.gather(*(self._read_raw(k) for k, _raw in part))
            writes = []
            for (key, raw), (old, rev) in zip(part, got):
                if old == raw:
                    continue
                if old is not None:
                    raise Conflict(f"KV bucket {self.bucket}: {key} differs from the log being copied; nothing "
                                   "more copied")
                writes.append(_Write(key, None, rev, raw=raw))
            if writes:
                await self._commit(writes)
                written += len(writes)
        return written

    async def _import_log_nonces(self, nonces: list[tuple[str, str, int]]) -> None:
        """Write ``lognonce.<keyid>.<nonce>`` of each (keyid, nonce, seq) where absent."""
        valid = [(k, n, q) for k, n, q in nonces if _valid(k, n)]
        for i in range(0, len(valid), IMPORT_CHUNK):
            part = valid[i:i + IMPORT_CHUNK]
            got = await asyncio.gather(*(self._read(_nonce_key(k, n)) for k, n, _q in part))
            writes = [_Write(_nonce_key(k, n), {"seq": q}, rev) for (k, n, q), (old, rev) in zip(part, got)
                      if old is None]
            if writes:
                await self._commit(writes)


async def _sealed_epochs(src: Store, room: Room, handles: list[str]) -> dict[int, dict[str, Any]]:
    """Every sealed epoch of a room in ``src`` with its key packages (see :meth:`KvStore.import_room`)."""
    from .sqlite import SqliteStore

    if isinstance(src, SqliteStore):
        return await src.epoch_packages(room.room_id)
    out: dict[int, dict[str, Any]] = {}
    for e in range(1, room.epoch + 1):
        got = await asyncio.gather(*(src.get_key_package(room.room_id, h, e) for h in handles))
        for h, g in zip(handles, got):
            if g is not None:
                package = out.setdefault(e, {"sealed": {}, "sigs": {}, "sealer": g.sealer, "log_head": g.log_head})
                package["sealed"][h] = g.sealed
                if g.sig is not None:
                    package["sigs"][h] = g.sig
    return out


async def copy_store(src: Store, dst: KvStore) -> dict[str, int]:
    """Copy the membership log, members, rooms, room members and every sealed epoch
    (with its key packages) from ``src`` (SQLite) into ``dst``.

    Idempotent: what is already in ``dst`` (the log up to its last entry, a
    member by handle, a room by id) is left untouched, and so is what was
    copied and deleted there since; a second run writes nothing. A run cut
    short is finished by the next one. Returns what was copied:
    ``{"log_entries": n, "members": n, "rooms": n, "sealed_epochs": n}``.
    """
    from .sqlite import SqliteStore

    counts = {"log_entries": 0, "members": 0, "rooms": 0, "sealed_epochs": 0}
    texts: list[str] = []
    if isinstance(src, SqliteStore):
        texts, nonces, max_created = await src.log_export()
    # No node writes until the copy is whole (KvMigrate.begin_import): a run that fails leaves
    # the mark, and only a run of the same copy finishes it and takes the mark off.
    await dst.begin_import(texts)
    if texts:
        # The log first: once its head is in the bucket, no node writes a snapshot of its own there.
        counts["log_entries"] = await dst.import_log(texts, nonces, max_created)
    members = await src.list_members()
    for member in members:
        if await dst.import_member(member):
            counts["members"] += 1
    handles = [m.handle for m in members]
    for room in await src.list_rooms():
        if await dst.get_room(room.room_id) is not None:
            continue
        epochs = await _sealed_epochs(src, room, handles)
        if await dst.import_room(room, epochs):
            counts["rooms"] += 1
            counts["sealed_epochs"] += len(epochs)
    await dst.end_import()
    return counts
