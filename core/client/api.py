"""The member's async SDK: signed control-plane calls and the encrypted bus.

::

    from unibus.client import UnibusClient, load_identity

    async with UnibusClient("http://127.0.0.1:8470", load_identity("~/.config/unibus/identity.json")) as c:
        me = await c.me()
        room = await c.create_room("ops")
        await c.add_room_member(room["room_id"], "bob")
        epoch = await c.rekey(room["room_id"])
        async with c.bus() as bus:
            await bus.send(room["room_id"], "chat", b"hello")

Nothing the server says about members, keys and rosters is trusted as such:
the client keeps a verified replica of the server's membership log
(:mod:`unibus.client.replica`) and checks against it whom it seals room keys
to (:meth:`UnibusClient.rekey`), which room keys it uses (each key package's
signature, :meth:`UnibusClient.room_key`) and who sent each message
(:meth:`Bus.listen`). docs/client.md ("What the client verifies") has the rules.

Every request under ``/v1/`` is signed with the member's Ed25519 key
(RFC 9421, :func:`unibus.signing.sign_request`). A JSON body is serialized
once (compact separators) and exactly those bytes are both signed (through
``Content-Digest``) and sent. The URL is built percent-encoded by this module
and handed to aiohttp as ``yarl.URL(..., encoded=True)``, so the ``@path`` and
``@query`` that were signed are byte for byte what aiohttp puts on the wire
(``url.raw_path_qs``).

Errors: a non-2xx answer raises :class:`ApiError` (``status`` and the RFC 9457
``problem`` dict; ``str()`` is ``"<status> <title>: <detail>"``). A server that
cannot be reached raises :class:`ServerUnreachable` (an HTTPS server whose
certificate does not verify too); the bus raises :class:`BusError`. An answer
that contradicts the verified log (or a log that fails a check) raises
:class:`~unibus.client.replica.VerificationError`; a room that needs a rekey
this member may not do raises :class:`RekeyRequired`.

TLS: ``UnibusClient(..., ssl=ctx)`` takes one ``ssl.SSLContext`` (make it with
:func:`unibus.client.tls_context`) that verifies the HTTPS control plane and
the ``tls://`` bus alike, and presents a client certificate if it holds one.
See docs/client.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import ssl as _ssl
import weakref
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Self

import aiohttp
import yarl
import nats
from nats import errors as nats_errors
from nats.errors import Error as NatsError

from ..aio import cancel_and_wait, close_nats, own_cancel_only, quiet_tls_eof_warnings, within
from ..memberlog import FIRST_USE_SNAPSHOT_PAIRS, HELD_BACK_MARGIN, LogError, LogState, logged_operation, verify_ed25519
from ..memberlog import Room as LogRoom
from ..signing import SignatureError, make_nonce, parse_content_digest, sign_request
from ..tls import connect_bounded, permanent_tls_error
from ..wire import AUTH_SKEW_HEADER, MAX_AUTH_SKEW
from .keys import DEFAULT_ENC_SUITE, Identity, NoBusKey, with_bus_key
from .replica import LogVerificationError, Replica, ReplicaError, VerificationError, server_id
from .sealing import (
    MessageError,
    SealError,
    decrypt_message,
    encrypt_message,
    message_subject,
    new_room_key,
    open_room_key,
    parse_message_subject,
    room_subject,
    seal_room_key,
    validate_room_id,
)
from .seen import SeenIds
from .signed import (
    LISTENER_START_SLACK,
    SENDER_HEADER,
    Envelope,
    ReplayGuard,
    message_headers,
    parse_envelope,
    sign_key_packages,
)

__all__ = [
    "DEFAULT_MAX_AGE",
    "REJECT_REASONS",
    "SENDER_HEADER",
    "ApiError",
    "Bus",
    "BusError",
    "KeyUnavailable",
    "LogVerificationError",
    "Message",
    "NotARoomMember",
    "RekeyRequired",
    "ReplicaError",
    "RoomListener",
    "ServerUnreachable",
    "UnibusClient",
    "UnsignedKey",
    "VerificationError",
]

log = logging.getLogger("unibus.client")

#: Seconds a received message's ``Unibus-Time`` may be away from the listener's clock.
DEFAULT_MAX_AGE = 300.0
#: Why a listener rejects a message (the keys of :attr:`RoomListener.rejected`).
REJECT_REASONS = ("malformed", "stale", "replay", "no-key", "key", "sender", "signature", "decrypt")

#: After a log sync that did not find the epoch a message named, no other such
#: sync of the room for this many seconds (see :meth:`UnibusClient.message_key`).
UNKNOWN_EPOCH_SYNC_INTERVAL = 1.0

#: A listener's buffer of messages received but not yet taken (see :class:`RoomListener`).
LISTENER_MAX_BYTES = 64 * 1024 * 1024
LISTENER_MAX_MESSAGES = 100_000

#: How many times :meth:`UnibusClient.rekey` retries after a 409 (a concurrent
#: rekey or a membership change between its GET and its POST).
REKEY_RETRIES = 3
#: How many times a request refused with a retryable 503 is signed again and resent.
#: How often a 503 refused before it was served is tried again (docs/client.md):
#: replay protection made again after a crash refuses for about a second (longer when a
#: signer's clock ran ahead of the server's).
RETRIES_503 = 4
#: How far ahead of the clock a change's ``created`` may be put, to follow a change of the same
#: identity in flight (:meth:`UnibusClient._change_created`); a server takes up to its --auth-skew.
CREATED_AHEAD = 2
#: Seconds a bus connection may take beyond ``connect_timeout`` (its retries included).
CONNECT_SLACK = 5.0
#: Reconnects in a row that a send or a subscription waits through for the server to confirm it.
BARRIER_TRIES = 3
#: Reconnecting the bus (docs/client.md, "Reconnects"): the first attempt after
#: a disconnect waits up to RECONNECT_JITTER s (a kick: come back at once, but
#: not every kicked member in the same millisecond); each later one
#: RECONNECT_WAIT s plus up to as much again. The bus stops after
#: AUTH_FAILURES_LIMIT authorization violations in a row that the control plane
#: says retrying cannot mend, or MAX_RECONNECTS failed attempts on each server
#: (given again, and spaced twice as far apart, each time the control plane says
#: it still has the refused bus key).
RECONNECT_JITTER = 0.05
RECONNECT_WAIT = 0.25
#: The longest wait between two reconnect attempts (see Bus._next_server), jitter aside.
RECONNECT_WAIT_MAX = 8.0
AUTH_FAILURES_LIMIT = 3
MAX_RECONNECTS = 60
#: Seconds a first connection refused while the control plane still has the member's bus key
#: is tried again: about what MAX_RECONNECTS refused reconnects take (115 s, measured).
FIRST_CONNECT_PATIENCE = 120.0
#: The longest wait between two such tries, jitter aside (the budget of logins gets 64 units back a second).
PATIENCE_WAIT_MAX = 4.0
#: A bus the control plane says still has its key asks again after at most this many more
#: refusals (each time twice as many, up to this): within the MAX_RECONNECTS that such an
#: answer gives every server again.
ASK_AGAIN_WITHIN = MAX_RECONNECTS // 2
#: Then it asks the control plane why, after up to this many seconds (jittered).
REFUSED_ASK_JITTER = 1.0

_JSON_TYPE = "application/json"


# --------------------------------------------------------------------------- errors


def _bad_answer(method: str, path: str, wanted: str) -> ApiError:
    return ApiError(502, {"title": "Bad response",
                          "detail": f"the server answered {method} {path} with something else than {wanted}"})


class ApiError(Exception):
    """The server answered with a non-2xx status.

    ``status`` is the HTTP status, ``problem`` the RFC 9457 body as a dict
    (``type``, ``title``, ``status``, ``detail``, maybe more such as
    ``missing``/``extra``). A body that is not problem JSON is turned into one.
    """

    def __init__(self, status: int, problem: Mapping[str, Any] | None = None) -> None:
        self.status = int(status)
        self.problem: dict[str, Any] = dict(problem or {})
        self.problem.setdefault("status", self.status)
        super().__init__(str(self))

    @property
    def title(self) -> str:
        t = self.problem.get("title")
        if isinstance(t, str) and t:
            return t
        try:
            from http import HTTPStatus

            return HTTPStatus(self.status).phrase
        except ValueError:
            return "Error"

    @property
    def detail(self) -> str:
        d = self.problem.get("detail")
        return d if isinstance(d, str) else ("" if d is None else str(d))

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.detail}"


class KeyUnavailable(ApiError):
    """No sealed room key addressed to this member exists for that room (and epoch).

    Raised instead of a plain :class:`ApiError` for a 404 of
    ``GET /v1/rooms/{id}/keys/me``: the room was never keyed (epoch 0: run a
    rekey), or the member was not in the room at that epoch; and for its 403:
    the member was never in the room.
    """

    def __init__(self, room_id: str, epoch: int | None, status: int, problem: Mapping[str, Any] | None) -> None:
        self.room_id = room_id
        self.epoch = epoch
        super().__init__(status, problem)

    def __str__(self) -> str:
        what = f"epoch {self.epoch} of room {self.room_id}" if self.epoch is not None else f"room {self.room_id}"
        base = super().__str__()
        hint = (
            f" (no room key sealed to you for {what}; if the room has never been keyed, "
            f"its owner or an admin runs `unibus rooms rekey {self.room_id}`)"
        )
        return base + hint


class ServerUnreachable(ConnectionError):
    """The control-plane server could not be reached (refused, DNS, timeout...)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the unibus server at {url}: {reason}")


class BusError(Exception):
    """The bus could not be joined, or was lost (access revoked, connection closed)."""


class UnsignedKey(VerificationError):
    """The server offers a room key sealed before 0.12: no key package signature. Usable only to
    read what was stored under it, and only when entry 0 of the log records it (``reason`` says
    why not, when that was tried)."""

    def __init__(self, room_id: str, epoch: int, reason: str | None = None) -> None:
        self.room_id, self.epoch = room_id, epoch
        if reason is None:
            super().__init__(f"the key of epoch {epoch} of room {room_id} was sealed before unibus 0.12 and carries "
                             f"no signature, so nothing new is encrypted with it; its owner or an admin must rekey "
                             f"the room (`unibus rooms rekey {room_id}`)")
        else:
            super().__init__(f"the key of epoch {epoch} of room {room_id} was sealed before unibus 0.12 and carries "
                             f"no signature, and it cannot be verified: {reason}")


#: Keys fetched at once when a member's keys of a room sealed before 0.12 are checked together.
LEGACY_FETCHES = 8


def _legacy_sealed_bytes(room_id: str, epoch: int, value: Any) -> bytes:
    try:
        if not isinstance(value, str):
            raise ValueError
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"the key package of epoch {epoch} of room {room_id} is malformed "
                                "(sealed must be base64)") from None


class RekeyRequired(Exception):
    """The room's membership changed since its last rekey, and this member may not rekey it.

    ``rekeyers`` are the handles that may (its owner, if still in the room,
    and every admin), as the verified log has them.
    """

    def __init__(self, room_id: str, rekeyers: Iterable[str]) -> None:
        self.room_id = room_id
        self.rekeyers = list(rekeyers)
        who = ", ".join(self.rekeyers) or "nobody (the log has no admin)"
        super().__init__(f"room {room_id} needs a rekey (its membership changed) before anything is sent to it, "
                         f"and only its owner or an admin can do it: {who} (`unibus rooms rekey {room_id}`)")


class NotARoomMember(Exception):
    """This member is not in the room, as the verified log has it."""

    def __init__(self, room_id: str, handle: str) -> None:
        self.room_id, self.handle = room_id, handle
        super().__init__(f"{handle} is not a member of room {room_id} in the verified membership log")


# --------------------------------------------------------------------------- TLS


def tls_context(ca: str | os.PathLike[str] | None = None, cert: str | os.PathLike[str] | None = None,
                key: str | os.PathLike[str] | None = None) -> _ssl.SSLContext:
    """The ``ssl=`` of :class:`UnibusClient`: verify servers against ``ca`` (a PEM
    file; default: the system's trust store), present ``cert``/``key`` if given.

    TLS 1.2 at least; host names are checked. A file that cannot be used
    raises ``ValueError`` naming it (a key file others may read included).
    """
    from pathlib import Path

    from ..tls import client_context

    def path(p: str | os.PathLike[str] | None) -> Path | None:
        return None if p is None else Path(p).expanduser()

    return client_context(path(ca), path(cert), path(key))


# --------------------------------------------------------------------------- helpers


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _same(served: Any, logged: Any) -> bool:
    """A served JSON value is the logged one, of the same type (``1`` is not ``True``, ``""`` not ``None``)."""
    return type(served) is type(logged) and served == logged


#: The most reads of one answer a checked read makes while the membership log keeps moving
#: (:meth:`UnibusClient._checked`).
CHECKED_READS = 10

#: How long a checked read waits before reading again an answer that differed while the log
#: stood still, before it takes the difference for the server's.
STILL_LOG_PAUSE = 0.5

#: The fields a checked read returns (and the CLI prints): the documented ones, so that a field
#: the log does not hold cannot ride along on a checked answer (a review printed a made-up
#: ``"verified_in_person": true``). ``created_at`` is the server's own.
MEMBER_FIELDS = ("handle", "role", "sign_pub", "enc_pub", "enc_suite", "bus_pub", "created_at")
ROOM_FIELDS = ("room_id", "name", "subject", "owner", "epoch", "rekey_required", "members", "created_at")
ROOM_MEMBER_FIELDS = ("handle", "enc_pub", "enc_suite")


def _fields(record: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {k: record[k] for k in names if k in record}


def member_view(record: Mapping[str, Any]) -> dict[str, Any]:
    """A member record with its documented fields only (:data:`MEMBER_FIELDS`)."""
    return _fields(record, MEMBER_FIELDS)


def room_view(record: Mapping[str, Any]) -> dict[str, Any]:
    """A room record (``members`` a list of objects) with its documented fields only."""
    view = _fields(record, ROOM_FIELDS)
    view["members"] = [_fields(m, ROOM_MEMBER_FIELDS) for m in record["members"]]
    return view


def _seg(value: Any, what: str) -> str:
    """One percent-encoded path segment (nothing left unescaped but unreserved characters)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return urllib.parse.quote(value, safe="")


def _said(exc: BaseException) -> str:
    """What an exception says, or its class's name when it says nothing (``TimeoutError()``;
    an exception object is always true, so ``exc or name`` printed an empty reason)."""
    return str(exc) or type(exc).__name__


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_err = exc.certificate_error
        why = getattr(cert_err, "verify_message", None) or getattr(cert_err, "reason", None) or str(cert_err)
        return (f"its TLS certificate does not verify ({why}); give the CA that signed it with --ca PATH "
                "[UNIBUS_CA] (SDK: ssl=unibus.client.tls_context(ca=PATH))")
    if isinstance(exc, aiohttp.ClientSSLError):
        err = getattr(exc, "os_error", None)
        why = getattr(err, "reason", None) or err or exc
        if str(why) == "WRONG_VERSION_NUMBER":  # what OpenSSL says of a peer that does not speak TLS
            return f"the TLS handshake failed ({why}): is the server plain HTTP? give an http:// URL"
        return f"the TLS handshake failed ({why})"
    err = getattr(exc, "os_error", None)
    errno_ = getattr(err, "errno", None)
    if errno_:
        return os.strerror(errno_).lower()
    return str(err or exc) or "connection failed"


def _parse_auth_skew(value: str) -> int | None:
    """``Unibus-Auth-Skew``: seconds from 1 to :data:`MAX_AUTH_SKEW`, or None for anything else."""
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 3):
        return None
    skew = int(value)
    return skew if 1 <= skew <= MAX_AUTH_SKEW else None


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: treat as "no hint"


def _retryable_503(method: str, problem: Mapping[str, Any], retry_after: float | None) -> bool:
    """A 503 worth one more try: the server said the request was refused before it
    was served (replay protection unavailable, fail closed; a node with as many blob
    uploads in progress as it takes), or a GET with Retry-After."""
    kind = str(problem.get("type") or "")
    if kind.endswith(("/nonce-store-unavailable", "/too-many-uploads")):
        return True
    return method == "GET" and retry_after is not None


def retry_503_delay(method: str, status: int, problem: Mapping[str, Any], retry_after: float | None,
                    attempt: int) -> float | None:
    """The one retry policy of every client request (JSON calls and blob
    transfers alike): seconds to wait before signing ``attempt + 1`` afresh,
    or None when the answer is final.

    Besides the 503s of :func:`_retryable_503`, a ``401`` ``nonce-lost``: the
    request was created before the server's replay protection restarted (this
    clock behind the server's, or a request signed before the restart), and one
    signed again is not."""
    if attempt >= RETRIES_503:
        return None
    lost = status == 401 and str(problem.get("type") or "").endswith("/nonce-lost")
    if not lost and (status != 503 or not _retryable_503(method, problem, retry_after)):
        return None
    return min(max(retry_after or 0.5, 0.1), 2.0)


#: The largest answer the client reads (JSON and problem details): a compromised
#: server, or a man in the middle of ``http://``, must not fill the client's memory.
#: The largest real ones are far below (a page of the log, 1,000 entries: a few MiB;
#: ``GET /v1/members`` with 10,000 MLKEM768_X25519 members: about 20 MiB).
MAX_ANSWER_BYTES = 64 * 1024 * 1024

#: ``GET /v1/log/head``'s cap: ``{"seq", "hash"}`` is under 200 bytes (a review's
#: server sent 60 MiB there, which the client parsed into 1.6 GiB).
HEAD_ANSWER_BYTES = 64 * 1024

#: The most values an answer may hold, counted as its commas and colons before it is parsed (each
#: value but the first of an array is after a comma, each member of an object after a colon; one
#: inside a string counts too): ``[{},{},…]`` makes about 64 bytes of Python objects of every 3
#: bytes (a review: 1.6 GiB from one 60 MiB answer, 3 GiB from a log page), and this bounds it to
#: a few hundred MiB. Honest answers hold far fewer per byte, their strings being keys in base64:
#: 100,000 members about 1.4 million, an entry 0 as large as the byte cap allows (about 500,000
#: room memberships with 0.11 keys) about 4.4 million (a second review measured where a count of
#: braces and quotes refused such honest answers, and it was replaced by this).
MAX_ANSWER_VALUES = 5_000_000


def _loads_answer(raw: bytes) -> Any:
    """``json.loads`` of an answer; ``ValueError`` for one that is not JSON, holds more than
    :data:`MAX_ANSWER_VALUES` values, or nests past the interpreter's depth."""
    if raw.count(b",") + raw.count(b":") > MAX_ANSWER_VALUES:
        raise ValueError(f"more than {MAX_ANSWER_VALUES} values")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deep") from None


class AnswerTooLarge(Exception):
    """An answer beyond :data:`MAX_ANSWER_BYTES` (or the cap given): nothing more of it was read."""


async def _read_capped(resp: Any, cap: int = MAX_ANSWER_BYTES) -> bytes:
    """The body of an aiohttp response, read up to ``cap`` bytes; :class:`AnswerTooLarge` beyond it."""
    if resp.content_length is not None and resp.content_length > cap:
        raise AnswerTooLarge(f"the server's answer is {resp.content_length} bytes, over the client's limit of "
                             f"{cap} bytes")
    parts: list[bytes] = []
    size = 0
    async for piece in resp.content.iter_any():
        size += len(piece)
        if size > cap:
            raise AnswerTooLarge(f"the server's answer goes on past the client's limit of {cap} bytes")
        parts.append(piece)
    return b"".join(parts)


def _names_digest(content_digest: str | None, sha256: bytes) -> bool:
    """True when the ``Content-Digest`` value names exactly this SHA-256."""
    if content_digest is None:
        return False
    try:
        return hmac.compare_digest(parse_content_digest(content_digest), sha256)
    except SignatureError:
        return False


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _problem_from(status: int, reason: str | None, raw: bytes) -> dict[str, Any]:
    try:
        doc = _loads_answer(raw) if raw else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        return doc
    text = raw.decode("utf-8", errors="replace").strip().replace("\n", " ")
    return {"title": reason or "Error", "status": status, "detail": text[:300]}


# --------------------------------------------------------------------------- the client


class UnibusClient:
    """An async, signing client of membershipd's ``/v1/`` API.

    ``base_url`` is the server (``http://127.0.0.1:8470``); ``identity`` an
    :class:`~unibus.client.keys.Identity` (``load_identity(path)``); ``timeout``
    the total seconds allowed per HTTP request. Use as an async context
    manager, or call :meth:`close`. A ``session`` (aiohttp.ClientSession) may
    be passed in; it is then not closed by :meth:`close`.

    Room keys opened by this client are cached per ``(room_id, epoch)`` for
    its lifetime; they never leave the process.

    ``ssl``: an ``ssl.SSLContext`` used both for an ``https://`` server and
    for a ``tls://`` bus (:meth:`bus`): it decides which CA is trusted (by
    default, the system's) and may carry a client certificate. Build it with
    :func:`unibus.client.tls_context`.

    The verified replica of the server's membership log (:attr:`replica`)
    lives in ``replica_root/<server id>/`` (the CLI uses ``<identity
    path>.log``), or in memory when ``replica_root`` is None: then it is
    verified again from seq 0 in each process and trusts entry 0 on first
    use unless ``trust_root`` pins its fingerprint. ``notice`` receives the
    one-line notes a user should see (the first-use pin, a rekey done before
    a send); by default they are logged at WARNING.
    """

    def __init__(self, base_url: str, identity: Identity, *, timeout: float = 10,
                 session: aiohttp.ClientSession | None = None, ssl: _ssl.SSLContext | None = None,
                 replica_root: str | os.PathLike[str] | None = None, trust_root: str | None = None,
                 notice: Callable[[str], None] | None = None) -> None:
        if not isinstance(identity, Identity):
            raise TypeError("identity must be a unibus.client.keys.Identity (see load_identity)")
        raw = str(base_url)
        if "@" in raw or "?" in raw or "#" in raw:
            # Not quoted: a password there was shown in every error, and in the replica's directory
            # name (a red team). Requests are signed; no credentials go in the URL.
            raise ValueError("the server URL must not carry credentials (user:pass@), a query or a fragment; "
                             "give scheme://HOST[:PORT]")
        url = yarl.URL(raw.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"server URL {base_url!r} must be an http:// or https:// URL with a host")
        self.base_url = str(url)
        self._base = url
        self.identity = identity
        self.timeout = timeout
        if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
            raise TypeError("ssl must be an ssl.SSLContext (see unibus.client.tls_context)")
        self.ssl = ssl
        self._session = session
        self._own_session = session is None
        self._closed = False
        self._keys: dict[tuple[str, int], bytes] = {}
        self._legacy_keys: dict[tuple[str, int], bytes] = {}  # sealed before 0.12: for reading only
        self._legacy_sealed: dict[tuple[str, int], bytes] = {}  # the same, still sealed, checked against entry 0
        #: log seq of the key package of each (room_id, epoch) in ``_keys``: the
        #: roster a message sender of that epoch is checked against.
        self._packages: dict[tuple[str, int], int] = {}
        #: (room_id, epoch) whose key the server answered 404 for: permanent (the
        #: sealed set of an epoch never changes), so not asked again.
        self._missing: set[tuple[str, int]] = set()
        self._unknown_epoch_missed: dict[str, float] = {}  # room -> when a sync last missed an epoch
        #: open buses, told when this client rotates its bus key (:meth:`rotate_bus_key`)
        self._buses: weakref.WeakSet[Bus] = weakref.WeakSet()
        #: The ``--auth-skew`` the server gave last (``GET /v1/log/head``'s ``Unibus-Auth-Skew`` header,
        #: 1 to 600 s), or None: used only to keep a change's ``created`` within it, never in a check.
        self.reported_auth_skew: int | None = None
        directory = None if replica_root is None else Path(replica_root).expanduser() / server_id(self.base_url)
        self.replica = Replica(self.base_url, directory, trust_root=trust_root, notice=notice)

    # -- lifecycle
    async def __aenter__(self) -> Self:
        self._check_usable()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session this client made (not one passed in). The client is then done
        with: a call that needs the server raises ``RuntimeError``, as a closed
        ``aiohttp.ClientSession`` does. A second call does nothing."""
        self._closed = True
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this UnibusClient is closed; make a new one")
        if self._session is not None and self._session.closed:
            whose = "made by" if self._own_session else "passed to"
            raise RuntimeError(f"the aiohttp session {whose} this UnibusClient is closed")

    def _http(self) -> aiohttp.ClientSession:
        self._check_usable()
        if self._session is None:  # made on first use, so that a client can be made outside a loop
            connector = aiohttp.TCPConnector(ssl=self.ssl) if self.ssl is not None else None
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                  connector=connector)
        return self._session

    # -- the one request path
    def url_for(self, path: str, query: Mapping[str, Any] | None = None) -> yarl.URL:
        """The absolute, already-encoded URL of ``path`` (itself encoded) plus ``query``."""
        target = path
        if query:
            target += "?" + urllib.parse.urlencode({k: str(v) for k, v in query.items()}, quote_via=urllib.parse.quote)
        return yarl.URL(str(self._base) + target, encoded=True)

    async def request(self, method: str, path: str, *, json_body: Any = None, query: Mapping[str, Any] | None = None,
                      has_body: bool | None = None, cap: int = MAX_ANSWER_BYTES) -> Any:
        """Send one signed request; return the decoded JSON (``None`` for an empty body).

        ``path`` must already be percent-encoded (use the methods below, which
        encode their arguments). ``json_body`` is serialized once; those exact
        bytes are signed and sent. Raises :class:`ApiError`, :class:`ServerUnreachable`.

        A membership change (a route the membership log records; a keys upload
        is checked by :meth:`rekey` itself) is made only on a log that verifies
        (a sync first), and once answered ``2xx`` it is confirmed before this
        returns: the verified log must hold this very request (its signer and
        nonce), or :class:`VerificationError` is raised. A red team's server
        answered a room member's removal ``200`` and dropped it, and the
        remover's next rekey sealed the room key to that member, who was still
        in the log. A 503 that refused such a change before serving it is
        retried with the same signed request, never a second one: a review's
        server kept the first try, answered the retry, and appended the first
        try after the member's removal, which brought the member back. A change
        is remembered in the replica before it is sent
        (:meth:`Replica.begin_change`) until it is confirmed; one not seen
        confirmed (in flight, or given up on: any other outcome, or a process
        that ended first) that the log holds after a request this identity
        signed later, or after the head read once it was given up on, was held
        back by the server (docs/client.md, "Changes confirmed in the log").
        A change is signed after every change of the identity still in doubt.
        """
        method = method.upper()
        url = self.url_for(path, query)
        body = None
        if json_body is not None or has_body:
            body = _dumps(json_body) if json_body is not None else b""
        tag = None if method in ("GET", "HEAD") else await self.deployment_tag()
        change = logged_operation(method, url.raw_path) if tag is not None and not query else None
        if change is not None and change[0] == "room.keys":
            change = None
        if change is not None:
            await self.sync()  # nothing is changed on a server whose log does not verify
        # One signed request for a change, resent as it is; a fresh one per try for the rest.
        signed = (make_nonce(), self._change_created()) if change is not None else None
        if signed is not None:  # remembered before it is sent: a ReplicaError sends nothing
            await self.replica.begin_change(self.identity.handle, *signed, sent_after=self.verified.head[0])
        try:
            status, raw, state = await self._send_tries(method, url, path, body, tag, change, signed, cap)
        except BaseException as exc:
            if signed is not None:
                await self._give_up(signed[0], f"{method} {path}", read=isinstance(exc, Exception))
            raise
        if signed is not None:
            await self._settle(signed[0])
        if not raw:
            return None
        try:
            doc = _loads_answer(raw)
        except ValueError as exc:
            raise ApiError(status, {"title": "Bad response", "detail": f"the server answered with a body that is not "
                                                                      f"JSON the client takes ({exc})"}) from None
        if state is not None and change is not None and change[0] == "room.create":
            assert signed is not None
            # The room the log says this request made, not one the answer names (a review's server
            # answered another member's room, keyed with this client in it, as the new one).
            made = state.created_rooms.get((self.identity.handle, signed[0]))
            if not isinstance(doc, dict) or doc.get("room_id") != made:
                raise VerificationError(f"{self.base_url} answered a room creation with room "
                                        f"{doc.get('room_id') if isinstance(doc, dict) else None!r}, but its "
                                        f"membership log says that request made room {made}: do not use it")
        return doc

    async def _give_up(self, nonce: str, what: str, *, read: bool) -> None:
        """Record that this client gave up on a change it sent (docs/client.md, "Changes confirmed
        in the log"), with the log head read right after (``read``, twice at most; not after an
        interrupt or a cancellation): one the log holds after that head was appended after the
        failure was reported. If the log holds it already, it was made: a notice says so, and it
        is settled. If the log could not be read, the head verified before sending stands in: a
        review's server failed that read on purpose, then appended the change with no word. A
        replica that cannot be written is logged, and the first error stands: the change stays
        remembered as this process's, and the next process to read the files takes it for given up
        once this one has ended."""
        me, head = self.identity.handle, None
        try:
            try:
                for attempt in range(2 if read else 0):  # a second read a second later: a server down a moment
                    if attempt:
                        await asyncio.sleep(1.0)
                    with contextlib.suppress(VerificationError, ApiError, ServerUnreachable, ReplicaError):
                        state = await self.sync()
                        if (me, nonce) in state.nonces:
                            seq = next((s for s, k in state.kept_back.items() if (k.author, k.nonce) == (me, nonce)),
                                       None)
                            if seq is None:
                                self.replica.notice(f"{what} failed, but the membership log of {self.base_url} "
                                                    f"holds it: the change was made")
                                await self.replica.settle_change(me, nonce)
                                return
                        head = state.head[0]
                        break
            except BaseException:
                # Cancelled during the reads (a review's server stalled them, and the caller's timeout
                # cancelled the task): given up all the same, with the head before sending.
                with contextlib.suppress(ReplicaError, OSError):
                    await asyncio.shield(self.replica.give_up(me, nonce, None))
                raise
            await self.replica.give_up(me, nonce, head)
        except (ReplicaError, OSError) as exc:
            log.warning("could not record a change given up on in the local replica (the next command "
                        "will): %s", exc)

    async def _settle(self, nonce: str) -> None:
        """Forget a change that was confirmed; a replica that cannot be written is logged (the change
        is in the log, so it is forgotten at a later sync anyway)."""
        try:
            await self.replica.settle_change(self.identity.handle, nonce)
        except (ReplicaError, OSError) as exc:
            log.warning("could not forget a confirmed change in the local replica: %s", exc)

    def _change_created(self) -> int:
        """The ``created`` of a new change: now, but after every change of this identity still in
        flight, so that "signed later" is the order of signing within a second or a clock stepped
        back a little, by at most :data:`CREATED_AHEAD` seconds ahead of the clock (and under the
        skew the server reported). A change given up on needs none of it: the head read then
        decides (a review: a clock stepped back hid a kept change; another: a stream of changes
        in flight pushed ``created`` 30 s ahead, past a server's small --auth-skew)."""
        now = int(time.time())
        last = self.replica.latest_in_flight()
        skew = self.replica.server_skew
        ahead = CREATED_AHEAD if skew is None else min(CREATED_AHEAD, skew - 1)
        return now if last is None or ahead <= 0 else max(now, min(last + 1, now + ahead))

    async def _send_tries(self, method: str, url: yarl.URL, path: str, body: bytes | None, tag: str | None,
                           change: tuple[str, tuple[str, ...]] | None,
                           signed: tuple[str, int] | None,
                           cap: int = MAX_ANSWER_BYTES) -> tuple[int, bytes, LogState | None]:
        """:meth:`request`'s tries: the status and body of a ``2xx``, and the verified state that
        confirmed a change (else an :class:`ApiError`, :class:`ServerUnreachable` or
        :class:`VerificationError`)."""
        attempt = 0
        state: LogState | None = None
        while True:
            nonce, created = signed or (make_nonce(), None)
            status, reason, raw, retry_after = await self._send_once(method, url, body, tag, nonce, created, cap)
            if 200 <= status < 300:
                if change is not None:
                    state = await self._confirm_logged(method, url.raw_path, status, nonce, change)
                return status, raw, state
            problem = _problem_from(status, reason, raw)
            delay = retry_503_delay(method, status, problem, retry_after, attempt)
            if delay is not None and signed is not None and status != 503:
                delay = None  # a change is resent as it was signed: its `created` would be refused again
            if delay is not None:
                attempt += 1
                log.info("%s %s: %d (%s); retrying in %.1f s", method, path, status, problem.get("detail"), delay)
                await asyncio.sleep(delay)
                continue
            if signed is not None and attempt and status == 401:
                # The resend of a change refused before it was served: its `created` grew too old for
                # a small --auth-skew, or its nonce was claimed before the 503 (a nonce bucket lost).
                problem = {**problem, "detail": f"this change was refused before it was served (503) and resent "
                                                f"as it was signed, which was refused: {problem.get('detail')}; an "
                                                "honest server made no change: check the log (unibus log show), "
                                                "then run it again"}
            raise ApiError(status, problem)

    async def deployment_tag(self) -> str:
        """The ``tag`` every changing request is signed with: the trust root pinned for this
        server, read from the replica's files when this process has not read them yet. With
        none pinned, entry 0 as the server serves it, checked as a sync checks it (its salt
        included) and pinned on first use, with a first sync's notice; a server that serves no
        entry 0 gets nothing. A request lifted from this server's log is then refused by any
        other deployment (docs/client.md, "Requests bound to a deployment").

        Two red teams: a fresh process took entry 0 from the server before reading its pinned
        root, and a client with no root pinned (its first command, or the same server under
        another spelling) took it afresh for every process, or went untagged on a 404: the
        server chose the tag, or none, and replayed the request on another deployment."""
        pinned = self.replica.pinned_root()
        if pinned is not None:
            return pinned
        doc = await self.log(limit=1)  # a 404 is raised: nothing is sent
        entries = doc.get("entries") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
            raise VerificationError(f"{self.base_url} serves no membership log to bind a changing request to; "
                                    "nothing was sent")
        try:
            root = LogState(first_use_pairs=FIRST_USE_SNAPSHOT_PAIRS).apply(entries[0])
        except LogError as e:
            raise LogVerificationError.from_log(e, self.base_url) from None
        return await self.replica.pin_first_use(root)

    async def _confirm_logged(self, method: str, path: str, status: int, nonce: str,
                              change: tuple[str, tuple[str, ...]]) -> LogState | None:
        """Sync, and require the verified log to hold this client's request signed with ``nonce``
        (the server logs every membership change it answers ``2xx``, no-ops included); return
        the verified state. A member that deleted itself can no longer read the log: that one
        is not confirmed (None)."""
        me = self.identity.handle
        if change[0] == "member.delete" and change[1] == (me,):
            return None
        what = f"{self.base_url} answered {status} to {method} {path}, but"
        try:
            state = await self.sync()
        except ServerUnreachable as exc:  # the outcome is unknown, as after a timeout: said so
            raise ServerUnreachable(exc.url, f"{method} {path} was answered {status}, but the change could not be "
                                             f"confirmed in the membership log: {exc.reason}") from None
        except ApiError as exc:
            if exc.status != 503:
                raise VerificationError(f"{what} its membership log could not be read to confirm the change "
                                        f"({exc}): do not rely on it") from None
            # unavailable for now (a node under faults): the outcome is unknown, as after a timeout
            raise ApiError(503, {**exc.problem, "detail": f"{method} {path} was answered {status}, but the change "
                                                          f"could not be confirmed in the membership log: "
                                                          f"{exc.detail}"}) from None
        except VerificationError as exc:
            raise VerificationError(f"{what} its membership log could not be read to confirm the change "
                                    f"({exc}): do not rely on it", getattr(exc, "seq", None)) from None
        if (me, nonce) not in state.nonces:
            raise VerificationError(
                f"{what} its membership log does not hold that request: the change may not have been made (a "
                "server that drops changes it answers?); check with `unibus log show`, and do not rely on it")
        return state

    async def _send_once(self, method: str, url: yarl.URL, body: bytes | None, tag: str | None = None,
                         nonce: str | None = None,
                         created: int | None = None,
                         cap: int = MAX_ANSWER_BYTES) -> tuple[int, str | None, bytes, float | None]:
        headers = sign_request(method, url.raw_path_qs, body, keyid=self.identity.handle,
                               private_key=self.identity.sign_key, tag=tag, nonce=nonce, created=created)
        headers["Accept"] = "application/json, application/problem+json"
        if body is not None:
            headers["Content-Type"] = _JSON_TYPE
        try:
            async with self._http().request(method, url, data=body, headers=headers,
                                            allow_redirects=False) as resp:
                raw = await _read_capped(resp, cap)
                skew = resp.headers.get(AUTH_SKEW_HEADER)
                if skew is not None:
                    self.reported_auth_skew = _parse_auth_skew(skew)
                return resp.status, resp.reason, raw, _parse_retry_after(resp.headers.get("Retry-After"))
        except AnswerTooLarge as exc:
            raise ServerUnreachable(self.base_url, f"{method} {url.path}: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            raise ServerUnreachable(self.base_url, _connect_reason(exc)) from None
        except TimeoutError:
            raise ServerUnreachable(self.base_url, f"no answer within {self.timeout} s") from None
        except aiohttp.ClientError as exc:
            said = _said(exc)
            if isinstance(exc, aiohttp.ServerDisconnectedError) and url.scheme == "http":
                # An HTTPS listener closes a connection that does not start with a handshake.
                said += ": does the server want TLS? give an https:// URL"
            raise ServerUnreachable(self.base_url, said) from None

    # -- answers of the documented shape (a red team's server answered null, [] or 204, and the
    # CLI printed tracebacks)
    async def _object(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        """``request`` whose answer must be a JSON object (an :class:`ApiError` otherwise)."""
        doc = await self.request(method, path, **kw)
        if not isinstance(doc, dict):
            raise _bad_answer(method, path, "a JSON object")
        return doc

    async def _records(self, path: str, key: str) -> list[dict[str, Any]]:
        """``GET path``: the objects listed under ``key`` (or the bare list)."""
        doc = await self.request("GET", path)
        records = doc.get(key) if isinstance(doc, dict) else doc
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise _bad_answer("GET", path, f'a list of objects (under "{key}")')
        return records

    # -- members (docs/http-api.md)
    #
    # The reads return the server's answer. With ``verify=True`` they sync first and raise
    # :class:`VerificationError` unless it agrees with the verified log in every field the log
    # holds (what `unibus whoami`, `members` and `rooms` print): a compromised server could
    # otherwise show a member a key or a roster the log does not hold (docs/client.md, "What the
    # client verifies").
    async def me(self, *, verify: bool = False) -> dict[str, Any]:
        """``GET /v1/me``: the caller's own member record."""
        if verify:
            return member_view(await self._checked("GET /v1/me", self.me,
                                                    lambda r: self.member_differences(r, self.identity.handle)))
        return await self._object("GET", "/v1/me")

    async def list_members(self, *, verify: bool = False) -> list[dict[str, Any]]:
        """``GET /v1/members``: every member record (unwrapped from ``{"members": [...]}``)."""
        if verify:
            return [member_view(r) for r in await self._checked("GET /v1/members", self.list_members,
                                                                  self.members_differences)]
        return await self._records("/v1/members", "members")

    async def get_member(self, handle: str, *, verify: bool = False) -> dict[str, Any]:
        """``GET /v1/members/{handle}``: that member's record."""
        if verify:
            return member_view(await self._checked(f"GET /v1/members/{handle}", lambda: self.get_member(handle),
                                                    lambda r: self.member_differences(r, handle)))
        return await self._object("GET", "/v1/members/" + _seg(handle, "handle"))

    async def add_member(self, handle: str, sign_pub: str, enc_pub: str, enc_suite: str = DEFAULT_ENC_SUITE,
                         role: str = "member", bus_pub: str | None = None) -> dict[str, Any]:
        """``POST /v1/members`` (admin): keys as ``keygen`` prints them.

        ``sign_pub``/``enc_pub`` are standard base64, ``bus_pub`` the ``U…`` nkey
        of the new member's bus key; the server requires it (422 without).
        """
        body = {"handle": handle, "role": role, "sign_pub": sign_pub, "enc_pub": enc_pub, "enc_suite": enc_suite}
        if bus_pub is not None:
            body["bus_pub"] = bus_pub
        return await self._object("POST", "/v1/members", json_body=body)

    async def set_bus_key(self, bus_pub: str | None = None) -> dict[str, Any]:
        """``PUT /v1/me/bus-key``: set or rotate my bus key; returns my member record.

        Default: the bus key of this client's identity. The server closes my
        bus connections under the old key before it answers; an open
        :class:`Bus` reconnects with the new key when it is this client's
        identity's (``client.identity = new; await client.set_bus_key()``, or
        :meth:`rotate_bus_key`), and otherwise stops with a :class:`BusError`
        saying so (docs/client.md, "Reconnects").
        """
        if bus_pub is None:
            self.identity.require_bus_key()  # NoBusKey, saying what to do, for a version 1 identity
            bus_pub = self.identity.bus_pub
        holder = self.identity if bus_pub == self.identity.bus_pub else None
        return await self._put_bus_key(bus_pub, holder)

    async def _put_bus_key(self, bus_pub: str, holder: Identity | None) -> dict[str, Any]:
        # Open buses whose key changes expect the refusals of the old key
        # while the request is under way, then log in with the holder's.
        buses = [bus for bus in list(self._buses) if bus._bus_pub != bus_pub] if holder is not None else []
        for bus in buses:
            bus._rotation(begin=True)
        try:
            record = await self._object("PUT", "/v1/me/bus-key", json_body={"bus_pub": bus_pub})
        except BaseException:
            for bus in buses:
                bus._rotation(begin=False)
            raise
        for bus in buses:
            bus._rotation(begin=False, identity=holder)
        return record

    async def rotate_bus_key(self, bus_key: Any = None) -> Identity:
        """Replace my bus key: a fresh one (or ``bus_key``, an Ed25519 private key) uploaded
        with ``PUT /v1/me/bus-key``; return the new identity.

        The server closes my bus connections under the old key before it
        answers; every open :class:`Bus` of this client reconnects with the
        new key, its listeners resubscribed. From then on :attr:`identity` is
        the new identity: save it (``save_identity(new, path, force=True)``),
        or the old file's key no longer lets you on the bus. On an error
        nothing changes (the old key stays in force).
        """
        new = with_bus_key(self.identity, bus_key)
        await self._put_bus_key(new.bus_pub, new)
        self.identity = new
        return new

    async def set_role(self, handle: str, role: str) -> dict[str, Any]:
        return await self._object("PATCH", "/v1/members/" + _seg(handle, "handle"), json_body={"role": role})

    async def remove_member(self, handle: str) -> None:
        await self.request("DELETE", "/v1/members/" + _seg(handle, "handle"))

    # -- rooms
    async def create_room(self, name: str) -> dict[str, Any]:
        """``POST /v1/rooms``: the new room, of which this member is the owner and only member.

        Its id is the room the log says this request made (:meth:`request`), and the rest of the
        answer must be what the log holds for a new room (the name sent, this member as owner and
        only member with its keys in the log, epoch 0, ``rekey_required``, the room's subject),
        else :class:`VerificationError` naming each difference: a review's server answered the
        right id with a made-up name, owner and roster, and ``unibus rooms create`` printed them."""
        doc = await self._object("POST", "/v1/rooms", json_body={"name": name})
        me, room_id = self.identity.handle, doc.get("room_id")
        member = self.verified.members.get(me)
        expected = {"name": name, "owner": me, "epoch": 0, "rekey_required": True,
                    "subject": room_subject(room_id) if isinstance(room_id, str) else None,
                    "members": [{"handle": me, "enc_pub": _b64(member.enc_pub) if member else None,
                                 "enc_suite": member.enc_suite if member else None}]}
        wrong = [f"{field}: the server says {doc.get(field)!r}, the verified log {value!r}"
                 for field, value in expected.items() if not _same(doc.get(field), value)]
        if not isinstance(doc.get("created_at", ""), str):
            wrong.append("created_at: not a string")
        if wrong:
            raise VerificationError(f"{self.base_url} answered the creation of room {room_id} with what its "
                                    f"membership log does not hold ({'; '.join(wrong)}): do not rely on that answer "
                                    f"(the room is as `unibus log show` shows it)")
        return room_view(doc)  # the fields checked, and created_at

    async def list_rooms(self, *, verify: bool = False) -> list[dict[str, Any]]:
        """``GET /v1/rooms``: the rooms the caller is in (an admin: every room); ``verify`` as :meth:`me`."""
        if verify:
            return [room_view(r) for r in await self._checked("GET /v1/rooms", self.list_rooms,
                                                                self.rooms_differences)]
        return await self._records("/v1/rooms", "rooms")

    async def get_room(self, room_id: str, *, verify: bool = False) -> dict[str, Any]:
        """``GET /v1/rooms/{id}``: the room record with its members; ``verify`` as :meth:`me`."""
        if verify:
            return room_view(await self._checked(
                f"GET /v1/rooms/{room_id}", lambda: self.get_room(room_id),
                lambda r: self.room_differences(r) if r.get("room_id") == room_id else
                [f"room_id: the server answered for room {room_id} with room {r.get('room_id')!r}"]))
        return await self._object("GET", "/v1/rooms/" + _seg(room_id, "room id"))

    async def delete_room(self, room_id: str) -> None:
        await self.request("DELETE", "/v1/rooms/" + _seg(room_id, "room id"))

    async def add_room_member(self, room_id: str, handle: str) -> dict[str, Any]:
        """``PUT /v1/rooms/{id}/members/{handle}``: the room becomes ``rekey_required``."""
        return await self._object("PUT", f"/v1/rooms/{_seg(room_id, 'room id')}/members/{_seg(handle, 'handle')}")

    async def remove_room_member(self, room_id: str, handle: str) -> Any:
        """``DELETE /v1/rooms/{id}/members/{handle}``: the room becomes ``rekey_required``."""
        return await self.request("DELETE", f"/v1/rooms/{_seg(room_id, 'room id')}/members/{_seg(handle, 'handle')}")

    async def post_keys(self, room_id: str, epoch: int, sealed: Mapping[str, str], sigs: Mapping[str, str],
                        log_head: Mapping[str, Any]) -> Any:
        """``POST /v1/rooms/{id}/keys`` with ``{epoch, sealed, sigs, log_head}`` as given.

        ``sealed`` and ``sigs`` map each handle to base64 (``sigs[h]``: the
        64-byte signature of :meth:`sign_key_packages`); ``log_head`` is the
        ``{seq, hash}`` the signatures name. Sent as is: :meth:`rekey` is the
        verified way to make all of them.
        """
        return await self._object("POST", f"/v1/rooms/{_seg(room_id, 'room id')}/keys",
                                  json_body={"epoch": epoch, "sealed": dict(sealed), "sigs": dict(sigs),
                                             "log_head": {"seq": log_head["seq"], "hash": log_head["hash"]}})

    def sign_key_packages(self, room_id: str, epoch: int, sealed: Mapping[str, str],
                          log_head: Mapping[str, Any]) -> dict[str, str]:
        """``{handle: base64 signature}``: this identity's signature of each member's key
        package (docs/formats.md, "Key packages") at ``log_head``; ``sealed`` in base64."""
        raw = {h: base64.b64decode(v, validate=True) for h, v in sealed.items()}
        return sign_key_packages(self.identity, room_id, epoch, raw, int(log_head["seq"]), str(log_head["hash"]))

    # -- the membership log (docs/formats.md, docs/client.md)
    async def log(self, after: int | None = None, limit: int | None = None) -> dict[str, Any]:
        """``GET /v1/log[?after=N][&limit=M]`` → ``{"entries": [...], "head": {"seq", "hash"}}``, unverified.

        Entries with ``seq > after`` in order (from seq 0 without ``after``), at
        most ``limit`` (server default 500, at most 1000). Verify them with
        :class:`unibus.memberlog.LogState` before trusting anything in them.
        """
        query: dict[str, int] = {}
        if after is not None:
            query["after"] = int(after)
        if limit is not None:
            query["limit"] = int(limit)
        return await self.request("GET", "/v1/log", query=query or None)  # checked as a log page by its callers

    async def log_head(self) -> dict[str, Any]:
        """``GET /v1/log/head`` → ``{"seq", "hash"}`` (seq -1, hash "" for an empty log), unverified; the
        server's ``--auth-skew``, which it gives in a header, is then :attr:`reported_auth_skew`."""
        return await self.request("GET", "/v1/log/head", cap=HEAD_ANSWER_BYTES)  # checked by the replica

    async def my_key(self, room_id: str, epoch: int | None = None) -> dict[str, Any]:
        """``GET /v1/rooms/{id}/keys/me[?epoch=N]`` → ``{epoch, sealed, sig, sealer, log_head}``,
        unverified (``sealed`` and ``sig`` still base64). A 404 raises :class:`KeyUnavailable` (a room
        id that breaks its syntax is one too), and so does a 403 (a caller that was never in the room).
        :meth:`room_key` is the verified way to get a key.
        """
        query = None if epoch is None else {"epoch": int(epoch)}
        try:
            return await self._object("GET", f"/v1/rooms/{_seg(room_id, 'room id')}/keys/me", query=query)
        except ApiError as exc:
            if exc.status in (403, 404):
                raise KeyUnavailable(room_id, epoch, exc.status, exc.problem) from None
            raise

    async def bus_info(self) -> dict[str, Any]:
        """``GET /v1/bus`` → ``{servers, user_nkey, inbox_prefix, rooms}``."""
        return await self._object("GET", "/v1/bus")

    # -- the verified log
    @property
    def verified(self) -> LogState:
        """The verified membership log as of the last sync (:meth:`sync`)."""
        return self.replica.state

    async def trust(self, fingerprint: str, *, reset: bool = False) -> str:
        """``unibus trust`` for this client's replica: pin ``fingerprint`` as the trust root,
        confirm the root pinned on first use, or accept a recovery bootstrap (one the server's log
        holds, while the root is a first use's; never the entry 0 it serves now, a log started
        over); ``reset`` starts over with it as the root.
        Returns what was done (:meth:`unibus.client.replica.Replica.trust`)."""
        return await self.replica.trust(fingerprint, reset=reset, client=self)

    async def sync(self) -> LogState:
        """Bring the verified replica up to the server's log head, checking every new entry.

        Raises :class:`VerificationError` naming the seq (a rollback, a fork, an
        entry that fails a check), :class:`ReplicaError` (the local files).
        """
        await self.replica.sync(self)
        return self.replica.state

    async def verify_log(self) -> LogState:
        """Verify the server's whole log again from seq 0 (``unibus log verify``) and keep it."""
        await self.replica.sync(self, from_scratch=True)
        return self.replica.state

    def member_differences(self, record: Any, handle: str | None = None) -> list[str]:
        """Every difference between a server member record (``GET /v1/me``, ``GET /v1/members/{handle}``,
        an entry of ``GET /v1/members``) and the member the verified log has: its handle (``handle``:
        the one asked for), role and public keys. ``created_at`` is the server's own (the log does not
        hold it)."""
        if not isinstance(record, Mapping):
            return ["the server's member record is not a JSON object"]
        served = record.get("handle")
        if handle is not None and served != handle:
            return [f"handle: the server answered for {handle} with the record of {served!r}"]
        member = self.verified.members.get(served) if isinstance(served, str) else None
        if member is None:
            return [f"ghost member {served}: the server lists {served}, the verified log has no such member"]
        out = [f"{field} of {served}: the server says {record.get(field)!r}, the verified log {value!r}"
               for field, value in (("role", member.role), ("enc_suite", member.enc_suite),
                                    ("bus_pub", member.bus_pub))
               if not _same(record.get(field), value)]
        out += [f"swapped key of {served}: the server's {field} for {served} is not the one the verified log has"
                for field, value in (("sign_pub", member.sign_pub), ("enc_pub", member.enc_pub))
                if not _same(record.get(field), _b64(value))]
        if not isinstance(record.get("created_at", ""), str):
            out.append(f"created_at of {served}: not a string")
        return out

    def members_differences(self, records: Sequence[Any]) -> list[str]:
        """Every difference between ``GET /v1/members`` (its list) and the verified log's members."""
        listed = Counter(h for r in records if isinstance(r, Mapping) and isinstance(h := r.get("handle"), str))
        out = [f"member {h} listed {n} times" for h, n in sorted(listed.items()) if n > 1]
        out += [f"missing member {h}: the verified log has {h}, the server does not list it"
                for h in sorted(self.verified.members.keys() - listed.keys())]
        for r in records:
            out += self.member_differences(r)
        return out

    def room_differences(self, room: Mapping[str, Any]) -> list[str]:
        """Every difference between a server room record (``GET /v1/rooms/{id}``, an entry of
        ``GET /v1/rooms``) and the verified log: its roster with each member's encryption key,
        name, owner, epoch, ``rekey_required`` and subject (``created_at`` is the server's own)."""
        state = self.verified
        room_id = room.get("room_id") if isinstance(room, Mapping) else None
        lroom = state.rooms.get(room_id) if isinstance(room_id, str) else None
        if lroom is None:
            return [f"room {room_id}: the verified membership log has no such room"]
        out: list[str] = []
        listed: dict[str, Mapping[str, Any]] = {}
        entries = room.get("members")
        if not isinstance(entries, list):
            out.append(f"room {room_id}: members: not a list")
        for m in entries if isinstance(entries, list) else []:
            handle = m.get("handle") if isinstance(m, Mapping) else None
            if not isinstance(handle, str):
                out.append(f"room {room_id}: a member entry without a handle")
            elif handle in listed:
                out.append(f"room {room_id}: member {handle} listed twice")
            else:
                listed[handle] = m
        for handle in sorted(listed.keys() - lroom.members):
            out.append(f"ghost member {handle}: the server lists {handle} in room {room_id}, the verified log "
                       "does not")
        for handle in sorted(lroom.members - listed.keys()):
            out.append(f"missing member {handle}: the verified log has {handle} in room {room_id}, the server "
                       "does not list it")
        for handle in sorted(lroom.members & listed.keys()):
            member, served = state.members[handle], listed[handle]
            if not _same(served.get("enc_pub"), _b64(member.enc_pub)) or not _same(served.get("enc_suite"),
                                                                                   member.enc_suite):
                out.append(f"swapped key of {handle}: the server's enc_pub for {handle} is not the one the "
                           "verified log has")
        fields = [("epoch", lroom.epoch), ("owner", lroom.owner or None), ("name", lroom.name),
                  ("rekey_required", lroom.rekey_required), ("subject", room_subject(lroom.room_id))]
        out += [f"room {room_id}: {field}: the server says {room.get(field)!r}, the verified log {value!r}"
                for field, value in fields if not _same(room.get(field), value)]
        if not isinstance(room.get("created_at", ""), str):
            out.append(f"room {room_id}: created_at: not a string")
        return out

    def rooms_differences(self, records: Sequence[Any]) -> list[str]:
        """Every difference between ``GET /v1/rooms`` (its list) and the verified log: the rooms this
        member is in (every room, for an admin, as the log has the roles), each as
        :meth:`room_differences` compares it."""
        state, me = self.verified, self.identity.handle
        mine = state.members.get(me)
        admin = mine is not None and mine.role == "admin"
        visible = {rid for rid, r in state.rooms.items() if admin or me in r.members}
        listed = Counter(rid for r in records if isinstance(r, Mapping) and isinstance(rid := r.get("room_id"), str))
        out = [f"room {rid} listed {n} times" for rid, n in sorted(listed.items()) if n > 1]
        out += [f"missing room {rid}: the verified log has {'it' if admin else f'{me} in it'}, the server does not "
                f"list it" for rid in sorted(visible - listed.keys())]
        for r in records:
            rid = r.get("room_id") if isinstance(r, Mapping) else None
            if isinstance(rid, str) and rid in state.rooms and rid not in visible:
                out.append(f"room {rid}: the verified log does not have {me} in it, yet the server lists it")
            else:
                out += self.room_differences(r if isinstance(r, Mapping) else {})
        return out

    async def _checked(self, what: str, read: Callable[[], Any], differences: Callable[[Any], list[str]]) -> Any:
        """``await read()``, checked against the verified log (docs/client.md, "What the commands
        print"): a sync after each answer, so the log is at least as recent, then
        ``differences(answer)``. A difference while the log moved across the read (a change by
        someone else) is read again; the same log head on both sides of two reads that differ is
        the server's answer, and :class:`VerificationError` names each difference. At most
        :data:`CHECKED_READS` reads: a log still moving after them is an error too, that says so
        (a review: two honest changes in a row, such as an add and its rekey, met a check that
        read again only once, and the command blamed the server)."""
        before, stable = self.verified.head, 0
        for _ in range(CHECKED_READS):
            served = await read()
            after = (await self.sync()).head
            diffs = differences(served)
            if not diffs:
                return served
            if after != before:
                log.info("%s: the membership log moved during the read (seq %s to %s); reading again", what,
                         before[0], after[0])
                await asyncio.sleep(random.uniform(0, 0.05))  # out of step with changes made in a loop
            else:
                stable += 1
                if stable == 2:
                    raise VerificationError(f"{self.base_url} answered {what} with what its membership log does not "
                                            "hold: " + "; ".join(diffs) + " (the verified view: `unibus log show`)")
                # A cluster node's member cache follows its log by 50 to 130 ms (a review measured it
                # under load): the second read on a still log comes well after that.
                await asyncio.sleep(STILL_LOG_PAUSE)
            before = after
        raise VerificationError(f"the membership log of {self.base_url} moved during each of {CHECKED_READS} reads of "
                                f"{what}, so the answer could not be checked (the last one differed: "
                                f"{'; '.join(diffs)}); changes made meanwhile do this, and so does a server that "
                                "holds entries back to serve them one at a time: nothing was used, run it again")

    async def verified_room(self, room_id: str) -> LogRoom:
        """The room as the verified log has it, after checking the server's view agrees.

        ``GET /v1/rooms/{id}``, checked as ``get_room(room_id, verify=True)`` checks it (a
        difference while the log moved is read again; one on a still log raises
        :class:`VerificationError` naming each).
        """
        validate_room_id(room_id)
        await self.get_room(room_id, verify=True)
        return self.verified.rooms[room_id]

    # -- room keys
    async def room_key(self, room_id: str, epoch: int | None = None, *, legacy: bool = False) -> tuple[int, bytes]:
        """``(epoch, key)``: the room key of ``epoch``, or the latest one sealed to me, verified.

        The key package must pass every check of docs/client.md ("What the
        client verifies"): its signature by the sealer the verified log names
        for that epoch, over a log head in the verified log at which the
        sealer could rekey and I was in the room. With ``epoch=None`` an epoch
        lower than one already accepted for the room is refused (a rollback).
        ``legacy=True`` (with an ``epoch``, to read what is stored under it,
        never to encrypt) also takes a key sealed before 0.12, when it is the
        one entry 0 of the verified log records (docs/formats.md §7.3, "Keys
        sealed before 0.12"). Keys are cached per ``(room_id, epoch)``. Raises
        :class:`KeyUnavailable` (404), :class:`UnsignedKey` (sealed before
        0.12), :class:`VerificationError`,
        :class:`~unibus.client.sealing.SealError`, :class:`ApiError`.
        """
        validate_room_id(room_id)
        legacy = legacy and epoch is not None
        if epoch is not None:
            cached = self._keys.get((room_id, epoch))
            if cached is None and legacy and (room_id, epoch) in self._legacy_keys:
                # still a room and member of entry 0 (not deleted and made again since it was cached)
                if self.verified.legacy_covers(room_id, self.identity.handle, epoch):
                    cached = self._legacy_keys[(room_id, epoch)]
                else:
                    del self._legacy_keys[(room_id, epoch)]
            if cached is not None:
                return epoch, cached
            if (room_id, epoch) in self._missing:
                raise KeyUnavailable(room_id, epoch, 404, {"title": "Not Found",
                                                            "detail": "no room key sealed to you for this epoch"})
        try:
            doc = await self.my_key(room_id, epoch)
        except KeyUnavailable:
            if epoch is not None:
                self._missing.add((room_id, epoch))
            raise
        got = doc.get("epoch") if isinstance(doc, dict) else None
        if type(got) is not int or got < 0:
            raise VerificationError(f"{self.base_url} answered keys/me of room {room_id} without a valid epoch")
        if epoch is not None and got != epoch:
            raise VerificationError(f"{self.base_url} answered the key of epoch {epoch} of room {room_id} with a key "
                                    f"of epoch {got}")
        floor = await self.replica.accepted_epoch(room_id) if epoch is None else 0
        if got < floor:
            raise VerificationError(f"rollback: {self.base_url} offers epoch {got} as the latest key of room "
                                    f"{room_id}, but this client already accepted epoch {floor}")
        cached = self._keys.get((room_id, got))
        if cached is not None:
            return got, cached
        return got, await self._accept_key_package(room_id, got, doc, legacy)

    async def _accept_key_package(self, room_id: str, epoch: int, doc: Mapping[str, Any], legacy: bool) -> bytes:
        sealed_b64, sig_b64, sealer, head = doc.get("sealed"), doc.get("sig"), doc.get("sealer"), doc.get("log_head")
        if sig_b64 is None:
            if not legacy:
                raise UnsignedKey(room_id, epoch)
            return await self._accept_legacy_key(room_id, epoch, sealed_b64)
        try:
            if not isinstance(sealed_b64, str) or not isinstance(sig_b64, str):
                raise ValueError
            sealed = base64.b64decode(sealed_b64, validate=True)
            sig = base64.b64decode(sig_b64, validate=True)
        except (binascii.Error, ValueError):
            raise VerificationError(f"the key package of epoch {epoch} of room {room_id} is malformed "
                                    "(sealed and sig must be base64)") from None
        if not isinstance(sealer, str) or not isinstance(head, dict) or type(head.get("seq")) is not int:
            raise VerificationError(f"the key package of epoch {epoch} of room {room_id} names no sealer or log head")
        state = self.verified
        lroom = state.rooms.get(room_id)
        if head["seq"] > state.head[0] or lroom is None or epoch not in lroom.epochs:
            state = await self.sync()  # the package may be newer than the replica
        try:
            state.check_key_package(room_id, epoch, self.identity.handle, sealed, sig, sealer, head)
        except LogError as exc:
            raise VerificationError(f"the key of epoch {epoch} of room {room_id} that {self.base_url} serves does "
                                    f"not verify: {exc.reason}", exc.seq) from None
        key = open_room_key(sealed, self.identity, room_id, epoch)
        self._keys[(room_id, epoch)] = key
        self._packages[(room_id, epoch)] = head["seq"]
        await self.replica.accept_epoch(room_id, epoch)
        return key

    async def _accept_legacy_key(self, room_id: str, epoch: int, sealed_b64: Any) -> bytes:
        """A key sealed before 0.12, for reading only: it must be one that entry 0 records
        (:meth:`unibus.memberlog.LogState.check_legacy_keys`). Entry 0 holds one digest over
        all of a member's such keys of a room, so the first one asked for fetches the others
        of that room too, once; they are kept, verified, for the next. Kept apart from the
        verified key packages, so that nothing is ever encrypted with them."""
        me = self.identity.handle
        state = self.verified
        if room_id not in state.rooms:
            state = await self.sync()
        epochs = state.legacy_epochs(room_id, me)
        if epoch not in epochs:
            raise UnsignedKey(room_id, epoch, f"entry 0 records no key sealed to {me} for epoch {epoch} of this "
                                              "room before the log")
        if (room_id, epoch) not in self._legacy_sealed:
            sealed = {epoch: _legacy_sealed_bytes(room_id, epoch, sealed_b64)}
            gate = asyncio.Semaphore(LEGACY_FETCHES)

            async def fetch(other: int) -> None:
                async with gate:
                    try:
                        doc = await self.my_key(room_id, other)
                    except KeyUnavailable:
                        raise UnsignedKey(room_id, epoch, f"{self.base_url} has no key of epoch {other} sealed to "
                                                          f"{me}, which entry 0 records, so they cannot be "
                                                          "checked") from None
                if not isinstance(doc, dict) or type(doc.get("epoch")) is not int or doc.get("epoch") != other \
                        or doc.get("sig") is not None:
                    raise UnsignedKey(room_id, epoch, f"{self.base_url} answered the key of epoch {other} "
                                                      "as another epoch's, or as a signed one")
                sealed[other] = _legacy_sealed_bytes(room_id, other, doc.get("sealed"))

            try:
                async with asyncio.TaskGroup() as fetches:  # the first failure cancels the others
                    for other in epochs:
                        if other != epoch:
                            fetches.create_task(fetch(other))
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
            try:
                state.check_legacy_keys(room_id, me, sealed)
            except LogError as exc:
                raise UnsignedKey(room_id, epoch, exc.reason) from None
            self._legacy_sealed.update({(room_id, e): v for e, v in sealed.items()})
        elif self._legacy_sealed[(room_id, epoch)] != _legacy_sealed_bytes(room_id, epoch, sealed_b64):
            raise UnsignedKey(room_id, epoch, "the server now serves another key than the one entry 0 records")
        key = open_room_key(self._legacy_sealed[(room_id, epoch)], self.identity, room_id, epoch)
        self._legacy_keys[(room_id, epoch)] = key
        return key

    def cached_key(self, room_id: str, epoch: int) -> bytes | None:
        """The cached key of ``(room_id, epoch)``, if this client has opened (or made) it."""
        return self._keys.get((room_id, epoch))

    async def message_key(self, room_id: str, epoch: int) -> tuple[bytes, int]:
        """``(key, log seq of its key package)`` for reading a message of ``epoch``, verified.

        An epoch the verified log has no rekey to (after a sync) raises
        :class:`KeyUnavailable` without asking the server for it. After a sync
        that did not find the epoch it was made for, the next such sync of the
        room waits :data:`UNKNOWN_EPOCH_SYNC_INTERVAL` seconds: a message naming
        an epoch costs its sender nothing to make, and each would otherwise
        cost every listener a round trip to the server.
        """
        key, seq = self._keys.get((room_id, epoch)), self._packages.get((room_id, epoch))
        if key is not None and seq is not None:
            return key, seq
        lroom = self.verified.rooms.get(room_id)
        if lroom is None or epoch not in lroom.epochs:
            missed = self._unknown_epoch_missed.get(room_id)
            if missed is None or time.monotonic() - missed >= UNKNOWN_EPOCH_SYNC_INTERVAL:
                await self.sync()
                lroom = self.verified.rooms.get(room_id)
                if lroom is None or epoch not in lroom.epochs:
                    self._unknown_epoch_missed[room_id] = time.monotonic()
        if lroom is None or epoch not in lroom.epochs:
            raise KeyUnavailable(room_id, epoch, 404, {
                "title": "Not Found", "detail": f"the verified membership log has no rekey of room {room_id} to "
                                                f"epoch {epoch}"})
        _, key = await self.room_key(room_id, epoch)
        return key, self._packages[(room_id, epoch)]

    async def current_key(self, room_id: str, *, rekey: bool = True) -> tuple[int, bytes]:
        """``(epoch, key)`` to encrypt with now: the room's current epoch in the verified log.

        The server's room must agree with the verified log (:meth:`verified_room`).
        A room that needs a rekey (membership changed, or never keyed) is
        rekeyed first when ``rekey`` and this member may (owner or admin);
        otherwise :class:`RekeyRequired` names who can. Never a key of an
        older epoch: nothing goes to a removed member.
        """
        lroom = await self.verified_room(room_id)
        state, me = self.verified, self.identity.handle
        if me not in lroom.members:
            raise NotARoomMember(room_id, me)
        # Another member's client may have sealed the current key to a member its own client could not
        # tell was put back by a held-back add (a review: this client refused to rekey, then sent under
        # the owner's key, which the member held).
        self._refuse_held_back(room_id, lroom, state)
        # An epoch no logged rekey made (0, or one 0.11 keyed) has no signed key package to encrypt with.
        if lroom.rekey_required or lroom.epoch not in lroom.epochs:
            if rekey and state.may_rekey_at(room_id, me, state.head[0]):
                before, why = lroom.epoch, ("its membership changed since epoch {}" if lroom.rekey_required or
                                             lroom.epoch == 0 else "the key of its epoch {} was sealed before 0.12")
                for _ in range(REKEY_RETRIES + 1):
                    epoch = await self.rekey(room_id)
                    key = self._keys.get((room_id, epoch))
                    # The rekey's own sync may have read past it: a removal logged right after the
                    # rekey (a server holding it back until then, or a race) needs another one before
                    # anything is sent (a red team: the removed member read the message).
                    now = self.verified.rooms.get(room_id)
                    if key is None or now is None or me not in now.members:  # left while it was on its way
                        raise NotARoomMember(room_id, me)
                    if not now.rekey_required and now.epoch == epoch:
                        break
                    if not self.verified.may_rekey_at(room_id, me, self.verified.head[0]):
                        raise RekeyRequired(room_id, self.verified.rekeyers(room_id))
                else:
                    raise VerificationError(f"room {room_id}: its membership changed again after each of "
                                            f"{REKEY_RETRIES + 1} rekeys; nothing was sent")
                self.replica.notice(f"room {room_id} needed a rekey ({why.format(before)}); "
                                    f"rekeyed it to epoch {epoch} first")
                return epoch, key
            raise RekeyRequired(room_id, state.rekeyers(room_id))
        return await self.room_key(room_id, lroom.epoch)

    def _refuse_held_back(self, room_id: str, lroom: LogRoom, state: LogState) -> None:
        """:class:`VerificationError` when a member of the room is in it by an add the server held
        back (:attr:`LogState.held_back`): nothing is sealed to it, and no key it may hold is used.
        The way out is a removal of that member and a rekey, by this member when it may, else by
        one who may (named)."""
        for handle in sorted(lroom.members):
            if (room_id, handle) not in state.held_back:
                continue
            added, removed = state.held_back[(room_id, handle)]
            kept = state.kept_back.get(added)
            if kept is not None:
                when = (f"after a request {kept.author} signed later (seq {kept.later})" if kept.later is not None
                        else f"after seq {kept.given_up_at}, the log as {kept.author}'s client read it once it "
                             f"gave up on it (or before sending it, when it could not read it then)")
                why = (f"{handle} is in it by an add (seq {added}) that {kept.author}'s client had not seen "
                       f"confirmed (it failed, went unanswered, or is still in flight), which the log holds "
                       f"{when}: a request the server held back, then appended")
            else:
                why = (f"{handle} is in it by an add (seq {added}) signed {HELD_BACK_MARGIN} s or more before a "
                       f"removal of {handle} that the log holds earlier (seq {removed}): a request the server "
                       f"held back, such as a try that failed (or the two signers' clocks are {HELD_BACK_MARGIN} "
                       f"s or more apart)")
            me = self.identity.handle
            if state.may_rekey_at(room_id, me, state.head[0]):
                todo = (f"remove {handle} again (and add it back if that is meant, from a host whose clock is "
                        f"right), then rekey")
            else:
                todo = (f"ask {' or '.join(state.rekeyers(room_id)) or 'an admin'} to remove {handle} from room "
                        f"{room_id} again (and add it back if that is meant), then rekey")
            raise VerificationError(f"room {room_id}: {why}. Nothing was sealed or sent: {todo}", added)

    async def rekey(self, room_id: str) -> int:
        """Draw a new room key, seal it to every member the verified log has, upload it; return the new epoch.

        The server's room must agree with the verified log (members, their
        ``enc_pub``/``enc_suite``, epoch, owner; :meth:`verified_room`), else
        :class:`VerificationError` names each difference and nothing is
        sealed. The key is sealed for ``epoch + 1`` to the log's roster with
        the log's keys, each member's key package signed at the verified head
        (docs/formats.md, "Key packages"). A 409 (another rekey won, or the
        membership changed) starts again, at most :data:`REKEY_RETRIES` more
        times; then the 409 is raised. After the upload the log must hold
        this very rekey (its signed ``Content-Digest``), by this member, with
        everyone it was sealed to still in the room as the same member;
        otherwise (a member deleted and added again while it was on its way,
        a server that answered 201 and logged nothing, or logged an earlier
        try) it starts again too, and then raises :class:`VerificationError`.
        Its key is used only then.
        """
        attempt = 0
        while True:
            lroom = await self.verified_room(room_id)
            state = self.verified
            self._refuse_held_back(room_id, lroom, state)
            epoch = lroom.epoch + 1
            head_seq, head_hash = state.head
            key = new_room_key()
            sealed: dict[str, bytes] = {}
            for handle in sorted(lroom.members):
                member = state.members[handle]
                sealed[handle] = seal_room_key(key, member.enc_pub, member.enc_suite, room_id, epoch)
            sigs = sign_key_packages(self.identity, room_id, epoch, sealed, head_seq, head_hash)
            body = {"epoch": epoch, "sealed": {h: _b64(v) for h, v in sealed.items()}, "sigs": sigs,
                    "log_head": {"seq": head_seq, "hash": head_hash}}
            sent = hashlib.sha256(_dumps(body)).digest()  # what post_keys signs and sends
            try:
                await self.post_keys(room_id, epoch, body["sealed"], sigs, body["log_head"])
            except ApiError as exc:
                if exc.status == 409 and attempt < REKEY_RETRIES:
                    attempt += 1
                    log.info("rekey of room %s at epoch %d got 409 (%s); retrying", room_id, epoch, exc.detail)
                    continue
                raise
            state = await self.sync()
            try:
                record = state.check_roster_kept(room_id, epoch, head_seq)
                if record.sealer != self.identity.handle or not _names_digest(record.digest, sent):
                    raise LogError(record.seq, f"room {room_id} epoch {epoch}: the log has another rekey to it "
                                               f"(by {record.sealer}), not the one this client sent")
            except LogError as exc:
                if attempt < REKEY_RETRIES:
                    attempt += 1
                    log.info("rekey of room %s at epoch %d is not the one logged (%s); retrying", room_id, epoch,
                             exc.reason)
                    continue
                raise VerificationError(f"the rekey of room {room_id} that {self.base_url} accepted is not in "
                                        f"its membership log as sealed: {exc.reason}", exc.seq) from None
            if self.identity.handle in sealed:
                self._keys[(room_id, epoch)] = key
                self._packages[(room_id, epoch)] = head_seq
                await self.replica.accept_epoch(room_id, epoch)
            return epoch

    # -- the bus
    def bus(self, *, connect_timeout: float = 5.0, key_ttl: float = 1.0, tls: Any = None,
            grant_wait: float = 2.0) -> Bus:
        """The encrypted bus: ``async with client.bus() as bus: ...`` (see :class:`Bus`).

        ``tls`` is an ``ssl.SSLContext`` for a ``tls://`` bus; by default the
        client's own ``ssl`` context (see :class:`UnibusClient`).
        ``grant_wait``: how long a refused connection (a member added a moment
        ago) is retried, since membership reaches nats-server within 1 s.
        """
        return Bus(self, connect_timeout=connect_timeout, key_ttl=key_ttl, tls=tls if tls is not None else self.ssl,
                   grant_wait=grant_wait)


# --------------------------------------------------------------------------- the bus


@dataclass(frozen=True)
class Message:
    """One room message received by :meth:`Bus.listen`.

    Accepted (``ok``): ``plaintext`` is the decrypted payload and ``sender``
    the verified sender (its signature checked with its key from the verified
    log, in the room's roster at the key package's log head); ``time_ms`` and
    ``msg_id`` are its signed ``Unibus-Time`` and ``Unibus-Msg-Id``.
    Rejected: ``plaintext`` is ``None``, ``reason`` one of
    :data:`REJECT_REASONS` and ``error`` says why; ``sender`` is then only
    what the message claims (or ``None``).
    """

    room_id: str
    topic: str
    epoch: int | None
    plaintext: bytes | None
    subject: str
    sender: str | None = None
    error: str | None = None
    time_ms: int | None = None
    msg_id: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str | None:
        return None if self.plaintext is None else self.plaintext.decode("utf-8", errors="replace")


class Refusal(NamedTuple):
    """What the control plane says of a bus that nats-server keeps refusing (:meth:`Bus._refusal`)."""

    hopeless: bool  # trying again cannot help: the member was deleted, or its key is another
    why: str
    key_held: bool = False  # the control plane said it still has the bus key that was refused


class Bus:
    """A NATS connection as this member, with end-to-end encryption (docs/client.md, docs/bus-auth.md).

    Connects to the ``servers`` of ``GET /v1/bus`` with the member's nkey
    (its bus key, never the signing key) and the member's ``inbox_prefix``.

    * :meth:`send` encrypts with the room's current key and signs the
      message. Which epoch is current comes from the verified log
      (:meth:`UnibusClient.current_key`), checked at most every ``key_ttl``
      seconds per room (0 = on every send); a rekey or a membership change
      made through the same client (any entry it verified since) takes
      effect at once.
    * :meth:`listen` verifies each message (sender signature, roster, time,
      replay) and decrypts it with the verified key of its own
      ``Unibus-Epoch``. A rejected message does not stop the iteration: it is
      yielded as a :class:`Message` whose ``error`` and ``reason`` are set and
      ``plaintext`` is ``None`` (pass ``include_errors=False`` to drop such
      messages; they are counted in :attr:`RoomListener.rejected` and logged
      at WARNING either way). Losing the room (a permissions violation after
      a removal) or the bus ends that iteration with :class:`BusError`.

    A lost connection (membershipd kicks every connection of a member whose
    rights change; a restart; the network) is reconnected transparently,
    with the same key, and every listener's subscription is made again: no
    message published after the bus was re-authorized is lost or delivered
    twice (those published while it was away are not delivered: the bus
    keeps no messages). :attr:`reconnects` counts them and
    :meth:`wait_reconnected` waits for one. A room the member lost ends its
    listener with :class:`BusError`, the others go on. After
    :data:`AUTH_FAILURES_LIMIT` authorization violations in a row (the member
    was deleted, or its bus key changed) the bus stops: every listener and
    :meth:`send` raise :class:`BusError` saying why and what to do.
    docs/client.md ("Reconnects").
    """

    def __init__(self, client: UnibusClient, *, connect_timeout: float = 5.0, key_ttl: float = 1.0,
                 tls: Any = None, grant_wait: float = 2.0) -> None:
        self.client = client
        self.tls = tls
        self.grant_wait = grant_wait
        self.connect_timeout = connect_timeout
        self.key_ttl = key_ttl
        self.info: dict[str, Any] | None = None
        #: times the connection came back (re-authorized, every subscription made again)
        self.reconnects = 0
        #: called with a one-line note each time the connection came back (the CLI prints it)
        self.on_reconnect: Callable[[str], None] | None = None
        self._nc: Any = None
        self._current: dict[str, tuple[float, int, tuple[int, str]]] = {}  # room -> (when, epoch, log head)
        self._listeners: set[RoomListener] = set()
        self._closed_reason: str | None = None
        self._publish_denied: list[tuple[float, str]] = []
        self._bus_pub: str | None = None  # the bus key this connection logs in with
        self._auth_failures = 0  # authorization violations in a row while reconnecting
        self._ask_at = AUTH_FAILURES_LIMIT  # ... at which the control plane is asked why (doubled each time)
        self._last_refusal: str | None = None  # what it said last, for the reason a bus that gives up states
        self._rotating = 0  # rotate_bus_key calls under way: violations are expected
        #: times the control plane said it still has this bus key while reconnects were refused:
        #: each gives nats-py's attempts again, and the waits between them double (_next_server)
        self._extended = 0
        self._failure: str | None = None  # why the bus stopped by itself
        self._stopping: asyncio.Task[None] | None = None
        self._asking: asyncio.Task[None] | None = None  # asking the control plane why reconnects are refused
        self._reconnected = asyncio.Event()
        self._connect_errors: list[Exception] = []  # what error_cb heard while connect() tries
        self._tls_refused = asyncio.Event()  # a TLS failure that no retry can mend

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def nc(self) -> Any:
        """The underlying ``nats.aio.client.Client`` (connected, or reconnecting)."""
        if self._failure is not None:
            raise BusError(self._failure)
        if self._nc is None:
            raise BusError("not connected: use `async with client.bus() as bus`")
        return self._nc

    async def connected(self) -> Any:
        """:attr:`nc`, once connected: a reconnect under way is waited for (up to ``connect_timeout``
        plus the slack of a connection), since nats-py forgets the PINGs sent meanwhile."""
        nc = self.nc
        if _coming_back(nc):
            try:
                await self.wait_reconnected(timeout=self.connect_timeout + CONNECT_SLACK)
            except TimeoutError:
                raise BusError(f"the bus connection was lost and is not back after "
                               f"{self.connect_timeout + CONNECT_SLACK:g} s") from None
            nc = self.nc
        return nc

    async def _processed(self, nc: Any) -> None:
        """Return once nats-server has processed everything sent so far on ``nc``, across a
        reconnect: one under way is waited for (:meth:`connected`), since nats-py forgets the
        PINGs sent before it and sends the SUBs and PUBs it held once it is back. A PUB written
        to a socket that was closing goes out at most once (docs/client.md, "Reconnects").
        :class:`BusError` after BARRIER_TRIES reconnects in a row, or when the connection is
        neither up nor coming back."""
        for _ in range(BARRIER_TRIES):
            generation = self.reconnects
            try:
                if await _barrier(nc, self.connect_timeout):
                    return
            except (TimeoutError, NatsError, OSError):
                if self.reconnects == generation and not _coming_back(nc):
                    raise
            if not (_coming_back(nc) or nc.is_connected or self.reconnects != generation):
                raise BusError("the bus connection is not up, and not coming back")
            nc = await self.connected()
        raise BusError(f"the bus connection dropped {BARRIER_TRIES} times in a row while waiting for the server; "
                       f"what was sent may have reached it")

    async def wait_reconnected(self, count: int | None = None, timeout: float = 10.0) -> int:
        """Wait until :attr:`reconnects` reaches ``count`` (default: one more than now); return it.

        Once this returns, every listener's subscription is live again on
        nats-server (or refused: that listener ended). :class:`BusError` if
        the bus stops first; ``TimeoutError`` after ``timeout`` seconds.
        """
        want = self.reconnects + 1 if count is None else count
        deadline = time.monotonic() + timeout
        while self.reconnects < want:
            if self._failure is not None or self._nc is None:
                raise BusError(self._failure or "the bus was closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the bus did not reconnect within {timeout:g} s")
            event = self._reconnected
            with contextlib.suppress(TimeoutError):
                await within(event.wait(), min(left, 0.5))
        return self.reconnects

    def _rotation(self, *, begin: bool, identity: Identity | None = None) -> None:
        """:meth:`UnibusClient.rotate_bus_key` begins (violations expected) or ends (with the new key)."""
        if begin:
            self._rotating += 1
            return
        self._rotating = max(0, self._rotating - 1)
        nc = self._nc
        if identity is None or nc is None or self._failure is not None:
            return
        # The server closed the connection under the old key before its 200:
        # nats-py is reconnecting, and must sign the next nonce with the new key.
        # It reads its seed again for every nonce but keeps the public key it
        # computed at connect, so both change here, together.
        if not (hasattr(nc, "_nkeys_seed_str") and hasattr(nc, "_public_nkey")):
            self._give_up(nc, "this nats-py cannot change the key of a live connection; the bus key was rotated: "
                              "open the bus again")
            return
        nc._nkeys_seed_str = identity.bus_nkey_seed()
        nc._public_nkey = identity.bus_pub
        self._bus_pub = identity.bus_pub
        self._auth_failures = 0
        self._ask_at = AUTH_FAILURES_LIMIT

    def _give_up(self, nc: Any, reason: str | None = None) -> None:
        """Stop the bus for good (in a task of its own: nats-py's reconnect loop called us)."""
        if self._stopping is not None:
            return

        async def stop() -> None:
            why = reason or await self._refusal_reason()
            self._failure = self._closed_reason = why
            log.warning("bus: %s", why)
            # closed_cb ends every listener with the reason. nats-py's reconnect loop can mark the
            # connection "reconnecting" again while close() awaits (seen once in CI), or connect
            # again after it: close_nats closes until it stays closed (unibus.aio).
            with contextlib.suppress(Exception):
                await close_nats(nc)

        self._stopping = asyncio.get_running_loop().create_task(stop(), name="unibus-bus-stop")

    async def _refusal_reason(self, base: str | None = None) -> str:
        """Why nats-server keeps refusing this member, asked of the control plane (bounded): ``base``,
        then the answer (by default ``base`` says that a connection's reconnects were refused)."""
        return (await self._refusal(base)).why

    async def _refusal(self, base: str | None = None, mine: str | None = None) -> Refusal:
        """:meth:`_refusal_reason`, whether trying again cannot help (the member was deleted, its
        key changed), and whether the control plane said it still has this bus key (``mine``;
        by default the key of the live connection, or the identity's). Trying again can help
        then (the logins were not answered in time, went past the member's budget of logins,
        docs/bus-auth.md, "Limits per member", or past its bound on connections), and when the
        control plane does not answer, fails or turns the question away (a timeout, a 5xx, a
        429): a red team kicked a member's 48 buses in a row, all of them asked at once, their
        signed requests timed out, and each bus stopped for good."""
        client, handle = self.client, self.client.identity.handle
        if base is None:
            base = (f"the bus refused {handle} {self._auth_failures} times in a row (authorization violation) "
                    "and stopped")
        try:
            info = await within(client.bus_info(), 5)
        except ApiError as exc:
            if exc.status == 401:
                return Refusal(True, f"{base}: {client.base_url} no longer accepts {handle}'s signed requests "
                                     "either (the member was deleted?); an admin must add it again")
            if exc.status == 409:
                return Refusal(True, f"{base}: {client.base_url} has no bus key for {handle}; upload yours with "
                                     f"`unibus keygen --upgrade --server {client.base_url}` (and `--ca PATH` "
                                     "if your operator's CA signed its certificate)")
            # Anything else (a 429 of a member's share of the control plane, a 5xx) is no answer.
            return Refusal(False, f"{base}: {client.base_url} answered {exc}")
        except (ServerUnreachable, TimeoutError, aiohttp.ClientError) as exc:
            return Refusal(False, f"{base}: the control plane could not say why ({_said(exc)}); "
                                  "membershipd answers every login for nats-server, which refuses it when no answer "
                                  "comes in time: is membershipd down or overloaded?")
        except RuntimeError as exc:  # the client was closed under its bus (docs/client.md)
            return Refusal(True, f"{base}: the control plane was not asked why ({exc})")
        known = info.get("user_nkey") if isinstance(info, dict) else None
        if mine is None:
            mine = self._bus_pub or client.identity.bus_pub  # before its first connection: the identity's
        if isinstance(known, str) and known != mine:
            return Refusal(True, f"{base}: {client.base_url} has another bus key for {handle} ({known}) than this "
                                 f"bus logs in with ({mine}): it was rotated elsewhere; use the identity file that "
                                 f"holds the new key, or upload this one's with `unibus keygen --upgrade --server "
                                 f"{client.base_url}`")
        return Refusal(False, f"{base}: {client.base_url} still has this bus key for {handle}; try again later "
                              "(nats-server also refuses a login that membershipd did not answer in time, one past "
                              "the member's budget of logins, and one past its bound on connections; a member added offline, with "
                              "membershipd member add, is let on the bus only once the operator sent membershipd a "
                              "SIGHUP)", key_held=True)

    async def connect(self) -> None:
        seed, used = self._bus_seed(), self.client.identity.bus_pub
        info = await self._fetch_bus_info()
        servers = info["servers"]
        self._connect_errors = []
        self._tls_refused = asyncio.Event()
        # A member added a moment ago reaches nats-server within 1 s (docs/bus-auth.md). nats-py
        # tries a refused login again by itself, within the bound of each connect below.
        started = time.monotonic()
        deadline, patient_until, warned = started + self.grant_wait, started + FIRST_CONNECT_PATIENCE, False
        waited = 0  # refusals waited out while the control plane has the key
        while True:
            if self.client.identity.bus_pub != used:  # rotated by this client meanwhile: the new key
                seed, used = self._bus_seed(), self.client.identity.bus_pub
            start = len(self._connect_errors)
            try:
                self._nc = await connect_bounded(nats.connect(**self._connect_options(info, seed)),
                                                 self.connect_timeout + CONNECT_SLACK, self._tls_refused)
            except (TimeoutError, nats_errors.NoServersError, nats_errors.Error, OSError) as exc:
                refused = _still_refused(self._connect_errors[start:], exc)
                if refused and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    continue
                if not refused:
                    raise self._connect_failure(exc, servers) from None
                # Still refused: the control plane may say why. While it says it still has this
                # bus key (the member's logins are past its budget, or were not answered in
                # time), the connection is tried again until FIRST_CONNECT_PATIENCE after the
                # start, about what a reconnect's attempts take (a red team's `unibus listen`
                # gave up after 11 s while its member was throttled).
                refusal = await self._refusal(
                    f"the bus at {', '.join(map(str, servers))} refused the connection of "
                    f"{self.client.identity.handle} (authorization violation)", mine=used)
                if refusal.hopeless and self.client.identity.bus_pub != used:
                    continue  # this client's own rotation, seen from the server: try the new key
                if refusal.hopeless or not refusal.key_held or time.monotonic() >= patient_until:
                    raise BusError(refusal.why) from None
                if not warned:
                    warned = True
                    log.warning("bus: %s; trying again until %g s after the start", refusal.why,
                                FIRST_CONNECT_PATIENCE)
                # Spaced out, twice as far each time up to PATIENCE_WAIT_MAX: a bus that refused every
                # login at once got about 4 logins a second, and the control plane as many questions,
                # for the whole 120 s (a black-box test of the client).
                await asyncio.sleep(min(RECONNECT_WAIT * 2 ** waited, PATIENCE_WAIT_MAX) * (1 + random.random()))
                waited += 1
                continue
            self._bus_pub = used
            self.client._buses.add(self)
            return

    def _bus_seed(self) -> str:
        """The seed of the member's bus key, which logs in to nats-server."""
        try:
            # The bus key, never the signing key: nats-py signs whatever nonce
            # the server sends, so the key that logs in is a signing oracle for
            # whoever runs (or impersonates) that server (docs/bus-auth.md#bus-keys).
            return self.client.identity.bus_nkey_seed()
        except NoBusKey as exc:
            raise BusError(str(exc)) from None

    async def _fetch_bus_info(self) -> dict[str, Any]:
        """``GET /v1/bus``, checked against the identity (kept in :attr:`info`)."""
        identity = self.client.identity
        try:
            info = await self.client.bus_info()
        except ApiError as exc:
            if exc.status == 409:
                raise BusError(exc.problem.get("detail") or str(exc)) from None
            raise
        servers = info.get("servers") if isinstance(info, dict) else None
        if not servers or not isinstance(servers, list):
            raise BusError("the server's /v1/bus answer lists no NATS servers")
        known = info.get("user_nkey")
        if known != identity.bus_pub:
            raise BusError(f"the server has another bus key for {identity.handle} ({known}) than the identity file "
                           f"({identity.bus_pub}); upload yours with `unibus keygen --upgrade --server "
                           f"{self.client.base_url}`")
        self.info = info
        return info

    def _connect_options(self, info: dict[str, Any], seed: str) -> dict[str, Any]:
        """The keyword arguments of ``nats.connect``: this member's key and inbox, reconnects, callbacks."""
        handle = self.client.identity.handle
        servers = info["servers"]
        options: dict[str, Any] = {"tls": self.tls} if self.tls is not None else {}
        if all(str(s).strip().lower().startswith("tls://") for s in servers):
            # Start with the TLS handshake: nats-py would otherwise read the INFO
            # in clear, and a man in the middle who removed tls_required from it
            # would get our nkey's answer to the nonce in clear (docs/client.md, "TLS").
            options["tls_handshake_first"] = True
        if any(str(s).strip().lower().startswith("tls://") for s in servers) or self.tls is not None:
            # asyncio warns at each close of such a connection, on stderr when the program
            # configured no logging (a developer's walk-through): dropped, and only that line.
            quiet_tls_eof_warnings()
        return {
            "servers": servers,
            **options,
            "nkeys_seed_str": seed,
            "inbox_prefix": info.get("inbox_prefix") or f"_INBOX_{handle}",
            "name": f"unibus-client/{handle}",
            "connect_timeout": self.connect_timeout,
            "max_reconnect_attempts": MAX_RECONNECTS,
            "reconnect_time_wait": RECONNECT_WAIT,
            "reconnect_to_server_handler": self._next_server,
            "allow_reconnect": True,
            "error_cb": self._on_error,
            "closed_cb": self._on_closed,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }

    def _connect_failure(self, exc: BaseException, servers: list[Any]) -> BusError:
        """The :class:`BusError` that says why the first connection failed (a refusal: :meth:`connect`)."""
        reason = str(exc) or type(exc).__name__
        where = ", ".join(map(str, servers))
        cause = next((e for e in reversed(self._connect_errors) if isinstance(e, _ssl.SSLError)), None)
        if isinstance(exc, _ssl.SSLError) or cause is not None:
            ssl_exc = cause if cause is not None else exc
            why = getattr(ssl_exc, "verify_message", None) or getattr(ssl_exc, "reason", None) or ssl_exc
            return BusError(f"cannot connect to the bus at {where}: TLS failed ({why}); the bus certificate "
                            "must verify against --ca PATH [UNIBUS_CA], and a bus that verifies clients "
                            "needs --cert/--key")
        if isinstance(exc, TimeoutError):
            reason = f"no connection within {self.connect_timeout + CONNECT_SLACK:.0f} s"
        return BusError(f"cannot connect to the bus at {where}: {reason}")

    async def _on_error(self, exc: Exception) -> None:
        """nats-py's ``error_cb``: refusals of a subscription or a publish, failed (re)connects."""
        text = str(exc)
        low = text.lower()
        if "permissions violation" in low and "subscription" in low:
            for listener in list(self._listeners):
                if f'"{listener.subject}"' in text or listener.subject in text:
                    listener._denied(text.strip())
            return
        if self._nc is None:
            log.debug("bus: %s (while connecting)", text)  # connect() retries or raises
            self._connect_errors.append(exc)
            if permanent_tls_error(exc):
                self._tls_refused.set()  # retrying cannot help: stop now
            return
        if "permissions violation" in low and "publish" in low:
            self._publish_denied.append((time.monotonic(), text.strip()))
            del self._publish_denied[:-100]
            return
        if _authorization_violation(exc):
            self._reconnect_refused()
            return
        self._log_connection_error(exc, text)

    def _reconnect_refused(self) -> None:
        """A reconnect refused by the auth callout: a key being rotated by
        this client is expected to be; otherwise the member was deleted
        or its key changed, and retrying forever cannot help."""
        if self._rotating:
            log.info("bus: reconnect refused while the bus key is being rotated; retrying")
            return
        self._auth_failures += 1
        log.info("bus: reconnect refused (authorization violation, %d in a row)", self._auth_failures)
        if self._auth_failures >= self._ask_at and self._asking is None and self._stopping is None:
            self._asking = asyncio.get_running_loop().create_task(
                self._refused_repeatedly(self._nc, self._auth_failures), name="unibus-bus-refused")

    async def _refused_repeatedly(self, nc: Any, refusals: int) -> None:
        """Stop the bus when the control plane says trying again cannot help; otherwise (it still has
        this bus key: logins past the member's budget, or not answered in time; or it gave no answer)
        reconnecting goes on, and the next question waits for twice as many refusals (at most
        :data:`ASK_AGAIN_WITHIN` more). Within nats-py's bound on reconnect attempts
        (:data:`MAX_RECONNECTS` on each server), which an answer that the control plane still has
        this bus key starts again, with twice as long between two attempts (:meth:`_next_server`)."""
        key = self._bus_pub
        try:
            # The buses of a member kicked together are refused together: not all ask at once.
            await asyncio.sleep(random.uniform(0, REFUSED_ASK_JITTER))
            if self._auth_failures == 0 or self._rotating or self._bus_pub != key:
                return  # back meanwhile, or this client is changing its key: nothing to ask
            hopeless, why, key_held = await self._refusal(
                f"the bus refused {self.client.identity.handle} {refusals} times in a row "
                "(authorization violation) and stopped")
            if self._rotating or self._bus_pub != key or self._auth_failures == 0:
                return  # this client's own rotation, seen from the server half-way, or back meanwhile
            if hopeless:
                self._give_up(nc, why)
            elif self._failure is None and self._auth_failures:
                self._last_refusal = why.replace(" and stopped", "", 1)
                self._ask_at = self._auth_failures + min(self._auth_failures, ASK_AGAIN_WITHIN)
                if key_held:
                    # A member whose logins are throttled for long (its connections kicked again
                    # and again) stays a member: its bus goes on as long as the control plane says
                    # so, not only for nats-py's attempts (a red team's `unibus listen` stopped
                    # after 115 s of them). A silent control plane gives no more. Each time, the
                    # attempts come half as often (a review: a member at its bound on connections,
                    # or a wrong address in /v1/bus, was refused 2.7 times a second for good).
                    self._extended += 1
                    for server in getattr(nc, "_server_pool", ()):
                        if hasattr(server, "reconnects"):
                            server.reconnects = 1  # not 0: no burst of first attempts (_next_server)
                log.warning("bus: %s; still reconnecting", self._last_refusal)
        finally:
            self._asking = None

    def _log_connection_error(self, exc: Exception, text: str) -> None:
        if self._failure is not None or self._nc.is_closed:
            return  # stopped already: what the closing socket says adds nothing
        if self._nc.is_reconnecting:
            log.info("bus: reconnect attempt failed: %s", text)
            return
        if isinstance(exc, (nats_errors.UnexpectedEOF, ConnectionError)):
            log.info("bus: connection lost (%s); reconnecting", text)  # a kick looks like this
            return
        log.warning("bus: %s", text)

    async def _on_closed(self) -> None:
        reason = self._closed_reason
        if reason is None:
            last = getattr(self._nc, "last_error", None)
            reason = (f"the bus connection was lost and could not be made again"
                      f"{f' ({last})' if last else ''}")
            if self._last_refusal is not None and self._auth_failures:
                reason += f"; {self._last_refusal}"  # refused to the end: what the control plane said last
            self._failure = reason
        for listener in list(self._listeners):
            listener._fail(reason)

    async def _on_disconnected(self) -> None:
        if self._nc is not None and self._nc.is_reconnecting:
            log.info("bus: disconnected; reconnecting")

    def _next_server(self, servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        """nats-py's ``reconnect_to_server_handler``: the least-tried server; the first attempt
        after a disconnect almost at once (jittered), later ones after RECONNECT_WAIT (jittered),
        twice as long for each time the control plane said it still has this bus key while
        the reconnects were refused (at most RECONNECT_WAIT_MAX)."""
        chosen = min(servers, key=lambda srv: srv.reconnects)
        if chosen.reconnects == 0:
            return chosen, random.uniform(0, RECONNECT_JITTER)
        wait = min(RECONNECT_WAIT * 2 ** min(self._extended, 16), RECONNECT_WAIT_MAX)  # never a float overflow
        return chosen, wait * (1 + random.random())

    async def _on_reconnected(self) -> None:
        # nats-py made every subscription again and flushed before calling
        # this: the server has processed them (refusals came first, to error_cb).
        self._extended = 0
        self._auth_failures = 0
        self._ask_at = AUTH_FAILURES_LIMIT
        self._last_refusal = None
        self.reconnects += 1
        event, self._reconnected = self._reconnected, asyncio.Event()
        event.set()
        log.info("bus: reconnected (%d so far); subscriptions made again", self.reconnects)
        if self.on_reconnect is not None:
            self.on_reconnect(f"the bus connection was closed (a restart, or your rights changed) and is back; "
                              f"listening again ({self.reconnects} reconnect{'s' if self.reconnects > 1 else ''})")

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self.client._buses.discard(self)
        self._closed_reason = self._failure or "the bus was closed"
        for task in (self._asking, self._stopping):
            if task is not None and not task.done():
                await cancel_and_wait(task)  # asking the control plane why; closed here anyway
        for listener in list(self._listeners):
            listener._fail(None)
        if nc is not None:
            if not nc.is_closed:
                try:
                    await own_cancel_only(nc.drain())  # ForeignCancel: closed during a reconnect (unibus.aio)
                except Exception as exc:  # noqa: BLE001 - best effort on the way out
                    log.debug("bus: drain failed (%s); closing", exc)
            with contextlib.suppress(Exception):
                # drain() refuses a connection that is reconnecting, a reconnect can bring a closed
                # one back, and a stop cancelled above may have left one running: closed until it
                # stays closed (unibus.aio.close_nats; at once on a client that is)
                await close_nats(nc)

    async def current_key(self, room_id: str) -> tuple[int, bytes]:
        """``(epoch, key)`` to send with: the room's current epoch in the verified log (see ``key_ttl``)."""
        now = time.monotonic()
        hit = self._current.get(room_id)
        # A rekey done through the client (or a newer key it verified) ends the cached answer at
        # once, and so does any entry the client verified since (its own removal of a member
        # among them: a red team's sends went on under the removed member's key for key_ttl).
        newest = max((e for (r, e) in self.client._keys if r == room_id), default=-1)
        head = self.client.verified.head
        if hit is not None and now - hit[0] < self.key_ttl and newest <= hit[1] and head == hit[2]:
            key = self.client.cached_key(room_id, hit[1])
            if key is not None:
                return hit[1], key
        epoch, key = await self.client.current_key(room_id)
        self._current[room_id] = (now, epoch, self.client.verified.head)
        return epoch, key

    async def send(self, room_id: str, topic: str, data: bytes | str) -> int:
        """Encrypt ``data`` with the room's current key, sign it, publish it; return the epoch used.

        Published on ``unibus.room.<room_id>.<topic>`` with ``Unibus-Epoch``,
        ``Unibus-Sender``, ``Unibus-Time``, ``Unibus-Msg-Id`` and ``Unibus-Sig``
        (docs/formats.md, "Message signatures"). A room that needs a rekey is
        rekeyed first when this member may, else :class:`RekeyRequired`.
        Returns once nats-server has processed the publish; a publish it
        refused (permissions violation) raises :class:`BusError`.
        """
        if self._failure is not None:
            raise BusError(self._failure)
        if isinstance(data, str):
            data = data.encode("utf-8")
        subject = message_subject(room_id, topic)
        epoch, key = await self.current_key(room_id)
        payload = encrypt_message(key, subject, epoch, data)
        headers = message_headers(self.client.identity, subject, epoch, payload, int(time.time() * 1000))
        nc = await self.connected()
        started = time.monotonic()
        try:
            await nc.publish(subject, payload, headers=headers)
            # nats-server answers a forbidden PUB with -ERR before the PONG that
            # follows it, so a refusal has reached error_cb when this returns.
            await self._processed(nc)
        except (TimeoutError, NatsError, OSError) as exc:
            if self._failure is not None:
                raise BusError(self._failure) from None
            if self._nc is None:  # closed meanwhile: nats-py never answers the PINGs it had out
                raise BusError(self._closed_reason or "the bus was closed") from None
            sent = "; it may have gone out" if isinstance(exc, TimeoutError) else ""
            raise BusError(f"cannot publish on {subject}: {_said(exc)}{sent}") from None
        # nats-py lower-cases -ERR texts; topics may have capitals
        denied = [t for (at, t) in self._publish_denied if at >= started and f'"{subject.lower()}"' in t.lower()]
        if denied:
            raise BusError(f"the bus refused to let {self.client.identity.handle} publish on {subject} "
                           f"(not a member of room {room_id}?): {denied[-1]}")
        return epoch

    def listen(self, room_id: str, *, include_errors: bool = True, grant_wait: float = 2.0,
               max_age: float = DEFAULT_MAX_AGE, remember: bool = True) -> RoomListener:
        """Messages of the room, verified and decrypted: ``async for msg in bus.listen(room_id)``.

        Subscribes on ``unibus.room.<room_id>.>`` at the first iteration, or
        explicitly with ``await listener.start()`` / ``async with bus.listen(r) as msgs``
        (so that a send that follows is not missed). ``max_age``: seconds a
        message's ``Unibus-Time`` may be away from this clock. A message signed
        more than 120 s before the listener started is refused (published again);
        with ``remember`` and a replica directory, the msg ids accepted are kept
        there, and a later listener refuses them (docs/client.md, "Messages
        accepted once").
        """
        validate_room_id(room_id)
        if not max_age > 0:
            raise ValueError("max_age must be a positive number of seconds")
        return RoomListener(self, room_id, include_errors=include_errors, grant_wait=grant_wait, max_age=max_age,
                            remember=remember)

    async def decode(self, room_id: str, msg: Any, guard: ReplayGuard | None = None) -> Message:
        """Verify and decrypt a raw nats-py message of ``room_id`` into a :class:`Message`.

        The checks, in order (docs/client.md, "What the client verifies"):
        the subject and the five headers; the time within the window and the
        msg id not seen before (with a ``guard``); the key of the message's
        epoch, through its verified key package; the sender in the room's
        roster at that package's log head and still in the room; the
        signature with the sender's signing key from the verified log; the
        AEAD. The msg id is remembered only for an accepted message.
        """
        subject = msg.subject
        headers = msg.headers or {}
        claimed = headers.get(SENDER_HEADER) if isinstance(headers.get(SENDER_HEADER), str) else None
        r, topic, epoch = room_id, "", None

        def reject(reason: str, text: str) -> Message:
            return Message(r, topic, epoch, None, subject, claimed, text, reason=reason)

        try:
            r, topic = parse_message_subject(subject)
        except ValueError as exc:
            return reject("malformed", str(exc))
        if r != room_id:
            return reject("malformed", f"a message of room {r} arrived on the subscription of room {room_id}")
        try:
            env = parse_envelope(headers)
        except MessageError as exc:
            return reject("malformed", str(exc))
        epoch = env.epoch
        now_ms = int(time.time() * 1000)
        try:
            if guard is not None:
                _check_fresh(guard, env, now_ms)
            key, package_seq = await self._message_key(r, env)
            self._check_sender(r, env, package_seq, subject, bytes(msg.data))
            plaintext = _decrypt(key, subject, env.epoch, msg.data)
        except _Rejected as exc:
            return reject(exc.reason, exc.text)
        if guard is not None:
            guard.add(env.msg_id, env.time_ms, now_ms)
        return Message(r, topic, env.epoch, plaintext, subject, env.sender, time_ms=env.time_ms, msg_id=env.msg_id)

    async def _message_key(self, room_id: str, env: Envelope) -> tuple[bytes, int]:
        """The key of the message's epoch and the log seq of its verified package, or :class:`_Rejected`."""
        try:
            return await self.client.message_key(room_id, env.epoch)
        except KeyUnavailable:
            raise _Rejected("no-key", f"no key for epoch {env.epoch} of room {room_id}: it was not sealed to you "
                                      "(you were not a member of the room at that epoch)") from None
        except LogVerificationError:
            raise  # the log itself: nothing more from this server can be trusted (the listener stops)
        except VerificationError as exc:
            raise _Rejected("key", str(exc)) from None
        except (ApiError, SealError, ServerUnreachable, ReplicaError) as exc:
            raise _Rejected("no-key", f"cannot get the key of epoch {env.epoch}: {exc}") from None

    def _check_sender(self, room_id: str, env: Envelope, package_seq: int, subject: str, data: bytes) -> None:
        """The sender was in the room when the epoch was sealed, is still the same member and in
        the room, and signed the message."""
        state = self.client.verified
        try:
            member = state.check_sender(room_id, env.sender, package_seq)
        except LogError as exc:
            raise _Rejected("sender", f"{env.sender} may not send under epoch {env.epoch} of room {room_id}: "
                                      f"{exc.reason}") from None
        lroom = state.rooms.get(room_id)
        if lroom is None or env.sender not in lroom.members:
            raise _Rejected("sender", f"{env.sender} is no longer in room {room_id} in the verified log")
        if not verify_ed25519(member.sign_pub, env.signed_bytes(subject, data), env.sig):
            raise _Rejected("signature", f"the signature does not verify with {env.sender}'s signing key (a forged "
                                         "sender, or a message changed on the way)")


class _Rejected(Exception):
    """A message :meth:`Bus.decode` does not accept: ``reason`` (one of REJECT_REASONS) and ``text``."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


def _check_fresh(guard: ReplayGuard, env: Envelope, now_ms: int) -> None:
    """The message's time is within the guard's window and its msg id was not seen before."""
    if not guard.fresh(env.time_ms, now_ms):
        raise _Rejected("stale", f"its Unibus-Time is {abs(now_ms - env.time_ms) / 1000:.0f} s away from this "
                                 f"clock, beyond the {guard.window_ms / 1000:g} s window (an old message "
                                 "replayed, or a clock that is off)")
    if env.msg_id in guard:
        raise _Rejected("replay", f"msg id {env.msg_id} was already received (a replayed message)")
    if guard.not_before_ms is not None and env.time_ms < guard.not_before_ms:
        raise _Rejected("replay", f"it was signed {(guard.not_before_ms - env.time_ms) / 1000 + LISTENER_START_SLACK:.0f}"
                                  f" s before this listener started, more than the {LISTENER_START_SLACK} s two members' "
                                  "clocks may differ: published before it could be heard, so published again")


def _decrypt(key: bytes, subject: str, epoch: int, data: bytes) -> bytes:
    try:
        return decrypt_message(key, subject, epoch, data)
    except MessageError as exc:
        raise _Rejected("decrypt", str(exc)) from None


_END = object()


def _authorization_violation(exc: BaseException) -> bool:
    """nats-server refused this member's login (or the auth callout did)."""
    return "authorization violation" in str(exc).lower() or isinstance(exc, nats_errors.AuthorizationError)


#: What follows a refused login on its connection: the server closing it.
_CLOSED_AFTER = (ConnectionResetError, BrokenPipeError, nats_errors.UnexpectedEOF)


def _still_refused(heard: Sequence[BaseException], raised: BaseException) -> bool:
    """Whether a connect that ended with ``raised`` failed because its login was refused: the
    last thing its tries heard (``heard``, in order, then ``raised``, unless that only says the
    bound or the tries ran out) was a refusal. A reset or end of the connection after it is the
    server closing it; anything else (a server down or hung, a TLS failure) is another failure."""
    tail = [*heard] if isinstance(raised, (TimeoutError, nats_errors.NoServersError)) else [*heard, raised]
    for e in reversed(tail):
        if _authorization_violation(e):
            return True
        if not isinstance(e, _CLOSED_AFTER):
            return False
    return False


def _coming_back(nc: Any) -> bool:
    """nats-py is reconnecting: waiting to try, or in the new connection's handshake (CONNECTING,
    while nats-server asks the callout; a review: a send then took it for a dead connection)."""
    return bool(nc.is_reconnecting or nc.is_connecting)


async def _barrier(nc: Any, timeout: float) -> bool:
    """True once nats-server has processed everything sent so far on ``nc``;
    False when the connection was not up the whole time (then nothing is known:
    wait for the reconnect and ask again, as :meth:`Bus._processed` does).

    One ``flush()`` is not enough with nats-py 2.16: SUB/PUB wait in its
    pending buffer for the flusher task, but the PING of ``flush()`` is written
    to the socket at once, so its PONG can come back before the server has even
    seen the SUB (then a refusal arrives *after* flush returned, and a message
    published right away can be missed). After one round trip the flusher has
    run, so the PING of a second flush follows the SUB/PUB on the wire.

    And while nats-py reconnects, its read loop is down and ``flush()`` returns
    at once with nothing sent: a SUB or PUB made then waits in the pending
    buffer until the connection is back (a CI run: a message published "before"
    another connection's reached the listener after it).
    """
    if nc.is_closed:
        raise nats_errors.ConnectionClosedError
    if not nc.is_connected:
        return False
    before = nc.stats["reconnects"]
    await _ping(nc, timeout)
    await _ping(nc, timeout)
    return nc.is_connected and nc.stats["reconnects"] == before


async def _ping(nc: Any, timeout: float) -> None:
    """A PING and its PONG, as nats-py's ``flush()``, but a timeout leaves the connection whole.

    nats-py 2.16's ``flush()`` cancels its future on a timeout and leaves it in the list of
    PONGs awaited: the PONG that comes later raises InvalidStateError in its read loop, which
    ends, so the connection hears nothing more (no message, no PONG) until its pings go stale,
    minutes later (a test of a frozen nats-server found it). Here the wait is shielded: a late
    PONG resolves the future nobody waits for, and the read loop goes on.
    """
    send_ping = getattr(nc, "_send_ping", None)
    if send_ping is None:  # pragma: no cover - another nats-py: its own flush
        await nc.flush(timeout=timeout)
        return
    future = asyncio.get_running_loop().create_future()
    await send_ping(future)
    try:
        await within(asyncio.shield(future), timeout)
    except TimeoutError:
        raise nats_errors.FlushTimeoutError from None


class RoomListener:
    """Async iterator of a room's :class:`Message` s (see :meth:`Bus.listen`).

    ``rejected`` counts the messages refused so far, by reason; ``guard``
    holds the msg ids accepted within the time window (bounded memory).
    Messages received but not yet taken wait in a buffer of at most
    :data:`LISTENER_MAX_BYTES` of payload and :data:`LISTENER_MAX_MESSAGES`
    messages: beyond it they are dropped and counted in ``dropped`` (a
    member flooding the room cannot fill a slow listener's memory).
    """

    def __init__(self, bus: Bus, room_id: str, *, include_errors: bool = True, grant_wait: float = 2.0,
                 max_age: float = DEFAULT_MAX_AGE, remember: bool = True) -> None:
        self.bus = bus
        #: rejected messages so far, by reason (:data:`REJECT_REASONS`)
        self.rejected: Counter[str] = Counter()
        self.guard = ReplayGuard(int(max_age * 1000))
        self._remember = remember
        self.room_id = room_id
        self.grant_wait = grant_wait
        self._refusal: str | None = None
        self._live = False
        self.subject = room_subject(room_id) + ".>"
        self.include_errors = include_errors
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queued_bytes = 0
        #: messages dropped because the buffer was full (the listener did not keep up)
        self.dropped = 0
        self._sub: Any = None
        self._done = False

    async def start(self) -> Self:
        """Subscribe now (idempotent); the subscription is live on the server when this returns.

        A subscription the bus refuses (permissions violation) is tried again
        for up to ``grant_wait`` seconds, since a membership change takes up to
        a second to reach nats-server (docs/bus-auth.md); then :class:`BusError`.
        """
        if self._live or self._done:
            return self
        nc = await self.bus.connected()
        if self.guard.not_before_ms is None:  # before the subscription: what earlier runs accepted
            self.guard.seen = await self._seen_ids()
            self.guard.start(int(time.time() * 1000))

        async def cb(msg: Any) -> None:
            size = len(msg.data) + len(msg.subject)
            if (self._queued_bytes + size > LISTENER_MAX_BYTES
                    or self._queue.qsize() >= LISTENER_MAX_MESSAGES):
                if self.dropped % 1000 == 0:
                    log.warning("room %s: the listener is not keeping up; messages dropped so far: %d",
                                self.room_id, self.dropped + 1)
                self.dropped += 1
                return
            self._queued_bytes += size
            self._queue.put_nowait(msg)

        deadline = time.monotonic() + self.grant_wait
        self.bus._listeners.add(self)
        while True:
            self._refusal = None
            self._live = False
            try:
                self._sub = await nc.subscribe(self.subject, cb=cb)
                await self.bus._processed(nc)  # a reconnect meanwhile made it again: waited for
            except BaseException as exc:  # a cancellation too (a review): no subscription left behind
                self.bus._listeners.discard(self)
                sub, self._sub = self._sub, None  # nats-py would make it again at each reconnect
                if sub is not None:
                    with contextlib.suppress(NatsError, OSError, TimeoutError):
                        await sub.unsubscribe()  # no wait: an UNSUB queued to the connection
                if isinstance(exc, (TimeoutError, NatsError, OSError, BusError)):
                    raise BusError(f"cannot subscribe to {self.subject}: {_said(exc)}") from None
                raise
            if self._refusal is None:
                self._live = True
                return self
            sub, self._sub = self._sub, None
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await sub.unsubscribe()
            if time.monotonic() >= deadline:
                self.bus._listeners.discard(self)
                raise BusError(f"the bus refused to let {self.bus.client.identity.handle} subscribe to "
                               f"{self.subject} (not a member of room {self.room_id}?): {self._refusal}")
            await asyncio.sleep(0.1)

    async def _seen_ids(self) -> SeenIds | None:
        """Where the accepted ids are kept: beside the replica, one directory per deployment (its
        trust root), so that two spellings of one server's URL share it (a review); None without a
        replica directory, or with ``remember=False``. A replica with no root pinned yet (a new
        client that has not synced) syncs first: a review's first run kept its ids where no later
        run, once pinned, looked."""
        client = self.bus.client
        if not self._remember or client.replica.directory is None:
            return None
        root = client.replica.pinned_root()
        if root is None:
            await client.sync()
            root = client.replica.pinned_root()
        if root is None:  # pragma: no cover - a sync pins the root or raises
            raise ReplicaError(f"no trust root is pinned in {client.replica.directory} after a sync")
        return SeenIds(client.replica.directory.parent / "seen" / root, self.room_id, self.guard.window_ms)

    def _denied(self, text: str) -> None:
        if self._live:
            self._fail(f"access to room {self.room_id} was revoked ({text})")
        else:
            self._refusal = text

    async def stop(self) -> None:
        if not self._done:
            self._queue.put_nowait(_END)
        self._done = True
        self.bus._listeners.discard(self)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(NatsError, OSError, asyncio.TimeoutError):  # connection may be gone
                await sub.unsubscribe()

    def _fail(self, reason: str | None) -> None:
        self._queue.put_nowait(_END if reason is None else BusError(reason))

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        await self.start()
        while True:
            if self._done and self._queue.empty():
                raise StopAsyncIteration
            item = await self._queue.get()
            if item is _END:
                self._done = True
                raise StopAsyncIteration
            if isinstance(item, BusError):
                self._done = True
                self.bus._listeners.discard(self)
                # a refused subscription would be made again at every reconnect
                sub, self._sub = self._sub, None
                if sub is not None:
                    with contextlib.suppress(NatsError, OSError, asyncio.TimeoutError):
                        await sub.unsubscribe()
                raise item
            self._queued_bytes -= len(item.data) + len(item.subject)
            message = await self.bus.decode(self.room_id, item, self.guard)
            if message.error is not None:
                self.rejected[message.reason or "malformed"] += 1
                log.warning("room %s: message on %s rejected (%s): %s", self.room_id, message.subject,
                            message.reason, message.error)
                if not self.include_errors:
                    continue
            return message


def members_of(room: Mapping[str, Any]) -> Iterable[str]:
    """Handles of a room record's members."""
    return [m.get("handle") for m in room.get("members") or [] if isinstance(m, Mapping)]
