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
certificate does not verify too); the bus raises :class:`BusError`.

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
import json
import logging
import os
import ssl as _ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Self

import aiohttp
import yarl
from nats.errors import Error as NatsError

from ..memberlog import key_package_input
from ..signing import sign_request
from ..tls import connect_bounded, permanent_tls_error
from .keys import DEFAULT_ENC_SUITE, Identity, NoBusKey
from .sealing import (
    EPOCH_HEADER,
    MessageError,
    SealError,
    decrypt_message,
    encrypt_message,
    format_epoch_header,
    message_subject,
    new_room_key,
    open_room_key,
    parse_epoch_header,
    parse_message_subject,
    room_subject,
    seal_for_members,
    validate_room_id,
)

__all__ = [
    "SENDER_HEADER",
    "ApiError",
    "Bus",
    "BusError",
    "KeyUnavailable",
    "Message",
    "RoomListener",
    "ServerUnreachable",
    "UnibusClient",
]

log = logging.getLogger("unibus.client")

#: Optional header set by :meth:`Bus.send`: the handle the sender *claims*.
#: Nothing authenticates it (it is outside the AEAD and the server never sees
#: the message), so readers must treat it as a claim by some room member.
SENDER_HEADER = "Unibus-Sender"

#: How many times :meth:`UnibusClient.rekey` retries after a 409 (a concurrent
#: rekey or a membership change between its GET and its POST).
REKEY_RETRIES = 3
#: How many times a request refused with a retryable 503 is signed again and resent.
RETRIES_503 = 2
#: Seconds a bus connection may take beyond ``connect_timeout`` (its retries included).
CONNECT_SLACK = 5.0

_JSON_TYPE = "application/json"


# --------------------------------------------------------------------------- errors


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
    rekey), or the member was not in the room at that epoch.
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


def _seg(value: Any, what: str) -> str:
    """One percent-encoded path segment (nothing left unescaped but unreserved characters)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return urllib.parse.quote(value, safe="")


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_err = exc.certificate_error
        why = getattr(cert_err, "verify_message", None) or getattr(cert_err, "reason", None) or str(cert_err)
        return (f"its TLS certificate does not verify ({why}); give the CA that signed it with --ca PATH "
                "[UNIBUS_CA] (SDK: ssl=unibus.client.tls_context(ca=PATH))")
    if isinstance(exc, aiohttp.ClientSSLError):
        err = getattr(exc, "os_error", None)
        return f"the TLS handshake failed ({getattr(err, 'reason', None) or err or exc})"
    err = getattr(exc, "os_error", None)
    errno_ = getattr(err, "errno", None)
    if errno_:
        return os.strerror(errno_).lower()
    return str(err or exc) or "connection failed"


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: treat as "no hint"


def _retryable_503(method: str, problem: Mapping[str, Any], retry_after: float | None) -> bool:
    """A 503 worth one more try: the server said the request was refused before it
    was served (replay protection unavailable, fail closed), or a GET with Retry-After."""
    kind = str(problem.get("type") or "")
    if kind.endswith("/nonce-store-unavailable"):
        return True
    return method == "GET" and retry_after is not None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _problem_from(status: int, reason: str | None, raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw) if raw else None
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
    """

    def __init__(self, base_url: str, identity: Identity, *, timeout: float = 10,
                 session: aiohttp.ClientSession | None = None, ssl: _ssl.SSLContext | None = None) -> None:
        if not isinstance(identity, Identity):
            raise TypeError("identity must be a unibus.client.keys.Identity (see load_identity)")
        url = yarl.URL(str(base_url).rstrip("/"))
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
        self._keys: dict[tuple[str, int], bytes] = {}
        #: (room_id, epoch) whose key the server answered 404 for: permanent (the
        #: sealed set of an epoch never changes), so not asked again.
        self._missing: set[tuple[str, int]] = set()

    # -- lifecycle
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()
        if self._own_session:
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl) if self.ssl is not None else None
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                  connector=connector)
            self._own_session = True
        return self._session

    # -- the one request path
    def url_for(self, path: str, query: Mapping[str, Any] | None = None) -> yarl.URL:
        """The absolute, already-encoded URL of ``path`` (itself encoded) plus ``query``."""
        target = path
        if query:
            target += "?" + urllib.parse.urlencode({k: str(v) for k, v in query.items()}, quote_via=urllib.parse.quote)
        return yarl.URL(str(self._base) + target, encoded=True)

    async def request(self, method: str, path: str, *, json_body: Any = None, query: Mapping[str, Any] | None = None,
                      has_body: bool | None = None) -> Any:
        """Send one signed request; return the decoded JSON (``None`` for an empty body).

        ``path`` must already be percent-encoded (use the methods below, which
        encode their arguments). ``json_body`` is serialized once; those exact
        bytes are signed and sent. Raises :class:`ApiError`, :class:`ServerUnreachable`.
        """
        method = method.upper()
        url = self.url_for(path, query)
        body = None
        if json_body is not None or has_body:
            body = _dumps(json_body) if json_body is not None else b""
        attempt = 0
        while True:
            status, reason, raw, retry_after = await self._send_once(method, url, body)
            if 200 <= status < 300:
                break
            problem = _problem_from(status, reason, raw)
            if status == 503 and attempt < RETRIES_503 and _retryable_503(method, problem, retry_after):
                attempt += 1
                delay = min(max(retry_after or 0.5, 0.1), 2.0)
                log.info("%s %s: 503 (%s); retrying in %.1f s", method, path, problem.get("detail"), delay)
                await asyncio.sleep(delay)
                continue  # signed afresh: a new nonce and `created`
            raise ApiError(status, problem)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(status, {"title": "Bad response", "detail": "the server answered with a body that is not JSON"}) from None

    async def _send_once(self, method: str, url: yarl.URL, body: bytes | None) -> tuple[int, str | None, bytes, float | None]:
        headers = sign_request(method, url.raw_path_qs, body, keyid=self.identity.handle,
                               private_key=self.identity.sign_key)
        headers["Accept"] = "application/json, application/problem+json"
        if body is not None:
            headers["Content-Type"] = _JSON_TYPE
        try:
            async with self._http().request(method, url, data=body, headers=headers,
                                            allow_redirects=False) as resp:
                raw = await resp.read()
                return resp.status, resp.reason, raw, _parse_retry_after(resp.headers.get("Retry-After"))
        except aiohttp.ClientConnectorError as exc:
            raise ServerUnreachable(self.base_url, _connect_reason(exc)) from None
        except TimeoutError:
            raise ServerUnreachable(self.base_url, f"no answer within {self.timeout} s") from None
        except aiohttp.ClientError as exc:
            raise ServerUnreachable(self.base_url, str(exc) or type(exc).__name__) from None

    # -- members (SPEC §5)
    async def me(self) -> dict[str, Any]:
        """``GET /v1/me``: the caller's own member record."""
        return await self.request("GET", "/v1/me")

    async def list_members(self) -> list[dict[str, Any]]:
        """``GET /v1/members``: every member record (unwrapped from ``{"members": [...]}``)."""
        doc = await self.request("GET", "/v1/members")
        return doc["members"] if isinstance(doc, dict) and "members" in doc else doc

    async def get_member(self, handle: str) -> dict[str, Any]:
        return await self.request("GET", "/v1/members/" + _seg(handle, "handle"))

    async def add_member(self, handle: str, sign_pub: str, enc_pub: str, enc_suite: str = DEFAULT_ENC_SUITE,
                         role: str = "member", bus_pub: str | None = None) -> dict[str, Any]:
        """``POST /v1/members`` (admin): keys as ``keygen`` prints them.

        ``sign_pub``/``enc_pub`` are standard base64, ``bus_pub`` the ``U…`` nkey
        of the new member's bus key; the server requires it (422 without).
        """
        body = {"handle": handle, "role": role, "sign_pub": sign_pub, "enc_pub": enc_pub, "enc_suite": enc_suite}
        if bus_pub is not None:
            body["bus_pub"] = bus_pub
        return await self.request("POST", "/v1/members", json_body=body)

    async def set_bus_key(self, bus_pub: str | None = None) -> dict[str, Any]:
        """``PUT /v1/me/bus-key``: set or rotate my bus key; returns my member record.

        Default: the bus key of this client's identity. The server closes my
        bus connections under the old key before it answers.
        """
        if bus_pub is None:
            self.identity.require_bus_key()  # NoBusKey, saying what to do, for a version 1 identity
            bus_pub = self.identity.bus_pub
        return await self.request("PUT", "/v1/me/bus-key", json_body={"bus_pub": bus_pub})

    async def set_role(self, handle: str, role: str) -> dict[str, Any]:
        return await self.request("PATCH", "/v1/members/" + _seg(handle, "handle"), json_body={"role": role})

    async def remove_member(self, handle: str) -> None:
        await self.request("DELETE", "/v1/members/" + _seg(handle, "handle"))

    # -- rooms
    async def create_room(self, name: str) -> dict[str, Any]:
        return await self.request("POST", "/v1/rooms", json_body={"name": name})

    async def list_rooms(self) -> list[dict[str, Any]]:
        doc = await self.request("GET", "/v1/rooms")
        return doc["rooms"] if isinstance(doc, dict) and "rooms" in doc else doc

    async def get_room(self, room_id: str) -> dict[str, Any]:
        return await self.request("GET", "/v1/rooms/" + _seg(room_id, "room id"))

    async def delete_room(self, room_id: str) -> None:
        await self.request("DELETE", "/v1/rooms/" + _seg(room_id, "room id"))

    async def add_room_member(self, room_id: str, handle: str) -> dict[str, Any]:
        """``PUT /v1/rooms/{id}/members/{handle}``: the room becomes ``rekey_required``."""
        return await self.request("PUT", f"/v1/rooms/{_seg(room_id, 'room id')}/members/{_seg(handle, 'handle')}")

    async def remove_room_member(self, room_id: str, handle: str) -> Any:
        """``DELETE /v1/rooms/{id}/members/{handle}``: the room becomes ``rekey_required``."""
        return await self.request("DELETE", f"/v1/rooms/{_seg(room_id, 'room id')}/members/{_seg(handle, 'handle')}")

    async def post_keys(self, room_id: str, epoch: int, sealed: Mapping[str, str], sigs: Mapping[str, str],
                        log_head: Mapping[str, Any]) -> Any:
        """``POST /v1/rooms/{id}/keys`` with ``{epoch, sealed, sigs, log_head}`` as given.

        ``sealed`` and ``sigs`` map each handle to base64 (``sigs[h]``: the
        64-byte signature of :meth:`sign_key_packages`); ``log_head`` is the
        ``{seq, hash}`` the signatures name. Sent as is: the caller chooses the head.
        """
        return await self.request("POST", f"/v1/rooms/{_seg(room_id, 'room id')}/keys",
                                  json_body={"epoch": epoch, "sealed": dict(sealed), "sigs": dict(sigs),
                                             "log_head": {"seq": log_head["seq"], "hash": log_head["hash"]}})

    def sign_key_packages(self, room_id: str, epoch: int, sealed: Mapping[str, str],
                          log_head: Mapping[str, Any]) -> dict[str, str]:
        """``{handle: base64 signature}``: this identity's signature of each member's key
        package (docs/formats.md, "The membership log": key packages) at ``log_head``."""
        seq, digest = int(log_head["seq"]), str(log_head["hash"])
        return {h: _b64(self.identity.sign_key.sign(key_package_input(room_id, epoch, h, base64.b64decode(v),
                                                                        seq, digest)))
                for h, v in sealed.items()}

    # -- the membership log (docs/formats.md)
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
        return await self.request("GET", "/v1/log", query=query or None)

    async def log_head(self) -> dict[str, Any]:
        """``GET /v1/log/head`` → ``{"seq", "hash", "auth_skew"}`` (seq -1, hash "" for an empty log), unverified."""
        return await self.request("GET", "/v1/log/head")

    async def my_key(self, room_id: str, epoch: int | None = None) -> dict[str, Any]:
        """``GET /v1/rooms/{id}/keys/me[?epoch=N]`` → ``{epoch, sealed}`` (sealed still base64).

        A 404 raises :class:`KeyUnavailable`.
        """
        query = None if epoch is None else {"epoch": int(epoch)}
        try:
            return await self.request("GET", f"/v1/rooms/{_seg(room_id, 'room id')}/keys/me", query=query)
        except ApiError as exc:
            if exc.status == 404:
                raise KeyUnavailable(room_id, epoch, exc.status, exc.problem) from None
            raise

    async def bus_info(self) -> dict[str, Any]:
        """``GET /v1/bus`` → ``{servers, user_nkey, inbox_prefix, rooms}``."""
        return await self.request("GET", "/v1/bus")

    # -- room keys
    async def room_key(self, room_id: str, epoch: int | None = None) -> tuple[int, bytes]:
        """``(epoch, key)``: the room key of ``epoch``, or the latest one sealed to me.

        Keys are cached per ``(room_id, epoch)``; with ``epoch=None`` the server
        is asked which epoch is the latest sealed to this member (one GET), and
        its key is opened only if not cached yet. Raises :class:`KeyUnavailable`
        (404), :class:`~unibus.client.sealing.SealError` (the sealed value does
        not open with this identity), :class:`ApiError`.
        """
        validate_room_id(room_id)
        if epoch is not None:
            cached = self._keys.get((room_id, epoch))
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
        sealed_b64 = doc.get("sealed") if isinstance(doc, dict) else None
        if type(got) is not int or not isinstance(sealed_b64, str) or (epoch is not None and got != epoch):
            raise ApiError(200, {"title": "Bad response", "detail": f"unexpected keys/me answer for room {room_id}"})
        cached = self._keys.get((room_id, got))
        if cached is not None:
            return got, cached
        try:
            sealed = base64.b64decode(sealed_b64, validate=True)
        except (binascii.Error, ValueError):
            raise SealError(f"sealed room key for room {room_id} epoch {got} is not valid base64") from None
        key = open_room_key(sealed, self.identity, room_id, got)
        self._keys[(room_id, got)] = key
        return got, key

    def cached_key(self, room_id: str, epoch: int) -> bytes | None:
        """The cached key of ``(room_id, epoch)``, if this client has opened it."""
        return self._keys.get((room_id, epoch))

    async def rekey(self, room_id: str) -> int:
        """Draw a new room key, seal it to every current member, upload it; return the new epoch.

        ``GET`` the room, seal (SPEC §6) to each member's ``enc_pub`` /
        ``enc_suite`` for ``epoch + 1``, ``POST`` the keys. A 409 (another
        rekey won, or the membership changed in between) re-reads the room and
        tries again, at most :data:`REKEY_RETRIES` more times; then the 409 is raised.
        """
        attempt = 0
        while True:
            room = await self.get_room(room_id)
            epoch = int(room["epoch"]) + 1
            key = new_room_key()
            sealed = seal_for_members(key, room.get("members") or [], room_id, epoch)
            # The served head, as is: verifying the log before sealing is the caller's part.
            head = await self.log_head()
            sigs = self.sign_key_packages(room_id, epoch, sealed, head)
            try:
                await self.post_keys(room_id, epoch, sealed, sigs, head)
            except ApiError as exc:
                if exc.status == 409 and attempt < REKEY_RETRIES:
                    attempt += 1
                    log.info("rekey of room %s at epoch %d got 409 (%s); retrying", room_id, epoch, exc.detail)
                    continue
                raise
            if self.identity.handle in sealed:
                self._keys[(room_id, epoch)] = key
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

    ``plaintext`` is the decrypted payload, or ``None`` when ``error`` says why
    it could not be decrypted (no key for its epoch, bad header, does not
    authenticate). ``sender`` is the *claimed* handle from the optional
    ``Unibus-Sender`` header (``None`` if absent): nothing vouches for it.
    """

    room_id: str
    topic: str
    epoch: int | None
    plaintext: bytes | None
    subject: str
    sender: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str | None:
        return None if self.plaintext is None else self.plaintext.decode("utf-8", errors="replace")


class Bus:
    """A NATS connection as this member, with end-to-end encryption (SPEC §6, §7).

    Connects to the ``servers`` of ``GET /v1/bus`` with the member's nkey
    (the signing seed) and the member's ``inbox_prefix``.

    * :meth:`send` encrypts with the room's current key. Which epoch is current
      is asked from the server (``keys/me``) at most every ``key_ttl``
      seconds per room (0 = on every send); a rekey made through the same
      client takes effect at once.
    * :meth:`listen` decrypts each message with the key of its own
      ``Unibus-Epoch`` (fetched on first use, then cached). A message that
      cannot be decrypted does not stop the iteration: it is yielded as a
      :class:`Message` whose ``error`` is set and ``plaintext`` is ``None``
      (pass ``include_errors=False`` to drop such messages; they are logged at
      WARNING either way). Losing the room (a permissions violation after a
      removal) or the connection ends the iteration with :class:`BusError`.
    """

    def __init__(self, client: UnibusClient, *, connect_timeout: float = 5.0, key_ttl: float = 1.0,
                 tls: Any = None, grant_wait: float = 2.0) -> None:
        self.client = client
        self.tls = tls
        self.grant_wait = grant_wait
        self.connect_timeout = connect_timeout
        self.key_ttl = key_ttl
        self.info: dict[str, Any] | None = None
        self._nc: Any = None
        self._current: dict[str, tuple[float, int]] = {}
        self._listeners: set[RoomListener] = set()
        self._closed_reason: str | None = None
        self._publish_denied: list[tuple[float, str]] = []

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def nc(self) -> Any:
        """The underlying ``nats.aio.client.Client`` (connected)."""
        if self._nc is None:
            raise BusError("not connected: use `async with client.bus() as bus`")
        return self._nc

    async def connect(self) -> None:
        import nats
        from nats import errors as nats_errors

        identity = self.client.identity
        try:
            # The bus key, never the signing key: nats-py signs whatever nonce
            # the server sends, so the key that logs in is a signing oracle for
            # whoever runs (or impersonates) that server (docs/bus-auth.md#bus-keys).
            seed = identity.bus_nkey_seed()
        except NoBusKey as exc:
            raise BusError(str(exc)) from None
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
        inbox = info.get("inbox_prefix") or f"_INBOX_{self.client.identity.handle}"

        async def error_cb(exc: Exception) -> None:
            text = str(exc)
            low = text.lower()
            if "permissions violation" in low and "subscription" in low:
                for listener in list(self._listeners):
                    if f'"{listener.subject}"' in text or listener.subject in text:
                        listener._denied(text.strip())
                return
            if self._nc is None:
                log.debug("bus: %s (while connecting)", text)  # connect() retries or raises
                connect_errors.append(exc)
                if permanent_tls_error(exc):
                    tls_refused.set()  # retrying cannot help: stop now
                return
            if "permissions violation" in low and "publish" in low:
                self._publish_denied.append((time.monotonic(), text.strip()))
                del self._publish_denied[:-100]
                return
            log.warning("bus: %s", text)

        async def closed_cb() -> None:
            reason = self._closed_reason or "the bus connection was closed"
            for listener in list(self._listeners):
                listener._fail(reason)

        async def disconnected_cb() -> None:
            log.info("bus: disconnected; reconnecting")

        connect_errors: list[Exception] = []
        tls_refused = asyncio.Event()
        extra: dict[str, Any] = {"tls": self.tls} if self.tls is not None else {}
        if all(str(s).strip().lower().startswith("tls://") for s in servers):
            # Start with the TLS handshake: nats-py would otherwise read the INFO
            # in clear, and a man in the middle who removed tls_required from it
            # would get our nkey's answer to the nonce in clear (docs/client.md, "TLS").
            extra["tls_handshake_first"] = True
        deadline = time.monotonic() + self.grant_wait
        while True:
            try:
                self._nc = await connect_bounded(nats.connect(
                    servers=servers,
                    **extra,
                    nkeys_seed_str=seed,
                    inbox_prefix=inbox,
                    name=f"unibus-client/{self.client.identity.handle}",
                    connect_timeout=self.connect_timeout,
                    max_reconnect_attempts=5,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    error_cb=error_cb,
                    closed_cb=closed_cb,
                    disconnected_cb=disconnected_cb,
                ), self.connect_timeout + CONNECT_SLACK, tls_refused)
                return
            except (TimeoutError, nats_errors.NoServersError, nats_errors.Error, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                where = ", ".join(map(str, servers))
                if "authorization violation" in reason.lower() or isinstance(exc, nats_errors.AuthorizationError):
                    # a member added a moment ago reaches nats-server within 1 s (docs/bus-auth.md)
                    if time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                        continue
                    raise BusError(f"the bus at {where} refused the connection of "
                                   f"{self.client.identity.handle} (authorization violation)") from None
                cause = next((e for e in reversed(connect_errors) if isinstance(e, _ssl.SSLError)), None)
                if isinstance(exc, _ssl.SSLError) or cause is not None:
                    ssl_exc = cause if cause is not None else exc
                    why = getattr(ssl_exc, "verify_message", None) or getattr(ssl_exc, "reason", None) or ssl_exc
                    raise BusError(f"cannot connect to the bus at {where}: TLS failed ({why}); the bus certificate "
                                   "must verify against --ca PATH [UNIBUS_CA], and a bus that verifies clients "
                                   "needs --cert/--key") from None
                if isinstance(exc, TimeoutError):
                    reason = f"no connection within {self.connect_timeout + CONNECT_SLACK:.0f} s"
                raise BusError(f"cannot connect to the bus at {where}: {reason}") from None

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._closed_reason = "the bus was closed"
        for listener in list(self._listeners):
            listener._fail(None)
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                log.debug("bus: drain failed (%s); closing", exc)
                with contextlib.suppress(Exception):
                    await nc.close()

    async def current_key(self, room_id: str) -> tuple[int, bytes]:
        """``(epoch, key)`` to send with: the latest epoch sealed to me (see ``key_ttl``)."""
        now = time.monotonic()
        hit = self._current.get(room_id)
        if hit is not None and now - hit[0] < self.key_ttl:
            key = self.client.cached_key(room_id, hit[1])
            if key is not None:
                return hit[1], key
        epoch, key = await self.client.room_key(room_id)
        # a rekey done through the client may already know a newer epoch
        newer = max((e for (r, e) in self.client._keys if r == room_id), default=epoch)
        if newer > epoch:
            epoch, key = newer, self.client._keys[(room_id, newer)]
        self._current[room_id] = (now, epoch)
        return epoch, key

    async def send(self, room_id: str, topic: str, data: bytes | str, *, sender: bool = True) -> int:
        """Encrypt ``data`` with the room's current key and publish it; return the epoch used.

        Published on ``unibus.room.<room_id>.<topic>`` with ``Unibus-Epoch``;
        ``sender=True`` also adds ``Unibus-Sender: <my handle>`` (a claim, see
        :data:`SENDER_HEADER`). Returns once nats-server has processed the
        publish; a publish it refused (permissions violation) raises :class:`BusError`.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        subject = message_subject(room_id, topic)
        epoch, key = await self.current_key(room_id)
        payload = encrypt_message(key, subject, epoch, data)
        headers = {EPOCH_HEADER: format_epoch_header(epoch)}
        if sender:
            headers[SENDER_HEADER] = self.client.identity.handle
        nc = self.nc
        started = time.monotonic()
        try:
            await nc.publish(subject, payload, headers=headers)
            # nats-server answers a forbidden PUB with -ERR before the PONG that
            # follows it, so a refusal has reached error_cb when the barrier returns.
            await _barrier(nc, self.connect_timeout)
        except (TimeoutError, NatsError, OSError) as exc:
            raise BusError(f"cannot publish on {subject}: {exc or type(exc).__name__}") from None
        # nats-py lower-cases -ERR texts; topics may have capitals
        denied = [t for (at, t) in self._publish_denied if at >= started and f'"{subject.lower()}"' in t.lower()]
        if denied:
            raise BusError(f"the bus refused to let {self.client.identity.handle} publish on {subject} "
                           f"(not a member of room {room_id}?): {denied[-1]}")
        return epoch

    def listen(self, room_id: str, *, include_errors: bool = True, grant_wait: float = 2.0) -> RoomListener:
        """Messages of the room, decrypted: ``async for msg in bus.listen(room_id)``.

        Subscribes on ``unibus.room.<room_id>.>`` at the first iteration, or
        explicitly with ``await listener.start()`` / ``async with bus.listen(r) as msgs``
        (so that a send that follows is not missed).
        """
        validate_room_id(room_id)
        return RoomListener(self, room_id, include_errors=include_errors, grant_wait=grant_wait)

    async def decode(self, room_id: str, msg: Any) -> Message:
        """Turn a raw nats-py message into a :class:`Message` (decrypting it)."""
        subject = msg.subject
        headers = msg.headers or {}
        sender = headers.get(SENDER_HEADER)
        try:
            r, topic = parse_message_subject(subject)
        except ValueError as exc:
            return Message(room_id, "", None, None, subject, sender, str(exc))
        try:
            epoch = parse_epoch_header(headers.get(EPOCH_HEADER))
        except MessageError as exc:
            return Message(r, topic, None, None, subject, sender, str(exc))
        try:
            _, key = await self.client.room_key(r, epoch)
        except KeyUnavailable:
            return Message(r, topic, epoch, None, subject, sender,
                           f"no key for epoch {epoch} of room {r}: it was not sealed to you "
                           "(you were not a member of the room at that epoch)")
        except (ApiError, SealError, ServerUnreachable) as exc:
            return Message(r, topic, epoch, None, subject, sender, f"cannot get the key of epoch {epoch}: {exc}")
        try:
            plaintext = decrypt_message(key, subject, epoch, msg.data)
        except MessageError as exc:
            return Message(r, topic, epoch, None, subject, sender, str(exc))
        return Message(r, topic, epoch, plaintext, subject, sender)


_END = object()




async def _barrier(nc: Any, timeout: float) -> None:
    """Return once nats-server has processed everything sent so far on ``nc``.

    One ``flush()`` is not enough with nats-py 2.16: SUB/PUB wait in its
    pending buffer for the flusher task, but the PING of ``flush()`` is written
    to the socket at once, so its PONG can come back before the server has even
    seen the SUB (then a refusal arrives *after* flush returned, and a message
    published right away can be missed). After one round trip the flusher has
    run, so the PING of a second flush follows the SUB/PUB on the wire.
    """
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)


class RoomListener:
    """Async iterator of a room's :class:`Message` s (see :meth:`Bus.listen`)."""

    def __init__(self, bus: Bus, room_id: str, *, include_errors: bool = True, grant_wait: float = 2.0) -> None:
        self.bus = bus
        self.room_id = room_id
        self.grant_wait = grant_wait
        self._refusal: str | None = None
        self._live = False
        self.subject = room_subject(room_id) + ".>"
        self.include_errors = include_errors
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._sub: Any = None
        self._done = False

    async def start(self) -> Self:
        """Subscribe now (idempotent); the subscription is live on the server when this returns.

        A subscription the bus refuses (permissions violation) is tried again
        for up to ``grant_wait`` seconds, since a membership change takes up to
        a second to reach nats-server (SPEC §7); then :class:`BusError`.
        """
        if self._sub is not None or self._done:
            return self
        nc = self.bus.nc

        async def cb(msg: Any) -> None:
            self._queue.put_nowait(msg)

        deadline = time.monotonic() + self.grant_wait
        self.bus._listeners.add(self)
        while True:
            self._refusal = None
            self._live = False
            try:
                self._sub = await nc.subscribe(self.subject, cb=cb)
                await _barrier(nc, self.bus.connect_timeout)
            except (TimeoutError, NatsError, OSError) as exc:
                self.bus._listeners.discard(self)
                raise BusError(f"cannot subscribe to {self.subject}: {exc or type(exc).__name__}") from None
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
                raise item
            message = await self.bus.decode(self.room_id, item)
            if message.error is not None:
                log.warning("room %s: message on %s not decrypted: %s", self.room_id, message.subject, message.error)
                if not self.include_errors:
                    continue
            return message


def members_of(room: Mapping[str, Any]) -> Iterable[str]:
    """Handles of a room record's members."""
    return [m.get("handle") for m in room.get("members") or [] if isinstance(m, Mapping)]
