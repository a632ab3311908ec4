"""The hooks a unibus plugin may implement.

Every built-in feature that is not the core (the loopback NATS monitor, bus
authorization, route TLS, the blob store) is a plugin that implements these
hooks, registered through the ``unibus`` entry-point group exactly like a
third-party plugin. docs/plugins.md reproduces these docstrings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

    from .client.plugins import ClientCommand
    from .events import ChangeEvent
    from .settings import Option, Settings

hookspec = pluggy.HookspecMarker("unibus")

#: The hooks whose implementation may be a coroutine function (the core awaits them); every
#: other hook must be a plain function: an ``async def`` there would return a coroutine that
#: nobody awaits, so its body (a ``validate_settings`` refusal, say) would never run.
ASYNC_HOOKS = frozenset({"startup", "shutdown", "store_changed", "reloaded"})
#: The hooks that return a dict (or None): anything else (a list, a string) is the hook's error,
#: as an exception is, not a result left out without a word.
DICT_HOOKS = frozenset({"posture", "healthz_fields"})


@hookspec
def cli_options() -> list[Option]:
    """Return the command-line options this plugin adds to ``membershipd serve``.

    Called once while the CLI is built, before any flag is parsed, for every
    plugin that is not blocked. Return a list of :class:`unibus.Option`; each
    option's value reaches every other hook as ``settings.option(dest)``. An
    option may name an environment variable (``env=``) that supplies its value
    when the flag is absent, and a ``convert`` callable that turns the raw
    string into the value or raises ``ValueError`` with a message saying what
    is allowed (membershipd then exits 2, naming the flag).

    A flag owned by a plugin that ``--disable-plugin`` blocked is refused with
    exit 2, naming the flag and the plugin.
    """


@hookspec
def validate_settings(settings: Settings) -> None:
    """Refuse a configuration this plugin cannot run with.

    Called once per command that runs with a configuration (``serve``,
    ``posture``), after every flag and environment variable was parsed into
    ``settings`` and before any other hook sees it. Check what the plugin's
    options mean together and with the core's (files exist, certificates
    match, combinations make sense); this is where such I/O belongs, so that
    ``posture`` and ``healthz_fields`` stay cheap. Raise
    :class:`unibus.ConfigError` with a message that names the flag and what to
    change: membershipd exits 2 with one line naming the plugin and the hook.
    The return value is ignored; any other exception exits 1, naming the plugin.
    """


@hookspec
def configure_nats(settings: Settings, config: dict[str, Any]) -> None:
    """Mutate the nats-server configuration before it is written.

    ``config`` is the whole server configuration as a plain dict (the JSON that
    nats-server reads): ``server_name``, ``host``, ``port``, ``jetstream``,
    ``cluster``... Add or change keys in place; the return value is ignored.
    Called once at start-up, after the core filled in its own keys; the
    configuration is then fixed for the life of the daemon (it depends on
    settings only, never on membership), so an implementation must be a pure
    function of ``settings`` and the files of the data dir.

    The core renders the dict after every plugin ran. Whatever a plugin writes,
    the monitoring endpoint (``http``) is forced onto 127.0.0.1 and secrets the
    plugin never saw (the route password) are injected only then.
    """


@hookspec
def posture(settings: Settings) -> dict[str, Any]:
    """Return the security facts this plugin is responsible for.

    Facts are ``bus_auth`` (``"enforce"`` or ``"off"``), ``acl`` (bool) and
    ``tls`` (bool), and ``listeners``: a dict of the listeners the plugin
    opens or secures (``"routes"``, ``"metrics"``) with their state
    (``"loopback"``, ``"tls"``, ``"mtls"`` or ``"plaintext"``). Report only
    what the plugin really enforces. The core merges all answers with its own
    listeners (a fact or listener reported twice keeps the weaker value),
    fills unreported facts with their insecure value, sets ``tls`` false when
    any listener is plaintext, and computes ``summary``. Called at start-up,
    before the cluster gate, by ``membershipd posture`` and on every
    ``/healthz``; it must be cheap and must not do I/O: check files and
    refuse bad combinations in ``validate_settings``, which runs first. An
    exception at start-up stops membershipd; while serving it is logged,
    counted (``unibus_plugin_hook_errors_total``) and the plugin's facts are
    left out, so they count as not holding. A result other than a dict or
    None (``["tls"]``) is the hook's error too: ``plugin hello, hook posture:
    must return a dict (or None), not list`` stops membershipd at start-up
    (exit 2); while serving it is counted and logged once an hour.
    """


@hookspec
def healthz_fields(app: web.Application) -> dict[str, Any]:
    """Return this plugin's fields for the ``/healthz`` body.

    Return a dict of the plugin's own fields; the core places it under the
    plugin's name (``{"enabled": true}`` of plugin ``nats_monitor`` appears
    as ``"nats_monitor": {"enabled": true}``), so a plugin cannot touch the
    core's keys or another plugin's. A dict whose only key is the plugin's
    name and holds a dict (the form of plugin API 1) is unwrapped; an empty
    dict or None adds nothing.
    Called on every ``/healthz`` request; must be cheap and must not block
    (no network round trips: ``/healthz`` answers at once whatever NATS is
    doing, so keep what you report current in the background). ``app`` is
    the running aiohttp application, whose state (settings, NATS connection,
    store, metrics) is reachable through the ``unibus.app`` keys. An
    exception is logged and counted, and the plugin's fields are left out; so
    are fields that JSON cannot hold (a set, bytes, NaN) and a result other
    than a dict or None (a list: ``must return a dict``), both logged once an
    hour. It is called as a plain function: an ``async def`` is refused when
    the plugin registers.
    """


@hookspec
def startup(app: web.Application) -> Any:
    """Start the plugin's runtime part.

    Called once, after nats-server and the store are ready and before the HTTP
    port opens, plugin after plugin in the call order (docs/plugins.md,
    "Order"), each awaited before the next starts. May be a coroutine
    function. It may add HTTP routes (``unibus.app.add_route``, under
    ``/v1/plugins/<plugin name>/``), make its metrics
    (``app[unibus.app.METRICS].plugin(name)``) and start background tasks.
    An exception stops membershipd with exit 1 (exit 2 for
    :class:`unibus.ConfigError`) and a message naming the plugin; the
    plugins that already started are shut down, in reverse order, and the
    failing one is not: clean up what it began before raising.
    """


@hookspec
def shutdown(app: web.Application) -> Any:
    """Stop the plugin's runtime part.

    Called once on SIGTERM/SIGINT after the HTTP port stopped accepting
    requests and before nats-server is stopped, in the reverse of the order
    the plugins started; also when a later plugin's ``startup`` failed. Not
    called for a plugin whose own ``startup`` failed or never ran. A plugin
    without a ``startup`` hook counts as started first, so it stops last.
    May be a coroutine function.
    The whole stop must fit in 10 seconds, so all shutdown hooks together get
    5 seconds; a hook still running then is cancelled and an error is logged
    naming the plugin; the hooks after it are still called, with at least
    0.1 s each. One that ignores its cancellation is left behind (the log
    names where it waits) and the daemon stops all the same. A hook that
    blocks the event loop cannot be cancelled at all: 13 s after the signal
    the daemon dumps every thread's stack and exits 1.
    """


@hookspec
def store_changed(app: web.Application, event: ChangeEvent) -> Any:
    """React to one committed membership change.

    ``event`` is a :class:`unibus.events.ChangeEvent`: ``seq`` (the membership
    log's seq of the change, None when it was not logged), ``kind``
    (``member_added``, ``member_updated``, ``member_bus_key``,
    ``member_deleted``, ``room_created``, ``room_deleted``,
    ``room_member_added``, ``room_member_removed``, ``keys_posted``),
    ``actor`` (the handle whose signed request made it; None for an offline
    change or when unknown), ``origin`` (``"local"``, ``"remote"``: another
    cluster node, ``"offline"``: ``membershipd member add`` picked up at
    SIGHUP), ``before`` and ``after`` (the member's public record or the
    room's fields with its members' handles; None where there is none or it
    is not known, as for remote changes), ``handle`` and ``room_id``.

    Called once per change, after it is committed: for a local change before
    the request that made it is answered, for the others from the task that
    learnt of them. May be a coroutine function; each call gets 5 seconds.
    The return value is ignored; an exception is logged naming the plugin and
    never undoes or fails the change. Not called before ``startup`` finished.
    """


@hookspec
def reloaded(app: web.Application) -> Any:
    """The daemon re-read the store after SIGHUP.

    Called once per SIGHUP, after the store was re-read and after the
    ``store_changed`` calls for the offline changes found (``membershipd
    member add`` while the daemon ran). May be a coroutine function; the
    return value is ignored and an exception is logged naming the plugin.
    """


@hookspec
def client_commands() -> list[ClientCommand]:
    """Return the ``unibus`` subcommands this plugin adds to the member's client.

    Called by the ``unibus`` client (never by membershipd) while it builds its
    command line, for each plugin of the entry-point group ``unibus.client``.
    Return a list of :class:`unibus.client.plugins.ClientCommand`: ``name``
    (one word, or two for a subcommand of a group: ``"audit tail"``), ``help``,
    ``arguments`` (a function that adds arguments to the command's
    ``argparse`` parser) and ``run(ctx, client)``, a coroutine function (or a
    plain one) that gets the parsed command line (``ctx.args``, ``ctx.json``)
    and a signed :class:`unibus.client.UnibusClient` and returns the exit code.
    A name that a core command or another plugin already has makes the plugin
    broken: ``unibus --help`` lists it with the error, and its commands are absent.
    """
