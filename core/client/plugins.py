"""Plugins of the member's client: ``unibus`` subcommands from the ``client_commands`` hook.

The client loads the entry points of the group ``unibus.client`` (a plugin
may publish the same module there and in ``unibus``) and adds each
:class:`ClientCommand` to its command line. docs/plugins.md, "Client commands".
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"\A[a-z][a-z0-9-]{0,31}\Z")


@dataclass(frozen=True)
class ClientCommand:
    """One ``unibus`` subcommand a plugin adds (the ``client_commands`` hook).

    ``name``: ``"audit"`` or ``"audit tail"`` (a group and its subcommand;
    words of ``[a-z][a-z0-9-]*``). ``arguments(parser)`` adds the command's
    arguments; ``run(ctx, client)`` runs it and returns the exit code (0 done,
    1 the server refused, 2 bad usage); ``ctx.args`` is the parsed command
    line, ``ctx.json`` whether ``--json`` was given. Raise
    ``unibus.client.cli.UsageError`` for bad usage (exit 2, one line); an
    :class:`unibus.client.ApiError` is reported like a core command's (exit 1).
    """

    name: str
    help: str
    run: Callable[[Any, Any], Awaitable[int] | int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.name.split())


def check_command(command: object) -> str | None:
    """Why ``command`` cannot be added (None: it can)."""
    if not isinstance(command, ClientCommand):
        return "client_commands must return a list of unibus.client.plugins.ClientCommand objects"
    words = command.words
    if not 1 <= len(words) <= 2 or not all(_WORD.fullmatch(w) for w in words):
        return f"command name {command.name!r} must be one or two words of [a-z][a-z0-9-]*"
    if not callable(command.run):
        return f"command {command.name!r}: run must be callable"
    return None


def client_plugin_commands(modules: Iterable[object] = (), *, entry_points: bool = True) -> tuple[list[tuple[str, ClientCommand]], dict[str, str]]:
    """``([(plugin, command)], {broken plugin: error})`` from the ``unibus.client`` entry
    points (and ``modules``, for tests), each command checked."""
    from ..pluginmanager import CLIENT_ENTRY_POINT_GROUP, PluginError, PluginManager

    pm = PluginManager(load_entry_points=entry_points, group=CLIENT_ENTRY_POINT_GROUP)
    broken = {name: info.error or "broken" for name, info in pm.broken.items()}
    for module in modules:
        try:
            pm.register(module)
        except PluginError as e:
            broken[e.plugin] = str(e)
    out: list[tuple[str, ClientCommand]] = []
    for name, impl in pm._impls("client_commands"):
        try:
            commands = list(impl.function() or ())
        except Exception as e:  # a broken plugin must not break the client
            broken[name] = f"plugin {name}, hook client_commands: failed: {type(e).__name__}: {e}"
            continue
        problems = [p for p in (check_command(c) for c in commands) if p]
        if problems:
            broken[name] = f"plugin {name}, hook client_commands: {problems[0]}"
            continue
        out.extend((name, c) for c in commands)
    return out, broken


__all__ = ["ClientCommand", "check_command", "client_plugin_commands"]
