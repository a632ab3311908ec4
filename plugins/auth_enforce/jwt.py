"""NATS JWTs for the auth callout, encoded and verified by hand (docs/bus-auth.md#jwts).

A NATS JWT is ``b64url(header) "." b64url(claims) "." b64url(ed25519 signature)``
(base64url without padding) with the header ``{"typ":"JWT","alg":"ed25519-nkey"}``;
the signature covers ``b64url(header) "." b64url(claims)`` and is made by the
key named in the ``iss`` claim (an nkey). Why not the ``nats-jwt`` package:
version 0.2.2 has no authorization request/response claims, and its decoder
accepted an all-zero signature, a payload edited after signing and a
self-signed forgery (measured; docs/bus-auth.md gives the details). These
forty lines are what membershipd needs, and every claim is explicit.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.signing

from unibus.wire import KeyFormatError, public_key_from_nkey

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_HEADER_B64 = base64.urlsafe_b64encode(json.dumps(HEADER, separators=(",", ":")).encode()).rstrip(b"=")


class JWTError(ValueError):
    """A JWT that is malformed or whose signature does not verify."""


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _unb64url(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode("ascii")
    try:
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JWTError("not base64url") from None


def encode(claims: dict[str, Any], signer: nacl.signing.SigningKey) -> str:
    """Sign ``claims`` (whose ``iss`` must be ``signer``'s public nkey) into a JWT."""
    if "jti" not in claims:
        claims = {**claims, "jti": secrets.token_hex(16)}
    body = _HEADER_B64 + b"." + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    return (body + b"." + _b64url(signer.sign(body).signature)).decode("ascii")


def decode(token: str | bytes, issuer_prefix: int) -> dict[str, Any]:
    """The claims of ``token`` after checking its signature by its ``iss`` (an nkey of ``issuer_prefix``).

    Raises :class:`JWTError`. Expiry and audience are the caller's to check.
    """
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise JWTError("not ASCII") from None
    parts = token.split(".")
    if len(parts) != 3:
        raise JWTError("a JWT has three parts")
    try:
        header = json.loads(_unb64url(parts[0]))
        claims = json.loads(_unb64url(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise JWTError("header or claims are not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "ed25519-nkey" or not isinstance(claims, dict):
        raise JWTError("not an ed25519-nkey JWT")
    try:
        key = public_key_from_nkey(claims.get("iss"), issuer_prefix, "iss")
    except KeyFormatError as e:
        raise JWTError(str(e)) from None
    signature = _unb64url(parts[2])
    signed = (parts[0] + "." + parts[1]).encode("ascii")
    try:
        nacl.bindings.crypto_sign_open(signature + signed, key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise JWTError("the signature does not verify") from None
    return claims
