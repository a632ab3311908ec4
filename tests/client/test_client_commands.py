"""client_commands: plugins add `unibus` subcommands (docs/plugins.md, "Client commands")."""

from __future__ import annotations

import types

import pytest

from unibus import hookimpl
from unibus.client.cli import UsageError, main
from unibus.client.keys import save_identity
from unibus.client.plugins import ClientCommand


def _args(parser):
    parser.add_argument("--shout", action="store_true")


async def _whoami(ctx, client):
    me = await client.me()
    text = f"hello {me['handle']}"
    print(text.upper() if ctx.args.shout else text)
    return 0


def _refuse(ctx, client):
    raise UsageError("--level: must be 1 or 2")


GREETER = types.SimpleNamespace(
    PLUGIN_NAME="greeter",
    client_commands=hookimpl(lambda: [ClientCommand("greet me", "say hello", _whoami, _args),
                                      ClientCommand("greet bad", "refuse", _refuse)]))
CLASHING = types.SimpleNamespace(
    PLUGIN_NAME="clashing", client_commands=hookimpl(lambda: [ClientCommand("rooms", "take over rooms", _whoami)]))
WRONG = types.SimpleNamespace(PLUGIN_NAME="wrong", client_commands=hookimpl(lambda: ["not a command"]))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from unibus.testing import UnibusApp

    app = UnibusApp(tmp_path_factory.mktemp("cc") / "d").start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture
def admin_argv(served, tmp_path):
    path = save_identity(served.admin.identity, tmp_path / "id.json")
    return ["--server", served.base_url, "--identity", str(path)]


def test_a_plugin_command_runs_signed(served, admin_argv, capsys):
    assert main([*admin_argv, "greet", "me", "--shout"], plugins=[GREETER]) == 0
    assert capsys.readouterr().out.strip() == "HELLO ADMIN"


def test_a_plugin_usage_error_is_one_line_exit_2(admin_argv, capsys):
    assert main([*admin_argv, "greet", "bad"], plugins=[GREETER]) == 2
    assert capsys.readouterr().err.strip() == "unibus: error: --level: must be 1 or 2"


def test_without_the_plugin_the_command_does_not_exist(admin_argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*admin_argv, "greet", "me"], plugins=[])
    assert e.value.code == 2


@pytest.mark.parametrize(("plugin", "error"), [
    (CLASHING, "plugin clashing, hook client_commands: command 'rooms' is already the core's"),
    (WRONG, "plugin wrong, hook client_commands: client_commands must return a list of"),
])
def test_a_broken_client_plugin_is_listed_and_leaves_the_core_alone(admin_argv, capsys, plugin, error):
    with pytest.raises(SystemExit) as e:
        main(["--help"], plugins=[GREETER, plugin])
    assert e.value.code == 0
    assert error in " ".join(capsys.readouterr().out.split())
    # the core's `rooms` is still the core's; the good plugin still works
    assert main([*admin_argv, "rooms", "list"], plugins=[GREETER, plugin]) == 0
    assert main([*admin_argv, "greet", "me"], plugins=[GREETER, plugin]) == 0
