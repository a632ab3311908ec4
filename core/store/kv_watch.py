"""The KV store's watch: other cluster nodes' writes to the bucket, reported as ``reloaded`` changes.

docs/store.md, "The watch": one ordered consumer on the whole bucket, new
messages only; revisions this instance wrote are recognised by their acks
(:attr:`KvBucket._own`) and not reported again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.js.api import DeliverPolicy

from ..aio import cancel_and_wait, within
from .base import Change
from .kv_txn import KvBucket

log = logging.getLogger("unibus.store.kv")

#: Remote changes seen by the watch within this window become one ``reloaded``.
WATCH_DEBOUNCE = 0.05


class KvWatch(KvBucket):
    """The watch of a :class:`KvBucket`; :meth:`close` stops it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen: list[tuple[int, str]] = []  # (stream seq, key); seq -1: maybe missed something
        self._kick = asyncio.Event()
        self._closing = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        #: Set while the watch subscription is live (tests and the daemon wait on it).
        self.watch_ready = asyncio.Event()
        #: (Re)subscriptions after the first, and the watched revisions by origin.
        self.watch_restarts = 0
        self.watch_stats = {"own": 0, "remote": 0, "reported": 0}

    async def close(self) -> None:
        self._closing.set()
        task, self._watch_task = self._watch_task, None
        if task is not None and task is not asyncio.current_task():
            await cancel_and_wait(task)

    def start_watch(self) -> asyncio.Task[None]:
        """Run :meth:`watch` as a task of this store; :meth:`close` stops it."""
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.get_running_loop().create_task(self.watch(), name="unibus-kv-watch")
        return self._watch_task

    async def watch(self, poll: float = 0.25) -> None:
        """Watch the bucket and report other nodes' changes as ``Change("reloaded")`` until :meth:`close`.

        Writes of this instance are recognised by their revision and not
        reported again (their own Change was already delivered). Each time the
        subscription is (re)made — at start, after a NATS reconnect — one
        ``reloaded`` is reported too, since changes may have been missed.
        """
        notifier = asyncio.get_running_loop().create_task(self._notify_loop())
        sub = None
        try:
            while not self._closing.is_set():
                try:
                    self._check_connected()
                    sub = await self._subscribe_watch()
                except Exception as e:  # noqa: BLE001 - retried until close()
                    log.debug("KV watch not (yet) subscribed: %s", e)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await within(self._closing.wait(), 0.5)
                    continue
                reconnects = self._nc.stats.get("reconnects", 0)
                self._seen.append((-1, ""))  # "maybe missed something": report once
                self._kick.set()
                self.watch_ready.set()
                while not self._closing.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await within(self._closing.wait(), poll)
                    nc = self._nc
                    if nc.is_closed:
                        break
                    if nc.stats.get("reconnects", 0) != reconnects and nc.is_connected:
                        log.info("KV watch: NATS reconnected; watching %s again", self.bucket)
                        break
                self.watch_ready.clear()
                with contextlib.suppress(Exception):
                    await within(sub.unsubscribe(), 1.0)
                sub = None
                if self._nc.is_closed:
                    await self._closing.wait()
                    break
                self.watch_restarts += 1
        finally:
            self.watch_ready.clear()
            if sub is not None:
                with contextlib.suppress(Exception):
                    await within(sub.unsubscribe(), 1.0)
            await cancel_and_wait(notifier)

    async def _subscribe_watch(self) -> Any:
        async def on_msg(msg: Any) -> None:
            self._seen.append((msg.metadata.sequence.stream, msg.subject[len(self._prefix):]))
            self._kick.set()

        return await within(
            self.js.subscribe(f"{self._prefix}>", stream=self.stream, cb=on_msg, ordered_consumer=True,
                              deliver_policy=DeliverPolicy.NEW, headers_only=True, idle_heartbeat=1.0,
                              inactive_threshold=30.0),
            self.timeout)

    async def _notify_loop(self) -> None:
        while True:
            await self._kick.wait()
            await asyncio.sleep(WATCH_DEBOUNCE)
            self._kick.clear()
            seen, self._seen = self._seen, []
            keys: set[str] = set()
            missed = False
            for seq, key in seen:
                if seq in self._own:
                    del self._own[seq]
                    self.watch_stats["own"] += 1
                elif seq < 0:
                    missed = True
                else:
                    keys.add(key)
                    self.watch_stats["remote"] += 1
            if missed or keys:
                self.watch_stats["reported"] += 1
                # Listeners that can, apply the keys one by one; a (re)subscription
                # may have missed some, so it reports no keys: re-read everything.
                change = Change("reloaded", origin="remote", keys=() if missed else tuple(sorted(keys)))
                try:
                    await self._changed(change)
                except Exception:  # pragma: no cover - _changed logs listener errors itself
                    log.exception("KV watch: reporting a change failed")
