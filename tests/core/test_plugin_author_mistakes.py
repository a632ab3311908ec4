"""A plugin author's slips that were silent or misleading: a dict-returning hook that returns
something else, an ``Option`` without ``metavar`` in ``--help``, and a ``cli_options`` the test kit
took without a word (docs/plugins.md, "Hook reference", "Options", "Testing")."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest
from helpers import one_error_line, plugin_modules

from unibus import ConfigError, Option, hookimpl
from unibus.errors import RuntimeFailure
from unibus.testing import http_json, make_plugin_manager, run_membershipd

WRONG = "must return a dict (or None), not list"


class ListFields:
    PLUGIN_NAME = "listy"

    @hookimpl
    def healthz_fields(self, app):
        return ["ready"]


class FineFields:
    PLUGIN_NAME = "fine"

    @hookimpl
    def healthz_fields(self, app):
        return {"ready": True}


class ListPosture:
    """A posture of the right type at start-up, and a list (``["tls"]``) once ``report`` says so."""

    PLUGIN_NAME = "listposture"

    def __init__(self) -> None:
        self.report: object = None

    @hookimpl
    def posture(self, settings):
        return self.report


def test_healthz_fields_that_are_no_dict_are_the_hook_s_error(unibus_app, caplog):
    """A list was left out of /healthz without a log line or a count; a set or NaN was both."""
    caplog.set_level(logging.ERROR, logger="unibus.plugins")
    served = unibus_app(plugins=[ListFields(), FineFields()])
    for _ in range(3):
        status, body = http_json("GET", served.base_url + "/healthz")
        assert status == 200 and body["status"] == "ok"
        assert "listy" not in body and body["fine"] == {"ready": True}
    assert caplog.text.count(f"plugin listy, hook healthz_fields: {WRONG}") == 1  # said once, not at every call
    assert served.metric("unibus_plugin_hook_errors_total", {"plugin": "listy", "hook": "healthz_fields"}) == 3
    assert served.metric("unibus_plugin_hook_errors_total", {"plugin": "fine", "hook": "healthz_fields"}) == 0


def test_a_posture_that_is_no_dict_is_counted_and_logged_while_serving(unibus_app, caplog):
    caplog.set_level(logging.ERROR, logger="unibus.plugins")
    plugin = ListPosture()
    served = unibus_app(plugins=[plugin])
    plugin.report = ["tls"]
    for _ in range(3):
        status, body = http_json("GET", served.base_url + "/healthz")
        assert status == 200 and body["posture"]["bus_auth"] == "off"
    assert caplog.text.count(f"plugin listposture, hook posture: {WRONG}") == 1
    # at every call (/healthz, and the posture metrics read it too)
    assert served.metric("unibus_plugin_hook_errors_total", {"plugin": "listposture", "hook": "posture"}) >= 3


def test_a_posture_that_is_no_dict_stops_the_start(unibus_app, tmp_path):
    plugin = ListPosture()
    plugin.report = ["tls"]
    with pytest.raises(ConfigError) as refused:
        unibus_app(plugins=[plugin])
    assert str(refused.value) == f"plugin listposture, hook posture: {WRONG}"
    env = plugin_modules(tmp_path, {"listy_posture": '''
        from unibus import hookimpl

        @hookimpl
        def posture(settings):
            return ["tls"]
    '''})
    one_error_line(run_membershipd("posture", "--plugin", "listy_posture", env=env), 2,
                   f"plugin listy_posture, hook posture: {WRONG}")


NOTES = '''
    from unibus import Option, hookimpl

    PLUGIN_NAME = "notes"

    @hookimpl
    def cli_options():
        return [Option("--notes-mode", help="how notes are kept"),
                Option("--notes-max", help="most notes kept", metavar="N")]
'''


def test_an_option_without_metavar_shows_its_flag_s_name_in_help(tmp_path):
    """``--notes-mode PLUGIN__NOTES_MODE``: the placeholder was the core's internal dest."""
    helped = run_membershipd("serve", "--help", "--plugin", "notes_plugin",
                             env=plugin_modules(tmp_path, {"notes_plugin": NOTES}))
    assert helped.returncode == 0, helped.stderr
    assert "--notes-mode NOTES_MODE" in helped.stdout and "--notes-max N" in helped.stdout
    assert "PLUGIN__" not in helped.stdout


class Options:
    PLUGIN_NAME = "notes"

    def __init__(self, *returned: object, fail: bool = False) -> None:
        self.returned, self.fail = list(returned), fail

    @hookimpl
    def cli_options(self):
        if self.fail:
            raise RuntimeError("options table missing")
        return self.returned


@pytest.mark.parametrize(("plugin", "error", "problem"), [
    (Options("--notes-mode"), ConfigError, "must return a list of unibus.Option objects with --flags"),
    (Options(Option("notes-mode", help="no dashes")), ConfigError,
     "must return a list of unibus.Option objects with --flags"),
    (Options(Option("--http-addr", help="the core's")), ConfigError, "flag --http-addr is already defined by the core"),
    (Options(fail=True), RuntimeFailure, "failed: RuntimeError: options table missing"),
], ids=["a-string", "no-dashes", "a-core-flag", "raises"])
def test_the_test_kit_raises_what_serve_refuses_in_cli_options(unibus_plugin_manager, plugin, error, problem):
    """make_plugin_manager took it, and ``pm.options()`` returned ``[]``: the plugin's own tests passed
    and ``serve`` refused it."""
    with pytest.raises(error) as raised:
        unibus_plugin_manager(plugin)
    assert type(raised.value) is error
    assert str(raised.value) == f"plugin notes, hook cli_options: {problem}; fix it"


def test_the_test_kit_gives_serve_s_error(tmp_path):
    env = plugin_modules(tmp_path, {"strings_plugin": '''
        from unibus import hookimpl

        PLUGIN_NAME = "notes"

        @hookimpl
        def cli_options():
            return ["--notes-mode"]
    '''})
    served = one_error_line(run_membershipd("serve", "--plugin", "strings_plugin", "--data-dir",
                                            str(tmp_path / "d"), env=env), 2)
    with pytest.raises(ConfigError) as kit:
        make_plugin_manager(Options("--notes-mode"))
    # the same error; only the way out differs (serve's plugin came with --plugin)
    assert served == f"membershipd: error: {kit.value}, or drop --plugin strings_plugin"
    assert not (tmp_path / "d").exists()


def test_the_test_kit_takes_good_options():
    pm = make_plugin_manager(Options(Option("--notes-mode", help="how notes are kept")))
    assert [(name, o.flag) for name, o in pm.options()] == [("notes", "--notes-mode")]


class Boom(Mapping):  # type: ignore[type-arg]
    """A Mapping whose reads raise: read outside the hook's error handling, a 500 (a review)."""

    def __getitem__(self, key):
        raise RuntimeError("boom")

    def __iter__(self):
        raise RuntimeError("boom")

    def __len__(self):
        return 1


class BoomFields:
    PLUGIN_NAME = "boomy"

    @hookimpl
    def healthz_fields(self, app):
        return Boom()


class LaterBoomPosture:
    PLUGIN_NAME = "boomposture"

    def __init__(self) -> None:
        self.report: object = {"tls": False}

    @hookimpl
    def posture(self, settings):
        return self.report


def test_a_mapping_whose_reads_raise_is_the_hook_s_error_not_a_500(unibus_app):
    plugin = LaterBoomPosture()
    served = unibus_app(plugins=[BoomFields(), plugin])
    plugin.report = Boom()
    for _ in range(2):
        status, body = http_json("GET", served.base_url + "/healthz")
        assert status == 200 and "boomy" not in body, body
    assert served.metric("unibus_plugin_hook_errors_total", {"plugin": "boomy", "hook": "healthz_fields"}) == 2
    assert served.metric("unibus_plugin_hook_errors_total", {"plugin": "boomposture", "hook": "posture"}) >= 2
