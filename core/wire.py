"""What the client and the server both speak: identifiers, public keys, nkeys.

Everything here is pure and synchronous, and it is the only place the server
and the client share about keys: the server validates what members send with
it, the client builds what it sends with it, and the server never imports
``unibus.client``. Byte layouts: docs/formats.md.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import nacl.bindings
import nkeys
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

__all__ = [
    "ENC_SUITES",
    "DEFAULT_ENC_SUITE",
    "MAX_AUTH_SKEW",
    "AUTH_SKEW_HEADER",
    "SIGN_PUB_SIZE",
    "SIGN_SEED_SIZE",
    "ENC_PUB_SIZES",
    "ENC_KEY_SIZES",
    "MLKEM768_PUB_SIZE",
    "X25519_PUB_SIZE",
    "HANDLE_PATTERN",
    "HANDLE_RE",
    "KeyFormatError",
    "HandleError",
    "b64encode",
    "b64decode_strict",
    "b64_pattern",
    "validate_handle",
    "validate_sign_pub",
    "validate_enc_pub",
    "validate_enc_suite",
    "validate_bus_pub",
    "check_sign_pub",
    "check_enc_pub",
    "enc_public_key",
    "nkey_from_public_key",
    "nkey_from_sign_pub",
    "sign_pub_from_nkey",
    "public_key_from_nkey",
]

# --------------------------------------------------------------------------- constants

#: The largest ``--auth-skew`` a server accepts (seconds), and the bound every
#: client checks the membership log's times against, whatever skew the server
#: reports: a request's ``created`` within this of its entry's ``at``, and never
#: more than twice this older than the largest ``created`` before it. A server
#: cannot widen it, and lowering or raising ``--auth-skew`` later never makes
#: an old entry unverifiable (docs/formats.md, "The membership log").
MAX_AUTH_SKEW = 600

#: The response header of ``GET /v1/log/head`` that gives the server's ``--auth-skew`` in
#: seconds. The body is the head alone, ``{"seq", "hash"}``, the very object a keys POST
#: takes back as its ``log_head`` (docs/http-api.md).
AUTH_SKEW_HEADER = "Unibus-Auth-Skew"

#: The HPKE suites a member's ``enc_suite`` may name (docs/formats.md).
ENC_SUITES: tuple[str, ...] = ("X25519", "MLKEM768_X25519")
DEFAULT_ENC_SUITE = "X25519"

SIGN_PUB_SIZE = 32  #: raw Ed25519 public key
SIGN_SEED_SIZE = 32  #: raw Ed25519 private key (RFC 8032 seed)
X25519_PUB_SIZE = 32
MLKEM768_PUB_SIZE = 1184
#: raw public key size per suite: X25519 32; MLKEM768_X25519 = ML-KEM-768 pub (1184) || X25519 pub (32)
ENC_PUB_SIZES: dict[str, int] = {
    "X25519": X25519_PUB_SIZE,
    "MLKEM768_X25519": MLKEM768_PUB_SIZE + X25519_PUB_SIZE,  # 1216
}
#: raw private key size per suite, as stored in the identity file's ``enc_key``:
#: X25519: the 32-byte X25519 private scalar; MLKEM768_X25519: the 32-byte X-Wing seed
ENC_KEY_SIZES: dict[str, int] = {"X25519": 32, "MLKEM768_X25519": 32}

#: The handle rule (docs/http-api.md), in the portable (JSON Schema / ECMA) spelling.
HANDLE_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
#: Compiled handle rule. Anchored with ``\A``/``\Z`` (not ``$``, which would let
#: a trailing newline through), so ``.match``, ``.search`` and ``.fullmatch`` all agree.
HANDLE_RE = re.compile(r"\A[a-z][a-z0-9_-]{0,31}\Z")


_P25519 = 2**255 - 19


# --------------------------------------------------------------------------- errors


class KeyFormatError(ValueError):
    """A key (or suite name) is malformed; the message says what is wrong and what is expected."""


class HandleError(ValueError):
    """A member handle does not match ``^[a-z][a-z0-9_-]{0,31}$``."""


# --------------------------------------------------------------------------- base64


def b64encode(raw: bytes) -> str:
    """Standard base64 with ``=`` padding (RFC 4648 §4), as used for every key in JSON."""
    return base64.b64encode(bytes(raw)).decode("ascii")


def _b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


def b64_pattern(size: int) -> str:
    """The canonical standard base64 of exactly ``size`` bytes as a JSON Schema
    pattern: what :func:`b64decode_strict` accepts (padding required, the bits
    after the last byte zero), for ``/openapi.json``."""
    groups, rest = divmod(size, 3)
    alphabet = "[A-Za-z0-9+/]"
    tail = {0: "", 1: alphabet + "[AQgw]==", 2: alphabet * 2 + "[AEIMQUYcgkosw048]="}[rest]
    return f"^{alphabet}{{{4 * groups}}}{tail}$" if groups else f"^{tail}$"


def b64decode_strict(value: Any, what: str = "value", size: int | None = None) -> bytes:
    """Decode canonical standard base64 (``A-Z a-z 0-9 + /``, ``=`` padding required).

    Rejects whitespace, URL-safe characters, missing or extra padding and
    non-zero trailing bits (so each byte string has exactly one accepted
    spelling). ``size``, if given, is the required decoded length.
    Raises :class:`KeyFormatError`.
    """
    hint = (
        f"standard base64 with '=' padding of {size} bytes ({_b64_len(size)} characters)"
        if size is not None
        else "standard base64 with '=' padding"
    )
    if not isinstance(value, str):
        raise KeyFormatError(f"{what}: expected a base64 string, got {type(value).__name__}; expected {hint}")
    if not value:
        raise KeyFormatError(f"{what}: empty; expected {hint}")
    if not value.isascii():
        raise KeyFormatError(f"{what}: contains non-ASCII characters; expected {hint}")
    if len(value) % 4:
        raise KeyFormatError(
            f"{what}: invalid base64 (length {len(value)} is not a multiple of 4; padding missing?); expected {hint}"
        )
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"{what}: invalid base64 ({exc}); expected {hint}") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise KeyFormatError(f"{what}: non-canonical base64 (stray bits or padding); expected {hint}")
    if size is not None and len(raw) != size:
        raise KeyFormatError(f"{what}: decodes to {len(raw)} bytes; expected {hint}")
    return raw


# --------------------------------------------------------------------------- handles


def validate_handle(handle: Any) -> str:
    """Return ``handle`` if it matches ``^[a-z][a-z0-9_-]{0,31}$``, else raise :class:`HandleError`."""
    if not isinstance(handle, str):
        raise HandleError(f"handle must be a string, got {type(handle).__name__}")
    if HANDLE_RE.match(handle) is None:
        raise HandleError(
            f"invalid handle {handle!r}: expected 1-32 characters, a lowercase letter first, "
            "then lowercase letters, digits, '_' or '-' (^[a-z][a-z0-9_-]{0,31}$)"
        )
    return handle


# --------------------------------------------------------------------------- public keys


def validate_enc_suite(suite: Any) -> str:
    """Return ``suite`` if it is one of :data:`ENC_SUITES`, else raise :class:`KeyFormatError`."""
    if not isinstance(suite, str) or suite not in ENC_SUITES:
        raise KeyFormatError(f"unknown enc_suite {suite!r}; expected one of {', '.join(ENC_SUITES)}")
    return suite


def check_sign_pub(raw: Any, what: str = "sign_pub") -> bytes:
    """Check raw Ed25519 public key bytes; return them as ``bytes``.

    Accepted: 32 bytes that canonically encode a point of the prime-order
    subgroup other than the identity (every key a real Ed25519 key generator
    makes). Rejected: wrong size, non-canonical encodings, non-points,
    small-order and mixed-order points.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise KeyFormatError(f"{what}: expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) != SIGN_PUB_SIZE:
        raise KeyFormatError(f"{what}: {len(raw)} bytes; an Ed25519 public key is {SIGN_PUB_SIZE} bytes")
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(raw):
        raise KeyFormatError(
            f"{what}: not a valid Ed25519 public key (not a canonical point of the prime-order "
            "subgroup, or a small-order point)"
        )
    return raw


def validate_sign_pub(b64: Any) -> bytes:
    """Decode and check a base64 ``sign_pub`` (raw 32-byte Ed25519 public key)."""
    return check_sign_pub(b64decode_strict(b64, "sign_pub", SIGN_PUB_SIZE))


_X25519_PROBE = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _x25519_pub(raw: bytes, what: str, check_low_order: bool) -> x25519.X25519PublicKey:
    if int.from_bytes(raw, "little") >= _P25519:
        raise KeyFormatError(
            f"{what}: non-canonical X25519 public key (u-coordinate >= 2^255-19 or top bit set); "
            "expected the canonical 32-byte little-endian encoding"
        )
    pub = x25519.X25519PublicKey.from_public_bytes(raw)
    if check_low_order:
        # Every low-order point yields an all-zero shared secret for any (clamped)
        # scalar; OpenSSL refuses it with ValueError. Such a key would make every
        # seal to it fail (or, elsewhere, be contributory-less).
        try:
            _X25519_PROBE.exchange(pub)
        except ValueError:
            raise KeyFormatError(f"{what}: X25519 public key is a low-order point (all-zero shared secret)") from None
    return pub


def enc_public_key(raw: Any, suite: str, what: str = "enc_pub", *, check_low_order: bool = True):
    """Check raw ``enc_pub`` bytes for ``suite`` and return cryptography's HPKE public key object.

    ``X25519`` → ``x25519.X25519PublicKey``; ``MLKEM768_X25519`` →
    ``hpke.MLKEM768X25519PublicKey`` (built from the ML-KEM-768 part, which must
    pass FIPS 203's encapsulation-key check, and the X25519 part, checked as above).
    Raises :class:`KeyFormatError`.
    """
    validate_enc_suite(suite)
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise KeyFormatError(f"{what}: expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    size = ENC_PUB_SIZES[suite]
    if len(raw) != size:
        if suite == "X25519":
            exp = "an X25519 public key is 32 bytes"
        else:
            exp = (
                "an MLKEM768_X25519 public key is 1216 bytes "
                "(ML-KEM-768 public key 1184 bytes || X25519 public key 32 bytes)"
            )
        raise KeyFormatError(f"{what}: {len(raw)} bytes for enc_suite {suite}; {exp}")
    if suite == "X25519":
        return _x25519_pub(raw, what, check_low_order)
    try:
        mpub = mlkem.MLKEM768PublicKey.from_public_bytes(raw[:MLKEM768_PUB_SIZE])
    except ValueError:
        raise KeyFormatError(
            f"{what}: the ML-KEM-768 part (first 1184 bytes) is not a valid ML-KEM-768 "
            "encapsulation key (a coefficient is not reduced mod 3329)"
        ) from None
    xpub = _x25519_pub(raw[MLKEM768_PUB_SIZE:], f"{what} (X25519 part, last 32 bytes)", check_low_order)
    return hpke.MLKEM768X25519PublicKey(mpub, xpub)


def check_enc_pub(raw: Any, suite: str, what: str = "enc_pub") -> bytes:
    """Check raw ``enc_pub`` bytes for ``suite``; return them as ``bytes``."""
    enc_public_key(raw, suite, what)
    return bytes(raw)


def validate_enc_pub(b64: Any, suite: Any) -> bytes:
    """Decode and check a base64 ``enc_pub`` of ``suite``; return the raw bytes."""
    validate_enc_suite(suite)
    raw = b64decode_strict(b64, "enc_pub", ENC_PUB_SIZES[suite])
    return check_enc_pub(raw, suite)


# --------------------------------------------------------------------------- nkeys


def _crc16_xmodem(data: bytes) -> int:
    # CRC-16/XMODEM is CRC-CCITT with initial value 0: binascii does it in C
    # (bus authorization encodes one nkey per member on every reload).
    return binascii.crc_hqx(data, 0)


def nkey_from_public_key(raw32: Any, what: str = "public key") -> str:
    """The NATS user nkey (``U…``) of a raw 32-byte Ed25519 public key.

    ``base32(0xA0 || key || crc16_xmodem(0xA0 || key) as 2 bytes little-endian)``
    without ``=`` padding: 56 characters. Same as ``nkeys.from_seed(seed).public_key``.
    A member's bus key travels in this form (``bus_pub``, docs/formats.md).
    """
    if not isinstance(raw32, (bytes, bytearray, memoryview)) or len(raw32) != SIGN_PUB_SIZE:
        raise KeyFormatError(f"{what}: expected the raw 32-byte Ed25519 public key")
    body = bytes([nkeys.PREFIX_BYTE_USER]) + bytes(raw32)
    body += _crc16_xmodem(body).to_bytes(2, "little")
    return base64.b32encode(body).decode("ascii").rstrip("=")


def nkey_from_sign_pub(raw32: Any) -> str:
    """What a ``sign_pub`` would be as a NATS user nkey.

    Never a login: the server uses it only to refuse a ``bus_pub`` equal to a
    signing key (docs/bus-auth.md#bus-keys).
    """
    return nkey_from_public_key(raw32, "sign_pub")


def public_key_from_nkey(nkey: Any, prefix: int = nkeys.PREFIX_BYTE_USER, what: str = "user nkey") -> bytes:
    """The raw 32-byte Ed25519 key of a public nkey with ``prefix`` (user ``U…`` by default;
    ``nkeys.PREFIX_BYTE_SERVER`` for ``N…``, ``PREFIX_BYTE_ACCOUNT`` for ``A…``).

    Only the canonical spelling is accepted (checksum, prefix, no padding).
    """
    letter = nkey_letter(prefix)
    if not isinstance(nkey, str) or len(nkey) != 56 or not nkey.startswith(letter):
        raise KeyFormatError(f"{what}: expected 56 base32 characters starting with {letter!r}")
    try:
        body = base64.b32decode(nkey)  # 35 bytes = 56 characters, no padding
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{what}: invalid base32") from None
    if len(body) != 35 or body[0] != prefix:
        raise KeyFormatError(f"{what}: not the expected kind of public key")
    if _crc16_xmodem(body[:33]).to_bytes(2, "little") != body[33:]:
        raise KeyFormatError(f"{what}: checksum mismatch")
    if base64.b32encode(body).decode("ascii").rstrip("=") != nkey:
        raise KeyFormatError(f"{what}: non-canonical base32")
    return body[1:33]


def nkey_letter(prefix: int) -> str:
    """The first character of a public nkey of ``prefix`` (``U``, ``A``, ``N``...)."""
    return base64.b32encode(bytes([prefix, 0, 0, 0, 0]))[:1].decode("ascii")


def sign_pub_from_nkey(nkey: Any) -> bytes:
    """Inverse of :func:`nkey_from_sign_pub`: the raw Ed25519 key of a ``U…`` user nkey."""
    return public_key_from_nkey(nkey)


def validate_bus_pub(nkey: Any, what: str = "bus_pub") -> str:
    """Check a bus key as it travels: a NATS *user* public nkey (``U…``, 56 characters).

    The key must be canonical (one spelling per key) and a valid Ed25519 point,
    like a ``sign_pub``. Returns the nkey unchanged; raises :class:`KeyFormatError`.
    """
    try:
        raw = sign_pub_from_nkey(nkey)
    except KeyFormatError as e:
        raise KeyFormatError(f"{what}: {e}; expected a NATS user public key (U..., 56 characters)") from None
    check_sign_pub(raw, what)
    return nkey
