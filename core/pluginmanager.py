"""The one plugin manager: entry points in, hooks out, checking, blocking and listing.

Built-in plugins are loaded exactly like third-party ones, from the ``unibus``
entry-point group. ``--disable-plugin NAME`` blocks a plugin before it is
imported; ``UNIBUS_LOAD_PLUGINS=a,b`` loads only the plugins it names.

Every plugin is checked when it registers (docs/plugins.md, "Hook checks"):
each hook implementation must name a hook of :mod:`unibus.hookspecs`, take
only arguments that hook declares, and not be a hook wrapper. A plugin that
fails a check, fails to import or whose ``cli_options`` fails is *broken*: it
is not registered, ``membershipd plugins`` and ``--help`` list it with its
error, and ``serve``/``posture`` refuse to start (exit 2, one line naming the
plugin and the hook; ``serve`` exits 1 when ``cli_options`` raised).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib.metadata
import inspect
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import ConfigError, RuntimeFailure
from .logthrottle import LogThrottle
from .settings import Option

log = logging.getLogger("unibus.plugins")

ENTRY_POINT_GROUP = "unibus"
#: The entry points the member's client (``unibus``) loads for ``client_commands``.
CLIENT_ENTRY_POINT_GROUP = "unibus.client"
#: Comma-separated entry-point names; when set (even empty), only those plugins load.
LOAD_PLUGINS_ENV = "UNIBUS_LOAD_PLUGINS"

#: The flags of the built-in plugins, so that a flag of a plugin that is not
#: loaded (blocked, left out by UNIBUS_LOAD_PLUGINS, broken or not installed)
#: is refused naming its plugin instead of being an unknown flag.
BUILTIN_PLUGIN_FLAGS: Mapping[str, str] = {
    "--nats-monitor-port": "nats_monitor",
    "--route-tls-cert": "route_tls",
    "--route-tls-key": "route_tls",
    "--route-tls-ca": "route_tls",
    "--blob-max-bytes": "blobstore",
    "--blob-max-uploads": "blobstore",
    "--blob-max-downloads": "blobstore",
}

#: The built-in plugins' modules (their entry points in the project's own pyproject).
BUILTIN_MODULES = frozenset(f"{__package__}.plugins.{n}" for n in ("nats_monitor", "auth_enforce", "route_tls",
                                                                   "blobstore"))

#: The name of the plugin whose hook implementation is running (None: the core).
#: ``unibus.app.add_route`` reads it to place a plugin's routes under
#: ``/v1/plugins/<name>/`` (docs/plugins.md, "Routes").
CURRENT_PLUGIN: contextvars.ContextVar[str | None] = contextvars.ContextVar("unibus_current_plugin", default=None)


@contextlib.contextmanager
def running_plugin(name: str) -> Iterator[None]:
    """Mark ``name`` as the plugin whose code runs in this block (see :data:`CURRENT_PLUGIN`)."""
    token = CURRENT_PLUGIN.set(name)
    try:
        yield
    finally:
        CURRENT_PLUGIN.reset(token)


def current_plugin() -> str | None:
    """The plugin whose hook implementation is running, or None."""
    return CURRENT_PLUGIN.get()


HOOK_NAMES = tuple(sorted(name for name, fn in vars(hookspecs).items()
                          if callable(fn) and hasattr(fn, "unibus_spec")))


class PluginError(ConfigError):
    """A plugin that cannot be used: the message names the plugin (and the hook)."""

    def __init__(self, plugin: str, problem: str, hook: str | None = None) -> None:
        self.plugin = plugin
        self.hook = hook
        self.problem = problem
        where = f"plugin {plugin}" + (f", hook {hook}" if hook else "")
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "distribution": self.distribution, "version": self.version,
                               "hooks": list(self.hooks)}
        if self.error is not None:
            doc["error"] = self.error
        return doc


def load_plugins_from_env(env: Mapping[str, str]) -> tuple[str, ...] | None:
    """``UNIBUS_LOAD_PLUGINS`` as a tuple of names; ``None`` when unset (load every plugin)."""
    raw = env.get(LOAD_PLUGINS_ENV)
    if raw is None:
        return None
    return tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))


def _required_args(function: Any) -> list[str]:
    """The arguments pluggy passes to a hook implementation: those without a default."""
    try:
        sig = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    args = [p.name for p in sig.parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    # as pluggy does: a function defined in a class (reached through the class) takes self implicitly
    if args and args[0] == "self" and "." in getattr(function, "__qualname__", ""):
        args = args[1:]
    return args


class PluginManager:
    """Wraps :class:`pluggy.PluginManager` with unibus's verbs.

    ``PluginManager()`` loads every entry point of the ``unibus`` group except
    the blocked ones (and, with ``only``, except those ``only`` leaves out);
    ``PluginManager(load_entry_points=False, plugins=[...])`` holds only the
    plugins given (what ``unibus.testing`` uses), and raises :class:`PluginError`
    for one that fails its checks.
    """

    def __init__(
        self,
        blocked: Iterable[str] = (),
        *,
        load_entry_points: bool = True,
        plugins: Iterable[ModuleType | object] = (),
        only: Iterable[str] | None = None,
        modules: Iterable[str] = (),
        group: str = ENTRY_POINT_GROUP,
    ) -> None:
        self._pm = pluggy.PluginManager("unibus")
        self._pm.add_hookspecs(hookspecs)
        self._dist: dict[str, tuple[str | None, str | None]] = {}
        self.blocked = tuple(dict.fromkeys(blocked))
        self.only = None if only is None else tuple(only)
        self._blocked_eps: dict[str, importlib.metadata.EntryPoint] = {}
        self._left_out_eps: dict[str, importlib.metadata.EntryPoint] = {}  # those ``only`` leaves out
        #: plugins that could not be used, ``{name: PluginInfo with error}``
        self.broken: dict[str, PluginInfo] = {}
        self._hook_raised: set[str] = set()  # broken because a hook raised (exit 1), not by a check (exit 2)
        #: hook calls that raised, ``{(plugin, hook): count}`` (unibus_plugin_hook_errors_total)
        self.hook_errors: dict[tuple[str, str], int] = {}
        self._wrong_results = LogThrottle(burst=1, window=3600.0)  # said once an hour (call_each_safe)
        #: installed plugins that ``only`` left out
        self.not_loaded: tuple[str, ...] = ()
        self._installed: set[str] = set()
        self._modules: dict[str, str] = {}  # plugin name -> the MODULE of --plugin MODULE that loaded it
        self._validated: Any = None  # the Settings validate_settings last passed
        self._order: dict[str, int] = {}  # plugin name -> when it registered (tryfirst/trylast aside)
        # Registered sorted by name, so the call order (docs/plugins.md, "Order") does not
        # depend on the order the installed distributions happen to be listed in.
        eps, self._clashes = _entry_points(group) if load_entry_points else ({}, {})
        self._installed = set(eps)
        if load_entry_points:
            self._check_selection(eps)
        for name in self.blocked:
            self._pm.set_blocked(name)
        self._load_entry_points(eps)
        for plugin in plugins:
            self.register(plugin)
        for module in dict.fromkeys(modules):
            self._load_module(module)

    def _check_selection(self, eps: dict[str, importlib.metadata.EntryPoint]) -> None:
        """Every plugin ``blocked`` or ``only`` names is installed; sets :attr:`not_loaded`."""
        installed = ", ".join(sorted(eps)) or "none"
        unknown = [b for b in self.blocked if b not in eps]
        if unknown:
            raise ConfigError(f"--disable-plugin: no plugin named {', '.join(unknown)}; installed: {installed}")
        if self.only is not None:
            unknown = [n for n in self.only if n not in eps]
            if unknown:
                raise ConfigError(f"{LOAD_PLUGINS_ENV}: no plugin named {', '.join(unknown)}; installed: {installed}")
            self.not_loaded = tuple(sorted(n for n in eps if n not in self.only and n not in self.blocked))

    def _load_entry_points(self, eps: dict[str, importlib.metadata.EntryPoint]) -> None:
        """Import and register each entry point neither blocked nor left out; a failing one is broken."""
        for name, ep in eps.items():
            if name in self.blocked:
                if name not in self._clashes:  # which of two to import for its flags: neither
                    self._blocked_eps[name] = ep
                continue
            if name in self.not_loaded:
                if name not in self._clashes:
                    self._left_out_eps[name] = ep
                continue
            dist = ep.dist
            self._dist[name] = (dist.name if dist else None, dist.version if dist else None)
            if name in self._clashes:  # which one would load depends on the order of sys.path: neither
                self._dist[name] = (", ".join(self._clashes[name]), None)
                self._mark_broken(name, f"plugin {name}: declared by more than one distribution "
                                        f"({', '.join(self._clashes[name])}); uninstall all but one")
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # a broken plugin must name itself, not crash every command
                self._mark_broken(name, f"plugin {name}: failed to load: {type(e).__name__}: {_one_line(e)}")
                continue
            try:
                self.register(plugin, name)
            except PluginError as e:
                self._mark_broken(name, str(e))

    def _load_module(self, module_name: str) -> None:
        """``--plugin MODULE``: import a module from ``sys.path`` and register it like an entry point.

        Its name is its ``PLUGIN_NAME`` (else the last part of the module name).
        A module that cannot be imported is refused (exit 2, naming the flag); one
        that fails its checks is *broken*, like an entry point that does.
        """
        import importlib

        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise ConfigError(f"--plugin {module_name}: cannot import it ({type(e).__name__}: {_one_line(e)}); "
                              "give an importable module name (its directory on PYTHONPATH)") from None
        name = getattr(module, "PLUGIN_NAME", None) or module_name.rsplit(".", 1)[-1]
        if name in self.blocked:
            return
        if self._pm.has_plugin(name) or name in self.broken:
            raise ConfigError(f"--plugin {module_name}: a plugin named {name} is already loaded")
        self._dist[name] = (f"--plugin {module_name}", None)
        self._modules[name] = module_name
        try:
            self.register(module, name)
        except PluginError as e:
            self._mark_broken(name, str(e))

    # -- registration and its checks --------------------------------------------

    def _mark_broken(self, name: str, error: str, *, raised: bool = False) -> None:
        dist, version = self._dist.get(name, (None, None))
        self.broken[name] = PluginInfo(name, dist, version, (), error)
        if raised:
            self._hook_raised.add(name)
        log.debug("%s", error)

    def check_plugin(self, plugin: ModuleType | object, name: str) -> None:
        """Raise :class:`PluginError` unless every hook implementation of ``plugin`` is usable.

        Each one must name a hook of :mod:`unibus.hookspecs` (``optionalhook``
        excepted, as in pluggy), take only arguments that hook declares, and
        must not be a wrapper (``hookwrapper=True`` or ``wrapper=True``): the
        core calls hooks plugin by plugin and never runs wrappers.
        """
        for attr in sorted(dir(plugin)):
            try:
                opts = self._pm.parse_hookimpl_opts(plugin, attr)
            except Exception:
                continue
            if opts is None:
                continue
            hook_name = opts.get("specname") or attr
            if opts.get("hookwrapper") or opts.get("wrapper"):
                raise PluginError(name, "hook wrappers are not supported; drop hookwrapper=/wrapper= and "
                                        "implement the hook plainly", hook_name)
            caller = getattr(self._pm.hook, hook_name, None)
            spec = getattr(caller, "spec", None)
            if spec is None:
                if opts.get("optionalhook"):
                    continue
                close = difflib.get_close_matches(hook_name, HOOK_NAMES, n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; the hooks are {', '.join(HOOK_NAMES)}"
                raise PluginError(name, f"no such hook{hint}", hook_name)
            impl = getattr(plugin, attr)
            plain = inspect.unwrap(impl)  # an async def behind functools.wraps is one too
            if inspect.isasyncgenfunction(plain) or (hook_name not in hookspecs.ASYNC_HOOKS
                                                     and inspect.iscoroutinefunction(plain)):
                raise PluginError(name, "must be a plain function, not async def: its result would never be "
                                        f"awaited, so its body would never run (only {', '.join(sorted(hookspecs.ASYNC_HOOKS))} "
                                        "may be coroutine functions)", hook_name)
            args = _required_args(impl)
            extra = [a for a in args if a not in spec.argnames]
            if extra:
                raise PluginError(
                    name, f"argument(s) {', '.join(extra)} not in the hook's arguments "
                          f"({', '.join(spec.argnames) or 'none'})", hook_name)

    def register(self, plugin: ModuleType | object, name: str | None = None) -> str:
        """Check and register ``plugin``; :class:`PluginError` (exit 2) names what is wrong."""
        name = name or getattr(plugin, "PLUGIN_NAME", None) or getattr(plugin, "__name__", None) or repr(plugin)
        name = name.rsplit(".", 1)[-1] if isinstance(plugin, ModuleType) and name == plugin.__name__ else name
        self.check_plugin(plugin, name)
        self._order.setdefault(name, len(self._order))
        try:
            self._pm.register(plugin, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(name, _one_line(e)) from None
        except ValueError as e:
            raise PluginError(name, f"could not be registered: {_one_line(e)}") from None
        try:
            self._pm.check_pending()  # the checks above should make this a no-op; pluggy has the last word
        except pluggy.PluginValidationError as e:
            self._pm.unregister(plugin)
            raise PluginError(name, _one_line(e)) from None
        return name

    @property
    def hook(self) -> Any:
        return self._pm.hook

    def names(self) -> list[str]:
        return [name for name, plugin in self._pm.list_name_plugin() if plugin is not None]

    def has(self, name: str) -> bool:
        return self._pm.has_plugin(name) and self._pm.get_plugin(name) is not None

    def is_builtin(self, name: str) -> bool:
        """The plugin registered as ``name`` is the built-in module ``unibus.plugins.<name>`` itself,
        not another module registered under its name (an entry point of another distribution, a
        ``--plugin`` module whose ``PLUGIN_NAME`` says so). The posture takes the facts a built-in
        owns (``bus_auth: "enforce"``, ``acl: true``, mutual route TLS) only from it."""
        module = sys.modules.get(f"{__package__}.plugins.{name}")
        return module is not None and self.has(name) and self._pm.get_plugin(name) is module

    def why_not_loaded(self, name: str) -> str:
        """Why plugin ``name`` is not loaded, as words for an error message."""
        if self.has(name):
            if f"{__package__}.plugins.{name}" in BUILTIN_MODULES and not self.is_builtin(name):
                dist = self._dist.get(name, (None, None))[0] or "an unknown distribution"
                return (f"loaded under that name is not the built-in module {__package__}.plugins.{name} "
                        f"but one from {dist}")
            return "is loaded"
        if name in self.blocked:
            return f"is blocked by --disable-plugin {name}"
        if name in self.broken:
            return f"is broken: {self.broken[name].error}"
        if name in self.not_loaded:
            return f"is not loaded: {LOAD_PLUGINS_ENV}={','.join(self.only or ()) or '(empty)'} leaves it out"
        if self._installed and name not in self._installed:
            return "is not installed"
        return "is not loaded"

    def require_healthy(self) -> None:
        """Refuse to run with a broken plugin: one line naming the first and its problem. Exit 1
        when its hook raised (a failing hook at start-up, as for ``startup``), 2 when it failed a
        check or its import (a refused configuration)."""
        if not self.broken:
            return
        first = next(iter(self.broken.values()))
        more = len(self.broken) - 1
        module = self._modules.get(first.name)  # --disable-plugin blocks installed plugins only
        if module is not None:
            fix = f"fix it, or drop --plugin {module}"
        elif first.name in self._installed:
            fix = f"fix or reinstall it, or block it with --disable-plugin {first.name}"
        else:  # given to PluginManager(plugins=...): a test's (unibus.testing)
            fix = "fix it"
        message = f"{first.error}; {fix}" + (f" ({more} more broken: see membershipd plugins)" if more else "")
        raise (RuntimeFailure if first.name in self._hook_raised else ConfigError)(message)

    def list_plugins(self) -> list[PluginInfo]:
        """Loaded plugins, then broken ones (with ``error`` set)."""
        infos = []
        for name, plugin in self._pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            hooks = sorted(h.name for h in self._pm.get_hookcallers(plugin) or [])
            dist, version = self._dist.get(name, (None, None))
            infos.append(PluginInfo(name, dist, version, tuple(hooks)))
        return infos + list(self.broken.values())

    # -- hook calls that need plugin names (for options and error messages) ---

    def hook_failed(self, plugin: str, hook_name: str) -> None:
        """Count a failed hook call (exported as ``unibus_plugin_hook_errors_total{plugin,hook}``)."""
        key = (plugin, hook_name)
        self.hook_errors[key] = self.hook_errors.get(key, 0) + 1

    def _impls(self, hook_name: str) -> list[tuple[str, Any]]:
        """``(plugin name, hookimpl)`` in call order (wrappers are refused at registration)."""
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
            with self._hook_failures(name, hook_name), running_plugin(name):
                res = _not_awaitable(impl.function(**{a: kwargs[a] for a in impl.argnames}), hook_name)
                wrong = _wrong_type(res, hook_name)
                if wrong is not None:
                    raise ConfigError(wrong)
                res = _copied(res, hook_name)
            results.append((name, res))
        return results

    @contextlib.contextmanager
    def _hook_failures(self, name: str, hook_name: str) -> Iterator[None]:
        """A failing hook call is counted and raised again naming the plugin and the hook:
        a :class:`ConfigError` keeps its exit code 2 (docs/plugins.md, "Errors and exit
        codes"); any other exception becomes a :class:`RuntimeFailure`."""
        try:
            yield
        except ConfigError as e:
            self.hook_failed(name, hook_name)
            raise _named(e, name, hook_name) from e
        except RuntimeFailure:
            self.hook_failed(name, hook_name)
            raise
        except Exception as e:
            self.hook_failed(name, hook_name)
            raise RuntimeFailure(f"plugin {name}: {hook_name} failed: {type(e).__name__}: {e}") from e

    def call_each_safe(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Like :meth:`call_each`, but a failing plugin is logged and skipped.

        For hooks called while serving (``healthz_fields``): one broken plugin
        must not take the health endpoint down with it. A result of the wrong type
        (a list from ``posture``) is left out and counted too, and said once an hour.
        """
        results = []
        for name, impl in self._impls(hook_name):
            try:
                with running_plugin(name):
                    result = _not_awaitable(impl.function(**{a: kwargs[a] for a in impl.argnames}), hook_name)
                    wrong = _wrong_type(result, hook_name)
                    if wrong is None:
                        result = _copied(result, hook_name)
            except Exception:
                self.hook_failed(name, hook_name)
                log.exception("plugin %s: %s failed", name, hook_name)
                continue
            if wrong is not None:
                self.hook_failed(name, hook_name)
                if self._wrong_results.admit(f"{name} {hook_name}") is not None:
                    log.error("plugin %s, hook %s: %s; its result is left out (said once an hour)",
                              name, hook_name, wrong)
                continue
            results.append((name, result))
        return results

    async def acall_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Like :meth:`call_each`, awaiting coroutine results (startup, shutdown)."""
        return [(name, await self.acall_one(name, impl, hook_name, **kwargs))
                for name, impl in self._impls(hook_name)]

    async def acall_one(self, name: str, impl: Any, hook_name: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation, awaiting a coroutine result.

        Only this plugin's coroutine is ever created, so a failure leaves no
        un-awaited coroutine behind. A :class:`ConfigError` (exit 2) names the
        plugin and the hook; any other exception becomes a :class:`RuntimeFailure`.
        """
        with running_plugin(name), self._hook_failures(name, hook_name):  # also from a coroutine
            res = impl.function(**{a: kwargs[a] for a in impl.argnames})
            if inspect.isawaitable(res):
                res = await res
        return res

    def call_order(self, hook_name: str) -> list[str]:
        """The plugins implementing ``hook_name``, in the order the core calls them."""
        return [name for name, _impl in self._impls(hook_name)]

    def validate_settings(self, settings: Any) -> None:
        """Every plugin's ``validate_settings``, once per ``settings`` object.

        A :class:`ConfigError` (exit 2) names the plugin and the hook; any
        other failure is a :class:`RuntimeFailure` (exit 1) naming the plugin.
        """
        if self._validated is settings:
            return
        self.call_each("validate_settings", settings=settings.for_plugins())
        self._validated = settings

    def options(self, reserved: Iterable[str] = ()) -> list[tuple[str, Option]]:
        """Every plugin option, as ``(plugin name, Option)``.

        A plugin whose ``cli_options`` fails, returns something else than
        :class:`unibus.Option` objects with ``--flags``, or defines a flag that
        is ``reserved`` (a core flag) or already another plugin's, is marked
        broken and unregistered, so ``--help`` still works and shows it.
        """
        seen: dict[str, str] = {flag: "the core" for flag in reserved}
        kept: dict[str, list[Option]] = {}
        impls = self._impls("cli_options")
        # In the order the plugins registered, not the call order (the newest first, and
        # tryfirst/trylast): of two plugins with one flag, the one that came later is broken. A
        # --plugin module registers after the installed plugins; in the call order it took a
        # built-in's flag, and the built-in was the one disabled (a plugin author's walkthrough).
        for name, impl in sorted(impls, key=lambda found: self._order.get(found[0], len(self._order))):
            try:
                opts = list(impl.function() or ())
                problem = None
                for opt in opts:
                    if not isinstance(opt, Option) or not str(opt.flag).startswith("--"):
                        problem = "must return a list of unibus.Option objects with --flags"
                        break
                    if opt.flag in seen:
                        problem = f"flag {opt.flag} is already defined by {seen[opt.flag]}"
                        break
            except Exception as e:
                problem = f"failed: {type(e).__name__}: {_one_line(e)}"
                raised = True
            else:
                raised = False
            if problem is not None:
                self._pm.unregister(name=name)
                self._mark_broken(name, f"plugin {name}, hook cli_options: {problem}", raised=raised)
                continue
            for opt in opts:
                seen[opt.flag] = name
            kept[name] = opts
        return [(name, opt) for name, _impl in impls if name in kept for opt in kept[name]]

    def blocked_flags(self) -> dict[str, str]:
        """Flags owned by blocked plugins, ``{flag: plugin}``, to refuse them by name.

        The blocked plugin's module is imported only to read its option
        declarations; it is never registered and none of its hooks run.
        """
        return _declared_flags(self._blocked_eps)

    def unavailable_flags(self) -> dict[str, str]:
        """Flags of plugins that are not loaded, ``{flag: plugin}``: blocked ones (read from the
        plugin, imported for that only) and the built-ins' (from :data:`BUILTIN_PLUGIN_FLAGS`)."""
        flags = {flag: plugin for flag, plugin in BUILTIN_PLUGIN_FLAGS.items() if not self.has(plugin)}
        flags.update(self.blocked_flags())
        return flags

    def left_out_flags(self) -> dict[str, str]:
        """Flags of the installed plugins ``UNIBUS_LOAD_PLUGINS`` leaves out, ``{flag: plugin}``.

        It imports their modules (never registered, no hook run) to read what ``cli_options``
        declares, so it is called only for a command line that has a flag nothing loaded knows:
        a start that names none of them runs none of their code."""
        return _declared_flags(self._left_out_eps)


def _declared_flags(eps: Mapping[str, importlib.metadata.EntryPoint]) -> dict[str, str]:
    """``{flag: plugin}`` of the options the ``cli_options`` of each entry point's module declares;
    the module is imported, never registered. One that fails to import or declare is left out."""
    flags: dict[str, str] = {}
    for name, ep in eps.items():
        try:
            module = ep.load()
            fn = getattr(module, "cli_options", None)
            opts = list(fn() or ()) if callable(fn) else []
        except Exception:
            continue
        for opt in opts:
            if isinstance(opt, Option):
                flags[opt.flag] = name
    return flags


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist
    return dist.name.lower().replace("_", "-").replace(".", "-") if dist and dist.name else "(unknown)"


def _entry_points(group: str) -> tuple[dict[str, importlib.metadata.EntryPoint], dict[str, list[str]]]:
    """The entry points of ``group`` by name, sorted by name (so the call order does not depend on
    the order the installed distributions happen to be listed in), and the names that more than
    one distribution declares, with those distributions.

    A name declared twice was taken from whichever distribution came last on ``sys.path``, without a
    word: a third-party ``auth_enforce`` could stand in for the built-in one (a black-box test of the
    contract). Such a plugin is broken, naming both. Declarations under one distribution name are
    one to this check; the facts the built-ins own are taken only from their own modules
    (:meth:`PluginManager.is_builtin`), whatever a distribution calls itself."""
    eps: dict[str, importlib.metadata.EntryPoint] = {}
    clashes: dict[str, list[str]] = {}
    for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda ep: ep.name):
        first = eps.setdefault(ep.name, ep)
        names = clashes.get(ep.name) or [_dist_name(first)]
        if _dist_name(ep) not in names:
            clashes[ep.name] = [*names, _dist_name(ep)]
    return eps, clashes


def _not_awaitable(result: Any, hook_name: str) -> Any:
    """``result`` of a hook the core calls plainly; an awaitable (what a function that is no
    ``async def`` may still return) is closed and refused: nobody would ever await it."""
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if callable(close):
            close()
        raise ConfigError(f"returned an awaitable, which is never awaited: {hook_name} must be a plain function "
                          f"(only {', '.join(sorted(hookspecs.ASYNC_HOOKS))} may be coroutine functions)")
    return result


def _wrong_type(result: Any, hook_name: str) -> str | None:
    """What is wrong with ``result`` of a hook that returns a dict (:data:`unibus.hookspecs.DICT_HOOKS`),
    or None: a list or a string was left out without a word (a plugin author's walkthrough)."""
    if hook_name in hookspecs.DICT_HOOKS and result is not None and not isinstance(result, Mapping):
        return f"must return a dict (or None), not {type(result).__name__}"
    return None


def _copied(result: Any, hook_name: str) -> Any:
    """A dict of a dict-returning hook's Mapping, read here, where what its reads raise is the
    hook's error: read later, by ``/healthz`` or the posture, it was a 500 (a review)."""
    if hook_name in hookspecs.DICT_HOOKS and result is not None:
        return dict(result)
    return result


def _named(e: ConfigError, plugin: str, hook: str) -> ConfigError:
    """A plugin's ConfigError, naming the plugin and the hook unless it already names the plugin."""
    if str(e).startswith(f"plugin {plugin}"):
        return e
    return PluginError(plugin, _one_line(e), hook)


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())
