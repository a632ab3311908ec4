"""nats_monitor: nats-server's monitoring endpoint on loopback, and its log volume.

Two environment toggles (docs/nats-monitor.md) decide both, through one pure function,
:func:`nats_log_opts`:

==========================  =======  =====  =====  =======
UNIBUS_NATS_DEBUG / MONITOR  no_log   debug  trace  monitor
==========================  =======  =====  =====  =======
neither                      True     False  False  False
MONITOR=1                    True     False  False  True
DEBUG=1 (MONITOR any)        False    True   True   True
==========================  =======  =====  =====  =======

``MONITOR`` opens ``http://127.0.0.1:<--nats-monitor-port>`` while the log stays
quiet (only nats-server warnings, errors and fatal lines reach membershipd's
log); ``DEBUG`` turns on nats-server debug and trace logging and, for backward
compatibility, implies the monitor. The monitor has no authentication, so its
host is hard-coded to 127.0.0.1; the core pins it there too, whatever any
other plugin writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from unibus import hookimpl
from unibus.errors import ConfigError
from unibus.settings import Option, Settings, parse_bool_env, parse_port

PLUGIN_NAME = "nats_monitor"
MONITOR_HOST = "127.0.0.1"
DEFAULT_PORT = 8222
ENV_DEBUG = "UNIBUS_NATS_DEBUG"
ENV_MONITOR = "UNIBUS_NATS_MONITOR"
# nats-server config keys that open (or shape) the monitoring endpoint.
_MONITOR_KEYS = frozenset({"http", "http_port", "monitor_port", "https", "https_port", "http_base_path"})


@dataclass(frozen=True)
class NatsLogOpts:
    no_log: bool
    debug: bool
    trace: bool
    monitor: bool


def nats_log_opts(debug_env: str | None, monitor_env: str | None) -> NatsLogOpts:
    """Decide nats-server's logging and monitor from the two toggles' raw values.

    Values are the environment strings (``None`` when unset). Raises
    :class:`ConfigError` (exit 2) for a spelling that is neither true
    (``1 true yes on``) nor false (``0 false no off``, empty).
    """
    try:
        debug = parse_bool_env(debug_env)
    except ValueError as e:
        raise ConfigError(f"{ENV_DEBUG}: {e}") from None
    try:
        monitor = parse_bool_env(monitor_env)
    except ValueError as e:
        raise ConfigError(f"{ENV_MONITOR}: {e}") from None
    if debug:
        return NatsLogOpts(no_log=False, debug=True, trace=True, monitor=True)
    return NatsLogOpts(no_log=True, debug=False, trace=False, monitor=monitor)


def current_log_opts() -> NatsLogOpts:
    return nats_log_opts(os.environ.get(ENV_DEBUG), os.environ.get(ENV_MONITOR))


def monitor_url(settings: Settings) -> str:
    return f"http://{MONITOR_HOST}:{settings.option('nats_monitor_port', DEFAULT_PORT)}"


@hookimpl
def cli_options() -> list[Option]:
    return [
        Option(
            "--nats-monitor-port",
            help=f"port of the loopback NATS monitor, opened by {ENV_MONITOR}=1 or {ENV_DEBUG}=1 (default {DEFAULT_PORT}; host is always {MONITOR_HOST})",
            default=DEFAULT_PORT,
            convert=parse_port,
            metavar="PORT",
            doc="loopback NATS monitor port",
        )
    ]


@hookimpl
def validate_settings(settings: Settings) -> None:
    # Reading the toggles refuses a bad spelling at start-up and in
    # `membershipd posture`, before anything runs. The monitor is no posture fact.
    current_log_opts()


@hookimpl(trylast=True)
def configure_nats(settings: Settings, config: dict[str, Any]) -> None:
    # trylast: runs after every other plugin, so its loopback address wins.
    opts = current_log_opts()
    config["debug"] = opts.debug
    config["trace"] = opts.trace
    # nats-server matches config keys case-insensitively ("HTTP" opens the
    # monitor like "http" does), so every spelling of a monitor key goes.
    for key in [k for k in config if isinstance(k, str) and k.lower() in _MONITOR_KEYS]:
        del config[key]
    if opts.monitor:
        config["http"] = f"{MONITOR_HOST}:{settings.option('nats_monitor_port', DEFAULT_PORT)}"


@hookimpl
def healthz_fields(app) -> dict[str, Any]:
    from unibus.app import SETTINGS

    try:
        enabled = current_log_opts().monitor
    except ConfigError:
        enabled = False
    # Closed: exactly {"enabled": false}, the shape docs/http-api.md shows for /healthz.
    return {"enabled": True, "url": monitor_url(app[SETTINGS])} if enabled else {"enabled": False}
