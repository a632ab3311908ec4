"""unibus.client.keys: key validation, nkey derivation, identity file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import string

import nkeys
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from unibus.client import keys
from unibus import wire
from unibus.client.keys import (
    ENC_PUB_SIZES,
    ENC_SUITES,
    HANDLE_RE,
    Identity,
    IdentityError,
    KeyFormatError,
    generate_identity,
    load_identity,
    nkey_from_sign_pub,
    save_identity,
    sign_pub_from_nkey,
    validate_enc_pub,
    validate_handle,
    validate_sign_pub,
)

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# ============================================================== independent oracles

# --- canonical standard base64 for a given length (written as regexes, not via base64 module)
_B64 = "A-Za-z0-9+/"
CANON_B64_32 = re.compile(rf"\A[{_B64}]{{42}}[AEIMQUYcgkosw048]=\Z")  # 32 = 10*3 + 2
CANON_B64_1216 = re.compile(rf"\A[{_B64}]{{1621}}[AQgw]==\Z")  # 1216 = 405*3 + 1

# --- Ed25519 (RFC 8032) in pure Python
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = (-121665 * pow(121666, P - 2, P)) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
IDENT = (0, 1, 1, 0)


def _ed_add(a, b):
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    A = (y1 - x1) * (y2 - x2) % P
    B = (y1 + x1) * (y2 + x2) % P
    C = 2 * t1 * t2 * D % P
    Dd = 2 * z1 * z2 % P
    E, F, G, H = B - A, Dd - C, Dd + C, B + A
    return (E * F % P, G * H % P, F * G % P, E * H % P)


def _ed_mul(k, pt):
    q = IDENT
    while k:
        if k & 1:
            q = _ed_add(q, pt)
        pt = _ed_add(pt, pt)
        k >>= 1
    return q


def _ed_is_identity(pt):
    x, y, z, _ = pt
    return x % P == 0 and (y - z) % P == 0


def _ed_decode(raw: bytes):
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    if x2 == 0:
        if sign:
            return None
        x = 0
    else:
        x = pow(x2, (P + 3) // 8, P)
        if (x * x - x2) % P:
            x = x * SQRT_M1 % P
        if (x * x - x2) % P:
            return None
        if (x & 1) != sign:
            x = P - x
    return (x, y, 1, x * y % P)


def _ed_encode(pt) -> bytes:
    x, y, z, _ = pt
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def ed_pub_ok(raw: bytes) -> bool:
    """Canonical point of the prime-order subgroup, not the identity."""
    pt = _ed_decode(raw)
    if pt is None:
        return False
    return _ed_is_identity(_ed_mul(L, pt)) and not _ed_is_identity(pt)


# --- X25519: canonical u < p and not one of the low-order points (RFC 7748 / libsodium list)
X25519_LOW_ORDER = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
]


def x25519_pub_ok(raw: bytes) -> bool:
    u = int.from_bytes(raw, "little")
    return len(raw) == 32 and u < P and u not in X25519_LOW_ORDER


# --- ML-KEM-768 encapsulation key check (FIPS 203 §7.2): every 12-bit coefficient < q
Q = 3329


def mlkem_coeffs(raw1152: bytes) -> list[int]:
    out = []
    for i in range(0, 1152, 3):
        b0, b1, b2 = raw1152[i : i + 3]
        out += [b0 | ((b1 & 0x0F) << 8), (b1 >> 4) | (b2 << 4)]
    return out


def mlkem_encode(coeffs: list[int]) -> bytes:
    out = bytearray()
    for i in range(0, len(coeffs), 2):
        c0, c1 = coeffs[i], coeffs[i + 1]
        out += bytes([c0 & 0xFF, (c0 >> 8) | ((c1 & 0x0F) << 4), c1 >> 4])
    return bytes(out)


def mlkem_pub_ok(raw1184: bytes) -> bool:
    return all(c < Q for c in mlkem_coeffs(raw1184[:1152]))


def handle_ok(s) -> bool:
    return (
        isinstance(s, str)
        and 1 <= len(s) <= 32
        and s[0] in string.ascii_lowercase
        and all(c in string.ascii_lowercase + string.digits + "_-" for c in s)
    )


# ============================================================== strategies

real_ed_pub = st.binary(min_size=32, max_size=32).map(
    lambda s: ed25519.Ed25519PrivateKey.from_private_bytes(s).public_key().public_bytes_raw()
)


@st.composite
def torsioned_ed_pub(draw):
    """A real public key plus a non-trivial small-order point (mixed order: must be rejected)."""
    pub = _ed_decode(draw(real_ed_pub))
    t = IDENT
    while _ed_is_identity(t):
        q = _ed_decode(draw(st.binary(min_size=32, max_size=32)))
        if q is not None:
            t = _ed_mul(L, q)  # lands in the 8-torsion subgroup
    return _ed_encode(_ed_add(pub, t))


ed_raw = st.one_of(
    real_ed_pub,
    real_ed_pub,
    torsioned_ed_pub(),
    st.binary(min_size=32, max_size=32),
    st.integers(P, 2**256 - 1).map(lambda n: n.to_bytes(32, "little")),  # non-canonical y and/or sign bit
)

_real_x25519 = st.binary(min_size=32, max_size=32).map(
    lambda s: x25519.X25519PrivateKey.from_private_bytes(s).public_key().public_bytes_raw()
)
x25519_raw = st.one_of(
    _real_x25519,
    st.binary(min_size=32, max_size=32).map(
        lambda s: x25519.X25519PrivateKey.from_private_bytes(s).public_key().public_bytes_raw()
    ),
    st.binary(min_size=32, max_size=32),
    st.sampled_from(X25519_LOW_ORDER).map(lambda n: n.to_bytes(32, "little")),
    st.integers(P - 3, 2**256 - 1).map(lambda n: n.to_bytes(32, "little")),
)


@st.composite
def mlkem_raw(draw):
    raw = draw(st.binary(min_size=1184, max_size=1184))
    mode = draw(st.sampled_from(["random", "reduced", "one_bad"]))
    if mode == "random":
        return raw
    coeffs = [c % Q for c in mlkem_coeffs(raw[:1152])]
    if mode == "one_bad":
        coeffs[draw(st.integers(0, 767))] = draw(st.integers(Q, 4095))
    return mlkem_encode(coeffs) + raw[1152:]


_real_hybrid = st.binary(min_size=32, max_size=32).map(
    lambda seed: Identity("h", ed25519.Ed25519PrivateKey.generate(), "MLKEM768_X25519", seed).enc_pub
)
hybrid_raw = st.one_of(st.tuples(mlkem_raw(), x25519_raw).map(lambda t: t[0] + t[1]), _real_hybrid)


@st.composite
def b64_variants(draw, raw_strategy):
    raw = draw(raw_strategy)
    s = b64(raw)
    how = draw(
        st.sampled_from(
            ["plain"] * 8 + ["nopad", "newline", "space", "urlsafe", "lastchar", "prefix", "truncate"]
        )
    )
    if how == "nopad":
        s = s.rstrip("=")
    elif how == "newline":
        s = s + "\n"
    elif how == "space":
        i = draw(st.integers(0, len(s)))
        s = s[:i] + " " + s[i:]
    elif how == "urlsafe":
        s = s.replace("+", "-").replace("/", "_")
    elif how == "lastchar":
        body = s.rstrip("=")
        s = body[:-1] + draw(st.sampled_from(string.ascii_letters + string.digits + "+/")) + s[len(body) :]
    elif how == "prefix":
        s = draw(st.sampled_from(["A", "AAAA", "=", "é"])) + s
    elif how == "truncate":
        s = s[: draw(st.integers(0, len(s)))]
    return s


any_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=string.ascii_letters + string.digits + "+/=-_ \n", min_size=40, max_size=48),
    st.binary(max_size=40).map(b64),
)


# ============================================================== constants


def test_constants():
    assert ENC_SUITES == ("X25519", "MLKEM768_X25519")
    assert ENC_PUB_SIZES == {"X25519": 32, "MLKEM768_X25519": 1216}
    assert keys.MLKEM768_PUB_SIZE + keys.X25519_PUB_SIZE == 1216
    assert keys.DEFAULT_ENC_SUITE == "X25519"
    assert issubclass(KeyFormatError, ValueError)


# ============================================================== handles


@pytest.mark.parametrize("h", ["a", "alice", "a" * 32, "bob-2", "x_y", "z9", "a-", "a_"])
def test_handle_accepts(h):
    assert validate_handle(h) == h
    assert HANDLE_RE.match(h)


@pytest.mark.parametrize(
    "h", ["", "A", "Alice", "1abc", "-a", "_a", "a" * 33, "a b", "a.b", "alice\n", "\nalice", "ä", "aé", None, 5, b"ab"]
)
def test_handle_rejects(h):
    with pytest.raises(keys.HandleError, match=r"handle"):
        validate_handle(h)
    if isinstance(h, str):
        assert not HANDLE_RE.match(h) and not HANDLE_RE.search(h) and not HANDLE_RE.fullmatch(h)


@given(
    st.one_of(
        st.text(alphabet=string.ascii_lowercase + string.digits + "_-", max_size=40),
        st.text(alphabet=string.ascii_lowercase + string.digits + "_-AZ .\n\täß", max_size=40),
        st.text(max_size=40),
    )
)
def test_handle_property(h):
    event("accepted" if handle_ok(h) else "rejected")
    if handle_ok(h):
        assert validate_handle(h) == h
        assert HANDLE_RE.match(h)
    else:
        with pytest.raises(keys.HandleError):
            validate_handle(h)
        assert HANDLE_RE.match(h) is None


def test_handle_pattern_is_spec():
    assert keys.HANDLE_PATTERN == "^[a-z][a-z0-9_-]{0,31}$"


# ============================================================== base64 strictness


@pytest.mark.parametrize(
    "value,needle",
    [
        (None, "expected a base64 string"),
        (b"AAAA", "expected a base64 string"),
        ("", "empty"),
        ("é" * 44, "non-ASCII"),
        ("A" * 43, "multiple of 4"),
        ("A" * 42 + "B=", "non-canonical"),  # stray bits in the last character
        ("A" * 43 + " ", "invalid base64"),
        ("A" * 42 + "-=", "invalid base64"),  # URL-safe alphabet
        ("AAAA" * 12, "decodes to 36 bytes"),
    ],
)
def test_b64_rejections(value, needle):
    with pytest.raises(KeyFormatError, match=needle) as ei:
        keys.b64decode_strict(value, "sign_pub", 32)
    assert "sign_pub" in str(ei.value)
    assert "standard base64" in str(ei.value)


def test_b64_roundtrip():
    for n in range(0, 70):
        raw = os.urandom(n)
        if n:
            assert keys.b64decode_strict(keys.b64encode(raw)) == raw


# ============================================================== sign_pub


def test_sign_pub_accepts_real_keys():
    for _ in range(20):
        pub = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert validate_sign_pub(b64(pub)) == pub


@pytest.mark.parametrize(
    "raw,needle",
    [
        (bytes(32), "not a valid Ed25519"),  # y = 0: order-4 point
        (b"\x01" + bytes(31), "not a valid Ed25519"),  # identity
        (b"\xec" + b"\xff" * 30 + b"\x7f", "not a valid Ed25519"),  # y = p-1: order 2
        (b"\xed" + b"\xff" * 30 + b"\x7f", "not a valid Ed25519"),  # y = p: non-canonical
        (bytes(range(1, 32)), "31 bytes"),
        (bytes(range(1, 34)), "33 bytes"),
    ],
)
def test_sign_pub_rejects(raw, needle):
    with pytest.raises(KeyFormatError, match=needle) as ei:
        validate_sign_pub(b64(raw))
    assert "sign_pub" in str(ei.value)


@SLOW
@given(st.one_of(real_ed_pub.map(b64), b64_variants(ed_raw), b64_variants(ed_raw), any_text, st.none(), st.integers()))
def test_sign_pub_property(value):
    expect = isinstance(value, str) and bool(CANON_B64_32.match(value)) and ed_pub_ok(base64.b64decode(value))
    event("accepted" if expect else "rejected")
    if expect:
        assert validate_sign_pub(value) == base64.b64decode(value)
    else:
        with pytest.raises(KeyFormatError):
            validate_sign_pub(value)


# ============================================================== enc_pub


def test_enc_pub_unknown_suite():
    ident = generate_identity("alice")
    for bad in ("x25519", "MLKEM768", "", None, "P256"):
        with pytest.raises(KeyFormatError, match=r"X25519, MLKEM768_X25519"):
            validate_enc_pub(ident.enc_pub_b64, bad)


@pytest.mark.parametrize("suite", ENC_SUITES)
def test_enc_pub_accepts_generated(suite):
    ident = generate_identity("alice", suite)
    assert len(ident.enc_pub) == ENC_PUB_SIZES[suite]
    assert validate_enc_pub(ident.enc_pub_b64, suite) == ident.enc_pub


def test_enc_pub_size_mismatch_messages():
    x = generate_identity("a", "X25519").enc_pub_b64
    h = generate_identity("a", "MLKEM768_X25519").enc_pub_b64
    with pytest.raises(KeyFormatError, match=r"1216 bytes"):
        validate_enc_pub(x, "MLKEM768_X25519")
    with pytest.raises(KeyFormatError, match=r"32 bytes"):
        validate_enc_pub(h, "X25519")


@pytest.mark.parametrize("u", X25519_LOW_ORDER)
def test_x25519_low_order_rejected(u):
    raw = u.to_bytes(32, "little")
    with pytest.raises(KeyFormatError, match="low-order"):
        validate_enc_pub(b64(raw), "X25519")
    good_m = generate_identity("a", "MLKEM768_X25519").enc_pub[:1184]
    with pytest.raises(KeyFormatError, match="low-order"):
        validate_enc_pub(b64(good_m + raw), "MLKEM768_X25519")


@pytest.mark.parametrize("u", [P, P + 1, 2**255 - 1, 2**255, 2**256 - 1])
def test_x25519_noncanonical_rejected(u):
    with pytest.raises(KeyFormatError, match="non-canonical"):
        validate_enc_pub(b64(u.to_bytes(32, "little")), "X25519")


def test_mlkem_part_must_load():
    pub = generate_identity("a", "MLKEM768_X25519").enc_pub
    coeffs = mlkem_coeffs(pub[:1152])
    coeffs[5] = 4095
    bad = mlkem_encode(coeffs) + pub[1152:]
    with pytest.raises(KeyFormatError, match="ML-KEM-768 part"):
        validate_enc_pub(b64(bad), "MLKEM768_X25519")


@SLOW
@given(st.one_of(_real_x25519.map(b64), b64_variants(x25519_raw), b64_variants(x25519_raw), any_text, st.none()))
def test_x25519_enc_pub_property(value):
    expect = isinstance(value, str) and bool(CANON_B64_32.match(value)) and x25519_pub_ok(base64.b64decode(value))
    event("accepted" if expect else "rejected")
    if expect:
        assert validate_enc_pub(value, "X25519") == base64.b64decode(value)
    else:
        with pytest.raises(KeyFormatError):
            validate_enc_pub(value, "X25519")


@settings(SLOW, max_examples=60)
@given(st.one_of(_real_hybrid.map(b64), b64_variants(hybrid_raw), b64_variants(hybrid_raw), any_text))
def test_hybrid_enc_pub_property(value):
    expect = False
    if isinstance(value, str) and CANON_B64_1216.match(value):
        raw = base64.b64decode(value)
        expect = mlkem_pub_ok(raw[:1184]) and x25519_pub_ok(raw[1184:])
    event("accepted" if expect else "rejected")
    if expect:
        assert validate_enc_pub(value, "MLKEM768_X25519") == base64.b64decode(value)
    else:
        with pytest.raises(KeyFormatError):
            validate_enc_pub(value, "MLKEM768_X25519")


def test_xwing_known_answer():
    """draft-connolly-cfrg-xwing-kem-10 Appendix C, first vector: seed -> public key."""
    seed = bytes.fromhex("7f9c2ba4e88f827d616045507605853ed73b8093f6efbc88eb1a6eacfa66ef26")
    ident = Identity("alice", ed25519.Ed25519PrivateKey.generate(), "MLKEM768_X25519", seed)
    pk = ident.enc_pub
    assert len(pk) == 1216
    assert pk[:16].hex() == "e2236b35a8c24b39b10aa1323a96a919"
    assert pk[-8:].hex() == "c8cd049040ef6534"
    assert hashlib.sha256(pk).hexdigest() == "2e816deebcd76c5c80d0cd2d174478871658e8e2ff42bc9d4a6e486372e856bb"
    # and the layout: ML-KEM-768 public key of the SHAKE256-expanded seed || X25519 public key
    e = hashlib.shake_256(seed).digest(96)
    assert pk[:1184] == mlkem.MLKEM768PrivateKey.from_seed_bytes(e[:64]).public_key().public_bytes_raw()
    assert pk[1184:] == x25519.X25519PrivateKey.from_private_bytes(e[64:]).public_key().public_bytes_raw()


# ============================================================== nkeys


@given(st.binary(min_size=32, max_size=32))
def test_nkey_equivalence(seed):
    kp = nkeys.from_seed(bytearray(nkeys.encode_seed(seed, nkeys.PREFIX_BYTE_USER)))
    pub = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    expected = kp.public_key.decode()
    assert nkey_from_sign_pub(pub) == expected
    assert expected.startswith("U") and len(expected) == 56
    assert sign_pub_from_nkey(expected) == pub


def test_identity_nkey_is_the_bus_key_never_the_signing_key():
    ident = generate_identity("alice")
    seed = ident.bus_nkey_seed()
    assert seed.startswith("SU")
    kp = nkeys.from_seed(bytearray(seed.encode()))
    assert kp.public_key.decode() == ident.bus_pub != nkey_from_sign_pub(ident.sign_pub)
    assert nkeys.encode_seed(ident.bus_seed, nkeys.PREFIX_BYTE_USER).decode() == seed
    # what nats-py signs with that seed (the server's nonce) does not verify under sign_pub
    sig = kp.sign(b"nonce-from-server")
    ed25519.Ed25519PublicKey.from_public_bytes(sign_pub_from_nkey(ident.bus_pub)).verify(sig, b"nonce-from-server")
    with pytest.raises(Exception):
        ed25519.Ed25519PublicKey.from_public_bytes(ident.sign_pub).verify(sig, b"nonce-from-server")
    # and nothing in the identity hands out the signing key as an nkey or signs arbitrary bytes with it
    for gone in ("nkey_seed", "user_nkey", "sign"):
        assert not hasattr(ident, gone), gone


def test_an_identity_refuses_its_signing_key_as_bus_key():
    sk = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(KeyFormatError, match="bus key"):
        Identity("alice", sk, "X25519", bytes(32), bus_key=sk)


def test_sign_pub_from_nkey_rejects():
    good = generate_identity("alice").bus_pub
    bad_crc = good[:-1] + ("A" if good[-1] != "A" else "B")
    for bad in [bad_crc, good[:-1], "N" + good[1:], good.lower(), 5]:
        with pytest.raises(KeyFormatError):
            sign_pub_from_nkey(bad)
    with pytest.raises(KeyFormatError):
        nkey_from_sign_pub(b"\x00" * 31)


# ============================================================== identity object


@pytest.mark.parametrize("suite", ENC_SUITES)
def test_generate_identity(suite):
    ident = generate_identity("alice", suite)
    assert ident.handle == "alice" and ident.enc_suite == suite
    assert len(ident.sign_pub) == 32 and len(ident.sign_seed) == 32
    assert len(ident.enc_key) == 32
    assert base64.b64decode(ident.sign_pub_b64) == ident.sign_pub
    assert base64.b64decode(ident.enc_pub_b64) == ident.enc_pub
    assert ident.public_record() == {
        "handle": "alice",
        "sign_pub": ident.sign_pub_b64,
        "enc_pub": ident.enc_pub_b64,
        "enc_suite": suite,
        "bus_pub": ident.bus_pub,
    }
    assert len(ident.bus_seed) == 32 and ident.bus_seed != ident.sign_seed
    assert wire.validate_bus_pub(ident.bus_pub) == ident.bus_pub
    r = repr(ident)
    assert "alice" in r and b64(ident.enc_key) not in r and b64(ident.sign_seed) not in r
    assert b64(ident.bus_seed) not in r and ident.bus_nkey_seed() not in r
    assert ident != generate_identity("alice", suite)


def test_generate_identity_rejects():
    with pytest.raises(keys.HandleError):
        generate_identity("Alice")
    with pytest.raises(KeyFormatError):
        generate_identity("alice", "RSA")


# ============================================================== identity file


@pytest.mark.parametrize("suite", ENC_SUITES)
def test_save_load_roundtrip(tmp_path, suite):
    ident = generate_identity("alice", suite)
    path = tmp_path / "cfg" / "unibus" / "identity.json"
    assert save_identity(ident, path) == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert list(doc) == ["version", "handle", "sign_seed", "sign_pub", "enc_suite", "enc_key", "enc_pub",
                         "bus_seed", "bus_pub"]
    assert doc["version"] == 2 and doc["handle"] == "alice" and doc["enc_suite"] == suite
    assert base64.b64decode(doc["bus_seed"]) == ident.bus_seed and doc["bus_pub"] == ident.bus_pub
    assert doc["sign_pub"] == ident.sign_pub_b64 and doc["enc_pub"] == ident.enc_pub_b64
    assert base64.b64decode(doc["sign_seed"]) == ident.sign_seed
    assert base64.b64decode(doc["enc_key"]) == ident.enc_key
    loaded = load_identity(path)
    assert loaded == ident
    assert loaded.enc_pub == ident.enc_pub and loaded.bus_pub == ident.bus_pub
    assert os.listdir(path.parent) == ["identity.json"]  # no temp file left behind


def test_save_mode_ignores_umask(tmp_path):
    old = os.umask(0)
    try:
        save_identity(generate_identity("alice"), tmp_path / "id.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "id.json").st_mode) == 0o600


def test_save_existing_dir_mode_untouched(tmp_path):
    os.chmod(tmp_path, 0o755)
    save_identity(generate_identity("alice"), tmp_path / "id.json")
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o755


def test_save_refuses_overwrite_and_force(tmp_path):
    path = tmp_path / "id.json"
    first = generate_identity("alice")
    second = generate_identity("bob", "MLKEM768_X25519")
    save_identity(first, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        save_identity(second, path)
    assert path.read_bytes() == before
    save_identity(second, path, force=True)
    assert load_identity(path) == second
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["id.json"]


def test_save_refuses_over_dangling_symlink(tmp_path):
    path = tmp_path / "id.json"
    os.symlink(tmp_path / "nowhere", path)
    with pytest.raises(FileExistsError):
        save_identity(generate_identity("alice"), path)
    assert not (tmp_path / "nowhere").exists()


def test_save_to_directory(tmp_path):
    with pytest.raises(IsADirectoryError):
        save_identity(generate_identity("alice"), tmp_path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610, 0o601])
def test_load_refuses_group_other_access(tmp_path, mode):
    path = tmp_path / "id.json"
    save_identity(generate_identity("alice"), path)
    os.chmod(path, mode)
    with pytest.raises(IdentityError) as ei:
        load_identity(path)
    msg = str(ei.value)
    assert f"chmod 600 {path}" in msg and f"{mode:04o}" in msg
    assert ei.value.path == str(path)


def test_load_accepts_0400(tmp_path):
    path = tmp_path / "id.json"
    ident = generate_identity("alice")
    save_identity(ident, path)
    os.chmod(path, 0o400)
    assert load_identity(path) == ident


def test_load_missing(tmp_path):
    with pytest.raises(IdentityError, match=r"not found.*unibus keygen"):
        load_identity(tmp_path / "nope.json")


def test_load_directory(tmp_path):
    with pytest.raises(IdentityError, match="directory"):
        load_identity(tmp_path)


def _write(path, content: bytes | str):
    data = content.encode() if isinstance(content, str) else content
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _doc(suite="X25519", **changes):
    doc = keys.identity_to_json(generate_identity("alice", suite))
    for k, v in changes.items():
        if v is _DEL:
            del doc[k]
        else:
            doc[k] = v
    return json.dumps(doc)


_DEL = object()
_other_x = generate_identity("zed")


def _same_seed_doc():
    """A version 2 file whose bus key is its signing key (hand-edited)."""
    doc = keys.identity_to_json(generate_identity("alice"))
    doc["bus_seed"] = doc["sign_seed"]
    doc["bus_pub"] = nkey_from_sign_pub(base64.b64decode(doc["sign_pub"]))
    return json.dumps(doc)


@pytest.mark.parametrize(
    "content,needle",
    [
        ("", "empty"),
        ("   \n", "empty"),
        (b"\xff\xfe\x00", "not UTF-8"),
        ("{not json", r"not valid JSON \(line 1, column 2"),
        ("[1, 2]", "expected a JSON object"),
        (_doc(version=3), "unsupported identity file version 3"),
        (_doc(version="1"), "non-integer"),
        (_doc(version=True), "non-integer"),
        (_doc(version=_DEL), "version"),
        (_doc(enc_pub=_DEL), "missing field.*enc_pub"),
        (_doc(handle="Alice"), "invalid handle"),
        (_doc(enc_suite="RSA"), "unknown enc_suite"),
        (_doc(sign_seed="AAAA"), "sign_seed: decodes to 3 bytes"),
        (_doc(sign_seed="not base64!"), "sign_seed"),
        (_doc(enc_key=b64(bytes(31))), "enc_key: decodes to 31 bytes"),
        (_doc(sign_pub=_other_x.sign_pub_b64), "sign_pub does not match sign_seed"),
        (_doc(enc_pub=_other_x.enc_pub_b64), "enc_pub does not match enc_key"),
        (_doc("MLKEM768_X25519", enc_suite="X25519"), "enc_pub: decodes to 1216 bytes"),
        (_doc(bus_seed=_DEL), "missing field.*bus_seed"),
        (_doc(bus_pub=_DEL), "missing field.*bus_pub"),
        (_doc(bus_seed="AAAA"), "bus_seed: decodes to 3 bytes"),
        (_doc(bus_pub=_other_x.bus_pub), "bus_pub does not match bus_seed"),
        (_doc(bus_pub=5), "bus_pub"),
        (_same_seed_doc(), "bus_seed: equals sign_seed"),
    ],
)
def test_load_corrupted(tmp_path, content, needle):
    path = _write(tmp_path / "id.json", content)
    with pytest.raises(IdentityError, match=needle) as ei:
        load_identity(path)
    assert str(path) in str(ei.value)


def test_load_too_large(tmp_path):
    path = _write(tmp_path / "id.json", " " * (70 * 1024))
    with pytest.raises(IdentityError, match="too large"):
        load_identity(path)


def test_load_ignores_unknown_fields(tmp_path):
    ident = generate_identity("alice")
    doc = keys.identity_to_json(ident)
    doc["comment"] = "laptop"
    path = _write(tmp_path / "id.json", json.dumps(doc))
    assert load_identity(path) == ident


def test_load_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ident = generate_identity("alice")
    save_identity(ident, "~/.config/unibus/identity.json")
    assert (tmp_path / ".config/unibus/identity.json").exists()
    assert load_identity("~/.config/unibus/identity.json") == ident


def test_formats_doc_vectors():
    """The worked example of docs/formats.md §3."""
    ident = Identity("alice", ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32))), "X25519",
                     bytes(range(32, 64)), ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96))))
    v1 = {
        "version": 1,
        "handle": "alice",
        "sign_seed": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "sign_pub": "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=",
        "enc_suite": "X25519",
        "enc_key": "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=",
        "enc_pub": "NYBy1jZYgNGu6jKa35EhODhR7SGijjt16WXQ0s0WYlQ=",
    }
    assert keys.identity_to_json(ident) == {
        **v1,
        "version": 2,
        "bus_seed": "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=",
        "bus_pub": "UASUHOJP6EEVKEKHNLOIG2O3NXOJGNTFUEMXRXNBIBHOCBTMVFKZ3BWH",
    }
    assert keys.identity_from_json(v1).bus_key is None  # a 0.11 file still loads, without a bus key
    assert keys.identity_to_json(keys.identity_from_json(v1)) == v1
    assert ident.sign_pub.hex() == "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    assert wire._crc16_xmodem(b"\xa0" + ident.sign_pub) == 0x4AAD
    assert nkey_from_sign_pub(ident.sign_pub) == "UAB2CB576PHBBPQ5ODORRZ2LYCMWPZGWGCN2KDK7DXOIMZASKUY3RLKK"
    bus_raw = sign_pub_from_nkey(ident.bus_pub)
    assert bus_raw.hex() == "2543b92ff1095511476adc8369db6ddc933665a11978dda1404ee1066ca9559d"
    assert wire._crc16_xmodem(b"\xa0" + bus_raw) == 0xC786
    assert ident.bus_nkey_seed() == "SUAEAQKCINCEKRSHJBEUUS2MJVHE6UCRKJJVIVKWK5MFSWS3LROV4XZ7LE"
    # the seed layout of docs/formats.md §2.4, computed by hand
    b0, b1 = 0x90 | (0xA0 >> 5), (0xA0 & 31) << 3
    body = bytes([b0, b1]) + ident.bus_seed
    body += wire._crc16_xmodem(body).to_bytes(2, "little")
    assert base64.b32encode(body).decode().rstrip("=") == ident.bus_nkey_seed()
    hybrid = Identity("alice", ident.sign_key, "MLKEM768_X25519", bytes(range(32, 64)))
    assert len(hybrid.enc_pub_b64) == 1624
    assert hashlib.sha256(hybrid.enc_pub).hexdigest() == "a1f324bc0701f1234fbba7b11901023b3644f3bb8c6eb4ee4368d7e859eb6228"


def test_load_unreadable_simulated(tmp_path, monkeypatch):
    """The permission-denied branch, also when the suite runs as root."""
    path = tmp_path / "id.json"
    save_identity(generate_identity("alice"), path)
    real_open = os.open

    def deny(p, *a, **kw):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(p, *a, **kw)

    monkeypatch.setattr(keys.os, "open", deny)
    with pytest.raises(IdentityError, match=r"cannot read identity file .*Permission denied"):
        load_identity(path)


# ============================================================== version 1 files and --upgrade


def _v1_file(path, ident):
    doc = keys.identity_to_json(ident)
    for k in ("bus_seed", "bus_pub"):
        del doc[k]
    doc["version"] = 1
    return _write(path, json.dumps(doc, indent=2) + "\n")


def test_a_version_1_file_loads_without_bus_access(tmp_path):
    ident = generate_identity("alice")
    old = load_identity(_v1_file(tmp_path / "id.json", ident))
    assert old.bus_key is None and old.bus_pub is None and "bus_pub" not in old.public_record()
    assert old.sign_seed == ident.sign_seed and old.enc_key == ident.enc_key
    for use in (lambda: old.bus_nkey_seed(), lambda: old.bus_seed):
        with pytest.raises(keys.NoBusKey, match=r"unibus keygen --upgrade"):
            use()


def test_upgrade_adds_a_bus_key_and_keeps_the_rest(tmp_path):
    ident = generate_identity("alice", "MLKEM768_X25519")
    path = _v1_file(tmp_path / "id.json", ident)
    original = path.read_bytes()
    upgraded, backup = keys.upgrade_identity_file(path)
    assert backup == tmp_path / "id.json.v1.bak" and backup.read_bytes() == original
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    old, new = load_identity(backup), load_identity(path)
    assert new == upgraded and json.loads(path.read_text())["version"] == 2
    assert (new.handle, new.enc_suite, new.sign_seed, new.sign_pub, new.enc_key, new.enc_pub) == (
        old.handle, old.enc_suite, old.sign_seed, old.sign_pub, old.enc_key, old.enc_pub)
    assert new.bus_pub and new.bus_seed != new.sign_seed
    assert sorted(os.listdir(tmp_path)) == ["id.json", "id.json.v1.bak"]  # no temporary file left
    # a version 2 file: nothing to do, nothing written
    before = path.read_bytes()
    again, none = keys.upgrade_identity_file(path)
    assert none is None and again == new and path.read_bytes() == before


def test_upgrade_never_overwrites_another_backup(tmp_path):
    path = _v1_file(tmp_path / "id.json", generate_identity("alice"))
    _write(tmp_path / "id.json.v1.bak", "something else")
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="move it away"):
        keys.upgrade_identity_file(path)
    assert path.read_bytes() == before
    # nor follows a link planted there
    os.unlink(tmp_path / "id.json.v1.bak")
    os.symlink(path, tmp_path / "id.json.v1.bak")
    with pytest.raises(IdentityError, match="not a regular file"):
        keys.upgrade_identity_file(path)
    assert path.read_bytes() == before
    # the same bytes (an interrupted earlier run) are fine
    os.unlink(tmp_path / "id.json.v1.bak")
    _write(tmp_path / "id.json.v1.bak", before)
    assert keys.upgrade_identity_file(path)[1] == tmp_path / "id.json.v1.bak"


def test_upgrade_refuses_an_open_file(tmp_path):
    path = _v1_file(tmp_path / "id.json", generate_identity("alice"))
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        keys.upgrade_identity_file(path)
    assert not (tmp_path / "id.json.v1.bak").exists()
