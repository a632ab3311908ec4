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
reconnect with the old rights, and to report its in-flight grants and the
servers its nats-server has routes to: every server any node names must answer
(:mod:`.mesh`).
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

from unibus.aio import within
from unibus.bus import routes_of_server, server_id_of

from .callout import AUTH_TIMEOUT, IN_FLIGHT_TTL, Responder, parse_event
from .mesh import Mesh, MeshUnknown

log = logging.getLogger("unibus.plugins.auth_enforce")

#: How long a change waits for its kicks to be confirmed before it is answered 503
#: ``change-not-enforced`` (and retried): longer than a grant stays in flight (IN_FLIGHT_TTL,
#: 2.5 s), since a kick of a grant nats-server never registered (the client went away during
#: its login) waits that long before it counts the connection as gone. At 2 s such a change
#: always missed its deadline (a test whose member reconnects in a tight loop, one run in ten).
KICK_DEADLINE = 3.0
assert KICK_DEADLINE > IN_FLIGHT_TTL
#: How long a member that left the bus still counts as on it, for how often another may change
#: its rooms (Enforcer.on_the_bus; unibus.changelimit's burst times its interval).
ON_THE_BUS_WITHIN = 60.0
#: Members that left the bus remembered before those gone for longer than that are dropped.
LEFT_KEPT = 4096
APPLY_SUBJECT = "unibus.authz.apply"
CONNECT_EVENTS = "$SYS.ACCOUNT.MEMBERS.CONNECT"
DISCONNECT_EVENTS = "$SYS.ACCOUNT.MEMBERS.DISCONNECT"
RETRY_EVERY = 1.0
#: A revocation is swept once more after this, for a connection that was
#: authorized just before the change and reported just after the first sweep.
SECOND_SWEEP_AFTER = IN_FLIGHT_TTL + 0.2
NO_SUCH_CLIENT = "no such client"
#: How long a node's answer to an apply request waits for its nats-server's ROUTEZ; past
#: that it answers without its routes, and the asking node asks that nats-server itself.
ROUTES_TIMEOUT = 0.25

Conn = tuple[str, int]  # (server id, client id)


class KickUnconfirmed(Exception):
    """Some kicks were not confirmed within the deadline; they are retried in the background."""

    def __init__(self, message: str, in_flight: list[tuple[str, int, float]] | None = None,
                 servers: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        #: the in-flight grants the nodes that did answer reported
        self.in_flight = in_flight or []
        #: the servers known to exist all the same, whose connections are still listed and kicked
        self.servers = servers


class Enforcer:
    """Connection tracking and kicks, over membershipd's system-account connection."""

    def __init__(self, system_nc: Any, service_nc: Any, responder: Responder, *, clustered: bool,
                 node: str, apply_local: Callable[[list[str], list[str]], Awaitable[Any]] | None = None,
                 routes: Callable[[], Awaitable[frozenset[str] | None]] | None = None) -> None:
        self.sys = system_nc
        self.svc = service_nc
        self.responder = responder
        self.clustered = clustered
        self.node = node
        self.apply_local = apply_local
        self._routes = routes  # the ids of the servers this node's nats-server has routes to
        self.mesh = Mesh()
        #: handle -> live connections, from the CONNECT/DISCONNECT events of every server
        self.connections: dict[str, set[Conn]] = {}
        #: handle -> when its last connection went (monotonic): :meth:`on_the_bus`
        self._left: dict[str, float] = {}
        if responder is not None:  # its per-member bound counts these
            responder.live = lambda handle: len(self.connections.get(handle, ()))
            responder.saw_server = self.saw_server
        #: server name -> the id it has now: a nats-server takes a new id at every start, and
        #: the connections listed under its old one went with the old process (:meth:`saw_server`)
        self.server_ids: dict[str, str] = {}
        self._retired: set[str] = set()  # ids their names left behind
        self.pending: dict[str, bool] = {}  # handle -> revoke? : enforcement not confirmed yet
        self._retrying: dict[str, bool] = {}  # what the retry loop is trying now (taken out of pending)
        #: the rooms of the changes still pending: every node re-reads them again at each retry
        self.pending_rooms: set[str] = set()
        self.stats = {"changes": 0, "kicks": 0, "unconfirmed": 0, "sweeps": 0}
        self.last_duration: float | None = None
        #: the plugin's :class:`~.metrics.BusAuthMetrics` (set by its startup), or None
        self.metrics: Any = None
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: the second sweeps to come (:meth:`_schedule_sweep`): handle -> (when, monotonic; its changes' rooms)
        self._sweep_due: dict[str, tuple[float, set[str]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        #: set by :meth:`stop`: the retry loop ends on it too, since a cancellation can be
        #: lost inside nats-py's own ``wait_for`` on Python 3.11 (unibus.aio)
        self._stopped = False

    # -- life -------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopped = False
        self._subs.append(await self.sys.subscribe(CONNECT_EVENTS, cb=self._on_event))
        self._subs.append(await self.sys.subscribe(DISCONNECT_EVENTS, cb=self._on_event))
        if self.clustered:
            self._subs.append(await self.svc.subscribe(APPLY_SUBJECT, cb=self._on_apply))
        await self.sys.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self._reconcile()
        self._retry = asyncio.get_running_loop().create_task(self._retry_loop(), name="unibus-authz-retry")

    async def stop(self) -> None:
        self._stopped = True
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
        kind, server_id, cid, handle, server_name = parsed
        if not self.saw_server(server_id, server_name):
            return  # from a nats-server process that has ended since
        if msg.subject == CONNECT_EVENTS:
            self.connections.setdefault(handle, set()).add((server_id, cid))
            self.responder.reported(handle, server_id, cid)
        else:
            conns = self.connections.get(handle)
            if conns is not None:
                conns.discard((server_id, cid))
                if not conns:
                    del self.connections[handle]
                    self._left_bus(handle)

    def saw_server(self, server_id: str | None, name: str | None) -> bool:
        """A server named ``name`` has id ``server_id`` now; False when that id is one the
        name has already left behind (a late message from an ended process: ignored).

        If the name had another id before, that nats-server process has ended (a
        restart, possibly without one DISCONNECT event): its connections are
        forgotten, as a kick sent to its old id would have no responder and keep
        every revocation of those members unconfirmed. A server that is only
        unreachable keeps its id, and its connections stay listed (and kicked, or
        the change is 503). A revocation finds live connections by CONNZ as well,
        so forgetting never lets one keep its rights."""
        if not server_id or not name:
            return True
        if server_id in self._retired:
            return False
        old = self.server_ids.get(name)
        if old == server_id:
            return True
        self.server_ids[name] = server_id
        if old is None:
            return True
        self._retired.add(old)
        log.info("nats-server %s restarted (server id %s, was %s): forgetting its old connections",
                 name, server_id, old)
        for handle in list(self.connections):
            kept = {c for c in self.connections[handle] if c[0] != old}
            if kept:
                self.connections[handle] = kept
            else:
                del self.connections[handle]
                self._left_bus(handle)
        self.mesh.replace(old, server_id)
        return True

    async def _reconcile(self) -> None:
        """Rebuild :attr:`connections` from every server's CONNZ (start-up)."""
        own = self.server_id
        routes = await self._routes() if self.clustered and self._routes is not None else None
        if own:
            self.mesh.learn(own, routes)
        servers = frozenset({own, *(routes or self.mesh.last or self.mesh.seed or ())}) if own else frozenset()
        found: dict[str, set[Conn]] = {}
        for server_id, conns in (await self._connz({"acc": "MEMBERS"}, servers))[0].items():
            for conn in conns:
                found.setdefault(conn["user"], set()).add((server_id, conn["cid"]))
        self.connections = found

    @property
    def server_id(self) -> str | None:
        """The id of this node's nats-server (where the system connection is)."""
        return server_id_of(self.sys)

    async def _gather(self, nc: Any, subject: str, payload: dict[str, Any], timeout: float,
                      who: Callable[[dict[str, Any]], Any],
                      done: Callable[[dict[Any, dict[str, Any]]], bool],
                      on_reply: Callable[[Any, dict[str, Any], Callable[[], None]], None] | None = None,
                      ) -> dict[Any, dict[str, Any]]:
        """Publish a request that several responders answer; ``{responder: reply}`` once
        ``done(replies)`` or after ``timeout``. A responder (``who(reply)``) that answers
        twice counts once, and a reply that names no responder does not count."""
        inbox = nc.new_inbox()
        replies: dict[Any, dict[str, Any]] = {}
        finished = asyncio.Event()

        async def cb(msg: Any) -> None:
            try:
                reply = json.loads(msg.data)
                responder = who(reply)
            except (ValueError, AttributeError, TypeError):
                return
            if not responder or responder in replies:
                return
            replies[responder] = reply
            if on_reply is not None:
                on_reply(responder, reply, recheck)
            recheck()

        def recheck() -> None:
            if done(replies):
                finished.set()

        sub = await nc.subscribe(inbox, cb=cb)
        try:
            await nc.publish(subject, json.dumps(payload).encode(), reply=inbox)
            with contextlib.suppress(TimeoutError):
                await within(finished.wait(), timeout)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return dict(replies)

    async def _connz(self, options: dict[str, Any], servers: frozenset[str],
                     timeout: float = 0.5) -> tuple[dict[str, list[dict[str, Any]]], bool]:
        """``({server_id: [{"cid", "user"}...]}, complete)`` from every server's CONNZ of the
        MEMBERS account; ``complete`` is False when one of ``servers`` did not answer (a
        revocation must not take a silent server for one without connections), or when
        ``servers`` is empty (none could be told)."""
        out: dict[str, list[dict[str, Any]]] = {}
        offset = 0
        complete = bool(servers)
        while True:
            opts = {**options, "auth": True, "limit": 1024, "offset": offset}
            replies = await self._gather(self.sys, "$SYS.REQ.SERVER.PING.CONNZ", opts, timeout, _server_of,
                                         lambda got: bool(servers) and servers <= got.keys())
            if offset == 0:
                complete = complete and servers <= replies.keys()
            more = False
            for server_id, reply in replies.items():
                self.saw_server(server_id, (reply.get("server") or {}).get("name"))
                data = reply.get("data") or {}
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

    async def _apply_everywhere(self, handles: list[str],
                                rooms: list[str]) -> tuple[list[tuple[str, int, float]], frozenset[str]]:
        """Cluster: every node re-reads these records, then reports its in-flight grants to them
        and the servers its nats-server has routes to; ``(in-flight grants, every server)``.
        Every server that any node names must have answered (:mod:`.mesh`), else
        :class:`KickUnconfirmed`, which carries the servers known all the same."""
        own = self.server_id
        if not own:
            raise KickUnconfirmed("this node does not know its own nats-server's id (not connected)")

        # A node that answers without its routes (its own ROUTEZ was slow): its nats-server is
        # asked here at once, and the gather ends as soon as that answer completes the set
        # (found by a red-team test: waiting for the deadline first cost every change 1 s).
        asked: dict[str, frozenset[str] | None] = {}
        asking: dict[str, asyncio.Task[None]] = {}

        def routes_of(replies: dict[Any, dict[str, Any]]) -> dict[str, frozenset[str] | None]:
            out = {server: _route_set(reply) for server, reply in replies.items()}
            return {server: asked.get(server) if said is None else said for server, said in out.items()}

        def on_reply(server: Any, reply: dict[str, Any], recheck: Callable[[], None]) -> None:
            if _route_set(reply) is None and isinstance(server, str) and server not in asking:
                async def ask() -> None:
                    asked[server] = await routes_of_server(self.sys, server, ROUTES_TIMEOUT * 2)
                    recheck()

                asking[server] = asyncio.ensure_future(ask())

        try:
            replies = await self._gather(self.svc, APPLY_SUBJECT,
                                         {"handles": handles, "rooms": rooms, "from": self.node},
                                         KICK_DEADLINE / 2, lambda r: r.get("server"),
                                         lambda got: self.mesh.complete(own, routes_of(got)), on_reply)
            if asking:  # each bounded by its own timeout
                await asyncio.gather(*asking.values(), return_exceptions=True)
        finally:
            for task in asking.values():
                task.cancel()
        in_flight = [(s, c, t) for r in replies.values() for s, c, t in r.get("in_flight", [])]
        for server, reply in replies.items():
            self.saw_server(server, reply.get("node") if isinstance(reply.get("node"), str) else None)
        routes = routes_of(replies)
        try:
            servers = self.mesh.expected(own, routes)
        except MeshUnknown as e:
            known = frozenset({own, *routes}).union(*(r for r in routes.values() if r))
            raise KickUnconfirmed(str(e), in_flight, known) from None
        missing = servers - replies.keys()
        if missing:
            raise KickUnconfirmed(f"{len(servers) - len(missing)} of {len(servers)} nodes confirmed the change "
                                  f"(no answer from {', '.join(sorted(missing))})", in_flight, servers)
        return in_flight, servers

    async def _on_apply(self, msg: Any) -> None:
        try:
            request = json.loads(msg.data)
            handles, rooms = list(request.get("handles", [])), list(request.get("rooms", []))
        except (ValueError, AttributeError):
            return

        async def apply() -> Any:
            if self.apply_local is not None and request.get("from") != self.node:
                return await self.apply_local(handles, rooms)
            return None

        async def routes() -> frozenset[str] | None:
            if self._routes is None:
                return None
            with contextlib.suppress(TimeoutError):
                return await within(self._routes(), ROUTES_TIMEOUT)
            return None

        applied, remote = await asyncio.gather(apply(), routes(), return_exceptions=True)
        if isinstance(applied, BaseException):
            # not confirming makes the change retry: fail closed
            log.warning("could not re-read a changed member or room: %s", applied)
            return
        in_flight = [list(e) for h in handles for e in self.responder.in_flight_of(h)]
        if msg.reply:
            await msg.respond(json.dumps({
                "node": self.node, "server": self.server_id, "in_flight": in_flight,
                # None: ROUTEZ unanswered; the asking node then asks this node's nats-server itself
                "routes": sorted(remote) if isinstance(remote, frozenset) else None,
            }).encode())
        if isinstance(applied, (set, frozenset)) and applied:
            # What this re-read revoked here is kicked here too, after the answer: the asking
            # node kicks on every server it reaches, but this node may be cut off from it
            # right now, and the change reaching it later through the watch revokes nothing
            # more in an index that already has it (found by a red-team test).
            self._later(0, self.kick_here_or_retry(set(applied)))

    def kicked_by_grant(self, handle: str) -> bool:
        """Whether a grant to ``handle`` would kick connections: it has some, or a login in flight."""
        return bool(self.connections.get(handle) or self.responder.in_flight_of(handle))

    def on_the_bus(self, handle: str) -> bool:
        """Whether ``handle`` is on the bus, or was within :data:`ON_THE_BUS_WITHIN`: the control
        plane counts only changes of such members' rooms against their author (unibus.changelimit).

        Not just :meth:`kicked_by_grant`: between a kick and its reconnect a member has no
        connection, and a change that landed then would not count, while the next one kicks
        the connection that change's rights came back on."""
        if self.kicked_by_grant(handle):
            return True
        left = self._left.get(handle)
        return left is not None and time.monotonic() - left < ON_THE_BUS_WITHIN

    def _left_bus(self, handle: str) -> None:
        now = time.monotonic()
        self._left[handle] = now
        if len(self._left) > LEFT_KEPT:  # only members that have left for longer than the window go
            self._left = {h: t for h, t in self._left.items() if now - t < ON_THE_BUS_WITHIN}

    async def enforce(self, revoked: Iterable[str], granted: Iterable[str], rooms: Iterable[str] = ()) -> None:
        """Kick what must be kicked for a committed change; raise :class:`KickUnconfirmed` after the deadline.

        On a single node, a grant to a member with no known connection costs no NATS work at
        all. On a cluster every node re-reads it before the answer, connected or not: the
        member's next login may be answered by any node's membershipd, and one that had not
        read the grant yet from the KV watch gave the old rights, for as long as that
        connection lived (a test that failed one run in two: a member's first subscription to
        a room it had just been added to was refused for good).
        """
        revoked, granted = set(revoked), set(granted) - set(revoked)
        granted = {h for h in granted if self.clustered or self.kicked_by_grant(h)}
        if not revoked and not granted:
            return
        started = time.monotonic()
        self.stats["changes"] += 1
        try:
            await within(self._enforce(revoked, granted, list(rooms)), KICK_DEADLINE)
        except (TimeoutError, KickUnconfirmed, nats.errors.Error, OSError) as e:
            self.mark_pending(revoked, granted, rooms)
            log.error("bus enforcement of a change to %s not confirmed within %.0f s (%s); retrying until it is",
                      ", ".join(sorted(revoked | granted)), KICK_DEADLINE, _why(e))
            raise KickUnconfirmed(str(e)) from None
        finally:
            self.last_duration = time.monotonic() - started
        if revoked:
            self._schedule_sweep(revoked, rooms)

    async def kick_here(self, revoked: Iterable[str]) -> None:
        """Kick the connections of ``revoked`` on this node's own nats-server; :class:`KickUnconfirmed`
        when that cannot be confirmed.

        For another node's change, learned through the KV watch. The node that made it
        kicked on every server it could reach, and a node cut off from it at the time
        (a partition: the others no longer counted it) may hold connections it never
        reached, authorized by this node's callout with the old rights. So every node
        kicks, on its own server, what such a change revoked in its own index, when the
        change reaches it. A node that had applied the change already finds nothing revoked.
        """
        handles = set(revoked)
        if not handles:
            return
        own = self.server_id
        if not own:
            raise KickUnconfirmed("this node does not know its own nats-server's id (not connected)")
        self.saw_server(own, self.node)
        targets: dict[Conn, float | None] = {}
        for h in sorted(handles):
            for conn in self.connections.get(h, ()):
                if conn[0] == own:
                    targets.setdefault(conn, None)
            for server_id, cid, at in self.responder.in_flight_of(h):
                if server_id == own:
                    targets.setdefault((server_id, cid), at)
            found, complete = await self._connz({"acc": "MEMBERS", "user": h}, frozenset({own}))
            if not complete:
                raise KickUnconfirmed(f"this node's nats-server did not list the connections of {h}")
            for conn in found.get(own, ()):
                targets.setdefault((own, conn["cid"]), None)
        results = await asyncio.gather(*(self.kick(s, c, in_flight_since=t) for (s, c), t in targets.items()))
        if not all(results):
            raise KickUnconfirmed(f"{results.count(False)} of {len(results)} kicks on this node unconfirmed")
        if targets:
            log.info("another node's change revoked %s here: %d connection(s) kicked on this node",
                     ", ".join(sorted(handles)), len(targets))

    async def kick_here_or_retry(self, revoked: set[str]) -> None:
        """:meth:`kick_here` within the deadline; unconfirmed, the change is pending (the
        retry loop enforces it on every node until confirmed, and /healthz shows it)."""
        try:
            await within(self.kick_here(revoked), KICK_DEADLINE)
        except Exception as e:  # noqa: BLE001 - fail closed: the retry loop takes it up
            self.mark_pending(set(revoked), set())
            log.warning("kicks of %s on this node not confirmed (%s: %s); retrying", ", ".join(sorted(revoked)),
                        type(e).__name__, e)

    @property
    def pending_count(self) -> int:
        """Members whose new rights are not confirmed yet, those the retry loop is trying now
        included (the count read 0 while a retry was under way: a test that read /healthz a moment
        later than before saw no kick pending while one was)."""
        return len(self.pending.keys() | self._retrying.keys())

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
        self.saw_server(self.server_id, self.node)  # this node's own nats-server may have restarted
        handles = sorted(revoked | granted)
        in_flight: list[tuple[str, int, float]] = []
        unapplied: KickUnconfirmed | None = None
        if self.clustered:
            try:
                in_flight, servers = await self._apply_everywhere(handles, rooms)
            except KickUnconfirmed as e:
                # A node that did not confirm may still authorize with the old rights, so the
                # change stays pending; the connections known now are kicked all the same.
                unapplied, in_flight, servers = e, e.in_flight, e.servers
        else:
            in_flight = [e for h in handles for e in self.responder.in_flight_of(h)]
            own = self.server_id
            servers = frozenset({own} if own else ())
        targets: dict[Conn, float | None] = {}
        for h in handles:
            for conn in self.connections.get(h, ()):
                targets.setdefault(conn, None)
        for server_id, cid, at in in_flight:
            targets.setdefault((server_id, cid), at)
        for h in revoked:
            found, complete = await self._connz({"acc": "MEMBERS", "user": h}, servers)
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
            await within(self._enforce(handles, set(), rooms), KICK_DEADLINE)
        except Exception as e:  # noqa: BLE001 - retried by the pending loop
            for h in handles:
                self.pending[h] = True
            self.pending_rooms.update(rooms)
            log.warning("second sweep of %s not confirmed (%s); retrying", ", ".join(sorted(handles)), _why(e))

    def _schedule_sweep(self, handles: Iterable[str], rooms: Iterable[str]) -> None:
        """A second sweep of ``handles`` (and a re-read of ``rooms``) SECOND_SWEEP_AFTER from now.

        One task does every sweep, and a member revoked again before its sweep ran is swept
        once, SECOND_SWEEP_AFTER after the last revocation: a sweep per change piled up when
        a member was added to and removed from a room in a loop (any member may do that to
        any other in a room of its own, within unibus.changelimit's budget of changes), and
        each sweep kicked the member's connections, current ones included (a red team: 86
        kicks, hundreds of sweeps, 503s). Postponing is safe: each revocation's own
        enforcement kicks every connection and every grant in flight of the member at once;
        the sweep is for the grants answered around the last."""
        due, rooms = time.monotonic() + SECOND_SWEEP_AFTER, set(rooms)
        for h in handles:
            _was, before = self._sweep_due.get(h, (0.0, set()))
            self._sweep_due[h] = (due, before | rooms)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweeps(), name="bus-auth-sweeps")
            self._tasks.add(self._sweeper)
            self._sweeper.add_done_callback(self._tasks.discard)

    async def _sweeps(self) -> None:
        while self._sweep_due and not self._stopped:
            now = time.monotonic()
            first = min(due for due, _rooms in self._sweep_due.values())
            if first > now:
                await asyncio.sleep(first - now)
                continue
            handles = {h for h, (due, _rooms) in self._sweep_due.items() if due <= now}
            rooms = sorted(set().union(*(self._sweep_due.pop(h)[1] for h in handles)))
            await self._sweep(handles, rooms)

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
        # cancelled before it ever ran (stopped at once): run() never saw it, so close it here
        task.add_done_callback(lambda _task: coro.close())

    async def _learn_mesh(self) -> None:
        """One try at a first set of servers from this node's own routes (:meth:`Mesh.learn`)."""
        own = self.server_id
        if own and self._routes is not None:
            self.mesh.learn(own, await self._routes())

    async def _retry_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(RETRY_EVERY)
            if self._stopped:
                return
            if self.clustered:
                # the peers this node's routes name now: one cut off later must not count itself
                # alone, and a peer that joined since the last full answer is expected too
                with contextlib.suppress(Exception):
                    await self._learn_mesh()
            if not self.pending:
                continue
            pending, self.pending = dict(self.pending), {}
            rooms, self.pending_rooms = sorted(self.pending_rooms), set()
            revoked = {h for h, r in pending.items() if r}
            granted = set(pending) - revoked
            self._retrying = pending
            try:
                await within(self._enforce(revoked, granted, rooms), KICK_DEADLINE)
                log.info("bus enforcement of %s confirmed", ", ".join(sorted(pending)))
            except Exception as e:  # noqa: BLE001 - keep retrying until confirmed
                for h, r in pending.items():
                    self.pending[h] = self.pending.get(h, False) or r
                self.pending_rooms.update(rooms)
                log.warning("bus enforcement of %s still not confirmed: %s", ", ".join(sorted(pending)), _why(e))
            finally:
                self._retrying = {}


def _why(e: BaseException) -> str:
    """An exception for a log line: its text, or its class when it has none (a timeout's)."""
    return str(e) or type(e).__name__


def _route_set(reply: dict[str, Any]) -> frozenset[str] | None:
    """The server ids a node's apply reply says its nats-server has routes to (None: it could not say)."""
    routes = reply.get("routes")
    if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
        return None
    return frozenset(routes)


def _server_of(reply: dict[str, Any]) -> str | None:
    """The id of the server that sent a ``$SYS`` reply (``server.id``, or ``data.server_id``)."""
    return (reply.get("server") or {}).get("id") or (reply.get("data") or {}).get("server_id")


__all__ = ["APPLY_SUBJECT", "AUTH_TIMEOUT", "KICK_DEADLINE", "Enforcer", "KickUnconfirmed"]
