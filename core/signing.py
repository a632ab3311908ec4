"""RFC 9421 HTTP Message Signatures with Ed25519, as unibus uses them.

Pure and framework-free: no aiohttp, no key-value store. Both sides live here.

Client side::

    headers = sign_request("POST", "/v1/rooms", body, keyid="alice", private_key=sk)
    # -> {"Content-Digest": ..., "Signature-Input": ..., "Signature": ...}

Server side::

    path, query = split_path_query(request.raw_path)      # raw, still percent-encoded
    v = verify_request(request.method, path, query, request.headers, body,
                       resolve_key=lookup, now=time.time(), skew=60)
    # then the caller checks (v.keyid, v.nonce) for replay

``Signature-Input`` produced by :func:`sign_request` has the form docs/http-api.md
("Signed requests") gives::

    sig1=("@method" "@path" "@query" "content-digest");created=<unix>;nonce="<n>";keyid="<handle>";alg="ed25519"

The headers are written by the http-message-signatures library
(``HTTPMessageSigner.apply``), which also rebuilds the signature base from the
serialized parameters and refuses to sign if it differs from ours; so every
signature this module makes has been cross-checked against the library.

Verification is a direct implementation: one strict path that parses the
fields with http_sfv (RFC 8941/9651; a repeated dictionary key is refused),
builds the signature base of RFC 9421 §2.5 and checks Ed25519 with libsodium
through PyNaCl; in front of it, a fast path for exactly what
:func:`sign_request` writes, which the tests hold to the same result as the
strict path for every input around it.
Measured here with ``.venv/bin/python tests/core/test_signing.py``: ~87 µs per
verify of a signed POST (of which ~9 µs is parsing and checks, the rest
Ed25519), against ~520 µs through the library's ``HTTPMessageVerifier``
(which also uses the slower cryptography verify); ``check_request`` of a
signed ``GET /v1/me`` with aiohttp's headers takes ~7 µs. The library is the
reference the tests compare against, both ways.

Every rejection raises :class:`SignatureError` whose ``reason`` is a short,
specific, non-secret sentence meant for the ``detail`` of a 401 problem.
Replay checking (``(keyid, nonce)`` seen before) is *not* done here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import http_sfv
import nacl.bindings
import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "ALG",
    "DEFAULT_LABEL",
    "DEFAULT_SKEW",
    "NONCE_RE",
    "PendingSignature",
    "SignatureError",
    "Verified",
    "check_request",
    "content_digest",
    "header_value",
    "make_nonce",
    "parse_content_digest",
    "rejection_kind",
    "sign_request",
    "split_path_query",
    "verify_request",
]

ALG = "ed25519"
DEFAULT_LABEL = "sig1"
#: Default of ``membershipd --auth-skew`` (docs/operations.md), seconds.
DEFAULT_SKEW = 60
#: A nonce is 16-64 characters of ``[A-Za-z0-9_-]`` (docs/http-api.md, "Nonces").
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")

#: Components every signed request must cover (content-digest too when there is a body).
REQUIRED_COMPONENTS = ("@method", "@path", "@query")
#: Derived components this verifier can reproduce. Others (e.g. @authority,
#: which depends on proxies) are refused.
_DERIVED = frozenset(REQUIRED_COMPONENTS)
#: Signature parameters registered by RFC 9421 §6.3; anything else is refused.
_KNOWN_PARAMS = frozenset({"created", "expires", "nonce", "alg", "keyid", "tag"})
_MAX_COMPONENTS = 32
_COMPONENT_NAME_RE = re.compile(r"@?[a-z0-9!#$%&'*+.^_`|~-]{1,64}")

VerifyKeyLike = Ed25519PublicKey | bytes | bytearray | memoryview


class SignatureError(Exception):
    """A request signature was missing or invalid.

    ``reason`` is short, specific and safe to show to the client (it never
    contains key material or echoes attacker-chosen values). ``kind`` is one
    of a few words for it (:func:`rejection_kind`), for counting.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = rejection_kind(reason)


def rejection_kind(reason: str) -> str:
    """The bounded kind of a :class:`SignatureError` reason: ``missing`` (no
    signature headers), ``expired`` (``created``/``expires`` outside the window),
    ``digest`` (Content-Digest), ``bad_signature`` (unknown keyid, or the
    signature does not verify) or ``malformed`` (everything else: a header or
    parameter that does not parse or is refused). unibus.metrics counts them."""
    if reason in ("missing Signature-Input header", "missing Signature header"):
        return "missing"
    if "expired" in reason or "in the future" in reason:
        return "expired"
    if "content-digest" in reason.lower():
        return "digest"
    if reason in ("unknown keyid", "signature verification failed") or "not an Ed25519 public key" in reason:
        return "bad_signature"
    return "malformed"


# Frozen: plugins share it as request[unibus.auth.SIGNATURE_KEY].
@dataclass(frozen=True, slots=True)
class Verified:
    """What a valid signature established.

    ``content_sha256`` is the SHA-256 the signed ``Content-Digest`` names, or
    ``None`` when the signature covers no digest. When :func:`verify_request`
    was given the body bytes it has already been compared; when it was given
    ``body=None`` (a streamed upload) the caller must compare it with the
    hash of what it reads (``hmac.compare_digest``).
    """

    keyid: str
    nonce: str
    created: int
    label: str
    content_sha256: bytes | None = None


# Not frozen, unlike Verified: a frozen dataclass's __init__ costs ~1 µs more
# (a call of object.__setattr__ per field), on every request, for an object
# that only goes from check_request to its caller's verify call.
@dataclass(slots=True)
class PendingSignature:
    """A request whose signature passed every check except the key lookup
    and the Ed25519 verification. Lets an async server look the key up
    itself: ``check_request(...)`` → ``await lookup(p.keyid)`` → ``p.verify(key)``.
    """

    keyid: str
    nonce: str
    created: int
    label: str
    content_sha256: bytes | None
    signature_base: bytes
    signature: bytes
    #: The ``tag`` parameter: the deployment the request was signed for (the
    #: fingerprint of its log's entry 0), or None (docs/http-api.md, "Signed requests").
    tag: str | None = None

    def verify(self, public_key: VerifyKeyLike | Any | None) -> Verified:
        """Verify with ``public_key`` (cryptography ``Ed25519PublicKey``, raw
        32 bytes, or a PyNaCl ``VerifyKey``); ``None`` → "unknown keyid"."""
        if public_key is None:
            raise SignatureError("unknown keyid")
        raw = _raw_public_key(public_key)
        try:
            nacl.bindings.crypto_sign_open(self.signature + self.signature_base, raw)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise SignatureError("signature verification failed") from None
        return Verified(self.keyid, self.nonce, self.created, self.label, self.content_sha256)


# --------------------------------------------------------------------------
# Small helpers


def content_digest(body: bytes) -> str:
    """RFC 9530 ``Content-Digest`` value: ``sha-256=:<standard base64>:``."""
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + ":"


def make_nonce() -> str:
    """32 characters of URL-safe base64 (192 random bits)."""
    return secrets.token_urlsafe(24)


def split_path_query(raw_path_qs: str) -> tuple[str, str]:
    """Split a raw (still percent-encoded) request target into ``(path, query)``.

    ``"/v1/x?a=1"`` → ``("/v1/x", "a=1")``; ``"/v1/x"`` and ``"/v1/x?"`` →
    ``("/v1/x", "")`` (RFC 9421 gives ``@query`` the value ``?`` for both).
    A fragment, if any, is dropped. An empty path becomes ``/``. On the server
    pass aiohttp's ``request.raw_path`` (never the decoded ``request.path``).
    """
    raw_path_qs = raw_path_qs.partition("#")[0]
    path, _, query = raw_path_qs.partition("?")
    return (path or "/"), query


def parse_content_digest(value: str) -> bytes:
    """The SHA-256 digest named by a ``Content-Digest`` field value.

    Other algorithms in the field are ignored (RFC 9530 §2); sha-256 is required.
    Raises :class:`SignatureError` when malformed or without sha-256.
    """
    m = _FAST_DIGEST.fullmatch(value)
    if m is not None:
        return base64.b64decode(m.group(1))
    try:
        members = _parse_dictionary(value)
    except _SFError:
        raise SignatureError("malformed Content-Digest header") from None
    found = getattr(members.get("sha-256"), "value", None)
    if "sha-256" in members and (type(found) is not bytes or len(found) != 32):
        raise SignatureError("malformed Content-Digest header: sha-256 must be 32 bytes")
    if found is None:
        raise SignatureError("Content-Digest must include sha-256")
    return found


# --------------------------------------------------------------------------
# Signing (client side)


class _Message:
    """The minimal request view http-message-signatures needs."""

    __slots__ = ("method", "url", "headers")

    def __init__(self, method: str, url: str, headers: dict[str, str]) -> None:
        self.method = method
        self.url = url
        self.headers = headers


_signer = None


def _library_signer():
    global _signer
    if _signer is None:
        from http_message_signatures import HTTPMessageSigner, algorithms

        _signer = HTTPMessageSigner(signature_algorithm=algorithms.ED25519)
    return _signer


def sign_request(
    method: str,
    path_and_query: str,
    body: bytes | None,
    *,
    keyid: str,
    private_key: Ed25519PrivateKey,
    created: int | None = None,
    nonce: str | None = None,
    label: str = DEFAULT_LABEL,
    content_sha256: bytes | None = None,
    tag: str | None = None,
) -> dict[str, str]:
    """Sign a request; return the headers to add to it.

    ``path_and_query`` is the exact, percent-encoded target as it will go on
    the wire (``"/v1/rooms/abc/keys/me?epoch=3"``); with aiohttp pass the URL
    as ``yarl.URL(..., encoded=True)`` so that it is not re-encoded. When
    ``body`` is not ``None`` (even ``b""``), ``Content-Digest`` is returned and
    covered. A streamed body is signed by its SHA-256 instead: pass
    ``body=None`` and ``content_sha256``. ``created`` defaults to now,
    ``nonce`` to 32 random URL-safe chars. ``tag`` binds the request to one
    deployment (the fingerprint of its log's entry 0): a server with another
    one refuses it. Raises ``ValueError`` for arguments that cannot be signed.
    """
    from http_message_signatures import HTTPMessageSignaturesException, PreparedSignature

    method = method.upper()  # aiohttp's client upper-cases the method it sends
    path, query, created, nonce = _signing_target(path_and_query, private_key, created, nonce)
    headers, components = _digest_header(body, content_sha256)
    if not isinstance(keyid, str) or not keyid:
        raise ValueError("keyid must be a non-empty string")
    params: list[tuple[str, Any]] = [("created", int(created)), ("nonce", nonce), ("keyid", keyid), ("alg", ALG)]
    if tag is not None:
        params.append(("tag", tag))
    values = {"@method": method, "@path": path, "@query": "?" + query, "content-digest": headers.get("Content-Digest")}
    try:
        sig_params = _signature_params(components, params)
        base = _signature_base([(c, values[c]) for c in components], sig_params)
    except _BaseError as e:
        raise ValueError(f"cannot sign this request: {e}") from None
    signature = private_key.sign(base)

    # The library writes the two headers, after rebuilding the signature base
    # from sig_params itself and checking it is byte-for-byte ours.
    message = _Message(method, "https://unibus.invalid" + path + ("?" + query if query else ""), headers)
    prepared = PreparedSignature(signature_base=base, signature_params=sig_params, label=label, algorithm_id=ALG)
    try:
        _library_signer().apply(message, prepared, signature)
    except HTTPMessageSignaturesException as e:
        raise ValueError(f"cannot sign this request: {e}") from e
    return headers


def _signing_target(path_and_query: str, private_key: Any, created: int | None,
                    nonce: str | None) -> tuple[str, str, int, str]:
    """:func:`sign_request`'s checks of the key and the target; ``(path, query, created, nonce)``
    with the defaults filled in."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValueError("private_key must be a cryptography Ed25519PrivateKey")
    if not path_and_query.startswith("/"):
        raise ValueError("path_and_query must start with '/'")
    path, query = split_path_query(path_and_query)
    if created is None:
        created = int(time.time())
    if nonce is None:
        nonce = make_nonce()
    elif not NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 16-64 characters of [A-Za-z0-9_-]")
    return path, query, created, nonce


def _digest_header(body: bytes | None, content_sha256: bytes | None) -> tuple[dict[str, str], list[str]]:
    """The ``Content-Digest`` header to send (none without a body) and the components to cover."""
    headers: dict[str, str] = {}
    components = list(REQUIRED_COMPONENTS)
    if content_sha256 is not None:
        if body is not None or len(content_sha256) != 32:
            raise ValueError("content_sha256 is the 32-byte SHA-256 of a streamed body (and body is None)")
        headers["Content-Digest"] = "sha-256=:" + base64.b64encode(content_sha256).decode("ascii") + ":"
        components.append("content-digest")
    elif body is not None:
        headers["Content-Digest"] = content_digest(bytes(body))
        components.append("content-digest")
    return headers, components


# --------------------------------------------------------------------------
# Verification (server side)


def check_request(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    now: float | None = None,
    skew: float = DEFAULT_SKEW,
) -> PendingSignature:
    """Every check of :func:`verify_request` except the key lookup and the
    Ed25519 verification (done by :meth:`PendingSignature.verify`).

    ``path`` is the raw path, ``query`` the raw query string without ``?``
    (``""`` when none). ``headers`` is any case-insensitive mapping (aiohttp
    ``CIMultiDictProxy``) or a plain dict. ``body`` is the body bytes, or
    ``None`` when it is streamed and not read yet: then a body is assumed when
    ``Content-Length`` > 0 or ``Transfer-Encoding`` is present, its digest's
    format is checked here and the caller compares ``content_sha256`` at the end.
    """
    if now is None:
        now = time.time()

    # 1. The two headers, each one Dictionary with exactly one member.
    raw_input = _get_header(headers, "signature-input")
    if raw_input is None:
        raise SignatureError("missing Signature-Input header")
    raw_sig = _get_header(headers, "signature")
    if raw_sig is None:
        raise SignatureError("missing Signature header")

    # Fast path: the two headers exactly as sign_request writes them. The
    # regexes have already decided every check of the general path below but
    # the time window, the body and Content-Digest ones, which are done here
    # in the same order and with the same reasons (tested against
    # _check_general); anything else, even valid, goes the general way.
    m = _CANONICAL_INPUT.fullmatch(raw_input)
    if m is not None:
        s = _FAST_SIGNATURE.fullmatch(raw_sig)
        if s is not None and s.group(1) == m.group(1):
            label, sig_params_text, digest_covered, created_text, nonce, keyid, tag = m.groups()
            created = int(created_text)
            _check_window(created, now, skew)
            digest: bytes | None = None
            raw_digest: str | None = None
            if digest_covered is None:
                if _has_body(headers, body):
                    raise SignatureError("signature does not cover content-digest")
            else:
                digest, raw_digest = _check_digest(headers, body)
            try:
                base = _canonical_signature_base(method, path or "/", "?" + query, raw_digest, sig_params_text)
            except _BaseError as e:
                raise SignatureError(str(e)) from None
            # The regex admits exactly the canonical base64 of 64 bytes.
            signature = binascii.a2b_base64(s.group(2))
            return PendingSignature(keyid, nonce, created, label, digest, base, signature, tag)

    return _check_general(method, path, query, headers, body, raw_input, raw_sig, now, skew)


def _check_general(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes | None,
    raw_input: str,
    raw_sig: str,
    now: float,
    skew: float,
) -> PendingSignature:
    """:func:`check_request` for any ``Signature-Input``/``Signature`` values
    (``raw_input``/``raw_sig``, as :func:`_get_header` combines them): the one
    strict path, parsing through http_sfv."""
    label, member, signature = _one_signature(raw_input, raw_sig)
    params = dict(member.params)
    keyid, created, nonce = _check_params(params, now, skew)
    names = _covered_names(member, _has_body(headers, body))
    digest, raw_digest = _check_digest(headers, body) if "content-digest" in names else (None, None)
    lines: list[tuple[str, str]] = []
    for name in names:  # the signature base (RFC 9421 §2.5)
        if name in _DERIVED:
            lines.append((name, {"@method": method, "@path": path or "/", "@query": "?" + query}[name]))
        elif name == "content-digest":
            lines.append((name, raw_digest))  # type: ignore[arg-type]
        else:
            value = _get_header(headers, name)
            if value is None:
                raise SignatureError(f"covered header {name} is missing")
            lines.append((name, value))
    try:
        base = _signature_base(lines, str(member))
    except _BaseError as e:
        raise SignatureError(str(e)) from None
    return PendingSignature(keyid, nonce, created, label, digest, base, signature, params.get("tag"))


def _one_signature(raw_input: str, raw_sig: str) -> tuple[str, Any, bytes]:
    """The label, the covered-components inner list and the signature of the one signature."""
    try:
        inputs = _parse_dictionary(raw_input)
    except _SFError as e:
        raise SignatureError(f"malformed Signature-Input header{e}") from None
    m = _FAST_SIGNATURE.fullmatch(raw_sig)
    if m is not None:
        sigs: dict[str, Any] = {m.group(1): base64.b64decode(m.group(2))}
    else:
        try:
            sigs = {k: getattr(v, "value", v) for k, v in _parse_dictionary(raw_sig).items()}
        except _SFError as e:
            raise SignatureError(f"malformed Signature header{e}") from None
    if len(inputs) != 1 or len(sigs) != 1:
        raise SignatureError(f"expected exactly one signature, found {max(len(inputs), len(sigs))}")
    ((label, member),) = inputs.items()
    ((sig_label, signature),) = sigs.items()
    if label != sig_label:
        raise SignatureError("Signature and Signature-Input labels differ")
    if not isinstance(member, http_sfv.InnerList):
        raise SignatureError("malformed Signature-Input header: expected an inner list")
    if type(signature) is not bytes:
        raise SignatureError("malformed Signature header: expected a byte sequence")
    if len(signature) != 64:
        raise SignatureError("malformed Signature header: an ed25519 signature is 64 bytes")
    return label, member, signature


def _check_params(params: dict[str, Any], now: float, skew: float) -> tuple[str, int, str]:
    """keyid, created and nonce, once every signature parameter passed its check."""
    for name in params:
        if name not in _KNOWN_PARAMS:
            raise SignatureError("unexpected signature parameter")
    alg = params.get("alg")
    if alg is not None and (type(alg) is not str or alg != ALG):
        raise SignatureError("unsupported alg (expected ed25519)")
    keyid = params.get("keyid")
    if keyid is None:
        raise SignatureError("missing keyid parameter")
    if type(keyid) is not str or not keyid:
        raise SignatureError("keyid must be a non-empty string")
    if "tag" in params and type(params["tag"]) is not str:
        raise SignatureError("tag must be a string")
    created = params.get("created")
    if created is None:
        raise SignatureError("missing created parameter")
    if type(created) is not int:
        raise SignatureError("created must be an integer")
    _check_window(created, now, skew)
    if "expires" in params:
        expires = params["expires"]
        if type(expires) is not int:
            raise SignatureError("expires must be an integer")
        if expires < now - skew:
            raise SignatureError("signature expired (expires is past)")
    nonce = params.get("nonce")
    if nonce is None:
        raise SignatureError("missing nonce parameter")
    if type(nonce) is not str or not NONCE_RE.fullmatch(nonce):
        raise SignatureError("nonce must be 16-64 characters of [A-Za-z0-9_-]")
    return keyid, created, nonce


def _check_window(created: int, now: float, skew: float) -> None:
    if created > now + skew:
        raise SignatureError("created is in the future")
    if created < now - skew:
        raise SignatureError("signature expired (created is too old)")


def _covered_names(member: Any, has_body: bool) -> list[str]:
    """The covered component names, each allowed, none repeated, the required ones there."""
    if len(member) > _MAX_COMPONENTS:
        raise SignatureError("too many covered components")
    names: list[str] = []
    for item in member:
        value = item.value
        if type(value) is not str or not _COMPONENT_NAME_RE.fullmatch(value):
            raise SignatureError("malformed Signature-Input header: bad component identifier")
        if item.params:
            raise SignatureError("component parameters are not supported")
        if value in names:
            raise SignatureError("malformed Signature-Input header: repeated component")
        if value[0] == "@" and value not in _DERIVED:
            raise SignatureError("unsupported derived component (use @method, @path, @query)")
        names.append(value)
    missing = [c for c in REQUIRED_COMPONENTS if c not in names]
    if has_body and "content-digest" not in names:
        missing.append("content-digest")
    if missing:
        raise SignatureError("signature does not cover " + ", ".join(missing))
    return names


def _check_digest(headers: Any, body: bytes | None) -> tuple[bytes, str]:
    """A covered Content-Digest: present, well formed, and the body's when the body is here."""
    raw_digest = _get_header(headers, "content-digest")
    if raw_digest is None:
        raise SignatureError("missing Content-Digest header")
    digest = parse_content_digest(raw_digest)
    if body is not None and not hmac.compare_digest(digest, hashlib.sha256(body).digest()):
        raise SignatureError("Content-Digest does not match the body")
    return digest, raw_digest


def verify_request(method: str, path: str, query: str, headers: Mapping[str, str], body: bytes | None, *,
                   resolve_key: Callable[[str], VerifyKeyLike | None], now: float | None = None,
                   skew: float = DEFAULT_SKEW) -> Verified:
    """Verify the one RFC 9421 signature of a request; raise :class:`SignatureError`.

    Arguments as for :func:`check_request`; ``resolve_key(keyid)`` returns a
    cryptography ``Ed25519PublicKey`` or the raw 32-byte key, or ``None`` for
    an unknown keyid. ``now`` defaults to ``time.time()``, ``skew`` (seconds,
    ``--auth-skew``) to 60. Replay checking is left to the caller.
    """
    pending = check_request(method, path, query, headers, body, now=now, skew=skew)
    return pending.verify(resolve_key(pending.keyid))


# --------------------------------------------------------------------------
# Internals: headers, body presence, keys


def header_value(headers: Any, name: str) -> str | None:
    """The value of header ``name`` exactly as the verifier reads it (see :func:`_get_header`).

    The membership log records the signature headers with it (docs/formats.md,
    "The membership log"), so a replay checks the very bytes the server checked.
    """
    return _get_header(headers, name.lower())


def _get_header(headers: Any, name: str) -> str | None:
    """Combined value of every field line named ``name`` (lowercase), or None.

    Lines are trimmed and joined with ", " (RFC 9421 §2.1)."""
    getall = getattr(headers, "getall", None)  # multidict
    if getall is not None:
        values = getall(name, None)
    else:
        get_all = getattr(headers, "get_all", None)  # email.message / http.client
        if get_all is not None:
            values = get_all(name)
        else:
            values = [v for k, v in headers.items() if k.lower() == name]
    if not values:
        return None
    if len(values) == 1:
        return values[0].strip(" \t")
    return ", ".join(v.strip(" \t") for v in values)


def _has_body(headers: Any, body: bytes | None) -> bool:
    if body:
        return True
    cl = _get_header(headers, "content-length")
    if cl is not None:
        try:
            if int(cl) > 0:
                return True
        except ValueError:
            return True  # unparseable: be conservative
    if body is None and _get_header(headers, "transfer-encoding") is not None:
        return True
    return False


def _raw_public_key(key: Any) -> bytes:
    # Raw bytes (what membershipd's member directory holds) are tested first, then a
    # PyNaCl VerifyKey: isinstance against cryptography's abstract key class is slower.
    if type(key) is bytes and len(key) == 32:
        return key
    if isinstance(key, nacl.signing.VerifyKey):
        raw = bytes(key)
    elif isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
    elif isinstance(key, Ed25519PublicKey):
        raw = key.public_bytes_raw()
    else:
        raise SignatureError("the key for this keyid is not an Ed25519 public key")
    if len(raw) != 32:
        raise SignatureError("the key for this keyid is not an Ed25519 public key")
    return raw


# --------------------------------------------------------------------------
# Internals: signature base (RFC 9421 §2.3, §2.5)


class _BaseError(Exception):
    pass


def _signature_base(lines: list[tuple[str, str]], sig_params: str) -> bytes:
    parts = []
    for name, value in lines:
        if "\n" in value or "\r" in value:
            raise _BaseError(f"component {name} contains a newline")
        parts.append('"' + name + '": ' + value + "\n")
    parts.append('"@signature-params": ' + sig_params)
    text = "".join(parts)
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise _BaseError("signature base must be ASCII") from None


def _canonical_signature_base(method: str, path: str, query: str, raw_digest: str | None, sig_params: str) -> bytes:
    """:func:`_signature_base` for the components sign_request covers
    (``@method``, ``@path``, ``@query``, and ``content-digest`` unless
    ``raw_digest`` is None), ``sig_params`` being known free of line breaks."""
    digest_line = "" if raw_digest is None else f'"content-digest": {raw_digest}\n'
    text = f'"@method": {method}\n"@path": {path}\n"@query": {query}\n{digest_line}"@signature-params": {sig_params}'
    if text.count("\n") != (3 if raw_digest is None else 4) or "\r" in text:
        # A value holds a line break: let the general code say which one.
        lines = [("@method", method), ("@path", path), ("@query", query)]
        if raw_digest is not None:
            lines.append(("content-digest", raw_digest))
        return _signature_base(lines, sig_params)
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise _BaseError("signature base must be ASCII") from None


# --------------------------------------------------------------------------
# Internals: Structured Fields (RFC 8941/9651) through http_sfv, plus the fast
# paths for exactly what a unibus client writes.


class _SFError(ValueError):
    pass


class _StrictDictionary(http_sfv.Dictionary):
    """An RFC 8941 Dictionary in which a repeated key is an error.

    RFC 8941 lets a later member overwrite an earlier one of the same name;
    here two members named alike are refused, so that two signatures can never
    collapse into one."""

    repeated = False

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self.data:
            self.repeated = True
            raise ValueError("repeated dictionary key")
        super().__setitem__(key, value)


#: The longest Signature-Input, Signature or Content-Digest value parsed. http_sfv copies
#: the rest of the value for every member it parses, so its time grows with the square of
#: the length: one unauthenticated request of 120 header lines (about 1 MB, joined) held
#: the event loop for 11 s (red team), and at 8,192 characters one request still cost about
#: 8 ms. The longest Signature-Input a signer can need, 32 components of at most 64
#: characters and the parameters, is about 2,600 characters.
MAX_SF_FIELD = 4096


def _parse_dictionary(raw: str) -> http_sfv.Dictionary:
    """Parse a Dictionary field value; raise :class:`_SFError` when it is not
    one (its message says so when the only fault is a repeated key), or when it is
    longer than :data:`MAX_SF_FIELD` characters (refused before any parsing)."""
    if len(raw) > MAX_SF_FIELD:
        raise _SFError(f": longer than {MAX_SF_FIELD} characters")
    d = _StrictDictionary()
    try:
        d.parse(raw.encode("ascii"))
    except (UnicodeEncodeError, ValueError):
        raise _SFError(": a label appears twice" if d.repeated else "") from None
    return d


def _signature_params(components, params) -> str:
    """Serialization of the covered-components inner list with its parameters
    (RFC 9421 §2.3), the value of ``@signature-params``."""
    inner = http_sfv.InnerList(list(components))
    for name, value in params:
        inner.params[name] = value
    try:
        return str(inner)
    except ValueError:
        raise _BaseError("signature parameters must be printable ASCII") from None


#: Exactly the Signature-Input sign_request writes (docs/http-api.md,
#: "Signed requests"): label, the serialized signature parameters (the value of
#: @signature-params), whether content-digest is covered, created, nonce (as
#: NONCE_RE), keyid (non-empty). Every value is canonical, so the text is its own
#: re-serialization.
_CANONICAL_INPUT = re.compile(
    r'([a-z*][a-z0-9_.*-]{0,63})='
    r'(\("@method" "@path" "@query"( "content-digest")?\)'
    r';created=(0|[1-9][0-9]{0,14});nonce="([A-Za-z0-9_-]{16,64})";keyid="([A-Za-z0-9_.-]{1,128})";alg="ed25519"(?:;tag="([0-9a-f]{64})")?)'
)
_FAST_SIGNATURE = re.compile(r"([a-z*][a-z0-9_.*-]{0,63})=:([A-Za-z0-9+/]{85}[AQgw]==):")
_FAST_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=):")
