"""--tls-cert/--tls-key/--tls-ca: TLS on the embedded NATS client listener."""

from __future__ import annotations

import ssl

import nats
import pytest

from unibus.testing import make_test_ca, make_test_cert


@pytest.mark.parametrize("mutual", [False, True], ids=["server-tls", "mutual-tls"])
async def test_embedded_listener_with_tls(tmp_path, membershipd_factory, mutual):
    pki = tmp_path / "pki"
    ca = make_test_ca(pki, "client-ca")
    server = make_test_cert(pki, "nats-server", ca)
    args = ["--tls-cert", str(server[0]), "--tls-key", str(server[1])]
    if mutual:
        args += ["--tls-ca", str(ca[0])]
    proc = membershipd_factory(*args)
    status, body = proc.healthz()
    assert status == 200 and body["nats"]["connected"] and body["nats"]["jetstream"]
    assert body["nats"]["url"].startswith("tls://")

    seed = str(proc.data_dir / "service.nkey")
    ctx = ssl.create_default_context(cafile=str(ca[0]))
    if mutual:
        client = make_test_cert(pki, "member", ca, server_auth=False)
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    nc = await nats.connect(f"tls://127.0.0.1:{proc.nats_port}", tls=ctx, tls_hostname="localhost", nkeys_seed=seed,
                            tls_handshake_first=True)
    assert nc.is_connected
    await nc.close()
    # plain text is refused on a TLS listener
    with pytest.raises(Exception):
        await nats.connect(f"nats://127.0.0.1:{proc.nats_port}", nkeys_seed=seed, allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=2)
    if mutual:  # and so is a client without a certificate
        bare = ssl.create_default_context(cafile=str(ca[0]))
        with pytest.raises(Exception):
            await nats.connect(f"tls://127.0.0.1:{proc.nats_port}", tls=bare, tls_hostname="localhost",
                               nkeys_seed=seed, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2,
                               tls_handshake_first=True)
