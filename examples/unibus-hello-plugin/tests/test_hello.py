"""Tests for the hello plugin, written with unibus's own testing kit.

The fixtures (``unibus_plugin_manager``, ``membershipd_factory``...) come from
``unibus.testing``, a pytest plugin installed with unibus: nothing to import.
The daemon tests start a real ``membershipd serve``, which finds plugins only
through entry points, so this distribution must be installed
(``pip install -e .``) in the same environment as unibus.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import unibus_hello_plugin
from aiohttp import web
from unibus.app import SETTINGS
from unibus.settings import Settings


def test_healthz_fields_through_a_plugin_manager(unibus_plugin_manager) -> None:
    pm = unibus_plugin_manager(unibus_hello_plugin)
    app = web.Application()
    app[SETTINGS] = Settings(options={"hello_greeting": "hello from a plugin"})
    assert pm.hook.healthz_fields(app=app) == [{"greeting": "hello from a plugin"}]


def test_the_flag_is_declared(unibus_plugin_manager) -> None:
    pm = unibus_plugin_manager(unibus_hello_plugin)
    [(plugin, option)] = pm.options()
    assert plugin == "hello"  # PLUGIN_NAME, the same name its entry point gives it
    assert (option.flag, option.name, option.env) == ("--hello-greeting", "hello_greeting", "UNIBUS_HELLO_GREETING")
    assert option.default == unibus_hello_plugin.DEFAULT_GREETING


@pytest.mark.parametrize("raw", ["", "   ", "x" * 201])
def test_bad_greetings_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="1-200 characters"):
        unibus_hello_plugin.parse_greeting(raw)


def test_default_greeting_on_a_real_daemon(membershipd) -> None:
    status, body = membershipd.healthz()
    assert status == 200
    assert body["hello"] == {"greeting": "hello from a plugin"}


def test_the_flag_reaches_healthz(membershipd_factory) -> None:
    daemon = membershipd_factory("--hello-greeting", "hi")
    status, body = daemon.healthz()
    assert status == 200
    assert body["hello"] == {"greeting": "hi"}


def test_the_environment_variable_reaches_healthz(membershipd_factory) -> None:
    daemon = membershipd_factory(env={"UNIBUS_HELLO_GREETING": "hey"})
    assert daemon.healthz()[1]["hello"] == {"greeting": "hey"}


def test_a_bad_flag_value_exits_2_naming_the_flag(membershipd_factory) -> None:
    daemon = membershipd_factory("--hello-greeting", " ", wait=False)
    assert daemon.wait() == 2
    assert "--hello-greeting: the greeting must be 1-200 characters" in daemon.log_text()
    assert "Traceback" not in daemon.log_text()


def test_membershipd_plugins_lists_hello() -> None:
    res = subprocess.run([sys.executable, "-m", "unibus.cli", "plugins", "--json"],
                         capture_output=True, text=True, check=True)
    [hello] = [p for p in json.loads(res.stdout) if p["name"] == "hello"]
    assert hello == {"name": "hello", "distribution": "unibus-hello-plugin", "version": "0.1.0",
                     "hooks": ["cli_options", "healthz_fields"]}
