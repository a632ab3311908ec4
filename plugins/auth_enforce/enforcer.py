"""Changes without reload: kick the connections whose rights changed (docs/bus-auth.md).

A connection keeps the permissions its user JWT gave it for its whole life,
so a change of a member's rights disconnects every connection of that member,
on every node (``$SYS.REQ.SERVER.<server id>.KICK``); the client reconnects
and the callout gives it its new rights, or refuses it. The request that made
the change gets its 2xx only after every kick was confirmed; what cannot be
confirmed within :data:`KICK_DEADLINE` is answered 503 and retried in the
background until it is (``/healthz`` shows how many wait).

Which connections a member has is known three ways, because each alone can
miss one: the ``$SYS.ACCOUNT.MEMBERS.CONNECT/DISCONNECT`` events of every
server (kept in :attr:`Enforcer.connections`); the responders' grants still
in flight (answered, not yet reported); and, for a revocation, a CONNZ asked
of every server. On a cluster a revocation first asks every node to re-read
the changed records (``unibus.authz.apply``), so that no node can authorize a
reconnect with the old rights, and to report its in-flight grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import nats.errors

from .callout import AUTH_TIMEOUT, IN_FLIGHT_TTL, Responder, parse_event

log = logging.getLogger("unibus.plugins.auth_enforce")

KICK_DEADLINE = 2.0
APPLY_SUBJECT = "unibus.authz.apply"
CONNECT_EVENTS = "$SYS.ACCOUNT.MEMBERS.CONNECT"
DISCONNECT_EVENTS = "$SYS.ACCOUNT.MEMBERS.DISCONNECT"
RETRY_EVERY = 1.0
#: A revocation is swept once more after this, for a connection that was
#: authorized just before the change and reported just after the first sweep.
SECOND_SWEEP_AFTER = IN_FLIGHT_TTL + 0.2
NO_SUCH_CLIENT = "no such client"

Conn = tuple[str, int]  # (server id, client id)


class KickUnconfirmed(Exception):
    """Some kicks were not confirmed within the deadline; they are retried in the background."""

    def __init__(self, message: str, in_flight: list[tuple[str, int, float]] | None = None) -> None:
        super().__init__(message)
        #: the in-flight grants the nodes that did answer reported
        self.in_flight = in_flight or []


class Enforcer:
    """Connection tracking and kicks, over membershipd's system-account connection."""

    def __init__(self, system_nc: Any, service_nc: Any, responder: Responder, *, clustered: bool,
                 node: str, apply_local: Callable[[list[str], list[str]], Awaitable[None]] | None = None,
                 peers: Callable[[], Awaitable[int | None]] | None = None) -> None:
        self.sys = system_nc
        self.svc = service_nc
        self.responder = responder
        self.clustered = clustered
        self.node = node
        self.apply_local = apply_local
        self._peers = peers
        self._last_peers: int | None = None  # what ROUTEZ said last
        #: handle -> live connections, from the CONNECT/DISCONNECT events of every server
        self.connections: dict[str, set[Conn]] = {}
        self.pending: dict[str, bool] = {}  # handle -> revoke? : enforcement not confirmed yet
        #: the rooms of the changes still pending: every node re-reads them again at each retry
        self.pending_rooms: set[str] = set()
        self.stats = {"changes": 0, "kicks": 0, "unconfirmed": 0, "sweeps": 0}
        self.last_duration: float | None = None
        #: the plugin's :class:`~.metrics.BusAuthMetrics` (set by its startup), or None
        self.metrics: Any = None
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry: asyncio.Task[None] | None = None

    # -- life -------------------------------------------------------------------------

    async def start(self) -> None:
        self._subs.append(await self.sys.subscribe(CONNECT_EVENTS, cb=self._on_event))
        self._subs.append(await self.sys.subscribe(DISCONNECT_EVENTS, cb=self._on_event))
        if self.clustered:
            self._subs.append(await self.svc.subscribe(APPLY_SUBJECT, cb=self._on_apply))
        await self.sys.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self._reconcile()
        self._retry = asyncio.get_running_loop().create_task(self._retry_loop(), name="unibus-authz-retry")

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        for task in list(self._tasks):
            task.cancel()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    # -- tracking ---------------------------------------------------------------------

    async def _on_event(self, msg: Any) -> None:
        parsed = parse_event(msg.data)
        if parsed is None:
            return
        kind, server_id, cid, handle = parsed
        if msg.subject == CONNECT_EVENTS:
            self.connections.setdefault(handle, set()).add((server_id, cid))
            self.responder.reported(handle, server_id, cid)
        else:
            conns = self.connections.get(handle)
            if conns is not None:
                conns.discard((server_id, cid))
                if not conns:
                    del self.connections[handle]

    async def _reconcile(self) -> None:
        """Rebuild :attr:`connections` from every server's CONNZ (start-up)."""
        found: dict[str, set[Conn]] = {}
        for server_id, conns in (await self._connz({"acc": "MEMBERS"}))[0].items():
            for conn in conns:
                found.setdefault(conn["user"], set()).add((server_id, conn["cid"]))
        self.connections = found

    async def expected_servers(self) -> int:
        """This node's server and every server it has a route to. When its nats-server
        does not say (ROUTEZ unanswered, e.g. on a loaded machine), the last count it
        gave stands; before any, :class:`KickUnconfirmed`. Never "alone": counting only
        itself would confirm a revocation that no other node applied."""
        if not self.clustered or self._peers is None:
            return 1
        peers = await self._peers()
        if peers is None:
            peers = self._last_peers
            if peers is None:
                raise KickUnconfirmed("this node's nats-server did not say which servers it has routes to")
        if peers:  # a count of 0 (routes not formed yet) is never what a silent ROUTEZ falls back on
            self._last_peers = peers
        return 1 + peers

    async def _gather(self, nc: Any, subject: str, payload: dict[str, Any], want: int,
                      timeout: float, who: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
        """Publish a request that several responders answer; collect replies until ``want``
        distinct responders (``who(reply)``) answered: a responder that answers twice
        counts once, and a reply that names no responder does not count."""
        inbox = nc.new_inbox()
        replies: list[dict[str, Any]] = []
        seen: set[Any] = set()
        done = asyncio.Event()

        async def cb(msg: Any) -> None:
            try:
                reply = json.loads(msg.data)
                responder = who(reply)
            except (ValueError, AttributeError, TypeError):
                return
            if not responder or responder in seen:
                return
            seen.add(responder)
            replies.append(reply)
            if len(replies) >= want:
                done.set()

        sub = await nc.subscribe(inbox, cb=cb)
        try:
            await nc.publish(subject, json.dumps(payload).encode(), reply=inbox)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return replies

    async def _connz(self, options: dict[str, Any],
                     timeout: float = 0.5) -> tuple[dict[str, list[dict[str, Any]]], bool]:
        """``({server_id: [{"cid", "user"}...]}, complete)`` from every server's CONNZ of the
        MEMBERS account; ``complete`` is False when fewer servers answered than expected
        (a revocation must not take a silent server for one without connections)."""
        want = await self.expected_servers()
        out: dict[str, list[dict[str, Any]]] = {}
        offset = 0
        complete = True
        while True:
            opts = {**options, "auth": True, "limit": 1024, "offset": offset}
            replies = await self._gather(self.sys, "$SYS.REQ.SERVER.PING.CONNZ", opts, want, timeout, _server_of)
            if offset == 0:
                complete = len(replies) >= want
            more = False
            for reply in replies:
                data, server_id = reply.get("data") or {}, _server_of(reply)
                conns = [{"cid": c["cid"], "user": c.get("authorized_user") or c.get("name") or ""}
                         for c in data.get("connections") or [] if "cid" in c]
                out.setdefault(server_id, []).extend(conns)
                more |= len(data.get("connections") or []) == 1024
            if not more:
                return out, complete
            offset += 1024

    # -- kicks --------------------------------------------------------------------------

    async def kick(self, server_id: str, cid: int, *, in_flight_since: float | None = None) -> bool:
        """Disconnect one client; True once nats-server confirmed it, or it is gone already.

        For a grant still in flight (``in_flight_since``) "no such client" may
        mean "not registered yet": it is retried until the grant is too old to
        become a connection.
        """
        while True:
            try:
                msg = await self.sys.request(f"$SYS.REQ.SERVER.{server_id}.KICK",
                                             json.dumps({"cid": cid}).encode(), timeout=KICK_DEADLINE / 2)
            except (nats.errors.Error, TimeoutError, OSError):
                return False
            try:
                error = (json.loads(msg.data).get("error") or {})
            except ValueError:
                return False
            if not error:
                self.stats["kicks"] += 1
                if self.metrics is not None:
                    self.metrics.kicks.inc()
                return True
            if NO_SUCH_CLIENT not in str(error.get("description", "")):
                return False
            if in_flight_since is None or time.time() - in_flight_since > IN_FLIGHT_TTL:
                return True  # gone (or never became a connection)
            await asyncio.sleep(0.05)

    async def _apply_everywhere(self, handles: list[str], rooms: list[str]) -> list[tuple[str, int, float]]:
        """Cluster: every node re-reads these records, then reports its in-flight grants to them."""
        want = await self.expected_servers()
        replies = await self._gather(self.svc, APPLY_SUBJECT, {"handles": handles, "rooms": rooms, "from": self.node},
                                     want, KICK_DEADLINE / 2, lambda r: r.get("node"))
        in_flight = [(s, c, t) for r in replies for s, c, t in r.get("in_flight", [])]
        if len(replies) < want:
            raise KickUnconfirmed(f"{len(replies)} of {want} nodes confirmed the change", in_flight)
        return in_flight

    async def _on_apply(self, msg: Any) -> None:
        try:
            request = json.loads(msg.data)
            handles, rooms = list(request.get("handles", [])), list(request.get("rooms", []))
        except (ValueError, AttributeError):
            return
        if self.apply_local is not None and request.get("from") != self.node:
            try:
                await self.apply_local(handles, rooms)
            except Exception as e:  # noqa: BLE001 - not confirming makes the change retry: fail closed
                log.warning("could not re-read a changed member or room: %s", e)
                return
        in_flight = [list(e) for h in handles for e in self.responder.in_flight_of(h)]
        if msg.reply:
            await msg.respond(json.dumps({"node": self.node, "in_flight": in_flight}).encode())

    async def enforce(self, revoked: Iterable[str], granted: Iterable[str], rooms: Iterable[str] = ()) -> None:
        """Kick what must be kicked for a committed change; raise :class:`KickUnconfirmed` after the deadline.

        A grant to a member with no known connection costs no NATS work at all.
        """
        revoked, granted = set(revoked), set(granted) - set(revoked)
        granted = {h for h in granted if self.connections.get(h) or self.responder.in_flight_of(h)}
        if not revoked and not granted:
            return
        started = time.monotonic()
        self.stats["changes"] += 1
        try:
            await asyncio.wait_for(self._enforce(revoked, granted, list(rooms)), KICK_DEADLINE)
        except (TimeoutError, KickUnconfirmed, nats.errors.Error, OSError) as e:
            self.mark_pending(revoked, granted, rooms)
            log.error("bus enforcement of a change to %s not confirmed within %.0f s (%s); retrying until it is",
                      ", ".join(sorted(revoked | granted)), KICK_DEADLINE, e or type(e).__name__)
            raise KickUnconfirmed(str(e)) from None
        finally:
            self.last_duration = time.monotonic() - started
        if revoked:
            self._later(SECOND_SWEEP_AFTER, self._sweep(revoked, list(rooms)))

    def mark_pending(self, revoked: set[str], granted: set[str], rooms: Iterable[str] = ()) -> None:
        """Enforcement not confirmed: the retry loop takes it up every second (and /healthz shows it),
        asking every node to re-read the members and the rooms again."""
        for h in revoked | granted:
            self.pending[h] = self.pending.get(h, False) or h in revoked
        self.pending_rooms.update(rooms)
        self.stats["unconfirmed"] += 1
        if self.metrics is not None:
            self.metrics.unconfirmed.inc()

    async def _enforce(self, revoked: set[str], granted: set[str], rooms: list[str]) -> None:
        handles = sorted(revoked | granted)
        in_flight: list[tuple[str, int, float]] = []
        unapplied: KickUnconfirmed | None = None
        if self.clustered:
            try:
                in_flight = await self._apply_everywhere(handles, rooms)
            except KickUnconfirmed as e:
                # A node that did not confirm may still authorize with the old rights, so the
                # change stays pending; the connections known now are kicked all the same.
                unapplied, in_flight = e, e.in_flight
        else:
            in_flight = [e for h in handles for e in self.responder.in_flight_of(h)]
        targets: dict[Conn, float | None] = {}
        for h in handles:
            for conn in self.connections.get(h, ()):
                targets.setdefault(conn, None)
        for server_id, cid, at in in_flight:
            targets.setdefault((server_id, cid), at)
        for h in revoked:
            try:
                found, complete = await self._connz({"acc": "MEMBERS", "user": h})
            except KickUnconfirmed as e:  # the servers cannot be counted
                found, complete, unapplied = {}, True, unapplied or e
            if not complete:
                unapplied = unapplied or KickUnconfirmed(f"not every server listed the connections of {h}")
            for server_id, conns in found.items():
                for conn in conns:
                    targets.setdefault((server_id, conn["cid"]), None)
        results = await asyncio.gather(*(self.kick(s, c, in_flight_since=t) for (s, c), t in targets.items()))
        if unapplied is not None:
            raise unapplied
        if not all(results):
            raise KickUnconfirmed(f"{results.count(False)} of {len(results)} kicks unconfirmed")
        log.debug("bus enforcement of a change to %s confirmed: %d kick(s)%s", ", ".join(handles), len(results),
                  " after every node applied it" if self.clustered else "")

    async def _sweep(self, handles: set[str], rooms: list[str]) -> None:
        self.stats["sweeps"] += 1
        try:
            await asyncio.wait_for(self._enforce(handles, set(), rooms), KICK_DEADLINE)
        except Exception as e:  # noqa: BLE001 - retried by the pending loop
            for h in handles:
                self.pending[h] = True
            self.pending_rooms.update(rooms)
            log.warning("second sweep of %s not confirmed (%s); retrying", ", ".join(sorted(handles)), e)

    def _later(self, delay: float, coro: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                coro.close()  # stopped first: never started, and not left un-awaited
                raise
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(RETRY_EVERY)
            if not self.pending:
                continue
            pending, self.pending = dict(self.pending), {}
            rooms, self.pending_rooms = sorted(self.pending_rooms), set()
            revoked = {h for h, r in pending.items() if r}
            granted = set(pending) - revoked
            try:
                await asyncio.wait_for(self._enforce(revoked, granted, rooms), KICK_DEADLINE)
                log.info("bus enforcement of %s confirmed", ", ".join(sorted(pending)))
            except Exception as e:  # noqa: BLE001 - keep retrying until confirmed
                for h, r in pending.items():
                    self.pending[h] = self.pending.get(h, False) or r
                self.pending_rooms.update(rooms)
                log.warning("bus enforcement of %s still not confirmed: %s", ", ".join(sorted(pending)), e)


def _server_of(reply: dict[str, Any]) -> str | None:
    """The id of the server that sent a ``$SYS`` reply (``server.id``, or ``data.server_id``)."""
    return (reply.get("server") or {}).get("id") or (reply.get("data") or {}).get("server_id")


__all__ = ["APPLY_SUBJECT", "AUTH_TIMEOUT", "KICK_DEADLINE", "Enforcer", "KickUnconfirmed"]
