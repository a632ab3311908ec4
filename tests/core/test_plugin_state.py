"""Per-plugin stash and state directory (docs/plugins.md, "State: stash and state directory")."""

from __future__ import annotations

import os
import stat

import pytest
from aiohttp import web

from unibus import Stash, StashKey, hookimpl
from unibus.app import add_route, stash, state_dir
from unibus.pluginmanager import running_plugin
from unibus.pluginstate import plugin_name, state_dir_of

COUNT = StashKey[int]("count")


def test_stash_takes_only_its_keys():
    s = Stash()
    s[COUNT] = 1
    assert s[COUNT] == 1 and COUNT in s and len(s) == 1
    assert s.get(StashKey[int]("count")) is None  # another key object, even with the same name
    assert s.setdefault(COUNT, 5) == 1 and s.pop(COUNT) == 1 and s.get(COUNT, 7) == 7
    with pytest.raises(TypeError, match="StashKey"):
        s["count"] = 2  # type: ignore[index]
    with pytest.raises(KeyError):
        s[COUNT]


def test_state_dir_is_private_and_made_on_first_use(tmp_path):
    d = state_dir_of(tmp_path, "audit")
    assert d == tmp_path / "plugins" / "audit" and d.is_dir()
    for path in (d, d.parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    os.chmod(d, 0o755)  # loosened by hand: tightened again
    assert stat.S_IMODE(state_dir_of(tmp_path, "audit").stat().st_mode) == 0o700


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "", ".hidden", "x" * 101])
def test_a_plugin_name_cannot_escape_the_data_dir(tmp_path, name):
    with pytest.raises(ValueError, match="cannot name a directory"):
        state_dir_of(tmp_path, name)


def test_a_symlinked_state_dir_is_refused(tmp_path):
    (tmp_path / "plugins").mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "plugins" / "audit").symlink_to(elsewhere)
    with pytest.raises(RuntimeError, match="symbolic link"):
        state_dir_of(tmp_path, "audit")


def test_outside_a_hook_the_plugin_must_be_named(tmp_path):
    # the call to make names the function asked: state_dir's error showed stash(app, PLUGIN_NAME)
    with pytest.raises(RuntimeError, match=r"name the plugin \(state_dir\(app, PLUGIN_NAME\)\)"):
        state_dir_of(tmp_path)
    with pytest.raises(RuntimeError, match=r"name the plugin \(stash\(app, PLUGIN_NAME\)\)"):
        plugin_name(None)
    with running_plugin("audit"):
        assert state_dir_of(tmp_path) == tmp_path / "plugins" / "audit"


class Counter:
    PLUGIN_NAME = "counter"

    @hookimpl
    def startup(self, app):
        stash(app)[COUNT] = 0
        (state_dir(app) / "started").write_text("yes")

        async def hit(request):
            mine = stash(request.app, "counter")
            mine[COUNT] += 1
            return web.json_response({"count": mine[COUNT]})

        add_route(app, "POST", "/hit", hit, summary="count", responses={200: "the count"})

    @hookimpl
    def healthz_fields(self, app):
        return {"count": stash(app, "counter")[COUNT]}


def test_two_daemons_in_one_process_keep_their_own_state(unibus_app):
    plugin = Counter()
    one, two = unibus_app(plugins=[plugin]), unibus_app(plugins=[plugin])
    assert one.admin.post("/v1/plugins/counter/hit") == (200, {"count": 1})
    assert one.admin.post("/v1/plugins/counter/hit") == (200, {"count": 2})
    assert two.admin.post("/v1/plugins/counter/hit") == (200, {"count": 1})
    assert one.anonymous.get("/healthz")[1]["counter"] == {"count": 2}
    for app in (one, two):
        d = app.data_dir / "plugins" / "counter"
        assert (d / "started").read_text() == "yes" and stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stash(one.app, "counter") is not stash(two.app, "counter")
