"""Bench set-up: a membershipd store and its membership log, written offline, as the server would.

Making a 1,000-member room through the API costs minutes of fsyncs (and, with
bus auth enforced, a nats-server reload per change); a benchmark only needs
the result. :class:`OfflineWorld` writes, in one SQLite transaction of a
stopped daemon's data dir, the store rows of each change *and* the log entry
the server would have appended for it: the author's request signed for real
(``unibus.signing.sign_request``), recorded verbatim
(``unibus.memberlog.request_entry``), chained, with its nonce. A client
verifying that log does exactly the work it would do on a real deployment's.

The data dir must hold a store whose first member (the admin) was added with
``membershipd member add`` (entry 0, its bootstrap).
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class OfflineWorld:
    """``with OfflineWorld(data_dir) as w: w.add_member(admin, ident); rid = w.create_room(admin, "x"); ...``"""

    def __init__(self, data_dir: Path) -> None:
        from sqlalchemy.orm import Session

        from unibus.settings import Settings
        from unibus.store.db import make_engine

        self.engine = make_engine(Settings(data_dir=data_dir).db_path)
        self.session = Session(self.engine)
        self.now = int(time.time())
        self.when = datetime.now(UTC)
        self.epochs: dict[str, int] = {}

    def __enter__(self) -> OfflineWorld:
        from sqlalchemy import select

        from unibus.store import models as m

        self.session.begin()
        last = self.session.scalars(select(m.LogEntry).order_by(m.LogEntry.seq.desc()).limit(1)).first()
        if last is None:
            raise RuntimeError("bootstrap the first admin with `membershipd member add` first")
        self.seq, self.prev = last.seq, last.hash
        self.max_created = 0
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        from unibus.store import models as m

        try:
            if exc_type is None:
                meta = self.session.get(m.Meta, "log.max_created")
                if meta is None:
                    self.session.add(m.Meta(key="log.max_created", value=str(self.max_created)))
                else:
                    meta.value = str(max(int(meta.value or 0), self.max_created))
                self.session.commit()
            else:
                self.session.rollback()
        finally:
            self.session.close()
            self.engine.dispose()

    # -- the log -------------------------------------------------------------------------

    def log(self, author: Any, method: str, path: str, body: Any, result: dict[str, Any], *,
            keep_body: bool = True) -> None:
        from unibus.memberlog import LoggedRequest, canonical, request_entry
        from unibus.signing import sign_request
        from unibus.store import models as m

        raw = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = sign_request(method, path, raw, keyid=author.handle, private_key=author.sign_key, created=self.now)
        request = LoggedRequest(method, path, "", headers.get("Content-Digest"), headers["Signature-Input"],
                                headers["Signature"], raw if keep_body else None)
        entry = request_entry(self.seq + 1, self.prev, self.now, request, result)
        text = canonical(entry)
        self.seq, self.prev = self.seq + 1, hashlib.sha256(text).hexdigest()
        self.session.add(m.LogEntry(seq=self.seq, hash=self.prev, entry=text.decode()))
        nonce = headers["Signature-Input"].split('nonce="', 1)[1].split('"', 1)[0]
        self.session.add(m.LogNonce(keyid=author.handle, nonce=nonce, seq=self.seq))
        self.max_created = max(self.max_created, self.now)

    # -- changes: the store rows and their entry -------------------------------------------

    def add_member(self, admin: Any, ident: Any, role: str = "member") -> None:
        from unibus.store.sqlite import add_member_sync, new_member

        add_member_sync(self.session, new_member(ident.handle, role, ident.sign_pub, ident.enc_pub, ident.enc_suite,
                                                 ident.bus_pub))
        self.log(admin, "POST", "/v1/members", {"handle": ident.handle, "role": role, "sign_pub": ident.sign_pub_b64,
                                                "enc_pub": ident.enc_pub_b64, "enc_suite": ident.enc_suite,
                                                "bus_pub": ident.bus_pub}, {})

    def create_room(self, owner: Any, name: str) -> str:
        from unibus.store import models as m
        from unibus.store.sqlite import new_room_id

        rid = new_room_id()
        self.session.add(m.Room(room_id=rid, name=name, owner=owner.handle, epoch=0, rekey_required=True,
                                created_at=self.when))
        self.session.add(m.RoomMember(room_id=rid, handle=owner.handle, added_at=self.when))
        self.session.flush()
        self.log(owner, "POST", "/v1/rooms", {"name": name}, {"room_id": rid})
        self.epochs[rid] = 0
        return rid

    def add_room_member(self, author: Any, rid: str, handle: str) -> None:
        from unibus.store import models as m

        self.session.add(m.RoomMember(room_id=rid, handle=handle, added_at=self.when))
        room = self.session.get(m.Room, rid)
        room.rekey_required = True
        self.log(author, "PUT", f"/v1/rooms/{rid}/members/{handle}", None, {})

    def remove_room_member(self, author: Any, rid: str, handle: str) -> None:
        from unibus.store import models as m

        row = self.session.get(m.RoomMember, (rid, handle))
        self.session.delete(row)
        self.session.get(m.Room, rid).rekey_required = True
        self.log(author, "DELETE", f"/v1/rooms/{rid}/members/{handle}", None, {})

    def rekey_entry(self, author: Any, rid: str) -> None:
        """The log entry of a keys POST (the log keeps no body: no keys are stored, none sealed).

        For logs that are only read (log verification); a room rekeyed this way
        has no key for anyone.
        """
        from unibus.store import models as m

        epoch = self.epochs[rid] + 1
        self.epochs[rid] = epoch
        room = self.session.get(m.Room, rid)
        room.epoch, room.rekey_required = epoch, False
        self.log(author, "POST", f"/v1/rooms/{rid}/keys", {"epoch": epoch, "sealed": {}, "sigs": {}}, {"epoch": epoch},
                 keep_body=False)

    def flush(self) -> None:
        self.session.flush()


def entry_count(data_dir: Path) -> int:
    import sqlite3

    from unibus.settings import Settings

    with sqlite3.connect(Settings(data_dir=data_dir).db_path) as db:
        return int(db.execute("select count(*) from log_entries").fetchone()[0])
