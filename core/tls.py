"""TLS files and contexts: what membershipd and the client check before they use them.

The checks raise :class:`TLSFileError` whose message names the file and says
what to change; callers put the flag in front (``--http-tls-key: ...``). The
rules (docs/operations.md, "TLS"):

* a certificate is a PEM certificate that is valid now;
* a private key is an unencrypted PEM key that only its owner may read
  (mode 0600, like the route key and the route password);
* a certificate and its key belong together.

The contexts:

* :func:`server_context` serves HTTPS (TLS 1.2 at least);
* :func:`client_context` verifies a server against a CA file (or the system's
  trust store) and may present a client certificate; it is used for the
  control plane (HTTPS) and the bus (``tls://``) alike.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import stat
from pathlib import Path
from typing import Any

from .aio import cancel_and_wait


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names it."""


#: The most a certificate, key or CA file may hold (a CA bundle of a few hundred certificates fits).
MAX_TLS_FILE = 4 * 1024 * 1024


def read_tls_file(path: Path, *, private: bool = False, what: str = "a certificate or key file") -> bytes:
    """The bytes of a regular file, read at once: a FIFO or a device (which could block the
    reader for good, on the event loop when nats-server restarts) or a huge file is refused.
    ``private`` (a key): the file read must also pass :func:`private_file_problem`, checked on
    the very file read (a link is followed; its target is what counts). ``what`` names the kind
    of file in the error that refuses a huge one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TLSFileError(f"{path} is not readable ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TLSFileError(f"{path} is not a regular file")
        why = private_file_problem(path, st) if private else None
        if why is not None:
            raise TLSFileError(why)
        if st.st_size > MAX_TLS_FILE:
            raise TLSFileError(f"{path} is larger than {MAX_TLS_FILE} bytes: not {what}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_TLS_FILE + 1)
    except OSError as e:
        raise TLSFileError(f"{path} is not readable ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TLS_FILE:
        raise TLSFileError(f"{path} is larger than {MAX_TLS_FILE} bytes: not {what}")
    return data


_read = read_tls_file


def load_certificates(path: Path) -> list[Any]:
    """The PEM certificates in ``path`` (at least one)."""
    from cryptography import x509

    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSFileError(f"{path} holds no PEM certificate")
    return certs


def private_file_problem(path: Path, st: os.stat_result) -> str | None:
    """Why a key or password file with this ``stat`` is not private, or None: it must be a
    regular file of this user (or of root, which could replace any file anyway) that only its
    owner may read. A red team pointed a key at a 0600 file of another user, who could then
    swap the key under a running node (and read it); the check was on the mode alone."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid not in (os.geteuid(), 0):
        return (f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}) or root; "
                f"use a copy this user owns (chmod 600)")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"{path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run chmod 600 {path}")
    return None


def check_private_key_file(path: Path) -> Any:
    """Refuse a key file that is not private (:func:`private_file_problem`); return the loaded private key."""
    from cryptography.hazmat.primitives import serialization

    data = read_tls_file(path, private=True)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSFileError(f"{path} is not an unencrypted PEM private key ({e})") from None


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_pair(cert_flag: str, cert: Path, key_flag: str, key: Path) -> Any:
    """Both files usable, the certificate valid now, and the key the certificate's.

    Returns the certificate checked (the file's first, read once), for a caller
    that pins exactly that one. Raises :class:`TLSFileError` whose message
    starts with the flag at fault.
    """
    try:
        leaf = load_certificates(cert)[0]
    except TLSFileError as e:
        raise TLSFileError(f"{cert_flag}: {e}") from None
    now = dt.datetime.now(dt.UTC)
    if leaf.not_valid_before_utc > now:
        raise TLSFileError(f"{cert_flag}: {cert} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_after_utc < now:
        raise TLSFileError(f"{cert_flag}: {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                           "make a new one (deploy/generate-certs.sh)")
    try:
        private = check_private_key_file(key)
    except TLSFileError as e:
        raise TLSFileError(f"{key_flag}: {e}") from None
    if _public_der(private.public_key()) != _public_der(leaf.public_key()):
        raise TLSFileError(f"{key_flag}: {key} does not match {cert_flag} {cert}")
    return leaf


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The HTTPS context of the control plane: TLS 1.2 or newer, no client certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def client_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None, *,
                   names: tuple[str, str, str] = ("ca", "cert", "key")) -> ssl.SSLContext:
    """A client context that verifies the server (host name included).

    ``ca``: trust only this CA file (PEM) instead of the system's trust store.
    ``cert``/``key``: a client certificate to present (both or neither).
    Raises :class:`TLSFileError` whose message starts with the name (``names``:
    how the caller calls ``ca``, ``cert`` and ``key``, e.g. its flags).
    """
    ca_name, cert_name, key_name = names
    if (cert is None) != (key is None):
        raise TLSFileError(f"{cert_name} and {key_name} go together; give both or neither")
    if ca is not None:
        try:
            load_certificates(ca)  # a clear error for a file that holds no certificate
            ctx = ssl.create_default_context(cafile=str(ca))
        except TLSFileError as e:
            raise TLSFileError(f"{ca_name}: {e}") from None
        except (ssl.SSLError, OSError) as e:
            raise TLSFileError(f"{ca_name}: {ca} cannot be used as a CA file ({e})") from None
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        check_pair(cert_name, cert, key_name, key)
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def permanent_tls_error(exc: BaseException) -> bool:
    """A TLS failure that the same files would hit again on the next attempt.

    A certificate that does not verify, an alert from the server (it wants a
    client certificate, or refused ours), or a peer that does not speak TLS
    at all. A connection closed mid-handshake is not: the server may be
    restarting.
    """
    if not isinstance(exc, ssl.SSLError):
        return False
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError, ssl.SSLWantWriteError)):
        return False
    return "EOF" not in str(getattr(exc, "reason", "") or exc).upper()


async def connect_bounded(connect: Any, timeout: float, give_up: asyncio.Event) -> Any:
    """Await a nats-py connect coroutine at most ``timeout`` seconds, or until ``give_up`` is set.

    Bounded because after a failed TLS handshake nats-py 2.16 may wait forever
    for the dead socket to close before its next attempt; and a certificate
    that does not verify will not verify on the next attempt either (the
    connection's ``error_cb`` sets ``give_up`` on a :func:`permanent_tls_error`).
    Raises ``TimeoutError`` when it gave up.
    """
    task = asyncio.ensure_future(connect)
    stop = asyncio.ensure_future(give_up.wait())
    try:
        done, _ = await asyncio.wait({task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise TimeoutError
    finally:
        stop.cancel()
        if not task.done():
            await cancel_and_wait(task)
