"""The client's context-labelled signatures, message envelopes, replay window and replica names (pure).

The test vectors are those of docs/formats.md ("Key packages", "Message
signatures"): one fixed signing key, fixed inputs, the exact bytes signed and
the signature.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from unibus.client.keys import Identity, generate_identity
from unibus.client.replica import replica_root_for, server_id
from unibus.client.sealing import MessageError, encrypt_message
from unibus.client.signed import (
    MSG_ID_HEADER,
    SENDER_HEADER,
    SIG_HEADER,
    TIME_HEADER,
    ReplayGuard,
    message_headers,
    new_msg_id,
    parse_envelope,
    sign_key_packages,
    sign_labelled,
)
from unibus.memberlog import key_package_input, message_input, verify_ed25519

DOCS = Path(__file__).resolve().parents[2] / "docs" / "formats.md"


@pytest.fixture(scope="module")
def fixed() -> Identity:
    """The identity of docs/formats.md's examples: signing seed 00 01 … 1f."""
    return Identity("alice", ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32))), "X25519",
                    bytes(range(32, 64)), ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96))))


KP_BYTES = (b"unibus/room-key/v1\nk3x9q2\n2\nbob\n"
            b"c56705fea5b110b8dc63688533ced21167e628017387c885423b835a55edd5ef\n7\n" + b"ab" * 32)
KP_SIG = ("dc5c6cc219bb1af5fec4f12723fe45aae42a75994603a4406a318b142d35e237"
          "90d8bd25a56ad636118efd0827732257685509d7e7e18c4c26fa8523917c2f01")
MSG_PAYLOAD = base64.b64decode("AAAAAAAAAAAAAAAAcN0uXcJyI98F72X23IjIMn4kTZHD")
MSG_BYTES = (b"unibus/msg/v1\nunibus.room.k3x9q2.chat\n1\nalice\n1796000000123\nAAECAwQFBgcICQoLDA0ODw\n"
             b"5b4c3260126a376a849d44ed5d7e0bb966aeb1e9f885e361b2b6555203120e0e")
MSG_SIG_B64 = "uI5IRS9iCACovFLg06Kuj2ZmhkSvSUG/qNO6jEbOQKfiYmAvgaxDbggVWbXT5up80HruGopFgJ7PUkXsEasaAQ=="


def test_key_package_vector(fixed):
    sealed = bytes(range(80))
    data = key_package_input("k3x9q2", 2, "bob", sealed, 7, "ab" * 32)
    assert data == KP_BYTES
    assert sign_labelled(fixed, data).hex() == KP_SIG
    sigs = sign_key_packages(fixed, "k3x9q2", 2, {"bob": sealed}, 7, "ab" * 32)
    assert base64.b64decode(sigs["bob"]).hex() == KP_SIG
    text = DOCS.read_text()
    assert KP_SIG[:64] in text and KP_SIG[64:] in text and "c56705fea5b110b8dc63688533ced21167e628017387c885423b835a55edd5ef" in text


def test_message_vector(fixed):
    msg_id = base64.urlsafe_b64encode(bytes(range(16))).rstrip(b"=").decode()
    assert msg_id == "AAECAwQFBgcICQoLDA0ODw"
    data = message_input("unibus.room.k3x9q2.chat", 1, "alice", 1796000000123, msg_id, MSG_PAYLOAD)
    assert data == MSG_BYTES
    headers = message_headers(fixed, "unibus.room.k3x9q2.chat", 1, MSG_PAYLOAD, 1796000000123, msg_id)
    assert headers == {"Unibus-Epoch": "1", "Unibus-Sender": "alice", "Unibus-Time": "1796000000123",
                       "Unibus-Msg-Id": msg_id, "Unibus-Sig": MSG_SIG_B64}
    assert verify_ed25519(fixed.sign_pub, MSG_BYTES, base64.b64decode(MSG_SIG_B64))
    assert MSG_SIG_B64 in DOCS.read_text()


def test_the_signing_key_signs_only_labelled_bytes(fixed):
    for data in (b'"@method": POST\n', b"unibus/room-key/v2\nx", b"", b"xunibus/msg/v1\n"):
        with pytest.raises(ValueError, match="context-labelled"):
            sign_labelled(fixed, data)
    with pytest.raises(ValueError):
        sign_labelled(fixed, "unibus/msg/v1\nx")  # type: ignore[arg-type]
    # a key package signature is no message signature, and the other way round
    sig = sign_labelled(fixed, KP_BYTES)
    assert not verify_ed25519(fixed.sign_pub, MSG_BYTES, sig)


def test_envelope_round_trip_and_each_bad_header():
    alice = generate_identity("alice")
    subject = "unibus.room.r1.chat"
    payload = encrypt_message(bytes(32), subject, 3, b"hi")
    now = int(time.time() * 1000)
    headers = message_headers(alice, subject, 3, payload, now)
    env = parse_envelope(headers)
    assert (env.epoch, env.sender, env.time_ms, env.msg_id) == (3, "alice", now, headers[MSG_ID_HEADER])
    assert verify_ed25519(alice.sign_pub, env.signed_bytes(subject, payload), env.sig)
    assert not verify_ed25519(alice.sign_pub, env.signed_bytes("unibus.room.r1.other", payload), env.sig)
    bad = {
        SENDER_HEADER: ["", "Alice", "alice\n", None],
        TIME_HEADER: ["", "-1", "01", "1.5", "99999999999999999", None],
        MSG_ID_HEADER: ["", "AAECAwQFBgcICQoLDA0ODx", "AAECAwQFBgcICQoLDA0ODw==", "AAECAwQFBgcICQoLDA0OD+", None],
        SIG_HEADER: ["", base64.b64encode(b"x" * 63).decode(), base64.urlsafe_b64encode(b"\xff" * 64).decode(),
                     None],
        "Unibus-Epoch": ["", "01", None],
    }
    for name, values in bad.items():
        for value in values:
            changed = dict(headers)
            if value is None:
                del changed[name]
            else:
                changed[name] = value
            with pytest.raises(MessageError, match=name):
                parse_envelope(changed)


def test_msg_ids_are_16_random_bytes():
    ids = {new_msg_id() for _ in range(200)}
    assert len(ids) == 200
    for i in ids:
        assert len(i) == 22 and len(base64.urlsafe_b64decode(i + "==")) == 16


def test_replay_guard_forgets_ids_outside_the_window():
    guard = ReplayGuard(1000)
    now = 10_000_000
    assert guard.fresh(now - 1000, now) and guard.fresh(now + 1000, now) and not guard.fresh(now - 1001, now)
    guard.add("a", now, now)
    assert "a" in guard
    for i in range(5000):  # a long run: only the ids of the last window stay
        t = now + i * 10
        guard.add(f"id{i}", t, t)
    assert "a" not in guard and "id4999" in guard
    assert len(guard) <= 102


def test_server_ids_are_readable_safe_and_distinct():
    assert server_id("http://127.0.0.1:8470") == "http_127.0.0.1_8470"
    assert server_id("https://Unibus.Example/") == server_id("https://unibus.example:443") == "https_unibus.example_443"
    assert server_id("https://[::1]:8470") == "https_%3a%3a1_8470"
    assert len({server_id("https://h/a_b"), server_id("https://h_a/b"), server_id("https://h/a%2Fb"),
                server_id("https://h/a/b"), server_id("https://h/a%25")}) == 5
    assert server_id("https://h/a%5fb") == server_id("https://h/a_b")  # the same URL (RFC 3986 6.2.2.2)
    long = server_id("https://h/" + "x" * 500)
    assert len(long) <= 200 and long.startswith("https_h_443_%2fxxx")
    assert replica_root_for("~/id.json").name == "id.json.log"
    with pytest.raises(ValueError):
        server_id("ftp://h")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["http", "https"]),
                          st.from_regex(r"[a-z0-9_-]{1,8}(\.[a-z0-9_-]{1,8}){0,2}", fullmatch=True),
                          st.integers(1, 65535), st.from_regex(r"(/[a-zA-Z0-9_~-]{0,6}){0,3}", fullmatch=True)),
                min_size=2, max_size=2, unique=True))
def test_server_ids_never_collide(urls):
    names = []
    for scheme, host, port, path in urls:
        name = server_id(f"{scheme}://{host}:{port}{path}")
        assert "/" not in name and name not in (".", "..") and "\0" not in name
        names.append((name, (scheme, host, port, path.rstrip("/"))))
    (n1, k1), (n2, k2) = names
    assert (n1 == n2) == (k1 == k2)


def test_the_message_input_binds_every_field():
    base = ("unibus.room.r1.t", 1, "alice", 5, "AAECAwQFBgcICQoLDA0ODw", b"p")
    seen = {hashlib.sha256(message_input(*base)).digest()}
    for i, other in enumerate(("unibus.room.r1.u", 2, "bob", 6, "AQECAwQFBgcICQoLDA0ODw", b"q")):
        changed = list(base)
        changed[i] = other
        seen.add(hashlib.sha256(message_input(*changed)).digest())
    assert len(seen) == 7
