"""The nats-server configuration as data, and the one renderer that writes it.

The configuration is a plain dict until :func:`write_config` serialises it as
JSON (a format nats-server reads natively) into ``<data-dir>/nats.conf`` with
mode 0600. Plugins mutate the dict in their ``configure_nats`` hook; they never
format config text. Two rules are enforced here, after every plugin ran:

* the monitoring endpoint, if any, listens on 127.0.0.1 only (it has no
  authentication);
* JetStream fsyncs every write before it acknowledges it
  (``sync_interval: always``, :data:`JETSTREAM_SYNC`), whatever a plugin wrote:
  an acknowledged write survives a power cut of every node
  (docs/operations.md, "Durability");
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
from .settings import Settings

log = logging.getLogger("unibus.natsconf")

MONITOR_HOST = "127.0.0.1"
#: ``jetstream.sync_interval``: ``always`` makes nats-server fsync a stream's
#: block (R1) or its Raft log (replicated streams) before it acknowledges a
#: write; its default (2 min) acknowledges writes that are still only in the
#: page cache. Server-wide only (no stream can ask for it), and not reloadable:
#: it is written at start and stays for the life of the process.
#: docs/operations.md, "Durability".
JETSTREAM_SYNC = "always"
#: nats-server's TLS-first mode on the client listener, with fallback for classic clients.
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


def finalize_config(config: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Apply the core's invariants to a freshly built, plugin-mutated config, in place."""
    final = config
    enforce_loopback_monitor(final)
    enforce_sync_always(final)
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
        raise ConfigError(
            f"--data-dir: {old} holds JetStream data of unibus 0.11 (global account), which a clustered 0.12 "
            f"node keeps in the {target} account; follow docs/operations.md, section 'Upgrading from 0.11' "
            "(clusters), before starting this node")
    os.rename(old, new)
    return f"moved the 0.11 JetStream data {old} to {new} (account {target})"
