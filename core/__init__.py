"""unibus: an end-to-end-encrypted message bus (membershipd control plane + embedded NATS)."""

import pluggy

__version__ = "0.11.0"

#: Marker for plugin hook implementations: ``from unibus import hookimpl``.
hookimpl = pluggy.HookimplMarker("unibus")

__all__ = ["__version__", "hookimpl"]
