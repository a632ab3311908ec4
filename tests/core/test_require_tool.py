"""tests/helpers.require_tool: a test whose tool is missing skips, except under .ci/run, where it fails."""

from __future__ import annotations

import helpers
import pytest


def test_present_tool_runs(monkeypatch):
    for required in (False, True):
        monkeypatch.setattr(helpers, "REQUIRE_TOOLS", required)
        assert helpers.require_tool(None) is None


def test_missing_tool_skips_locally(monkeypatch):
    monkeypatch.setattr(helpers, "REQUIRE_TOOLS", False)
    with pytest.raises(pytest.skip.Exception, match="^strace cannot run here: ptrace refused$"):
        helpers.require_tool("strace cannot run here: ptrace refused")


def test_missing_tool_fails_under_ci(monkeypatch):
    monkeypatch.setattr(helpers, "REQUIRE_TOOLS", True)
    with pytest.raises(pytest.fail.Exception, match="promtool not installed; UNIBUS_TEST_REQUIRE_TOOLS=1"):
        helpers.require_tool("promtool not installed")
