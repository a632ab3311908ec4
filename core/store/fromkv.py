"""A cluster's state (the KV bucket ``unibus_state``) as SQLite rows: ``membershipd restore``
of a cluster backup onto a single node (docs/operations.md, "Backups").

The input is what :meth:`unibus.store.kv.KvStore.snapshot` read: every live
key with its stored bytes. The layout is the one docs/store.md describes. What
the rows need is taken from it and checked; the indexes that only the KV store
needs (``sign.``, ``bus.``, ``meta.admins``) are not copied, since SQLite's
own constraints do their job. A key package is copied only where the KV store
would serve it: inside the handle's sealed range of a live room, for an epoch
the room has reached, to a handle that is still a member. Anything that does
not parse is a :class:`KvFormatError` naming the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..wire import HANDLE_RE
from . import models as m
from .kv_layout import LOG_HEAD_KEY, SCHEMA_KEY, SCHEMA_VERSION
from .sqlite import MAX_CREATED_KEY


#: Room ids as the store makes them (docs/store.md).
ROOM_ID_RE = re.compile(r"\A[a-z0-9]{1,40}\Z")


class KvFormatError(ValueError):
    """A key of the snapshot that cannot become a row; the message names it."""


@dataclass
class KvRows:
    """The rows of each table, ready to insert."""

    members: list[dict[str, Any]] = field(default_factory=list)
    rooms: list[dict[str, Any]] = field(default_factory=list)
    room_members: list[dict[str, Any]] = field(default_factory=list)
    sealed_keys: list[dict[str, Any]] = field(default_factory=list)
    room_epochs: list[dict[str, Any]] = field(default_factory=list)
    log_entries: list[dict[str, Any]] = field(default_factory=list)
    log_nonces: list[dict[str, Any]] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    #: ``(seq, hash)`` of the log's last entry; ``(-1, "")`` for none.
    log_head: tuple[int, str] = (-1, "")


def _json(key: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise KvFormatError(f"{key}: not JSON") from None
    if not isinstance(value, dict):
        raise KvFormatError(f"{key}: not a JSON object")
    return value


def _b64(key: str, what: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise KvFormatError(f"{key}: {what} is not a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KvFormatError(f"{key}: {what} is not standard base64") from None


def _ts(key: str, value: Any) -> datetime:
    try:
        ts = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise KvFormatError(f"{key}: created_at is not an ISO 8601 time") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _str(key: str, what: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise KvFormatError(f"{key}: {what} is not a{'' if empty else ' non-empty'} string")
    return value


def _int(key: str, what: str, value: Any) -> int:
    if type(value) is not int or value < 0:
        raise KvFormatError(f"{key}: {what} is not a non-negative integer")
    return value


def rows_from_kv(entries: dict[str, bytes]) -> KvRows:
    """The SQLite rows of a KV snapshot (``key -> stored bytes``). :class:`KvFormatError` on bad input."""
    rows = KvRows()
    _check_schema(entries)
    handles = _member_rows(entries, rows)
    rooms = _room_rows(entries, rows, handles)
    _key_package_rows(entries, rows, rooms, handles)
    _log_rows(entries, rows)
    return rows


def _check_schema(entries: dict[str, bytes]) -> None:
    schema = entries.get(SCHEMA_KEY)
    if schema is not None:
        version = _json(SCHEMA_KEY, schema).get("version")
        if type(version) is not int or version > SCHEMA_VERSION:
            raise KvFormatError(f"{SCHEMA_KEY}: schema {version!r}; this membershipd knows {SCHEMA_VERSION}: "
                                "restore with a newer unibus")


def _records(entries: dict[str, bytes], prefix: str, id_re: re.Pattern[str], field: str,
             what: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(key, id, record)`` of every ``<prefix>.<id>`` key in key order; each record must name its own id."""
    for key in sorted(k for k in entries if k.startswith(prefix + ".")):
        doc = _json(key, entries[key])
        ident = key[len(prefix) + 1:]
        if not id_re.match(ident):
            raise KvFormatError(f"{key}: {ident!r} is not a {what}")
        if doc.get(field) != ident:
            raise KvFormatError(f"{key}: its {field} is {doc.get(field)!r}")
        yield key, ident, doc


def _member_rows(entries: dict[str, bytes], rows: KvRows) -> set[str]:
    """Add the ``members`` rows; returns their handles."""
    handles: set[str] = set()
    for key, handle, doc in _records(entries, "member", HANDLE_RE, "handle", "handle"):
        bus_pub = doc.get("bus_pub")
        if bus_pub is not None:
            _str(key, "bus_pub", bus_pub)
        rows.members.append({"handle": handle, "role": _str(key, "role", doc.get("role")),
                             "sign_pub": _b64(key, "sign_pub", doc.get("sign_pub")),
                             "enc_pub": _b64(key, "enc_pub", doc.get("enc_pub")),
                             "enc_suite": _str(key, "enc_suite", doc.get("enc_suite")),
                             "created_at": _ts(key, doc.get("created_at")), "bus_pub": bus_pub})
        handles.add(handle)
    return handles


def _room_rows(entries: dict[str, bytes], rows: KvRows, handles: set[str]) -> dict[str, dict[str, Any]]:
    """Add the ``rooms`` and ``room_members`` rows; returns ``{room_id: {epoch, sealed}}``."""
    rooms: dict[str, dict[str, Any]] = {}
    for key, room_id, doc in _records(entries, "room", ROOM_ID_RE, "room_id", "room id"):
        owner = _str(key, "owner", doc.get("owner", ""), empty=True)
        members = doc.get("members")
        sealed = doc.get("sealed", {})
        if not isinstance(members, list) or not all(isinstance(h, str) for h in members):
            raise KvFormatError(f"{key}: members is not a list of handles")
        if not isinstance(sealed, dict) or not all(
                isinstance(r, list) and len(r) == 2 and all(type(e) is int for e in r) for r in sealed.values()):
            raise KvFormatError(f"{key}: sealed is not a map of handle -> [first, last]")
        if not isinstance(doc.get("rekey_required"), bool):
            raise KvFormatError(f"{key}: rekey_required is not a boolean")
        created = _ts(key, doc.get("created_at"))
        rooms[room_id] = {"epoch": _int(key, "epoch", doc.get("epoch")), "sealed": sealed}
        rows.rooms.append({"room_id": room_id, "name": _str(key, "name", doc.get("name"), empty=True),
                           # An owner that is no member any more has no rights (docs/store.md): "".
                           "owner": owner if owner in handles else "", "epoch": doc["epoch"],
                           # A roster naming a handle of no member (a deletion too large for one batch,
                           # not yet cleared: docs/store.md) needs a rekey, as readers of KV see it.
                           "rekey_required": doc["rekey_required"] or not set(members) <= handles,
                           "created_at": created})
        # KV keeps no time of joining: the room's creation stands in for it.
        rows.room_members += [{"room_id": room_id, "handle": h, "added_at": created}
                              for h in sorted(set(members)) if h in handles]
    return rooms


def _key_package_rows(entries: dict[str, bytes], rows: KvRows, rooms: dict[str, dict[str, Any]],
                      handles: set[str]) -> None:
    """Add the ``sealed_keys`` and ``room_epochs`` rows the KV store would serve."""
    for key in sorted(k for k in entries if k.startswith("keys.")):
        parts = key.split(".")
        if len(parts) != 3 or not parts[2].isdigit():
            raise KvFormatError(f"{key}: not keys.<room_id>.<epoch>")
        room_id, epoch = parts[1], int(parts[2])
        room = rooms.get(room_id)
        if room is None or not 1 <= epoch <= room["epoch"]:
            continue  # a deleted room's, or an interrupted import's: nothing serves it
        doc = _json(key, entries[key])
        sealed, sigs = doc.get("sealed", {}), doc.get("sigs", {})
        if not isinstance(sealed, dict) or not isinstance(sigs, dict):
            raise KvFormatError(f"{key}: sealed and sigs must be maps of handle -> base64")
        for handle, value in sorted(sealed.items()):
            rng = room["sealed"].get(handle)
            if handle not in handles or not rng or not rng[0] <= epoch <= rng[1]:
                continue  # outside the handle's range: unreachable in KV, so not copied
            sig = sigs.get(handle)
            rows.sealed_keys.append({"room_id": room_id, "epoch": epoch, "handle": handle,
                                     "sealed": _b64(key, f"sealed[{handle}]", value),
                                     "sig": _b64(key, f"sigs[{handle}]", sig) if sig is not None else None})
        sealer, head = doc.get("sealer"), doc.get("log_head")
        if sealer is not None and head is not None:
            if not isinstance(head, dict):
                raise KvFormatError(f"{key}: log_head is not {{seq, hash}}")
            rows.room_epochs.append({"room_id": room_id, "epoch": epoch, "sealer": _str(key, "sealer", sealer),
                                     "log_seq": _int(key, "log_head.seq", head.get("seq")),
                                     "log_hash": _str(key, "log_head.hash", head.get("hash"))})


def _log_rows(entries: dict[str, bytes], rows: KvRows) -> None:
    """Add the ``log_entries`` and ``log_nonces`` rows and the log's largest ``created``, its chain checked."""
    head_raw = entries.get(LOG_HEAD_KEY)
    if head_raw is None:
        return
    head = _json(LOG_HEAD_KEY, head_raw)
    last = _int(LOG_HEAD_KEY, "seq", head.get("seq"))
    prev = ""
    for seq in range(last + 1):
        key = f"log.{seq}"
        raw = entries.get(key)
        if raw is None:
            raise KvFormatError(f"{key}: missing, though the log's head is entry {last}")
        digest = hashlib.sha256(raw).hexdigest()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise KvFormatError(f"{key}: not UTF-8") from None
        entry = _json(key, raw)
        if entry.get("seq") != seq or entry.get("prev") != prev:
            raise KvFormatError(f"{key}: does not follow entry {seq - 1} (seq or prev differ)")
        rows.log_entries.append({"seq": seq, "hash": digest, "entry": text})
        prev = digest
    if head.get("hash") != prev:
        raise KvFormatError(f"{LOG_HEAD_KEY}: its hash is not the hash of entry {last}")
    rows.log_head = (last, prev)
    rows.meta.append({"key": MAX_CREATED_KEY, "value": str(_int(LOG_HEAD_KEY, "max_created",
                                                                head.get("max_created", 0)))})
    for key in sorted(k for k in entries if k.startswith("lognonce.")):
        parts = key.split(".")
        if len(parts) != 3:
            raise KvFormatError(f"{key}: not lognonce.<keyid>.<nonce>")
        seq = _int(key, "seq", _json(key, entries[key]).get("seq"))
        if seq <= last:
            rows.log_nonces.append({"keyid": parts[1], "nonce": parts[2], "seq": seq})


def insert_rows(s: Session, rows: KvRows) -> None:
    """Insert ``rows`` into an empty, migrated database in the caller's transaction.

    :class:`KvFormatError` when SQLite's constraints refuse them (two members
    with one signing or bus key: a bucket that was not consistent)."""
    try:
        for model, batch in ((m.Member, rows.members), (m.Room, rows.rooms), (m.RoomMember, rows.room_members),
                             (m.SealedKey, rows.sealed_keys), (m.RoomEpoch, rows.room_epochs),
                             (m.LogEntry, rows.log_entries), (m.LogNonce, rows.log_nonces), (m.Meta, rows.meta)):
            if batch:
                s.execute(insert(model.__table__), batch)
        s.flush()
    except IntegrityError as e:
        raise KvFormatError(f"the state breaks a constraint of the SQLite store: {e.orig}") from None
