"""auth_enforce's metrics, made through the registry the core gives plugins (docs/plugins.md, "Metrics").

Names are those docs/operations.md ("Metrics") lists for bus authorization:

* ``unibus_bus_auth_changes_total`` and the histogram
  ``unibus_bus_auth_change_duration_seconds``: every change of the store that
  bus authorization applied on this node (the index updated, then the kicks
  of :mod:`.enforcer` confirmed), and how long that took: the time the bus
  adds before the change's 2xx;
* ``unibus_bus_auth_changes_unconfirmed_total``: changes whose kicks were not
  confirmed in time (answered 503 ``change-not-enforced``, retried);
* ``unibus_bus_auth_kicks_total``: connections kicked (confirmed by nats-server);
* ``unibus_bus_auth_kicks_pending``: members whose new rights wait for a kick;
* ``unibus_bus_auth_callouts_total{result}``: the auth callout's answers
  (``authorized``, ``refused``, ``throttled``: a member past its budget of logins
  (:mod:`.loginlimit`), ``expired``, ``malformed``);
* ``unibus_bus_auth_connections``: member connections nats-server reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CALLOUT_RESULTS = ("authorized", "refused", "throttled", "expired", "malformed")
#: Seconds: a change without connections to kick is ~1 ms; the kicks' deadline is 2 s.
CHANGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class BusAuthMetrics:
    changes: Any
    change_duration: Any
    unconfirmed: Any
    kicks: Any
    callouts: Any

    @classmethod
    def register(cls, metrics: Any, *, pending: Callable[[], float], connections: Callable[[], float]
                 ) -> BusAuthMetrics:
        """Make them in ``metrics`` (the plugin's :class:`unibus.metrics.PluginMetrics`)."""
        callouts = metrics.counter("unibus_bus_auth_callouts_total", "auth callout answers of this node, by result",
                                   ["result"])
        for result in CALLOUT_RESULTS:
            callouts.labels(result)
        metrics.gauge("unibus_bus_auth_kicks_pending", "members whose new bus rights are not confirmed on every "
                      "node yet (retried every second)", function=pending)
        metrics.gauge("unibus_bus_auth_connections", "member connections nats-server reported (every node)",
                      function=connections)
        return cls(
            changes=metrics.counter("unibus_bus_auth_changes_total", "store changes applied to bus authorization "
                                    "on this node"),
            change_duration=metrics.histogram("unibus_bus_auth_change_duration_seconds", "time to apply a change "
                                              "to bus authorization, kicks confirmed", buckets=CHANGE_BUCKETS),
            unconfirmed=metrics.counter("unibus_bus_auth_changes_unconfirmed_total", "changes whose kicks were "
                                        "not confirmed within the deadline (503 change-not-enforced)"),
            kicks=metrics.counter("unibus_bus_auth_kicks_total", "member connections kicked, confirmed"),
            callouts=callouts,
        )
