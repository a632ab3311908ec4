"""unibus.client.sealing: sealed room keys and room messages (docs/formats.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from unibus.client import sealing
from unibus.client.keys import ENC_SUITES, KeyFormatError, generate_identity
from unibus.client.sealing import (
    EPOCH_HEADER,
    MessageError,
    SealError,
    decrypt_message,
    encrypt_message,
    open_room_key,
    room_key_info,
    room_subject,
    seal_room_key,
)

IDS = {suite: generate_identity("alice", suite) for suite in ENC_SUITES}
OTHER = {suite: generate_identity("bob", suite) for suite in ENC_SUITES}
ROOM_KEY = bytes(range(32))


# ============================================================== independent HPKE opener (RFC 9180, base mode)
# Written from the RFCs/drafts, using only hmac/hashlib and raw X25519 / ML-KEM
# primitives: proves docs/formats.md is enough to interoperate.


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, n: int) -> bytes:
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:n]


def _lextract(sid, salt, label, ikm):
    return _extract(salt, b"HPKE-v1" + sid + label + ikm)


def _lexpand(sid, prk, label, info, n):
    return _expand(prk, struct.pack(">H", n) + b"HPKE-v1" + sid + label + info, n)


def ref_open(sealed: bytes, identity, info: bytes) -> bytes:
    if identity.enc_suite == "X25519":
        kem_id, nenc = 0x0020, 32
        enc, ct = sealed[:nenc], sealed[nenc:]
        sk = x25519.X25519PrivateKey.from_private_bytes(identity.enc_key)
        dh = sk.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
        ksid = b"KEM" + struct.pack(">H", kem_id)
        prk = _lextract(ksid, b"", b"eae_prk", dh)
        shared = _lexpand(ksid, prk, b"shared_secret", enc + identity.enc_pub, 32)
    else:
        from cryptography.hazmat.primitives.asymmetric import mlkem

        kem_id, nenc = 0x647A, 1120
        enc, ct = sealed[:nenc], sealed[nenc:]
        expanded = hashlib.shake_256(identity.enc_key).digest(96)  # X-Wing seed expansion
        msk = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
        xsk = x25519.X25519PrivateKey.from_private_bytes(expanded[64:])
        ct_m, ct_x = enc[:1088], enc[1088:]
        ss_m = msk.decapsulate(ct_m)
        ss_x = xsk.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
        pk_x = identity.enc_pub[1184:]
        shared = hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + b"\\.//^\\").digest()
    sid = b"HPKE" + struct.pack(">HHH", kem_id, 0x0001, 0x0003)
    ctx = b"\x00" + _lextract(sid, b"", b"psk_id_hash", b"") + _lextract(sid, b"", b"info_hash", info)
    secret = _lextract(sid, shared, b"secret", b"")
    key = _lexpand(sid, secret, b"key", ctx, 32)
    nonce = _lexpand(sid, secret, b"base_nonce", ctx, 12)
    return ChaCha20Poly1305(key).decrypt(nonce, ct, b"")


# ============================================================== room key info


def test_room_key_info_exact():
    assert room_key_info("abc123", 0) == b"unibus/room-key/v1|abc123|0"
    assert room_key_info("r", 42) == b"unibus/room-key/v1|r|42"
    assert room_key_info("a" * 40, 10**12) == b"unibus/room-key/v1|" + b"a" * 40 + b"|1000000000000"


@pytest.mark.parametrize("room", ["", "A", "a|b", "a.b", "a" * 41, "é", None, b"abc"])
def test_room_key_info_rejects_room(room):
    with pytest.raises(ValueError, match="room id"):
        room_key_info(room, 1)


@pytest.mark.parametrize("epoch", [-1, 1.0, "1", True, None])
def test_room_key_info_rejects_epoch(epoch):
    with pytest.raises(ValueError, match="epoch"):
        room_key_info("abc", epoch)


# ============================================================== sealing


def test_sizes():
    assert hpke.KEM.X25519.enc_length() == 32
    assert hpke.KEM.MLKEM768_X25519.enc_length() == 1088 + 32
    assert sealing.ENC_SIZES == {"X25519": 32, "MLKEM768_X25519": 1120}
    assert sealing.SEALED_SIZES == {"X25519": 32 + 32 + 16, "MLKEM768_X25519": 1120 + 32 + 16}


@pytest.mark.parametrize("suite", ENC_SUITES)
def test_seal_open_roundtrip(suite):
    ident = IDS[suite]
    key = sealing.new_room_key()
    sealed = seal_room_key(key, ident.enc_pub, suite, "room1", 3)
    assert len(sealed) == sealing.ENC_SIZES[suite] + 32 + 16
    assert open_room_key(sealed, ident, "room1", 3) == key
    # randomized: sealing twice gives different values that both open
    again = seal_room_key(key, ident.enc_pub, suite, "room1", 3)
    assert again != sealed and open_room_key(again, ident, "room1", 3) == key


@pytest.mark.parametrize("suite", ENC_SUITES)
def test_interop_with_reference_hpke(suite):
    """An independent RFC 9180 implementation opens what we seal (suite ids, info, layout)."""
    ident = IDS[suite]
    sealed = seal_room_key(ROOM_KEY, ident.enc_pub, suite, "abc", 7)
    assert ref_open(sealed, ident, b"unibus/room-key/v1|abc|7") == ROOM_KEY


@pytest.mark.parametrize("suite", ENC_SUITES)
def test_info_binding(suite):
    ident = IDS[suite]
    sealed = seal_room_key(ROOM_KEY, ident.enc_pub, suite, "room1", 3)
    for room, epoch in [("room2", 3), ("room1", 4), ("room1", 2), ("room13", 3), ("room", 13)]:
        with pytest.raises(SealError, match=rf"room {room} epoch {epoch}"):
            open_room_key(sealed, ident, room, epoch)


@pytest.mark.parametrize("suite", ENC_SUITES)
def test_wrong_recipient(suite):
    sealed = seal_room_key(ROOM_KEY, IDS[suite].enc_pub, suite, "room1", 1)
    with pytest.raises(SealError, match="bob"):
        open_room_key(sealed, OTHER[suite], "room1", 1)


@pytest.mark.parametrize("suite", ENC_SUITES)
def test_tampered_or_truncated(suite):
    ident = IDS[suite]
    sealed = seal_room_key(ROOM_KEY, ident.enc_pub, suite, "room1", 1)
    for pos in (0, sealing.ENC_SIZES[suite] - 1, sealing.ENC_SIZES[suite], len(sealed) - 1):
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        with pytest.raises(SealError):
            open_room_key(bytes(bad), ident, "room1", 1)
    for bad in (sealed[:-1], sealed + b"\0", b"", b"x" * 16):
        with pytest.raises(SealError, match="bytes"):
            open_room_key(bad, ident, "room1", 1)
    with pytest.raises(SealError):
        open_room_key(base64.b64encode(sealed).decode(), ident, "room1", 1)


def test_suite_mismatch():
    sealed = seal_room_key(ROOM_KEY, IDS["X25519"].enc_pub, "X25519", "room1", 1)
    with pytest.raises(SealError, match="MLKEM768_X25519"):
        open_room_key(sealed, IDS["MLKEM768_X25519"], "room1", 1)


def test_seal_rejects_bad_public_keys():
    with pytest.raises(KeyFormatError, match="low-order"):
        seal_room_key(ROOM_KEY, bytes(32), "X25519", "room1", 1)
    with pytest.raises(KeyFormatError, match="32 bytes"):
        seal_room_key(ROOM_KEY, IDS["MLKEM768_X25519"].enc_pub, "X25519", "room1", 1)
    with pytest.raises(KeyFormatError, match="1216 bytes"):
        seal_room_key(ROOM_KEY, IDS["X25519"].enc_pub, "MLKEM768_X25519", "room1", 1)
    with pytest.raises(KeyFormatError, match="ML-KEM-768 part"):
        seal_room_key(ROOM_KEY, b"\xff" * 1216, "MLKEM768_X25519", "room1", 1)
    with pytest.raises(KeyFormatError, match="enc_suite"):
        seal_room_key(ROOM_KEY, IDS["X25519"].enc_pub, "P256", "room1", 1)


def test_seal_rejects_bad_room_key():
    for bad in (b"", b"x" * 31, b"x" * 33, "x" * 32, None):
        with pytest.raises(ValueError, match="32 raw bytes"):
            seal_room_key(bad, IDS["X25519"].enc_pub, "X25519", "room1", 1)


def test_seal_for_members():
    members = [
        {"handle": "alice", "enc_pub": IDS["X25519"].enc_pub_b64, "enc_suite": "X25519"},
        {"handle": "bob", "enc_pub": OTHER["MLKEM768_X25519"].enc_pub_b64, "enc_suite": "MLKEM768_X25519"},
        {"handle": "carol", "enc_pub": OTHER["X25519"].enc_pub_b64},  # enc_suite defaults to X25519
    ]
    out = sealing.seal_for_members(ROOM_KEY, members, "room1", 5)
    assert set(out) == {"alice", "bob", "carol"}
    assert open_room_key(base64.b64decode(out["alice"]), IDS["X25519"], "room1", 5) == ROOM_KEY
    assert open_room_key(base64.b64decode(out["bob"]), OTHER["MLKEM768_X25519"], "room1", 5) == ROOM_KEY
    assert open_room_key(base64.b64decode(out["carol"]), OTHER["X25519"], "room1", 5) == ROOM_KEY
    with pytest.raises(KeyFormatError, match="member dave"):
        sealing.seal_for_members(ROOM_KEY, [{"handle": "dave", "enc_pub": "AAAA", "enc_suite": "X25519"}], "r", 1)


@settings(deadline=None, max_examples=25)
@given(
    key=st.binary(min_size=32, max_size=32),
    room=st.from_regex(r"\A[a-z0-9]{1,40}\Z"),
    epoch=st.integers(0, 2**40),
    suite=st.sampled_from(ENC_SUITES),
)
def test_seal_property(key, room, epoch, suite):
    sealed = seal_room_key(key, IDS[suite].enc_pub, suite, room, epoch)
    assert open_room_key(sealed, IDS[suite], room, epoch) == key
    with pytest.raises(SealError):
        open_room_key(sealed, IDS[suite], room, epoch + 1)


# ============================================================== messages

SUBJ = "unibus.room.room1.chat"


def test_subjects():
    assert room_subject("room1") == "unibus.room.room1"
    assert sealing.message_subject("room1", "chat") == SUBJ
    assert sealing.message_subject("room1", "a.b-c_d") == "unibus.room.room1.a.b-c_d"
    assert sealing.parse_message_subject("unibus.room.room1.a.b") == ("room1", "a.b")
    for bad_topic in ("", "a b", "*", ">", "a.*", "a..b", ".a", "a.", "é", "x" * 201):
        with pytest.raises(ValueError, match="topic"):
            sealing.message_subject("room1", bad_topic)
    for bad in ("unibus.room.room1", "unibus.room.room1.", "unibus.room.ROOM.x", "other.room1.x", "unibus.room.r.>"):
        with pytest.raises(ValueError, match="subject"):
            sealing.parse_message_subject(bad)
    with pytest.raises(ValueError):
        room_subject("a.b")


def test_message_layout_and_aad():
    payload = encrypt_message(ROOM_KEY, SUBJ, 4, b"hello")
    assert len(payload) == 12 + 5 + 16
    # independent decryption: nonce || ct, aad = "<subject>|<epoch>"
    pt = ChaCha20Poly1305(ROOM_KEY).decrypt(payload[:12], payload[12:], b"unibus.room.room1.chat|4")
    assert pt == b"hello"
    assert sealing.message_aad(SUBJ, 4) == b"unibus.room.room1.chat|4"
    assert EPOCH_HEADER == "Unibus-Epoch"


def test_message_known_answer():
    """A payload built by hand (fixed nonce) decrypts: fixes the format for other languages."""
    nonce = bytes(12)
    payload = nonce + ChaCha20Poly1305(ROOM_KEY).encrypt(nonce, b"hi", b"unibus.room.abc.t|0")
    assert decrypt_message(ROOM_KEY, "unibus.room.abc.t", 0, payload) == b"hi"


def test_message_roundtrip_and_binding():
    payload = encrypt_message(ROOM_KEY, SUBJ, 4, b"hello")
    assert decrypt_message(ROOM_KEY, SUBJ, 4, payload) == b"hello"
    assert encrypt_message(ROOM_KEY, SUBJ, 4, b"hello") != payload  # fresh nonce
    wrong = [
        (ROOM_KEY, "unibus.room.room1.other", 4),  # moved to another topic
        (ROOM_KEY, "unibus.room.room2.chat", 4),  # moved to another room
        (ROOM_KEY, SUBJ, 5),  # claimed another epoch
        (ROOM_KEY, SUBJ, 3),
        (bytes(32), SUBJ, 4),  # wrong key
    ]
    for key, subj, epoch in wrong:
        with pytest.raises(MessageError, match="does not authenticate"):
            decrypt_message(key, subj, epoch, payload)
    for pos in (0, 11, 12, len(payload) - 1):
        bad = bytearray(payload)
        bad[pos] ^= 0x80
        with pytest.raises(MessageError):
            decrypt_message(ROOM_KEY, SUBJ, 4, bytes(bad))


def test_message_short_payload():
    for n in (0, 12, 27):
        with pytest.raises(MessageError, match="too short"):
            decrypt_message(ROOM_KEY, SUBJ, 0, b"\0" * n)
    # 28 bytes (empty plaintext) is well formed
    assert decrypt_message(ROOM_KEY, SUBJ, 0, encrypt_message(ROOM_KEY, SUBJ, 0, b"")) == b""


def test_encrypt_rejects_bad_input():
    with pytest.raises(ValueError, match="room key"):
        encrypt_message(b"short", SUBJ, 0, b"x")
    with pytest.raises(ValueError, match="subject"):
        encrypt_message(ROOM_KEY, "unibus.room.room1", 0, b"x")
    with pytest.raises(ValueError, match="epoch"):
        encrypt_message(ROOM_KEY, SUBJ, -1, b"x")


@given(
    pt=st.binary(max_size=2048),
    epoch=st.integers(0, 2**40),
    topic=st.from_regex(r"\A[a-z0-9_-]{1,10}(\.[a-z0-9_-]{1,10}){0,3}\Z"),
)
def test_message_property(pt, epoch, topic):
    subj = sealing.message_subject("room1", topic)
    payload = encrypt_message(ROOM_KEY, subj, epoch, pt)
    assert len(payload) == 12 + len(pt) + 16
    assert decrypt_message(ROOM_KEY, subj, epoch, payload) == pt
    with pytest.raises(MessageError):
        decrypt_message(ROOM_KEY, subj, epoch + 1, payload)


# ============================================================== epoch header


def test_epoch_header():
    assert sealing.format_epoch_header(12) == "12"
    assert sealing.parse_epoch_header("0") == 0
    assert sealing.parse_epoch_header(b"17") == 17
    for bad in (None, "", "-1", "01", "1.0", " 1", "1 ", "+1", "x", "١", b"\xff", "9" * 19):
        with pytest.raises(MessageError, match=EPOCH_HEADER):
            sealing.parse_epoch_header(bad)


@given(st.text(max_size=8))
def test_epoch_header_property(s):
    ok = s.isascii() and s.isdigit() and (s == "0" or not s.startswith("0")) and len(s) <= 18
    if ok:
        assert sealing.parse_epoch_header(s) == int(s)
        assert sealing.format_epoch_header(int(s)) == s
    else:
        with pytest.raises(MessageError):
            sealing.parse_epoch_header(s)


def test_formats_doc_vectors():
    """The worked examples of docs/formats.md §4 and §5."""
    assert room_key_info("k3x9q2", 1) == b"unibus/room-key/v1|k3x9q2|1"
    assert len(room_key_info("k3x9q2", 1)) == 27
    payload = bytes.fromhex("000000000000000000000000" "70dd2e5dc2" "7223df05ef65f6dc88c8327e244d91c3")
    assert base64.b64encode(payload).decode() == "AAAAAAAAAAAAAAAAcN0uXcJyI98F72X23IjIMn4kTZHD"
    assert decrypt_message(ROOM_KEY, "unibus.room.k3x9q2.chat", 1, payload) == b"hello"
    assert len(base64.b64encode(bytes(80))) == 108 and len(base64.b64encode(bytes(1168))) == 1560
