"""route_tls: mutual TLS on cluster routes with a dedicated route CA (SPEC §4, §8).

Not implemented in this release: routes are not protected by TLS, and the
plugin reports ``tls: false`` so the cluster gate refuses to form a cluster.
"""

from __future__ import annotations

from typing import Any

from unibus import hookimpl
from unibus.settings import Settings

PLUGIN_NAME = "route_tls"


@hookimpl
def posture(settings: Settings) -> dict[str, Any]:
    return {"tls": False}
