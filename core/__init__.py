"""unibus: an end-to-end-encrypted message bus (membershipd control plane + embedded NATS)."""

import pluggy

__version__ = "0.12.0"

#: Marker for plugin hook implementations: ``from unibus import hookimpl``.
hookimpl = pluggy.HookimplMarker("unibus")

from .errors import ConfigError  # noqa: E402  (re-exported for plugin authors)
from .pluginstate import Stash, StashKey  # noqa: E402
from .settings import Option  # noqa: E402

__all__ = ["ConfigError", "Option", "Stash", "StashKey", "__version__", "hookimpl"]
