"""When the certificates in use expire (unibus.certexpiry; docs/operations.md, "Certificates").

An expired certificate keeps established connections up and fails every new
one, so nothing breaks on the day until a client connects or a route comes
back after a fault. The operator's side: the gauge names each file in use,
a certificate close to its end is logged when it is loaded, and a file
renewed on disk counts only once the process that uses it has loaded it
(nats-server at its restart), never before: an alert that cleared on a
renewal no one loaded would hide the outage it is there for.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import signal
import ssl
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from unibus.bus import EmbeddedTLS
from unibus.certexpiry import CertificateExpiry, earliest_expiry, nats_tls_files
from unibus.tls import TLSFileError, check_pair
from unibus.testing import MembershipdProcess, free_port, make_test_ca, make_test_cert

EXPIRY = "unibus_tls_certificate_expiry_timestamp_seconds"


def scrape(url: str, context: ssl.SSLContext) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10, context=context) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def test_a_chain_expires_with_its_first_certificate(tmp_path):
    ca = make_test_ca(tmp_path, "ca")  # 30 days
    leaf = make_test_cert(tmp_path, "leaf", ca, valid_for_days=90)
    chain = tmp_path / "chain.crt"
    chain.write_bytes(leaf[0].read_bytes() + ca[0].read_bytes())
    assert earliest_expiry(chain).timestamp() == not_after(ca[0]) < not_after(leaf[0])


def test_every_tls_block_of_nats_conf_is_found_whoever_wrote_it():
    config = {"tls": {"cert_file": "/c/nats.crt", "key_file": "/c/nats.key", "ca_file": "/c/clients.crt"},
              "cluster": {"name": "c", "tls": {"cert_file": "/c/route.crt", "ca_file": "/c/route-ca.crt"}},
              "leafnodes": {"tls": {"cert_file": "/c/leaf.crt"}}, "websocket": {"port": 1},
              "mqtt": "not a block", "gateway": {"tls": "not a block either"}}
    assert sorted(nats_tls_files(config)) == [
        ("leafnode", "cert", Path("/c/leaf.crt")), ("nats", "ca", Path("/c/clients.crt")),
        ("nats", "cert", Path("/c/nats.crt")), ("route", "ca", Path("/c/route-ca.crt")),
        ("route", "cert", Path("/c/route.crt"))]
    assert list(nats_tls_files({"port": 4222})) == []


def test_loading_records_warns_near_the_end_and_forgets_what_it_cannot_read(tmp_path, caplog):
    ca = make_test_ca(tmp_path, "ca")
    soon = make_test_cert(tmp_path, "soon", ca, valid_for_days=5)
    later = make_test_cert(tmp_path, "later", ca, valid_for_days=25)
    expiry = CertificateExpiry()
    with caplog.at_level(logging.WARNING, logger="unibus.certexpiry"):
        expiry.loaded("http", "cert", later[0])
        assert caplog.records == []
        expiry.loaded("http", "cert", soon[0])
        expiry.loaded("nats", "cert", soon[0], now=dt.datetime.now(dt.UTC) + dt.timedelta(days=6))
    assert dict(expiry.items()) == {("http", "cert"): not_after(soon[0]), ("nats", "cert"): not_after(soon[0])}
    first, second = (r.getMessage() for r in caplog.records)
    assert re.fullmatch(rf"the http certificate {re.escape(str(soon[0]))} expires on \S+ \S+ UTC \(in 3 days\): "
                        r"renew it, then restart", first), first
    assert "expired on" in second and "new nats connections fail to verify it" in second
    assert "BEGIN" not in first + second  # a path and a date, never the file's content

    soon[0].write_text("not a certificate")
    expiry.loaded("http", "cert", soon[0])
    assert [key for key, _when in expiry.items()] == [("nats", "cert")]  # no stale figure for http
    # nats.conf no longer has a block: its series go; the listeners outside nats-server stay
    expiry.loaded("metrics", "cert", later[0])
    expiry.loaded_by_nats({"port": 4222})
    assert dict(expiry.items()) == {("metrics", "cert"): not_after(later[0])}


def handshake(client: ssl.SSLContext, cert: tuple[Path, Path]) -> bool:
    """Whether ``client`` completes a TLS handshake with a server presenting ``cert`` (in memory)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, side, out, peer_in in (("c", c, c_out, s_in), ("s", srv, s_out, c_in)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return False
            peer_in.write(out.read())
        if all(done.values()):
            return True
    return False


def test_a_renewed_nats_certificate_is_checked_then_pinned_beside_the_first(tmp_path):
    """What the supervisor runs before it restarts nats-server: a pair that does not match, or an
    expired certificate, leaves the pins as they were and says which flag; a good renewal is
    trusted as well as the first (connections made before it keep working)."""
    ca = make_test_ca(tmp_path, "ca")
    first = make_test_cert(tmp_path, "nats", ca)
    kept = make_test_cert(tmp_path, "nats-first", ca)
    shutil.copyfile(first[0], kept[0])
    shutil.copyfile(first[1], kept[1])
    tls = EmbeddedTLS(first[0], first[1], ca[0])
    assert tls.before_restart() is False  # unchanged
    other = make_test_cert(tmp_path, "other", ca)
    assert not handshake(tls.context, other)
    shutil.copyfile(other[0], first[0])  # the certificate renewed, its key not yet
    with pytest.raises(TLSFileError, match=r"^--tls-key: .* does not match --tls-cert"):
        tls.before_restart()
    old = make_test_cert(tmp_path, "old", ca, valid_from_days=-40, valid_for_days=30)
    shutil.copyfile(old[0], first[0])
    shutil.copyfile(old[1], first[1])
    with pytest.raises(TLSFileError, match=r"^--tls-cert: .* expired on"):
        tls.before_restart()
    assert not handshake(tls.context, other)
    shutil.copyfile(other[0], first[0])
    shutil.copyfile(other[1], first[1])
    assert tls.before_restart() is True
    assert handshake(tls.context, other) and handshake(tls.context, kept)  # the first pin stays
    assert tls.before_restart() is False


def test_only_the_certificate_itself_is_pinned_not_the_rest_of_its_file(tmp_path):
    """Red team: the whole --tls-cert file was pinned. Someone who may write that file (not the
    0600 key) appended a CA of theirs; at the next nats-server restart membershipd trusted it, and
    an impostor on the NATS port got membershipd's logins and its nonce claims. A fullchain file
    (the leaf and its issuing CA) made every certificate of that CA trusted, from start-up on."""
    ca = make_test_ca(tmp_path, "ca")
    nats = make_test_cert(tmp_path, "nats", ca)
    theirs = make_test_ca(tmp_path, "theirs")
    impostor = make_test_cert(tmp_path, "impostor", theirs)
    sibling = make_test_cert(tmp_path, "sibling", ca)  # another certificate of the same CA

    fullchain = tmp_path / "fullchain.crt"
    fullchain.write_bytes(nats[0].read_bytes() + ca[0].read_bytes())
    tls = EmbeddedTLS(fullchain, nats[1], None)
    assert handshake(tls.context, nats) and not handshake(tls.context, sibling)

    tls = EmbeddedTLS(nats[0], nats[1], None)
    with nats[0].open("ab") as f:
        f.write(theirs[0].read_bytes())  # appended: check_pair still sees the same first certificate
    assert tls.before_restart() is False
    assert not handshake(tls.context, impostor) and handshake(tls.context, nats)

    fifo = tmp_path / "fifo.crt"
    os.mkfifo(fifo)
    with pytest.raises(TLSFileError, match=r"^--tls-cert: .*fifo.crt is not a regular file"):
        check_pair("--tls-cert", fifo, "--tls-key", nats[1])  # at once: a FIFO would block the reader


def test_the_gauge_shows_the_files_in_use_and_a_renewal_once_nats_server_loaded_it(tmp_path):
    """A real daemon: HTTPS with a certificate 10 days from its end, TLS with client certificates on
    the NATS listener, a TLS metrics listener. The NATS certificate is renewed on disk: the gauge
    keeps the one nats-server holds until nats-server restarts (killed here; the supervisor starts
    it again) and reads the new one. The HTTPS certificate, loaded once, keeps its figure."""
    pki = tmp_path / "pki"
    ca = make_test_ca(pki, "ca")
    https = make_test_cert(pki, "https", ca, valid_for_days=10)
    nats = make_test_cert(pki, "nats", ca, valid_for_days=20)
    metrics = make_test_cert(pki, "metrics", ca, valid_for_days=25)
    port = free_port()
    daemon = MembershipdProcess(tmp_path / "data", [
        "--http-tls-cert", str(https[0]), "--http-tls-key", str(https[1]),
        "--tls-cert", str(nats[0]), "--tls-key", str(nats[1]), "--tls-ca", str(ca[0]),
        "--metrics-addr", f"127.0.0.1:{port}", "--metrics-tls-cert", str(metrics[0]),
        "--metrics-tls-key", str(metrics[1])], ca=ca[0]).start()
    try:
        url = f"https://127.0.0.1:{port}/metrics"
        scraper = ssl.create_default_context(cafile=str(ca[0]))
        m = scrape(url, scraper)
        shown = {(labels["listener"], labels["kind"]): v for labels, v in
                 ((dict(k[1]), v) for k, v in m.items() if k[0] == EXPIRY)}
        assert shown == {("http", "cert"): not_after(https[0]), ("nats", "cert"): not_after(nats[0]),
                         ("nats", "ca"): not_after(ca[0]), ("metrics", "cert"): not_after(metrics[0])}
        warnings = [line for line in daemon.log_text().splitlines() if "unibus.certexpiry" in line]
        assert len(warnings) == 1 and f"the http certificate {https[0]} expires on" in warnings[0], warnings
        assert re.search(r"\(in [89] days\): renew it, then restart$", warnings[0]), warnings

        renewed = make_test_cert(pki, "renewed", ca, valid_for_days=60)
        before = not_after(nats[0])
        shutil.copyfile(renewed[0], nats[0])
        shutil.copyfile(renewed[1], nats[1])
        m = scrape(url, scraper)
        assert value(m, EXPIRY, listener="nats", kind="cert") == before  # on disk only: not in use yet

        os.kill(daemon.nats_pid(), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = scrape(url, scraper)
            if value(m, "unibus_nats_server_restarts_total") >= 1 and value(m, "unibus_healthy") == 1:
                break
            time.sleep(0.2)
        assert value(m, "unibus_nats_server_restarts_total") >= 1 and value(m, "unibus_healthy") == 1
        assert value(m, EXPIRY, listener="nats", kind="cert") == not_after(renewed[0])
        assert value(m, EXPIRY, listener="http", kind="cert") == not_after(https[0])
    finally:
        daemon.stop()
