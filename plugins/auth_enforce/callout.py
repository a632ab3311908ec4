"""The auth callout responder: nats-server asks, membershipd decides (docs/bus-auth.md).

With ``--bus-auth enforce`` nats.conf lists no member at all. A member's
connection makes nats-server publish an authorization request (a JWT it
signed) on ``$SYS.REQ.USER.AUTH`` in the ``UNIBUS`` account; every node's
membershipd subscribes there as the queue group ``unibus-authz``, so any live
node answers for any node. The responder

1. checks the request JWT (signed by the server named in it, not expired);
2. checks the member's proof: its bus key's Ed25519 signature of the server's
   nonce (nats-server does not check it for a key it does not know);
3. looks the bus key up in the :class:`~.policy.Policy`;
4. answers with a user JWT signed by the callout issuer that places the
   connection in ``MEMBERS`` with exactly the member's rooms and inbox, or
   with an error claim (refused at once).

Every grant is remembered for a moment as *in flight* (server id, client id):
until nats-server reports the connection, only the responder knows it
exists, and the enforcer must be able to kick it if the member's rights
shrink meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.signing
import nkeys

from unibus.logthrottle import LogThrottle, left_out_note
from unibus.wire import KeyFormatError, public_key_from_nkey

from . import jwt
from .loginlimit import LOGIN_MAX_DELAY, LoginLimit, Throttled
from .policy import Policy

log = logging.getLogger("unibus.plugins.auth_enforce")

REQUEST_SUBJECT = "$SYS.REQ.USER.AUTH"
QUEUE = "unibus-authz"
MEMBERS_ACCOUNT = "MEMBERS"
#: nats-server's ``authorization.timeout`` with the callout: how long a
#: connecting client waits for an answer. Below nats-py's first-PING window
#: (2 s), past which a slow callout looks like a half-open success to it.
AUTH_TIMEOUT = 1.5
#: Seconds kept between a held answer's time and the earliest moment nats-server may stop
#: waiting for it (:func:`waiting_window`): the loop's lag, the answer's build (up to 6 ms)
#: and its way back.
ANSWER_MARGIN = 0.25
#: How long a grant stays "in flight" if nats-server never reports the connection.
IN_FLIGHT_TTL = AUTH_TIMEOUT + 1.0
#: The most connections one member may hold at once, on all servers together (docs/bus-auth.md,
#: "Limits per member"): one member held 20,000 and nats-server ran out of file descriptors
#: for everyone else (a red team). A member's clients need a handful each.
MEMBER_MAX_CONNECTIONS = 256
#: The most subscriptions one member's connection may hold: one connection made a million in
#: 6 s and nats-server grew by 1.4 GiB (a red team). A listener takes one per room it follows,
#: plus its inbox. The ``MEMBERS`` account's limit enforces it (nats-server ignores the limits
#: of a user JWT that answers a callout, measured with 2.15.1); the JWT says it too.
MEMBER_MAX_SUBSCRIPTIONS = 1024
#: The most rooms a member may be in (docs/bus-auth.md, "Limits per member"): its user JWT
#: lists each room's subject twice, about 120 bytes a room, and the callout's answer must fit
#: in one NATS message (1 MiB): a red team added a member to 8,000 rooms and locked it off the
#: bus for good. A connection could not follow more rooms than its subscriptions anyway.
MEMBER_MAX_ROOMS = 1000


def waiting_window(claims: dict[str, Any]) -> tuple[float, float] | None:
    """``(earliest, latest)``: when nats-server stops waiting for the answer to a request, at
    the earliest and at the latest, from its claims; None without an ``exp``.

    nats-server waits :data:`AUTH_TIMEOUT` from sending the request, and writes that moment in
    ``exp`` cut to whole seconds (``time.Now().Add(authTimeout).Unix()``), as it does the
    request's ``iat``: the wait ends up to a second after ``exp``, and at least
    :data:`AUTH_TIMEOUT` after ``iat``. Read as the end, ``exp`` made a red team's held logins
    (charged, answered up to :data:`~.loginlimit.LOGIN_MAX_DELAY` on) count as expired and go
    unanswered, about a quarter of them, while nats-server still waited."""
    exp, iat = _seconds(claims.get("exp")), _seconds(claims.get("iat"))
    if exp is None:
        return None
    if iat is not None:
        return max(exp, iat + AUTH_TIMEOUT), min(exp, iat + AUTH_TIMEOUT) + 1.0
    return exp, exp + 1.0


def _seconds(value: Any) -> float | None:
    """A JWT time as a finite float, or None (absent, not a number, or too large to be a time)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int past a float's range
        return None
    return seconds if math.isfinite(seconds) else None


@dataclass(frozen=True, slots=True)
class Later:
    """A login the member's budget pays for in ``delay`` seconds: its answer waits until then."""

    delay: float


@dataclass(frozen=True, slots=True)
class Issuer:
    """The callout issuer: an account nkey whose seed signs every user JWT.

    It can mint a user in any account (docs/bus-auth.md), so it is a secret
    like the service seed: 0600 on disk, never logged, never in argv.
    """

    signing_key: nacl.signing.SigningKey = field(repr=False)
    public: str

    @classmethod
    def from_raw(cls, raw32: bytes) -> Issuer:
        signing_key = nacl.signing.SigningKey(raw32)
        seed = nkeys.encode_seed(raw32, nkeys.PREFIX_BYTE_ACCOUNT)
        public = nkeys.from_seed(bytearray(seed)).public_key.decode("ascii")
        return cls(signing_key, public)

    @classmethod
    def from_seed(cls, seed: str) -> Issuer:
        prefix, raw = nkeys.decode_seed(bytearray(seed.encode("ascii")))
        if prefix != nkeys.PREFIX_BYTE_ACCOUNT:
            raise ValueError("the callout issuer must be an account seed (SA...)")
        return cls.from_raw(bytes(raw))


def _b64any(text: str) -> bytes:
    """nats-py sends the nonce signature as standard base64, Go clients as raw base64url."""
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return b""


def holds_key(nkey: str, nonce: str, sig: str) -> bool:
    """Did the connecting client sign the server's nonce with the private half of ``nkey``?"""
    try:
        raw = public_key_from_nkey(nkey)
    except KeyFormatError:
        return False
    signature = _b64any(sig)
    if len(signature) != 64:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + nonce.encode("ascii"), raw)
        return True
    except (nacl.exceptions.CryptoError, ValueError, TypeError, UnicodeEncodeError):
        return False


class Responder:
    """Answers authorization requests from a :class:`Policy` (see the module docstring)."""

    def __init__(self, policy: Policy, issuer: Issuer, *, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.issuer = issuer
        self.clock = clock
        self.sub: Any = None
        self.stats = {"authorized": 0, "refused": 0, "throttled": 0, "expired": 0, "malformed": 0}
        #: the plugin's :class:`~.metrics.BusAuthMetrics` (set by its startup), or None
        self.metrics: Any = None
        #: handle -> [(server_id, cid, answered_at)] granted but maybe not reported yet by nats-server
        self.in_flight: dict[str, list[tuple[str, int, float]]] = {}
        #: handle -> its live connections as nats-server reported them (the enforcer's), or None
        self.live: Callable[[str], int] | None = None
        #: told of the asking server's id and name first (the enforcer's ``saw_server``): a restarted
        #: nats-server's old connections are forgotten before they are counted (a red team: a member
        #: at its bound was locked out after a restart, every reconnect refused)
        self.saw_server: Callable[[str | None, str | None], Any] | None = None
        self.max_connections = MEMBER_MAX_CONNECTIONS
        #: each member's budget of logins: what its grants may cost this event loop (.loginlimit)
        self.login_limit = LoginLimit()
        #: the answers held back by the budget of logins, until they are due (cancelled at stop)
        self._held: set[asyncio.TimerHandle] = set()
        self._holding: set[asyncio.Task[None]] = set()
        self._log_throttle = LogThrottle()  # a login flood must not fill the log (unibus.logthrottle)

    async def start(self, nc: Any) -> None:
        self.sub = await nc.subscribe(REQUEST_SUBJECT, queue=QUEUE, cb=self._on_request)

    async def stop(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass
        for timer in self._held:
            timer.cancel()  # nats-server refuses those logins when its wait for an answer ends
        self._held.clear()
        for task in list(self._holding):
            task.cancel()

    def _count(self, result: str) -> None:
        self.stats[result] += 1
        if self.metrics is not None:
            self.metrics.callouts.labels(result).inc()

    def in_flight_of(self, handle: str) -> list[tuple[str, int, float]]:
        """The grants to ``handle`` still in flight (older ones are forgotten here)."""
        horizon = self.clock() - IN_FLIGHT_TTL
        kept = [e for e in self.in_flight.get(handle, ()) if e[2] >= horizon]
        if kept:
            self.in_flight[handle] = kept
        else:
            self.in_flight.pop(handle, None)
        return kept

    def reported(self, handle: str, server_id: str, cid: int) -> None:
        """nats-server reported this connection: it is no longer only in flight."""
        entries = self.in_flight.get(handle)
        if entries:
            self.in_flight[handle] = [e for e in entries if (e[0], e[1]) != (server_id, cid)]

    async def _on_request(self, msg: Any, *, paid: bool = False) -> None:
        try:
            answer = self.answer(msg.data, paid=paid)
        except Exception:  # noqa: BLE001 - one bad request must not stop the responder
            log.exception("auth callout: answering a request failed")
            return
        if isinstance(answer, Later):
            self._answer_later(msg, answer.delay)
        elif answer is not None and msg.reply:
            await msg.respond(answer)

    def _answer_later(self, msg: Any, delay: float) -> None:
        """Answer ``msg`` in ``delay`` seconds, its login paid for: built then, from the rights the
        member has then. Not awaited here: nats-py hands this subscription's messages over one at a
        time, and every other login would wait."""
        loop = asyncio.get_running_loop()

        def due() -> None:
            self._held.discard(timer)
            if self.sub is None:
                return  # stopped
            task = loop.create_task(self._on_request(msg, paid=True), name="unibus-callout-held")
            self._holding.add(task)
            task.add_done_callback(self._holding.discard)

        timer = loop.call_later(delay, due)
        self._held.add(timer)

    def answer(self, data: bytes, *, paid: bool = False) -> bytes | Later | None:
        """The response JWT for one request, or None when it cannot be answered (expired, malformed),
        or :class:`Later` when the member's budget of logins (:mod:`.loginlimit`) pays for it only in
        a moment: it is charged, and its answer is to be built then with ``paid=True``."""
        now = self.clock()
        try:
            claims = jwt.decode(data, nkeys.PREFIX_BYTE_SERVER)
        except jwt.JWTError as e:
            self._count("malformed")
            log.warning("auth callout: ignored a request that is not a server-signed JWT (%s)", e)
            return None
        body = claims.get("nats") if isinstance(claims.get("nats"), dict) else {}
        server = body.get("server_id") if isinstance(body.get("server_id"), dict) else {}
        server_id, user_nkey = server.get("id"), body.get("user_nkey")
        if server_id != claims.get("iss") or body.get("type") != "authorization_request" \
                or not isinstance(user_nkey, str):
            self._count("malformed")
            log.warning("auth callout: ignored a malformed authorization request")
            return None
        window = waiting_window(claims)
        if window is not None and now >= window[1]:
            self._count("expired")  # the server has refused this client already
            return None
        opts = body.get("connect_opts") if isinstance(body.get("connect_opts"), dict) else {}
        info = body.get("client_info") if isinstance(body.get("client_info"), dict) else {}
        nkey, sig, nonce = opts.get("nkey"), opts.get("sig"), info.get("nonce")
        if not (isinstance(nkey, str) and isinstance(sig, str) and isinstance(nonce, str) and nonce):
            return self._refuse(server_id, user_nkey, now, "a member logs in with its bus key (nkey)")
        # The lookup comes first: a key nobody holds is refused without an Ed25519
        # check, so a flood of logins with random keys costs less (docs/bus-auth.md).
        grant = self.policy.grant(nkey)
        if grant is None:
            return self._refuse(server_id, user_nkey, now, "unknown bus key")
        rooms = len(grant.publish)
        # An answer held for the member's budget must still reach nats-server while it waits.
        within = LOGIN_MAX_DELAY if window is None else max(0.0, min(LOGIN_MAX_DELAY, window[0] - now - ANSWER_MARGIN))
        if not paid:
            try:
                self.login_limit.check(grant.handle, rooms, within=within)
            except Throttled as t:
                return self._throttled(grant.handle, t.wait)
        if not holds_key(nkey, nonce, sig):
            return self._refuse(server_id, user_nkey, now, "the nonce signature does not verify")
        if self.live is not None:
            if self.saw_server is not None:
                self.saw_server(server_id, server.get("name") if isinstance(server.get("name"), str) else None)
            held = self.live(grant.handle) + len(self.in_flight_of(grant.handle))
            if held >= self.max_connections:
                return self._refuse(server_id, user_nkey, now, f"{grant.handle} holds {held} connections, the most "
                                                               f"a member may ({self.max_connections})",
                                    kind=f"bound {grant.handle}")
        # Charged last, once the login would be granted: a refused one costs the member nothing.
        if not paid:
            try:
                delay = self.login_limit.take(grant.handle, rooms, within=within)
            except Throttled as t:  # not after check() above, in the same turn of the loop
                return self._throttled(grant.handle, t.wait)
            if delay > 0:
                return Later(delay)
        publish: dict[str, Any] = {"allow": list(grant.publish)} if grant.publish else {"deny": [">"]}
        user = {
            "iss": self.issuer.public, "sub": user_nkey, "aud": MEMBERS_ACCOUNT, "name": grant.handle,
            "iat": int(now),
            "nats": {"pub": publish, "sub": {"allow": list(grant.subscribe)},
                     "subs": MEMBER_MAX_SUBSCRIPTIONS, "data": -1, "payload": -1, "type": "user", "version": 2},
        }
        response = {
            "iss": self.issuer.public, "sub": user_nkey, "aud": server_id, "iat": int(now),
            "nats": {"jwt": jwt.encode(user, self.issuer.signing_key), "type": "authorization_response",
                     "version": 2},
        }
        cid = info.get("id")
        if isinstance(cid, int):
            # Older grants of this member are forgotten first: one nats-server never
            # registered (answered too late, client gone) is reported by no event.
            self.in_flight_of(grant.handle)
            self.in_flight.setdefault(grant.handle, []).append((server_id, cid, now))
        self._count("authorized")
        return jwt.encode(response, self.issuer.signing_key).encode("ascii")

    def _throttled(self, handle: str, wait: float) -> None:
        """A login past its member's budget (:mod:`.loginlimit`) is not answered at all: nats-server
        refuses it when its wait for an answer ends, 1.5 s on. A refusal at once let a member in a
        loop come back at once: a probe's 32 loops made 600 tries a second, each one an answer to
        sign, and the member's flood became as costly as the one it replaced. Unanswered, each try
        holds the member's connection for the whole wait, and costs membershipd the request's
        check alone. Before the member's proof is checked: nobody else can charge its budget, and
        an impostor naming a throttled member's key is refused either way."""
        self._count("throttled")
        left_out = self._log_throttle.admit(f"often {handle}")
        if left_out is not None:
            log.info("auth callout: did not answer a login of %s, which logs in more often than its rooms allow "
                     "(docs/bus-auth.md, \"Limits per member\"; its budget pays in %.1f s): nats-server refuses it "
                     "when its wait ends%s", handle, wait, left_out_note(left_out))

    def _refuse(self, server_id: str, user_nkey: str, now: float, why: str, kind: str | None = None) -> bytes:
        self._count("refused")
        left_out = self._log_throttle.admit(kind or why)
        if left_out is not None:
            log.info("auth callout: refused a connection: %s%s", why, left_out_note(left_out))
        response = {"iss": self.issuer.public, "sub": user_nkey, "aud": server_id, "iat": int(now),
                    "nats": {"error": why, "type": "authorization_response", "version": 2}}
        return jwt.encode(response, self.issuer.signing_key).encode("ascii")


def parse_event(data: bytes) -> tuple[str, str, int, str, str] | None:
    """``(type, server_id, cid, user, server_name)`` of a ``$SYS.ACCOUNT.MEMBERS.CONNECT/DISCONNECT`` event."""
    try:
        event = json.loads(data)
        server, client = event["server"], event["client"]
        return (str(event.get("type", "")), str(server["id"]), int(client["id"]), str(client.get("user", "")),
                str(server.get("name") or ""))
    except (ValueError, KeyError, TypeError):
        return None
