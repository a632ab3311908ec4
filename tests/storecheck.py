"""Checks of a restored store, shared by the backup tests (tests/core, tests/e2e).

``read_store`` reads every row that makes a SQLite store's state; ``replay``
verifies a log with :class:`unibus.memberlog.LogState`; ``assert_rows_match_log``
proves that the rows and the log come from one instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from unibus.memberlog import LogState


def read_store(db: Path) -> dict[str, Any]:
    """Every row that makes the state, keyed for comparison (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        def rows(sql: str) -> list[tuple[Any, ...]]:
            return list(c.execute(sql))

        return {
            "members": {r[0]: r[1:] for r in rows("SELECT handle, role, sign_pub, enc_pub, enc_suite, created_at, "
                                                   "bus_pub FROM members")},
            "rooms": {r[0]: r[1:] for r in rows("SELECT room_id, name, owner, epoch, rekey_required, created_at "
                                                 "FROM rooms")},
            "rosters": {(r[0], r[1]) for r in rows("SELECT room_id, handle FROM room_members")},
            "keys": {(r[0], r[1], r[2]): r[3:] for r in rows("SELECT room_id, epoch, handle, sealed, sig "
                                                              "FROM sealed_keys")},
            "epochs": {(r[0], r[1]): r[2:] for r in rows("SELECT room_id, epoch, sealer, log_seq, log_hash "
                                                          "FROM room_epochs")},
            "log": rows("SELECT seq, hash, entry FROM log_entries ORDER BY seq"),
            "nonces": {(r[0], r[1]): r[2] for r in rows("SELECT keyid, nonce, seq FROM log_nonces")},
            "max_created": rows("SELECT value FROM unibus_meta WHERE key = 'log.max_created'"),
        }


def stored_blobs(data_dir: Path) -> dict[tuple[str, str], bytes]:
    """The complete blobs of an fs backend: ``{(room_id, blob_id): bytes}``, each checked against its id."""
    out = {}
    root = data_dir / "blobs"
    if not root.exists():
        return out
    for room in sorted(root.iterdir()):
        if room.name == ".tmp":
            continue
        for blob in sorted(room.iterdir()):
            data = (blob / "data").read_bytes()
            meta = json.loads((blob / "meta.json").read_text())
            assert hashlib.sha256(data).hexdigest() == blob.name == meta["blob_id"]
            assert meta["room_id"] == room.name and meta["size"] == len(data)
            out[(room.name, blob.name)] = data
    return out


def replay(log: list[tuple[int, str, str]]) -> LogState:
    state = LogState()
    for _seq, digest, text in log:
        assert state.apply(json.loads(text)) == digest
    return state


def assert_rows_match_log(store: dict[str, Any], state: LogState) -> None:
    """The rows and the log come from one instant: the log's replay is the rows' state."""
    members = {h: (m.role, m.sign_pub, m.enc_pub, m.enc_suite, m.bus_pub) for h, m in state.members.items()}
    assert {h: (r[0], bytes(r[1]), bytes(r[2]), r[3], r[5]) for h, r in store["members"].items()} == members
    assert {rid: (r[0], r[1], r[2], bool(r[3])) for rid, r in store["rooms"].items()} == {
        rid: (room.name, room.owner, room.epoch, room.rekey_required) for rid, room in state.rooms.items()}
    assert store["rosters"] == {(rid, h) for rid, room in state.rooms.items() for h in room.members}
    for rid, room in state.rooms.items():
        for epoch, record in room.epochs.items():
            sealed = {h for (r, e, h) in store["keys"] if (r, e) == (rid, epoch)}
            assert sealed == record.roster & set(state.members), (rid, epoch)
            assert store["epochs"][(rid, epoch)][0] == record.sealer
