"""validate_settings, --plugin, /healthz namespacing and the start/stop order of plugins
(docs/plugins.md, "Order", "Errors and exit codes", "Hook checks and broken plugins")."""

from __future__ import annotations

import asyncio
import gc
import types
import warnings
from pathlib import Path

import pytest
from helpers import plugin_modules

from unibus import ConfigError, hookimpl
from unibus.app import plugin_healthz
from unibus.daemon import Daemon
from unibus.errors import RuntimeFailure
from unibus.pluginmanager import PluginManager
from unibus.settings import HostPort, Settings
from unibus.testing import free_port, http_json, nats_server_pids, run_membershipd

MODULES = {
    # a plugin with a flag whose combination it refuses in validate_settings
    "strict_plugin": '''
        from unibus import ConfigError, Option, hookimpl

        PLUGIN_NAME = "strict"

        @hookimpl
        def cli_options():
            return [Option("--strict-level", help="1-3", default="1")]

        @hookimpl
        def validate_settings(settings):
            if settings.option("strict_level") not in ("1", "2", "3"):
                raise ConfigError("--strict-level: must be 1, 2 or 3")
    ''',
    # a mistyped argument name: broken, but --help and `plugins` still work
    "typo_plugin": '''
        from unibus import hookimpl

        @hookimpl
        def healthz_fields(application):
            return {}
    ''',
    # a cli_options that raises: a failing hook at start-up
    "failing_options_plugin": '''
        from unibus import hookimpl

        @hookimpl
        def cli_options():
            raise RuntimeError("options table missing")
    ''',
    # a misspelt hook name
    "misspelt_plugin": '''
        from unibus import hookimpl

        @hookimpl
        def start_up(app):
            pass
    ''',
    # ConfigError from an async startup: exit 2, naming the plugin
    "async_config_plugin": '''
        import asyncio
        from unibus import ConfigError, hookimpl

        @hookimpl
        async def startup(app):
            await asyncio.sleep(0)
            raise ConfigError("--something: the service this plugin needs is not configured")
    ''',
    # a plugin that writes into /healthz, trying to overwrite the core's and another plugin's keys
    "greedy_plugin": '''
        from unibus import hookimpl

        @hookimpl
        def healthz_fields(app):
            return {"status": "hacked", "nats_monitor": {"enabled": True}, "mine": 1}
    ''',
}


@pytest.fixture(scope="module")
def pythonpath(tmp_path_factory) -> dict[str, str]:
    return plugin_modules(tmp_path_factory.mktemp("plugin-modules"), MODULES)


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("usage:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_validate_settings_refusal_is_one_line_exit_2(pythonpath, tmp_path):
    for command in ("posture", "serve"):
        proc = run_membershipd(command, "--plugin", "strict_plugin", "--strict-level", "9", "--bus-auth", "off",
                               "--data-dir", str(tmp_path / command), env=pythonpath)
        assert proc.returncode == 2, proc.stderr
        assert one_error_line(proc) == (
            "membershipd: error: plugin strict, hook validate_settings: --strict-level: must be 1, 2 or 3")
    ok = run_membershipd("posture", "--plugin", "strict_plugin", "--strict-level", "2", "--bus-auth", "off",
                         env=pythonpath)
    assert ok.returncode == 1, ok.stderr  # runs; "open" posture with --bus-auth off


def test_plugin_flag_loads_a_module_without_installing_it(pythonpath):
    proc = run_membershipd("plugins", "--json", "--plugin", "strict_plugin", env=pythonpath)
    assert proc.returncode == 0, proc.stderr
    import json

    [strict] = [p for p in json.loads(proc.stdout) if p["name"] == "strict"]
    assert strict == {"name": "strict", "distribution": "--plugin strict_plugin", "version": None,
                      "hooks": ["cli_options", "validate_settings"]}


def test_an_unimportable_plugin_module_is_one_line(pythonpath):
    proc = run_membershipd("posture", "--plugin", "no_such_module_here", env=pythonpath)
    assert proc.returncode == 2
    assert one_error_line(proc).startswith("membershipd: error: --plugin no_such_module_here: cannot import it")


@pytest.mark.parametrize(("module", "name", "hook", "problem"), [
    ("typo_plugin", "typo_plugin", "healthz_fields", "argument(s) application not in the hook's arguments (app)"),
    ("misspelt_plugin", "misspelt_plugin", "start_up", "no such hook; did you mean startup?"),
])
def test_a_mistyped_plugin_is_one_line_and_help_and_plugins_still_work(pythonpath, tmp_path, module, name, hook,
                                                                       problem):
    serve = run_membershipd("serve", "--plugin", module, "--data-dir", str(tmp_path), env=pythonpath)
    assert serve.returncode == 2
    line = one_error_line(serve)
    assert f"plugin {name}, hook {hook}: {problem}" in line
    # --disable-plugin blocks installed plugins only: it said "no plugin named ..." to that advice
    assert line.endswith(f"; fix it, or drop --plugin {module}") and "--disable-plugin" not in line
    helped = run_membershipd("serve", "--help", "--plugin", module, env=pythonpath)
    assert helped.returncode == 0 and f"{name}: plugin {name}, hook {hook}" in helped.stdout
    listed = run_membershipd("plugins", "--plugin", module, env=pythonpath)
    assert listed.returncode == 0 and f"{name}  (--plugin {module} -)  BROKEN" in listed.stdout


def test_a_failing_cli_options_stops_serve_with_exit_1_naming_the_plugin(pythonpath, tmp_path):
    """A hook that raises at start-up stops the daemon with exit 1 (a hook that fails a check is a
    refused configuration, 2); ``posture``, whose 1 says "not enforce+acl+tls", refuses it with 2.
    --help and ``plugins`` still work and show it."""
    expected = ("membershipd: error: plugin failing_options_plugin, hook cli_options: failed: RuntimeError: "
                "options table missing; fix it, or drop --plugin failing_options_plugin")
    serve = run_membershipd("serve", "--plugin", "failing_options_plugin", "--data-dir", str(tmp_path / "d"),
                            env=pythonpath)
    assert serve.returncode == 1 and one_error_line(serve) == expected
    assert not (tmp_path / "d").exists()
    posture = run_membershipd("posture", "--plugin", "failing_options_plugin", env=pythonpath)
    assert posture.returncode == 2 and one_error_line(posture) == expected and posture.stdout == ""
    helped = run_membershipd("serve", "--help", "--plugin", "failing_options_plugin", env=pythonpath)
    assert helped.returncode == 0 and "hook cli_options: failed: RuntimeError" in helped.stdout
    listed = run_membershipd("plugins", "--plugin", "failing_options_plugin", env=pythonpath)
    assert listed.returncode == 0 and "BROKEN" in listed.stdout


def test_a_config_error_in_an_async_startup_exits_2_naming_the_plugin(pythonpath, tmp_path):
    proc = run_membershipd("serve", "--plugin", "async_config_plugin", "--bus-auth", "off",
                           "--data-dir", str(tmp_path / "d"), "--http-addr", f"127.0.0.1:{free_port()}",
                           "--nats-addr", f"127.0.0.1:{free_port()}", "--nats-monitor-port", str(free_port()),
                           env=pythonpath)
    assert proc.returncode == 2, proc.stderr
    assert ("plugin async_config_plugin, hook startup: --something: the service this plugin needs is not "
            "configured") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not nats_server_pids(tmp_path)


def test_healthz_fields_are_placed_under_the_plugin_name(unibus_app, pythonpath, monkeypatch):
    monkeypatch.syspath_prepend(pythonpath["PYTHONPATH"])
    import greedy_plugin

    from unibus.plugins import nats_monitor

    served = unibus_app(plugins=[nats_monitor, greedy_plugin])
    status, body = http_json("GET", served.base_url + "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert body["greedy_plugin"] == {"status": "hacked", "nats_monitor": {"enabled": True}, "mine": 1}
    assert body["nats_monitor"] == {"enabled": False}


class BadRoutes:
    """Routes with a plugin author's slips: a handler that returns no response (on an open route and
    on a signed one), and one that fails after its streamed response began."""

    PLUGIN_NAME = "badroutes"

    @hookimpl
    def startup(self, app):
        from aiohttp import web

        from unibus.app import add_route

        async def none(request):
            return None

        async def stream(request):
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"part of it")
            raise RuntimeError("midway")

        for path, handler in (("/none", none), ("/stream", stream)):
            add_route(app, "GET", path, handler, summary="a slip", responses={200: "never"}, signed=False,
                      namespaced=False)

        async def mapping(request):
            return {"greeting": "hi"}

        add_route(app, "GET", "/dict", mapping, summary="a slip", responses={200: "never"})  # signed


def test_a_plugin_handler_s_slips_are_logged_naming_the_route_and_the_plugin(unibus_app, caplog):
    """Both were logged without the route or the plugin: the first as aiohttp's AttributeError deep in
    its own code, the second as aiohttp's "Error handling request" (a plugin author's walkthrough)."""
    import logging

    caplog.set_level(logging.ERROR)
    served = unibus_app(plugins=[BadRoutes()])
    status, body = http_json("GET", served.base_url + "/none")
    assert status == 500 and body["detail"] == "internal error; see the membershipd log"
    assert "the handler of GET /none (plugin badroutes) returned NoneType, not an aiohttp web.StreamResponse" \
        in caplog.text
    # a signed route: the auth middleware sends the response, and failed on it with an AttributeError
    status, body = served.admin.get("/v1/plugins/badroutes/dict")
    assert status == 500 and body["detail"] == "internal error; see the membershipd log"
    assert ("the handler of GET /v1/plugins/badroutes/dict (plugin badroutes) returned dict, not an aiohttp "
            "web.StreamResponse") in caplog.text
    assert "AttributeError" not in caplog.text
    with pytest.raises(Exception):  # the connection is closed under a response that began
        http_json("GET", served.base_url + "/stream")
    assert "GET /stream (plugin badroutes) raised RuntimeError after its response began to go out" in caplog.text


class HealthzSlips:
    def __init__(self, name, fields):
        self.PLUGIN_NAME, self.fields = name, fields

    @hookimpl
    def healthz_fields(self, app):
        return self.fields


def test_healthz_warns_of_a_plugin_s_fields_once_not_at_every_call(unibus_app, caplog):
    """Monitoring asks every few seconds: a plugin named like a core key, or whose fields JSON cannot
    hold, wrote a warning at every call (a plugin author's walkthrough)."""
    import logging

    caplog.set_level(logging.WARNING, logger="unibus.app")
    served = unibus_app(plugins=[HealthzSlips("status", {"x": 1}), HealthzSlips("sets", {"x": {1, 2}})])
    for _ in range(3):
        status, body = http_json("GET", served.base_url + "/healthz")
        assert status == 200 and body["status"] == "ok" and "sets" not in body
    assert caplog.text.count("plugin status: its name is a /healthz key of the core") == 1
    assert caplog.text.count("plugin sets: healthz_fields returned what JSON cannot hold") == 1


def test_plugin_healthz_unwraps_the_old_form_only():
    assert plugin_healthz("hello", {"hello": {"greeting": "hi"}}) == {"greeting": "hi"}
    assert plugin_healthz("hello", {"hello": "world"}) == {"hello": "world"}
    assert plugin_healthz("hello", {}) is None and plugin_healthz("hello", None) is None


# -- start-up and shutdown order, in process ------------------------------------------------


def tracked(name: str, log: list[str], *, fail: BaseException | None = None, is_async: bool = False) -> object:
    """A plugin that logs its startup and shutdown (and may fail its startup)."""

    def begin() -> None:
        log.append(f"start {name}")
        if fail is not None:
            raise fail

    if is_async:
        async def startup(app):
            await asyncio.sleep(0)
            begin()
    else:
        def startup(app):
            begin()

    def shutdown(app):
        log.append(f"stop {name}")

    return types.SimpleNamespace(PLUGIN_NAME=name, startup=hookimpl(startup), shutdown=hookimpl(shutdown))


class StopOnly:
    def __init__(self, log):
        self.log = log

    @hookimpl
    def shutdown(self):
        self.log.append("stop only")


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "d", http_addr=HostPort("127.0.0.1", free_port()),
                    nats_addr=HostPort("127.0.0.1", free_port()), server_name="t", bus_auth="off")


async def test_startup_in_call_order_and_shutdown_in_reverse(tmp_path):
    log: list[str] = []
    pm = PluginManager(load_entry_points=False)
    pm.register(StopOnly(log), "stop_only")
    for name in ("a", "b", "c"):
        pm.register(tracked(name, log, is_async=name == "b"), name)
    assert pm.call_order("startup") == ["c", "b", "a"]  # the plugin registered last first (docs/plugins.md)
    daemon = Daemon(_settings(tmp_path), pm)
    try:
        await daemon.start()
        assert log == ["start c", "start b", "start a"]
    finally:
        await daemon.stop()
        await daemon.stop()  # a second stop calls no hook twice
    assert log == ["start c", "start b", "start a", "stop a", "stop b", "stop c", "stop only"]
    assert not nats_server_pids(tmp_path)


@pytest.mark.parametrize(("error", "expected"), [
    (ValueError("kaboom"), RuntimeFailure), (ConfigError("--x: no"), ConfigError)])
async def test_a_failing_startup_shuts_down_what_started(tmp_path, error, expected):
    log: list[str] = []
    pm = PluginManager(load_entry_points=False)
    pm.register(tracked("late", log, is_async=True), "late")  # never started: no coroutine made
    pm.register(tracked("bad", log, fail=error, is_async=True), "bad")
    pm.register(tracked("first", log), "first")
    daemon = Daemon(_settings(tmp_path), pm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited"
        with pytest.raises(expected, match="plugin bad"):
            await daemon.start()
        await daemon.stop()
        gc.collect()
    assert log == ["start first", "start bad", "stop first"]
    assert not nats_server_pids(tmp_path)
