"""The membership log: every accepted membership change, hash-chained, re-checkable by any member.

The server appends each accepted membership-changing request *verbatim* (its
signed components, its signature and its body) in the same store transaction
as its effect; clients replay the log, check every entry, and derive members,
keys and room rosters from it instead of trusting the server's answers. The
formats and the rules are in docs/formats.md ("The membership log"); this
module is their one implementation, used by the server (to build and serve
entries) and by the client (to verify them). It is pure: no I/O, no network.

An entry is a JSON object; its hash is the lowercase hex SHA-256 of its
RFC 8785 canonical JSON (the ``rfc8785`` package, or ``json.dumps`` where
that gives the same bytes, six times faster: see :func:`canonical`).
Replaying is linear in the log (uniqueness rules use indexes), and the
Ed25519 work of many entries can run on several cores (:meth:`LogState.defer_checks`);
costs are in docs/benchmarks.md.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nacl.bindings
import nacl.exceptions
import rfc8785

from .signing import SignatureError, check_request
from .wire import (
    ENC_PUB_SIZES,
    ENC_SUITES,
    HANDLE_RE,
    MAX_AUTH_SKEW,
    KeyFormatError,
    b64decode_strict,
    enc_public_key,
    sign_pub_from_nkey,
    validate_enc_suite,
    validate_sign_pub,
)

__all__ = [
    "KEY_PACKAGE_LABEL",
    "MAX_AUTH_SKEW",
    "MESSAGE_LABEL",
    "ROLES",
    "KeptBack",
    "LogError",
    "LogState",
    "LoggedRequest",
    "UnacceptedBootstrap",
    "bootstrap_entry",
    "canonical",
    "entry_hash",
    "key_package_input",
    "legacy_keys_digest",
    "legacy_keys_json",
    "logged_operation",
    "message_input",
    "request_entry",
    "root_salt",
    "snapshot_entry",
]

ROLES = ("admin", "member")
#: Context labels of the signatures made with a member's *signing* key outside
#: RFC 9421. Each begins the signed bytes and ends in a newline, so none of
#: them can be mistaken for an RFC 9421 signature base (which begins with '"').
KEY_PACKAGE_LABEL = b"unibus/room-key/v1\n"
MESSAGE_LABEL = b"unibus/msg/v1\n"

ROOM_ID_RE = re.compile(r"\A[a-z0-9]{1,40}\Z")
_HANDLE = r"([a-z][a-z0-9_-]{0,31})"
_ROOM = r"([a-z0-9]{1,40})"
#: The logged routes: (method, path pattern) → operation. Paths are matched
#: raw (percent-encoded as signed): a logged request must use the canonical
#: spelling, which the server enforces before it appends.
_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"\A/v1/members\Z"), "member.add"),
    ("PATCH", re.compile(rf"\A/v1/members/{_HANDLE}\Z"), "member.role"),
    ("DELETE", re.compile(rf"\A/v1/members/{_HANDLE}\Z"), "member.delete"),
    ("PUT", re.compile(r"\A/v1/me/bus-key\Z"), "member.bus_key"),
    ("POST", re.compile(r"\A/v1/rooms\Z"), "room.create"),
    ("DELETE", re.compile(rf"\A/v1/rooms/{_ROOM}\Z"), "room.delete"),
    ("PUT", re.compile(rf"\A/v1/rooms/{_ROOM}/members/{_HANDLE}\Z"), "room.member_add"),
    ("DELETE", re.compile(rf"\A/v1/rooms/{_ROOM}/members/{_HANDLE}\Z"), "room.member_remove"),
    ("POST", re.compile(rf"\A/v1/rooms/{_ROOM}/keys\Z"), "room.keys"),
)
#: An add of a member to a room signed this many seconds or more before a removal of it that the
#: log holds earlier (by any author) is taken for a request a server held back
#: (:attr:`LogState.held_back`): the members' clocks agree within this margin.
HELD_BACK_MARGIN = 30
#: Operations whose request body is not kept in the log (the signed digest suffices).
BODYLESS = frozenset({"room.keys"})
#: What ``result`` holds, per operation.
_RESULT_FIELDS: dict[str, frozenset[str]] = {op: frozenset() for _m, _p, op in _ROUTES}
_RESULT_FIELDS["room.create"] = frozenset({"room_id"})
_RESULT_FIELDS["room.keys"] = frozenset({"epoch"})
_BODY_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {  # required, optional
    "member.add": (frozenset({"handle", "role", "sign_pub", "enc_pub", "bus_pub"}), frozenset({"enc_suite"})),
    "member.role": (frozenset({"role"}), frozenset()),
    "member.bus_key": (frozenset({"bus_pub"}), frozenset()),
    "room.create": (frozenset({"name"}), frozenset()),
}
#: The logged operations whose requests carry a body: the others take none.
TAKES_BODY = frozenset(_BODY_FIELDS) | BODYLESS
_ENTRY_FIELDS = {
    "request": frozenset({"seq", "prev", "at", "kind", "request", "result"}),
    "bootstrap": frozenset({"seq", "prev", "at", "kind", "member"}),
    "snapshot": frozenset({"seq", "prev", "at", "kind", "state"}),
}
_REQUEST_FIELDS = frozenset({"method", "path", "query", "content_digest", "signature_input", "signature", "body"})
_MEMBER_FIELDS = frozenset({"handle", "role", "sign_pub", "enc_pub", "enc_suite", "bus_pub"})
_ROOM_FIELDS = frozenset({"room_id", "name", "owner", "epoch", "rekey_required", "members"})
#: A snapshot room's optional field: the keys sealed before the log, per member its epochs and one digest.
LEGACY_KEYS = "legacy_keys"
_SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
#: The most epochs of one member and room a snapshot may record: a client fetches every one to check
#: their digest, and a bound keeps a hostile entry 0 (trusted on first use) from asking for billions.
LEGACY_MAX_EPOCHS = 10_000
_SALT = re.compile(r"[0-9a-f]{32}")  # entry 0's (root_salt)
_SIGNATURE, _POINT = 1, 2  # kinds of deferred checks
#: JSON numbers that stay exact in every JSON reader (RFC 8785 needs them to).
MAX_SAFE_INT = 2**53 - 1


class _Headers(dict):
    """Lower-case header names → one value each, with the ``getall`` that
    ``unibus.signing`` looks up first (a plain dict is scanned item by item)."""

    __slots__ = ()

    def getall(self, name: str, default: Any = None) -> Any:
        value = self.get(name)
        return default if value is None else [value]


class LogError(Exception):
    """An entry of the log fails a check. ``seq`` names it (None: the log as a whole)."""

    def __init__(self, seq: int | None, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"membership log entry {seq}: {reason}" if seq is not None else f"membership log: {reason}")


class UnacceptedBootstrap(LogError):
    """An offline bootstrap after entry 0 that the reader has not accepted (``unibus trust FP``)."""


# --------------------------------------------------------------------------- hashing


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The RFC 8785 canonical JSON of an entry: what its hash covers.

    For JSON made only of objects with ASCII keys, arrays, strings, safe
    integers, booleans and null (every valid entry), RFC 8785 is exactly
    ``json.dumps`` with sorted keys, no whitespace and no ASCII escaping: the
    same escapes (``\\" \\\\ \\b \\f \\n \\r \\t``, other controls as
    lowercase ``\\u00xx``), and code-point order equals UTF-16 order for
    ASCII keys. That path is six times faster (docs/benchmarks.md); anything
    else (a float, a large integer, a non-ASCII key) goes through ``rfc8785``.
    """
    if _plain_json(entry):
        try:
            return json.dumps(entry, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: rfc8785 says what is wrong
    return rfc8785.dumps(entry)


def _entry_bytes(entry: dict[str, Any]) -> bytes:
    """The canonical JSON of an entry being replayed, without :func:`canonical`'s walk.

    ``json.dumps`` with sorted keys is RFC 8785 for every entry that
    :meth:`LogState.apply` accepts: each of its values is type-checked to a
    string, a boolean, null, a list, an object with one of the fixed ASCII
    field names, or an integer within ±(2^53 − 1) (seq, at, epochs). An
    entry with anything else (a float, a large integer) is refused, so the
    hash computed for it is never used. A lone surrogate cannot be encoded
    and NaN is refused: both are errors here.
    """
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                      allow_nan=False).encode("utf-8")


def _plain_json(obj: Any) -> bool:
    """True when ``obj`` holds only what the ``json.dumps`` path of :func:`canonical` serializes as RFC 8785."""
    stack = [obj]
    while stack:
        x = stack.pop()
        tx = type(x)
        if tx is str or x is None or tx is bool:
            continue
        if tx is int:
            if not -MAX_SAFE_INT <= x <= MAX_SAFE_INT:
                return False
        elif tx is dict:
            for k, v in x.items():
                if type(k) is not str or not k.isascii():
                    return False
                stack.append(v)
        elif tx is list:
            stack.extend(x)
        else:
            return False
    return True


def entry_hash(entry: Mapping[str, Any]) -> str:
    """``hash(entry)``: lowercase hex SHA-256 of the canonical JSON; an entry's ``prev`` is its predecessor's."""
    return hashlib.sha256(canonical(entry)).hexdigest()


# --------------------------------------------------------------------------- building entries (server side)


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """A signed request as the log records it: exactly what its signature covered, plus the body.

    ``query`` is the raw query string without ``?``; ``content_digest``,
    ``signature_input`` and ``signature`` are the header values as the
    verifier read them; ``body`` the exact body bytes (None: no body).
    """

    method: str
    path: str
    query: str
    content_digest: str | None
    signature_input: str
    signature: str
    body: bytes | None

    def as_json(self, keep_body: bool = True) -> dict[str, Any]:
        body = None if self.body is None or not keep_body else base64.b64encode(self.body).decode("ascii")
        return {"method": self.method, "path": self.path, "query": self.query,
                "content_digest": self.content_digest, "signature_input": self.signature_input,
                "signature": self.signature, "body": body}


def logged_operation(method: str, path: str) -> tuple[str, tuple[str, ...]] | None:
    """``(operation, path arguments)`` when ``method path`` is a logged route in its canonical spelling."""
    for m, pattern, op in _ROUTES:
        if m == method:
            found = pattern.fullmatch(path)
            if found is not None:
                return op, found.groups()
    return None


def check_logged_request(method: str, path: str, content_digest: str | None, signature_input: str, signature: str,
                         body: bytes | None, op: str, *, now: float, skew: float) -> Any:
    """The signature checks a client makes when it replays a logged request (everything but
    the key: the caller verifies the returned pending check with the author's key).

    Only what the log keeps is there: ``@method``, ``@path``, an empty
    ``@query``, ``Content-Digest``, and the body unless the operation's is
    not kept (its digest is then checked for presence and form only). The
    server runs this on a request before it appends it, so a signature that
    covers anything else (another header) is refused there, not in every
    client forever after. Raises :class:`unibus.signing.SignatureError`.
    """
    headers = _Headers({"signature-input": signature_input, "signature": signature})
    if content_digest is not None:
        headers["content-digest"] = content_digest
    if op in BODYLESS:
        headers["content-length"] = "1"
        body = None
    return check_request(method, path, "", headers, body, now=now, skew=skew)


def request_entry(seq: int, prev: str, at: int, request: LoggedRequest, result: Mapping[str, Any]) -> dict[str, Any]:
    found = logged_operation(request.method, request.path)
    keep_body = found is None or found[0] not in BODYLESS
    return {"seq": seq, "prev": prev, "at": int(at), "kind": "request",
            "request": request.as_json(keep_body), "result": dict(result)}


def member_json(handle: str, role: str, sign_pub: bytes, enc_pub: bytes, enc_suite: str,
                bus_pub: str | None) -> dict[str, Any]:
    return {"handle": handle, "role": role, "sign_pub": base64.b64encode(sign_pub).decode("ascii"),
            "enc_pub": base64.b64encode(enc_pub).decode("ascii"), "enc_suite": enc_suite, "bus_pub": bus_pub}


def root_salt() -> str:
    """The ``salt`` of entry 0: 128 random bits, so that no two deployments share a trust root
    by accident.

    Entry 0's hash is the deployment's trust root, and a client binds every signed request
    to it (the signature's ``tag``). Without a salt, two deployments bootstrapped with the
    same first admin in the same second wrote the same entry 0, and a request logged by one
    was accepted by the other (found by tests/core/test_signed_requests.py, in a run where
    both bootstraps fell in one second); so did a 0.11 database upgraded twice in one
    second. A copy made on purpose is another matter: entry 0 is public (docs/client.md,
    "Requests bound to a deployment").
    """
    return secrets.token_hex(16)


def bootstrap_entry(seq: int, prev: str, at: int, member: Mapping[str, Any]) -> dict[str, Any]:
    """An offline ``membershipd member add``: unsigned, trusted only by pinning (docs/formats.md).
    As entry 0 it carries a :func:`root_salt`."""
    entry = {"seq": seq, "prev": prev, "at": int(at), "kind": "bootstrap", "member": dict(member)}
    if seq == 0:
        entry["salt"] = root_salt()
    return entry


def legacy_keys_digest(sealed: Iterable[bytes]) -> str:
    """The digest a snapshot records of one member's keys of one room sealed before the log:
    SHA-256 over the SHA-256 of each sealed value, in epoch order (docs/formats.md)."""
    return hashlib.sha256(b"".join(hashlib.sha256(bytes(v)).digest() for v in sealed)).hexdigest()


def _ranges(epochs: Iterable[int]) -> list[list[int]]:
    """``[[first, last], ...]`` of sorted distinct epochs, each run of consecutive ones as one range."""
    out: list[list[int]] = []
    for e in sorted(set(epochs)):
        if out and out[-1][1] == e - 1:
            out[-1][1] = e
        else:
            out.append([e, e])
    return out


def legacy_keys_json(sealed: Iterable[tuple[int, str, bytes]]) -> dict[str, dict[str, Any]]:
    """A snapshot room's ``legacy_keys``: ``{handle: {"epochs": [[first, last], ...], "sha256": hex}}``
    of the ``(epoch, handle, sealed)`` room keys sealed before the log existed (docs/formats.md).

    Those keys carry no sealer's signature. Entry 0, which every member pins,
    records them, so that a client can still open one to read what was stored
    under it (a blob of 0.11), and a server cannot hand over another
    (:meth:`LogState.check_legacy_keys`). One digest per member and room, over
    all its epochs: a digest per key made entry 0 grow with every rekey 0.11
    ever made, past what one KV value holds on a cluster (a red team: 16,000
    keys, and entry 0 could not be written)."""
    by_handle: dict[str, dict[int, bytes]] = {}
    for epoch, handle, value in sealed:
        by_handle.setdefault(handle, {})[int(epoch)] = bytes(value)
    out = {}
    for h, keys in sorted(by_handle.items()):
        kept = sorted(keys)[-LEGACY_MAX_EPOCHS:]  # the newest, past a bound no 0.11 room reached
        out[h] = {"epochs": _ranges(kept), "sha256": legacy_keys_digest(keys[e] for e in kept)}
    return out


def snapshot_entry(at: int, members: Iterable[Mapping[str, Any]], rooms: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Entry 0 of a database upgraded from a version without a log: the whole state then, and a
    :func:`root_salt`."""
    return {"seq": 0, "prev": "", "at": int(at), "kind": "snapshot", "salt": root_salt(),
            "state": {"members": sorted((dict(m) for m in members), key=lambda m: m["handle"]),
                      "rooms": sorted((dict(r) for r in rooms), key=lambda r: r["room_id"])}}


# --------------------------------------------------------------------------- context-labelled signatures


def key_package_input(room_id: str, epoch: int, handle: str, sealed: bytes, log_seq: int, log_hash: str) -> bytes:
    """The bytes a sealer signs for each member's sealed room key (docs/formats.md)."""
    return (KEY_PACKAGE_LABEL + f"{room_id}\n{epoch}\n{handle}\n{hashlib.sha256(sealed).hexdigest()}\n"
            f"{log_seq}\n{log_hash}".encode("ascii"))


def message_input(subject: str, epoch: int, sender: str, time_ms: int, msg_id: str, payload: bytes) -> bytes:
    """The bytes a sender signs for a room message (docs/formats.md)."""
    return (MESSAGE_LABEL + f"{subject}\n{epoch}\n{sender}\n{time_ms}\n{msg_id}\n"
            f"{hashlib.sha256(payload).hexdigest()}".encode("ascii"))


def _bus_key(bus_pub: Any) -> bytes:
    """The raw key of a ``bus_pub``: a canonical NATS user nkey (its checksum checked).

    Not checked as an Ed25519 point here, unlike the server's input check:
    nothing a client verifies uses another member's bus key.
    """
    try:
        return sign_pub_from_nkey(bus_pub)
    except KeyFormatError as e:
        raise KeyFormatError(f"bus_pub: {e}") from None


def verify_ed25519(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.bindings.crypto_sign_open(signature + message, public_key)
        return True
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False


# --------------------------------------------------------------------------- derived state


@dataclass(slots=True)
class Member:
    """A member as the log established it."""

    handle: str
    role: str
    sign_pub: bytes
    enc_pub: bytes
    enc_suite: str
    bus_pub: str | None
    since: int  # seq of the entry that made it

    def as_json(self) -> dict[str, Any]:
        return member_json(self.handle, self.role, self.sign_pub, self.enc_pub, self.enc_suite, self.bus_pub)


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """A keys entry: who sealed epoch ``epoch`` of a room, at which seq, to whom."""

    seq: int
    sealer: str
    roster: frozenset[str]
    #: The logged keys POST's signed ``Content-Digest`` (its body is not kept in
    #: the log): the sealer's client checks that the rekey logged is the one it sent.
    digest: str | None = None


@dataclass(slots=True)
class Room:
    room_id: str
    name: str
    owner: str  # "" when the owner was deleted
    epoch: int
    rekey_required: bool
    members: set[str]
    since: int
    epochs: dict[int, EpochRecord] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"room_id": self.room_id, "name": self.name, "owner": self.owner, "epoch": self.epoch,
                "rekey_required": self.rekey_required, "members": sorted(self.members)}


class _Spans:
    """Values over seq ranges: ``set(seq, value)`` from ``seq`` on; ``at(seq)``."""

    __slots__ = ("_seqs", "_values")

    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._values: list[Any] = []

    def set(self, seq: int, value: Any) -> None:
        if self._seqs and self._seqs[-1] == seq:
            self._values[-1] = value
        else:
            self._seqs.append(seq)
            self._values.append(value)

    def at(self, seq: int) -> Any:
        i = bisect.bisect_right(self._seqs, seq)
        return self._values[i - 1] if i else None


@dataclass(frozen=True)
class KeptBack:
    """A change of :attr:`LogState.in_doubt` (its author's client has not seen it confirmed) that
    the log holds where the server must have held it back: after a request the same author signed
    later (seq :attr:`later`), or after the head the client read once it had given up on it, or the
    head before sending when it could not read one (seq :attr:`given_up_at`)."""

    author: str
    nonce: str
    op: str  # the logged operation, as :func:`logged_operation` names it
    args: tuple[str, ...]  # its path arguments
    later: int | None
    given_up_at: int | None

    @property
    def after(self) -> int:
        """The seq it was appended after: the later request's, or the give-up's head."""
        return self.later if self.later is not None else int(self.given_up_at or 0)


#: The most (room, member) pairs a client takes in a snapshot entry 0 it pins on first use: a
#: review's server served 2,000 members in 3,400 rooms each (59 MiB) and every later command of
#: that identity took 3.8 GiB and 35 s (about 580 bytes a pair). A root pinned with `unibus
#: trust` (the operator's) is taken whatever its size.
FIRST_USE_SNAPSHOT_PAIRS = 200_000


class LogState:
    """What a verified log establishes: members, rooms, rosters, and their history.

    Built by :meth:`apply`, one entry at a time, each fully checked first (the
    chain, the author's RFC 9421 signature with the key the log itself gave
    them, the authority rules, nonce uniqueness and ``created`` order). A
    failing entry raises :class:`LogError` and leaves the state unchanged.

    ``trust_root`` is the pinned ``hash(entry 0)`` (None: pin whatever entry 0
    is — trust on first use); ``accepted_bootstraps`` the hashes of later
    bootstrap entries the user re-trusted explicitly. ``skew`` bounds the
    time checks: a request's ``created`` must be within it of the entry's
    ``at``, and never more than twice it older than the largest ``created``
    seen before. A client keeps the default, :data:`MAX_AUTH_SKEW` (the cap of
    every server's ``--auth-skew``), and never takes the skew a server reports:
    a compromised server would report a huge one, and a server whose skew was
    lowered would make its own older entries fail (docs/formats.md).

    ``in_doubt`` maps (author, nonce) of each change that author's client sent
    and has not seen confirmed (in flight, or given up on: an error, no answer,
    an interrupt, a process that ended first) to the seq of the log head the
    client read once it gave up on it (or, unread, the head it had verified
    before sending it; None: in flight): a client knows its own. Such a change that the log holds after a request the same
    author signed later (its ``created`` greater), or after that head, was
    held back by the server and appended late (:attr:`kept_back`). The
    mapping is read, never changed (the caller replays the log when it
    changes).
    """

    def __init__(self, *, trust_root: str | None = None, accepted_bootstraps: Iterable[str] = (),
                 skew: int = MAX_AUTH_SKEW, in_doubt: Mapping[tuple[str, str], int | None] | None = None,
                 first_use_pairs: int | None = None) -> None:
        self.trust_root = trust_root
        #: with no ``trust_root``, the most (room, member) pairs a snapshot entry 0 may hold (None: any):
        #: see :data:`FIRST_USE_SNAPSHOT_PAIRS`
        self.first_use_pairs = first_use_pairs
        self.accepted_bootstraps = set(accepted_bootstraps)
        self.skew = int(skew)
        self.in_doubt: Mapping[tuple[str, str], int | None] = in_doubt if in_doubt is not None else {}
        #: seq -> each change of :attr:`in_doubt` that the log holds where the server must have held it back
        self.kept_back: dict[int, KeptBack] = {}
        self._latest_signed: dict[str, tuple[int, int]] = {}  # author -> (largest created, its seq)
        self.members: dict[str, Member] = {}
        self.rooms: dict[str, Room] = {}
        self.hashes: list[str] = []
        self.nonces: set[tuple[str, str]] = set()
        #: (author, nonce) -> the room id each logged room creation made (a client confirms its own)
        self.created_rooms: dict[tuple[str, str], str] = {}
        #: (room, handle) -> (seq of an add, seq of the removal it follows) where the add's author signed
        #: it HELD_BACK_MARGIN or more before a removal that the log holds earlier: a request a server kept back (a try
        #: that failed) and appended after (docs/client.md); a rekey refuses to seal to it. Also an add in
        #: :attr:`kept_back` that put the member back: (its seq, the seq it was appended after)
        self.held_back: dict[tuple[str, str], tuple[int, int]] = {}
        #: (room, handle) -> (created, seq) of the removal of handle from room signed last, by anyone
        self._removed_last: dict[tuple[str, str], tuple[int, int]] = {}
        self.max_created = 0
        self._members_at: dict[str, _Spans] = {}  # handle -> Member snapshot (or None) over seqs
        self._rosters_at: dict[tuple[str, str], _Spans] = {}  # (room, handle) -> bool over seqs
        self._room_handles: dict[str, set[str]] = {}  # room -> every handle ever in it
        self._owners_at: dict[str, _Spans] = {}  # room -> owner handle ("" none) over seqs
        self._trusted = False  # replaying this client's own verified replica (see apply)
        #: checks put off by :meth:`defer_checks` (seq, kind, key, data, reason)
        self._deferred: list[tuple[int, int, bytes, bytes, str]] | None = None
        self._by_sign_pub: dict[bytes, str] = {}  # current members' keys, for the uniqueness rules
        self._by_bus_pub: dict[str, str] = {}
        self._indexed: dict[str, tuple[bytes, str | None]] = {}
        #: (room, handle) -> (epoch ranges, digest) of its keys sealed before the log (entry 0's legacy_keys)
        self._legacy: dict[tuple[str, str], tuple[tuple[tuple[int, int], ...], str]] = {}

    # -- reading ---------------------------------------------------------------

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last verified entry; ``(-1, "")`` for an empty log."""
        return (len(self.hashes) - 1, self.hashes[-1]) if self.hashes else (-1, "")

    @property
    def root(self) -> str | None:
        return self.hashes[0] if self.hashes else None

    def hash_at(self, seq: int) -> str | None:
        return self.hashes[seq] if 0 <= seq < len(self.hashes) else None

    def member_at(self, handle: str, seq: int) -> Member | None:
        spans = self._members_at.get(handle)
        return None if spans is None else spans.at(seq)

    def in_room_at(self, room_id: str, handle: str, seq: int) -> bool:
        spans = self._rosters_at.get((room_id, handle))
        return bool(spans is not None and spans.at(seq))

    def roster_at(self, room_id: str, seq: int) -> dict[str, int]:
        """The room's members at ``seq``, each with the seq that made that member (``Member.since``):
        a handle deleted and added again is another member."""
        out = {}
        for handle in self._room_handles.get(room_id, ()):
            if self.in_room_at(room_id, handle, seq):
                member = self.member_at(handle, seq)
                out[handle] = member.since if member is not None else -1
        return out

    def may_rekey_at(self, room_id: str, handle: str, seq: int) -> bool:
        """Owner (while a room member) or admin, at ``seq``."""
        member = self.member_at(handle, seq)
        if member is None:
            return False
        if member.role == "admin":
            return True
        owners = self._owners_at.get(room_id)
        return owners is not None and owners.at(seq) == handle and self.in_room_at(room_id, handle, seq)

    def rekeyers(self, room_id: str) -> list[str]:
        """Who may rekey the room now: its owner (if still a member) and every admin."""
        room = self.rooms.get(room_id)
        out = sorted(h for h, m in self.members.items() if m.role == "admin")
        if room is not None and room.owner in room.members and room.owner not in out:
            out.insert(0, room.owner)
        return out

    # -- replay ----------------------------------------------------------------

    def apply(self, entry: Any, *, trusted_hash: str | None = None) -> str:
        """Check ``entry`` as the next one and apply it; return its hash. Raises :class:`LogError`.

        ``trusted_hash``: the entry comes from a replica this client verified
        earlier and kept in a file only its user can write (docs/client.md,
        "The verified replica"); its hash is that one, and the signature and
        ``created`` checks are not repeated (every other rule is: the chain,
        the fields, authority, so that the derived state is rebuilt exactly).
        """
        return self._apply(entry, trusted_hash)[0]

    def apply_canonical(self, entry: Any) -> tuple[str, bytes]:
        """:meth:`apply`, also returning the RFC 8785 canonical JSON its hash covers (for a replica to keep)."""
        digest, raw = self._apply(entry, None)
        assert raw is not None
        return digest, raw

    def _apply(self, entry: Any, trusted_hash: str | None) -> tuple[str, bytes | None]:
        seq = entry.get("seq") if isinstance(entry, dict) else None
        if not isinstance(entry, dict):
            raise LogError(None, "an entry is not a JSON object")
        expected = len(self.hashes)
        if type(seq) is not int or seq != expected:
            raise LogError(expected, f"expected entry {expected}, got seq {seq!r}")
        kind = entry.get("kind")
        fields = _ENTRY_FIELDS.get(kind) if isinstance(kind, str) else None
        if fields is None:
            raise LogError(seq, f"unknown kind {kind!r}")
        if seq == 0:
            fields = fields | {"salt"}  # what makes the trust root unique (root_salt)
        if set(entry) != fields:
            raise LogError(seq, f"a {kind} entry {'0 ' if seq == 0 else ''}has exactly the fields "
                                f"{', '.join(sorted(fields))}")
        if seq == 0 and not (isinstance(entry["salt"], str) and _SALT.fullmatch(entry["salt"])):
            raise LogError(seq, "the salt of entry 0 must be 32 lowercase hex digits")
        prev = self.hashes[-1] if self.hashes else ""
        if not isinstance(entry["prev"], str) or not hmac.compare_digest(entry["prev"], prev):
            if seq == 0:
                raise LogError(seq, 'the prev of entry 0 must be ""')
            raise LogError(seq, f"prev is not the hash of entry {seq - 1}: one of the two was altered, or the log "
                                "was reordered or forked")
        at = entry["at"]
        if type(at) is not int or not 0 <= at <= MAX_SAFE_INT:
            raise LogError(seq, "at must be a non-negative integer")
        raw: bytes | None = None
        if trusted_hash is not None:
            digest = trusted_hash
        else:
            try:
                raw = _entry_bytes(entry)
            except (TypeError, ValueError, rfc8785.CanonicalizationError) as e:
                raise LogError(seq, f"not canonicalizable JSON: {e}") from None
            digest = hashlib.sha256(raw).hexdigest()
        self._trusted = trusted_hash is not None
        try:
            if kind == "request":
                if seq == 0:
                    raise LogError(seq, "entry 0 must be a bootstrap or a snapshot")
                self._apply_request(seq, entry)
            elif kind == "bootstrap":
                self._check_root_or_bootstrap(seq, digest)
                self._apply_bootstrap(seq, entry["member"])
            else:
                if seq != 0:
                    raise LogError(seq, "a snapshot may only be entry 0")
                self._check_root_or_bootstrap(seq, digest)
                self._apply_snapshot(seq, entry["state"])
        finally:
            self._trusted = False
        self.hashes.append(digest)
        return digest, raw

    # -- checks done in bulk -----------------------------------------------------------

    def defer_checks(self) -> None:
        """Put off the Ed25519 work (request signatures, signing-key point checks) until
        :meth:`run_deferred`, which can do it on several cores.

        Everything else is checked as entries are applied. Until
        :meth:`run_deferred` returns ``None`` the state is not verified: if it
        names a failure, throw this state away and apply the same entries again
        without deferring, which raises the exact error at the exact entry.
        """
        self._deferred = []

    def run_deferred(self, workers: int = 2) -> tuple[int, str] | None:
        """Run the checks put off since :meth:`defer_checks`; ``(seq, reason)`` of the first failure, or None."""
        checks, self._deferred = self._deferred or [], None
        if not checks:
            return None

        def run(part: list[tuple[int, int, bytes, bytes, str]]) -> tuple[int, str] | None:
            for seq, kind, key, data, reason in part:
                if kind == _SIGNATURE:
                    try:
                        nacl.bindings.crypto_sign_open(data, key)
                    except (nacl.exceptions.CryptoError, ValueError, TypeError):
                        return seq, reason
                elif not nacl.bindings.crypto_core_ed25519_is_valid_point(key):
                    return seq, reason
            return None

        if workers <= 1 or len(checks) < 64:
            return run(checks)
        # PyNaCl releases the GIL in libsodium: the parts run in parallel.
        from concurrent.futures import ThreadPoolExecutor

        size = -(-len(checks) // workers)
        with ThreadPoolExecutor(workers) as pool:
            found = [f for f in pool.map(run, [checks[i:i + size] for i in range(0, len(checks), size)]) if f]
        return min(found) if found else None

    def _check_root_or_bootstrap(self, seq: int, digest: str) -> None:
        if seq == 0:
            if self.trust_root is not None and not hmac.compare_digest(self.trust_root, digest):
                raise LogError(0, f"entry 0 has fingerprint {digest}, not the trusted {self.trust_root} "
                                  "(a different deployment, or a server that rewrote its history; if that pin was "
                                  "a mistake, get the right fingerprint from your operator and run "
                                  "`unibus trust FINGERPRINT --reset`)")
            return
        if digest not in self.accepted_bootstraps:
            raise UnacceptedBootstrap(seq, f"an offline bootstrap (recovery) after the trust root, fingerprint "
                                           f"{digest}; accept it only if your operator did this: unibus trust {digest}")

    # -- bootstrap and snapshot -------------------------------------------------------

    def _member_from_json(self, seq: int, doc: Any, what: str) -> Member:
        if not isinstance(doc, dict) or set(doc) != _MEMBER_FIELDS:
            raise LogError(seq, f"{what}: a member has exactly the fields {', '.join(sorted(_MEMBER_FIELDS))}")
        try:
            handle = doc["handle"]
            if not isinstance(handle, str) or not HANDLE_RE.match(handle):
                raise KeyFormatError(f"bad handle {handle!r}")
            if doc["role"] not in ROLES:
                raise KeyFormatError(f"bad role {doc['role']!r}")
            suite = validate_enc_suite(doc["enc_suite"])
            bus_pub = doc["bus_pub"]
            if self._trusted:  # checked when this client verified the entry (see apply)
                sign_pub = b64decode_strict(doc["sign_pub"], "sign_pub", 32)
                enc_pub = b64decode_strict(doc["enc_pub"], "enc_pub", None)
                if bus_pub is not None and not isinstance(bus_pub, str):
                    raise KeyFormatError("bus_pub must be a string or null")
            else:
                if self._deferred is not None:
                    sign_pub = b64decode_strict(doc["sign_pub"], "sign_pub", 32)
                    self._deferred.append((seq, _POINT, sign_pub, b"",
                                           f"{what}: sign_pub: not a valid Ed25519 public key (a point of the "
                                           "prime-order subgroup, not the identity)"))
                else:
                    sign_pub = validate_sign_pub(doc["sign_pub"])
                # Parsed (the key is well formed for its suite); the X25519 low-order
                # check is left to sealing, which refuses such a key by name.
                enc_pub = b64decode_strict(doc["enc_pub"], "enc_pub", ENC_PUB_SIZES[suite])
                enc_public_key(enc_pub, suite, check_low_order=False)
                if bus_pub is not None and _bus_key(bus_pub) == sign_pub:
                    raise KeyFormatError("bus_pub is the member's signing key")
        except (KeyFormatError, ValueError) as e:
            raise LogError(seq, f"{what}: {e}") from None
        return Member(handle, doc["role"], sign_pub, enc_pub, suite, bus_pub, seq)

    def _add_member(self, seq: int, member: Member) -> None:
        if member.handle in self.members:
            raise LogError(seq, f"member {member.handle!r} already exists")
        other = self._by_sign_pub.get(member.sign_pub)
        if other is not None:
            raise LogError(seq, f"member {member.handle!r} reuses the signing key of {other!r}")
        other = self._by_bus_pub.get(member.bus_pub) if member.bus_pub is not None else None
        if other is not None:
            raise LogError(seq, f"member {member.handle!r} reuses the bus key of {other!r}")
        self._set_member(seq, member)

    def _set_member(self, seq: int, member: Member | None, handle: str | None = None) -> None:
        handle = member.handle if member is not None else handle
        assert handle is not None
        old = self._indexed.pop(handle, None)
        if old is not None:
            if self._by_sign_pub.get(old[0]) == handle:
                del self._by_sign_pub[old[0]]
            if old[1] is not None and self._by_bus_pub.get(old[1]) == handle:
                del self._by_bus_pub[old[1]]
        if member is None:
            self.members.pop(handle, None)
        else:
            self.members[handle] = member
            self._by_sign_pub[member.sign_pub] = handle
            if member.bus_pub is not None:
                self._by_bus_pub[member.bus_pub] = handle
            self._indexed[handle] = (member.sign_pub, member.bus_pub)
        snapshot = None if member is None else Member(member.handle, member.role, member.sign_pub, member.enc_pub,
                                                      member.enc_suite, member.bus_pub, member.since)
        self._members_at.setdefault(handle, _Spans()).set(seq, snapshot)

    def _set_in_room(self, seq: int, room_id: str, handle: str, inside: bool) -> None:
        self._rosters_at.setdefault((room_id, handle), _Spans()).set(seq, inside)
        self._room_handles.setdefault(room_id, set()).add(handle)

    def _apply_bootstrap(self, seq: int, doc: Any) -> None:
        self._add_member(seq, self._member_from_json(seq, doc, "bootstrap member"))

    def _apply_snapshot(self, seq: int, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"members", "rooms"}:
            raise LogError(seq, "a snapshot's state has exactly the fields members, rooms")
        if not isinstance(state["members"], list) or not isinstance(state["rooms"], list):
            raise LogError(seq, "snapshot members and rooms are lists")
        if self.trust_root is None and self.first_use_pairs is not None:
            pairs = sum(len(d["members"]) for d in state["rooms"] if isinstance(d, dict)
                        and isinstance(d.get("members"), list))
            if pairs > self.first_use_pairs:
                raise LogError(seq, f"a snapshot of {pairs} room memberships met on first use, over the "
                                    f"{self.first_use_pairs} a client takes from a root it was not given: pin the "
                                    "trust root your operator gave you with `unibus trust FINGERPRINT` first")
        for doc in state["members"]:
            self._add_member(seq, self._member_from_json(seq, doc, "snapshot member"))
        for doc in state["rooms"]:
            if not isinstance(doc, dict) or set(doc) - {LEGACY_KEYS} != _ROOM_FIELDS:
                raise LogError(seq, f"a snapshot room has exactly the fields {', '.join(sorted(_ROOM_FIELDS))}"
                                    f" (and {LEGACY_KEYS}, optional)")
            room_id, name, owner, epoch = doc["room_id"], doc["name"], doc["owner"], doc["epoch"]
            if not isinstance(room_id, str) or not ROOM_ID_RE.match(room_id) or room_id in self.rooms:
                raise LogError(seq, f"snapshot room id {room_id!r} is malformed or repeated")
            if not isinstance(name, str) or not isinstance(owner, str) or type(epoch) is not int \
                    or not 0 <= epoch < MAX_SAFE_INT \
                    or type(doc["rekey_required"]) is not bool or not isinstance(doc["members"], list):
                raise LogError(seq, f"snapshot room {room_id}: malformed")
            members = set(doc["members"])
            if len(members) != len(doc["members"]) or not members <= self.members.keys():
                raise LogError(seq, f"snapshot room {room_id}: members must be distinct known members")
            if owner and owner not in self.members:
                raise LogError(seq, f"snapshot room {room_id}: unknown owner {owner!r}")
            # Keys sealed before the log existed carry no signature: only their
            # digests here make them usable, for reading (docs/formats.md).
            legacy = self._legacy_keys_from_json(seq, room_id, epoch, doc.get(LEGACY_KEYS, {}))
            self.rooms[room_id] = Room(room_id, name, owner, epoch, doc["rekey_required"], members, seq)
            self._legacy.update(legacy)
            self._owners_at.setdefault(room_id, _Spans()).set(seq, owner)
            for h in members:
                self._set_in_room(seq, room_id, h, True)

    def _legacy_keys_from_json(self, seq: int, room_id: str, epoch: int,
                               doc: Any) -> dict[tuple[str, str], tuple[tuple[tuple[int, int], ...], str]]:
        """A snapshot room's ``legacy_keys``, checked: known members, each with ascending disjoint
        ranges of epochs 1 to the room's (runs merged, as :func:`legacy_keys_json` writes them) and a
        SHA-256 (hex)."""
        if not isinstance(doc, dict):
            raise LogError(seq, f"snapshot room {room_id}: {LEGACY_KEYS} is an object")
        out: dict[tuple[str, str], tuple[tuple[tuple[int, int], ...], str]] = {}
        for handle, record in doc.items():
            if handle not in self.members or not isinstance(record, dict) or set(record) != {"epochs", "sha256"} \
                    or not isinstance(record["sha256"], str) or not _SHA256_HEX.match(record["sha256"]):
                raise LogError(seq, f"snapshot room {room_id}: {LEGACY_KEYS}: a known member each, with exactly "
                                    "epochs and a SHA-256 (hex)")
            ranges = record["epochs"]
            ok = isinstance(ranges, list) and bool(ranges)
            lowest = 1  # each range starts past the one before and a gap: runs are merged
            for r in ranges if ok else ():
                if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)
                        and lowest <= r[0] <= r[1] <= epoch):
                    ok = False
                    break
                lowest = r[1] + 2
            if not ok or sum(b - a + 1 for a, b in ranges) > LEGACY_MAX_EPOCHS:
                raise LogError(seq, f"snapshot room {room_id}: {LEGACY_KEYS} of {handle}: epochs are ascending, "
                                    f"disjoint, separate ranges [first, last] within 1 to {epoch}, "
                                    f"{LEGACY_MAX_EPOCHS} epochs at most")
            # kept as ranges: expanded only for the client's own member (legacy_epochs), so that a hostile
            # entry 0 met on first use cannot make every record 10,000 ints (a red team: 187 MiB from 58 KB)
            out[(room_id, handle)] = (tuple((a, b) for a, b in ranges), record["sha256"])
        return out

    # -- requests ------------------------------------------------------------------

    def _apply_request(self, seq: int, entry: dict[str, Any]) -> None:
        req, result = entry["request"], entry["result"]
        op, args = self._request_operation(seq, req, result)
        body = self._request_body(seq, req, op)
        author, pending = self._request_author(seq, req, op, body, entry["at"])
        if (author.handle, pending.nonce) in self.nonces:
            raise LogError(seq, f"nonce {pending.nonce} of {author.handle} appears twice (a replayed request)")
        if not self._trusted and pending.created < self.max_created - 2 * self.skew:
            raise LogError(seq, f"created {pending.created} is more than {2 * self.skew} s older than an "
                                "earlier entry's (a request held back and appended late)")
        doc = self._body_json(seq, op, body) if op in _BODY_FIELDS else None
        gone = [(r.room_id, args[0]) for r in self.rooms.values() if args[0] in r.members] \
            if op == "member.delete" else []
        adds = op == "room.member_add" and args[0] in self.rooms and args[1] not in self.rooms[args[0]].members
        if op == "room.keys":
            self._op_room_keys(seq, author, args, doc, result, digest=req["content_digest"])
        else:
            getattr(self, "_op_" + op.replace(".", "_"))(seq, author, args, doc, result)
        self.nonces.add((author.handle, pending.nonce))
        later = self._latest_signed.get(author.handle)
        kept = False
        if (author.handle, pending.nonce) in self.in_doubt:
            given_up_at = self.in_doubt[(author.handle, pending.nonce)]
            after_later = later[1] if later is not None and later[0] > pending.created else None
            after_give_up = given_up_at if given_up_at is not None and seq > given_up_at else None
            if after_later is not None or after_give_up is not None:
                kept = True
                self.kept_back[seq] = KeptBack(author.handle, pending.nonce, op, tuple(args), after_later,
                                               after_give_up)
        if later is None or pending.created > later[0]:
            self._latest_signed[author.handle] = (pending.created, seq)
        if op == "room.create":
            self.created_rooms[(author.handle, pending.nonce)] = result["room_id"]
        elif op == "room.member_remove" or gone:
            for room_id, handle in gone or [(args[0], args[1])]:
                last = self._removed_last.get((room_id, handle))
                if last is None or pending.created >= last[0]:
                    self._removed_last[(room_id, handle)] = (pending.created, seq)
                self.held_back.pop((room_id, handle), None)
        elif adds:  # an add that changes nothing neither raises the flag nor clears it
            removed = self._removed_last.get((args[0], args[1]))
            if kept:
                self.held_back[(args[0], args[1])] = (seq, self.kept_back[seq].after)
            elif removed is not None and pending.created <= removed[0] - HELD_BACK_MARGIN:
                self.held_back[(args[0], args[1])] = (seq, removed[1])
            else:
                self.held_back.pop((args[0], args[1]), None)
        self.max_created = max(self.max_created, pending.created)

    @staticmethod
    def _request_operation(seq: int, req: Any, result: Any) -> tuple[str, Any]:
        """The logged operation a request entry names, and its path arguments; its fields well-formed."""
        if not isinstance(req, dict) or set(req) != _REQUEST_FIELDS:
            raise LogError(seq, f"request has exactly the fields {', '.join(sorted(_REQUEST_FIELDS))}")
        for name in ("method", "path", "query", "signature_input", "signature"):
            if not isinstance(req[name], str):
                raise LogError(seq, f"request.{name} must be a string")
        if req["content_digest"] is not None and not isinstance(req["content_digest"], str):
            raise LogError(seq, "request.content_digest must be a string or null")
        found = logged_operation(req["method"], req["path"])
        if found is None:
            raise LogError(seq, f"{req['method']} {req['path']!r} is not a logged request")
        op, args = found
        if req["query"] != "":
            raise LogError(seq, "a logged request has no query")
        if not isinstance(result, dict) or set(result) != _RESULT_FIELDS[op]:
            raise LogError(seq, f"{op}: result must have exactly the fields {sorted(_RESULT_FIELDS[op])}")
        return op, args

    @staticmethod
    def _request_body(seq: int, req: dict[str, Any], op: str) -> bytes | None:
        """The request's body as logged: kept for the operations that need it, else absent."""
        if req["body"] is None:
            if op in _BODY_FIELDS:
                raise LogError(seq, f"{op}: the request body is missing")
            return None
        if op in BODYLESS:
            raise LogError(seq, f"{op}: the body is not kept in the log")
        if not isinstance(req["body"], str):
            raise LogError(seq, "request.body must be a base64 string or null")
        try:
            return b64decode_strict(req["body"], "request.body") if req["body"] else b""
        except KeyFormatError as e:
            raise LogError(seq, str(e)) from None

    def _request_author(self, seq: int, req: dict[str, Any], op: str, body: bytes | None,
                        at: Any) -> tuple[Member, Any]:
        """The author's signature, with the key the log established for them: the author and the checked request."""
        trusted = self._trusted
        try:
            pending = check_logged_request(req["method"], req["path"], req["content_digest"], req["signature_input"],
                                           req["signature"], body, op, now=float(at),
                                           skew=float(MAX_SAFE_INT) if trusted else self.skew)
        except SignatureError as e:
            raise LogError(seq, f"signature: {e.reason}") from None
        if pending.tag is not None and pending.tag != self.root:
            raise LogError(seq, "signed for another deployment (its tag is not this log's entry 0)")
        author = self.members.get(pending.keyid)
        if author is None:
            raise LogError(seq, f"the author {pending.keyid!r} is not a member at this point")
        if trusted:
            pass
        elif self._deferred is not None:
            self._deferred.append((seq, _SIGNATURE, author.sign_pub, pending.signature + pending.signature_base,
                                   f"the signature does not verify with {author.handle}'s signing key"))
        else:
            try:
                pending.verify(author.sign_pub)
            except SignatureError:
                raise LogError(seq, f"the signature does not verify with {author.handle}'s signing key") from None
        return author, pending

    def _body_json(self, seq: int, op: str, body: bytes | None) -> dict[str, Any]:
        try:
            doc = json.loads(body or b"")
        except (ValueError, UnicodeDecodeError):
            raise LogError(seq, f"{op}: the body is not JSON") from None
        required, optional = _BODY_FIELDS[op]
        if not isinstance(doc, dict) or not required <= doc.keys() or not doc.keys() <= required | optional:
            raise LogError(seq, f"{op}: the body must have the fields {sorted(required)} (optional {sorted(optional)})")
        return doc

    def _require(self, seq: int, ok: bool, why: str) -> None:
        if not ok:
            raise LogError(seq, why)

    def _room(self, seq: int, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            raise LogError(seq, f"room {room_id} does not exist at this point")
        return room

    def _may_manage(self, room: Room, author: Member) -> bool:
        return author.role == "admin" or (room.owner == author.handle and author.handle in room.members)

    def _op_member_add(self, seq: int, author: Member, _args: tuple[str, ...], doc: Any, _result: Any) -> None:
        self._require(seq, author.role == "admin", f"{author.handle} added a member without being an admin")
        fields = {**doc}
        fields.setdefault("enc_suite", "X25519")
        if fields["enc_suite"] not in ENC_SUITES:
            raise LogError(seq, f"unknown enc_suite {fields['enc_suite']!r}")
        member = self._member_from_json(seq, fields, "added member")
        if member.bus_pub is None:
            raise LogError(seq, "an added member needs a bus_pub")
        self._add_member(seq, member)

    def _op_member_role(self, seq: int, author: Member, args: tuple[str, ...], doc: Any, _result: Any) -> None:
        self._require(seq, author.role == "admin", f"{author.handle} changed a role without being an admin")
        target = self.members.get(args[0])
        self._require(seq, target is not None, f"no member {args[0]!r}")
        role = doc["role"]
        self._require(seq, role in ROLES, f"bad role {role!r}")
        assert target is not None
        if target.role == "admin" and role != "admin":
            self._require(seq, any(m.role == "admin" for h, m in self.members.items() if h != target.handle),
                          f"{target.handle} is the last admin and cannot be demoted")
        target.role = role
        self._set_member(seq, target)

    def _op_member_delete(self, seq: int, author: Member, args: tuple[str, ...], _doc: Any, _result: Any) -> None:
        self._require(seq, author.role == "admin", f"{author.handle} deleted a member without being an admin")
        target = self.members.get(args[0])
        self._require(seq, target is not None, f"no member {args[0]!r}")
        assert target is not None
        if target.role == "admin":
            self._require(seq, any(m.role == "admin" for h, m in self.members.items() if h != target.handle),
                          f"{target.handle} is the last admin and cannot be deleted")
        for room in self.rooms.values():
            if target.handle in room.members:
                room.members.discard(target.handle)
                room.rekey_required = True
                self._set_in_room(seq, room.room_id, target.handle, False)
            if room.owner == target.handle:
                room.owner = ""  # ownership dies with the member
                self._owners_at[room.room_id].set(seq, "")
        self._set_member(seq, None, target.handle)

    def _op_member_bus_key(self, seq: int, author: Member, _args: tuple[str, ...], doc: Any, _result: Any) -> None:
        bus_pub = doc["bus_pub"]
        try:
            raw = _bus_key(bus_pub)
        except KeyFormatError as e:
            raise LogError(seq, str(e)) from None
        self._require(seq, raw != author.sign_pub, "a bus key equal to the signing key")
        other = self._by_bus_pub.get(bus_pub)
        self._require(seq, other is None or other == author.handle, f"{author.handle} took the bus key of {other}")
        author.bus_pub = bus_pub
        self._set_member(seq, author)

    def _op_room_create(self, seq: int, author: Member, _args: tuple[str, ...], doc: Any, result: Any) -> None:
        room_id, name = result["room_id"], doc["name"]
        self._require(seq, isinstance(room_id, str) and bool(ROOM_ID_RE.match(room_id)), "malformed room_id")
        self._require(seq, room_id not in self.rooms and room_id not in self._owners_at,
                      f"room id {room_id} was used before")
        self._require(seq, isinstance(name, str) and 0 < len(name) <= 200, "malformed room name")
        self.rooms[room_id] = Room(room_id, name, author.handle, 0, True, {author.handle}, seq)
        self._owners_at.setdefault(room_id, _Spans()).set(seq, author.handle)
        self._set_in_room(seq, room_id, author.handle, True)

    def _op_room_delete(self, seq: int, author: Member, args: tuple[str, ...], _doc: Any, _result: Any) -> None:
        room = self._room(seq, args[0])
        self._require(seq, self._may_manage(room, author), f"{author.handle} deleted room {room.room_id} "
                                                           "without being its owner or an admin")
        for h in room.members:
            self._set_in_room(seq, room.room_id, h, False)
        self._owners_at[room.room_id].set(seq, "")
        del self.rooms[room.room_id]

    def _op_room_member_add(self, seq: int, author: Member, args: tuple[str, ...], _doc: Any, _res: Any) -> None:
        room = self._room(seq, args[0])
        self._require(seq, self._may_manage(room, author), f"{author.handle} added a member to room "
                                                           f"{room.room_id} without being its owner or an admin")
        handle = args[1]
        self._require(seq, handle in self.members, f"no member {handle!r}")
        if handle not in room.members:
            room.members.add(handle)
            room.rekey_required = True
            self._set_in_room(seq, room.room_id, handle, True)

    def _op_room_member_remove(self, seq: int, author: Member, args: tuple[str, ...], _doc: Any, _r: Any) -> None:
        room = self._room(seq, args[0])
        handle = args[1]
        self._require(seq, handle == author.handle or self._may_manage(room, author),
                      f"{author.handle} removed {handle} from room {room.room_id} without the right")
        self._require(seq, handle in room.members, f"{handle} is not in room {room.room_id}")
        room.members.discard(handle)
        room.rekey_required = True
        self._set_in_room(seq, room.room_id, handle, False)

    def _op_room_keys(self, seq: int, author: Member, args: tuple[str, ...], _doc: Any, result: Any,
                      digest: str | None = None) -> None:
        room = self._room(seq, args[0])
        self._require(seq, self._may_manage(room, author), f"{author.handle} rekeyed room {room.room_id} "
                                                           "without being its owner or an admin")
        epoch = result["epoch"]
        self._require(seq, type(epoch) is int and epoch == room.epoch + 1 and epoch <= MAX_SAFE_INT,
                      f"room {room.room_id}: epoch {epoch!r} does not follow {room.epoch}")
        room.epoch = epoch
        room.rekey_required = False
        room.epochs[epoch] = EpochRecord(seq, author.handle, frozenset(room.members), digest)

    # -- checks the client makes with the verified state -----------------------------

    def check_key_package(self, room_id: str, epoch: int, me: str, sealed: bytes, sig: bytes, sealer: str,
                          log_head: Mapping[str, Any]) -> None:
        """Raise :class:`LogError` unless a sealed room key may be used (docs/formats.md, key packages)."""
        seq, digest = log_head.get("seq") if isinstance(log_head, Mapping) else None, \
            log_head.get("hash") if isinstance(log_head, Mapping) else None
        if type(seq) is not int or not isinstance(digest, str):
            raise LogError(None, f"room {room_id} epoch {epoch}: the key package has no log head")
        known = self.hash_at(seq)
        if known is None or not hmac.compare_digest(known, digest):
            raise LogError(seq, f"room {room_id} epoch {epoch}: the key package's log head is not in the "
                                "verified log")
        room = self.rooms.get(room_id)
        record = room.epochs.get(epoch) if room is not None else None
        if record is None:
            raise LogError(None, f"room {room_id}: the verified log has no rekey to epoch {epoch}")
        if record.sealer != sealer or not seq < record.seq:
            raise LogError(record.seq, f"room {room_id} epoch {epoch}: sealed by {record.sealer} after seq "
                                       f"{seq} in the log, but the package names {sealer}")
        if not self.may_rekey_at(room_id, sealer, seq):
            raise LogError(seq, f"room {room_id}: {sealer} could not rekey it at seq {seq}")
        self.check_roster_kept(room_id, epoch, seq)
        if not (self.in_room_at(room_id, me, seq) and me in record.roster):
            raise LogError(seq, f"room {room_id} epoch {epoch}: {me} was not in the room's roster")
        author = self.member_at(sealer, record.seq)
        assert author is not None
        message = key_package_input(room_id, epoch, me, sealed, seq, digest)
        if len(sig) != 64 or not verify_ed25519(author.sign_pub, message, sig):
            raise LogError(None, f"room {room_id} epoch {epoch}: the key package signature of {sealer} "
                                 "does not verify")

    def legacy_epochs(self, room_id: str, me: str) -> tuple[int, ...]:
        """The epochs of ``room_id`` whose keys entry 0 records as sealed to ``me`` before the log
        (empty: none, or not a room and member of entry 0 any more; :meth:`check_legacy_keys`)."""
        room, member = self.rooms.get(room_id), self.members.get(me)
        if room is None or room.since != 0 or member is None or member.since != 0:
            return ()
        found = self._legacy.get((room_id, me))
        return tuple(e for a, b in found[0] for e in range(a, b + 1)) if found is not None else ()

    def legacy_covers(self, room_id: str, me: str, epoch: int) -> bool:
        """Whether :meth:`legacy_epochs` holds ``epoch``, without listing them (a cached key's check)."""
        room, member = self.rooms.get(room_id), self.members.get(me)
        found = self._legacy.get((room_id, me))
        return (room is not None and room.since == 0 and member is not None and member.since == 0
                and found is not None and any(a <= epoch <= b for a, b in found[0]))

    def check_legacy_keys(self, room_id: str, me: str, sealed: Mapping[int, bytes]) -> None:
        """Raise :class:`LogError` unless ``sealed`` (epoch -> sealed bytes) are the very keys entry 0
        records as sealed to ``me`` in ``room_id`` before the log existed: all of its epochs, and
        their digest (docs/formats.md, "Keys sealed before 0.12").

        Such keys have no sealer's signature; entry 0 (pinned by every member)
        vouches for them instead. Only for reading what was stored under them:
        the room must be one of entry 0 (never deleted and made again under its
        id), ``me`` the same member as in entry 0 (never deleted and added
        again), and the caller never encrypts anything new with them."""
        epochs = self.legacy_epochs(room_id, me)
        if not epochs:
            raise LogError(0, f"room {room_id}: entry 0 records no key sealed to {me} before the log (or the "
                              "room or the member is not the one of entry 0 any more)")
        if set(sealed) != set(epochs):
            missing, extra = sorted(set(epochs) - set(sealed)), sorted(set(sealed) - set(epochs))
            raise LogError(0, f"room {room_id}: entry 0 records keys sealed to {me} for {len(epochs)} epochs; "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"not recorded {extra[:5]}{'...' if len(extra) > 5 else ''}")
        digest = self._legacy[(room_id, me)][1]
        if not hmac.compare_digest(legacy_keys_digest(sealed[e] for e in epochs), digest):
            raise LogError(0, f"room {room_id}: the keys sealed to {me} before the log are not the ones entry 0 "
                              "records")

    def check_roster_kept(self, room_id: str, epoch: int, head_seq: int) -> EpochRecord:
        """The log's rekey of ``room_id`` to ``epoch``, sealed at ``head_seq``: raise :class:`LogError`
        unless that rekey exists and every member of the room at ``head_seq`` is still in it at
        the rekey, as the same member.

        A sealer seals to the roster at its log head, and the log takes the
        rekey later. A member gone in between (removed, or deleted and added
        again with other keys) means the keys may come from a rekey the server
        refused, or held back past the change: the copy sealed to that member
        opens the same key. Members added in between are not a risk (an honest
        server accepts the keys only for its current members, so a sealer
        meets this only with a stale head).
        """
        room = self.rooms.get(room_id)
        record = room.epochs.get(epoch) if room is not None else None
        if record is None:
            raise LogError(None, f"room {room_id}: the verified log has no rekey to epoch {epoch}")
        at_rekey = self.roster_at(room_id, record.seq)
        gone = sorted(h for h, since in self.roster_at(room_id, head_seq).items() if at_rekey.get(h) != since)
        if gone:
            raise LogError(record.seq, f"room {room_id} epoch {epoch}: sealed at seq {head_seq} to members who are "
                                       f"gone by the rekey (seq {record.seq}): {', '.join(gone)} (removed, or deleted "
                                       "and added again); the room must be rekeyed again")
        return record

    def former_key_holders(self, room_id: str, epoch: int) -> list[str]:
        """Who held the key of ``epoch`` (the roster its rekey sealed it to, and the sealer, who made
        it; for a key sealed before the log, those entry 0 records) and is not in the room now as
        the same member: what was sealed under that key, a blob say, may be theirs (a blob carries
        no signature of its uploader; a message does)."""
        room = self.rooms.get(room_id)
        if room is None:
            return []
        record = room.epochs.get(epoch)
        if record is not None:
            held = {h: self.member_at(h, record.seq) for h in record.roster | {record.sealer}}
        elif room.since == 0:  # a room of entry 0 (0.11): the keys entry 0 records
            held = {h: self.member_at(h, 0) for (rid, h), (ranges, _digest) in self._legacy.items()
                    if rid == room_id and any(a <= epoch <= b for a, b in ranges)}
        else:
            return []
        out = []
        for handle, then in sorted(held.items()):
            now = self.members.get(handle)
            if handle not in room.members or now is None or then is None or now.since != then.since:
                out.append(handle)
        return out

    def check_sender(self, room_id: str, sender: str, log_seq: int) -> Member:
        """The member who may have sent to the room under a key package whose log head is ``log_seq``:
        in the room then, and still the same member now (a handle deleted and added again is
        another member, whose old signing key speaks for nobody)."""
        member = self.member_at(sender, log_seq)
        if member is None or not self.in_room_at(room_id, sender, log_seq):
            raise LogError(None, f"{sender} was not in room {room_id} at seq {log_seq}")
        now = self.members.get(sender)
        if now is not None and now.since != member.since:
            raise LogError(now.since, f"{sender} was deleted and added again (seq {now.since}) after seq {log_seq}: "
                                      "the member who held that epoch's key is gone")
        return member

