"""auth_enforce: data-plane authorization generated from membership (SPEC §7).

In this release the plugin does not yet write per-member NATS users, so it
reports exactly that: ``bus_auth: "off"``, ``acl: false``, and warns at
start-up. The `--bus-auth` flag is a core flag; blocking this plugin is only
accepted together with ``--bus-auth off``.
"""

from __future__ import annotations

import logging
from typing import Any

from unibus import hookimpl
from unibus.settings import Settings

PLUGIN_NAME = "auth_enforce"
log = logging.getLogger("unibus.plugins.auth_enforce")


@hookimpl
def posture(settings: Settings) -> dict[str, Any]:
    return {"bus_auth": "off", "acl": False}


@hookimpl
def startup(app) -> None:
    log.warning("bus authorization is not enforced: any client that reaches the NATS port may publish and subscribe")
