"""unibus: an end-to-end-encrypted message bus (membershipd control plane + embedded NATS)."""

from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.12.0"

#: Marker for plugin hook implementations: ``from unibus import hookimpl``.
hookimpl = pluggy.HookimplMarker("unibus")

if TYPE_CHECKING:
    from .errors import ConfigError
    from .pluginstate import Stash, StashKey
    from .settings import Option

# Re-exported for plugin authors, imported when first used: the client (``unibus``
# and the SDK) starts without the daemon's plugin manager and option table.
_LAZY = {"ConfigError": ".errors", "Stash": ".pluginstate", "StashKey": ".pluginstate", "Option": ".settings"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'unibus' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ConfigError", "Option", "Stash", "StashKey", "__version__", "hookimpl"]
