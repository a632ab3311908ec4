"""The option table of ``membershipd serve``: every core flag, spelt once.

Each core flag is a :class:`Flag` in :data:`CORE_ROWS`; from that one table
come the argparse flags and their ``--help`` text (:func:`add_core_arguments`),
the environment variables that stand in for flags, the defaults and
conversion into :class:`~unibus.settings.Settings` (:func:`build_settings`),
and the flag table of README.md (:func:`readme_table`, together with the
built-in plugins' :class:`~unibus.settings.Option` objects). The rules that
refuse a value are in docs/operations.md ("Flags and environment", "Listeners
and TLS"); the table in README.md is regenerated with ``make readme``
(``python -m unibus.options --write-readme README.md``).
"""

from __future__ import annotations

import argparse
import importlib
import re
import socket
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .settings import (BUS_AUTH_CHOICES, CLUSTER_PASS_ENV, DEFAULT_AUTH_SKEW, DEFAULT_CLUSTER_ADDR, DEFAULT_HTTP_ADDR,
                       DEFAULT_NATS_ADDR, KV_REPLICA_CHOICES, MAX_AUTH_SKEW, SERVER_NAME_RE, UNIT_METRICS_ADDR, Option,
                       Secret, Settings, hkdf, parse_host_port, parse_positive_int, parse_route, read_secret_file,
                       shown_url, validate)
from .tls import TLSFileError, check_pair, load_certificates

#: Stands in for ``--data-dir`` (every command that has one).
DATA_DIR_ENV = "UNIBUS_DATA_DIR"
DEFAULT_DATA_DIR = "./local_files"
#: The built-in plugins, in the order README.md lists their flags (pyproject.toml's entry points).
BUILTIN_PLUGINS = ("nats_monitor", "auth_enforce", "route_tls", "blobstore")

README_START = "<!-- options:start -->"
README_END = "<!-- options:end -->"
README_HOWTO = "make readme (python -m unibus.options --write-readme README.md)"

# The values every step of build_settings reads and adds to, by Settings field.
Values = dict[str, Any]


@dataclass(frozen=True)
class Flag:
    """One core flag of ``serve``.

    ``help`` is the ``--help`` text; ``{default}`` and ``{env}`` in it are
    filled in from the fields. ``default`` is the raw value used when neither
    the flag nor ``env`` is given (a callable is asked then); it is converted
    like a given value. ``convert`` turns the raw string into the value or
    raises ``ValueError`` saying what is allowed (exit 2, ``<flag>: <message>``).
    An empty value (given, or in ``env``) counts as absent, unless
    ``keep_empty``: then a given empty value is converted (and refused) like
    any other. ``env_secret`` names a variable
    that carries the secret itself, instead of the file the flag names.
    """

    flag: str
    help: str
    metavar: str | None = None
    default: str | Callable[[], str] | None = None
    convert: Callable[[str], Any] | None = None
    env: str | None = None
    env_secret: str | None = None
    keep_empty: bool = False
    action: str | None = None

    @property
    def name(self) -> str:
        """The argparse dest, which is also the :class:`Settings` field."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def help_text(self) -> str:
        default = self.default if isinstance(self.default, str) else None
        return self.help.format(default=default, env=self.env or self.env_secret)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.action == "store_true":
            parser.add_argument(self.flag, action="store_true", default=None, help=self.help_text)
        elif self.action == "append":
            parser.add_argument(self.flag, metavar=self.metavar, action="append", default=[], help=self.help_text)
        else:
            parser.add_argument(self.flag, metavar=self.metavar, help=self.help_text)

    def read(self, ns: argparse.Namespace, env: Mapping[str, str]) -> Any:
        """The flag's value: given, else its environment variable, else its default; converted."""
        raw = getattr(ns, self.name, None)
        if self.action == "store_true":
            return bool(raw)
        if raw == "" and not self.keep_empty:  # `--auth-skew=` took the default, silently (a red team)
            raise ConfigError(f"{self.flag}: give a value (it is empty)")
        if raw is None:
            raw = (env.get(self.env) if self.env else None) or (
                self.default() if callable(self.default) else self.default)
        if raw is None or self.convert is None:
            return raw
        return convert_value(self.flag, raw, self.convert)


@dataclass(frozen=True)
class Row:
    """One row of README.md's flag table: flags documented together.

    ``default`` is the README's default column (None: the flag's default in
    backquotes, or ``none``). ``after`` runs once the row's flags are read:
    the checks across them, in this order (docs/operations.md).
    """

    flags: tuple[Flag, ...]
    doc: str
    default: str | None = None
    after: tuple[Callable[[Values, Mapping[str, str]], None], ...] = ()

    def cells(self) -> tuple[str, str, str]:
        first = self.flags[0]
        env = first.env or first.env_secret
        default = self.default or (f"`{first.default}`" if isinstance(first.default, str) and first.default else "none")
        return _flag_cell([f.flag for f in self.flags], first.metavar, env), default, self.doc


def convert_value(source: str, raw: str, convert: Callable[[str], Any]) -> Any:
    """``convert(raw)``; its ``ValueError`` becomes a ConfigError ``<source>: <message>``."""
    try:
        return convert(raw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


# -- converters of the core flags: each raises ValueError with what is allowed ----


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def nats_url(raw: str) -> str:
    """A ``--nats-url``: ``nats://`` or ``tls://``, a host, a port in range, nothing else."""
    parts = urlsplit(raw)
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        raise ValueError(f"{shown_url(raw)} must be nats://HOST:PORT or tls://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in raw or "#" in raw:
        # nats-py ignores them, and a password put there was shown in errors (a red team)
        raise ValueError(f"{shown_url(raw)} must be nats://HOST:PORT or tls://HOST:PORT, with no path, query or "
                         "fragment")
    after_host = parts.netloc.rsplit("@", 1)[-1].rsplit("]", 1)[-1]  # past an IPv6 literal's brackets
    if ":" in after_host:
        port = after_host.rpartition(":")[2]
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
            raise ValueError(f"{shown_url(raw)}: the port must be a number from 1 to 65535")
    return raw


def _bus_auth(raw: str) -> str:
    if raw not in BUS_AUTH_CHOICES:
        raise ValueError(f"{raw!r} is not allowed; use off or enforce")
    return raw


def _server_name(raw: str) -> str:
    if not SERVER_NAME_RE.match(raw):
        raise ValueError(f"{raw!r} is not allowed; use 1-64 of letters, digits, '_', '.', '-'")
    return raw


def _cluster_name(raw: str) -> str:
    if not SERVER_NAME_RE.match(raw):
        raise ValueError(f"{raw!r} is not allowed; use letters, digits, '_', '.', '-'")
    return raw


def _kv_replicas(raw: str) -> int:
    if raw.strip() in {str(n) for n in KV_REPLICA_CHOICES}:  # ASCII: int() takes "٣" too
        return int(raw)
    raise ValueError(f"{raw!r} is not allowed; use 1, 3 or 5")


def _routes(raw: str) -> tuple[str, ...]:
    if "@" in raw:  # before the split: a password with a comma would otherwise be quoted in part
        raise ValueError("a route URL must not carry credentials (user:pass@); give the password with "
                         "--cluster-pass-file or UNIBUS_CLUSTER_PASS")
    return tuple(parse_route(r) for r in raw.split(",") if r.strip())


def _auth_skew(raw: str) -> int:
    n = parse_positive_int(raw)
    if n > MAX_AUTH_SKEW:
        raise ValueError(f"{n} is too large; use 1 to {MAX_AUTH_SKEW} seconds (run NTP instead)")
    return n


def _host_name() -> str:
    return socket.gethostname() or "unibus"


# -- checks across the flags of a row (and the TLS rows before) -------------------


def _pair(v: Values, cert: str, key: str) -> None:
    if bool(v[cert]) != bool(v[key]):
        raise ConfigError(f"--{_dashed(cert)} and --{_dashed(key)} go together; give both or neither")


def _check_nats_tls(v: Values, env: Mapping[str, str]) -> None:
    _pair(v, "tls_cert", "tls_key")
    if v["tls_ca"] and not v["tls_cert"]:
        raise ConfigError("--tls-ca verifies client certificates and needs --tls-cert and --tls-key")


def _check_http_tls(v: Values, env: Mapping[str, str]) -> None:
    _pair(v, "http_tls_cert", "http_tls_key")


_METRICS_TLS = ("metrics_tls_cert", "metrics_tls_key", "metrics_tls_ca")


def _check_metrics_tls(v: Values, env: Mapping[str, str]) -> None:
    given = [k for k in _METRICS_TLS if v[k] is not None]
    if v["metrics_addr"] is None and given:
        raise ConfigError(f"--{_dashed(given[0])} configures the metrics listener: it needs --metrics-addr")
    _pair(v, "metrics_tls_cert", "metrics_tls_key")
    if v["metrics_tls_ca"] and not v["metrics_tls_cert"]:
        raise ConfigError("--metrics-tls-ca verifies scrapers' certificates and needs --metrics-tls-cert and "
                          "--metrics-tls-key")


_TLS_PAIRS = (("tls_cert", "tls_key"), ("http_tls_cert", "http_tls_key"), ("metrics_tls_cert", "metrics_tls_key"))
_TLS_CAS = ("tls_ca", "metrics_tls_ca")
_TLS_FILES = ("tls_cert", "tls_key", "tls_ca", "http_tls_cert", "http_tls_key", *_METRICS_TLS)


def _check_tls_files(v: Values, env: Mapping[str, str]) -> None:
    """Every TLS file of every listener: present, then each certificate with its key, then the CAs."""
    for k in _TLS_FILES:
        if v[k] is not None and not v[k].is_file():
            hint = "" if k.endswith("_ca") else " (deploy/generate-certs.sh makes a certificate and its key)"
            raise ConfigError(f"--{_dashed(k)}: {v[k]} is not a readable file{hint}")
    for cert, key in _TLS_PAIRS:
        if v[cert] is not None and v[key] is not None:
            try:
                check_pair(f"--{_dashed(cert)}", v[cert], f"--{_dashed(key)}", v[key])
            except TLSFileError as e:
                raise ConfigError(str(e)) from None
    for ca in _TLS_CAS:
        if v[ca] is not None:
            try:
                load_certificates(v[ca])
            except TLSFileError as e:
                raise ConfigError(f"--{_dashed(ca)}: {e}") from None


def _read_cluster_pass(v: Values, env: Mapping[str, str]) -> None:
    """The route password: from ``--cluster-pass-file``, else from the environment."""
    v["cluster_pass"] = None
    if v["cluster_pass_file"] is not None:
        v["cluster_pass"] = Secret(read_secret_file("--cluster-pass-file", v["cluster_pass_file"]))
    elif env.get(CLUSTER_PASS_ENV):
        v["cluster_pass"] = Secret(env[CLUSTER_PASS_ENV])


def _dashed(name: str) -> str:
    return name.replace("_", "-")


# -- the table ---------------------------------------------------------------------


def _row(*flags: Flag, doc: str, default: str | None = None, after=()) -> Row:
    return Row(flags, doc, default, tuple(after))


DATA_DIR = Flag("--data-dir", "all writable state [{env}] (default {default})", "DIR", DEFAULT_DATA_DIR, _path,
                env=DATA_DIR_ENV)

#: The core flags of ``serve``, in ``--help`` and README order; reading them runs in this order too.
CORE_ROWS: tuple[Row, ...] = (
    _row(DATA_DIR, doc="all writable state: `membershipd.db`, `jetstream/`, `blobs/`, `nats.conf` (0600), "
                       "`service.nkey` and `system.nkey` (0600), `membershipd.lock` (held by the running "
                       "`serve`)"),
    _row(Flag("--http-addr", "control-plane HTTP (default {default})", "HOST:PORT", DEFAULT_HTTP_ADDR,
              parse_host_port), doc="control-plane HTTP"),
    _row(Flag("--nats-addr", "embedded NATS client listener (default {default})", "HOST:PORT", DEFAULT_NATS_ADDR,
              parse_host_port), doc="embedded NATS client listener"),
    _row(Flag("--nats-url", "use an external NATS; no embedded server", "URL", convert=nats_url, keep_empty=True),
         doc="use an external NATS; no embedded server; cluster flags refused"),
    _row(Flag("--bus-auth", "data-plane authorization (default {default})", "off|enforce", "enforce", _bus_auth),
         doc="data-plane authorization (auth_enforce plugin)"),
    _row(Flag("--tls-cert", "client TLS certificate of the NATS listener", "PATH", convert=_path),
         Flag("--tls-key", "client TLS key of the NATS listener", "PATH", convert=_path),
         Flag("--tls-ca", "CA that verifies NATS client certificates", "PATH", convert=_path),
         doc="client TLS on the NATS listener (`tls://` URLs); `--tls-ca` also verifies client certs",
         after=[_check_nats_tls]),
    _row(Flag("--http-tls-cert", "serve the control plane over HTTPS with this certificate (PEM)", "PATH",
              convert=_path),
         Flag("--http-tls-key", "the HTTPS private key (PEM, mode 0600)", "PATH", convert=_path),
         doc="serve the control plane over HTTPS (TLS 1.2+); `deploy/generate-certs.sh` makes the certificate",
         after=[_check_http_tls]),
    _row(Flag("--metrics-addr", "serve Prometheus metrics on GET /metrics there (default: off; the systemd units "
                                f"use {UNIT_METRICS_ADDR})", "HOST:PORT", convert=parse_host_port, keep_empty=True),
         default="off",
         doc="serve Prometheus metrics, `GET /metrics` ([docs/operations.md](docs/operations.md#metrics)); the "
             f"systemd units use `{UNIT_METRICS_ADDR}`; an exposed address needs the TLS flags below"),
    _row(Flag("--metrics-tls-cert", "serve the metrics over HTTPS with this certificate (PEM)", "PATH", convert=_path),
         Flag("--metrics-tls-key", "the metrics listener's HTTPS private key (PEM, mode 0600)", "PATH",
              convert=_path),
         Flag("--metrics-tls-ca", "scrapers must present a client certificate signed by this CA", "PATH",
              convert=_path),
         doc="serve the metrics over HTTPS; `--metrics-tls-ca` also makes scrapers present a client certificate "
             "signed by that CA",
         after=[_check_metrics_tls, _check_tls_files]),
    _row(Flag("--insecure-plaintext", "allow an exposed listener without TLS (development only; warned at start-up "
                                      "and on /healthz)", action="store_true"),
         default="off",
         doc="allow an exposed (non-loopback) HTTP, NATS or metrics listener without TLS: development only, warned "
             "at start-up and on `/healthz`; otherwise refused"),
    _row(Flag("--server-name", "NATS server_name (default: host name)", "NAME", _host_name, _server_name),
         default="host name", doc="NATS `server_name`"),
    _row(Flag("--kv-replicas", "replicas of every KV bucket: 1, 3 or 5 (default {default})", "N", "1", _kv_replicas),
         default="1", doc="replicas of the KV buckets and the blob object store: 1, 3 or 5; >1 needs `--cluster-name`"),
    _row(Flag("--cluster-name", "join a cluster (with --routes)", "NAME", convert=_cluster_name, keep_empty=True),
         doc="join a cluster (with `--routes`); state then lives in JetStream KV"),
    _row(Flag("--cluster-addr", "route listener (default {default})", "HOST:PORT", DEFAULT_CLUSTER_ADDR,
              parse_host_port), doc="route listener"),
    _row(Flag("--routes", "cluster peers as bare nats://host:port", "URL[,URL...]", "", _routes),
         default="none", doc="peers as bare `nats://host:port` (credentials in a URL are refused)"),
    _row(Flag("--cluster-pass-file", "route password file, mode 0600 [{env}]", "PATH", convert=_path,
              env_secret=CLUSTER_PASS_ENV),
         doc="route password; the file must be mode 0600; needs `--cluster-name`", after=[_read_cluster_pass]),
    _row(Flag("--auth-skew", f"allowed clock skew of signed requests, 1-{MAX_AUTH_SKEW} (default {{default}})",
              "SECONDS", str(DEFAULT_AUTH_SKEW), _auth_skew),
         default=str(DEFAULT_AUTH_SKEW), doc=f"allowed clock skew of signed requests, 1 to {MAX_AUTH_SKEW}"),
    _row(Flag("--nats-server-bin", "the nats-server binary (default: beside python, then PATH)", "PATH",
              convert=_path),
         default="beside python, then `PATH`", doc="the nats-server binary"),
)

PLUGIN_FLAG_HELP = "load the plugin module MODULE (importable from PYTHONPATH) without installing it (repeatable)"

#: Which plugins load: read by every command that loads plugins (not part of Settings).
PLUGIN_SELECTION_ROWS: tuple[Row, ...] = (
    _row(Flag("--disable-plugin", "block a plugin (repeatable)", "NAME", action="append"),
         doc="block a plugin (repeatable)"),
    _row(Flag("--plugin", PLUGIN_FLAG_HELP, "MODULE", action="append"),
         doc="load a plugin module that is not installed (repeatable; for development: docs/plugins.md)"),
)


def _flags(rows: Sequence[Row]) -> list[Flag]:
    return [f for row in rows for f in row.flags]


# -- argparse ----------------------------------------------------------------------


def add_core_arguments(parser: argparse.ArgumentParser) -> None:
    """The core flags of ``serve`` (docs/operations.md, "Flags and environment"); defaults apply in build_settings."""
    for flag in _flags(CORE_ROWS):
        flag.add_to(parser)


def add_plugin_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--disable-plugin NAME`` and ``--plugin MODULE`` (both repeatable)."""
    for flag in _flags(PLUGIN_SELECTION_ROWS):
        flag.add_to(parser)


def reserved_flags() -> set[str]:
    """The flags no plugin may define: the core's, the plugin selection's and ``-h``/``--help``."""
    return {"-h", "--help", *(f.flag for f in _flags(CORE_ROWS + PLUGIN_SELECTION_ROWS))}


def add_plugin_arguments(parser: argparse.ArgumentParser, options: Sequence[tuple[str, Option]]) -> None:
    from .errors import RuntimeFailure

    for plugin, opt in options:
        if opt.flag in parser._option_string_actions:
            raise RuntimeFailure(f"plugin {plugin}: flag {opt.flag} clashes with a core flag")
        parser.add_argument(
            opt.flag,
            dest=f"plugin__{opt.name}",
            # argparse's default would be the dest upper-cased: PLUGIN__NOTES_MODE (a plugin author's walkthrough)
            metavar=opt.metavar or opt.flag.lstrip("-").replace("-", "_").upper(),
            help=f"{opt.help} [{plugin} plugin]" + (f" [{opt.env}]" if opt.env else ""),
        )


def data_dir_from(ns: argparse.Namespace, env: Mapping[str, str]) -> Path:
    """``--data-dir``, else ``UNIBUS_DATA_DIR``, else ``./local_files`` (every command)."""
    return DATA_DIR.read(ns, env)


# -- flags and environment into Settings -------------------------------------------


def build_settings(
    ns: argparse.Namespace,
    env: Mapping[str, str],
    plugin_options: Sequence[tuple[str, Option]] = (),
    disabled_plugins: Sequence[str] = (),
) -> Settings:
    """Validate parsed flags and the environment into :class:`Settings`.

    Raises :class:`ConfigError` whose message starts with the flag at fault.
    ``env`` is read, never modified. The core flags are read in table order,
    each row's checks right after it; then the plugins' options; then the
    rules across flags (:func:`unibus.settings.validate`).
    """
    values: Values = {}
    for row in CORE_ROWS:
        for flag in row.flags:
            values[flag.name] = flag.read(ns, env)
        for step in row.after:
            step(values, env)
    cluster_pass, cluster_name = values["cluster_pass"], values["cluster_name"]
    settings = Settings(
        **values,
        cluster_secret=(Secret(hkdf(cluster_pass.reveal().encode(), (cluster_name or "").encode(),
                                    b"unibus/cluster-secret/v1").hex())
                        if cluster_pass is not None and cluster_name else None),
        disabled_plugins=tuple(disabled_plugins),
        options=types.MappingProxyType(plugin_values(ns, env, plugin_options)),
    )
    validate(settings)
    return settings


def plugin_values(ns: argparse.Namespace, env: Mapping[str, str],
                  plugin_options: Sequence[tuple[str, Option]]) -> dict[str, Any]:
    """Each plugin option's value by ``Option.name``: the flag, else its ``env``, else its default (unconverted)."""
    options: dict[str, Any] = {}
    for _plugin, opt in plugin_options:
        raw = getattr(ns, f"plugin__{opt.name}", None)
        source = opt.flag
        if raw is None and opt.env and env.get(opt.env) is not None:
            raw, source = env[opt.env], opt.env
        options[opt.name] = opt.default if raw is None else convert_value(source, raw, opt.convert)
    return options


# -- README.md's flag table --------------------------------------------------------


def _flag_cell(flags: Sequence[str], metavar: str | None, env: str | None) -> str:
    if len(flags) > 1:
        return ", ".join(f"`{f}`" for f in flags)
    shown = f"{flags[0]} {metavar}" if metavar else flags[0]
    shown = shown.replace("...", "…").replace("|", "\\|")
    return f"`{shown}`" + (f" [`{env}`]" if env else "")


_HELP_DEFAULT = re.compile(r"\s*\(default[^()]*\)$")


def plugin_rows(options: Sequence[tuple[str, Option]]) -> list[tuple[str, str, str]]:
    """README rows of plugin options: consecutive options of a plugin with the same ``doc`` share a row.

    The meaning is ``doc`` (else the help without its ``(default …)``),
    followed by ``(<plugin> plugin)`` unless it already says so.
    """
    groups: list[tuple[str, list[Option]]] = []
    for plugin, opt in options:
        if groups and groups[-1][0] == plugin and opt.doc and groups[-1][1][-1].doc == opt.doc:
            groups[-1][1].append(opt)
        else:
            groups.append((plugin, [opt]))
    rows = []
    for plugin, opts in groups:
        first = opts[0]
        doc = first.doc or _HELP_DEFAULT.sub("", first.help)
        if f"({plugin} plugin)" not in doc:
            doc += f" ({plugin} plugin)"
        default = "none" if first.default is None else str(first.default)
        rows.append((_flag_cell([o.flag for o in opts], first.metavar, first.env), default, doc))
    return rows


def builtin_plugin_options() -> list[tuple[str, Option]]:
    """The options the built-in plugins declare, in :data:`BUILTIN_PLUGINS` order."""
    out = []
    for name in BUILTIN_PLUGINS:
        module = importlib.import_module(f"unibus.plugins.{name}")
        hook = getattr(module, "cli_options", None)
        out += [(name, opt) for opt in (hook() if hook else ())]
    return out


def readme_table(plugin_options: Sequence[tuple[str, Option]] | None = None) -> str:
    """README.md's flag table: the core rows, the plugin selection, then the (built-in) plugins' options."""
    if plugin_options is None:
        plugin_options = builtin_plugin_options()
    rows = [row.cells() for row in CORE_ROWS + PLUGIN_SELECTION_ROWS] + plugin_rows(plugin_options)
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    lines += [f"| {flag} | {default} | {doc} |" for flag, default, doc in rows]
    return "\n".join(lines) + "\n"


def replace_readme_table(text: str, table: str) -> str:
    """``text`` with the part between the options markers replaced by ``table``."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {README_START} ... {README_END} markers")
    return text[:start + len(README_START)] + "\n\n" + table + "\n" + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unibus.options",
                                     description="Print or rewrite README.md's flag table of membershipd serve.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--readme", action="store_true", help="print the table")
    group.add_argument("--write-readme", metavar="PATH", help="rewrite the table between the markers in PATH")
    ns = parser.parse_args(argv)
    table = readme_table()
    if ns.readme:
        sys.stdout.write(table)
        return 0
    path = Path(ns.write_readme)
    text = path.read_text()
    new = replace_readme_table(text, table)
    if new != text:
        path.write_text(new)
    print(f"{path}: flag table {'rewritten' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
