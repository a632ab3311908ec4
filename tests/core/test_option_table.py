"""The option table (core/options.py): README.md's flag table, --help and the environment come from it."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from unibus.errors import ConfigError
from unibus.options import (
    BUILTIN_PLUGINS,
    CORE_ROWS,
    README_END,
    README_HOWTO,
    README_START,
    add_core_arguments,
    build_settings,
    builtin_plugin_options,
    main,
    plugin_rows,
    readme_table,
    replace_readme_table,
    reserved_flags,
)
from unibus.pluginmanager import BUILTIN_PLUGIN_FLAGS
from unibus.settings import Option, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_readme_flag_table_is_the_generated_one():
    text = (ROOT / "README.md").read_text()
    assert README_START in text and README_END in text, f"README.md lost its {README_START}/{README_END} markers"
    current = text[text.index(README_START) + len(README_START):text.index(README_END)].strip()
    assert current == readme_table().strip(), (
        f"README.md's flag table differs from the option table in core/options.py; regenerate it: {README_HOWTO}")


def test_write_readme_rewrites_only_between_the_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{README_START}\n| stale |\n{README_END}\n\nafter\n")
    assert main(["--write-readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n" + README_START + "\n\n| flag | default | meaning |")
    assert text.endswith(README_END + "\n\nafter\n") and "| stale |" not in text
    assert "rewritten" in capsys.readouterr().out
    assert main(["--write-readme", str(readme)]) == 0 and readme.read_text() == text
    assert "already up to date" in capsys.readouterr().out


def test_write_readme_refuses_a_file_without_markers(tmp_path):
    with pytest.raises(ValueError, match="markers"):
        replace_readme_table("no markers here\n", readme_table())


def test_readme_option_prints_the_table(capsys):
    assert main(["--readme"]) == 0
    assert capsys.readouterr().out == readme_table()


def test_every_core_flag_is_a_settings_field_and_an_argparse_flag():
    parser = argparse.ArgumentParser()
    add_core_arguments(parser)
    fields = set(Settings.__dataclass_fields__)
    for row in CORE_ROWS:
        for flag in row.flags:
            assert flag.name in fields, flag.flag
            assert flag.flag in parser._option_string_actions
            assert parser._option_string_actions[flag.flag].help == flag.help_text
    assert {"--disable-plugin", "--plugin", "-h", "--help"} <= reserved_flags()


def test_help_fills_default_and_env_from_the_table():
    parser = argparse.ArgumentParser()
    add_core_arguments(parser)
    help_of = {a.option_strings[0]: a.help for a in parser._actions}
    assert help_of["--data-dir"] == "all writable state [UNIBUS_DATA_DIR] (default ./local_files)"
    assert help_of["--cluster-pass-file"] == "route password file, mode 0600 [UNIBUS_CLUSTER_PASS]"
    assert help_of["--auth-skew"] == "allowed clock skew of signed requests, 1-600 (default 60)"
    assert help_of["--kv-replicas"] == "replicas of every KV bucket: 1, 3 or 5 (default 1)"


def test_the_cluster_password_variable_is_never_a_file_name(tmp_path):
    """UNIBUS_CLUSTER_PASS holds the password itself: it never stands in for --cluster-pass-file's path."""
    parser = argparse.ArgumentParser()
    add_core_arguments(parser)
    env = {"UNIBUS_CLUSTER_PASS": str(tmp_path / "no-such-file")}
    s = build_settings(parser.parse_args(["--cluster-name", "c"]), env)
    assert s.cluster_pass_file is None and s.cluster_pass.reveal() == env["UNIBUS_CLUSTER_PASS"]


def test_checks_run_in_table_order(tmp_path):
    """A row's checks run before any later flag is read: the first fault in table order is the one reported."""
    parser = argparse.ArgumentParser()
    add_core_arguments(parser)
    ns = parser.parse_args(["--tls-cert", str(tmp_path / "c.pem"), "--kv-replicas", "2", "--server-name", "bad name"])
    with pytest.raises(ConfigError, match=r"^--tls-cert and --tls-key go together"):
        build_settings(ns, {})
    ns = parser.parse_args(["--metrics-tls-ca", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match=r"^--tls-cert and --tls-key"):
        build_settings(ns, {})


def test_plugin_rows_share_a_row_per_doc_and_name_the_plugin():
    shared = "all together (demo plugin); a script makes them"
    opts = [
        ("demo", Option("--demo-a", help="a file (default none)", metavar="PATH", doc=shared)),
        ("demo", Option("--demo-b", help="b file", metavar="PATH", doc=shared)),
        ("demo", Option("--demo-level", help="how loud (default 3)", default=3, metavar="N")),
        ("other", Option("--other-x", help="x", metavar="X|Y", env="OTHER_X", doc="x or y")),
    ]
    assert plugin_rows(opts) == [
        ("`--demo-a`, `--demo-b`", "none", shared),
        ("`--demo-level N`", "3", "how loud (demo plugin)"),
        ("`--other-x X\\|Y` [`OTHER_X`]", "none", "x or y (other plugin)"),
    ]


def test_builtin_plugins_are_the_entry_points():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert list(BUILTIN_PLUGINS) == list(project["project"]["entry-points"]["unibus"])


def test_builtin_plugin_flags_match_what_the_plugins_declare():
    """pluginmanager refuses a built-in plugin's flag by name when the plugin is not loaded: same flags."""
    assert {opt.flag: plugin for plugin, opt in builtin_plugin_options()} == dict(BUILTIN_PLUGIN_FLAGS)
