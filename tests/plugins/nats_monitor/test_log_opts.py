"""The nats_monitor decoupling table: ``nats_log_opts(debug_env, monitor_env)``.

docs/nats-monitor.md: MONITOR opens the loopback monitor while the log stays
quiet; DEBUG turns on debug+trace and implies the monitor whatever MONITOR says.
Spellings: true ``1 true yes on``, false ``0 false no off`` and empty/unset,
case-insensitive; anything else is refused with exit code 2 naming the variable.
"""

from __future__ import annotations

import itertools

import pytest
from unibus.errors import ConfigError
from unibus.plugins import nats_monitor
from unibus.plugins.nats_monitor import (
    ENV_DEBUG,
    ENV_MONITOR,
    NatsLogOpts,
    current_log_opts,
    nats_log_opts,
)
from unibus.settings import Settings

UNSET = [None]
TRUE = ["1", "true", "yes", "on", "TRUE", "True", "Yes", "YES", "oN", " 1 ", " on", "true\n", "\tyes"]
FALSE = ["", "0", "false", "no", "off", "FALSE", "False", "No", "OFF", " off ", "0 ", "  "]
BAD = ["2", "enable", "enabled", "y", "n", "tru", "maybe", "-1", "10", "yes please", "t", "of", "none", "null", "1.0"]

QUIET = NatsLogOpts(no_log=True, debug=False, trace=False, monitor=False)
MONITOR_ONLY = NatsLogOpts(no_log=True, debug=False, trace=False, monitor=True)
DEBUG = NatsLogOpts(no_log=False, debug=True, trace=True, monitor=True)


def _kind(value: str | None) -> str:
    return "true" if value in TRUE else "off"


def _id(value: str | None) -> str:
    return "unset" if value is None else repr(value)


TABLE = [
    pytest.param(d, m, id=f"debug={_id(d)}-monitor={_id(m)}")
    for d, m in itertools.product(UNSET + TRUE + FALSE, UNSET + TRUE + FALSE)
]


@pytest.mark.parametrize(("debug_env", "monitor_env"), TABLE)
def test_decoupling_table(debug_env: str | None, monitor_env: str | None) -> None:
    opts = nats_log_opts(debug_env, monitor_env)
    if _kind(debug_env) == "true":
        # DEBUG implies the monitor, whatever MONITOR says (even an explicit 0).
        assert opts == DEBUG
    elif _kind(monitor_env) == "true":
        # The monitor opens while the log stays quiet.
        assert opts == MONITOR_ONLY
    else:
        assert opts == QUIET


def test_table_rows_spelled_out() -> None:
    """The three rows of the table, in the issue's own words."""
    assert nats_log_opts(None, None) == NatsLogOpts(True, False, False, False)
    assert nats_log_opts(None, "1") == NatsLogOpts(True, False, False, True)
    assert nats_log_opts("1", None) == NatsLogOpts(False, True, True, True)
    assert nats_log_opts("1", "0") == NatsLogOpts(False, True, True, True)
    assert nats_log_opts("1", "1") == NatsLogOpts(False, True, True, True)
    assert nats_log_opts("0", "0") == NatsLogOpts(True, False, False, False)


def test_monitor_never_implies_debug() -> None:
    for m in TRUE:
        opts = nats_log_opts(None, m)
        assert opts.no_log and not opts.debug and not opts.trace


def _bad_cases():
    valid = UNSET + ["1", "0", "", "on", "off"]
    for bad in BAD:
        for other in valid:
            yield pytest.param(bad, other, ENV_DEBUG, id=f"debug={bad!r}-monitor={_id(other)}")
            yield pytest.param(other, bad, ENV_MONITOR, id=f"debug={_id(other)}-monitor={bad!r}")


@pytest.mark.parametrize(("debug_env", "monitor_env", "named"), list(_bad_cases()))
def test_bad_spellings_are_refused(debug_env: str | None, monitor_env: str | None, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        nats_log_opts(debug_env, monitor_env)
    err = info.value
    assert err.exit_code == 2
    msg = str(err)
    assert named in msg
    other = ENV_MONITOR if named == ENV_DEBUG else ENV_DEBUG
    assert other not in msg, "the message names the variable at fault, not the other one"
    bad = debug_env if named == ENV_DEBUG else monitor_env
    assert repr(bad) in msg
    # It says what is allowed, on one line.
    assert "1 true yes on" in msg and "0 false no off" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad", BAD)
def test_both_bad_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        nats_log_opts(bad, bad)
    assert info.value.exit_code == 2
    assert ENV_DEBUG in str(info.value) or ENV_MONITOR in str(info.value)


# -- the same table read from the environment ----------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, QUIET),
        ({ENV_MONITOR: "1"}, MONITOR_ONLY),
        ({ENV_MONITOR: "Yes"}, MONITOR_ONLY),
        ({ENV_DEBUG: "1"}, DEBUG),
        ({ENV_DEBUG: "on", ENV_MONITOR: "off"}, DEBUG),
        ({ENV_DEBUG: "", ENV_MONITOR: ""}, QUIET),
        ({ENV_DEBUG: "false", ENV_MONITOR: "true"}, MONITOR_ONLY),
    ],
    ids=["none", "monitor", "monitor-Yes", "debug", "debug-beats-monitor-off", "both-empty", "debug-false-monitor-true"],
)
def test_current_log_opts_reads_the_environment(monkeypatch: pytest.MonkeyPatch, env, expected) -> None:
    monkeypatch.delenv(ENV_DEBUG, raising=False)
    monkeypatch.delenv(ENV_MONITOR, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert current_log_opts() == expected


@pytest.mark.parametrize("var", [ENV_DEBUG, ENV_MONITOR])
def test_validate_settings_refuses_a_bad_toggle(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    """validate_settings runs at start-up and in `membershipd posture`: a bad value stops both."""
    monkeypatch.delenv(ENV_DEBUG, raising=False)
    monkeypatch.delenv(ENV_MONITOR, raising=False)
    monkeypatch.setenv(var, "enable")
    with pytest.raises(ConfigError) as info:
        nats_monitor.validate_settings(Settings())
    assert info.value.exit_code == 2 and var in str(info.value)


def test_no_posture_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor is no posture fact: the plugin reports none (and posture does no I/O)."""
    assert not hasattr(nats_monitor, "posture")
