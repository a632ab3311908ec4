"""The nats-server configuration as data, and the one renderer that writes it.

The configuration is a plain dict until :func:`write_config` serialises it as
JSON (a format nats-server reads natively) into ``<data-dir>/nats.conf`` with
mode 0600. Plugins mutate the dict in their ``configure_nats`` hook; they never
format config text. These rules are enforced here, after every plugin ran:

* the monitoring endpoint, if any, listens on 127.0.0.1 only (it has no
  authentication);
* JetStream fsyncs every write before it acknowledges it
  (``sync_interval: always``, :data:`JETSTREAM_SYNC`), whatever a plugin wrote:
  an acknowledged write survives a power cut of every node
  (docs/operations.md, "Durability");
* the facts the posture reports about nats-server's listeners still hold
  (:func:`check_posture_facts`): the client listener where the flags put it,
  with the TLS the core wrote; a clustered node's routes on mutual TLS; no
  other listener. The posture is computed from the flags, so a plugin that
  undid any of that would make ``/healthz`` and the cluster gate vouch for a
  server that is not there: refused (exit 2) rather than repaired, because
  the plugin that wrote it is broken or hostile;
* secrets the plugins never saw (the route password) are injected last.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from .errors import ConfigError, RuntimeFailure
from .privatefiles import write_private_file
from .settings import Settings, require_route_password

log = logging.getLogger("unibus.natsconf")

MONITOR_HOST = "127.0.0.1"
#: ``jetstream.sync_interval``: ``always`` makes nats-server fsync a stream's
#: block (R1) or its Raft log (replicated streams) before it acknowledges a
#: write; its default (2 min) acknowledges writes that are still only in the
#: page cache. Server-wide only (no stream can ask for it), and not reloadable:
#: it is written at start and stays for the life of the process.
#: docs/operations.md, "Durability".
JETSTREAM_SYNC = "always"
#: nats-server's TLS-first mode on the client listener, without fallback: every client must
#: start with the TLS handshake, and a classic client that waits for a plaintext INFO fails to
#: connect (nats-server logs so at start). ``auto`` or a duration would add a fallback that
#: sends INFO in clear (opts.go parseTLS sets a fallback delay only for those).
HANDSHAKE_FIRST = True
# nats-server keys that open the monitoring endpoint.
_MONITOR_KEYS = ("http", "http_port", "monitor_port", "https", "https_port")


def base_config(settings: Settings) -> dict[str, Any]:
    """The core's part of the configuration: identity, listener, JetStream, cluster.

    Who may connect, and in which account, is bus authorization's to write
    (the auth_enforce plugin, docs/bus-auth.md); without it nats-server runs
    one open global account.
    """
    config: dict[str, Any] = {
        "server_name": settings.server_name,
        "host": settings.nats_addr.host,
        "port": settings.nats_addr.port,
        "jetstream": {"store_dir": str((settings.data_dir / "jetstream").resolve()),
                      "sync_interval": JETSTREAM_SYNC},
        # Log without colours or a PID prefix clash; membershipd forwards lines.
        "logtime": True,
        "debug": False,
        "trace": False,
    }
    if settings.tls_cert:
        # handshake_first: every client starts with the TLS handshake (unibus's own do,
        # docs/operations.md "Listeners and TLS"), so none reads a plaintext INFO that a
        # man in the middle could strip tls_required from. Not "auto": its short wait
        # for a ClientHello sent INFO in clear to unibus clients on a busy host, which
        # then failed their handshake.
        tls: dict[str, Any] = {"cert_file": str(settings.tls_cert), "key_file": str(settings.tls_key),
                               "handshake_first": HANDSHAKE_FIRST}
        if settings.tls_ca:
            tls["ca_file"] = str(settings.tls_ca)
            tls["verify"] = True
        config["tls"] = tls
    if settings.cluster_name:
        config["cluster"] = {
            "name": settings.cluster_name,
            "host": settings.cluster_addr.host,
            "port": settings.cluster_addr.port,
            "routes": list(settings.routes),
            # Clients reach the servers /v1/bus names; no gossip of other nodes' URLs.
            "no_advertise": True,
        }
    return config


def _monitor_port(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.rsplit(":", 1)[-1].isdigit():
        return int(value.rsplit(":", 1)[-1])
    return None


def enforce_loopback_monitor(config: dict[str, Any]) -> None:
    """Pin any monitoring listener to 127.0.0.1 (docs/nats-monitor.md); drop HTTPS variants.

    Whatever a flag, the environment or a plugin wrote, the only monitor
    membershipd lets nats-server open is plain HTTP on loopback. nats-server
    reads config keys case-insensitively, so every spelling is caught.
    """
    port: int | None = None
    for key in [k for k in config if isinstance(k, str) and k.lower() in _MONITOR_KEYS + ("http_base_path",)]:
        value = config.pop(key)
        low = key.lower()
        if low in ("https", "https_port", "http_base_path"):
            log.warning("monitor setting %s removed: only a plain loopback monitor is allowed", key)
            continue
        candidate = _monitor_port(value)
        if candidate is None:
            log.warning("ignoring monitor setting %s=%r: not a port or HOST:PORT", key, value)
            continue
        if port is None or low == "http":
            port = candidate
        if value != f"{MONITOR_HOST}:{candidate}":
            log.warning("monitor setting %s=%r pinned to %s:%d: the endpoint has no authentication",
                        key, value, MONITOR_HOST, candidate)
    if port is not None:
        config["http"] = f"{MONITOR_HOST}:{port}"


def enforce_sync_always(config: dict[str, Any]) -> None:
    """Pin ``jetstream.sync_interval`` to :data:`JETSTREAM_SYNC` (docs/operations.md, "Durability").

    A plugin may add to the JetStream block but not make acknowledged writes
    lazy again; nats-server reads keys case-insensitively and takes ``sync``
    as an alias, so every spelling is replaced.
    """
    js = config.get("jetstream")
    if not isinstance(js, dict):
        return
    for key in [k for k in js if isinstance(k, str) and k.lower() in ("sync", "sync_interval")]:
        value = js.pop(key)
        if value != JETSTREAM_SYNC or key != "sync_interval":
            log.warning("jetstream setting %s=%r replaced by sync_interval=%r: acknowledged writes are fsynced "
                        "(docs/operations.md, Durability)", key, value, JETSTREAM_SYNC)
    js["sync_interval"] = JETSTREAM_SYNC


# -- the posture's facts, checked against the config actually written ----------------
#
# Key spellings, from nats-server's own parser (github.com/nats-io/nats-server, server/opts.go
# on main at 2.15.0-dev; the venv runs v2.15.1): every level lowercases its keys before
# matching them (processConfigFileLine, parseCluster, parseTLS: ``switch strings.ToLower(k)``).
# Checked with ``nats-server -t`` of v2.15.1: ``prof_port``, ``PROF_PORT``, ``ws``,
# ``WebSocket``, ``mqtt``, ``leaf``, ``LeafNodes``, ``gateway``, ``listen``, ``net``, ``NET``,
# ``allow_non_tls``, ``cluster.net``, ``cluster.listen`` and ``cluster.Listen`` are accepted;
# ``profport``, ``profile``, ``leafnode``, ``gateways`` and ``include`` are refused as unknown
# fields, so they open nothing. Two spellings of one key (``host`` and ``HOST``) are both kept:
# nats-server applies them in the order it ranges over its Go map, which is unspecified (in 12
# runs of v2.15.1 the one written last won), so a second spelling is refused, never guessed.

#: Top-level keys that move the client listener: ``listen`` (HOST:PORT), ``host``/``net``, ``port``.
_CLIENT_ADDR_KEYS = ("listen", "host", "net", "port")
#: The same in the ``cluster`` block (parseCluster): the route listener.
_ROUTE_ADDR_KEYS = ("listen", "host", "net", "port")
#: Top-level keys that open a listener (or a link) no posture fact covers: WebSocket and MQTT
#: client listeners (``websocket: {no_tls: true}`` is plaintext), leaf node and gateway
#: listeners and links, and the Go profiler (pprof over plain HTTP, on the client ``host``).
_EXTRA_LISTENER_KEYS = ("websocket", "ws", "mqtt", "leaf", "leafnodes", "gateway", "prof_port")
#: Keys a plugin may add to a ``tls`` block the core relies on: none of them weakens it.
#: ``timeout`` (handshake), ``pinned_certs`` and ``connection_rate_limit`` only restrict,
#: ``min_version`` cannot go below 1.2 (parseTLSVersion refuses it), ``ocsp_peer`` adds a check.
#: Anything else (``insecure``, ``cipher_suites``, ``allow_insecure_cipher_suites``, ``certs``,
#: ``cert_store``, ``verify_and_map``, the ``first``/``immediate`` aliases of
#: ``handshake_first``...) is refused: fail closed on what this list does not know.
_TLS_ADDITIONS = frozenset({"timeout", "pinned_certs", "connection_rate_limit", "min_version", "ocsp_peer"})
#: What route_tls writes in ``cluster.tls`` (plugins/route_tls): the route CA, and verification on.
_ROUTE_TLS_KEYS = frozenset({"cert_file", "key_file", "ca_file", "verify"})
#: The route_tls flags' option names and the ``cluster.tls`` key each must fill.
_ROUTE_TLS_OPTIONS = {"cert_file": "route_tls_cert", "key_file": "route_tls_key", "ca_file": "route_tls_ca"}


def _refusal(key: str, problem: str) -> ConfigError:
    return ConfigError(
        f"nats.conf: {key} {problem}, so the posture (and the cluster gate) would not describe the server; the "
        "likely cause is a plugin's configure_nats hook: fix that plugin or block it with --disable-plugin NAME "
        "(membershipd plugins lists them)")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _spellings(block: dict[str, Any], names: tuple[str, ...] | frozenset[str]) -> list[str]:
    """The keys of ``block`` nats-server reads as one of ``names`` (it lowercases keys)."""
    return [k for k in block if isinstance(k, str) and k.lower() in names]


def _one_block(block: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    """``block[name]``, refusing a second spelling of it or a value that is not a block; None if absent."""
    keys = _spellings(block, (name,))
    if not keys:
        return None
    if keys != [name]:
        raise _refusal(where, f"is spelled {', '.join(sorted(map(repr, keys)))} (nats-server reads keys "
                       "case-insensitively; which one wins is unspecified)")
    value = block[name]
    if not isinstance(value, dict):
        raise _refusal(where, f"is a {type(value).__name__}, not a block")
    return value


def _check_address(block: dict[str, Any], keys: tuple[str, ...], expected: dict[str, Any], where: str) -> None:
    """``block`` sets its listener with exactly the core's ``host`` and ``port``, nothing else."""
    for key in _spellings(block, keys):
        if key not in expected:
            raise _refusal(f"{where}{key}", f"moves the listener the core put at {expected['host']}:{expected['port']}")
    for key, value in expected.items():
        if key not in block:
            raise _refusal(f"{where}{key}", "was removed (the core wrote it from the flags)")
        if not _same(block[key], value):
            raise _refusal(f"{where}{key}", f"is {block[key]!r}, not {value!r} as the flags say")


def _check_tls(tls: dict[str, Any], core: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    """Every key the core wrote is still there with its value; additions only from ``allowed``."""
    for key in tls:
        if key not in core and key not in allowed:
            raise _refusal(f"{where}.{key}", "is not a setting a plugin may add to a TLS block membershipd relies on")
    for key, value in core.items():
        if key not in tls:
            raise _refusal(f"{where}.{key}", "was removed")
        if not _same(tls[key], value):
            raise _refusal(f"{where}.{key}", f"is {tls[key]!r}, not {value!r}")


def check_posture_facts(config: dict[str, Any], settings: Settings) -> None:
    """Refuse (exit 2) a config whose listeners differ from what the posture says of them.

    The posture's ``nats`` and ``routes`` listeners, and with them ``tls``, are
    computed from the flags (unibus.posture), not from the config; this holds
    the config to the flags after every plugin's ``configure_nats`` ran:

    * the client listener is where ``base_config`` put it (``host``, ``port``;
      no ``listen`` or ``net``), and the client ``tls`` block ``--tls-cert``
      wrote keeps its certificate, key, ``handshake_first: true`` and, with
      ``--tls-ca``, ``ca_file`` and ``verify: true``. ``allow_non_tls: true``
      is refused too: ``handshake_first: true`` overrides it today (server.go),
      but its only use is to let clients in without TLS. A ``tls`` block the
      flags did not ask for only adds TLS to a listener the posture calls
      ``loopback`` or ``plaintext``, and may stay;
    * a clustered node's ``cluster`` listens where ``--cluster-addr`` says,
      and ``cluster.tls`` has a certificate, a key, a ``ca_file`` (without
      one, nats-server checks route peers against the system's roots: a
      certificate from any CA the host trusts would join) and ``verify: true``
      (nats-server verifies route peers whatever it says, opts.go
      getTLSConfig, but the block must say what the posture reports), the
      route_tls flags' files when they are given (a plugin cannot swap the
      route CA for the client CA route_tls refuses), and nothing that weakens
      it (``insecure: true`` skips the check of the routes this node dials:
      route.go warns "will not be verified"). An unclustered node has no
      ``cluster`` at all;
    * no other listener: see :data:`_EXTRA_LISTENER_KEYS` (the monitor is
      pinned to loopback by :func:`enforce_loopback_monitor` instead).
    """
    core = base_config(settings)
    for key in _spellings(config, _EXTRA_LISTENER_KEYS):
        raise _refusal(key, "opens a listener that no posture fact covers")
    for key in _spellings(config, ("allow_non_tls",)):
        if config[key] is not False:
            raise _refusal(key, "lets clients of the NATS listener in without TLS")
    _check_address(config, _CLIENT_ADDR_KEYS, {"host": core["host"], "port": core["port"]}, "")
    tls = _one_block(config, "tls", "tls")
    if "tls" in core:
        if tls is None:
            raise _refusal("tls", "was removed: the NATS listener would take clients in clear (--tls-cert asks for TLS)")
        additions = _TLS_ADDITIONS if "verify" in core["tls"] else _TLS_ADDITIONS | {"ca_file", "verify"}
        _check_tls(tls, core["tls"], additions, "tls")
    cluster = _one_block(config, "cluster", "cluster")
    if "cluster" not in core:
        if cluster is not None:
            raise _refusal("cluster", "opens a route listener on a node without --cluster-name")
        return
    if cluster is None:
        raise _refusal("cluster", "was removed (--cluster-name asks for it)")
    route_addr = {"host": core["cluster"]["host"], "port": core["cluster"]["port"]}
    _check_address(cluster, _ROUTE_ADDR_KEYS, route_addr, "cluster.")
    route_tls = _one_block(cluster, "tls", "cluster.tls")
    if route_tls is None:
        raise _refusal("cluster.tls", "is missing: the routes would run in clear, not on mutual TLS")
    if route_tls.get("verify") is not True:
        state = f"is {route_tls['verify']!r}" if "verify" in route_tls else "is missing"
        raise _refusal("cluster.tls.verify", f"{state}, not true: the routes must verify their peers")
    for key, option in _ROUTE_TLS_OPTIONS.items():
        value = route_tls.get(key)
        if not (isinstance(value, str) and value):
            raise _refusal(f"cluster.tls.{key}", "is missing: mutual route TLS needs a certificate, its key and "
                           "the route CA")
        flag = settings.option(option)
        if flag is not None and value != str(flag):
            raise _refusal(f"cluster.tls.{key}", f"is {value!r}, not {str(flag)!r} as --{option.replace('_', '-')} says")
    for key in route_tls:
        if key not in _ROUTE_TLS_KEYS and key not in _TLS_ADDITIONS:
            raise _refusal(f"cluster.tls.{key}", "is not a setting a plugin may add to the route TLS block")


def finalize_config(config: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Apply the core's invariants to a freshly built, plugin-mutated config, in place.

    Raises :class:`ConfigError` when the config no longer matches the posture
    (:func:`check_posture_facts`).
    """
    require_route_password(settings)  # serve refused it already, after the cluster gate: a backstop
    final = config
    enforce_loopback_monitor(final)
    enforce_sync_always(final)
    check_posture_facts(final, settings)
    if settings.cluster_name and settings.cluster_pass is not None:
        cluster = final.setdefault("cluster", {})
        cluster["authorization"] = {"user": "route", "password": settings.cluster_pass.reveal()}
        # Explicit routes must carry the credentials in their URL (they dial out).
        cluster["routes"] = [
            _with_credentials(url, "route", settings.cluster_pass.reveal()) for url in cluster.get("routes", [])
        ]
    return final


def _with_credentials(url: str, user: str, password: str) -> str:
    from urllib.parse import quote

    scheme, rest = url.split("://", 1)
    return f"nats-route://{quote(user, safe='')}:{quote(password, safe='')}@{rest}"


def render_config(config: dict[str, Any]) -> str:
    """The one renderer: the config dict as the JSON text nats-server reads."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def write_config(config: dict[str, Any] | str, path: Path) -> None:
    """Write the config (a dict, or its rendered text) atomically, mode 0600 from the first byte."""
    text = config if isinstance(config, str) else render_config(config)
    write_private_file(path, text.encode())


def check_config(binary: Path, path: Path, timeout: float = 10.0) -> None:
    """Run ``nats-server -t -c PATH``; raise RuntimeFailure with its complaint."""
    try:
        proc = subprocess.run(
            [str(binary), "-t", "-c", str(path)], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeFailure(f"could not check {path} with {binary}: {e}") from e
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeFailure(f"nats-server rejected {path}: {msg[-1] if msg else proc.returncode}")


def jetstream_account(config: dict[str, Any]) -> str | None:
    """The one named account a config gives JetStream to, or None (the global account ``$G``).

    With accounts configured, nats-server enables JetStream only for the
    accounts that ask for it; their streams live in ``<store_dir>/jetstream/<account>``.
    """
    accounts = config.get("accounts")
    if not isinstance(accounts, dict):
        return None
    named = [name for name, acc in accounts.items()
             if isinstance(acc, dict) and acc.get("jetstream") not in (None, False, "disabled")]
    return named[0] if len(named) == 1 else None


def _refuse_clustered_global(old: Path, target: str | None) -> ConfigError:
    where = f"the {target} account" if target else "an account of its own"
    return ConfigError(
        f"--data-dir: {old} holds JetStream data of unibus 0.11 (global account), which a clustered 0.12 "
        f"node keeps in {where}; follow docs/operations.md, section 'Upgrading from 0.11' "
        "(clusters), before starting this node")


def check_clustered_global_jetstream(settings: Settings) -> None:
    """Before anything of a clustered node's data directory is changed (its database is migrated
    first): refuse 0.11 JetStream data in the global account, as :func:`adopt_global_jetstream`
    does once the config is known. A 0.12 node keeps no stream in ``$G``, so streams there, and
    no account directory beside it, are 0.11's. The refusal came after the migration of
    ``membershipd.db``, which 0.11 could no longer open (an upgrade rehearsal)."""
    if not settings.clustered:
        return
    root = settings.data_dir / "jetstream" / "jetstream"
    old = root / "$G"
    if not old.is_dir() or not any((old / "streams").glob("*")):
        return
    if any(d.is_dir() and d.name not in ("$G", "$SYS") for d in root.iterdir()):
        return  # an account directory of 0.12's is there: adopt_global_jetstream decides
    raise _refuse_clustered_global(old, None)


def adopt_global_jetstream(settings: Settings, config: dict[str, Any]) -> str | None:
    """Move a 0.11 node's JetStream data from the global account into the config's account.

    0.11 kept its buckets in nats-server's global account (``$G``); 0.12 puts
    them in a named account (docs/bus-auth.md). On a single node the stream
    files move with their directory: ``jetstream/jetstream/$G`` becomes
    ``jetstream/jetstream/<account>`` before nats-server starts, when the
    latter does not exist yet. A clustered node cannot do that (its JetStream
    meta group records each stream's account), so it refuses to start and
    names the upgrade procedure (docs/operations.md#upgrading-from-011).
    Returns what was done, for the log, or None.
    """
    target = jetstream_account(config)
    if target is None:
        return None
    root = settings.data_dir / "jetstream" / "jetstream"
    old, new = root / "$G", root / target
    if not old.is_dir() or new.exists():
        return None
    if not any((old / "streams").glob("*")):
        return None  # nothing to carry over
    if settings.clustered:
        raise _refuse_clustered_global(old, target)
    os.rename(old, new)
    return f"moved the 0.11 JetStream data {old} to {new} (account {target})"
