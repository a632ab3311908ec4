"""Settings: one validated frozen object, with the converters and rules behind it.

Every value membershipd runs with passes through
:func:`unibus.options.build_settings` (the option table: flags, environment,
defaults, help), which raises :class:`ConfigError` naming the flag and what is
allowed. Plugins add their own flags through the ``cli_options`` hook as
:class:`Option` objects; their validated values live in ``Settings.options``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .tls import TLSFileError, read_tls_file

# The largest --auth-skew (600 s): a signed request can be replayed for twice
# this long if its nonce is lost, and clients check the membership log's times
# against this very constant, whatever the skew was when an entry was written
# (docs/formats.md). One constant, shared with the client.
from .wire import MAX_AUTH_SKEW  # noqa: F401  (the cap of --auth-skew in unibus.options)

DEFAULT_HTTP_ADDR = "127.0.0.1:8470"
DEFAULT_NATS_ADDR = "127.0.0.1:4250"
DEFAULT_CLUSTER_ADDR = "0.0.0.0:6250"
#: Where the systemd units serve Prometheus metrics (``--metrics-addr`` is off by default).
UNIT_METRICS_ADDR = "127.0.0.1:9470"
DEFAULT_AUTH_SKEW = 60
KV_REPLICA_CHOICES = (1, 3, 5)
BUS_AUTH_CHOICES = ("off", "enforce")
#: The route password itself, an alternative to ``--cluster-pass-file``; never passed on to a child.
CLUSTER_PASS_ENV = "UNIBUS_CLUSTER_PASS"

SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


@dataclass(frozen=True)
class Option:
    """A flag a plugin adds to ``membershipd serve`` (see the ``cli_options`` hook).

    ``flag`` is the long option (``--nats-monitor-port``); ``dest`` the name the
    value is read back with (``settings.option("nats_monitor_port")``);
    ``convert`` turns the raw string into the value or raises ``ValueError``
    whose message says what is allowed; ``env`` names an environment variable
    used when the flag is absent. ``doc`` is the text of the option's row in
    README.md's flag table (default: ``help`` without its ``(default …)``);
    options that follow each other with the same ``doc`` share one row.
    """

    flag: str
    help: str
    default: Any = None
    convert: Callable[[str], Any] = str
    dest: str | None = None
    env: str | None = None
    metavar: str | None = None
    doc: str | None = None

    @property
    def name(self) -> str:
        """``dest``, else the flag without ``--`` and with dashes as underscores."""
        return self.dest or self.flag.lstrip("-").replace("-", "_")


class Secret:
    """A string that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def connect_host(self) -> str:
        """The host a local client dials: a wildcard listener is reached on loopback."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host


@dataclass(frozen=True)
class Settings:
    """Everything membershipd runs with, validated. Build it with :func:`unibus.options.build_settings`."""

    data_dir: Path = Path("./local_files")
    http_addr: HostPort = HostPort("127.0.0.1", 8470)
    nats_addr: HostPort = HostPort("127.0.0.1", 4250)
    nats_url: str | None = None
    bus_auth: str = "enforce"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    #: ``--metrics-addr``: Prometheus metrics (docs/operations.md, "Metrics"); None: no metrics listener.
    metrics_addr: HostPort | None = None
    metrics_tls_cert: Path | None = None
    metrics_tls_key: Path | None = None
    #: ``--metrics-tls-ca``: scrapers must present a certificate signed by this CA.
    metrics_tls_ca: Path | None = None
    insecure_plaintext: bool = False
    server_name: str = "unibus"
    kv_replicas: int = 1
    cluster_name: str | None = None
    cluster_addr: HostPort = HostPort("0.0.0.0", 6250)
    routes: tuple[str, ...] = ()
    cluster_pass_file: Path | None = None
    cluster_pass: Secret | None = field(default=None, repr=False, compare=False)
    #: A key every node of the cluster derives from the route password (HKDF-SHA256,
    #: salted with the cluster name): plugins derive their own shared keys from it
    #: (:meth:`cluster_key`) without ever seeing the password. None off a cluster.
    cluster_secret: Secret | None = field(default=None, repr=False, compare=False)
    auth_skew: int = DEFAULT_AUTH_SKEW
    nats_server_bin: Path | None = None
    disabled_plugins: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))

    @property
    def clustered(self) -> bool:
        """True when cluster flags were given (the posture gate then applies).

        A stray ``UNIBUS_CLUSTER_PASS`` in the environment alone does not make
        a node clustered; it is ignored without ``--cluster-name``.
        """
        return bool(self.cluster_name or self.routes)

    @property
    def embedded(self) -> bool:
        return self.nats_url is None

    @property
    def http_scheme(self) -> str:
        return "https" if self.http_tls_cert else "http"

    @property
    def metrics_scheme(self) -> str:
        return "https" if self.metrics_tls_cert else "http"

    @property
    def nats_public_url(self) -> str:
        """:attr:`nats_client_url` without any ``user:pass@`` (for /healthz and /v1/bus)."""
        return redact_url(self.nats_client_url)

    @property
    def nats_client_url(self) -> str:
        """The URL membershipd itself (and local tools) use to reach NATS."""
        if self.nats_url:
            return self.nats_url
        host = self.nats_addr.connect_host
        host = f"[{host}]" if ":" in host else host
        scheme = "tls" if self.tls_cert else "nats"
        return f"{scheme}://{host}:{self.nats_addr.port}"

    def option(self, name: str, default: Any = None) -> Any:
        """The value of a plugin option, by its ``Option.name``."""
        return self.options.get(name, default)

    def for_plugins(self) -> Settings:
        """A copy without secrets: what hook implementations receive."""
        return replace(self, cluster_pass=None)

    def cluster_key(self, label: str) -> bytes | None:
        """32 bytes every node of this cluster derives alike for ``label`` (None off a cluster).

        For a plugin that needs a secret shared by all nodes (the auth
        callout's issuer key, docs/bus-auth.md): derived from
        :attr:`cluster_secret` with HKDF-SHA256, so it changes with the route
        password and reveals nothing of it.
        """
        if self.cluster_secret is None:
            return None
        return hkdf(self.cluster_secret.reveal().encode("ascii"), b"unibus/plugin-key/v1", label.encode())

    @property
    def db_path(self) -> Path:
        return self.data_dir / "membershipd.db"

    @property
    def nats_conf_path(self) -> Path:
        return self.data_dir / "nats.conf"


# -- listeners: loopback or exposed (docs/operations.md, "Listeners and TLS") ----


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped) and ``localhost``; every other host is exposed.

    ``0.0.0.0`` and ``::`` listen on every address, so they are exposed; any
    host name but ``localhost`` is exposed too, whatever it resolves to today.
    """
    h = host.strip().lower()
    if h == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


#: The flags that put TLS on each core listener (in refusals and posture messages).
LISTENER_TLS_FLAGS = {"http": "--http-tls-cert/--http-tls-key", "nats": "--tls-cert/--tls-key",
                      "metrics": "--metrics-tls-cert/--metrics-tls-key"}


def exposed_plaintext_listeners(settings: Settings) -> list[tuple[str, str, HostPort]]:
    """``(listener, flag, address)`` of each core listener that is exposed and has no TLS."""
    out = []
    if not settings.http_tls_cert and not is_loopback_host(settings.http_addr.host):
        out.append(("http", "--http-addr", settings.http_addr))
    if settings.embedded and not settings.tls_cert and not is_loopback_host(settings.nats_addr.host):
        out.append(("nats", "--nats-addr", settings.nats_addr))
    if (settings.metrics_addr is not None and not settings.metrics_tls_cert
            and not is_loopback_host(settings.metrics_addr.host)):
        out.append(("metrics", "--metrics-addr", settings.metrics_addr))
    return out


def plaintext_nats_link(settings: Settings) -> bool:
    """True for a ``--nats-url nats://`` to a host that is not loopback: membershipd's
    own link to NATS (its logins, nonce claims and the bus) would cross the network in clear."""
    if not settings.nats_url:
        return False
    parts = urlsplit(settings.nats_url)
    return parts.scheme == "nats" and not is_loopback_host(parts.hostname or "")


def insecure_plaintext_warnings(settings: Settings) -> list[str]:
    """The warnings of ``--insecure-plaintext``: one per exposed listener without TLS."""
    if not settings.insecure_plaintext:
        return []
    warnings = [f"--insecure-plaintext: the {name} listener {flag} {addr} is exposed without TLS; anyone on the "
                f"network can read and alter its traffic (development only; {LISTENER_TLS_FLAGS[name]} fix it)"
                for name, flag, addr in exposed_plaintext_listeners(settings)]
    if plaintext_nats_link(settings):
        warnings.append("--insecure-plaintext: --nats-url is nats:// to another host; anyone on the network can "
                        "answer membershipd's nonce claims and read the bus (development only; tls:// fixes it)")
    return warnings


# -- converters: each raises ValueError with what is allowed -----------------


def parse_host_port(value: str) -> HostPort:
    value = value.strip()
    # ASCII digits only: \d took Arabic-Indic ones, and int() read them (a red team's port 20153)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})", value) or re.fullmatch(r"([^:\[\]]*):([0-9]{1,5})", value)
    if not m:
        raise ValueError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:8470)")
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    if not host:
        raise ValueError(f"{value!r} has no host; use 0.0.0.0:{port} to listen on every address")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host):
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
    return HostPort(host, port)


def parse_port(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", value.strip()):
        raise ValueError(f"{value!r} is not a port number (1-65535)")
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"{port} is out of range 1-65535")
    return port


def parse_positive_int(value: str) -> int:
    if not re.fullmatch(r"-?[0-9]+", value.strip()):  # int() takes "٦٠", "+6" and "6_0" too
        raise ValueError(f"{value!r} is not a whole number (ASCII digits)")
    n = int(value)
    if n < 1:
        raise ValueError(f"{n} must be at least 1")
    return n


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def parse_bool_env(value: str | None) -> bool:
    """The boolean spellings of docs/operations.md ("Flags and environment"): ``1 true yes on`` / ``0 false no off`` / empty."""
    if value is None:
        return False
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean; use one of 1 true yes on / 0 false no off")


def redact_url(url: str) -> str:
    """``url`` without a ``user:pass@``: everything between ``scheme://`` (or the start) and
    the last ``@`` goes, wherever ``urlsplit`` would have put that ``@`` (a password with a
    ``/``, ``?`` or ``#`` moves it out of the netloc); then without its query, fragment or
    anything after a ``;`` or a space, where a password may sit too (``?password=``: a red
    team's; ``;password=``: a review's). For showing a URL, never for using one."""
    if "@" in url:
        scheme, sep, rest = url.partition("://")
        url = f"{scheme}{sep}{rest.rsplit('@', 1)[1]}" if sep else url.rsplit("@", 1)[1]
    return re.split(r"[?#;\s]", url, maxsplit=1)[0]


def redact_text(text: str) -> str:
    """``text`` (an argparse error, say) with every word that holds an ``@`` redacted as a URL."""
    return re.sub(r"\S*@\S*", lambda m: redact_url(m.group()), text)


def shown_url(url: str) -> str:
    """``url`` quoted for an error message, without ``user:pass@`` (:func:`redact_url`)."""
    return repr(redact_url(url))


def parse_route(value: str) -> str:
    url = value.strip()
    parts = urlsplit(url)
    if "@" in url:  # first, whatever the scheme: no message below may echo a password
        raise ValueError(
            "a route URL must not carry credentials (user:pass@); give the password with "
            "--cluster-pass-file or UNIBUS_CLUSTER_PASS"
        )
    if parts.scheme not in ("nats", "nats-route"):
        raise ValueError(f"{shown_url(url)} must be nats://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown_url(url)} has a bad port") from None
    if not parts.hostname or not port:
        raise ValueError(f"{shown_url(url)} must be nats://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{shown_url(url)} must be a bare nats://HOST:PORT, with no path, query or fragment")
    return f"nats://{parts.netloc}"


def hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


def require_route_password(settings: Settings) -> None:
    """A cluster node needs a route password (ConfigError otherwise). Checked after the cluster
    gate, by ``serve`` and ``posture``: a configuration the gate refuses is reported as that
    (``posture`` exits 1 for it), whether or not it has a password yet."""
    if settings.cluster_name and settings.cluster_pass is None:
        raise ConfigError("--cluster-name needs a route password: --cluster-pass-file PATH or UNIBUS_CLUSTER_PASS")


def require_routes(settings: Settings) -> None:
    """A cluster node needs routes (ConfigError otherwise): nats-server starts no JetStream in a
    cluster without them ("JetStream cluster requires configured routes"), which a walk-through of
    the runbook met as an exit 1 after the start, naming nothing to change. Checked by ``serve``
    after the route password; ``posture`` warns."""
    if settings.cluster_name and not settings.routes:
        raise ConfigError("--cluster-name needs --routes: the route URLs of the other nodes (every node lists the "
                          "others, the first one too: nats-server starts no JetStream in a cluster without routes)")


def validate(settings: Settings) -> None:
    """Cross-flag rules (docs/operations.md, "Flags and environment", "Listeners and TLS"); raises :class:`ConfigError`."""
    s = settings
    if s.nats_url and s.clustered:
        raise ConfigError("--nats-url starts no embedded server; drop the cluster flags or --nats-url")
    if s.nats_url and (s.tls_cert or s.tls_ca):
        raise ConfigError("--tls-cert/--tls-key/--tls-ca configure the embedded server; they do not apply with --nats-url")
    if s.routes and not s.cluster_name:
        raise ConfigError("--routes needs --cluster-name")
    if s.cluster_pass_file and not s.cluster_name:
        raise ConfigError("--cluster-pass-file needs --cluster-name")
    if s.kv_replicas > 1 and not s.cluster_name:
        raise ConfigError(f"--kv-replicas {s.kv_replicas} needs a cluster (--cluster-name); use 1 on a single node")
    if s.http_addr == s.nats_addr:
        raise ConfigError("--http-addr and --nats-addr must differ")
    if s.metrics_addr is not None:
        for flag, other in (("--http-addr", s.http_addr), ("--nats-addr", s.nats_addr if s.embedded else None)):
            if other is not None and other.port == s.metrics_addr.port and (
                    other.host == s.metrics_addr.host or "0.0.0.0" in (other.host, s.metrics_addr.host)
                    or "::" in (other.host, s.metrics_addr.host)):
                raise ConfigError(f"--metrics-addr {s.metrics_addr} and {flag} {other} are the same port; "
                                  "give the metrics listener a port of its own (the units use 9470)")
    exposed = exposed_plaintext_listeners(s)
    if exposed and not s.insecure_plaintext:
        raise ConfigError(
            "; ".join(f"{flag} {addr} is exposed (not a loopback address) without TLS: give "
                      f"{LISTENER_TLS_FLAGS[name].replace('/', ' and ')}" for name, flag, addr in exposed)
            + " (deploy/generate-certs.sh makes them), bind to 127.0.0.1, or add --insecure-plaintext (development only)"
        )
    if plaintext_nats_link(s) and not s.insecure_plaintext:
        raise ConfigError(f"--nats-url {redact_url(s.nats_url)} crosses the network without TLS: use tls://HOST:PORT, "
                          "a loopback address, or add --insecure-plaintext (development only)")


def read_secret_file(flag: str, path: Path) -> str:
    """Read a one-line secret from a file of this user (or root) that only its owner may read,
    checked on the very file read (a FIFO put in its place is refused, never waited on)."""
    try:
        value = read_tls_file(path, private=True, what="a password file").decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path} is not text") from None
    except TLSFileError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if not value or "\n" in value:
        raise ConfigError(f"{flag}: {path} must hold the password on one line")
    return value


def __getattr__(name: str) -> Any:
    """``add_core_arguments``, ``add_plugin_arguments`` and ``build_settings`` live in :mod:`unibus.options`."""
    if name in ("add_core_arguments", "add_plugin_arguments", "build_settings"):
        from . import options

        return getattr(options, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a child process inherits: without any unibus secret."""
    src = os.environ if env is None else env
    return {k: v for k, v in src.items() if k != CLUSTER_PASS_ENV}
