"""``unibus``: the member's command-line client (docs/client.md).

Exit codes: 0 done; 1 the server refused or failed, or could not be reached
(one line on stderr: its problem detail, or the URL it could not reach);
2 bad usage, or a missing/unreadable identity file (one line saying what to
do). Expected errors never print a traceback; private keys are never printed.
The guide is docs/client.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import shlex
import signal
import stat
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__ as _version
from ..stdout import FailedWritesRaise, drop_stdout
from .api import (
    DEFAULT_MAX_AGE,
    ApiError,
    BusError,
    Message,
    NotARoomMember,
    RekeyRequired,
    ServerUnreachable,
    UnibusClient,
    member_view,
    room_view,
)
from .keys import (
    DEFAULT_ENC_SUITE,
    ENC_SUITES,
    HandleError,
    IdentityError,
    KeyFormatError,
    generate_identity,
    load_identity,
    save_identity,
    upgrade_identity_file,
    validate_bus_pub,
    validate_enc_pub,
    validate_enc_suite,
    validate_handle,
    validate_sign_pub,
)
from .replica import FINGERPRINT_RE, ReplicaError, VerificationError, replica_root_for
from .sealing import SealError, message_subject, room_subject, validate_room_id

PROG = "unibus"
DEFAULT_SERVER = "http://127.0.0.1:8470"
DEFAULT_IDENTITY = "~/.config/unibus/identity.json"
ROLES = ("member", "admin")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or an unusable identity file: exit 2."""


class Failed(Exception):
    """The server refused or failed, or could not be reached: exit 1."""


# --------------------------------------------------------------------------- output helpers


def _one_line(text: Any) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def _err(message: str) -> None:
    # escaped: the message may carry a server's problem detail, and a compromised
    # server must not drive the terminal (escape sequences that erase the line)
    print(f"{PROG}: error: {_escape(_one_line(message))}", file=sys.stderr, flush=True)


def _local_file_error(exc: OSError) -> str:
    """``path: reason`` for a local file that could not be read or written, with the exception's
    notes behind it (a second failure: ``unibus.client.blobs.encrypt_file`` adds one)."""
    also = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
    return f"{exc.filename or ''}: {exc.strerror or exc}{also}".lstrip(": ")


def _note(message: str) -> None:
    print(f"{PROG}: {_escape(message)}", file=sys.stderr, flush=True)


class _Stdout:
    """What became of standard output: a write that failed (a full disk) diverts the rest of a
    command's output to stderr, since the change the command made is done by then and what it
    prints (a room id, a blob id, a fingerprint) must not be lost; the exit is then 1 (main)."""

    failed: OSError | None = None


def _out(line: str = "", *, divert: bool = True) -> None:
    """One line on standard output. ``divert=False`` (a message ``listen`` received) raises a
    failed write instead: a message in clear never goes to stderr, which may be a journal."""
    if _Stdout.failed is None:
        try:
            if sys.stdout is None:  # started with descriptor 1 closed
                raise OSError(errno.EBADF, "standard output is closed")
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            return
        except BrokenPipeError:
            raise
        except OSError as exc:
            if not divert:
                raise
            _Stdout.failed = exc
            drop_stdout()
            _note(f"error: standard output could not be written ({exc.strerror or exc}); what this command "
                  "prints follows here")
    if not divert:
        raise _Stdout.failed
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _json_out(obj: Any, *, divert: bool = True) -> None:
    """One JSON line; characters a terminal acts on that JSON leaves as they are (DEL, the C1
    controls such as the 8-bit CSI, bidi controls, line separators) are written as ``\\uXXXX``,
    still the same JSON: a review's room name drove the terminal through `log show --json`."""
    _out(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_JSON_ESCAPES), divert=divert)


#: Characters that reorder or break the line around them (bidi controls, line and
#: paragraph separators): a name holding them could make a line read as another.
_REORDERING = frozenset("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
                        "\u2066\u2067\u2068\u2069")


#: What :func:`_json_out` writes as ``\\uXXXX`` (JSON itself escapes only what is below U+0020).
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in (*range(0x7F, 0xA0), *map(ord, _REORDERING))}


def _escape(text: str) -> str:
    """One printable line: control characters (newlines included), bidi controls and line
    separators are escaped. Everything the CLI prints that a server or another member
    chose goes through it: a compromised server must not drive the terminal."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        elif ch in _REORDERING:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _print_fields(record: dict[str, Any], keys: Sequence[str]) -> None:
    present = [k for k in keys if k in record]
    width = max((len(k) for k in present), default=0) + 1
    for k in present:
        v = record[k]
        if isinstance(v, bool):
            v = "yes" if v else "no"
        elif v is None:
            v = "(none)"
        _out(f"{k + ':':<{width}} {_escape(str(v))}")


def _table(rows: list[list[str]]) -> None:
    if not rows:
        return
    rows = [[_escape(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        _out("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


MEMBER_FIELDS = ("handle", "role", "enc_suite", "sign_pub", "enc_pub", "bus_pub", "created_at")
ROOM_FIELDS = ("room_id", "name", "subject", "owner", "epoch", "rekey_required", "created_at")


def _print_member(m: dict[str, Any], *, extra: Sequence[str] = ()) -> None:
    shown = dict(m)
    enc = shown.get("enc_pub")
    if isinstance(enc, str) and len(enc) > 60:
        shown["enc_pub"] = f"{enc[:44]}… ({len(enc) * 3 // 4 - enc.count('=')} bytes; --json for all)"
    _print_fields(shown, (*MEMBER_FIELDS, *extra))


def _print_room(room: dict[str, Any]) -> None:
    _print_fields(room, ROOM_FIELDS)
    members = room.get("members")
    if isinstance(members, list):
        _out(f"members: ({len(members)})")
        rows = [["  " + str(m.get("handle", "?")), str(m.get("enc_suite") or DEFAULT_ENC_SUITE)]
                for m in members if isinstance(m, dict)]
        _table(rows)


def _room_line(room: dict[str, Any]) -> list[str]:
    n = len(room.get("members") or []) if isinstance(room.get("members"), list) else None
    cols = [str(room.get("room_id", "?")), str(room.get("name", "")), f"epoch={room.get('epoch', '?')}"]
    if n is not None:
        cols.append(f"members={n}")
    cols.append("rekey-required" if room.get("rekey_required") else "")
    return cols


# --------------------------------------------------------------------------- argument parsing


class _Parser(FailedWritesRaise):
    """argparse that exits 2 with a usage line and one ``error:`` line (never a traceback)."""

    def error(self, message: str) -> NoReturn:  # pragma: no cover - exercised via subprocess
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)}\n")


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    parser.add_argument("--server", metavar="URL", default=d,
                        help=f"membershipd URL [UNIBUS_SERVER, default {DEFAULT_SERVER}]")
    parser.add_argument("--identity", metavar="PATH", default=d,
                        help=f"identity file [UNIBUS_IDENTITY, default {DEFAULT_IDENTITY}]")
    parser.add_argument("--ca", metavar="PATH", default=d,
                        help="CA (PEM) that verifies the server's HTTPS and tls:// bus certificates [UNIBUS_CA; "
                             "default: the system's trust store]")
    parser.add_argument("--cert", metavar="PATH", default=d,
                        help="client certificate (PEM), for a bus that verifies clients [UNIBUS_CERT]")
    parser.add_argument("--key", metavar="PATH", default=d, help="its private key (PEM, mode 0600) [UNIBUS_KEY]")


def _leaf(sub: Any, name: str, help: str, func: Callable[..., Any] | None = None, *positionals: str,
          json_flag: bool = True) -> argparse.ArgumentParser:
    """A command ``name`` under ``sub``: the global options, ``--json``, then each of
    ``positionals`` (metavar: its name in capitals); it runs ``func``."""
    p = sub.add_parser(name, help=help, description=help)
    _global_options(p, suppress=True)
    if json_flag:  # not given here: the value before the command stands
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print JSON (one object per line)")
    for positional in positionals:
        p.add_argument(positional, metavar=positional.upper())
    if func is not None:
        p.set_defaults(func=func)
    return p


def _group(sub: Any, name: str, help: str) -> Any:
    """A command ``name`` whose ACTION (required) is one of the commands added to what this returns."""
    group = sub.add_parser(name, help=help)
    actions = group.add_subparsers(dest=f"{name}_command", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    return actions


def build_parser(plugins: Sequence[object] = (), *, entry_points: bool = True) -> argparse.ArgumentParser:
    """The command line: the core commands, then the plugins' ``client_commands``
    (entry-point group ``unibus.client``, and ``plugins`` given by a test)."""
    parser = _Parser(prog=PROG, description="unibus: the member's client of an end-to-end-encrypted message bus.",
                     epilog="Exit codes: 0 done; 1 the server refused or failed; 2 bad usage or identity file. "
                            "Guide: docs/client.md")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version}")
    _global_options(parser, suppress=False)
    parser.add_argument("--json", action="store_true", help="print JSON (one object per line), as after a command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_keygen(sub)
    _leaf(sub, "whoami", "show your member record as the server knows it", cmd_whoami)
    _add_members(_group(sub, "members", "list, add (admin), remove (admin) members"))
    _add_rooms(_group(sub, "rooms", "create, list, show rooms; add/remove room members; rekey"))
    _add_send(sub)
    bsub = _group(sub, "blob", "put or get a room blob (encrypted with the room key on your side)")
    _leaf(bsub, "put", "encrypt FILE with the room's current key, upload it, print its blob id", cmd_blob_put,
          "room", "file")
    _leaf(bsub, "get", "download a blob, check it, decrypt it into OUT", cmd_blob_get, "room", "blob_id", "out")
    _add_listen(sub)
    _add_trust(sub)
    lsub = _group(sub, "log", "the server's membership log as this client verified it")
    _leaf(lsub, "show", "sync and print the trust root, the verified head, the members and rooms the log derives",
          cmd_log_show)
    _leaf(lsub, "verify", "verify the server's whole membership log again from seq 0 (exit 0 valid, 1 invalid)",
          cmd_log_verify)
    _add_plugin_commands(parser, sub, plugins, entry_points)
    return parser


def _add_keygen(sub: Any) -> None:
    p = _leaf(sub, "keygen", "create an identity file (keys) and print the operator's `membershipd member add` line",
              cmd_keygen)
    p.add_argument("--handle", help="your handle: ^[a-z][a-z0-9_-]{0,31}$ (required unless --upgrade)")
    p.add_argument("--enc-suite", choices=ENC_SUITES,
                   help=f"HPKE suite of the encryption key (default {DEFAULT_ENC_SUITE})")
    p.add_argument("--out", metavar="PATH", help="where to write the identity (default: --identity)")
    p.add_argument("--force", action="store_true", help="replace an existing identity file")
    p.add_argument("--upgrade", action="store_true",
                   help="add a bus key to a 0.11 (version 1) identity file in place, keeping a .v1.bak copy; "
                        "with --server (or UNIBUS_SERVER) also upload it")


def _add_members(msub: Any) -> None:
    _leaf(msub, "list", "list members", cmd_members_list)
    _leaf(msub, "show", "show one member", cmd_members_show, "handle")
    p = _leaf(msub, "add", "add a member (admin)", cmd_members_add)
    p.add_argument("--handle", required=True)
    p.add_argument("--sign-pub", required=True, metavar="B64", help="Ed25519 public key, base64")
    p.add_argument("--enc-pub", required=True, metavar="B64", help="HPKE public key, base64")
    p.add_argument("--enc-suite", default=DEFAULT_ENC_SUITE, choices=ENC_SUITES)
    p.add_argument("--bus-pub", required=True, metavar="U...", help="bus key, a NATS user nkey (keygen prints it)")
    p.add_argument("--role", default="member", choices=ROLES)
    _leaf(msub, "remove", "delete a member (admin): removed from every room, bus access revoked",
          cmd_members_remove, "handle")


def _add_rooms(rsub: Any) -> None:
    _leaf(rsub, "create", "create a room (you own it); prints its id", cmd_rooms_create, "name")
    _leaf(rsub, "list", "rooms you are in (admins: all)", cmd_rooms_list)
    _leaf(rsub, "show", "a room with its members", cmd_rooms_show, "room")
    _leaf(rsub, "add", "add a member to a room (owner/admin); the room then needs a rekey", cmd_rooms_add,
          "room", "handle")
    _leaf(rsub, "remove", "remove a member from a room; the room then needs a rekey", cmd_rooms_remove,
          "room", "handle")
    _leaf(rsub, "rekey", "draw a new room key, seal it to every member, upload it", cmd_rooms_rekey, "room")
    _leaf(rsub, "delete", "delete a room (owner/admin)", cmd_rooms_delete, "room")


def _add_send(sub: Any) -> None:
    p = _leaf(sub, "send", "encrypt TEXT with the room's current key and publish it on the room's TOPIC", cmd_send,
              "room", "topic")
    p.add_argument("text", metavar="TEXT", help="the message; - reads it from standard input. A message on the "
                                                "command line is visible to the host's other users (ps): on a "
                                                "shared host, pipe it")


def _add_listen(sub: Any) -> None:
    p = _leaf(sub, "listen", "print the room's messages as they arrive, verified and decrypted, with their sender",
              cmd_listen, "room")
    p.add_argument("--count", type=int, metavar="N", help="exit after N accepted messages")
    p.add_argument("--max-age", type=float, metavar="SECONDS", default=DEFAULT_MAX_AGE,
                   help=f"reject a message whose Unibus-Time is further than this from your clock "
                        f"(default {DEFAULT_MAX_AGE:g})")
    p.add_argument("--show-rejected", action="store_true",
                   help="print each rejected message's reason on stderr (never its content)")


def _add_trust(sub: Any) -> None:
    p = _leaf(sub, "trust", "pin the server's trust root (the fingerprint of entry 0 of its membership log) before "
                            "first contact, or accept a recovery bootstrap's fingerprint", cmd_trust, json_flag=True)
    p.add_argument("fingerprint", metavar="FINGERPRINT", help="64 hex characters, as `membershipd member add` "
                                                              "printed it")
    p.add_argument("--reset", action="store_true",
                   help="forget this server's verified replica (head, pins, accepted epochs) and pin FINGERPRINT "
                        "as its new trust root (a redeployed server)")


def _add_plugin_commands(parser: argparse.ArgumentParser, sub: Any, plugins: Sequence[object],
                         entry_points: bool) -> None:
    """Each plugin's commands (docs/plugins.md, "Client commands"); a plugin whose command
    name is taken is broken: left out and listed by ``unibus --help``."""
    from .plugins import client_plugin_commands

    commands, broken = client_plugin_commands(plugins, entry_points=entry_points)
    taken: dict[str, str] = {name: "the core" for name in sub.choices}
    groups: dict[str, Any] = {}
    by_plugin: dict[str, list[Any]] = {}
    for plugin, command in commands:
        by_plugin.setdefault(plugin, []).append(command)
    for plugin, mine in by_plugin.items():
        names = [" ".join(c.words) for c in mine]
        clash = next((n for n in names if n in taken or n.split()[0] in taken and taken[n.split()[0]] != plugin),
                     None)
        if clash is not None:
            owner = taken.get(clash) or taken[clash.split()[0]]
            broken[plugin] = f"plugin {plugin}, hook client_commands: command {clash!r} is already {owner}'s"
            continue
        for command in mine:
            words = command.words
            if len(words) == 1:
                p = _leaf(sub, words[0], command.help)
            else:
                if words[0] not in groups:
                    groups[words[0]] = _group(sub, words[0], f"{plugin} plugin commands")
                p = _leaf(groups[words[0]], words[1], command.help)
            if command.arguments is not None:
                command.arguments(p)
            p.set_defaults(func=_plugin_runner(command))
            taken[" ".join(words)] = plugin
            taken[words[0]] = plugin
    if broken:
        parser.epilog = (parser.epilog or "") + "\n\nbroken client plugins (their commands are absent): " + \
            "; ".join(sorted(broken.values()))


def _plugin_runner(command: Any) -> Callable[..., Any]:
    async def run(ctx: Context, client: UnibusClient) -> int:
        result = command.run(ctx, client)
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        return int(result or 0)

    return run


# --------------------------------------------------------------------------- context


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server_explicit = bool(getattr(args, "server", None) or os.environ.get("UNIBUS_SERVER"))
        self.server = getattr(args, "server", None) or os.environ.get("UNIBUS_SERVER") or DEFAULT_SERVER
        self.identity_path = os.path.expanduser(
            getattr(args, "identity", None) or os.environ.get("UNIBUS_IDENTITY") or DEFAULT_IDENTITY)
        self.json = bool(getattr(args, "json", False))

    def _path(self, flag: str, env: str) -> str | None:
        value = getattr(self.args, flag, None) or os.environ.get(env) or None
        return os.path.expanduser(value) if value else None

    def ssl_context(self) -> Any:
        """``--ca``/``--cert``/``--key`` (or their environment) as one SSL context; None without any."""
        ca, cert, key = self._path("ca", "UNIBUS_CA"), self._path("cert", "UNIBUS_CERT"), self._path("key", "UNIBUS_KEY")
        if ca is None and cert is None and key is None:
            return None
        from ..tls import TLSFileError, client_context

        for flag, value in (("--ca", ca), ("--cert", cert), ("--key", key)):
            if value is not None and not os.path.isfile(value):
                raise UsageError(f"{flag}: {value} is not a readable file")
        try:
            return client_context(Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None,
                                  names=("--ca", "--cert", "--key"))
        except TLSFileError as exc:
            raise UsageError(str(exc)) from None

    def client(self) -> UnibusClient:
        try:
            identity = load_identity(self.identity_path)
        except IdentityError as exc:
            raise UsageError(str(exc)) from None
        ssl_context = self.ssl_context()
        try:
            return UnibusClient(self.server, identity, ssl=ssl_context,
                                replica_root=replica_root_for(self.identity_path), notice=_note)
        except ValueError as exc:
            raise UsageError(f"--server: {exc}") from None


def _room_arg(value: str) -> str:
    try:
        return validate_room_id(value)
    except ValueError as exc:
        raise UsageError(f"ROOM: {exc} (room ids are printed by `unibus rooms create` and `unibus rooms list`)") from None


def _handle_arg(value: str, what: str = "HANDLE") -> str:
    try:
        return validate_handle(value)
    except HandleError as exc:
        raise UsageError(f"{what}: {exc}") from None


# --------------------------------------------------------------------------- commands


def cmd_keygen(ctx: Context) -> int:
    a = ctx.args
    if a.upgrade:
        return cmd_keygen_upgrade(ctx)
    if not a.handle:
        raise UsageError("--handle is required (or --upgrade, to add a bus key to an existing identity file)")
    handle = _handle_arg(a.handle, "--handle")
    suite = validate_enc_suite(a.enc_suite or DEFAULT_ENC_SUITE)
    path = os.path.expanduser(a.out) if a.out else ctx.identity_path
    identity = generate_identity(handle, suite)
    try:
        written = save_identity(identity, path, force=a.force)
    except FileExistsError as exc:
        if "symbolic link" in str(exc):
            raise UsageError(str(exc)) from None
        if "not a regular file" in str(exc):
            raise UsageError(f"{exc}; give a file path with --out") from None
        raise UsageError(f"{path} already exists; refusing to overwrite it (use --force to replace it, "
                         "or --out PATH to write elsewhere; `unibus keygen --upgrade` adds a bus key to a "
                         "0.11 identity file)") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; give a file path with --out") from None
    except OSError as exc:
        raise UsageError(f"cannot write the identity file {path}: {exc.strerror or exc}") from None
    line = (f"membershipd member add --handle {handle} --role member --sign-pub {identity.sign_pub_b64} "
            f"--enc-pub {identity.enc_pub_b64} --enc-suite {suite} --bus-pub {identity.bus_pub}")
    if ctx.json:
        _json_out({**identity.public_record(), "identity_path": str(written), "operator_command": line})
    else:
        _out(line)
    above = "the operator_command above" if ctx.json else "the line above"
    _note(f"wrote the identity of {handle} to {written} (mode 0600; it holds your private keys). "
          f"An operator runs {above} (or an admin: `unibus members add` with the same flags).")
    return EXIT_OK


def cmd_keygen_upgrade(ctx: Context) -> int:
    """``keygen --upgrade``: add a bus key to a version 1 identity file; upload it given --server."""
    a = ctx.args
    extra = [flag for flag, value in (("--handle", a.handle), ("--enc-suite", a.enc_suite), ("--out", a.out),
                                      ("--force", a.force)) if value]
    if extra:
        raise UsageError(f"{extra[0]} cannot be combined with --upgrade, which keeps the handle and keys of the "
                         "identity file (--identity PATH) and only adds a bus key")
    try:
        identity, backup = upgrade_identity_file(ctx.identity_path)
    except IdentityError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot upgrade the identity file {ctx.identity_path}: {exc.strerror or exc}") from None
    if backup is None:
        _note(f"{ctx.identity_path} already has a bus key (identity file version 2): nothing to upgrade")
    else:
        _note(f"added a bus key to {ctx.identity_path} (signing and encryption keys unchanged); "
              f"the version 1 file is kept in {backup} (mode 0600)")
    uploaded = False
    if ctx.server_explicit:
        uploaded = asyncio.run(_upload_bus_key(ctx, identity))
    elif backup is not None:
        _note(f"upload it with `unibus keygen --upgrade --server URL` (your bus access needs it), or give an "
              f"operator this key: {identity.bus_pub}")
    if ctx.json:
        _json_out({"handle": identity.handle, "identity_path": ctx.identity_path, "upgraded": backup is not None,
                   "backup_path": None if backup is None else str(backup), "bus_pub": identity.bus_pub,
                   "uploaded": uploaded})
    else:
        _out(identity.bus_pub)
    return EXIT_OK


async def _upload_bus_key(ctx: Context, identity: Any) -> bool:
    ssl_context = ctx.ssl_context()  # --ca/--cert/--key, as every other command: a private CA's HTTPS server
    try:
        # The identity's replica: its request is tagged with the trust root pinned there, never with
        # one the server chose (a red team: without a replica, a compromised server picked the tag).
        client = UnibusClient(ctx.server, identity, ssl=ssl_context, replica_root=replica_root_for(ctx.identity_path),
                              notice=_note)
    except ValueError as exc:
        raise UsageError(f"--server: {exc}") from None
    async with client, _ended_by_signals() as got:
        try:
            me = await client.me(verify=True)  # a review's server said it had the key already: it did not
            if me.get("bus_pub") == identity.bus_pub:
                _note(f"{ctx.server} already has this bus key for {identity.handle}")
                return True
            await client.set_bus_key(identity.bus_pub)
        except asyncio.CancelledError:
            if got:
                raise _Signalled(got[0]) from None
            raise
    _note(f"uploaded the bus key of {identity.handle} to {ctx.server}; connections under the old one are closed")
    return True


async def cmd_whoami(ctx: Context, c: UnibusClient) -> int:
    me = await c.me(verify=True)
    if ctx.json:
        _json_out(me)
        return EXIT_OK
    _print_member({**me, "server": c.base_url, "identity": ctx.identity_path}, extra=("server", "identity"))
    upgrade = f"`unibus keygen --upgrade --server {c.base_url}{_ca_flag(ctx)}`"
    if c.identity.bus_pub is None:
        _note(f"your identity file has no bus key (a version 1 file from unibus 0.11): run {upgrade}")
    elif me.get("bus_pub") != c.identity.bus_pub:
        _note(f"the server's bus key for you is not the one in your identity file: run {upgrade}")
    return EXIT_OK


def _ca_flag(ctx: Context) -> str:
    """`` --ca PATH`` when this command was given a CA, to repeat in a command it suggests."""
    ca = ctx._path("ca", "UNIBUS_CA")
    return f" --ca {shlex.quote(str(ca))}" if ca else ""


async def cmd_members_list(ctx: Context, c: UnibusClient) -> int:
    members = await c.list_members(verify=True)
    if ctx.json:
        _json_out({"members": members})
        return EXIT_OK
    _table([[str(m.get("handle")), str(m.get("role")), str(m.get("enc_suite") or DEFAULT_ENC_SUITE)]
            for m in members])
    return EXIT_OK


async def cmd_members_show(ctx: Context, c: UnibusClient) -> int:
    m = await c.get_member(_handle_arg(ctx.args.handle), verify=True)
    _json_out(m) if ctx.json else _print_member(m)
    return EXIT_OK


def _report(ctx: Context, doc: Any, line: str, note: str | None = None) -> int:
    """What a command did: ``doc`` with --json; else ``line`` on stdout and ``note`` (what to do next) on stderr."""
    if ctx.json:
        _json_out(doc)
    else:
        _out(_escape(line))  # it holds what the server answered (a room id, a handle)
        if note is not None:
            _note(note)
    return EXIT_OK


def _key_arg(flag: str, validate: Callable[..., Any], *value: str) -> None:
    """``validate(*value)``; a malformed key is a usage error naming ``flag``."""
    try:
        validate(*value)
    except KeyFormatError as exc:
        raise UsageError(f"{flag}: {exc}") from None


async def cmd_members_add(ctx: Context, c: UnibusClient) -> int:
    a = ctx.args
    handle = _handle_arg(a.handle, "--handle")
    _key_arg("--sign-pub", validate_sign_pub, a.sign_pub)
    _key_arg("--enc-pub", validate_enc_pub, a.enc_pub, a.enc_suite)
    _key_arg("--bus-pub", validate_bus_pub, a.bus_pub)
    m = await c.add_member(handle, a.sign_pub, a.enc_pub, enc_suite=a.enc_suite, role=a.role, bus_pub=a.bus_pub)
    if c.member_differences(m, handle):  # the log confirmed the request, not the answer: the record checked
        m = await _made_then_read(f"{handle} was added", c.get_member(handle, verify=True))
    m = member_view(m)  # the documented fields (a review: made-up ones rode along)
    logged = c.verified.members.get(handle)  # the change is in it (confirmed)
    return _report(ctx, m, f"added {handle} ({logged.role if logged else a.role}, "
                           f"{logged.enc_suite if logged else a.enc_suite})")


async def _made_then_read(made: str, read: Awaitable[Any]) -> Any:
    """``await read`` (a checked read after a change the log confirmed); its failure says the change was made."""
    try:
        return await read
    except VerificationError as exc:
        raise VerificationError(f"{made} (the verified membership log holds it), but {exc}") from None


async def cmd_members_remove(ctx: Context, c: UnibusClient) -> int:
    handle = _handle_arg(ctx.args.handle)
    await c.remove_member(handle)
    return _report(ctx, {"handle": handle, "removed": True}, f"removed {handle}",
                   f"every room {handle} was in now needs a rekey (`unibus rooms list` shows rekey-required)")


async def cmd_rooms_create(ctx: Context, c: UnibusClient) -> int:
    room = await c.create_room(ctx.args.name)
    return _report(ctx, room, str(room.get("room_id")),
                   f"created room {room.get('name')!r} ({room.get('room_id')}); add members with "
                   f"`unibus rooms add {room.get('room_id')} HANDLE`, then `unibus rooms rekey {room.get('room_id')}`")


async def cmd_rooms_list(ctx: Context, c: UnibusClient) -> int:
    rooms = await c.list_rooms(verify=True)
    if ctx.json:
        _json_out({"rooms": rooms})
    else:
        _table([_room_line(r) for r in rooms])
    return EXIT_OK


async def cmd_rooms_show(ctx: Context, c: UnibusClient) -> int:
    room = await c.get_room(_room_arg(ctx.args.room), verify=True)
    _json_out(room) if ctx.json else _print_room(room)
    return EXIT_OK


async def cmd_rooms_add(ctx: Context, c: UnibusClient) -> int:
    room_id, handle = _room_arg(ctx.args.room), _handle_arg(ctx.args.handle)
    room = await c.add_room_member(room_id, handle)
    if room.get("room_id") != room_id or c.room_differences(room):  # as for `members add`
        room = await _made_then_read(f"{handle} was added to room {room_id}", c.get_room(room_id, verify=True))
    room = room_view(room)
    return _report(ctx, room, f"added {handle} to room {room_id}",
                   f"{handle} cannot read until the room is rekeyed: `unibus rooms rekey {room_id}`")


async def cmd_rooms_remove(ctx: Context, c: UnibusClient) -> int:
    room_id, handle = _room_arg(ctx.args.room), _handle_arg(ctx.args.handle)
    room = await c.remove_room_member(room_id, handle)
    if not isinstance(room, dict) or room.get("room_id") != room_id or c.room_differences(room):
        room = {"room_id": room_id, "handle": handle, "removed": True}  # no record the log does not hold
    else:
        room = room_view(room)
    return _report(ctx, room,
                   f"removed {handle} from room {room_id}",
                   f"rekey now so that {handle} cannot read what follows: `unibus rooms rekey {room_id}`")


async def cmd_rooms_rekey(ctx: Context, c: UnibusClient) -> int:
    room_id = _room_arg(ctx.args.room)
    epoch = await c.rekey(room_id)
    return _report(ctx, {"room_id": room_id, "epoch": epoch}, f"room {room_id} is now at epoch {epoch}")


async def cmd_rooms_delete(ctx: Context, c: UnibusClient) -> int:
    room_id = _room_arg(ctx.args.room)
    await c.delete_room(room_id)
    return _report(ctx, {"room_id": room_id, "deleted": True}, f"deleted room {room_id}")


async def cmd_send(ctx: Context, c: UnibusClient) -> int:
    room_id = _room_arg(ctx.args.room)
    try:
        subject = message_subject(room_id, ctx.args.topic)
    except ValueError as exc:
        raise UsageError(f"TOPIC: {exc}") from None
    data = _stdin_message() if ctx.args.text == "-" else ctx.args.text.encode("utf-8", "surrogateescape")
    async with c.bus(key_ttl=0) as bus:
        epoch = await bus.send(room_id, ctx.args.topic, data)
    if ctx.json:
        _json_out({"room_id": room_id, "topic": ctx.args.topic, "subject": subject, "epoch": epoch})
    return EXIT_OK


#: The most ``unibus send ROOM TOPIC -`` reads from standard input: NATS' own bound on a
#: server's ``max_payload`` (a server's own, 1 MiB by default, refuses less at the publish).
STDIN_MESSAGE_MAX = 64 << 20


def _stdin_message() -> bytes:
    """The message of ``unibus send ROOM TOPIC -``: standard input, as bytes (a red team read
    TEXT given on the command line in another user's ``/proc/PID/cmdline``)."""
    if sys.stdin is None:  # started with standard input closed (`<&-`)
        raise UsageError("TEXT -: standard input is closed; pipe the message in")
    data = sys.stdin.buffer.read(STDIN_MESSAGE_MAX + 1)
    if len(data) > STDIN_MESSAGE_MAX:
        raise UsageError(f"TEXT: the message on standard input is larger than {STDIN_MESSAGE_MAX >> 20} MiB, "
                         "more than any NATS server carries; send a blob instead (`unibus blob put`)")
    return data


def _message_json(m: Message) -> dict[str, Any]:
    doc: dict[str, Any] = {"room_id": m.room_id, "topic": m.topic, "epoch": m.epoch, "subject": m.subject,
                           "sender": m.sender, "time_ms": m.time_ms, "msg_id": m.msg_id}
    assert m.plaintext is not None
    try:
        doc["text"] = m.plaintext.decode("utf-8")
    except UnicodeDecodeError:
        doc["text"] = None
        doc["data_b64"] = base64.b64encode(m.plaintext).decode("ascii")
    return doc


def _message_line(m: Message) -> str:
    return f"[{_escape(m.topic)}] {_escape(m.sender or '?')}: {_escape(m.text or '')}"


async def cmd_listen(ctx: Context, c: UnibusClient) -> int:
    room_id = _room_arg(ctx.args.room)
    count = ctx.args.count
    if count is not None and count < 1:
        raise UsageError("--count must be at least 1")
    max_age = ctx.args.max_age
    if not 0 < max_age <= 86400:
        raise UsageError("--max-age must be more than 0 and at most 86400 seconds")
    got = 0
    await c.sync()  # the log first: a first-use pin or a rollback is said now, not at the first message
    async with c.bus() as bus, bus.listen(room_id, max_age=max_age) as messages:
        bus.on_reconnect = _note
        _note(f"listening on {room_subject(room_id)}.> (Ctrl-C to stop)")
        try:
            async for m in messages:
                if m.error is not None:
                    # Never the content of a rejected message, on any stream.
                    if ctx.args.show_rejected:
                        who = f" claimed sender {_escape(m.sender)}" if m.sender else ""
                        print(f"{PROG}: rejected [{_escape(m.topic)}] epoch {m.epoch}{who} ({m.reason}): "
                              f"{_escape(_one_line(m.error))}", file=sys.stderr, flush=True)
                    continue
                _json_out(_message_json(m), divert=False) if ctx.json else _out(_message_line(m), divert=False)
                got += 1
                if count is not None and got >= count:
                    break
        finally:  # on Ctrl-C too
            if summary := _not_shown(messages.rejected, messages.dropped, ctx.args.show_rejected):
                _note(summary)
    return EXIT_OK


def _not_shown(rejected: Counter[str], dropped: int, explained: bool) -> str | None:
    """The line ``listen`` ends with when it left messages out: the rejected ones by reason, and
    those dropped while the listener was full (None when there were none)."""
    parts = []
    if total := sum(rejected.values()):
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items()))
        parts.append(f"{total} message{'s' if total != 1 else ''} rejected ({reasons})"
                     + ("" if explained else "; --show-rejected says why, one line each"))
    if dropped:
        parts.append(f"{dropped} dropped while this listener was behind")
    return "not shown: " + "; ".join(parts) if parts else None


# --------------------------------------------------------------------------- trust and the log


def _fingerprint_arg(value: str) -> str:
    fp = value.strip().lower()
    if not FINGERPRINT_RE.match(fp):
        raise UsageError("FINGERPRINT: expected 64 hexadecimal characters (the trust root fingerprint "
                         "`membershipd member add` printed)")
    return fp


async def cmd_trust(ctx: Context, c: UnibusClient) -> int:
    fp = _fingerprint_arg(ctx.args.fingerprint)
    before = c.replica.pinned_root()
    done = await c.trust(fp, reset=ctx.args.reset)
    if done == "reset" and before == fp:
        _note(f"{fp} was pinned already: this forgot only what was verified of {c.base_url} after it, so a "
              "log the server rolled back is now taken from its start (right after a restore from a backup, "
              "not otherwise)")
    where = c.replica.directory
    text = {
        "pinned": f"pinned {fp} as the trust root of {c.base_url}: its membership log must start with that entry",
        "already": f"{fp} is already trusted for {c.base_url}",
        "confirmed": f"confirmed {fp} as the trust root of {c.base_url} (it was pinned on first use)",
        "accepted": f"accepted {fp} as a recovery bootstrap of {c.base_url} (an offline `membershipd member add` "
                    "after the trust root; the next sync verifies it)",
        "reset": f"forgot the verified replica of {c.base_url} and pinned {fp} as its trust root",
    }[done]
    if done == "accepted" and c.replica.pinned_head[0] < 1:
        # Nothing past entry 0 verified yet: the root may be a first use's pin (a changing command's,
        # which pins the entry 0 it tags with), and this fingerprint the one meant (a review).
        text += (f"; the trust root pinned for it is {c.replica.trust_root}, which nothing verified beyond: "
                 f"if {fp} is the root you meant, run `unibus trust --reset {fp}`")
    if ctx.json:
        _json_out({"server": c.base_url, "fingerprint": fp, "result": done, "replica": str(where)})
    else:
        _out(text)
    return EXIT_OK


def _key_fp(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


def _log_doc(c: UnibusClient) -> dict[str, Any]:
    from ..wire import sign_pub_from_nkey

    state = c.verified
    seq, digest = state.head
    members = []
    for handle in sorted(state.members):
        m = state.members[handle]
        fps = {"sign": _key_fp(m.sign_pub), "enc": _key_fp(m.enc_pub),
               "bus": _key_fp(sign_pub_from_nkey(m.bus_pub)) if m.bus_pub else None}
        members.append({**m.as_json(), "fingerprints": fps})
    rooms = [state.rooms[r].as_json() for r in sorted(state.rooms)]
    # what the server held back and appended late (docs/client.md, "Changes confirmed in the log")
    given_up = [{"seq": s, "author": k.author, "operation": k.op, "args": list(k.args), "after": k.after}
                for s, k in sorted(state.kept_back.items())]
    put_back = [{"room_id": r, "handle": h, "seq": added, "after": removed}
                for (r, h), (added, removed) in sorted(state.held_back.items())]
    return {"server": c.base_url, "replica": str(c.replica.directory) if c.replica.directory else None,
            "trust_root": c.replica.trust_root, "accepted_bootstraps": sorted(c.replica.accepted),
            "head": {"seq": seq, "hash": digest}, "members": members, "rooms": rooms,
            "held_back": {"changes_given_up": given_up, "members_put_back": put_back}}


async def cmd_log_show(ctx: Context, c: UnibusClient) -> int:
    await c.sync()
    doc = _log_doc(c)
    if ctx.json:
        _json_out(doc)
        return EXIT_OK
    head = doc["head"]
    _print_fields({"server": doc["server"], "trust root": doc["trust_root"] or "(none yet)",
                   "verified head": f"seq {head['seq']} {head['hash']}" if head["seq"] >= 0 else "(empty log)"},
                  ("server", "trust root", "verified head"))
    for fp in doc["accepted_bootstraps"]:
        _out(f"accepted bootstrap: {fp}")
    _out(f"members: ({len(doc['members'])})")
    _table([["  " + m["handle"], m["role"], m["enc_suite"], f"sign {m['fingerprints']['sign'][:16]}",
             f"enc {m['fingerprints']['enc'][:16]}",
             f"bus {m['fingerprints']['bus'][:16]}" if m["fingerprints"]["bus"] else "bus (none)"]
            for m in doc["members"]])
    _out(f"rooms: ({len(doc['rooms'])})")
    _table([["  " + r["room_id"], r["name"], f"owner={r['owner'] or '(none)'}", f"epoch={r['epoch']}",
             "rekey-required" if r["rekey_required"] else "keyed", "members=" + ",".join(r["members"])]
            for r in doc["rooms"]])
    held = doc["held_back"]
    for k in held["changes_given_up"]:
        _out(f"held back: seq {k['seq']}, {k['author']}'s {k['operation']} {' '.join(k['args'])}, a change its "
             f"client had not seen confirmed, appended after seq {k['after']}")
    for m in held["members_put_back"]:
        _out(f"held back: {m['handle']} is in room {m['room_id']} by the add at seq {m['seq']}, held back past seq "
             f"{m['after']}: no key is sealed to it or sent with until it is removed again")
    return EXIT_OK


async def cmd_log_verify(ctx: Context, c: UnibusClient) -> int:
    state = await c.verify_log()
    seq, digest = state.head
    if ctx.json:
        _json_out({"server": c.base_url, "valid": True, "entries": seq + 1, "head": {"seq": seq, "hash": digest},
                   "trust_root": c.replica.trust_root})
    else:
        _out(f"the membership log of {c.base_url} is valid: {seq + 1} entries, head seq {seq} {digest}, "
             f"trust root {c.replica.trust_root}")
    return EXIT_OK


# --------------------------------------------------------------------------- main


class _Signalled(Exception):
    """SIGTERM or SIGHUP ended a command (:func:`_ended_by_signals`): exit 128 + its number."""

    def __init__(self, signum: int) -> None:
        self.code = 128 + signum
        super().__init__(f"ended by signal {signum}")


@contextlib.asynccontextmanager
async def _ended_by_signals() -> AsyncIterator[list[int]]:
    """SIGTERM and SIGHUP (a closed terminal, a dropped SSH session, ``timeout``) cancel the running
    task, as Ctrl-C does, so that what it was doing ends as after an error (a membership change in
    flight is recorded as given up on; docs/client.md); yields the signals received."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    got: list[int] = []

    def stop(signum: int) -> None:
        if not got and task is not None:
            got.append(signum)
            task.cancel()

    handled = []
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            loop.add_signal_handler(sig, stop, sig)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no such signal
            pass
    try:
        yield got
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def _run_async(fn: Callable[..., Any], ctx: Context) -> int:
    """Run a command; SIGTERM and SIGHUP end it as Ctrl-C does (:func:`_ended_by_signals`), with
    exit 128 + the signal's number."""
    client = ctx.client()
    try:
        async with _ended_by_signals() as got:
            try:
                return await fn(ctx, client)
            except asyncio.CancelledError:
                if got:
                    return 128 + got[0]
                raise
    finally:
        await client.close()


def _setup_logging() -> None:
    """Quiet by default (errors are reported by the CLI itself, one line each);
    ``UNIBUS_CLIENT_LOG=DEBUG`` (or INFO, WARNING) shows the SDK's and nats-py's logs on stderr."""
    level = os.environ.get("UNIBUS_CLIENT_LOG", "").upper()
    if level in ("DEBUG", "INFO", "WARNING", "ERROR"):
        logging.basicConfig(level=level, stream=sys.stderr, format=f"{PROG}: %(levelname)s %(name)s: %(message)s")
    else:
        logging.getLogger().addHandler(logging.NullHandler())


class _Progress:
    """A progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        pct = 100 if not total else min(100, done * 100 // total)
        if pct == self._last:
            return
        self._last = pct
        bar = "#" * (pct // 4)
        sys.stderr.write(f"\r{self.label} [{bar:<25}] {pct:3d}% {done / 1048576:8.1f} MiB")
        if pct == 100:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def cmd_blob_put(ctx: Context, c: UnibusClient) -> int:
    from .blobs import put_blob

    room_id = _room_arg(ctx.args.room)
    path = Path(ctx.args.file).expanduser()
    if not path.is_file():
        raise UsageError(f"{path} is not a readable file")
    blob_id = await put_blob(c, room_id, path, progress=_Progress("upload"))
    _json_out({"room_id": room_id, "blob_id": blob_id}) if ctx.json else _out(blob_id)
    return EXIT_OK


async def cmd_blob_get(ctx: Context, c: UnibusClient) -> int:
    from .blobs import get_blob

    room_id = _room_arg(ctx.args.room)
    blob_id = ctx.args.blob_id.lower()
    if len(blob_id) != 64 or any(ch not in "0123456789abcdef" for ch in blob_id):
        raise UsageError(f"{ctx.args.blob_id!r} is not a blob id (64 hex characters)")
    out = Path(ctx.args.out).expanduser()
    try:  # it was exit 1 after the download, naming the temporary file beside OUT
        parent_is_dir = stat.S_ISDIR(os.stat(out.parent).st_mode)
    except FileNotFoundError:
        raise UsageError(f"OUT: the directory {out.parent} does not exist; create it or give another path") from None
    except OSError as exc:
        raise UsageError(f"OUT: the directory {out.parent} cannot be reached ({exc.strerror}); give another "
                         "path") from None
    if not parent_is_dir:
        raise UsageError(f"OUT: {out.parent} is not a directory; give another path")
    with contextlib.suppress(OSError):  # a red team's OUT was the identity file in use: its keys were gone
        if os.path.samefile(out, ctx.identity_path):
            raise UsageError(f"OUT: {out} is your identity file; give another path")
    size = await get_blob(c, room_id, blob_id, out, progress=_Progress("download"))
    if ctx.json:
        _json_out({"room_id": room_id, "blob_id": blob_id, "out": str(ctx.args.out), "size": size})
    return EXIT_OK


def main(argv: Sequence[str] | None = None, *, plugins: Sequence[object] = ()) -> int:
    """``unibus ARGV``; ``plugins`` adds client plugins that are not installed (tests)."""
    _setup_logging()
    _Stdout.failed = None
    parser = build_parser(plugins)
    try:
        args = parser.parse_args(argv)  # --help and --version print here
    except BrokenPipeError:
        drop_stdout()
        return EXIT_OK
    except OSError as exc:  # standard output that cannot be written
        drop_stdout()
        _err(_local_file_error(exc))
        return EXIT_FAILED
    code = _main(args)
    return EXIT_FAILED if code == EXIT_OK and _Stdout.failed is not None else code


def _main(args: argparse.Namespace) -> int:
    ctx = Context(args)
    try:
        if args.func is cmd_keygen:
            return cmd_keygen(ctx)
        return asyncio.run(_run_async(args.func, ctx))
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ServerUnreachable as exc:
        _err(str(exc))
        return EXIT_FAILED
    except ApiError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except (BusError, SealError, VerificationError, RekeyRequired, NotARoomMember, ReplicaError) as exc:
        _err(str(exc))
        return EXIT_FAILED
    except ValueError as exc:  # BlobFormatError/BlobIntegrityError: a blob that does not decrypt
        _err(str(exc))
        return EXIT_FAILED
    except BrokenPipeError:
        # `unibus listen ROOM | head -n 3`: the reader went away, nothing is wrong.
        drop_stdout()
        return EXIT_OK
    except OSError as exc:  # a local file that cannot be read or written
        _err(_local_file_error(exc))
        return EXIT_FAILED
    except (HandleError, KeyFormatError) as exc:
        # arguments are validated up front (UsageError); these come from server data
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK if args.func is cmd_listen else 130
    except _Signalled as exc:
        return exc.code
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        # What no clause above expects is most likely a server's answer of another shape than the
        # API documents, met deeper than the SDK's checks (a red team's server made tracebacks).
        logging.getLogger("unibus.client").debug("unexpected error", exc_info=True)
        _err(f"unexpected {type(exc).__name__}: {exc} (UNIBUS_CLIENT_LOG=DEBUG shows where it happened)")
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
