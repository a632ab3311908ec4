"""Key material of a unibus member: validation, encodings and the identity file.

A member has two key pairs:

* an **Ed25519 signing key** — signs every control-plane request (RFC 9421) and,
  encoded as a NATS *user nkey*, is the member's bus credential (the bus nkey
  seed is the same 32-byte Ed25519 seed);
* an **HPKE encryption key** of suite ``X25519`` (default) or
  ``MLKEM768_X25519`` (X-Wing, ML-KEM-768 + X25519) — room keys are sealed to it.

Public keys travel as standard base64 (with ``=`` padding) of their raw bytes;
see docs/formats.md for the byte layouts. Everything here is synchronous and
has no network or server dependency.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

# Validation and encodings shared with the server live in unibus.wire; they
# are re-exported here for the SDK's users.
from ..wire import (
    DEFAULT_ENC_SUITE,
    ENC_KEY_SIZES,
    ENC_PUB_SIZES,
    ENC_SUITES,
    HANDLE_PATTERN,
    HANDLE_RE,
    MLKEM768_PUB_SIZE,
    SIGN_PUB_SIZE,
    SIGN_SEED_SIZE,
    X25519_PUB_SIZE,
    HandleError,
    KeyFormatError,
    b64decode_strict,
    b64encode,
    check_enc_pub,
    check_sign_pub,
    enc_public_key,
    nkey_from_sign_pub,
    sign_pub_from_nkey,
    validate_bus_pub,
    validate_enc_pub,
    validate_enc_suite,
    validate_handle,
    validate_sign_pub,
)

__all__ = [
    "ENC_SUITES",
    "DEFAULT_ENC_SUITE",
    "SIGN_PUB_SIZE",
    "SIGN_SEED_SIZE",
    "ENC_PUB_SIZES",
    "ENC_KEY_SIZES",
    "MLKEM768_PUB_SIZE",
    "X25519_PUB_SIZE",
    "HANDLE_PATTERN",
    "HANDLE_RE",
    "IDENTITY_VERSION",
    "KeyFormatError",
    "HandleError",
    "IdentityError",
    "Identity",
    "b64encode",
    "b64decode_strict",
    "validate_handle",
    "validate_sign_pub",
    "validate_enc_pub",
    "validate_enc_suite",
    "validate_bus_pub",
    "check_sign_pub",
    "check_enc_pub",
    "enc_public_key",
    "nkey_from_sign_pub",
    "sign_pub_from_nkey",
    "generate_identity",
    "identity_from_json",
    "identity_to_json",
    "save_identity",
    "load_identity",
]

IDENTITY_VERSION = 1
_IDENTITY_MAX_BYTES = 64 * 1024


class IdentityError(Exception):
    """An identity file is missing, unreadable, too open, or malformed."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


# --------------------------------------------------------------------------- private keys


def _hpke_private_key(suite: str, enc_key: bytes):
    """(HPKE private key object, raw public key) from the stored private form."""
    if suite == "X25519":
        sk = x25519.X25519PrivateKey.from_private_bytes(enc_key)
        return sk, sk.public_key().public_bytes_raw()
    # X-Wing (draft-connolly-cfrg-xwing-kem): the private key is a 32-byte seed,
    # expanded with SHAKE256 to 96 bytes = ML-KEM-768 seed d||z (64) || X25519 scalar (32).
    expanded = hashlib.shake_256(enc_key).digest(96)
    msk = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    xsk = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
    pub = msk.public_key().public_bytes_raw() + xsk.public_key().public_bytes_raw()
    return hpke.MLKEM768X25519PrivateKey(msk, xsk), pub


@dataclass(frozen=True, eq=False)
class Identity:
    """A member's private key material.

    ``sign_key`` is the Ed25519 private key; ``enc_key`` the raw private form of
    the HPKE key of ``enc_suite`` (X25519: the 32-byte scalar; MLKEM768_X25519:
    the 32-byte X-Wing seed). Public keys and the HPKE key object are derived.
    The repr never shows private material.
    """

    handle: str
    sign_key: ed25519.Ed25519PrivateKey = field(repr=False)
    enc_suite: str
    enc_key: bytes = field(repr=False)
    sign_pub: bytes = field(init=False, repr=False)
    enc_pub: bytes = field(init=False, repr=False)
    hpke_private_key: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        validate_handle(self.handle)
        validate_enc_suite(self.enc_suite)
        if not isinstance(self.sign_key, ed25519.Ed25519PrivateKey):
            raise TypeError("sign_key must be an Ed25519PrivateKey")
        if not isinstance(self.enc_key, (bytes, bytearray)) or len(self.enc_key) != ENC_KEY_SIZES[self.enc_suite]:
            raise KeyFormatError(
                f"enc_key: expected {ENC_KEY_SIZES[self.enc_suite]} raw bytes for enc_suite {self.enc_suite}"
            )
        object.__setattr__(self, "enc_key", bytes(self.enc_key))
        sk, pub = _hpke_private_key(self.enc_suite, self.enc_key)
        object.__setattr__(self, "hpke_private_key", sk)
        object.__setattr__(self, "enc_pub", pub)
        object.__setattr__(self, "sign_pub", self.sign_key.public_key().public_bytes_raw())

    # -- derived encodings
    @property
    def sign_seed(self) -> bytes:
        """The raw 32-byte Ed25519 private key (RFC 8032 seed)."""
        return self.sign_key.private_bytes_raw()

    @property
    def sign_pub_b64(self) -> str:
        return b64encode(self.sign_pub)

    @property
    def enc_pub_b64(self) -> str:
        return b64encode(self.enc_pub)

    @property
    def user_nkey(self) -> str:
        """The member's NATS user nkey (``U…``), derived from ``sign_pub``."""
        return nkey_from_sign_pub(self.sign_pub)

    def nkey_seed(self) -> str:
        """The NATS nkey seed (``SU…``) of the signing key: pass as nats-py ``nkeys_seed_str=``."""
        return nkeys.encode_seed(self.sign_seed, nkeys.PREFIX_BYTE_USER).decode("ascii")

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``message``."""
        return self.sign_key.sign(message)

    def public_record(self) -> dict[str, str]:
        """``{handle, sign_pub, enc_pub, enc_suite}`` as the control plane expects them."""
        return {
            "handle": self.handle,
            "sign_pub": self.sign_pub_b64,
            "enc_pub": self.enc_pub_b64,
            "enc_suite": self.enc_suite,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return (
            self.handle == other.handle
            and self.enc_suite == other.enc_suite
            and hmac.compare_digest(self.sign_seed, other.sign_seed)
            and hmac.compare_digest(self.enc_key, other.enc_key)
        )

    __hash__ = None  # type: ignore[assignment]


def generate_identity(handle: str, enc_suite: str = DEFAULT_ENC_SUITE) -> Identity:
    """Fresh random keys for ``handle``. Raises HandleError / KeyFormatError on bad input."""
    validate_handle(handle)
    validate_enc_suite(enc_suite)
    return Identity(
        handle=handle,
        sign_key=ed25519.Ed25519PrivateKey.generate(),
        enc_suite=enc_suite,
        enc_key=os.urandom(ENC_KEY_SIZES[enc_suite]),
    )


# --------------------------------------------------------------------------- identity file

_FIELDS = ("version", "handle", "sign_seed", "sign_pub", "enc_suite", "enc_key", "enc_pub")


def identity_to_json(identity: Identity) -> dict[str, Any]:
    """The identity file's JSON object (contains private keys)."""
    return {
        "version": IDENTITY_VERSION,
        "handle": identity.handle,
        "sign_seed": b64encode(identity.sign_seed),
        "sign_pub": identity.sign_pub_b64,
        "enc_suite": identity.enc_suite,
        "enc_key": b64encode(identity.enc_key),
        "enc_pub": identity.enc_pub_b64,
    }


def identity_from_json(doc: Any, source: str = "identity file") -> Identity:
    """Build an :class:`Identity` from the identity file's JSON object; raise IdentityError."""
    if not isinstance(doc, dict):
        raise IdentityError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    version = doc.get("version")
    if type(version) is not int:
        raise IdentityError(f"{source}: missing or non-integer \"version\"; expected {IDENTITY_VERSION}")
    if version != IDENTITY_VERSION:
        raise IdentityError(
            f"{source}: unsupported identity file version {version}; this unibus reads version {IDENTITY_VERSION}"
        )
    missing = [k for k in _FIELDS if k not in doc]
    if missing:
        raise IdentityError(f"{source}: missing field(s) {', '.join(missing)}")
    try:
        handle = validate_handle(doc["handle"])
        sign_seed = b64decode_strict(doc["sign_seed"], "sign_seed", SIGN_SEED_SIZE)
        suite = validate_enc_suite(doc["enc_suite"])
        enc_key = b64decode_strict(doc["enc_key"], "enc_key", ENC_KEY_SIZES[suite])
        sign_pub = b64decode_strict(doc["sign_pub"], "sign_pub", SIGN_PUB_SIZE)
        enc_pub = b64decode_strict(doc["enc_pub"], "enc_pub", ENC_PUB_SIZES[suite])
    except ValueError as exc:  # KeyFormatError, HandleError
        raise IdentityError(f"{source}: {exc}") from None
    identity = Identity(
        handle=handle,
        sign_key=ed25519.Ed25519PrivateKey.from_private_bytes(sign_seed),
        enc_suite=suite,
        enc_key=enc_key,
    )
    if not hmac.compare_digest(identity.sign_pub, sign_pub):
        raise IdentityError(f"{source}: sign_pub does not match sign_seed (file corrupted or edited)")
    if not hmac.compare_digest(identity.enc_pub, enc_pub):
        raise IdentityError(f"{source}: enc_pub does not match enc_key for enc_suite {suite} (file corrupted or edited)")
    return identity


def save_identity(identity: Identity, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``identity`` to ``path`` atomically, mode 0600; return the path.

    The parent directory is created (mode 0700) if missing; an existing
    directory is left as it is. An existing file is kept unless ``force``
    (FileExistsError). The file is written to a 0600 temporary file in the same
    directory, fsynced, then renamed into place (or hard-linked, when not
    forcing, so a file created concurrently is never clobbered).
    """
    target = Path(os.path.expanduser(os.fspath(path)))
    parent = target.parent
    if not parent.exists():
        os.makedirs(parent, mode=0o700, exist_ok=True)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory")
    if not force and os.path.lexists(target):
        raise FileExistsError(f"{target} already exists; refusing to overwrite it without --force")

    data = (json.dumps(identity_to_json(identity), indent=2) + "\n").encode("utf-8")
    fd, tmp = _open_private_temp(parent, target.name)
    try:
        try:
            os.fchmod(fd, 0o600)  # umask can only remove bits; make sure the owner can read it
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise FileExistsError(f"{target} already exists; refusing to overwrite it without --force") from None
            except OSError:  # filesystem without hard links
                if os.path.lexists(target):
                    raise FileExistsError(
                        f"{target} already exists; refusing to overwrite it without --force"
                    ) from None
                os.replace(tmp, target)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _fsync_dir(parent)
    return target


def _open_private_temp(directory: Path, name: str) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory}")


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Read and check an identity file; raise :class:`IdentityError` with a clear message.

    Refuses a file that group or others can access (``chmod 600 PATH``).
    """
    p = os.path.expanduser(os.fspath(path))
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise IdentityError(
            f"identity file {p} not found; create one with `unibus keygen --handle HANDLE` "
            "or point --identity / UNIBUS_IDENTITY at it",
            p,
        ) from None
    except IsADirectoryError:
        raise IdentityError(f"identity file {p} is a directory", p) from None
    except OSError as exc:
        raise IdentityError(f"cannot read identity file {p}: {exc.strerror or exc}", p) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IdentityError(f"identity file {p} is a directory", p)
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"identity file {p} is not a regular file", p)
        if st.st_mode & 0o077:
            raise IdentityError(
                f"identity file {p} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"it holds private keys: run `chmod 600 {p}`",
                p,
            )
        if st.st_size > _IDENTITY_MAX_BYTES:
            raise IdentityError(f"identity file {p} is too large ({st.st_size} bytes) to be an identity file", p)
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > _IDENTITY_MAX_BYTES:
                raise IdentityError(f"identity file {p} is too large to be an identity file", p)
            chunks.append(chunk)
    except OSError as exc:
        raise IdentityError(f"cannot read identity file {p}: {exc.strerror or exc}", p) from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError(f"identity file {p} is not UTF-8 text (not an identity file?)", p) from None
    if not text.strip():
        raise IdentityError(f"identity file {p} is empty", p)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IdentityError(
            f"identity file {p} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", p
        ) from None
    try:
        return identity_from_json(doc, source=f"identity file {p}")
    except IdentityError as exc:
        exc.path = p
        raise
