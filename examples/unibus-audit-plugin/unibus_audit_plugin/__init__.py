"""unibus-audit-plugin: a record of every membership change, with who made it.

Every change of members, rooms and room keys (the ``store_changed`` hook) is
appended as one JSON line to ``<data-dir>/plugins/audit/events.jsonl``
(mode 0600, in the plugin's 0700 state directory). Admins read it:

    GET /v1/plugins/audit/events?after=ID&limit=N     (signed, admin only)
    unibus audit tail [--limit N] [--json]            (the member's client)

docs/plugins.md builds this plugin step by step.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from unibus import StashKey, hookimpl

PLUGIN_NAME = "audit"
LOG_FILE = "events.jsonl"
MAX_LIMIT = 1000


class AuditLog:
    """The JSONL file: one event per line, each with an ``id`` (1, 2, ...)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # O_APPEND: each line is written at the end in one write; 0600: only membershipd's user reads it.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self.count = sum(1 for _ in path.open("rb"))

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            record = {"id": self.count + 1, **record}
            os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
            self.count += 1
        return record

    def read(self, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """The events with ``id > after``, oldest first, at most ``limit``."""
        out = []
        with self.path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if number > after:
                    out.append(json.loads(line))
                    if len(out) >= limit:
                        break
        return out

    def close(self) -> None:
        os.close(self._fd)


LOG = StashKey[AuditLog]("log")
#: unibus_audit_events_total{kind}: the events recorded since the start, by kind
RECORDED = StashKey[Any]("recorded")


@hookimpl
def startup(app) -> None:
    # Imported here, not at the top: `membershipd plugins`, `--help` and the
    # `unibus` client load the plugin and need no HTTP stack.
    from unibus.app import METRICS, add_route, stash, state_dir

    stash(app)[LOG] = AuditLog(state_dir(app) / LOG_FILE)
    # "kind" has nine values: a bounded label (never a handle or a room id).
    stash(app)[RECORDED] = app[METRICS].plugin(PLUGIN_NAME).counter(
        "events_total", "membership changes recorded in the audit log", ["kind"])
    add_route(app, "GET", "/events", list_events, summary="The audit log: membership changes (admins)",
              responses={200: '{"events": [...], "last": <id of the last event>}', 403: "not an admin"},
              query={"after": {"type": "integer", "minimum": 0},
                     "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}},
              tags=["audit"])


@hookimpl
def store_changed(app, event) -> None:
    from unibus.app import stash

    stash(app)[LOG].append({"at": round(time.time(), 3), **event.as_json()})
    stash(app)[RECORDED].labels(event.kind).inc()


@hookimpl
def healthz_fields(app) -> dict[str, Any]:
    from unibus.app import stash

    log = stash(app, PLUGIN_NAME).get(LOG)
    return {"events": log.count if log is not None else 0}


@hookimpl
def shutdown(app) -> None:
    from unibus.app import stash

    log = stash(app).pop(LOG)
    if log is not None:
        log.close()


async def list_events(request):
    from aiohttp import web
    from unibus.app import stash
    from unibus.auth import require_admin
    from unibus.inputs import query_int

    require_admin(request)
    after = query_int(request.query, "after", 0, default=0)
    limit = query_int(request.query, "limit", 1, MAX_LIMIT, default=100)
    log = stash(request.app, PLUGIN_NAME)[LOG]
    return web.json_response({"events": log.read(after, limit), "last": log.count})


# --------------------------------------------------------------------------- the client side


async def tail(ctx, client) -> int:
    """``unibus audit tail``: the last events, oldest first."""
    limit = ctx.args.limit
    body = await client.request("GET", "/v1/plugins/audit/events", query={"after": 0, "limit": 1})
    after = max(0, body["last"] - limit)
    body = await client.request("GET", "/v1/plugins/audit/events", query={"after": after, "limit": limit})
    for e in body["events"]:
        if ctx.json:
            print(json.dumps(e, sort_keys=True))
        else:
            what = " ".join(x for x in (e.get("handle"), e.get("room_id")) if x)
            print(f"{e['id']}\tseq {e['seq']}\t{e['kind']}\t{what}\tby {e['actor'] or '-'} ({e['origin']})")
    return 0


def _limit(raw: str) -> int:
    import argparse

    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _tail_arguments(parser) -> None:
    parser.add_argument("--limit", type=_limit, default=20, metavar="N",
                        help=f"how many of the last events (1-{MAX_LIMIT}, default 20)")


@hookimpl
def client_commands() -> list[Any]:
    from unibus.client.plugins import ClientCommand

    return [ClientCommand("audit tail", "print the last membership changes, with who made them (admins)", tail,
                          _tail_arguments)]
