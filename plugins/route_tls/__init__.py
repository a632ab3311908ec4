"""route_tls: mutual TLS on cluster routes, on a dedicated route CA (deploy/cluster/README.md).

``--route-tls-cert``, ``--route-tls-key`` and ``--route-tls-ca`` (all three)
add a ``tls`` block to the ``cluster`` section of nats.conf with verification
on: every route, dialled or accepted, must present a certificate signed by the
route CA (nats-server always verifies route peers). Refused with exit 2,
before anything starts:

* a route CA that is the client CA (``--tls-ca``), or a file of route CAs that
  holds it: a client certificate must never be able to join the cluster as a
  route (every CA of the file is checked: nats-server trusts each);
* a ``--tls-cert`` (client listener), ``--http-tls-cert`` (HTTPS) or
  ``--metrics-tls-cert`` (the metrics listener) issued by the route CA;
* a route certificate that is expired, not yet valid, not signed by the route
  CA, lacks serverAuth + clientAuth extended key usage, or does not match its key;
* a route key readable by group or others.

``posture`` speaks only for a clustered node (an unclustered node has no
routes): ``listeners.routes`` is ``mtls`` and ``tls`` true when all of that
holds, ``plaintext`` and false without route TLS (docs/operations.md,
"Posture and the cluster gate").
"""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path
from typing import Any

from unibus import hookimpl
from unibus.errors import ConfigError
from unibus.settings import Option, Settings
from unibus.tls import TLSFileError, read_tls_file

PLUGIN_NAME = "route_tls"
FLAGS = ("--route-tls-cert", "--route-tls-key", "--route-tls-ca")


def _existing_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return path.resolve()


#: The three flags' row in README.md's flag table.
_README_DOC = ("mutual route TLS on a dedicated route CA, all three together (route_tls plugin); "
               "`deploy/cluster/generate-cluster-certs.sh` makes them")


@hookimpl
def cli_options() -> list[Option]:
    return [
        Option("--route-tls-cert", help="route certificate (PEM) signed by the route CA", convert=_existing_file,
               metavar="PATH", doc=_README_DOC),
        Option("--route-tls-key", help="route private key (PEM, mode 0600)", convert=_existing_file, metavar="PATH",
               doc=_README_DOC),
        Option("--route-tls-ca", help="the dedicated route CA (PEM); never the client CA", convert=_existing_file,
               metavar="PATH", doc=_README_DOC),
    ]


def configured(settings: Settings) -> tuple[Path, Path, Path] | None:
    paths = [settings.option(f.lstrip("-").replace("-", "_")) for f in FLAGS]
    if not any(paths):
        return None
    if not all(paths):
        missing = [f for f, p in zip(FLAGS, paths) if not p]
        raise ConfigError(f"{', '.join(missing)}: route TLS needs all of {', '.join(FLAGS)}")
    return paths[0], paths[1], paths[2]  # type: ignore[return-value]


def _load_certs(path: Path, flag: str):
    from cryptography import x509

    try:
        # a regular file, read at once: a FIFO there would block the event loop when
        # nats-server restarts (these checks run again then)
        certs = x509.load_pem_x509_certificates(read_tls_file(path))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{flag}: {path} is not a PEM certificate ({e})") from None
    if not certs:
        raise ConfigError(f"{flag}: {path} holds no certificate")
    return certs


def _issued_by(cert, issuer) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=16)
def validate(cert_path: Path, key_path: Path, ca_path: Path, client_ca: Path | None, client_cert: Path | None,
             mtimes: tuple[float, ...], http_cert: Path | None = None, metrics_cert: Path | None = None) -> None:
    """Every check of the module docstring; raises ConfigError naming the flag. Cached per file state."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    # Every CA of the file: nats-server trusts each (a review's bundle of the route CA and the client
    # CA passed every check made on its first alone, and a node's server.crt then joined as a route).
    cas = _load_certs(ca_path, "--route-tls-ca")
    cert = _load_certs(cert_path, "--route-tls-cert")[0]

    def issued_by_route_ca(certificate: Any) -> bool:
        return any(_issued_by(certificate, ca) for ca in cas)

    if client_ca is not None:
        for client in _load_certs(client_ca, "--tls-ca"):
            for ca in cas:
                if client.public_key() == ca.public_key() or client.fingerprint(client.signature_hash_algorithm) == \
                        ca.fingerprint(ca.signature_hash_algorithm):
                    raise ConfigError("--route-tls-ca is the client CA (--tls-ca), or holds it; routes need a "
                                      "dedicated route CA")
    for flag, path in (("--tls-cert", client_cert), ("--http-tls-cert", http_cert),
                       ("--metrics-tls-cert", metrics_cert)):
        if path is None or not issued_by_route_ca(_load_certs(path, flag)[0]):
            continue
        if not issued_by_route_ca(cert):  # the route CA given is the client-facing one (a walk-through's slip)
            raise ConfigError(f"--route-tls-ca: {ca_path} issued {flag}, not --route-tls-cert: is it the client "
                              "CA? give the route CA (deploy/cluster/generate-cluster-certs.sh makes it)")
        raise ConfigError(f"{flag} is issued by the route CA; client-facing and route certificates need "
                          "separate CAs (deploy/generate-certs.sh makes the client-facing one)")

    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_before_utc > now:
        raise ConfigError(f"--route-tls-cert: {cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_after_utc < now:
        raise ConfigError(f"--route-tls-cert: {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if not issued_by_route_ca(cert):
        raise ConfigError(f"--route-tls-cert: {cert_path} is not signed by the route CA {ca_path}")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = []
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ConfigError(f"--route-tls-cert: {cert_path} needs both serverAuth and clientAuth extended key usage")

    try:
        data = read_tls_file(key_path, private=True)  # this user's (or root's), 0600, checked as it is read
    except TLSFileError as e:
        raise ConfigError(f"--route-tls-key: {e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(f"--route-tls-key: {key_path} is not an unencrypted PEM private key ({e})") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise ConfigError(f"--route-tls-key: {key_path} does not match --route-tls-cert {cert_path}")


def check(settings: Settings) -> tuple[Path, Path, Path] | None:
    paths = configured(settings)
    if paths is None:
        return None
    files = [*paths, settings.tls_ca, settings.tls_cert, settings.http_tls_cert, settings.metrics_tls_cert]
    mtimes = tuple(p.stat().st_mtime if p else 0.0 for p in files)
    validate(*paths, settings.tls_ca, settings.tls_cert, mtimes, settings.http_tls_cert, settings.metrics_tls_cert)
    return paths


@hookimpl
def validate_settings(settings: Settings) -> None:
    check(settings)  # reads and checks the files (refusing bad ones) even on a single node


@hookimpl
def posture(settings: Settings) -> dict[str, Any]:
    # No I/O: validate_settings refused every bad file before posture is asked.
    if not settings.clustered:
        return {}  # no routes: nothing to report (a false here would drag a single node's tls down)
    verified = configured(settings) is not None
    return {"tls": verified, "listeners": {"routes": "mtls" if verified else "plaintext"}}


@hookimpl
def configure_nats(settings: Settings, config: dict[str, Any]) -> None:
    paths = check(settings)
    if paths is None or "cluster" not in config:
        return
    cert, key, ca = paths
    config["cluster"]["tls"] = {"cert_file": str(cert), "key_file": str(key), "ca_file": str(ca),
                                "verify": True, "timeout": 3}
