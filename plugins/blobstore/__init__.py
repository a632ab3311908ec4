"""blobstore: content-addressed, encrypted room blobs (SPEC §5, §8).

Not implemented in this release: no blob routes are served, and ``/healthz``
says so under ``blobstore``.
"""

from __future__ import annotations

from typing import Any

from unibus import hookimpl

PLUGIN_NAME = "blobstore"


@hookimpl
def healthz_fields(app) -> dict[str, Any]:
    return {PLUGIN_NAME: {"enabled": False}}
