"""Key material of a unibus member: validation, encodings and the identity file.

A member has three key pairs:

* an **Ed25519 signing key** — signs every control-plane request (RFC 9421)
  and nothing chosen by a remote party;
* an **HPKE encryption key** of suite ``X25519`` (default) or
  ``MLKEM768_X25519`` (X-Wing, ML-KEM-768 + X25519) — room keys are sealed to it;
* an **Ed25519 bus key** — the member's NATS user nkey (``bus_pub``, ``U…``),
  used only to answer nats-server's login nonce. Whatever key logs in to NATS
  signs bytes the server (or whoever pretends to be it) chooses, so it is a
  key of its own (docs/bus-auth.md#bus-keys). Identity files of version 1
  (0.11) have no bus key: ``unibus keygen --upgrade`` adds one.

Public keys travel as standard base64 (with ``=`` padding) of their raw bytes;
see docs/formats.md for the byte layouts. Everything here is synchronous and
has no network or server dependency.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import nkeys
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from ..privatefiles import make_missing_dirs

# Validation and encodings shared with the server live in unibus.wire; they
# are re-exported here for the SDK's users (__all__ below).
from ..wire import (  # noqa: F401
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
    nkey_from_public_key,
    nkey_from_sign_pub,
    sign_pub_from_nkey,
    validate_bus_pub,
    validate_enc_pub,
    validate_enc_suite,
    validate_handle,
    validate_sign_pub,
)

from .. import wire as _wire

#: unibus.wire's names but the server's skew bound and two helpers of its own,
#: then the identity file's.
__all__ = [
    *(name for name in _wire.__all__ if name not in {"MAX_AUTH_SKEW", "b64_pattern", "public_key_from_nkey"}),
    "IDENTITY_VERSION",
    "IDENTITY_VERSIONS",
    "IdentityError",
    "Identity",
    "NoBusKey",
    "generate_identity",
    "with_bus_key",
    "upgrade_identity_file",
    "identity_from_json",
    "identity_to_json",
    "save_identity",
    "load_identity",
]

#: The version ``unibus keygen`` writes: 2 carries the bus key.
IDENTITY_VERSION = 2
#: The versions this unibus reads: 1 (0.11, no bus key) and 2.
IDENTITY_VERSIONS = (1, 2)
_IDENTITY_MAX_BYTES = 64 * 1024


class IdentityError(Exception):
    """An identity file is missing, unreadable, too open, or malformed."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class NoBusKey(IdentityError):
    """The identity (a version 1 file) has no bus key: ``unibus keygen --upgrade`` adds one."""


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

    ``sign_key`` is the Ed25519 signing key; ``enc_key`` the raw private form of
    the HPKE key of ``enc_suite`` (X25519: the 32-byte scalar; MLKEM768_X25519:
    the 32-byte X-Wing seed); ``bus_key`` the Ed25519 bus key, None for an
    identity read from a version 1 file. Public keys and the HPKE key object
    are derived. The repr never shows private material.

    There is deliberately no "sign these bytes" method: the signing key signs
    RFC 9421 signature bases only (:func:`unibus.signing.sign_request`), and
    the bus key is handed to the NATS client as a seed, nothing else.
    """

    handle: str
    sign_key: ed25519.Ed25519PrivateKey = field(repr=False)
    enc_suite: str
    enc_key: bytes = field(repr=False)
    bus_key: ed25519.Ed25519PrivateKey | None = field(default=None, repr=False)
    sign_pub: bytes = field(init=False, repr=False)
    enc_pub: bytes = field(init=False, repr=False)
    bus_pub: str | None = field(init=False, default=None)
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
        if self.bus_key is not None:
            if not isinstance(self.bus_key, ed25519.Ed25519PrivateKey):
                raise TypeError("bus_key must be an Ed25519PrivateKey")
            raw = self.bus_key.public_key().public_bytes_raw()
            if hmac.compare_digest(raw, self.sign_pub):
                raise KeyFormatError("bus_key: must not be the signing key; the bus key is a separate key")
            object.__setattr__(self, "bus_pub", nkey_from_public_key(raw, "bus key"))

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
    def bus_seed(self) -> bytes:
        """The raw 32-byte Ed25519 private key of the bus key; :class:`NoBusKey` without one."""
        return self.require_bus_key().private_bytes_raw()

    def bus_nkey_seed(self) -> str:
        """The NATS nkey seed (``SU…``) of the bus key: nats-py's ``nkeys_seed_str=``.

        The only nkey seed an identity has; :class:`NoBusKey` for a version 1 identity.
        """
        return nkeys.encode_seed(self.bus_seed, nkeys.PREFIX_BYTE_USER).decode("ascii")

    def require_bus_key(self) -> ed25519.Ed25519PrivateKey:
        """The bus key; :class:`NoBusKey`, saying how to add one, for a version 1 identity."""
        if self.bus_key is None:
            raise NoBusKey(
                f"the identity of {self.handle} has no bus key (a version 1 identity file from unibus 0.11); "
                "run `unibus keygen --upgrade --server URL` (with `--ca PATH` for a server whose certificate "
                "your operator's CA signed) to add one and upload it"
            )
        return self.bus_key

    def public_record(self) -> dict[str, str]:
        """``{handle, sign_pub, enc_pub, enc_suite, bus_pub}`` as the control plane expects them.

        ``bus_pub`` is left out for an identity without a bus key.
        """
        record = {
            "handle": self.handle,
            "sign_pub": self.sign_pub_b64,
            "enc_pub": self.enc_pub_b64,
            "enc_suite": self.enc_suite,
        }
        if self.bus_pub is not None:
            record["bus_pub"] = self.bus_pub
        return record

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return (
            self.handle == other.handle
            and self.enc_suite == other.enc_suite
            and hmac.compare_digest(self.sign_seed, other.sign_seed)
            and hmac.compare_digest(self.enc_key, other.enc_key)
            and (self.bus_key is None) == (other.bus_key is None)
            and (self.bus_key is None or hmac.compare_digest(self.bus_seed, other.bus_seed))
        )

    __hash__ = None  # type: ignore[assignment]


def generate_identity(handle: str, enc_suite: str = DEFAULT_ENC_SUITE) -> Identity:
    """Fresh random keys (signing, encryption, bus) for ``handle``. Raises HandleError / KeyFormatError."""
    validate_handle(handle)
    validate_enc_suite(enc_suite)
    return Identity(
        handle=handle,
        sign_key=ed25519.Ed25519PrivateKey.generate(),
        enc_suite=enc_suite,
        enc_key=os.urandom(ENC_KEY_SIZES[enc_suite]),
        bus_key=ed25519.Ed25519PrivateKey.generate(),
    )


def with_bus_key(identity: Identity, bus_key: ed25519.Ed25519PrivateKey | None = None) -> Identity:
    """``identity`` with a (fresh, unless given) bus key; the signing and encryption keys are kept."""
    return Identity(
        handle=identity.handle,
        sign_key=identity.sign_key,
        enc_suite=identity.enc_suite,
        enc_key=identity.enc_key,
        bus_key=bus_key or ed25519.Ed25519PrivateKey.generate(),
    )


# --------------------------------------------------------------------------- identity file

_FIELDS_V1 = ("version", "handle", "sign_seed", "sign_pub", "enc_suite", "enc_key", "enc_pub")
_FIELDS_V2 = (*_FIELDS_V1, "bus_seed", "bus_pub")


def identity_to_json(identity: Identity) -> dict[str, Any]:
    """The identity file's JSON object (contains private keys).

    Version 2 (with ``bus_seed`` and ``bus_pub``) for an identity with a bus
    key; an identity read from a version 1 file is written back as version 1.
    """
    doc: dict[str, Any] = {
        "version": IDENTITY_VERSION if identity.bus_key is not None else 1,
        "handle": identity.handle,
        "sign_seed": b64encode(identity.sign_seed),
        "sign_pub": identity.sign_pub_b64,
        "enc_suite": identity.enc_suite,
        "enc_key": b64encode(identity.enc_key),
        "enc_pub": identity.enc_pub_b64,
    }
    if identity.bus_key is not None:
        doc["bus_seed"] = b64encode(identity.bus_seed)
        doc["bus_pub"] = identity.bus_pub
    return doc


def identity_from_json(doc: Any, source: str = "identity file") -> Identity:
    """Build an :class:`Identity` from the identity file's JSON object; raise IdentityError."""
    if not isinstance(doc, dict):
        raise IdentityError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    version = doc.get("version")
    if type(version) is not int:
        raise IdentityError(f"{source}: missing or non-integer \"version\"; expected {IDENTITY_VERSION}")
    if version not in IDENTITY_VERSIONS:
        raise IdentityError(
            f"{source}: unsupported identity file version {version}; this unibus reads versions "
            f"{' and '.join(map(str, IDENTITY_VERSIONS))}"
        )
    missing = [k for k in (_FIELDS_V2 if version == 2 else _FIELDS_V1) if k not in doc]
    if missing:
        raise IdentityError(f"{source}: missing field(s) {', '.join(missing)}")
    try:
        handle = validate_handle(doc["handle"])
        sign_seed = b64decode_strict(doc["sign_seed"], "sign_seed", SIGN_SEED_SIZE)
        suite = validate_enc_suite(doc["enc_suite"])
        enc_key = b64decode_strict(doc["enc_key"], "enc_key", ENC_KEY_SIZES[suite])
        sign_pub = b64decode_strict(doc["sign_pub"], "sign_pub", SIGN_PUB_SIZE)
        enc_pub = b64decode_strict(doc["enc_pub"], "enc_pub", ENC_PUB_SIZES[suite])
        bus_key = None
        if version == 2:
            bus_seed = b64decode_strict(doc["bus_seed"], "bus_seed", SIGN_SEED_SIZE)
            if not isinstance(doc["bus_pub"], str):
                raise KeyFormatError("bus_pub: expected a NATS user public key (U..., 56 characters)")
            bus_key = ed25519.Ed25519PrivateKey.from_private_bytes(bus_seed)
            if hmac.compare_digest(bus_seed, sign_seed):
                raise KeyFormatError("bus_seed: equals sign_seed; the bus key must be a separate key")
        identity = Identity(
            handle=handle,
            sign_key=ed25519.Ed25519PrivateKey.from_private_bytes(sign_seed),
            enc_suite=suite,
            enc_key=enc_key,
            bus_key=bus_key,
        )
    except ValueError as exc:  # KeyFormatError, HandleError
        raise IdentityError(f"{source}: {exc}") from None
    if version == 2 and not hmac.compare_digest(identity.bus_pub.encode(), doc["bus_pub"].encode()):
        raise IdentityError(f"{source}: bus_pub does not match bus_seed (file corrupted or edited)")
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
        make_missing_dirs(parent)  # each 0700: os.makedirs gives the ones above the umask's mode
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory")
    if os.path.islink(target):  # the rename would replace the link: `/dev/stdout`, as root (a review)
        raise FileExistsError(f"{target} is a symbolic link (to {os.readlink(target)}); give the file it names, "
                              "or another path")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(target).st_mode):  # --force put keys in place of /dev/full
            raise FileExistsError(f"{target} is not a regular file; refusing to replace it with an identity file")
    if not force and os.path.lexists(target):
        raise FileExistsError(f"{target} already exists; refusing to overwrite it without --force")

    data = (json.dumps(identity_to_json(identity), indent=2) + "\n").encode("utf-8")
    _write_private_file(target, data, replace=force,
                        exists=lambda: FileExistsError(f"{target} already exists; refusing to overwrite it "
                                                       "without --force"))
    return target


def _write_private_file(target: Path, data: bytes, *, replace: bool, exists: Callable[[], Exception]) -> None:
    """Write ``data`` to a 0600 temporary file beside ``target``, fsynced, then rename it onto ``target``
    (``replace``) or hard-link it there, which never clobbers a file created meanwhile (``exists()``
    is raised then); the directory is fsynced last."""
    fd, tmp = _open_private_temp(target.parent, target.name)
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
        if replace:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise exists() from None
            except OSError:  # filesystem without hard links
                if os.path.lexists(target):
                    raise exists() from None
                os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(target.parent)


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
    text = _read_identity_text(p)
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


def _read_identity_text(p: str) -> str:
    """The text of the identity file ``p``: a regular file of the owner's alone, small, UTF-8."""
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
        _check_identity_stat(p, os.fstat(fd))
        raw = _read_bounded(p, fd)
    except OSError as exc:
        raise IdentityError(f"cannot read identity file {p}: {exc.strerror or exc}", p) from None
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError(f"identity file {p} is not UTF-8 text (not an identity file?)", p) from None


def _check_identity_stat(p: str, st: os.stat_result) -> None:
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
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        # Its owner holds the keys: whoever planted it would act through us (root reads any file).
        raise IdentityError(f"identity file {p} belongs to another user (uid {st.st_uid}); use your own "
                            "identity file", p)
    if st.st_size > _IDENTITY_MAX_BYTES:
        raise IdentityError(f"identity file {p} is too large ({st.st_size} bytes) to be an identity file", p)


def _read_bounded(p: str, fd: int) -> bytes:
    """What ``fd`` holds, refused beyond the size of an identity file (it may grow while read)."""
    chunks = []
    total = 0
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > _IDENTITY_MAX_BYTES:
            raise IdentityError(f"identity file {p} is too large to be an identity file", p)
        chunks.append(chunk)


def upgrade_identity_file(path: str | os.PathLike[str]) -> tuple[Identity, Path | None]:
    """Add a bus key to a version 1 identity file, in place; ``(identity, backup path)``.

    The signing and encryption keys stay as they are. The original bytes are
    kept first in ``<path>.v1.bak`` (mode 0600; an identical backup left by an
    earlier, interrupted run is reused, a different one is never overwritten),
    then the version 2 file replaces the original atomically (0600). A file that
    already has a bus key is left alone: the backup path is then None.
    Raises :class:`IdentityError` (and OSError for a directory it cannot write).
    """
    # Through a link, to the file it names (a dotfile manager's link stays a link): the file was
    # just read as this user's identity, so writing beside it writes nowhere else.
    target = Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
    identity = load_identity(target)
    if identity.bus_key is not None:
        return identity, None
    original = target.read_bytes()
    backup = target.with_name(target.name + ".v1.bak")
    _write_backup(backup, original)
    upgraded = with_bus_key(identity)
    save_identity(upgraded, target, force=True)
    return upgraded, backup


def _write_backup(backup: Path, data: bytes) -> None:
    existing = None
    if os.path.lexists(backup):
        if not stat.S_ISREG(os.lstat(backup).st_mode):
            raise IdentityError(f"{backup} exists and is not a regular file; move it away before upgrading", backup)
        existing = backup.read_bytes()
    if existing is not None:
        if hmac.compare_digest(existing, data):
            os.chmod(backup, 0o600)
            return
        raise IdentityError(
            f"{backup} exists and differs from the identity file; move it away before upgrading", backup
        )
    _write_private_file(backup, data, replace=False,
                        exists=lambda: IdentityError(f"{backup} appeared while upgrading; move it away and try "
                                                     "again", backup))
