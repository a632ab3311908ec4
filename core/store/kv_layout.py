"""The layout of the KV bucket ``unibus_state``: its keys, and the JSON records stored under them.

Layout (bucket ``unibus_state``, one JetStream stream ``KV_unibus_state``):

===============================  ==========================================================
key                              value (JSON)
===============================  ==========================================================
``member.<handle>``              ``{handle, role, sign_pub, enc_pub, enc_suite, created_at, bus_pub}``
``sign.<hex sign_pub>``          ``{handle}`` — the uniqueness index of signing keys
``bus.<nkey>``                   ``{handle, key: "bus"|"sign"}`` — every NATS identity a member's
                                 keys map to: its bus key, and its signing key as an nkey
                                 (reserved, so it can never become anyone's bus key)
``meta.admins``                  ``{admins: [handles]}`` — the last-admin guard
``meta.schema``                  ``{version: 1}``
``room.<room_id>``               ``{room_id, name, owner, epoch, rekey_required, created_at,
                                 members: [handles], sealed: {handle: [first, last]}}``
``keys.<room_id>.<epoch>``       ``{room_id, epoch, sealed: {handle: base64}, sigs: {handle: base64},
                                 sealer, log_head: {seq, hash}}`` (no sigs/sealer/log_head
                                 before 0.12)
``log.<seq>``                    an entry of the membership log: its RFC 8785 canonical JSON text
``meta.loghead``                 ``{seq, hash, max_created}`` — the log's head, and the largest
                                 ``created`` of a request in it
``lognonce.<keyid>.<nonce>``     ``{seq}`` — a (keyid, nonce) in the log (each at most once)
``meta.nonce_high_water``        ``{created}`` — no signed request was accepted with a larger
                                 ``created`` (docs/operations.md, "Durability")
``gone.<handle>``                ``{handle, deletion}`` — a deleted member whose handle room records may
                                 still name (rewritten just after the deletion); readers treat
                                 a handle without ``member.<handle>`` as absent, and
                                 ``add_member`` of the handle removes those names first

docs/store.md ("Layout", "Each operation") describes the layout and the batch each operation writes. A
bucket written by 0.11 (no log keys, ``keys.`` records without signatures)
reads with the same codecs.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from typing import Any

from ..wire import KeyFormatError, sign_pub_from_nkey
from .base import Member, room_state

STATE_BUCKET = "unibus_state"
SCHEMA_VERSION = 1
ADMINS_KEY = "meta.admins"
HIGH_WATER_KEY = "meta.nonce_high_water"
SCHEMA_KEY = "meta.schema"
LOG_HEAD_KEY = "meta.loghead"
#: A field of the log head while ``migrate-to-kv`` copies into the bucket: every node's logged
#: writes wait (503) until the copy ends (docs/store.md, "`membershipd migrate-to-kv`").
IMPORTING_FIELD = "importing"
_PART = re.compile(r"^[-_=a-zA-Z0-9]+$")  # one token of a key: no dots, nothing KV refuses


def _b64d(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"), validate=True)


def _b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _ts(s: str) -> datetime:
    ts = datetime.fromisoformat(s)
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _member_json(m: Member) -> dict[str, Any]:
    created = m.created_at if m.created_at.tzinfo else m.created_at.replace(tzinfo=UTC)
    return {"handle": m.handle, "role": m.role, "sign_pub": _b64e(m.sign_pub), "enc_pub": _b64e(m.enc_pub),
            "enc_suite": m.enc_suite, "created_at": created.isoformat(), "bus_pub": m.bus_pub}


def _member(d: dict[str, Any]) -> Member:
    return Member(d["handle"], d["role"], _b64d(d["sign_pub"]), _b64d(d["enc_pub"]), d["enc_suite"],
                  _ts(d["created_at"]), d.get("bus_pub"))


def _keys_record(room_id: str, epoch: int, sealed: dict[str, bytes], sigs: dict[str, bytes] | None,
                 sealer: str | None, log_head: dict[str, Any] | None) -> dict[str, Any]:
    """The ``keys.<room>.<epoch>`` record; the key package fields only when there are some (0.12)."""
    record: dict[str, Any] = {"room_id": room_id, "epoch": epoch,
                              "sealed": {h: _b64e(v) for h, v in sorted(sealed.items())}}
    if sigs:
        record["sigs"] = {h: _b64e(v) for h, v in sorted(sigs.items())}
    if sealer is not None and log_head is not None:
        record["sealer"] = sealer
        record["log_head"] = {"seq": int(log_head["seq"]), "hash": str(log_head["hash"])}
    return record


def _valid(*parts: str) -> bool:
    return all(isinstance(p, str) and _PART.match(p) for p in parts)


def _mkey(handle: str) -> str:
    return f"member.{handle}"


def _skey(sign_pub: bytes) -> str:
    return f"sign.{sign_pub.hex()}"


def _bkey(nkey: str) -> str:
    return f"bus.{nkey}"


def _sign_key_of_nkey(nkey: str) -> str | None:
    """``sign.<hex>`` of the raw key inside a user nkey (None if it is not one)."""
    try:
        return _skey(sign_pub_from_nkey(nkey))
    except KeyFormatError:
        return None


def _gkey(handle: str) -> str:
    return f"gone.{handle}"


def _rkey(room_id: str) -> str:
    return f"room.{room_id}"


def _kkey(room_id: str, epoch: int) -> str:
    return f"keys.{room_id}.{epoch}"


def _lkey(seq: int) -> str:
    return f"log.{seq}"


def _nonce_key(keyid: str, nonce: str) -> str:
    return f"lognonce.{keyid}.{nonce}"


def _room_state(d: dict[str, Any]) -> dict[str, Any]:
    """A room record of the bucket as change events carry it (:func:`unibus.store.base.room_state`)."""
    return room_state(d["room_id"], d["name"], d.get("owner", ""), d["epoch"], d["rekey_required"], d["members"])
