"""The client's two context-labelled signatures: key packages and room messages.

A member's signing key signs RFC 9421 signature bases (``unibus.signing``) and,
here, exactly two other kinds of bytes, each beginning with its own context
label that ends in a newline (``unibus.memberlog.KEY_PACKAGE_LABEL`` and
``MESSAGE_LABEL``), so that no signature made here can pass for an RFC 9421
one or for the other kind. :func:`sign_labelled` is the only place in the
client that signs anything else than a request; it refuses bytes without one
of the two labels. Formats and rules: docs/formats.md ("Key packages",
"Message signatures"); what a listener checks: docs/client.md.
"""

from __future__ import annotations

import base64
import binascii
import functools
import heapq
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nacl.bindings

from ..memberlog import KEY_PACKAGE_LABEL, MESSAGE_LABEL, key_package_input, message_input
from .keys import Identity
from .sealing import EPOCH_HEADER, MessageError, format_epoch_header, parse_epoch_header
from .seen import SeenIds

__all__ = [
    "MSG_ID_HEADER",
    "SENDER_HEADER",
    "SIG_HEADER",
    "TIME_HEADER",
    "Envelope",
    "ReplayGuard",
    "message_headers",
    "new_msg_id",
    "parse_envelope",
    "sign_key_packages",
    "sign_labelled",
]

SENDER_HEADER = "Unibus-Sender"
TIME_HEADER = "Unibus-Time"
MSG_ID_HEADER = "Unibus-Msg-Id"
SIG_HEADER = "Unibus-Sig"

_LABELS = (KEY_PACKAGE_LABEL, MESSAGE_LABEL)
_MSG_ID_RE = re.compile(r"\A[A-Za-z0-9_-]{21}[AQgw]\Z")  # 16 bytes, base64url, no padding, canonical
_TIME_RE = re.compile(r"\A(?:0|[1-9][0-9]{0,15})\Z")
_SIG_RE = re.compile(r"\A[A-Za-z0-9+/]{85}[AQgw]==\Z")  # 64 bytes, standard base64, canonical
_HANDLE_RE = re.compile(r"\A[a-z][a-z0-9_-]{0,31}\Z")


def sign_labelled(identity: Identity, data: bytes) -> bytes:
    """The Ed25519 signature of ``data`` by ``identity``'s signing key; ``data`` must
    begin with a key-package or message label (nothing else is signed here)."""
    if not isinstance(data, bytes) or not data.startswith(_LABELS):
        raise ValueError("the signing key signs only RFC 9421 bases and context-labelled bytes")
    # libsodium signs these short messages faster than OpenSSL here (docs/benchmarks.md);
    # Ed25519 is deterministic, so the signature is the same either way.
    return nacl.bindings.crypto_sign(data, _expanded(identity.sign_seed))[:64]


@functools.lru_cache(maxsize=16)
def _expanded(seed: bytes) -> bytes:
    """libsodium's 64-byte secret key (seed || public key) of a signing seed."""
    return nacl.bindings.crypto_sign_seed_keypair(seed)[1]


def sign_key_packages(identity: Identity, room_id: str, epoch: int, sealed: Mapping[str, bytes],
                      log_seq: int, log_hash: str) -> dict[str, str]:
    """``{handle: base64 signature}``: the keys POST's ``sigs``, each over that member's key package."""
    return {handle: base64.b64encode(sign_labelled(identity, key_package_input(room_id, epoch, handle, raw,
                                                                                log_seq, log_hash))).decode("ascii")
            for handle, raw in sealed.items()}


def new_msg_id() -> str:
    """16 random bytes, base64url without padding (22 characters)."""
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")


def message_headers(identity: Identity, subject: str, epoch: int, payload: bytes, time_ms: int,
                    msg_id: str | None = None) -> dict[str, str]:
    """The five headers of a signed room message (docs/formats.md, "Message signatures")."""
    msg_id = msg_id or new_msg_id()
    sig = sign_labelled(identity, message_input(subject, epoch, identity.handle, time_ms, msg_id, payload))
    return {EPOCH_HEADER: format_epoch_header(epoch), SENDER_HEADER: identity.handle, TIME_HEADER: str(time_ms),
            MSG_ID_HEADER: msg_id, SIG_HEADER: base64.b64encode(sig).decode("ascii")}


@dataclass(frozen=True, slots=True)
class Envelope:
    """The signed headers of a received message, well-formed but not verified yet."""

    epoch: int
    sender: str
    time_ms: int
    msg_id: str
    sig: bytes

    def signed_bytes(self, subject: str, payload: bytes) -> bytes:
        return message_input(subject, self.epoch, self.sender, self.time_ms, self.msg_id, payload)


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _header_matching(headers: Mapping[str, Any], name: str, pattern: re.Pattern[str], expected: str) -> str:
    """Header ``name``, which must match ``pattern``; else :class:`MessageError` saying what was ``expected``."""
    value = _header(headers, name)
    if value is None or not pattern.match(value):
        raise MessageError(f"missing or invalid {name} header: {expected}")
    return value


def parse_envelope(headers: Mapping[str, Any] | None) -> Envelope:
    """Parse the five headers, each in its one canonical spelling; :class:`MessageError` names the bad one."""
    headers = headers or {}
    epoch = parse_epoch_header(headers.get(EPOCH_HEADER))
    sender = _header_matching(headers, SENDER_HEADER, _HANDLE_RE, "every message is signed by its sender")
    time_text = _header_matching(headers, TIME_HEADER, _TIME_RE, "expected unix milliseconds")
    msg_id = _header_matching(headers, MSG_ID_HEADER, _MSG_ID_RE, "expected 16 bytes in base64url")
    sig_text = _header_matching(headers, SIG_HEADER, _SIG_RE, "expected a 64-byte signature in base64")
    try:
        sig = base64.b64decode(sig_text, validate=True)
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern admits only valid base64
        raise MessageError(f"invalid {SIG_HEADER} header") from None
    return Envelope(epoch, sender, int(time_text), msg_id, sig)


#: Seconds a message may be signed before a listener started and still be taken as sent to it:
#: each member's clock may be off the server's by its ``--auth-skew`` (60 s by default), so two
#: members' by twice that (a review: 30 s refused an honest sender 45 s behind).
LISTENER_START_SLACK = 120


class ReplayGuard:
    """The msg ids accepted in this run, each kept only while its time is inside the window.

    A message whose time is more than ``window_ms`` away from the clock is
    refused anyway, so an id can be forgotten once its own time has left the
    window: memory stays bounded by the messages of about two windows.

    :meth:`start` (a listener's subscription) sets :attr:`not_before_ms`: a
    message signed more than :data:`LISTENER_START_SLACK` seconds (how far two
    members' clocks may differ) before the listener started was published
    before it could hear it, so it is one published again. With ``seen`` (the
    ids earlier runs accepted, beside the replica) it also loads those, and
    adds each id it accepts to them (docs/client.md, "Messages accepted once").
    """

    def __init__(self, window_ms: int, seen: SeenIds | None = None) -> None:
        self.window_ms = int(window_ms)
        self.seen = seen
        #: messages signed before this (unix ms) are refused: see :meth:`start`
        self.not_before_ms: int | None = None
        self._ids: set[str] = set()
        self._heap: list[tuple[int, str]] = []

    def start(self, now_ms: int) -> None:
        """The listener starts hearing the room now: earlier runs' ids loaded, the start noted."""
        if self.seen is not None:  # first: a load that fails leaves the guard unstarted (tried again)
            for time_ms, msg_id in self.seen.load(now_ms):
                if msg_id not in self._ids:
                    self._ids.add(msg_id)
                    heapq.heappush(self._heap, (time_ms, msg_id))
        self.not_before_ms = now_ms - LISTENER_START_SLACK * 1000

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._ids

    def fresh(self, time_ms: int, now_ms: int) -> bool:
        """True when ``time_ms`` is within the window of ``now_ms``."""
        return abs(now_ms - time_ms) <= self.window_ms

    def add(self, msg_id: str, time_ms: int, now_ms: int) -> None:
        self._forget(now_ms)
        self._ids.add(msg_id)
        heapq.heappush(self._heap, (time_ms, msg_id))
        if self.seen is not None:
            self.seen.add(msg_id, time_ms)

    def _forget(self, now_ms: int) -> None:
        horizon = now_ms - self.window_ms
        heap = self._heap
        while heap and heap[0][0] < horizon:
            _, old = heapq.heappop(heap)
            self._ids.discard(old)
