"""Every hookspec has at least one test that implements it and makes the core call it (as datasette
checks its hooks). A new hook without a test plugin fails here (docs/plugins.md, "Hook reference")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from unibus.pluginmanager import HOOK_NAMES

REPO = Path(__file__).resolve().parents[2]
TEST_FILES = sorted([*REPO.glob("tests/**/test_*.py"), *REPO.glob("examples/*/tests/test_*.py")])
#: where each hook is exercised through a plugin defined in a test (or an example plugin's tests)
EXAMPLE_PLUGINS = sorted(REPO.glob("examples/*/unibus_*/__init__.py"))


def _implemented_in_tests(hook: str) -> list[Path]:
    pattern = re.compile(rf"(\bdef {hook}\(|\b{hook}=hookimpl\()")
    found = [p for p in TEST_FILES if pattern.search(p.read_text())]
    # an example plugin implementing the hook counts when the example's own tests run it
    for plugin in EXAMPLE_PLUGINS:
        tests = list((plugin.parent.parent / "tests").glob("test_*.py"))
        if pattern.search(plugin.read_text()) and tests:
            found.append(plugin)
    return found


def test_there_are_hooks():
    assert len(HOOK_NAMES) >= 10


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hook_has_a_test_plugin(hook):
    assert _implemented_in_tests(hook), f"no test implements the hook {hook}: add a test plugin that does"
