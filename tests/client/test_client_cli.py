"""The `unibus` CLI without a server: keygen, usage errors, identity errors, unreachable server."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_error_line
from unibus.client.keys import (load_identity, nkey_from_sign_pub, validate_bus_pub, validate_enc_pub,
                                validate_sign_pub)
from unibus import forkrun
from unibus.testing import free_port, run_membershipd


def unibus(*args: str, env: dict[str, str] | None = None, home: Path | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")}
    if home is not None:
        full_env["HOME"] = str(home)
    full_env.update(env or {})
    return forkrun.run("unibus.client.cli", args, env=full_env, timeout=timeout)


def parse_member_add(line: str) -> dict[str, str]:
    argv = shlex.split(line)
    assert argv[:3] == ["membershipd", "member", "add"], line
    flags = argv[3:]
    assert len(flags) == 12, flags
    return {flags[i]: flags[i + 1] for i in range(0, len(flags), 2)}


@pytest.mark.parametrize("suite", ["X25519", "MLKEM768_X25519"])
def test_keygen_writes_a_private_identity_and_prints_the_operator_line(tmp_path, suite):
    out = tmp_path / "keys" / "bob.json"
    proc = unibus("keygen", "--handle", "bob", "--enc-suite", suite, "--out", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    flags = parse_member_add(lines[0])
    assert list(flags) == ["--handle", "--role", "--sign-pub", "--enc-pub", "--enc-suite", "--bus-pub"]
    ident = load_identity(out)
    assert flags["--handle"] == "bob" and flags["--role"] == "member" and flags["--enc-suite"] == suite
    assert validate_sign_pub(flags["--sign-pub"]) == ident.sign_pub
    assert validate_enc_pub(flags["--enc-pub"], suite) == ident.enc_pub
    assert validate_bus_pub(flags["--bus-pub"]) == ident.bus_pub != nkey_from_sign_pub(ident.sign_pub)
    # never a private key on any output
    doc = json.loads(out.read_text())
    assert doc["version"] == 2
    for secret in (doc["sign_seed"], doc["enc_key"], doc["bus_seed"], ident.bus_nkey_seed()):
        assert secret not in proc.stdout and secret not in proc.stderr


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "id.json"
    assert unibus("keygen", "--handle", "alice", "--out", str(out)).returncode == 0
    before = out.read_bytes()
    proc = unibus("keygen", "--handle", "alice", "--out", str(out))
    one_error_line(proc, 2, str(out), "--force")
    assert proc.stdout == ""
    assert out.read_bytes() == before
    proc = unibus("keygen", "--handle", "alice", "--out", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() != before
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_keygen_defaults_to_the_identity_path(tmp_path):
    # --identity, then UNIBUS_IDENTITY, then ~/.config/unibus/identity.json
    proc = unibus("--identity", str(tmp_path / "a.json"), "keygen", "--handle", "alice")
    assert proc.returncode == 0 and (tmp_path / "a.json").exists()
    proc = unibus("keygen", "--handle", "bob", env={"UNIBUS_IDENTITY": str(tmp_path / "b.json")})
    assert proc.returncode == 0 and load_identity(tmp_path / "b.json").handle == "bob"
    proc = unibus("keygen", "--handle", "carol", home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    default = tmp_path / "home" / ".config" / "unibus" / "identity.json"
    assert load_identity(default).handle == "carol"
    assert stat.S_IMODE(default.parent.stat().st_mode) == 0o700


def test_keygen_json(tmp_path):
    proc = unibus("keygen", "--handle", "dave", "--out", str(tmp_path / "d.json"), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ident = load_identity(tmp_path / "d.json")
    assert doc["handle"] == "dave" and doc["sign_pub"] == ident.sign_pub_b64 and doc["enc_pub"] == ident.enc_pub_b64
    assert doc["bus_pub"] == ident.bus_pub
    assert parse_member_add(doc["operator_command"])["--handle"] == "dave"
    assert "sign_seed" not in doc and "enc_key" not in doc and "bus_seed" not in doc


@pytest.mark.parametrize("suite", ["X25519", "MLKEM768_X25519"])
def test_membershipd_member_add_accepts_the_keygen_line(tmp_path, suite):
    proc = unibus("keygen", "--handle", "erin", "--enc-suite", suite, "--out", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip())
    added = run_membershipd(*argv[1:3], "--data-dir", str(tmp_path / "d"), *argv[3:])
    assert added.returncode == 0, added.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "required"),
        (["frobnicate"], "frobnicate"),
        (["keygen"], "--handle"),
        (["keygen", "--handle", "Bad Handle"], "--handle"),
        (["keygen", "--handle", "ok", "--enc-suite", "RSA"], "--enc-suite"),
        (["rooms"], "required"),
        (["rooms", "show"], "ROOM"),
        (["send", "r1", "topic"], "TEXT"),
        (["listen", "r1", "--count", "many"], "--count"),
        (["members", "add", "--handle", "x"], "--sign-pub"),
        (["keygen", "--upgrade", "--handle", "x"], "--handle cannot be combined with --upgrade"),
        (["keygen", "--upgrade"], "not found"),
    ],
)
def test_bad_usage_exits_2(tmp_path, args, needle):
    proc = unibus(*args, home=tmp_path)
    one_error_line(proc, 2, needle)
    assert proc.stdout == ""


@pytest.fixture
def identity_file(tmp_path):
    path = tmp_path / "id.json"
    assert unibus("keygen", "--handle", "alice", "--out", str(path)).returncode == 0
    return path


@pytest.mark.parametrize(
    "args, needle",
    [
        (["rooms", "show", "Not-A-Room"], "ROOM"),
        (["send", "abc", "bad topic", "hi"], "TOPIC"),
        (["listen", "abc", "--count", "0"], "--count"),
        (["members", "add", "--handle", "bob", "--sign-pub", "AAAA", "--enc-pub", "AAAA", "--bus-pub", "U"],
         "--sign-pub"),
        (["members", "add", "--handle", "bob", "--sign-pub", "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=",
          "--enc-pub", "NYBy1jZYgNGu6jKa35EhODhR7SGijjt16WXQ0s0WYlQ=", "--bus-pub", "UNOTANKEY"], "--bus-pub"),
        (["--server", "localhost:8470", "whoami"], "--server"),
        # never quoted: a password in the URL was shown in errors and named the replica's directory
        (["--server", "http://bob:Hunter2@127.0.0.1:8470", "whoami"], "must not carry credentials"),
        (["--server", "https://127.0.0.1:8470/?password=Hunter2", "rooms", "list"], "must not carry credentials"),
        (["members", "remove", "Bob!"], "HANDLE"),
    ],
)
def test_bad_arguments_exit_2_before_any_request(identity_file, args, needle):
    port = free_port()  # nothing listens there: exit 2 proves nothing was sent
    proc = unibus("--identity", str(identity_file), "--server", f"http://127.0.0.1:{port}", *args)
    one_error_line(proc, 2, needle)
    assert "Hunter2" not in proc.stderr + proc.stdout


def test_a_message_on_standard_input_past_natss_bound_exits_2_before_any_request(identity_file):
    """`unibus send ROOM TOPIC -` reads the message from standard input (on the command line,
    another user reads it in /proc/PID/cmdline); more than NATS' bound is refused."""
    from unibus.client.cli import STDIN_MESSAGE_MAX

    port = free_port()  # nothing listens there: exit 2 proves nothing was sent
    proc = subprocess.run([sys.executable, "-m", "unibus.client.cli", "--identity", str(identity_file), "--server",
                           f"http://127.0.0.1:{port}", "send", "abcdefghijklmnopqrstuvwx", "chat", "-"],
                          input=b"x" * (STDIN_MESSAGE_MAX + 1), capture_output=True, timeout=60, check=False,
                          env={k: v for k, v in os.environ.items() if not k.startswith("UNIBUS_")})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "TEXT: the message on standard input is larger than 64 MiB" in lines[0], lines


def test_nothing_but_a_regular_file_is_replaced_by_keys_or_a_blob(identity_file, tmp_path):
    """A red team: `keygen --force` put private keys in place of a device or a pipe (/dev/full
    became a 0600 file), and `blob get ROOM ID OUT` with OUT the identity file in use replaced it:
    the keys were gone."""
    from unibus.client.blobs import _replaceable

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = unibus("keygen", "--handle", "bob", "--out", str(fifo), "--force")
    one_error_line(proc, 2, "is not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    before = identity_file.read_bytes()
    proc = unibus("--identity", str(identity_file), "--server", f"http://127.0.0.1:{free_port()}", "blob", "get",
                  "abcdefghijklmnopqrstuvwx", "a" * 64, str(identity_file))
    one_error_line(proc, 2, "is your identity file")
    assert identity_file.read_bytes() == before
    # an OUT in a directory that is not there: exit 2 before any request (nothing listens on the port),
    # naming the directory (it was exit 1 after the download, naming a temporary file)
    proc = unibus("--identity", str(identity_file), "--server", f"http://127.0.0.1:{free_port()}", "blob", "get",
                  "abcdefghijklmnopqrstuvwx", "a" * 64, str(tmp_path / "nodir" / "x"))
    one_error_line(proc, 2, f"OUT: the directory {tmp_path / 'nodir'} does not exist")
    (tmp_path / "afile").write_text("")
    proc = unibus("--identity", str(identity_file), "--server", f"http://127.0.0.1:{free_port()}", "blob", "get",
                  "abcdefghijklmnopqrstuvwx", "a" * 64, str(tmp_path / "afile" / "x"))
    one_error_line(proc, 2, f"OUT: {tmp_path / 'afile'} is not a directory")
    with pytest.raises(FileExistsError, match="not a regular file"):
        _replaceable(fifo)
    # a link, whatever it names: the rename would replace it (/dev/stdout, as root: two reviews)
    (tmp_path / "to-pipe").symlink_to(fifo)
    (tmp_path / "to-file").symlink_to(identity_file)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for link in ("to-pipe", "to-file", "dangling"):
        with pytest.raises(FileExistsError, match="is a symbolic link"):
            _replaceable(tmp_path / link)
        one_error_line(unibus("keygen", "--handle", "bob", "--out", str(tmp_path / link), "--force"), 2,
                       "is a symbolic link")
        assert (tmp_path / link).is_symlink()
    with pytest.raises(IsADirectoryError):
        _replaceable(tmp_path)
    _replaceable(identity_file)  # a regular file is replaced, as documented
    _replaceable(tmp_path / "new")


def test_missing_identity_exits_2_and_says_what_to_do(tmp_path):
    proc = unibus("whoami", home=tmp_path)
    one_error_line(proc, 2, str(tmp_path / ".config" / "unibus" / "identity.json"), "unibus keygen")
    proc = unibus("--identity", str(tmp_path / "nope.json"), "rooms", "list")
    one_error_line(proc, 2, "nope.json", "unibus keygen")
    proc = unibus("members", "list", env={"UNIBUS_IDENTITY": str(tmp_path / "env.json")})
    one_error_line(proc, 2, "env.json")


def test_unreadable_identity_exits_2(identity_file, tmp_path):
    identity_file.chmod(0o644)
    proc = unibus("--identity", str(identity_file), "whoami")
    one_error_line(proc, 2, "chmod 600")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    garbage.chmod(0o600)
    one_error_line(unibus("--identity", str(garbage), "whoami"), 2, "not valid JSON")


@pytest.mark.parametrize("args", [["whoami"], ["members", "list"], ["rooms", "list"], ["rooms", "rekey", "abc"],
                                  ["send", "abc", "chat", "hi"], ["listen", "abc"]])
def test_unreachable_server_exits_1_naming_it(identity_file, args):
    url = f"http://127.0.0.1:{free_port()}"
    proc = unibus("--identity", str(identity_file), "--server", url, *args, timeout=30)
    one_error_line(proc, 1, url)
    assert proc.stdout == ""


def test_server_from_environment_and_flag_position(identity_file):
    url = f"http://127.0.0.1:{free_port()}"
    proc = unibus("whoami", env={"UNIBUS_SERVER": url, "UNIBUS_IDENTITY": str(identity_file)})
    one_error_line(proc, 1, url)
    # global flags are also accepted after the command
    url2 = f"http://127.0.0.1:{free_port()}"
    proc = unibus("whoami", "--server", url2, "--identity", str(identity_file), env={"UNIBUS_SERVER": url})
    one_error_line(proc, 1, url2)


def test_version():
    proc = unibus("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == "unibus 0.12.0"


def test_keygen_upgrade_adds_a_bus_key_to_a_version_1_file(tmp_path):
    path = tmp_path / "id.json"
    assert unibus("keygen", "--handle", "alice", "--out", str(path)).returncode == 0
    doc = json.loads(path.read_text())
    v1 = {k: v for k, v in doc.items() if k not in ("bus_seed", "bus_pub")} | {"version": 1}
    path.write_text(json.dumps(v1))
    old = load_identity(path)
    proc = unibus("--identity", str(path), "keygen", "--upgrade")
    assert proc.returncode == 0, proc.stderr
    new = load_identity(path)
    assert proc.stdout.strip() == new.bus_pub and "v1.bak" in proc.stderr
    assert (new.sign_seed, new.enc_key, new.enc_suite, new.handle) == (old.sign_seed, old.enc_key, old.enc_suite,
                                                                       old.handle)
    assert load_identity(tmp_path / "id.json.v1.bak") == old
    assert stat.S_IMODE((tmp_path / "id.json.v1.bak").stat().st_mode) == 0o600
    assert new.bus_nkey_seed() not in proc.stdout + proc.stderr
    assert "upload it with `unibus keygen --upgrade --server URL`" in proc.stderr  # no --server: nothing sent
    # a version 2 file: nothing to do
    before = path.read_bytes()
    again = unibus("--identity", str(path), "keygen", "--upgrade", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"handle": "alice", "identity_path": str(path), "upgraded": False,
                                        "backup_path": None, "bus_pub": new.bus_pub, "uploaded": False}
    assert "nothing to upgrade" in again.stderr and path.read_bytes() == before


def test_keygen_upgrade_through_a_link_upgrades_the_file_it_names(tmp_path):
    """A dotfile manager's link to the identity file stays a link: the file it names is upgraded
    (the rename replaced the link with a file before; keygen --force and blob get now refuse a
    link, which the rename would replace)."""
    real = tmp_path / "dotfiles" / "id.json"
    real.parent.mkdir(mode=0o700)
    assert unibus("keygen", "--handle", "alice", "--out", str(real)).returncode == 0
    doc = json.loads(real.read_text())
    real.write_text(json.dumps({k: v for k, v in doc.items() if k not in ("bus_seed", "bus_pub")} | {"version": 1}))
    link = tmp_path / "id.json"
    link.symlink_to(real)
    old = load_identity(real)
    proc = unibus("--identity", str(link), "keygen", "--upgrade")
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and load_identity(link).bus_pub == proc.stdout.strip()
    assert load_identity(real.with_name("id.json.v1.bak")) == old


def test_membershipd_member_add_refuses_a_missing_bad_or_signing_bus_key(tmp_path):
    proc = unibus("keygen", "--handle", "erin", "--out", str(tmp_path / "e.json"))
    flags = parse_member_add(proc.stdout.strip())
    ident = load_identity(tmp_path / "e.json")
    data = ["--data-dir", str(tmp_path / "d")]

    def member_add(bus_pub: str | None) -> subprocess.CompletedProcess[str]:
        argv = [a for f, v in flags.items() if f != "--bus-pub" for a in (f, v)]
        return run_membershipd("member", "add", *data, *argv, *(["--bus-pub", bus_pub] if bus_pub else []))

    for bad, needle in ((None, "--bus-pub"), ("UNOTANKEY", "--bus-pub"), (ident.sign_pub_b64, "--bus-pub"),
                        (nkey_from_sign_pub(ident.sign_pub), "--bus-pub: is the nkey of --sign-pub")):
        proc = member_add(bad)
        one_error_line(proc, 2, needle)
    assert not (tmp_path / "d").exists()  # refused before anything is written
    assert member_add(ident.bus_pub).returncode == 0


def test_json_goes_before_or_after_the_command(unibus_app):
    app = unibus_app()
    bob = app.member("bob")
    for argv in (["--json", "whoami"], ["whoami", "--json"]):
        code, out = app.client_command(bob, *argv)
        assert code == 0 and json.loads(out)["handle"] == "bob", argv
    code, out = app.client_command(bob, "whoami")
    assert code == 0 and out.startswith("handle:")


def test_the_client_starts_without_the_daemons_plugin_machinery():
    """`unibus` and the SDK import none of membershipd's plugin manager, option table or
    store; the names plugin authors take from ``unibus`` are still there when asked for."""
    code = ("import sys, unibus.client.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith('unibus')))\n"
            "from unibus import ConfigError, Option, Stash, StashKey, hookimpl\n"
            "import unibus.settings, unibus.errors, unibus.pluginstate\n"
            "assert (Option, ConfigError, Stash, StashKey) == (unibus.settings.Option, unibus.errors.ConfigError,"
            " unibus.pluginstate.Stash, unibus.pluginstate.StashKey)\n"
            "assert hookimpl.project_name == 'unibus' and 'Option' in dir(unibus)\n"
            "try:\n    unibus.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded, missing = proc.stdout.splitlines()
    assert "unibus.client.cli" in loaded
    for daemon_side in ("unibus.pluginmanager", "unibus.settings", "unibus.options", "unibus.store", "unibus.app"):
        assert f"'{daemon_side}'" not in loaded, daemon_side
    assert missing == "module 'unibus' has no attribute 'no_such_name'"


def test_listen_ends_by_saying_what_it_did_not_show():
    """``unibus listen`` counts the messages it left out (rejected, by reason; dropped) and says so
    when it ends, on Ctrl-C too; nothing when it left none out."""
    from collections import Counter

    from unibus.client.cli import _not_shown

    assert _not_shown(Counter(), 0, False) is None
    assert _not_shown(Counter({"signature": 2, "replay": 1}), 0, False) == (
        "not shown: 3 messages rejected (1 replay, 2 signature); --show-rejected says why, one line each")
    assert _not_shown(Counter({"stale": 1}), 5, True) == (
        "not shown: 1 message rejected (1 stale); 5 dropped while this listener was behind")


def test_a_suggested_command_repeats_the_ca_so_that_it_can_be_pasted(tmp_path, monkeypatch):
    """The `keygen --upgrade` hint carries this command's `--ca` (flag or UNIBUS_CA), quoted for a shell."""
    import argparse

    from unibus.client.cli import Context, _ca_flag

    monkeypatch.delenv("UNIBUS_CA", raising=False)
    assert _ca_flag(Context(argparse.Namespace())) == ""
    spaced = tmp_path / "my ca's.crt"
    flag = _ca_flag(Context(argparse.Namespace(ca=str(spaced))))
    assert shlex.split("unibus keygen --upgrade" + flag)[-2:] == ["--ca", str(spaced)]
    monkeypatch.setenv("UNIBUS_CA", str(spaced))
    assert _ca_flag(Context(argparse.Namespace())) == flag
