"""Membership change events: what the ``store_changed`` hook receives.

Every committed change of members, rooms and room keys becomes one
:class:`ChangeEvent` (docs/plugins.md, "Change events"):

* ``local``: this daemon wrote it; the store reports the change with the seq
  of the membership log entry written in the same transaction, the handle
  whose signed request made it, and the record before and after;
* ``remote``: another node of the cluster wrote it; this node learns it from
  the new entries of the shared membership log (docs/formats.md), so the
  event has ``seq`` and ``actor`` but no ``before``/``after``;
* ``offline``: ``membershipd member add`` wrote it while the daemon ran; the
  daemon learns it at SIGHUP from the log's ``bootstrap`` entries
  (``actor`` is None, ``after`` is the member the entry records).

:class:`ChangeEvents` delivers them to the plugins, each seq once, in order
of delivery; a failing plugin is logged and never fails the write.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .aio import within
from .memberlog import logged_operation
from .pluginmanager import PluginManager, running_plugin

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

    from .store.base import Change, Store

log = logging.getLogger("unibus.events")
#: Seconds before a single node delivers the offline entries a local change jumped over.
GAP_GRACE = 1.0

ORIGINS = ("local", "remote", "offline")
#: The kinds of change, in the words of docs/plugins.md.
KINDS = ("member_added", "member_updated", "member_bus_key", "member_deleted", "room_created", "room_deleted",
         "room_member_added", "room_member_removed", "keys_posted")
#: Operations of the membership log (unibus.memberlog) → event kind.
_KIND_OF_OPERATION = {
    "member.add": "member_added", "member.role": "member_updated", "member.delete": "member_deleted",
    "member.bus_key": "member_bus_key", "room.create": "room_created", "room.delete": "room_deleted",
    "room.member_add": "room_member_added", "room.member_remove": "room_member_removed", "room.keys": "keys_posted",
}
_KEYID = re.compile(r';keyid="([^"\\]*)"')
#: How long one plugin's async ``store_changed`` may take before it is given up (logged).
HOOK_TIMEOUT = 5.0
#: Log entries read per page when catching up after a reload.
_PAGE = 500
#: Seqs remembered as delivered, so that a change seen both ways is delivered once.
_REMEMBERED = 4096


@dataclass(frozen=True)
class ChangeEvent:
    """One committed membership change (docs/plugins.md, "Change events").

    ``seq``: the membership log's seq of the change (None for a change that
    was not logged, such as ``migrate-to-kv``'s copies). ``kind``: one of
    :data:`KINDS`. ``actor``: the handle whose signed request made it, None
    for an offline change or when unknown. ``origin``: ``local``, ``remote``
    or ``offline``. ``before``/``after``: the member (its public record) or
    the room (``room_id``, ``name``, ``owner``, ``epoch``,
    ``rekey_required``, ``members`` as handles), None where there is none or
    it is not known. ``handle`` and ``room_id`` name what changed.
    """

    seq: int | None
    kind: str
    actor: str | None
    origin: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    handle: str | None = None
    room_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "actor": self.actor, "origin": self.origin,
                "handle": self.handle, "room_id": self.room_id, "before": self.before, "after": self.after}


def event_from_change(change: Change) -> ChangeEvent | None:
    """The event of a store :class:`~unibus.store.base.Change`; None for ``reloaded``."""
    if change.kind not in KINDS:
        return None
    return ChangeEvent(seq=change.seq, kind=change.kind, actor=change.actor, origin=change.origin,
                       before=change.before, after=change.after, handle=change.handle, room_id=change.room_id)


def event_from_entry(entry: dict[str, Any], origin: str) -> ChangeEvent | None:
    """The event of a membership log entry (docs/formats.md); None for a snapshot or a foreign entry."""
    seq = entry.get("seq")
    if entry.get("kind") == "bootstrap":
        member = entry.get("member") or {}
        return ChangeEvent(seq=seq, kind="member_added", actor=None, origin=origin, after=dict(member),
                           handle=member.get("handle"))
    if entry.get("kind") != "request":
        return None
    request = entry.get("request") or {}
    found = logged_operation(str(request.get("method")), str(request.get("path")))
    if found is None:
        return None
    operation, args = found
    keyid = _KEYID.search(str(request.get("signature_input", "")))
    actor = keyid.group(1) if keyid else None
    handle = room_id = None
    if operation.startswith("room."):
        room_id = args[0] if args else (entry.get("result") or {}).get("room_id")
        handle = args[1] if len(args) > 1 else (actor if operation == "room.create" else None)
    elif operation == "member.bus_key":
        handle = actor
    elif args:
        handle = args[0]
    else:  # member.add: the handle is in the signed body
        handle = _body_field(request, "handle")
    return ChangeEvent(seq=seq, kind=_KIND_OF_OPERATION[operation], actor=actor, origin=origin,
                       handle=handle, room_id=room_id)


def _body_field(request: dict[str, Any], name: str) -> Any:
    import base64

    try:
        return json.loads(base64.b64decode(request.get("body") or "")).get(name)
    except (ValueError, TypeError, AttributeError):
        return None


class ChangeEvents:
    """Turns the store's changes into ``store_changed`` hook calls.

    Local changes are delivered from the writing request, after the commit
    and before its response; remote and offline ones from the task that
    learnt of them (the cluster watch, SIGHUP). Each seq is delivered once.
    A local change never waits for other entries (no lock on a request's
    path): an entry this node learns of after a later local change is
    delivered when it does, so delivery order can differ from ``seq`` order.
    """

    def __init__(self, app: web.Application, store: Store, plugins: PluginManager) -> None:
        self.app = app
        self.store = store
        self.plugins = plugins
        #: every seq up to this one was delivered, or is not a change (a snapshot entry)
        self.last_seq = -1
        self._delivered: deque[int] = deque(maxlen=_REMEMBERED)
        self._delivered_set: set[int] = set()
        self._catch_up = asyncio.Lock()
        #: a catch-up started in the background after a local change jumped over an entry
        self._gap_task: asyncio.Task[int] | None = None
        #: on a cluster-wide store the watch reports other nodes' entries within moments
        self._watched = bool(getattr(store, "cluster_wide", False))
        self._unsubscribe: Callable[[], None] | None = None
        self.delivered = 0
        #: the store_changed implementations, fixed once plugins are loaded
        self._hooks = plugins._impls("store_changed")

    async def start(self) -> None:
        """Start from the log's current head: what is already there is not news.

        Without a ``store_changed`` implementation nothing listens (no cost per write).
        """
        self.last_seq, _hash = await self.store.log_head()
        if self._hooks and self._unsubscribe is None:
            self._unsubscribe = self.store.add_listener(self.on_change)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._gap_task is not None:
            self._gap_task.cancel()
            self._gap_task = None

    def on_change(self, change: Change) -> Any:
        if change.kind == "reloaded":
            return self.catch_up(change.origin)
        event = event_from_change(change)
        if event is None or not self._first(event.seq):
            return None
        self._advance()
        if event.seq is not None and event.seq > self.last_seq:
            self._fill_gap()
        return self.deliver(event)

    def _fill_gap(self) -> None:
        """A local change jumped over entries not delivered yet. On a cluster the watch
        reports them; on a single node they are offline writes, which SIGHUP would report:
        catch up in the background after :data:`GAP_GRACE` (never in the request: a hook
        that writes would wait for its own catch-up), so they come soon and the remembered
        seqs stay few. The grace lets a concurrent local write report its own seq first,
        so it is not taken for an offline one."""
        if self._watched or (self._gap_task is not None and not self._gap_task.done()):
            return
        self._gap_task = asyncio.get_running_loop().create_task(self._catch_up_later(), name="unibus-events-gap")

    async def _catch_up_later(self) -> int:
        await asyncio.sleep(GAP_GRACE)
        try:
            return await self.catch_up("offline")
        except Exception as e:  # noqa: BLE001 - the next catch-up (watch, SIGHUP, local change) tries again
            log.warning("store_changed: could not deliver the entries before a local change yet: %s: %s",
                        type(e).__name__, e)
            return 0

    def _first(self, seq: int | None) -> bool:
        """Remember ``seq`` as delivered; False if it already was."""
        if seq is None:
            return True
        if seq in self._delivered_set or seq <= self.last_seq:
            return False
        if len(self._delivered) == self._delivered.maxlen:
            self._delivered_set.discard(self._delivered[0])
        self._delivered.append(seq)
        self._delivered_set.add(seq)
        return True

    def _advance(self) -> None:
        while self.last_seq + 1 in self._delivered_set:
            self.last_seq += 1

    async def catch_up(self, origin: str) -> int:
        """Deliver the log entries this node has not delivered yet, as ``origin`` events, from
        the first seq not delivered: an entry a later local change jumped over is not lost."""
        count = 0
        async with self._catch_up:
            while True:
                texts = await self.store.log_entries(after=self.last_seq, limit=_PAGE)
                for text in texts:
                    entry = json.loads(text)
                    seq = int(entry.get("seq", self.last_seq + 1))
                    event = event_from_entry(entry, origin)
                    if event is not None and self._first(event.seq):
                        await self.deliver(event)
                        count += 1
                    self.last_seq = max(self.last_seq, seq)
                    self._advance()
                if len(texts) < _PAGE:
                    return count

    async def deliver(self, event: ChangeEvent) -> None:
        """Call every plugin's ``store_changed``; errors and slow hooks are logged, never raised."""
        self.delivered += 1
        args = {"app": self.app, "event": event}
        for name, impl in self._hooks:
            await _call_while_serving(self.plugins, name, impl, "store_changed", args, HOOK_TIMEOUT,
                                      at=f" on seq {event.seq}", on=f" on {event.kind} (seq {event.seq})")


async def call_runtime_hook(plugins: PluginManager, hook: str, timeout: float = HOOK_TIMEOUT, **kwargs: Any) -> None:
    """Call a hook while serving (``reloaded``): each plugin in turn, coroutines awaited
    up to ``timeout``; an error is logged naming the plugin, never raised."""
    for name, impl in plugins._impls(hook):
        await _call_while_serving(plugins, name, impl, hook, kwargs, timeout)


async def _call_while_serving(plugins: PluginManager, name: str, impl: Any, hook: str, kwargs: dict[str, Any],
                              timeout: float, *, at: str = "", on: str = "") -> None:
    """One plugin's ``hook``, a coroutine awaited up to ``timeout``; a failure is counted and
    logged naming the plugin (``at``/``on`` say which event, in the log line), never raised."""
    try:
        with running_plugin(name):
            result = impl.function(**{a: kwargs[a] for a in impl.argnames})
            if inspect.isawaitable(result):
                # in this task (not run_bounded): a hook that ignores its cancellation holds the
                # next event back rather than be overtaken by it (each seq once, in order)
                await within(result, timeout)
    except TimeoutError:
        plugins.hook_failed(name, hook)
        log.error("plugin %s: %s took longer than %.0f s%s; given up", name, hook, timeout, at)
    except Exception as e:
        plugins.hook_failed(name, hook)
        log.error("plugin %s: %s failed%s: %s: %s", name, hook, on, type(e).__name__, e)


__all__ = ["call_runtime_hook", "KINDS", "ORIGINS", "ChangeEvent", "ChangeEvents", "event_from_change", "event_from_entry"]
