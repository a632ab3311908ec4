"""Removing a dead node from a cluster's JetStream meta group: ``membershipd remove-peer``.

A node gone for good (its disk lost, the host destroyed) stays a peer of the meta group, offline,
and ``deploy/cluster/check-r3-current.sh`` fails for ever; nothing shipped removed it (a
walk-through of the cluster runbook sent ``$JS.API.SERVER.REMOVE`` by hand). The procedure is in
deploy/cluster/README.md, "Replacing a dead node": the new node (a new ``--server-name``) joins
first, then this removes the dead one from a live node, and nats-server places the replicas the
dead node held on the new one by itself.

Measured with nats-server 2.15.1 (tests/e2e/test_cluster_replace_node.py):

- ``$JS.API.SERVER.REMOVE`` is acted on only from the system account (membershipd's
  ``system.nkey``), by the meta leader, and answered once the removal is committed.
- A node that never knew the dead one's name (the new one, should it lead) lists it by its peer
  id only: the request gives the id, which is nats-server's hash of the name (:func:`peer_id`).
- A crashed node is marked offline 150 to 240 s after it stopped answering (at once after a clean
  stop); a node that hangs answers nothing either. So a peer is removed only once it is marked
  offline, answers no ping, and no other peer is silent: Jepsen found acknowledged writes lost
  by membership changes during faults (docs/operations.md, "Durability").
- A removed node that comes back with its data is kept out of the meta group for five minutes,
  then let back under its old id: never start it again under that name.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, RuntimeFailure
from .stopsignals import checkpoint, stoppable

PING_SUBJECT = "$SYS.REQ.SERVER.PING.JSZ"
REMOVE_SUBJECT = "$JS.API.SERVER.REMOVE"
NOT_A_MEMBER = 10044  # nats-server's err_code: "server is not a member of the cluster"
CHANGE_IN_PROGRESS = 10202  # "cluster member change is in progress"
#: How long every live server is given to answer a ping (they answer within milliseconds on a LAN).
GATHER = 2.0
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def peer_id(server_name: str) -> str:
    """nats-server's RAFT peer id of a server: the first 8 bytes of the SHA-256 of its name, each
    taken modulo 62 as a base-62 digit. Why a wiped node must never take its old name again: it
    would be that peer, with empty storage."""
    digest = hashlib.sha256(server_name.encode()).digest()
    return "".join(_BASE62[b % 62] for b in digest[:8])


@dataclass(frozen=True)
class Placement:
    """A stream as its leader reports it."""

    leader: str
    peers: tuple[str, ...]  # the leader and its replicas, by name
    behind: tuple[str, ...]  # replicas not current
    replicas: int  # configured


async def ping_jsz(nc: Any, options: dict[str, Any] | None = None, gather: float = GATHER) -> dict[str, dict]:
    """``{server name: its JSZ answer}`` of every server that answers a system ping within ``gather`` s."""
    answers: dict[str, dict] = {}

    async def take(msg: Any) -> None:
        try:
            doc = json.loads(msg.data)
            answers[doc["server"]["name"]] = doc
        except (ValueError, KeyError, TypeError):
            pass  # not an answer of the shape nats-server sends

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=take)
    try:
        await nc.publish(PING_SUBJECT, json.dumps(options or {}).encode(), reply=inbox)
        await nc.flush(timeout=5)
        await asyncio.sleep(gather)
    finally:
        await sub.unsubscribe()
    return answers


def _meta(answer: dict | None) -> dict:
    return ((answer or {}).get("data") or {}).get("meta_cluster") or {}


def placements(answers: dict[str, dict]) -> dict[str, Placement]:
    """Every stream, as its leader among ``answers`` reports it."""
    out: dict[str, Placement] = {}
    for name, answer in answers.items():
        for account in (answer.get("data") or {}).get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                cluster = stream.get("cluster") or {}
                if cluster.get("leader") != name:
                    continue
                replicas = cluster.get("replicas") or []
                out[stream["name"]] = Placement(
                    name, tuple(sorted([name, *(str(r.get("name")) for r in replicas)])),
                    tuple(sorted(str(r.get("name")) for r in replicas if not r.get("current"))),
                    int((stream.get("config") or {}).get("num_replicas") or 1))
    return out


def _named(replica: dict) -> str:
    name = str(replica.get("name") or "")
    return name if name and not name.startswith("Server name unknown") else f"(peer id {replica.get('peer')})"


def _peer_entry(answer: dict | None, wanted: str) -> dict | None:
    return next((r for r in _meta(answer).get("replicas") or [] if r.get("peer") == wanted), None)


async def check_removable(nc: Any, me: str, target: str, *, others_down_ok: bool, gather: float = GATHER) -> str:
    """Refuse (ConfigError, exit 2) unless ``target`` is a peer of the meta group, not ``me``, answers
    nothing, is marked offline by every node that answers (the meta leader among them), and the
    nodes that answer all see each other, and no other peer is silent; RuntimeFailure (exit 1)
    when the cluster cannot say. Returns what it found, in one line.

    Every view, not this node's alone: a review cut only the route between n1 and n3, and n1,
    which saw n3 offline, removed it while the meta leader n2 still heard it."""
    answers = await ping_jsz(nc, gather=gather)
    if me not in answers:
        raise RuntimeFailure(f"{me} did not answer {PING_SUBJECT}: the seed given is no user of nats-server's system "
                             "account here (--nkey-seed-file, default <data-dir>/system.nkey; a node with "
                             "--bus-auth off has none in use: remove-peer needs --bus-auth enforce)")
    meta = _meta(answers[me])
    if not meta:
        raise ConfigError(f"{me} has no JetStream meta group: it is not a cluster node; nothing to remove")
    leader = meta.get("leader")
    if not leader:
        raise RuntimeFailure("the JetStream meta group has no leader: a removal needs a majority of it; bring back "
                             "the nodes that are down, then run remove-peer again")
    if target == me:
        raise ConfigError(f"{target} is this node; run remove-peer on a live node of the cluster, once {target} is "
                          "stopped for good")
    replicas = meta.get("replicas") or []
    wanted = peer_id(target)
    is_peer = any(r.get("peer") == wanted for r in replicas)
    if target in answers:
        if not is_peer:  # a review: only "not a peer" was said of a removed node running again
            raise ConfigError(f"{target} answers but is no peer of the meta group: a removed node started again "
                              "under its name? stop it for good (nats-server lets it back in after five minutes)")
        raise ConfigError(f"{target} is online (it answered through the cluster): remove-peer removes only a node "
                          f"gone for good; stop and disable membershipd on {target} first")
    if not is_peer:
        known = ", ".join(sorted([me, *(_named(r) for r in replicas)]))
        raise ConfigError(f"{target} is not a peer of the JetStream meta group (its peers: {known}); give the "
                          "--server-name of the dead node")
    if leader not in answers:
        raise RuntimeFailure(f"the meta leader {leader} did not answer: the nodes may be cut off from each other; "
                             "check the routes and run remove-peer again")
    peers = {me} | {str(r.get("name")) for r in replicas}
    strangers = sorted(set(answers) - peers)
    if strangers:
        raise ConfigError(f"{', '.join(strangers)} answer(s) but are no peer of the meta group (a removed node "
                          "started again under its name?): stop it for good first")
    silent = [r for r in replicas if r.get("peer") != wanted and r.get("name") not in answers]
    if silent and not others_down_ok:
        raise ConfigError(f"{', '.join(sorted(map(_named, silent)))} answer(s) nothing either: never change the "
                          "membership while another node is down or cut off (acknowledged writes can be lost); bring "
                          "it back first, or give --allow-others-down if it is gone for good too")
    for name, answer in sorted(answers.items()):
        # The target, and with --allow-others-down the other silent peers: offline in every view.
        for peer, who in ((wanted, target), *((str(r.get("peer")), _named(r)) for r in silent)):
            entry = _peer_entry(answer, peer)
            if entry is None or (not entry.get("current") and entry.get("offline")):
                continue
            if name == me:
                raise ConfigError(f"{who} answers nothing, but nats-server here has not marked it offline yet (at "
                                  "once after a clean stop, 150 to 240 s after a crash or a cut): make sure it is gone "
                                  "for good, wait, and run remove-peer again")
            raise ConfigError(f"{who} answers nothing here, but {name} still hears it: the nodes are cut off from each "
                              "other, or it is not marked offline there yet; make sure it is gone for good, wait, and "
                              "run remove-peer again")
        seen = {str(r.get("name")): r for r in _meta(answer).get("replicas") or []}
        cut = sorted(other for other in answers if other != name and seen.get(other, {}).get("offline"))
        if cut:
            raise ConfigError(f"{name} sees {', '.join(cut)} offline although they answer: the live nodes are cut off "
                              "from each other; never change the membership then; mend the routes first")
    return (f"{target} (peer id {wanted}) is an offline peer of the meta group; live nodes: "
            f"{', '.join(sorted(answers))}; meta leader: {leader}")


async def send_removal(nc: Any, target: str) -> None:
    """``$JS.API.SERVER.REMOVE`` for ``target``, by name and peer id (the id wins: a leader that never
    knew the name finds it); returns once the meta leader has committed it."""
    request = json.dumps({"peer": target, "peer_id": peer_id(target)}).encode()
    try:
        msg = await nc.request(REMOVE_SUBJECT, request, timeout=15)
        answer = json.loads(msg.data)
    except ValueError:
        raise RuntimeFailure(f"{REMOVE_SUBJECT} answered something that is not JSON") from None
    except Exception as e:  # noqa: BLE001 - nats-py's timeouts and its connection errors alike
        raise RuntimeFailure(f"{REMOVE_SUBJECT} got no answer ({type(e).__name__}): the meta leader may have "
                             "changed or lost its majority; check the cluster and run remove-peer again") from None
    error = answer.get("error") if isinstance(answer, dict) else None
    if error and error.get("err_code") == NOT_A_MEMBER:
        raise RuntimeFailure(f"nats-server refused the removal: {target} is no member of the cluster any more "
                             "(removed meanwhile: by another run?)")
    if error and error.get("err_code") == CHANGE_IN_PROGRESS:
        raise RuntimeFailure("nats-server refused the removal: another change of the cluster's members is under way "
                             "(another run?); run remove-peer again once it is done")
    if error:
        raise RuntimeFailure(f"nats-server refused the removal: {error.get('description')} (code {error.get('code')}, "
                             f"err_code {error.get('err_code')})")
    if not (isinstance(answer, dict) and answer.get("success")):
        raise RuntimeFailure(f"{REMOVE_SUBJECT} answered neither success nor an error: {answer!r:.200}")


def _came_back(target: str) -> RuntimeFailure:
    return RuntimeFailure(f"{target} answers: it is running, and was removed from the meta group while it came back; "
                          "stop it for good now (nats-server lets a removed peer back in after five minutes, under "
                          "its old name), then check with check-r3-current.sh")


async def wait_removed(nc: Any, me: str, target: str, wait: float, say: Callable[[str], None]) -> list[str]:
    """Wait, at most ``wait`` seconds, until no live node lists ``target`` and its streams are placed
    elsewhere; the lines that say where every stream is. RuntimeFailure if it is still listed."""
    wanted = peer_id(target)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        answers = await ping_jsz(nc, {"accounts": True, "streams": True, "config": True}, gather=1.0)
        if target in answers:  # it came back as the removal went out (a review: exit 0 all the same)
            raise _came_back(target)
        listing = sorted(name for name, a in answers.items()
                         if any(r.get("peer") == wanted for r in _meta(a).get("replicas") or []))
        streams = placements(answers)
        holding = sorted(s for s, p in streams.items() if target in p.peers)
        live = {me} | {str(r.get("name")) for r in _meta(answers.get(me)).get("replicas") or []
                       if r.get("name") in answers}
        placing = sorted(s for s, p in streams.items() if len(p.peers) < min(p.replicas, len(live)))
        if not listing and not holding and not placing:
            break
        if loop.time() >= deadline:
            if listing or holding:
                raise RuntimeFailure(f"the removal was committed, but after {wait:g} s {', '.join(listing) or 'no node'} "
                                     f"still list(s) {target}, and these streams are still on it: "
                                     f"{', '.join(holding) or 'none'}; check again with check-r3-current.sh")
            break  # removed; the streams short of replicas are said below
        say(f"waiting: {target} listed by {', '.join(listing) or 'no node'}; streams being placed: "
            f"{', '.join(holding + placing) or 'none'}")
        await asyncio.sleep(1.0)
    # Once more, a while after the commit: a server that joined after the last ping was sent never
    # answered it (a review: the node, restarted 4 s into the command, was removed and exit 0).
    await asyncio.sleep(1.0)
    if target in await ping_jsz(nc, gather=1.5):
        raise _came_back(target)
    lines = [f"{target} is gone from the meta group of every live node ({', '.join(sorted(answers))})"]
    short = []
    for name, p in sorted(streams.items()):
        catching_up = f", catching up: {', '.join(p.behind)}" if p.behind else ""
        lines.append(f"stream {name}: R{p.replicas} on {', '.join(p.peers)} (leader {p.leader}{catching_up})")
        if len(p.peers) < p.replicas:
            short.append(name)
    if short:
        lines.append(f"{', '.join(short)} have fewer replicas than configured: start a new node (a new "
                     "--server-name); nats-server places the missing replicas on it")
    lines.append("next: deploy/cluster/check-r3-current.sh --wait 600 on every node")
    return lines


async def remove_peer(nc: Any, me: str, target: str, *, wait: float, dry_run: bool, others_down_ok: bool,
                      say: Callable[[str], None]) -> list[str]:
    """The whole command on a connection as the system user; the lines that say what it did."""
    async with stoppable():  # the checks read only
        found = await check_removable(nc, me, target, others_down_ok=others_down_ok)
        say(found)
        if dry_run:
            return [f"dry run: would send {REMOVE_SUBJECT} for {target} (peer id {peer_id(target)}); nothing removed"]
        # Again just before: the first answers are two seconds old (a review restarted the node meanwhile).
        await check_removable(nc, me, target, others_down_ok=others_down_ok, gather=0.5)
    checkpoint()  # a stop during the checks, even one they swallowed, ends the command before the removal
    # The commit point: once sent, a stop signal waits for the end (bounded by wait).
    await send_removal(nc, target)
    say(f"sent {REMOVE_SUBJECT} for {target}: the meta leader committed it")
    return await wait_removed(nc, me, target, wait, say)
