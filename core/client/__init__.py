"""The member's side of unibus: keys, sealing, the async SDK and the ``unibus`` CLI.

``from unibus.client import UnibusClient, ApiError, load_identity`` is the usual
start; see docs/client.md (SDK and CLI) and docs/formats.md (bytes on the wire).
"""

import importlib
from typing import Any

# Lazy (PEP 562): the server imports unibus.client.keys for key validation and
# must not pay for the aiohttp client and nats-py that the SDK pulls in.
_EXPORTS = {
    "ApiError": ".api", "Bus": ".api", "BusError": ".api", "KeyUnavailable": ".api", "Message": ".api",
    "NotARoomMember": ".api", "RekeyRequired": ".api", "ServerUnreachable": ".api", "UnibusClient": ".api",
    "UnsignedKey": ".api", "tls_context": ".api",
    "LogVerificationError": ".replica", "ReplicaError": ".replica", "VerificationError": ".replica",
    "Identity": ".keys", "IdentityError": ".keys", "generate_identity": ".keys", "load_identity": ".keys",
    "save_identity": ".keys",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


# One list: what the lazy __getattr__ serves is what ``import *`` exports.
__all__ = sorted(_EXPORTS)
