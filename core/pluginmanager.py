"""The one plugin manager: entry points in, hooks out, blocking and listing.

Built-in plugins are loaded exactly like third-party ones, from the ``unibus``
entry-point group. ``--disable-plugin NAME`` blocks a plugin before it is
imported.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import ConfigError, RuntimeFailure
from .settings import Option

log = logging.getLogger("unibus.plugins")

ENTRY_POINT_GROUP = "unibus"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version, "hooks": list(self.hooks)}


class PluginManager:
    """Wraps :class:`pluggy.PluginManager` with unibus's verbs.

    ``PluginManager()`` loads every entry point of the ``unibus`` group except
    the blocked ones; ``PluginManager(load_entry_points=False, plugins=[...])``
    holds only the plugins given (what ``unibus.testing`` uses).
    """

    def __init__(
        self,
        blocked: Iterable[str] = (),
        *,
        load_entry_points: bool = True,
        plugins: Iterable[ModuleType | object] = (),
    ) -> None:
        self._pm = pluggy.PluginManager("unibus")
        self._pm.add_hookspecs(hookspecs)
        self._dist: dict[str, tuple[str | None, str | None]] = {}
        self.blocked = tuple(dict.fromkeys(blocked))
        self._blocked_eps: dict[str, importlib.metadata.EntryPoint] = {}
        eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)} if load_entry_points else {}
        if load_entry_points:
            unknown = [b for b in self.blocked if b not in eps]
            if unknown:
                raise ConfigError(
                    f"--disable-plugin: no plugin named {', '.join(unknown)}; installed: {', '.join(sorted(eps)) or 'none'}"
                )
        for name in self.blocked:
            self._pm.set_blocked(name)
        for name, ep in eps.items():
            if name in self.blocked:
                self._blocked_eps[name] = ep
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # a broken third-party plugin must name itself
                raise RuntimeFailure(f"plugin {name} failed to load: {type(e).__name__}: {e}") from e
            self.register(plugin, name)
            dist = ep.dist
            self._dist[name] = (dist.name if dist else None, dist.version if dist else None)
        for plugin in plugins:
            self.register(plugin)

    def register(self, plugin: ModuleType | object, name: str | None = None) -> str:
        name = name or getattr(plugin, "PLUGIN_NAME", None) or getattr(plugin, "__name__", None) or repr(plugin)
        name = name.rsplit(".", 1)[-1] if isinstance(plugin, ModuleType) and name == plugin.__name__ else name
        try:
            self._pm.register(plugin, name=name)
        except ValueError as e:
            raise RuntimeFailure(f"plugin {name} could not be registered: {e}") from e
        return name

    @property
    def hook(self) -> Any:
        return self._pm.hook

    def names(self) -> list[str]:
        return [name for name, plugin in self._pm.list_name_plugin() if plugin is not None]

    def has(self, name: str) -> bool:
        return self._pm.has_plugin(name)

    def list_plugins(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self._pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            hooks = sorted(h.name for h in self._pm.get_hookcallers(plugin) or [])
            dist, version = self._dist.get(name, (None, None))
            infos.append(PluginInfo(name, dist, version, tuple(hooks)))
        return infos

    # -- hook calls that need plugin names (for options and error messages) ---

    def _impls(self, hook_name: str) -> list[tuple[str, Any]]:
        """``(plugin name, hookimpl)`` in call order; wrappers are not supported here."""
        out = []
        for impl in reversed(getattr(self._pm.hook, hook_name).get_hookimpls()):
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                continue
            out.append((self._pm.get_name(impl.plugin) or repr(impl.plugin), impl))
        return out

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call a hook plugin by plugin, returning ``(plugin name, result)`` pairs.

        An exception is re-raised as :class:`RuntimeFailure` naming the plugin
        (a :class:`ConfigError` raised by a plugin keeps its exit code 2).
        """
        results = []
        for name, impl in self._impls(hook_name):
            try:
                res = impl.function(**{a: kwargs[a] for a in impl.argnames})
            except (ConfigError, RuntimeFailure):
                raise
            except Exception as e:
                raise RuntimeFailure(f"plugin {name}: {hook_name} failed: {type(e).__name__}: {e}") from e
            results.append((name, res))
        return results

    def call_each_safe(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Like :meth:`call_each`, but a failing plugin is logged and skipped.

        For hooks called while serving (``healthz_fields``): one broken plugin
        must not take the health endpoint down with it.
        """
        results = []
        for name, impl in self._impls(hook_name):
            try:
                results.append((name, impl.function(**{a: kwargs[a] for a in impl.argnames})))
            except Exception:
                log.exception("plugin %s: %s failed", name, hook_name)
        return results

    async def acall_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Like :meth:`call_each`, awaiting coroutine results (startup, shutdown)."""
        results = []
        for name, res in self.call_each(hook_name, **kwargs):
            if inspect.isawaitable(res):
                try:
                    res = await res
                except Exception as e:
                    raise RuntimeFailure(f"plugin {name}: {hook_name} failed: {type(e).__name__}: {e}") from e
            results.append((name, res))
        return results

    def options(self) -> list[tuple[str, Option]]:
        """Every plugin option, as ``(plugin name, Option)``; duplicates refused."""
        seen: dict[str, str] = {}
        out = []
        for name, opts in self.call_each("cli_options"):
            for opt in opts or ():
                if not isinstance(opt, Option) or not opt.flag.startswith("--"):
                    raise RuntimeFailure(f"plugin {name}: cli_options must return unibus.Option objects with --flags")
                if opt.flag in seen:
                    raise RuntimeFailure(f"plugin {name}: flag {opt.flag} is already defined by {seen[opt.flag]}")
                seen[opt.flag] = name
                out.append((name, opt))
        return out

    def blocked_flags(self) -> dict[str, str]:
        """Flags owned by blocked plugins, ``{flag: plugin}``, to refuse them by name.

        The blocked plugin's module is imported only to read its option
        declarations; it is never registered and none of its hooks run.
        """
        flags: dict[str, str] = {}
        for name, ep in self._blocked_eps.items():
            try:
                module = ep.load()
                fn = getattr(module, "cli_options", None)
                opts = fn() if callable(fn) else []
            except Exception:
                continue
            for opt in opts or ():
                if isinstance(opt, Option):
                    flags[opt.flag] = name
        return flags
