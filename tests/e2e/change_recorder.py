"""A plugin for tests/e2e/test_cluster_change_events.py, loaded with ``--plugin change_recorder``:
every ``store_changed`` event its node delivers, one JSON line in its state directory."""

from __future__ import annotations

import json

from unibus import hookimpl
from unibus.app import state_dir

PLUGIN_NAME = "recorder"


@hookimpl
def store_changed(app, event):
    record = {"seq": event.seq, "kind": event.kind, "actor": event.actor, "origin": event.origin,
              "handle": event.handle, "room_id": event.room_id}
    with open(state_dir(app) / "events.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
