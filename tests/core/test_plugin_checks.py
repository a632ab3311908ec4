"""Hook checks at registration, broken plugins, UNIBUS_LOAD_PLUGINS, and failing closed on a missing plugin.

In-process against the real PluginManager with small plugin objects, and in
subprocesses with real plugin modules installed through a real entry point
(a ``*.dist-info`` directory on PYTHONPATH, which importlib.metadata reads
like any installed distribution).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from helpers import one_error_line
from unibus import hookimpl
from unibus.errors import ConfigError, RuntimeFailure
from unibus.pluginmanager import PluginError, PluginManager, load_plugins_from_env
from unibus.settings import Option
from unibus.testing import nats_server_pids, run_membershipd


def manager(*plugins):
    return PluginManager(load_entry_points=False, plugins=plugins)


def refused(plugin, *needles):
    with pytest.raises(PluginError) as e:
        manager(plugin)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


class Named:
    def __init__(self, name):
        self.PLUGIN_NAME = name


# -- the checks, in process -----------------------------------------------------------------


def test_a_misspelt_hook_is_refused():
    class P(Named):
        @hookimpl
        def configure_nat(self, settings, config):
            pass

    refused(P("typo"), "plugin typo", "hook configure_nat", "no such hook", "did you mean configure_nats")


def test_an_unknown_hook_lists_the_hooks():
    class P(Named):
        @hookimpl
        def frobnicate(self):
            pass

    refused(P("odd"), "hook frobnicate", "cli_options", "posture", "startup")


def test_a_wrong_argument_name_is_refused():
    class P(Named):
        @hookimpl
        def posture(self, setings):
            return {}

    refused(P("args"), "plugin args", "hook posture", "setings", "(settings)")


@pytest.mark.parametrize("marker", [hookimpl(hookwrapper=True), hookimpl(wrapper=True)], ids=["hookwrapper", "wrapper"])
def test_hook_wrappers_are_refused(marker):
    class P(Named):
        @marker
        def posture(self, settings):
            return (yield)

    refused(P("wrap"), "plugin wrap", "hook posture", "wrappers are not supported")


@pytest.mark.parametrize("hook", ["validate_settings", "configure_nats", "posture", "healthz_fields", "cli_options"])
def test_an_async_def_on_a_hook_called_plainly_is_refused(hook):
    """Adversary: a plugin author's slip, and a bypass. An ``async def validate_settings`` returned a
    coroutine that nobody awaited: its refusal of a bad setting never ran, and the daemon served
    (a RuntimeWarning was all that showed). Only startup, shutdown, store_changed and reloaded are awaited."""
    args = {"validate_settings": "settings", "configure_nats": "settings, config", "posture": "settings",
            "healthz_fields": "app", "cli_options": ""}[hook]
    namespace: dict = {}
    exec(f"async def {hook}(self{', ' if args else ''}{args}):\n    raise RuntimeError('never awaited')", namespace)
    P = type("P", (Named,), {hook: hookimpl(namespace[hook])})
    refused(P("slip"), "plugin slip", f"hook {hook}", "not async def", "startup")

    async def gen(self, settings):
        yield {}

    G = type("G", (Named,), {"posture": hookimpl(gen)})
    refused(G("gen"), "plugin gen", "hook posture", "not async def")


def test_an_async_hook_in_disguise_is_refused_too():
    """The review of the check: an async def behind functools.wraps, a plain function that returns a
    coroutine (refused when it is called), and an async generator on any hook."""
    import functools

    def logged(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            return fn(*args, **kwargs)
        return inner

    class Wrapped(Named):
        @hookimpl
        @logged
        async def validate_settings(self, settings):
            raise ConfigError("never checked")

    refused(Wrapped("wrapped"), "plugin wrapped", "hook validate_settings", "not async def")

    class AsyncGen(Named):
        @hookimpl
        async def startup(self, app):
            yield

    refused(AsyncGen("agen"), "plugin agen", "hook startup", "not async def")

    async def later():
        raise ConfigError("never checked")

    class ReturnsCoroutine(Named):
        @hookimpl
        def validate_settings(self, settings):
            return later()

    pm = manager(ReturnsCoroutine("sly"))
    with pytest.raises(PluginError, match="plugin sly, hook validate_settings: returned an awaitable") as e:
        pm.call_each("validate_settings", settings=None)
    assert e.value.exit_code == 2


def test_tryfirst_and_trylast_do_not_change_who_owns_a_flag():
    class Builtin(Named):
        @hookimpl
        def cli_options(self):
            return [Option("--nats-monitor-port", help="the built-in's")]

    class Thief(Named):
        @hookimpl(tryfirst=True)
        def cli_options(self):
            return [Option("--nats-monitor-port", help="mine")]

    class LateThief(Named):
        @hookimpl(trylast=True)
        def cli_options(self):
            return [Option("--nats-monitor-port", help="mine")]

    pm = manager(Builtin("nats_monitor"), Thief("thief"), LateThief("late"))
    assert [(name, o.flag) for name, o in pm.options()] == [("nats_monitor", "--nats-monitor-port")]
    assert set(pm.broken) == {"thief", "late"}


def test_the_awaited_hooks_may_be_coroutine_functions():
    class P(Named):
        @hookimpl
        async def startup(self, app):
            pass

        @hookimpl
        async def shutdown(self, app):
            pass

        @hookimpl
        async def store_changed(self, app, event):
            pass

        @hookimpl
        async def reloaded(self, app):
            pass

    assert manager(P("fine")).has("fine")


def test_specname_is_checked_too():
    class Good(Named):
        @hookimpl(specname="posture")
        def my_facts(self, settings):
            return {"acl": True}

    pm = manager(Good("good"))
    assert pm.call_each("posture", settings=None) == [("good", {"acl": True})]

    class Bad(Named):
        @hookimpl(specname="postur")
        def my_facts(self, settings):
            return {}

    refused(Bad("bad"), "hook postur", "did you mean posture")


def test_what_pluggy_allows_stays_allowed():
    class P(Named):
        @hookimpl
        def posture(self):  # fewer arguments than the hook declares
            return {}

        @hookimpl
        def configure_nats(self, config, settings, extra=None):  # any order; a default is never passed
            return None

        @hookimpl(optionalhook=True)
        def not_a_unibus_hook(self):  # explicitly optional, as in pluggy
            pass

        @hookimpl(tryfirst=True)
        def healthz_fields(self, app):
            return {}

    pm = manager(P("fine"))
    assert pm.names() == ["fine"]


def test_a_refused_plugin_is_not_registered():
    pm = manager()
    with pytest.raises(PluginError):
        class P(Named):
            @hookimpl
            def posture(self, nope):
                return {}

        pm.register(P("half"))
    assert "half" not in pm.names() and pm.call_each("posture", settings=None) == []


def test_a_broken_cli_options_marks_the_plugin_broken():
    class Boom(Named):
        @hookimpl
        def cli_options(self):
            raise RuntimeError("boom")

        @hookimpl
        def posture(self, settings):
            return {"tls": False}

    class Clash(Named):
        @hookimpl
        def cli_options(self):
            return [Option("--http-addr", help="mine")]

    class NotOptions(Named):
        @hookimpl
        def cli_options(self):
            return ["--flag"]

    class Fine(Named):
        @hookimpl
        def cli_options(self):
            return [Option("--fine-flag", help="ok")]

    pm = manager(Boom("boom"), Clash("clash"), NotOptions("strings"), Fine("fine"))
    options = pm.options(reserved=["--http-addr"])
    assert [(name, o.flag) for name, o in options] == [("fine", "--fine-flag")]
    assert set(pm.broken) == {"boom", "clash", "strings"}
    assert "RuntimeError: boom" in pm.broken["boom"].error and "hook cli_options" in pm.broken["boom"].error
    assert "--http-addr is already defined by the core" in pm.broken["clash"].error
    assert pm.names() == ["fine"]  # the broken ones are unregistered: none of their hooks run
    assert pm.call_each("posture", settings=None) == []
    listed = {i.name: i for i in pm.list_plugins()}
    assert listed["boom"].error and listed["fine"].error is None
    assert "error" in listed["boom"].as_json() and "error" not in listed["fine"].as_json()
    assert list(pm.broken) == ["boom", "clash", "strings"]  # in the order they registered
    with pytest.raises(RuntimeFailure) as e:  # the first one's cli_options raised: exit 1
        pm.require_healthy()
    assert "plugin boom" in str(e.value) and "2 more" in str(e.value)
    # given to the manager directly (a test's): neither installed nor --plugin, so no flag removes it
    assert "; fix it (2 more broken" in str(e.value) and "--disable-plugin" not in str(e.value)


def test_of_two_plugins_with_one_flag_the_later_one_is_broken():
    """A --plugin module registers after the installed plugins, and was called first: it took a
    built-in's flag, and the built-in was marked broken (a plugin author's walkthrough)."""
    class Builtin(Named):
        @hookimpl
        def cli_options(self):
            return [Option("--blob-max-bytes", help="the built-in's")]

    class Later(Named):
        @hookimpl
        def cli_options(self):
            return [Option("--blob-max-bytes", help="mine"), Option("--later-own", help="mine too")]

    pm = manager(Builtin("blobstore"), Later("later"))
    assert [(name, o.flag) for name, o in pm.options()] == [("blobstore", "--blob-max-bytes")]
    assert list(pm.broken) == ["later"] and pm.names() == ["blobstore"]
    assert "flag --blob-max-bytes is already defined by blobstore" in pm.broken["later"].error


@pytest.mark.parametrize("raw, expected", [(None, None), ("", ()), (" a, b,,a ", ("a", "b"))])
def test_load_plugins_env(raw, expected):
    env = {} if raw is None else {"UNIBUS_LOAD_PLUGINS": raw}
    assert load_plugins_from_env(env) == expected


def test_load_only_some_entry_points():
    pm = PluginManager(only=["route_tls"])
    assert pm.names() == ["route_tls"]
    assert set(pm.not_loaded) == {"auth_enforce", "blobstore", "nats_monitor"}
    assert "UNIBUS_LOAD_PLUGINS" in pm.why_not_loaded("auth_enforce")
    assert pm.unavailable_flags()["--nats-monitor-port"] == "nats_monitor"
    assert "--route-tls-cert" not in pm.unavailable_flags()
    assert PluginManager(only=[]).names() == []
    with pytest.raises(ConfigError, match="UNIBUS_LOAD_PLUGINS: no plugin named nope"):
        PluginManager(only=["nope"])


# -- real installed plugins, in subprocesses ---------------------------------------------------

BROKEN = {
    "misspelt": ("unibus_test_misspelt", """
        from unibus import hookimpl

        @hookimpl
        def configure_nat(settings, config):
            config["oops"] = True
        """, ("plugin misspelt", "hook configure_nat", "did you mean configure_nats")),
    "badarg": ("unibus_test_badarg", """
        from unibus import hookimpl

        @hookimpl
        def posture(setings):
            return {"tls": True}
        """, ("plugin badarg", "hook posture", "setings")),
    "wrapper": ("unibus_test_wrapper", """
        from unibus import hookimpl

        @hookimpl(hookwrapper=True)
        def posture(settings):
            yield
        """, ("plugin wrapper", "hook posture", "wrappers are not supported")),
    "noimport": ("unibus_test_noimport", """
        raise ImportError("simulated broken install")
        """, ("plugin noimport", "failed to load", "simulated broken install")),
}


GOOD = {
    # a third-party plugin that takes over a built-in's flag: it is its own, not refused
    "monitor2": ("unibus_test_monitor2", """
        from unibus import Option, hookimpl

        @hookimpl
        def cli_options():
            return [Option("--nats-monitor-port", help="another monitor", convert=int)]
        """, ()),
    # a third-party plugin with a flag of its own
    "notes": ("unibus_test_notes", """
        from unibus import Option, hookimpl

        @hookimpl
        def cli_options():
            return [Option("--notes-max", help="most notes kept", default="10")]
        """, ()),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A directory with plugin modules and a dist-info that declares them as ``unibus`` entry points."""
    return make_site(tmp_path_factory.mktemp("site"), BROKEN)


@pytest.fixture(scope="module")
def site_with_replacement(tmp_path_factory) -> Path:
    return make_site(tmp_path_factory.mktemp("site2"), GOOD)


def make_site(d: Path, plugins: dict) -> Path:
    eps = ["[unibus]"]
    for name, (module, source, _) in plugins.items():
        (d / f"{module}.py").write_text(textwrap.dedent(source))
        eps.append(f"{name} = {module}")
    info = d / "unibus_test_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: unibus-test-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("\n".join(eps) + "\n")
    return d


def with_site(site: Path, load: str | None = None) -> dict[str, str]:
    env = {"PYTHONPATH": str(site)}
    if load is not None:
        env["UNIBUS_LOAD_PLUGINS"] = load
    return env


def test_plugins_lists_and_marks_broken_plugins(site):
    proc = run_membershipd("plugins", "--json", env=with_site(site))
    assert proc.returncode == 0, proc.stderr
    listed = {p["name"]: p for p in json.loads(proc.stdout)}
    assert {"nats_monitor", "auth_enforce", "route_tls", "blobstore"} <= set(listed)
    assert all("error" not in listed[n] for n in ("nats_monitor", "auth_enforce", "route_tls", "blobstore"))
    for name, (_, _, needles) in BROKEN.items():
        entry = listed[name]
        assert entry["distribution"] == "unibus-test-plugins" and entry["version"] == "0.1"
        assert entry["hooks"] == []
        for needle in needles:
            assert needle in entry["error"], entry["error"]
    text = run_membershipd("plugins", env=with_site(site))
    assert text.returncode == 0 and "Traceback" not in text.stderr
    assert sum("BROKEN" in line for line in text.stdout.splitlines()) == len(BROKEN)


def test_help_still_works_and_shows_the_broken_plugins(site):
    for argv in (["serve", "--help"], ["--help"], ["posture", "--help"]):
        proc = run_membershipd(*argv, env=with_site(site))
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "broken plugins" in proc.stdout and "hook configure_nat" in proc.stdout
    assert "--route-tls-cert" in run_membershipd("serve", "--help", env=with_site(site)).stdout


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_plugin_stops_serve_with_one_line(site, tmp_path, name):
    needles = BROKEN[name][2]
    env = with_site(site, f"auth_enforce,{name}")
    one_error_line(run_membershipd("posture", env=env), 2, *needles, f"--disable-plugin {name}")
    if name == "misspelt":  # serve too: before anything starts
        proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), env=env)
        one_error_line(proc, 2, *needles)
        assert not (tmp_path / "d").exists() and not nats_server_pids(tmp_path)


def test_blocking_the_broken_plugin_lets_it_start(site):
    env = with_site(site, "auth_enforce,misspelt")
    proc = run_membershipd("posture", "--disable-plugin", "misspelt", env=env)
    assert proc.returncode == 0, proc.stderr


# -- fail closed when the plugin behind a flag is not there ----------------------------------------


def test_bus_auth_enforce_without_auth_enforce_is_refused(tmp_path):
    env = {"UNIBUS_LOAD_PLUGINS": "nats_monitor,route_tls,blobstore"}
    proc = run_membershipd("serve", "--data-dir", str(tmp_path / "d"), env=env)
    one_error_line(proc, 2, "--bus-auth enforce", "auth_enforce", "UNIBUS_LOAD_PLUGINS", "--bus-auth off")
    assert not (tmp_path / "d").exists() and not nats_server_pids(tmp_path)
    one_error_line(run_membershipd("posture", env=env), 2, "auth_enforce")
    # the open bus only when asked for, and the posture says so
    off = run_membershipd("posture", "--bus-auth", "off", env=env)
    assert off.returncode == 1 and json.loads(off.stdout)["bus_auth"] == "off"


@pytest.mark.parametrize("flag", ["--route-tls-cert", "--route-tls-ca=/x"])
def test_route_tls_flags_without_route_tls_are_refused(flag):
    env = {"UNIBUS_LOAD_PLUGINS": "auth_enforce"}
    args = [flag] if "=" in flag else [flag, "/x"]
    one_error_line(run_membershipd("posture", *args, env=env), 2, flag.split("=")[0], "route_tls",
                   "UNIBUS_LOAD_PLUGINS")


def test_unknown_plugin_in_load_plugins():
    one_error_line(run_membershipd("posture", env={"UNIBUS_LOAD_PLUGINS": "auth_enforce,nope"}), 2,
                   "UNIBUS_LOAD_PLUGINS", "nope")
    listing = run_membershipd("plugins", env={"UNIBUS_LOAD_PLUGINS": "route_tls"})
    assert listing.returncode == 0
    assert "not loaded (UNIBUS_LOAD_PLUGINS): auth_enforce, blobstore, nats_monitor" in listing.stdout.splitlines()


def test_a_loaded_plugin_owns_a_flag_a_missing_built_in_would_have(site_with_replacement):
    site = site_with_replacement
    env = with_site(site, "auth_enforce,monitor2")
    proc = run_membershipd("posture", "--nats-monitor-port", "9999", env=env)
    assert proc.returncode == 0, proc.stderr
    gone = run_membershipd("posture", "--nats-monitor-port", "9999", env=with_site(site, "auth_enforce"))
    one_error_line(gone, 2, "--nats-monitor-port", "nats_monitor")


@pytest.mark.parametrize("command", ["posture", "serve"])
def test_a_flag_of_a_third_party_plugin_left_out_is_refused_naming_it(site_with_replacement, tmp_path, command):
    """Not only the built-ins' flags: argparse said only "unrecognized arguments: --notes-max 3"
    (a plugin author's walkthrough)."""
    env = with_site(site_with_replacement, "auth_enforce")
    proc = run_membershipd(command, "--data-dir", str(tmp_path / "d"), "--notes-max", "3", env=env)
    one_error_line(proc, 2, "--notes-max belongs to the notes plugin", "UNIBUS_LOAD_PLUGINS=auth_enforce leaves it out")
    assert "unrecognized arguments" not in proc.stderr
    assert not (tmp_path / "d").exists() and not nats_server_pids(tmp_path)
    loaded = run_membershipd("posture", "--notes-max", "3", env=with_site(site_with_replacement, "auth_enforce,notes"))
    assert loaded.returncode == 0, loaded.stderr


NOISY = """
    import os
    import pathlib

    from unibus import Option, hookimpl

    pathlib.Path(os.environ["UNIBUS_TEST_IMPORTED"]).touch()  # what running its code would show

    @hookimpl
    def cli_options():
        return [Option("--noisy-level", help="how noisy")]
"""


def test_a_plugin_left_out_runs_no_code_unless_its_flag_is_given(tmp_path):
    """``UNIBUS_LOAD_PLUGINS`` leaves a plugin out: its module is imported only to name it when
    the command line has a flag nothing loaded knows, never at an ordinary start."""
    (tmp_path / "site").mkdir()
    site = make_site(tmp_path / "site", {"noisy": ("unibus_test_noisy", NOISY, ())})
    marker = tmp_path / "imported"
    env = {**with_site(site, "auth_enforce"), "UNIBUS_TEST_IMPORTED": str(marker)}
    plain = run_membershipd("posture", "--bus-auth", "off", env=env)
    assert plain.returncode in (0, 1) and "error:" not in plain.stderr, plain.stderr
    assert not marker.exists()
    flagged = run_membershipd("posture", "--bus-auth", "off", "--noisy-level", "3", env=env)
    one_error_line(flagged, 2, "--noisy-level belongs to the noisy plugin", "UNIBUS_LOAD_PLUGINS=auth_enforce")
    assert marker.exists()


SHADOW = """
    from unibus import hookimpl

    @hookimpl
    def posture(settings):
        return {"bus_auth": "enforce", "acl": True}
"""


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_second_distribution_declaring_a_plugins_name_is_refused_not_picked(tmp_path, where):
    """Adversary: an installed distribution that declares an entry point named ``auth_enforce``
    (a name clash, or a package meaning to stand in for it). Which one loaded depended on the order
    of ``sys.path``, without a word: the built-in when the other came first, the other when it came
    after the environment's own site-packages (a black-box test of the contract found the first
    case). Neither loads now; the plugin is broken, naming both distributions."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "unibus_test_shadow.py").write_text(textwrap.dedent(SHADOW))
    info = shadow / "unibus_shadow-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: unibus-shadow\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[unibus]\nauth_enforce = unibus_test_shadow\n")
    if where == "before":
        env = {"PYTHONPATH": str(shadow)}
    else:  # after site-packages: a sitecustomize appends it
        first = tmp_path / "first"
        first.mkdir()
        (first / "sitecustomize.py").write_text(f"import sys\nsys.path.append({str(shadow)!r})\n")
        env = {"PYTHONPATH": str(first)}
    listing = run_membershipd("plugins", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    listed = {p["name"]: p for p in json.loads(listing.stdout)}
    assert set(listed["auth_enforce"]["distribution"].split(", ")) == {"unibus", "unibus-shadow"}, listed
    error = listed["auth_enforce"].get("error", "")
    assert "more than one distribution" in error and "unibus-shadow" in error and "unibus," in error, listed
    one_error_line(run_membershipd("posture", env=env), 2, "auth_enforce", "unibus-shadow",
                   "--disable-plugin auth_enforce")
    off = run_membershipd("posture", "--bus-auth", "off", "--disable-plugin", "auth_enforce", env=env, cwd=tmp_path)
    assert off.returncode == 1 and json.loads(off.stdout)["summary"] == "tls", off.stderr


def test_a_stand_in_that_calls_itself_unibus_is_not_the_built_in(tmp_path):
    """Adversary: a distribution whose metadata says ``Name: Unibus`` (one name with the real one,
    so no clash is seen) declaring ``auth_enforce``: it loaded, and its posture was believed (a
    review). It is not the module ``unibus.plugins.auth_enforce``, so ``--bus-auth enforce`` is
    refused; blocking a clashed name imports neither distribution."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "unibus_test_standin.py").write_text(textwrap.dedent(SHADOW) + "print('STAND-IN IMPORTED')\n")
    info = site / "standin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: Unibus\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text("[unibus]\nauth_enforce = unibus_test_standin\n")
    env = {"PYTHONPATH": str(site)}  # first on sys.path (the cwd, with the checkout's egg-info, is not)
    one_error_line(run_membershipd("posture", env=env, cwd=tmp_path), 2, "--bus-auth enforce",
                   "not the built-in module unibus.plugins.auth_enforce")
    # a clash (another name): blocked, neither is imported, and the open bus starts as asked
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-dist\nVersion: 9.9\n")
    off = run_membershipd("posture", "--bus-auth", "off", "--disable-plugin", "auth_enforce", env=env, cwd=tmp_path)
    assert off.returncode == 1 and "STAND-IN IMPORTED" not in off.stdout + off.stderr, (off.stdout, off.stderr)
