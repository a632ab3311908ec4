"""Sealed room keys and room messages (docs/formats.md), client side.

* A room key is 32 random bytes. It is sealed to each member with HPKE
  (RFC 9180) base mode, single shot, suite = (member's ``enc_suite`` KEM,
  HKDF-SHA256, ChaCha20-Poly1305), ``info = b"unibus/room-key/v1|" + room_id +
  b"|" + str(epoch)``, empty AAD. The sealed value is ``enc || ciphertext``.
* A room message on ``unibus.room.<room_id>.<topic>`` with header
  ``Unibus-Epoch: <n>`` carries ``nonce(12) || ChaCha20-Poly1305(room_key, nonce,
  plaintext, aad = subject + "|" + str(epoch))``.

Byte layouts and sizes: docs/formats.md.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .keys import ENC_SUITES, Identity, KeyFormatError, b64decode_strict, enc_public_key, validate_enc_suite

__all__ = [
    "ROOM_KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "ENC_SIZES",
    "SEALED_SIZES",
    "HPKE_SUITE_IDS",
    "ROOM_KEY_INFO_PREFIX",
    "EPOCH_HEADER",
    "ROOM_ID_RE",
    "SUBJECT_PREFIX",
    "SealError",
    "MessageError",
    "new_room_key",
    "validate_room_id",
    "room_key_info",
    "hpke_suite",
    "seal_room_key",
    "open_room_key",
    "seal_for_members",
    "room_subject",
    "message_subject",
    "parse_message_subject",
    "message_aad",
    "encrypt_message",
    "decrypt_message",
    "format_epoch_header",
    "parse_epoch_header",
]

ROOM_KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
ROOM_KEY_INFO_PREFIX = b"unibus/room-key/v1|"
EPOCH_HEADER = "Unibus-Epoch"
SUBJECT_PREFIX = "unibus.room."

#: Server-made room ids (docs/http-api.md). They cannot contain "|" or ".", so the HPKE
#: info string and the message subject are unambiguous.
ROOM_ID_RE = re.compile(r"\A[a-z0-9]{1,40}\Z")
_TOPIC_TOKEN = r"(?:(?![.*>])[!-~])+"  # printable ASCII, no space, no '.', no wildcards
_TOPIC_RE = re.compile(rf"\A{_TOPIC_TOKEN}(?:\.{_TOPIC_TOKEN})*\Z")
_SUBJECT_RE = re.compile(rf"\Aunibus\.room\.([a-z0-9]{{1,40}})\.({_TOPIC_TOKEN}(?:\.{_TOPIC_TOKEN})*)\Z")
_TOPIC_MAX = 200
_EPOCH_RE = re.compile(r"\A(?:0|[1-9][0-9]{0,17})\Z")

_KEMS = {"X25519": hpke.KEM.X25519, "MLKEM768_X25519": hpke.KEM.MLKEM768_X25519}
#: RFC 9180 / draft-ietf-hpke-pq identifiers of the suites (kem_id, kdf_id, aead_id).
HPKE_SUITE_IDS: dict[str, tuple[int, int, int]] = {
    "X25519": (0x0020, 0x0001, 0x0003),  # DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305
    "MLKEM768_X25519": (0x647A, 0x0001, 0x0003),  # X-Wing (ML-KEM-768 + X25519)
}
# Suite objects are immutable and stateless: build them once.
_SUITES: dict[str, hpke.Suite] = {
    name: hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305) for name, kem in _KEMS.items()
}
#: size of the HPKE encapsulated key ``enc`` per suite (X25519 32; X-Wing 1088 + 32)
ENC_SIZES: dict[str, int] = {name: kem.enc_length() for name, kem in _KEMS.items()}
#: size of a sealed room key: enc || ChaCha20-Poly1305(32-byte key) with its 16-byte tag
SEALED_SIZES: dict[str, int] = {name: n + ROOM_KEY_SIZE + TAG_SIZE for name, n in ENC_SIZES.items()}
assert ENC_SIZES == {"X25519": 32, "MLKEM768_X25519": 1120}, ENC_SIZES
assert set(_SUITES) == set(ENC_SUITES)


class SealError(ValueError):
    """A sealed room key cannot be opened (wrong recipient, room, epoch, or corrupted)."""


class MessageError(ValueError):
    """A room message cannot be decrypted or its envelope is malformed."""


# --------------------------------------------------------------------------- helpers


def new_room_key() -> bytes:
    """32 fresh random bytes."""
    return os.urandom(ROOM_KEY_SIZE)


def validate_room_id(room_id: Any) -> str:
    if not isinstance(room_id, str) or ROOM_ID_RE.match(room_id) is None:
        raise ValueError(f"invalid room id {room_id!r}: expected 1-40 characters of [a-z0-9]")
    return room_id


def _check_epoch(epoch: Any) -> int:
    if type(epoch) is not int or epoch < 0:
        raise ValueError(f"invalid epoch {epoch!r}: expected a non-negative integer")
    return epoch


def _check_room_key(room_key: Any) -> bytes:
    if not isinstance(room_key, (bytes, bytearray, memoryview)) or len(room_key) != ROOM_KEY_SIZE:
        raise ValueError(f"a room key is {ROOM_KEY_SIZE} raw bytes")
    return bytes(room_key)


def hpke_suite(enc_suite: str) -> hpke.Suite:
    """The (cached) ``hpke.Suite`` for a member's ``enc_suite``."""
    return _SUITES[validate_enc_suite(enc_suite)]


# --------------------------------------------------------------------------- sealed room keys


def room_key_info(room_id: str, epoch: int) -> bytes:
    """HPKE ``info`` binding a sealed key to its room and epoch: ``unibus/room-key/v1|<room_id>|<epoch>``."""
    validate_room_id(room_id)
    _check_epoch(epoch)
    return ROOM_KEY_INFO_PREFIX + room_id.encode("ascii") + b"|" + str(epoch).encode("ascii")


def seal_room_key(room_key: bytes, enc_pub: bytes, enc_suite: str, room_id: str, epoch: int) -> bytes:
    """Seal ``room_key`` to the raw public key ``enc_pub`` of ``enc_suite``; return ``enc || ct``.

    Raises :class:`~unibus.client.keys.KeyFormatError` if the public key is not
    valid for the suite, ValueError for a bad room key, room id or epoch.
    """
    suite = hpke_suite(enc_suite)
    key = _check_room_key(room_key)
    info = room_key_info(room_id, epoch)
    pub = enc_public_key(enc_pub, enc_suite, check_low_order=False)
    try:
        return suite.encrypt(key, pub, info=info)
    except ValueError:  # low-order X25519 point: all-zero shared secret
        raise KeyFormatError("enc_pub: X25519 public key is a low-order point (all-zero shared secret)") from None


def open_room_key(sealed: bytes, identity: Identity, room_id: str, epoch: int) -> bytes:
    """Open a sealed room key addressed to ``identity``; raise :class:`SealError` on any failure."""
    info = room_key_info(room_id, epoch)
    suite = hpke_suite(identity.enc_suite)
    if not isinstance(sealed, (bytes, bytearray, memoryview)):
        raise SealError(f"sealed room key must be bytes, got {type(sealed).__name__}")
    expected = SEALED_SIZES[identity.enc_suite]
    if len(sealed) != expected:
        raise SealError(
            f"sealed room key for room {room_id} epoch {epoch} is {len(sealed)} bytes; "
            f"a key sealed to an {identity.enc_suite} key is {expected} bytes"
        )
    try:
        key = suite.decrypt(bytes(sealed), identity.hpke_private_key, info=info)
    except (InvalidTag, ValueError):
        raise SealError(
            f"cannot open the sealed room key for room {room_id} epoch {epoch}: it was not sealed "
            f"to {identity.handle}'s current enc key for this room and epoch, or it is corrupted"
        ) from None
    if len(key) != ROOM_KEY_SIZE:
        raise SealError(f"sealed value for room {room_id} epoch {epoch} does not hold a {ROOM_KEY_SIZE}-byte key")
    return key


def seal_for_members(
    room_key: bytes, members: Iterable[Mapping[str, Any]], room_id: str, epoch: int
) -> dict[str, str]:
    """Seal ``room_key`` to every member record ``{handle, enc_pub (base64), enc_suite?}``.

    Returns ``{handle: base64(sealed)}``, the ``sealed`` object of
    ``POST /v1/rooms/{id}/keys``. A missing ``enc_suite`` means ``X25519``.
    """
    out: dict[str, str] = {}
    for member in members:
        handle = member["handle"]
        suite = member.get("enc_suite") or "X25519"
        validate_enc_suite(suite)
        try:
            raw = b64decode_strict(member["enc_pub"], "enc_pub", None)
            sealed = seal_room_key(room_key, raw, suite, room_id, epoch)
        except KeyFormatError as exc:
            raise KeyFormatError(f"member {handle}: {exc}") from None
        out[handle] = base64.b64encode(sealed).decode("ascii")
    return out


# --------------------------------------------------------------------------- room messages


def room_subject(room_id: str) -> str:
    """``unibus.room.<room_id>``: the room's subject root (messages go to ``<root>.<topic>``)."""
    return SUBJECT_PREFIX + validate_room_id(room_id)


def message_subject(room_id: str, topic: str) -> str:
    """``unibus.room.<room_id>.<topic>``; ``topic`` is one or more dot-separated NATS tokens
    of printable ASCII without ``*`` or ``>`` (at most 200 characters)."""
    base = room_subject(room_id)
    if not isinstance(topic, str) or len(topic) > _TOPIC_MAX or _TOPIC_RE.match(topic) is None:
        raise ValueError(
            f"invalid topic {topic!r}: expected dot-separated tokens of printable ASCII "
            f"(no spaces, '*' or '>'), at most {_TOPIC_MAX} characters"
        )
    return f"{base}.{topic}"


def parse_message_subject(subject: str) -> tuple[str, str]:
    """Split ``unibus.room.<room_id>.<topic>`` into ``(room_id, topic)``; ValueError if it is not one."""
    m = _SUBJECT_RE.match(subject) if isinstance(subject, str) else None
    if m is None or len(m.group(2)) > _TOPIC_MAX:
        raise ValueError(f"not a room message subject: {subject!r} (expected unibus.room.<room_id>.<topic>)")
    return m.group(1), m.group(2)


def message_aad(subject: str, epoch: int) -> bytes:
    """The AEAD associated data of a room message: ``<subject>|<epoch>`` in UTF-8."""
    if not isinstance(subject, str) or not subject:
        raise ValueError("subject must be a non-empty string")
    return f"{subject}|{_check_epoch(epoch)}".encode()


def encrypt_message(room_key: bytes, subject: str, epoch: int, plaintext: bytes) -> bytes:
    """Payload ``nonce(12) || ChaCha20-Poly1305(room_key, nonce, plaintext, aad=subject|epoch)``.

    ``subject`` is the full publish subject ``unibus.room.<room_id>.<topic>``.
    The nonce is random; rekey a room well before 2^32 messages under one key.
    """
    key = _check_room_key(room_key)
    parse_message_subject(subject)
    aad = message_aad(subject, epoch)
    nonce = os.urandom(NONCE_SIZE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, bytes(plaintext), aad)


def decrypt_message(room_key: bytes, subject: str, epoch: int, payload: bytes) -> bytes:
    """Inverse of :func:`encrypt_message`; raise :class:`MessageError` if it does not authenticate."""
    key = _check_room_key(room_key)
    aad = message_aad(subject, epoch)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MessageError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) < NONCE_SIZE + TAG_SIZE:
        raise MessageError(
            f"payload of {len(payload)} bytes is too short: a room message is at least "
            f"{NONCE_SIZE + TAG_SIZE} bytes (nonce 12 + tag 16)"
        )
    payload = bytes(payload)
    try:
        return ChaCha20Poly1305(key).decrypt(payload[:NONCE_SIZE], payload[NONCE_SIZE:], aad)
    except InvalidTag:
        raise MessageError(
            f"message on {subject} (epoch {epoch}) does not authenticate: wrong room key or epoch, "
            "moved to another subject, or tampered with"
        ) from None


def format_epoch_header(epoch: int) -> str:
    """Value of the ``Unibus-Epoch`` header."""
    return str(_check_epoch(epoch))


def parse_epoch_header(value: Any) -> int:
    """Parse a ``Unibus-Epoch`` header value (canonical decimal); raise :class:`MessageError`."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            value = None
    if not isinstance(value, str) or _EPOCH_RE.match(value) is None:
        raise MessageError(f"missing or invalid {EPOCH_HEADER} header {value!r}: expected a decimal epoch")
    return int(value)
