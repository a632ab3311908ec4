#!/bin/sh
# check-r3-current.sh: is JetStream on this node reconverged?
#
# Reads the loopback NATS monitor (UNIBUS_NATS_MONITOR=1) at
#   http://127.0.0.1:${PORT:-8222}
# (or at the base URLs given as arguments, e.g. SSH tunnels to other nodes) and
# exits 0 only when all of these hold:
#   * the JetStream meta group and every stream with replicas > 1 have a leader
#     (an R1 stream counts as fine: it has no followers, and it is not HA);
#   * on a stream's leader: all its replicas (2 of 2 for R3) report
#     current=true and are not offline, and none is missing;
#   * on a follower: the leader's entry is current and not offline (this node
#     hears from the leader);
#   * nats-server's own /healthz on each queried node is ok (that node's
#     replicas of every stream and consumer are current).
#
# Why the leader matters: only the stream leader tracks its followers. In a
# follower's /jsz the *other* followers show current=false/active=0 all the
# time. So a stream's full "2/2 current" can only be read on its leader.
# Running this script on every node (all exit 0) therefore means every stream
# has 2/2 current followers. A stream whose leader was not queried is listed as
# "followers-unverified" and does not fail the check unless you pass --strict.
#
# Usage: check-r3-current.sh [--wait SECONDS] [--interval SECONDS] [--strict]
#                            [--quiet] [BASE_URL ...]
#   --wait S      poll until the check passes (twice in a row) or S seconds pass
#   --strict      also fail streams whose leader view was not available
# Exit codes: 0 converged; 1 not converged; 2 monitor unreachable or bad usage.
# Needs only POSIX sh and python3 (standard library).
exec python3 - "$@" <<'PY'
import json
import os
import sys
import time
import urllib.error
import urllib.request

USAGE = "usage: check-r3-current.sh [--wait SECONDS] [--interval SECONDS] [--strict] [--quiet] [BASE_URL ...]"
JSZ = "/jsz?accounts=true&streams=true&config=true"


class Unreachable(Exception):
    pass


def parse_args(argv):
    opts = {"wait": None, "interval": 2.0, "strict": False, "quiet": False, "urls": []}
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        elif a in ("--wait", "--interval"):
            v = next(it, None)
            try:
                opts[a[2:]] = float(v)
            except (TypeError, ValueError):
                print(f"check-r3-current: {a} needs a number of seconds\n{USAGE}", file=sys.stderr)
                sys.exit(2)
        elif a == "--strict":
            opts["strict"] = True
        elif a in ("-q", "--quiet"):
            opts["quiet"] = True
        elif a.startswith("-"):
            print(f"check-r3-current: unknown option {a}\n{USAGE}", file=sys.stderr)
            sys.exit(2)
        else:
            opts["urls"].append(a.rstrip("/"))
    if not opts["urls"]:
        port = os.environ.get("PORT") or "8222"
        opts["urls"] = [f"http://127.0.0.1:{port}"]
    return opts


def fetch(url, allow_status=()):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        if e.code in allow_status:
            try:
                return e.code, json.load(e)
            except ValueError:
                return e.code, {}
        raise Unreachable(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Unreachable(f"{url}: {getattr(e, 'reason', e)}") from None


def groups(jsz):
    """Yield (key, display name, replicas R, cluster dict) for the meta group and each stream."""
    meta = jsz.get("meta_cluster")
    if meta:
        size = meta.get("cluster_size") or len(meta.get("replicas") or []) + 1
        yield ("$meta", "JetStream meta group", size, meta)
    for acc in jsz.get("account_details") or []:
        for st in acc.get("stream_detail") or []:
            cl = st.get("cluster") or {}
            cfg = st.get("config") or {}
            r = cfg.get("num_replicas") or len(cl.get("replicas") or []) + 1
            key = f"{acc.get('name')}/{st.get('name')}"
            yield (key, f"stream {st.get('name')} (account {acc.get('name')})", r, cl)


def check_once(urls):
    problems = []  # failing facts
    leader_views = {}  # key -> True when some queried node is the leader
    replicated = {}  # key -> (display, leader)
    infos = []
    for base in urls:
        status, varz = fetch(base + "/varz")
        me = varz.get("server_name") or varz.get("server_id")
        _, jsz = fetch(base + JSZ)
        hstatus, health = fetch(base + "/healthz", allow_status=(503,))
        if hstatus != 200 or health.get("status") != "ok":
            problems.append(f"{me}: nats-server /healthz: {health.get('error') or health.get('status') or hstatus}")
        for key, name, r, cl in groups(jsz):
            if r <= 1:
                infos.append(f"{me}: {name}: R1 (no followers; not HA)")
                continue
            leader = cl.get("leader") or ""
            replicated[key] = (name, leader)
            if not leader:
                problems.append(f"{me}: {name}: R{r} has no leader")
                continue
            peers = [p for p in (cl.get("replicas") or []) if p.get("name") != me]
            if leader == me:
                leader_views[key] = True
                bad = [
                    f"{p.get('name')}(current={p.get('current')}, offline={bool(p.get('offline'))}, lag={p.get('lag', 0)})"
                    for p in peers
                    if p.get("current") is not True or p.get("offline")
                ]
                if len(peers) < r - 1:
                    bad.append(f"only {len(peers)} of {r - 1} followers known")
                if bad:
                    problems.append(f"{me}: {name}: leader {me}, followers not current: {', '.join(bad)}")
                else:
                    infos.append(f"{me}: {name}: leader {me}, {len(peers)}/{r - 1} followers current")
            else:
                lp = next((p for p in peers if p.get("name") == leader), None)
                if lp is None or lp.get("current") is not True or lp.get("offline"):
                    problems.append(f"{me}: {name}: follower not in contact with leader {leader}")
                else:
                    infos.append(f"{me}: {name}: follower of {leader}, leader current")
    unverified = [
        f"{name}: followers-unverified (leader {leader} not queried; run this check on {leader})"
        for key, (name, leader) in sorted(replicated.items())
        if leader and key not in leader_views
    ]
    return problems, infos, unverified


def main():
    o = parse_args(sys.argv[1:])
    deadline = None if o["wait"] is None else time.monotonic() + o["wait"]
    passes = 0
    while True:
        try:
            problems, infos, unverified = check_once(o["urls"])
            err = None
        except Unreachable as e:
            problems, infos, unverified, err = [], [], [], str(e)
        failed = bool(err or problems or (o["strict"] and unverified))
        passes = 0 if failed else passes + 1
        needed = 1 if deadline is None else 2
        done = passes >= needed or deadline is None or time.monotonic() >= deadline
        if done:
            if not o["quiet"]:
                for line in infos:
                    print("ok:   " + line)
                for line in unverified:
                    print(("FAIL: " if o["strict"] else "note: ") + line)
                for line in problems:
                    print("FAIL: " + line)
                if err:
                    print("FAIL: monitor unreachable: " + err)
                print("NOT CONVERGED" if failed else "CONVERGED")
            if err:
                return 2
            return 1 if failed else 0
        time.sleep(o["interval"])


sys.exit(main())
PY
