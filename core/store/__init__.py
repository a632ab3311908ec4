"""The membershipd store: members, rooms, room members and sealed room keys.

``unibus.store.base`` holds the contract, ``unibus.store.sqlite`` the single-node
backend and ``unibus.store.kv`` the cluster backend (JetStream KV).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings
    from .base import Membership

_snapshots: dict[Path, Membership] = {}
_lock = threading.Lock()


def publish_membership(data_dir: Path, membership: Membership) -> None:
    """Record the membership a running daemon just read from its store (any backend)."""
    with _lock:
        _snapshots[data_dir] = membership


def membership_snapshot(settings: Settings) -> Membership:
    """The membership ``configure_nats`` implementations build from.

    While the daemon runs, the core reads the store (SQLite or KV) right before
    it regenerates the NATS configuration and publishes the result here. Before
    that (the very first config, written before NATS starts) it is read
    straight from the SQLite database of the data dir.
    """
    with _lock:
        found = _snapshots.get(settings.data_dir)
    if found is not None:
        return found
    from .sqlite import read_membership  # SQLAlchemy: only when needed

    return read_membership(settings.db_path)
