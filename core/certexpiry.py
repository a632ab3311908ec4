"""When the certificates in use expire: ``unibus_tls_certificate_expiry_timestamp_seconds``.

A certificate is read when it is put to use, and only then: the HTTPS and
metrics listeners load theirs once, at start-up; nats-server reads the files
that nats.conf names each time it starts, so they are read again before each
restart. What the gauge shows is therefore what the running processes hold,
not a file renewed on disk since (that one counts once it is loaded, after a
restart). Nothing here knows a plugin: nats.conf's TLS blocks are found by
where nats-server looks for them (``tls``, ``cluster.tls``, ``leafnodes.tls``,
``gateway.tls``, ``websocket.tls``, ``mqtt.tls``), whoever put them there.

An expired certificate keeps established connections up, and fails every new
one (a client's HTTPS request, a route that reconnects after a network fault),
so the alert comes before (deploy/monitoring/unibus-alerts.yml,
docs/operations.md "Certificates").
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .tls import TLSFileError, load_certificates

log = logging.getLogger("unibus.certexpiry")

#: A certificate expiring within this is logged as a warning when it is loaded.
WARN_WITHIN = dt.timedelta(days=14)

#: nats.conf blocks that can hold TLS files, and the ``listener`` label of each.
NATS_TLS_BLOCKS = (((), "nats"), (("cluster",), "route"), (("leafnodes",), "leafnode"),
                   (("gateway",), "gateway"), (("websocket",), "websocket"), (("mqtt",), "mqtt"))
#: The files of a TLS block, and the ``kind`` label of each.
TLS_FILE_KINDS = (("cert_file", "cert"), ("ca_file", "ca"))


def earliest_expiry(path: Path) -> dt.datetime:
    """The earliest ``notAfter`` of the certificates in a PEM file (a chain expires with its first).

    Raises :class:`unibus.tls.TLSFileError` for a file that holds no certificate.
    """
    return min(c.not_valid_after_utc for c in load_certificates(path))


def nats_tls_files(config: Mapping[str, Any]) -> Iterator[tuple[str, str, Path]]:
    """``(listener, kind, path)`` of every certificate and CA file nats.conf makes nats-server read."""
    for where, listener in NATS_TLS_BLOCKS:
        block: Any = config
        for key in where:
            block = block.get(key) if isinstance(block, Mapping) else None
        tls = block.get("tls") if isinstance(block, Mapping) else None
        if not isinstance(tls, Mapping):
            continue
        for key, kind in TLS_FILE_KINDS:
            value = tls.get(key)
            if isinstance(value, str) and value:
                yield listener, kind, Path(value)


class CertificateExpiry:
    """The expiry of each certificate file in use, by ``(listener, kind)``, as Unix seconds."""

    def __init__(self) -> None:
        self.expiry: dict[tuple[str, str], float] = {}

    def loaded(self, listener: str, kind: str, path: Path, *, now: dt.datetime | None = None) -> None:
        """``path`` was (or is about to be) loaded for ``listener``: record when it expires.

        A file that cannot be read drops the series: whoever loads it reports
        why, and a stale figure would be worse than none.
        """
        try:
            when = earliest_expiry(path)
        except (TLSFileError, OSError) as e:
            self.expiry.pop((listener, kind), None)
            log.debug("certificate expiry of %s (%s %s) unknown: %s", path, listener, kind, e)
            return
        self.expiry[(listener, kind)] = when.timestamp()
        left = when - (now or dt.datetime.now(dt.UTC))
        if left <= dt.timedelta(0):
            log.warning("the %s %s %s expired on %s UTC: new %s connections fail to verify it; renew it and restart",
                        listener, _noun(kind), path, f"{when:%Y-%m-%d %H:%M}", listener)
        elif left < WARN_WITHIN:
            log.warning("the %s %s %s expires on %s UTC (in %d day%s): renew it, then restart", listener,
                        _noun(kind), path, f"{when:%Y-%m-%d %H:%M}", left.days, "" if left.days == 1 else "s")

    def loaded_by_nats(self, config: Mapping[str, Any]) -> None:
        """nats-server is about to (re)start with ``config``: the files it reads now."""
        seen = set()
        for listener, kind, path in nats_tls_files(config):
            seen.add((listener, kind))
            self.loaded(listener, kind, path)
        nats_listeners = {name for _where, name in NATS_TLS_BLOCKS}
        for key in [k for k in self.expiry if k[0] in nats_listeners and k not in seen]:
            del self.expiry[key]

    def items(self) -> Iterable[tuple[tuple[str, str], float]]:
        return sorted(self.expiry.items())


def _noun(kind: str) -> str:
    return "CA certificate" if kind == "ca" else "certificate"
