"""``membershipd``: the daemon and its operator commands (docs/operations.md).

``serve`` is the default subcommand. Expected errors print one line on stderr
and exit 2 (configuration, usage) or 1 (runtime); never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import ConfigError, RuntimeFailure, UnibusError
from .pluginmanager import LOAD_PLUGINS_ENV, PluginManager, load_plugins_from_env
from .options import (CLUSTER_PASS_ENV, DATA_DIR, add_core_arguments, add_plugin_arguments,
                      add_plugin_selection_arguments, build_settings, data_dir_from, reserved_flags)
from .settings import Settings
from .stdout import FailedWritesRaise, drop_stdout
from .stopsignals import StopSignal, exit_on_stop_signal, operator_command, stoppable

log = logging.getLogger("unibus.cli")

PROG = "membershipd"
COMMANDS = ("serve", "migrate", "member", "migrate-to-kv", "backup", "restore", "remove-peer", "posture", "plugins")


class _Parser(FailedWritesRaise):
    """argparse that exits 2 with a usage line and one 'error:' line (its default), in which a
    word holding an ``@`` is shown without its ``user:pass@`` (``unrecognized arguments:`` quotes
    stray values, a route URL given after a space instead of a comma among them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: a plugin's flag (--data, say) would take over what an operator's
        # abbreviated core flag (--data for --data-dir) meant (a plugin author's walkthrough).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._given = list(sys.argv[1:] if args is None else args)  # for error(): the values as given
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        from .settings import redact_text, redact_url

        # each value with an @ as a whole first: a password with a space is two words of the message
        for value in sorted((a for a in getattr(self, "_given", ()) if "@" in a), key=len, reverse=True):
            message = message.replace(value, redact_url(value))
        # One usage line, not argparse's whole synopsis (16 lines for serve, an operations audit):
        # the error line after it says what to change, and --help lists every flag.
        self.exit(2, f"usage: {self.prog} [options] ({self.prog} --help lists them)\n"
                     f"{self.prog}: error: {redact_text(message)}\n")


def _disable_pre_parser() -> argparse.ArgumentParser:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_plugin_selection_arguments(pre)
    return pre


def _broken_epilog(plugins: PluginManager) -> str | None:
    """The broken plugins, for --help: listed with their error instead of crashing."""
    if not plugins.broken:
        return None
    lines = ["broken plugins (serve refuses to start until they are fixed or blocked with --disable-plugin):"]
    lines += [f"  {b.name}: {b.error}" for b in plugins.broken.values()]
    return "\n".join(lines)


def _serve_parser(command: str, plugin_options, plugins: PluginManager | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} {command}", description=_DESCRIPTIONS[command],
                     epilog=_broken_epilog(plugins) if plugins is not None else None,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_core_arguments(parser)
    add_plugin_selection_arguments(parser)
    add_plugin_arguments(parser, plugin_options)
    return parser


_DESCRIPTIONS = {
    "serve": "Run the control plane and its embedded NATS + JetStream server.",
    "migrate": "Apply database migrations to <data-dir>/membershipd.db and exit.",
    "member": "Offline member bootstrap: 'member add' writes a member into the store (SIGHUP a running daemon).",
    "migrate-to-kv": "Copy the membership log, members, rooms and sealed keys from the SQLite store into the "
                     "cluster's JetStream KV, and the blobs into its object store.",
    "backup": "Write an online, consistent snapshot of the state (a single node's, or a cluster's with "
              "--nats-url) into one archive.",
    "restore": "Restore a backup archive into an empty data directory, checking all of it first.",
    "remove-peer": "Remove a cluster node that is gone for good from the JetStream meta group, from a live node.",
    "posture": "Print the posture this configuration would report; exit 0 when enforce+acl+tls.",
    "plugins": "List the loaded plugins with their distribution, version and hooks.",
}


def _refuse_unavailable_flags(argv: Sequence[str], plugins: PluginManager, loaded_flags: set[str]) -> None:
    """A flag of a plugin that is not loaded is refused naming the plugin (never an open default).

    A flag that a loaded plugin defines (a third-party replacement of a
    built-in, say) is that plugin's and is never refused here.
    """
    owned = {flag: plugin for flag, plugin in plugins.unavailable_flags().items() if flag not in loaded_flags}
    given = [arg.split("=", 1)[0] for arg in itertools.takewhile(lambda a: a != "--", argv)]
    known = owned.keys() | loaded_flags | reserved_flags()
    if any(flag.startswith("--") and flag not in known for flag in given):
        # a plugin UNIBUS_LOAD_PLUGINS leaves out is imported only now, to name it
        owned.update({flag: plugin for flag, plugin in plugins.left_out_flags().items()
                      if flag not in loaded_flags and flag not in owned})
    for flag in given:
        if flag not in owned:
            continue
        plugin = owned[flag]
        if plugin in plugins.blocked:
            raise ConfigError(
                f"{flag} belongs to the {plugin} plugin, which --disable-plugin {plugin} blocks; "
                f"drop {flag} or enable the plugin"
            )
        raise ConfigError(f"{flag} belongs to the {plugin} plugin, which {plugins.why_not_loaded(plugin)}; "
                          f"drop {flag} or make the {plugin} plugin available")


def make_plugins(blocked: Sequence[str], env=None, modules: Sequence[str] = ()) -> PluginManager:
    """The plugin manager of a command: entry points, ``--disable-plugin``,
    ``UNIBUS_LOAD_PLUGINS``, and the modules of ``--plugin``."""
    env = os.environ if env is None else env
    return PluginManager(blocked=blocked, only=load_plugins_from_env(env), modules=modules)


def load_settings(command: str, argv: Sequence[str], env=None) -> tuple[Settings, PluginManager]:
    """Flags + env → (Settings, PluginManager), as ``serve`` and ``posture`` see them.

    Refusals, in order: a flag of a plugin that is not loaded; ``--help``
    still works with a broken plugin (and lists it); then any broken plugin;
    then the flags themselves.
    """
    env = os.environ if env is None else env
    pre, _ = _disable_pre_parser().parse_known_args(argv)
    plugins = make_plugins(pre.disable_plugin, env, pre.plugin)
    return settings_for(command, argv, plugins, env), plugins


def settings_for(command: str, argv: Sequence[str], plugins: PluginManager, env=None) -> Settings:
    """``serve`` flags + env → Settings for the plugins of ``plugins`` (also what
    ``unibus.testing`` uses): options, parsing, validation, then ``validate_settings``."""
    env = os.environ if env is None else env
    plugin_options = plugins.options(reserved=reserved_flags())
    _refuse_unavailable_flags(argv, plugins, {opt.flag for _, opt in plugin_options})
    ns = _serve_parser(command, plugin_options, plugins).parse_args(argv)
    plugins.require_healthy()
    settings = build_settings(ns, env, plugin_options, disabled_plugins=plugins.blocked)
    if settings.nats_url is not None and ns.bus_auth is not None and settings.bus_auth == "enforce":
        # Asked for in so many words, and impossible: never run the bus open silently (an audit found
        # the posture saying bus_auth off and the start going on). The default stays a warning.
        raise ConfigError("--bus-auth enforce: membershipd cannot enforce bus authorization on an external NATS "
                          "server (--nats-url): that server authorizes its own clients. Give --bus-auth off and "
                          "secure that server, or drop --nats-url to run the embedded one")
    if settings.bus_auth == "enforce" and "auth_enforce" in plugins.blocked:
        raise ConfigError("--disable-plugin auth_enforce is accepted only together with --bus-auth off")
    plugins.validate_settings(settings)
    return settings


class EarlySighups:
    """SIGHUPs before the daemon's own handler, remembered instead of ending the process (the
    default action): a review sent one 0.3 s after the start, and ``membershipd`` died, a stop
    systemd takes as clean. The daemon reads the store once its start is done (``seen``)."""

    def __init__(self) -> None:
        import signal

        self.seen = False
        signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, _signum: int, _frame: Any) -> None:
        self.seen = True


def cmd_serve(argv: Sequence[str]) -> int:
    early = EarlySighups()  # before the slow part of the start: the imports, the settings' files
    from .daemon import serve

    _configure_logging()
    settings, plugins = load_settings("serve", argv)
    # Read once into Settings; no child process may inherit it.
    os.environ.pop(CLUSTER_PASS_ENV, None)
    return serve(settings, plugins, sighup_before=lambda: early.seen)


def cmd_posture(argv: Sequence[str]) -> int:
    from .posture import CLUSTER_REQUIRED, cluster_gate, startup_posture
    from .settings import insecure_plaintext_warnings, require_route_password, require_routes

    # A plugin hook that raises (cli_options, validate_settings, posture) is exit 2 here, not serve's
    # 1: exit 1 would read "not enforce+acl+tls" to a script that checks the posture.
    try:
        settings, plugins = load_settings("posture", argv)
        posture = startup_posture(settings, plugins)
    except RuntimeFailure as e:
        raise ConfigError(str(e)) from None
    try:
        cluster_gate(posture, settings.clustered)
    except ConfigError as e:
        refused: ConfigError | None = e  # what serve would refuse with; the exit code says 1
    else:
        refused = None
        require_route_password(settings)  # the gate passes: serve would refuse this next (exit 2)
    print(json.dumps(posture, indent=2))
    for warning in insecure_plaintext_warnings(settings):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    try:
        require_routes(settings)
    except ConfigError as e:  # not a matter of posture; serve refuses it (exit 2)
        print(f"{PROG}: warning: {e}; serve refuses it", file=sys.stderr)
    if refused is not None:
        print(f"{PROG}: {refused}", file=sys.stderr)
        try:
            require_route_password(settings)
        except ConfigError as e:
            print(f"{PROG}: {e}", file=sys.stderr)  # and, once the gate passes, this
    return 0 if posture["summary"] == CLUSTER_REQUIRED else 1


def _add_data_dir(parser: argparse.ArgumentParser,
                  help: str = f"state directory [{DATA_DIR.env}] (default {DATA_DIR.default})") -> None:
    """``--data-dir`` of an operator command: the same variable and default as serve's."""
    parser.add_argument(DATA_DIR.flag, metavar=DATA_DIR.metavar, help=help)


def _data_dir_parser(command: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} {command}", description=_DESCRIPTIONS[command])
    _add_data_dir(parser)
    return parser


def resolve_data_dir(ns: argparse.Namespace) -> Path:
    return data_dir_from(ns, os.environ)


def cmd_migrate(argv: Sequence[str]) -> int:
    from .daemon import prepare_data_dir
    from .store.db import migrate, trust_root

    ns = _data_dir_parser("migrate").parse_args(argv)
    data_dir = resolve_data_dir(ns)
    prepare_data_dir(data_dir)
    before, after = migrate(data_dir / "membershipd.db")
    if before == after:
        lines = [f"{data_dir / 'membershipd.db'}: already at revision {after}"]
    else:
        lines = [f"{data_dir / 'membershipd.db'}: migrated {before or 'empty'} -> {after}"]
    root = trust_root(data_dir / "membershipd.db")
    if root is not None:
        lines.append(f"trust root fingerprint: {root} (members pin it with `unibus trust {root}`)")
    return _report(f"{data_dir / 'membershipd.db'} is at revision {after}", lines)


def cmd_plugins(argv: Sequence[str]) -> int:
    parser = _Parser(prog=f"{PROG} plugins", description=_DESCRIPTIONS["plugins"])
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    add_plugin_selection_arguments(parser)
    _add_data_dir(parser, help="accepted like every command's; plugins do not depend on it")
    ns = parser.parse_args(argv)
    plugins = make_plugins(ns.disable_plugin, modules=ns.plugin)
    plugins.options(reserved=reserved_flags())  # a plugin whose cli_options fails is listed as broken
    infos = plugins.list_plugins()
    if ns.json:
        print(json.dumps([i.as_json() for i in infos], indent=2))
        return 0
    for i in infos:
        print(f"{i.name}  ({i.distribution or '-'} {i.version or '-'})" + ("  BROKEN" if i.error else ""))
        if i.error:
            print(f"    error: {i.error}")
        else:
            print(f"    hooks: {', '.join(i.hooks) or '-'}")
    if plugins.blocked:
        print(f"blocked: {', '.join(plugins.blocked)}")
    if plugins.not_loaded:
        print(f"not loaded ({LOAD_PLUGINS_ENV}): {', '.join(plugins.not_loaded)}")
    return 0


def _member_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} member", description=_DESCRIPTIONS["member"])
    sub = parser.add_subparsers(dest="action", required=True, metavar="add")
    add = sub.add_parser("add", help="add a member (the first admin, typically)")
    _add_data_dir(add)
    add.add_argument("--handle", required=True, help="^[a-z][a-z0-9_-]{0,31}$")
    add.add_argument("--role", required=True, help="admin or member")
    add.add_argument("--sign-pub", required=True, metavar="B64", help="raw Ed25519 public key, standard base64")
    add.add_argument("--enc-pub", required=True, metavar="B64", help="raw HPKE public key of --enc-suite, standard base64")
    add.add_argument("--enc-suite", default="X25519", metavar="S", help="X25519 (default) or MLKEM768_X25519")
    add.add_argument("--bus-pub", required=True, metavar="U...",
                     help="the member's bus key, a NATS user nkey (unibus keygen prints it); never the signing key")
    return parser


def _checked(flag: str, validate: Any, *args: Any) -> Any:
    """``validate(*args)``; a malformed handle or key is a ConfigError naming ``flag``."""
    from .wire import HandleError, KeyFormatError

    try:
        return validate(*args)
    except (HandleError, KeyFormatError) as e:
        raise ConfigError(f"{flag}: {e}") from None


def _member_keys(ns: argparse.Namespace) -> tuple[str, str, str, str, str]:
    """``(handle, enc_suite, sign_pub, enc_pub, bus_pub)`` of ``member add``, each checked in flag order."""
    from .store.base import ROLES
    from .wire import (nkey_from_sign_pub, validate_bus_pub, validate_enc_pub, validate_enc_suite, validate_handle,
                       validate_sign_pub)

    handle = _checked("--handle", validate_handle, ns.handle)
    if ns.role not in ROLES:
        raise ConfigError(f"--role: {ns.role!r} is not allowed; use admin or member")
    suite = _checked("--enc-suite", validate_enc_suite, ns.enc_suite)
    sign_pub = _checked("--sign-pub", validate_sign_pub, ns.sign_pub)
    enc_pub = _checked("--enc-pub", validate_enc_pub, ns.enc_pub, suite)
    bus_pub = _checked("--bus-pub", validate_bus_pub, ns.bus_pub)
    if bus_pub == nkey_from_sign_pub(sign_pub):
        raise ConfigError("--bus-pub: is the nkey of --sign-pub; the bus key must be a separate key "
                          "(unibus keygen prints both)")
    return handle, suite, sign_pub, enc_pub, bus_pub


def cmd_member(argv: Sequence[str]) -> int:
    from sqlalchemy.orm import Session

    from .daemon import prepare_data_dir
    from .store.base import Conflict
    from .store.db import make_engine, migrate
    from .store.sqlite import append_bootstrap_sync, new_member

    ns = _member_parser().parse_args(argv)
    handle, suite, sign_pub, enc_pub, bus_pub = _member_keys(ns)
    data_dir = resolve_data_dir(ns)
    db = data_dir / "membershipd.db"
    prepare_data_dir(data_dir)  # its owner and modes first: nothing of another user's is read
    cluster = _cluster_node_data_dir(data_dir)
    if cluster and _has_members(db):
        # Its membershipd.db was the bootstrap; the cluster's log lives in KV and has moved on: a
        # walk-through of the runbook added a member here, was told to send SIGHUP (which a
        # cluster node does not read it for) and got a trust root the cluster does not have.
        raise ConfigError(f"--data-dir: {data_dir} is a cluster node's, which serves from JetStream KV, and its "
                          "membershipd.db was bootstrapped already: copy it into the cluster with `membershipd "
                          "migrate-to-kv` if that was not done, then add members with `unibus members add`; to "
                          "recover lost admins, add one in a scratch directory restored from a backup "
                          '(docs/operations.md, "Bootstrapping the first admin")')
    migrate(db)
    engine = make_engine(db)
    try:
        # The member and its bootstrap entry of the membership log: one transaction.
        with Session(engine) as session, session.begin():
            seq, fingerprint = append_bootstrap_sync(session, new_member(handle, ns.role, sign_pub, enc_pub, suite,
                                                                         bus_pub))
    except Conflict as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if cluster:
        lines = [f"added {ns.role} {handle!r} to {db}; a cluster node serves from JetStream KV: copy it there with "
                 "`membershipd migrate-to-kv` once the cluster has formed (deploy/cluster/README.md, \"Join\"), "
                 "which refuses a cluster that has a membership log already: there, use `unibus members add`",
                 f"trust root fingerprint: {fingerprint}, the cluster's once migrate-to-kv has copied this log into "
                 f"it (members pin it with `unibus trust {fingerprint}`)"]
        return _report(f"{handle!r} was added", lines)
    lines = [f"added {ns.role} {handle!r} to {db}; send SIGHUP to a running membershipd to pick it up"]
    if seq == 0:
        lines.append(f"trust root fingerprint: {fingerprint} (members pin it with `unibus trust {fingerprint}`)")
    else:
        lines.append(f"recovery bootstrap at seq {seq}, fingerprint {fingerprint}: clients refuse it until each "
                     f"member runs `unibus trust {fingerprint}`")
    return _report(f"{handle!r} was added", lines)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _add_nats_target_arguments(parser: argparse.ArgumentParser, *, required: bool, what: str,
                               seed: str | None = None) -> None:
    """The connection flags of the commands that reach a node's NATS (migrate-to-kv, backup,
    remove-peer); ``seed``: the file in the data directory that ``--nkey-seed-file`` defaults to."""
    from .servicekey import SERVICE_NKEY_FILE

    parser.add_argument("--nats-url", required=required, metavar="URL", help=what)
    parser.add_argument("--ca", metavar="PATH", help="CA that verifies the target's TLS certificate (required off loopback)")
    parser.add_argument("--cert", metavar="PATH", help="client certificate for a target that verifies clients (with --key, --ca)")
    parser.add_argument("--key", metavar="PATH", help="the client certificate's private key (mode 0600)")
    parser.add_argument("--nkey-seed-file", metavar="PATH",
                        help=f"the nkey seed to authenticate with (default <data-dir>/{seed or SERVICE_NKEY_FILE})")


@dataclass(frozen=True)
class _NatsTarget:
    """A checked ``--nats-url`` with its TLS files (no file read yet)."""

    url: str
    netloc: str
    ca: Path | None
    cert: Path | None
    key: Path | None


def _check_nats_target(ns: argparse.Namespace) -> _NatsTarget:
    """The connection rules (docs/operations.md, "Operator commands"): a loopback target, or TLS
    verified against ``--ca``; no credentials in the URL; ``--cert``/``--key`` together and with ``--ca``."""
    from urllib.parse import urlsplit

    from .settings import shown_url

    if "@" in ns.nats_url:  # first: no message below may quote a password
        raise ConfigError("--nats-url must not carry credentials; authentication is by --nkey-seed-file")
    try:
        parts = urlsplit(ns.nats_url)
        hostname = parts.hostname
    except ValueError:  # urlsplit's "Invalid IPv6 URL"
        hostname = None
    if hostname is None or parts.scheme not in ("nats", "tls"):
        raise ConfigError(f"--nats-url: {shown_url(ns.nats_url)} must be nats://HOST:PORT or tls://HOST:PORT")
    from .options import convert_value, nats_url

    convert_value("--nats-url", ns.nats_url, nats_url)  # no path, query or fragment; a port in range
    ca = Path(ns.ca).expanduser() if ns.ca else None
    if ca is None and not _is_loopback(hostname):
        raise ConfigError(f"--nats-url: {hostname} is not a loopback address; give --ca PATH to require "
                          "TLS verified against that CA")
    if ca is not None and not ca.is_file():
        raise ConfigError(f"--ca: {ca} is not a readable file")
    cert = Path(ns.cert).expanduser() if ns.cert else None
    key = Path(ns.key).expanduser() if ns.key else None
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together; give both or neither")
    if cert is not None and ca is None:
        raise ConfigError("--cert/--key are presented over TLS, which --ca turns on; give --ca PATH too")
    for flag, path in (("--cert", cert), ("--key", key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag}: {path} is not a readable file")
    return _NatsTarget(ns.nats_url, parts.netloc, ca, cert, key)


def _open_nats_target(ns: argparse.Namespace, target: _NatsTarget, data_dir: Path,
                      seed_name: str | None = None) -> tuple[str, Any, Any]:
    """``(url, seed, TLS context or None)``: the seed of ``--nkey-seed-file`` (default
    ``<data-dir>/service.nkey``, or ``seed_name`` there; mode 0600) and TLS verified against
    ``--ca`` (``tls://``)."""
    from .servicekey import SERVICE_NKEY_FILE, load_nkey_seed

    from .aio import quiet_tls_eof_warnings

    quiet_tls_eof_warnings()  # nats-py's TLS connections are upgraded plain ones: asyncio warned of each close
    seed_file = Path(ns.nkey_seed_file).expanduser() if ns.nkey_seed_file else data_dir / (seed_name or SERVICE_NKEY_FILE)
    try:
        seed, _ = load_nkey_seed(seed_file)
    except UnibusError as e:
        raise ConfigError(f"--nkey-seed-file: {e}") from None
    if target.ca is None:
        return target.url, seed, None
    from .tls import TLSFileError, client_context

    try:  # verifies chain and host name; presents --cert if given
        tls = client_context(target.ca, target.cert, target.key, names=("--ca", "--cert", "--key"))
    except TLSFileError as e:
        raise ConfigError(str(e)) from None
    return "tls://" + target.netloc, seed, tls


def _connect_hint(failure: RuntimeFailure, url: str, has_ca: bool) -> RuntimeFailure:
    """``failure`` to connect to ``--nats-url``, with what to change where the cause says it (a
    walk-through of the cluster runbook got the bare TLS or protocol error, naming no flag; a
    review, a hint that blamed --ca for a certificate of the wrong names)."""
    said = str(failure)
    if not said.startswith("cannot connect to NATS"):
        return failure
    lowered = said.lower()
    plain = url.startswith("nats://") and not has_ca
    if "hostname mismatch" in lowered or "ip address mismatch" in lowered:
        hint = ("the node's NATS certificate does not name that host: dial a name it has (localhost where "
                "deploy/generate-certs.sh made it), or make it again with that name")
    elif "certificate has expired" in lowered or "not yet valid" in lowered:
        hint = "the node's NATS certificate is out of its validity: renew it (deploy/generate-certs.sh)"
    elif "certificate verify failed" in lowered:
        hint = ("is --ca the CA that issued the node's NATS certificate?" if has_ca else
                "give --ca PATH, the CA of the node's NATS certificate: client-ca.crt, where "
                "deploy/generate-certs.sh made it")
    elif "certificate required" in lowered:
        hint = "the node verifies its clients (--tls-ca): give --cert and --key"
    elif "wrong_version_number" in lowered:
        hint = "the listener does not speak TLS: give a nats:// URL, without --ca"
    elif plain and ("expecting info" in lowered or "timeouterror" in lowered):
        hint = "no greeting: if the listener wants TLS first, give a tls:// URL and --ca"
    else:
        return failure
    return RuntimeFailure(f"{said} ({hint})")


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _migrate_to_kv_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} migrate-to-kv", description=_DESCRIPTIONS["migrate-to-kv"])
    _add_data_dir(parser)
    _add_nats_target_arguments(parser, required=True, what="the target NATS (a node's loopback URL)")
    parser.add_argument("--kv-replicas", type=int, choices=(1, 3, 5), default=1, metavar="N",
                        help="replicas if the bucket or the blob store must be created (an existing one keeps its "
                             "own; default 1)")
    return parser


def _check_source(db: Path) -> None:
    """The database to copy holds what its membership log establishes (restore's checks; its
    recovery bootstraps are the operator's own). A row edited or added behind the log's back
    was copied into the cluster, where every client then refused the log (red team: a recovery
    whose member row was edited gave another key pair the recovered admin's handle)."""
    from .backup import log_disagreement

    why = log_disagreement(db)
    if why is not None:
        raise ConfigError(f"--data-dir: {db} cannot be copied: {why}; nothing copied")


async def _copy_to_kv(url: str, seed: Any, tls: Any, data_dir: Path, replicas: int) -> dict[str, int]:
    """Copy the SQLite store of ``data_dir``, then its blobs, into the cluster behind ``url``; the counts."""
    from .bus import Bus
    from .plugins.blobstore.archive import copy_to_object_store
    from .store.db import migrate
    from .store.kv import KvStore, copy_store
    from .store.sqlite import SqliteStore

    db = data_dir / "membershipd.db"
    migrate(db)
    _check_source(db)  # before any connection: nothing else runs on this loop yet
    bus = Bus(url, seed, name="membershipd-migrate-to-kv", tls=tls)
    src = SqliteStore(db)
    try:
        # The copy is idempotent: a stop leaves what the next run completes. The closes below are
        # not stoppable: a signal there is kept, and dropped as the command ends with its count.
        async with stoppable():
            await bus.connect(timeout=10, jetstream_timeout=30)
            dst = KvStore(bus.js, replicas=replicas)
            await dst.ensure()
            counts = await copy_store(src, dst)

            async def room_exists(room_id: str) -> bool:
                return await dst.get_room(room_id) is not None

            # The blobs last: the object store keeps only blobs of rooms the bucket has.
            counts["blobs"] = await copy_to_object_store(bus.js, data_dir / "blobs", replicas=replicas,
                                                         room_exists=room_exists, warn=_warn)
        return counts
    finally:
        await src.close()
        await bus.close()


def check_existing_data_dir(data_dir: Path) -> None:
    """What ``prepare_data_dir`` checks, for a command that only reads the data directory
    (``backup``, ``migrate-to-kv``): nothing is created, another user's directory or database is
    refused (exit 2). docs/operations.md, "The data directory"."""
    from .daemon import OWN_FILES
    from .privatefiles import check_own_file, check_private_dir

    if not data_dir.is_dir():
        raise ConfigError(f"--data-dir: {data_dir} is not a directory; give the data directory of the node")
    check_private_dir(data_dir, "--data-dir")
    for name in OWN_FILES:
        check_own_file(data_dir / name, "--data-dir")


def cmd_migrate_to_kv(argv: Sequence[str]) -> int:
    import asyncio
    import ssl

    from .plugins.blobstore.backend import BlobError
    from .settings import redact_url
    from .store.base import StoreError

    ns = _migrate_to_kv_parser().parse_args(argv)
    target = _check_nats_target(ns)
    data_dir = resolve_data_dir(ns)
    db = data_dir / "membershipd.db"
    if not db.exists():
        raise ConfigError(f"--data-dir: {db} does not exist; nothing to copy (run membershipd member add first)")
    check_existing_data_dir(data_dir)
    url, seed, tls = _open_nats_target(ns, target, data_dir)
    try:
        counts = asyncio.run(_copy_to_kv(url, seed, tls, data_dir, ns.kv_replicas))
    except RuntimeFailure as e:
        raise _connect_hint(e, url, tls is not None) from None
    except (StoreError, BlobError, ssl.SSLError, OSError) as e:
        raise RuntimeFailure(f"migrate-to-kv to {redact_url(url)} failed: {type(e).__name__}: {e}") from None
    return _report("the copy is done", [
        f"copied {counts['log_entries']} membership log entr{'y' if counts['log_entries'] == 1 else 'ies'}, "
        f"{counts['members']} member(s), {counts['rooms']} room(s), {counts['sealed_epochs']} sealed "
        f"epoch(s), {counts['blobs']} blob(s) to {redact_url(url)}"
        + ("" if any(counts.values()) else " (already there: nothing to do)")])


def _has_members(db: Path) -> bool:
    """Whether the database ``db`` holds a member (read only; a missing or unreadable one holds none)."""
    import contextlib
    import sqlite3

    if not db.is_file():
        return False
    try:  # immutable: no -wal or -shm file made beside it (a review); no process writes it meanwhile
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro&immutable=1", uri=True)) as conn:
            return conn.execute("SELECT 1 FROM members LIMIT 1").fetchone() is not None
    except sqlite3.Error:
        return False


def _remove_peer_parser() -> argparse.ArgumentParser:
    from .servicekey import SYSTEM_NKEY_FILE

    parser = _Parser(prog=f"{PROG} remove-peer", description=_DESCRIPTIONS["remove-peer"])
    _add_data_dir(parser)
    _add_nats_target_arguments(parser, required=True, what="this live node's NATS (its loopback URL)",
                               seed=SYSTEM_NKEY_FILE)
    parser.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for every live node to drop the peer (default 60)")
    parser.add_argument("--dry-run", action="store_true", help="check everything, remove nothing")
    parser.add_argument("--allow-others-down", action="store_true",
                        help="remove it although another peer answers nothing either (that one gone for good too)")
    parser.add_argument("name", metavar="NAME", help="the --server-name of the node that is gone for good")
    return parser


def cmd_remove_peer(argv: Sequence[str]) -> int:
    """deploy/cluster/README.md, "Replacing a dead node"; the logic is :mod:`unibus.removepeer`."""
    import asyncio
    import ssl

    from .servicekey import SYSTEM_NKEY_FILE
    from .settings import SERVER_NAME_RE, redact_url

    ns = _remove_peer_parser().parse_args(argv)
    if not SERVER_NAME_RE.fullmatch(ns.name):
        # what --server-name takes; never a line break, a wildcard or an empty name (a review
        # printed a second "error:" line through one)
        raise ConfigError(f"NAME: {ns.name!r} is not a server name; give the --server-name of the dead node")
    if not 0 < ns.wait <= 3600:
        raise ConfigError(f"--wait: {ns.wait:g} must be more than 0 and at most 3600 seconds")
    target = _check_nats_target(ns)
    data_dir = resolve_data_dir(ns)
    check_existing_data_dir(data_dir)
    url, seed, tls = _open_nats_target(ns, target, data_dir, SYSTEM_NKEY_FILE)

    def say(line: str) -> None:
        print(line, flush=True)

    async def run() -> list[str]:
        from .bus import Bus
        from .removepeer import remove_peer

        bus = Bus(url, seed, name="membershipd-remove-peer", tls=tls,
                  seed_name=Path(ns.nkey_seed_file).name if ns.nkey_seed_file else SYSTEM_NKEY_FILE)
        try:
            async with stoppable():
                await bus.connect(timeout=10, check_jetstream=False)
            info = getattr(bus.nc, "_server_info", None) or {}
            me = str(info.get("server_name") or info.get("name") or "")
            return await remove_peer(bus.nc, me, ns.name, wait=ns.wait, dry_run=ns.dry_run,
                                     others_down_ok=ns.allow_others_down, say=say)
        finally:
            await bus.close()

    try:
        lines = asyncio.run(run())
    except RuntimeFailure as e:
        raise _connect_hint(e, url, tls is not None) from None
    except (ssl.SSLError, OSError) as e:
        raise RuntimeFailure(f"remove-peer through {redact_url(url)} failed: {type(e).__name__}: {e}") from None
    return _report(f"{ns.name} was removed" if not ns.dry_run else "the dry run is done", lines)


def _cluster_node_data_dir(data_dir: Path) -> bool:
    """Whether ``data_dir`` belongs to a cluster node: its generated nats.conf has a cluster block."""
    try:
        conf = json.loads((data_dir / "nats.conf").read_text())
        return isinstance(conf, dict) and isinstance(conf.get("cluster"), dict)
    except (OSError, ValueError, TypeError):
        return False


def _backup_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} backup", description=_DESCRIPTIONS["backup"])
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the archive to write (a new file; gzip-compressed when it ends in .gz or .tgz)")
    _add_data_dir(parser)
    _add_nats_target_arguments(parser, required=False,
                               what="back up a cluster through this node's NATS (its loopback URL) instead of the "
                                    "single node in --data-dir")
    return parser


def _backup_out(ns: argparse.Namespace) -> Path:
    """``--out``: a new file in a writable directory (backup never overwrites)."""
    out = Path(ns.out).expanduser()
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out: {out} exists; backup never overwrites a file: give a new name")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: {out.parent} is not a directory; create it first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out: cannot write in {out.parent}; choose a writable directory")
    return out


def _backup_node(ns: argparse.Namespace, data_dir: Path, out: Path) -> Any:
    """The backup of the single node in ``data_dir`` (no ``--nats-url``)."""
    from .backup import backup_single

    for flag in ("ca", "cert", "key", "nkey_seed_file"):
        if getattr(ns, flag):
            raise ConfigError(f"--{flag.replace('_', '-')} goes with --nats-url (a cluster backup); drop it to "
                              "back up the single node in --data-dir")
    if not (data_dir / "membershipd.db").is_file():
        raise ConfigError(f"--data-dir: {data_dir / 'membershipd.db'} does not exist; nothing to back up")
    check_existing_data_dir(data_dir)
    if _cluster_node_data_dir(data_dir):
        raise ConfigError(f"--data-dir: {data_dir} belongs to a cluster node, whose state is in JetStream; "
                          "back up the cluster with --nats-url (the node's loopback NATS URL)")
    try:
        return backup_single(data_dir, out, _warn)
    except OSError as e:
        raise RuntimeFailure(f"backup of {data_dir} failed: {type(e).__name__}: {e} (a file vanished while it "
                             "was read? was membershipd started meanwhile? run backup again)") from None


def _backup_through_nats(ns: argparse.Namespace, data_dir: Path, out: Path) -> Any:
    """The backup of a cluster, through the node's NATS at ``--nats-url``."""
    import asyncio
    import ssl

    from .backup import backup_cluster
    from .plugins.blobstore.backend import BlobError
    from .settings import redact_url
    from .store.base import StoreError

    target = _check_nats_target(ns)
    url, seed, tls = _open_nats_target(ns, target, data_dir)

    async def run() -> Any:
        from .bus import Bus

        bus = Bus(url, seed, name="membershipd-backup", tls=tls)
        try:
            async with stoppable():  # the connection and the wait for JetStream (up to 40 s)
                await bus.connect(timeout=10, jetstream_timeout=30)
            info = getattr(bus.nc, "_server_info", None) or {}
            return await backup_cluster(bus.js, str(info.get("server_name") or target.netloc), out, _warn)
        finally:
            await bus.close()

    try:
        return asyncio.run(run())
    except RuntimeFailure as e:
        raise _connect_hint(e, url, tls is not None) from None
    except (StoreError, BlobError, ssl.SSLError, OSError) as e:
        raise RuntimeFailure(f"backup through {redact_url(url)} failed: {type(e).__name__}: {e}") from None


def cmd_backup(argv: Sequence[str]) -> int:
    ns = _backup_parser().parse_args(argv)
    out = _backup_out(ns)
    data_dir = resolve_data_dir(ns)
    if ns.nats_url is None:
        result = _backup_node(ns, data_dir, out)
    else:
        result = _backup_through_nats(ns, data_dir, out)
    return _report(f"the backup {out} is written", [result.summary()])


def _fingerprint_flag(flag: str, value: str) -> str:
    fingerprint = value.strip().lower()  # as printed, or copied in capitals
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise ConfigError(f"{flag}: {value!r} is not a fingerprint (64 hex digits, as restore or membershipd "
                          "member add printed it)")
    return fingerprint


def cmd_restore(argv: Sequence[str]) -> int:
    from .backup import restore

    parser = _Parser(prog=f"{PROG} restore", description=_DESCRIPTIONS["restore"])
    parser.add_argument("--in", dest="archive", required=True, metavar="FILE", help="the archive membershipd backup wrote")
    _add_data_dir(parser, help=f"the directory to restore into: empty or new [{DATA_DIR.env}] (default "
                               f"{DATA_DIR.default})")
    parser.add_argument("--accept-bootstrap", action="append", default=[], metavar="FINGERPRINT",
                        help="a recovery bootstrap in the archive's log that your operator made (an offline "
                             "membershipd member add after the first entry; restore names it); repeatable")
    parser.add_argument("--expect-root", metavar="FINGERPRINT",
                        help="the trust root fingerprint your members pinned: an archive whose membership log "
                             "starts with another is refused (nothing in an archive proves whose it is)")
    ns = parser.parse_args(argv)
    ns.accept_bootstrap = [_fingerprint_flag("--accept-bootstrap", fp) for fp in ns.accept_bootstrap]
    if ns.expect_root is not None:
        ns.expect_root = _fingerprint_flag("--expect-root", ns.expect_root)
    archive = Path(ns.archive).expanduser()
    if not archive.is_file():
        raise ConfigError(f"--in: {archive} is not a readable file")
    data_dir = Path(os.path.abspath(resolve_data_dir(ns)))
    result = restore(archive, data_dir, ns.accept_bootstrap, ns.expect_root)
    lines = [result.summary()]
    root = result.facts.trust_root
    if root and result.new_root:  # a store from before the membership log: the migration wrote its entry 0
        lines.append(f"trust root fingerprint: {root} (new: members pin it with `unibus trust {root}`)")
    elif root and ns.expect_root:
        lines.append(f"trust root fingerprint: {root} (as --expect-root: members keep their pin)")
    elif root:
        # Nothing in an archive proves whose deployment it is (its manifest is no signature), so
        # this is not "unchanged": the operator compares it with what members pinned.
        lines.append(f"trust root fingerprint: {root} (the archive's: members keep their pin if it is the one "
                     "they pinned; compare it, since an archive of another deployment restores as well)")
    lines.append(f"start membershipd with --data-dir {data_dir}; it makes a new service.nkey, system.nkey and "
                 "nats.conf" + ("; to make a cluster of it, run membershipd migrate-to-kv from this directory"
                                if result.manifest["kind"] == "cluster" else ""))
    return _report(f"{data_dir} is restored", lines)


HANDLERS = {"serve": cmd_serve, "migrate-to-kv": cmd_migrate_to_kv, "backup": cmd_backup, "restore": cmd_restore,
            "remove-peer": cmd_remove_peer, "migrate": cmd_migrate, "member": cmd_member, "posture": cmd_posture,
            "plugins": cmd_plugins}


def _top_help() -> str:
    lines = [f"usage: {PROG} [COMMAND] [FLAGS]", "", "commands:"]
    width = max(map(len, COMMANDS))
    for name in COMMANDS:
        lines.append(f"  {name:<{width}}  {_DESCRIPTIONS[name]}")
    lines += ["", "serve is the default command; run 'membershipd serve --help' for its flags.", "  --version  print the version and exit"]
    try:
        plugins = make_plugins([])
        plugins.options(reserved=reserved_flags())
        broken = _broken_epilog(plugins)
    except UnibusError as e:  # e.g. a bad UNIBUS_LOAD_PLUGINS: say so, help still prints
        broken = f"plugins: {e}"
    if broken:
        lines += ["", broken]
    return "\n".join(lines)


def _configure_logging() -> None:
    level = os.environ.get("UNIBUS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from .aio import quiet_tls_eof_warnings

    quiet_tls_eof_warnings()


def _report(done: str, lines: Sequence[str]) -> int:
    """Print what a command that has made its change says (a fingerprint, a summary), then 0.

    The change is made by then, so standard output that cannot be written (a full disk, a
    closed descriptor) must not lose what it says: the same lines go to stderr, after one that
    names what was done and why it is there, and the exit is 1. A reader that went away (`| head`)
    is not an error (main's BrokenPipeError)."""
    text = "".join(f"{line}\n" for line in lines)
    try:
        if sys.stdout is None:  # started with descriptor 1 closed
            raise OSError(errno.EBADF, "standard output is closed")
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:  # ValueError: sys.stdout closed in this process
        if sys.stdout is not None:
            drop_stdout()
        why = getattr(e, "strerror", None) or str(e)
        sys.stderr.write(f"{PROG}: error: {done}, but standard output could not be written ({why}); "
                         f"what it says follows here\n{text}")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """membershipd's command line; its exit code. Without ``argv`` it is the process's own entry
    (the console script, ``python -m unibus.cli``): an operator command then leaves the stop
    signals set to end the process with its code (:func:`unibus.stopsignals.exit_on_stop_signal`).
    A program that embeds it passes ``argv``, and gets its handlers back as they were."""
    args = list(sys.argv[1:] if argv is None else argv)
    operator = args[:1] != ["serve"] and args[:1] and args[0] in HANDLERS
    code = _exit_code(args, own_process=argv is None)
    if argv is None and operator:  # its own process (the console script, ``python -m``)
        exit_on_stop_signal(code)
    return code


def _exit_code(args: list[str], *, own_process: bool) -> int:
    try:
        code = _main(args, own_process=own_process)
        sys.stdout.flush()  # here, not at the exit, where a failed write is a traceback of its own
        return code
    except UnibusError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except StopSignal as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `membershipd plugins | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # standard output that cannot be written (`> /dev/full`: a red team's traceback)
        drop_stdout()
        where = f" ({e.filename})" if e.filename else ""
        print(f"{PROG}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def _main(argv: list[str], *, own_process: bool = False) -> int:
    if argv[:1] in (["--version"], ["-V"]):
        print(f"{PROG} {__version__}")
        return 0
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(_top_help())
        return 0
    command = "serve"
    if argv and argv[0] in HANDLERS:
        command = argv.pop(0)
    elif argv and not argv[0].startswith("-"):
        print(f"usage: {PROG} [{'|'.join(COMMANDS)}] [FLAGS]", file=sys.stderr)
        from .settings import shown_url

        print(f"{PROG}: error: unknown command {shown_url(argv[0])}; use one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    if command == "serve":  # it sets up its own signal handling
        return cmd_serve(argv)
    # A stop signal ends only its stoppable parts (unibus.stopsignals); in its own process, one
    # after the command is dropped, and then ends the exit with the command's code (main).
    with operator_command(restore=not own_process):
        return HANDLERS[command](argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
