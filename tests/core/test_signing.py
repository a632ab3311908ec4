"""Tests for unibus.signing: RFC 9421 HTTP Message Signatures with Ed25519.

Run the verify-cost comparison with:  .venv/bin/python tests/core/test_signing.py
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
import time
import timeit

import http_sf
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    MappingKeyResolver,
    algorithms,
)
from multidict import CIMultiDict, CIMultiDictProxy

from unibus import signing
from unibus.signing import (
    NONCE_RE,
    SignatureError,
    Verified,
    check_request,
    content_digest,
    parse_content_digest,
    sign_request,
    split_path_query,
    verify_request,
)

NOW = 1_700_000_000
SKEW = 60
SEED = bytes(range(32))
KEY = Ed25519PrivateKey.from_private_bytes(SEED)
PUB = KEY.public_key()
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
NONCE = "abcdefghijklmnop0123456789_-ABCD"
BODY = b'{"name": "ops", "members": ["alice", "bob"]}'

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def resolver(keys=None):
    keys = {"alice": PUB} if keys is None else keys
    return lambda keyid: keys.get(keyid)


def verify(method, target, headers, body, *, keys=None, now=NOW, skew=SKEW):
    path, query = split_path_query(target)
    return verify_request(method, path, query, headers, body, resolve_key=resolver(keys), now=now, skew=skew)


def signed(method="GET", target="/v1/me", body=None, **kw):
    kw.setdefault("keyid", "alice")
    kw.setdefault("private_key", KEY)
    kw.setdefault("created", NOW)
    kw.setdefault("nonce", NONCE)
    return sign_request(method, target, body, **kw)


# ---------------------------------------------------------------------------
# An independent, by-the-RFC construction of the signature base (RFC 9421
# §2.3, §2.5): each covered component on its own line as
# `"<name>": <value>`, then `"@signature-params": <inner list>`, lines joined
# by LF, no trailing newline. Derived components: @method is the method,
# @path the target path, @query "?" + query ("?" alone when absent).


def rfc_signature_params(components, params):
    inner = "(" + " ".join('"%s"' % name for name in components) + ")"
    for key, value in params:
        inner += ";%s=%d" % (key, value) if isinstance(value, int) else ';%s="%s"' % (key, value)
    return inner


def rfc_signature_base(component_values, params):
    lines = ['"%s": %s' % (name, value) for name, value in component_values]
    sig_params = rfc_signature_params([n for n, _ in component_values], params)
    lines.append('"@signature-params": ' + sig_params)
    return "\n".join(lines), sig_params


def hand_signed(
    method="GET",
    target="/v1/me",
    body=None,
    *,
    components=None,
    params=None,
    key=KEY,
    label="sig1",
    extra_headers=None,
):
    """Headers for a request signed with the hand-built base above, so tests
    can produce validly signed requests with any components/parameters."""
    path, query = split_path_query(target)
    headers = dict(extra_headers or {})
    if body is not None and "Content-Digest" not in headers:
        headers["Content-Digest"] = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
    if components is None:
        components = ["@method", "@path", "@query"] + (["content-digest"] if body is not None else [])
    if params is None:
        params = [("created", NOW), ("nonce", NONCE), ("keyid", "alice"), ("alg", "ed25519")]
    lower = {k.lower(): v for k, v in headers.items()}
    values = {"@method": method, "@path": path, "@query": "?" + query}
    comp_values = [(c, values[c] if c in values else lower[c.lower()]) for c in components]
    base, sig_params = rfc_signature_base(comp_values, params)
    sig = key.sign(base.encode())
    headers["Signature-Input"] = f"{label}={sig_params}"
    headers["Signature"] = f"{label}=:{base64.b64encode(sig).decode()}:"
    return headers


# ---------------------------------------------------------------------------
# Basics


def test_content_digest():
    assert content_digest(b"") == "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    assert parse_content_digest(content_digest(BODY)) == hashlib.sha256(BODY).digest()
    # also with other algorithms listed and extra whitespace (general parser)
    mixed = "sha-512=:" + base64.b64encode(hashlib.sha512(BODY).digest()).decode() + ":,  " + content_digest(BODY)
    assert parse_content_digest(mixed) == hashlib.sha256(BODY).digest()


def test_split_path_query():
    assert split_path_query("/v1/me") == ("/v1/me", "")
    assert split_path_query("/v1/me?") == ("/v1/me", "")
    assert split_path_query("/v1/rooms/x/keys/me?epoch=3&a=%20b") == ("/v1/rooms/x/keys/me", "epoch=3&a=%20b")
    assert split_path_query("/a?b?c") == ("/a", "b?c")
    assert split_path_query("/a#frag") == ("/a", "")
    assert split_path_query("") == ("/", "")


def test_get_round_trip_spec_form():
    h = sign_request("GET", "/v1/me", None, keyid="alice", private_key=KEY)
    assert set(h) == {"Signature-Input", "Signature"}
    m = re.fullmatch(
        r'sig1=\("@method" "@path" "@query"\);created=(\d+);nonce="([A-Za-z0-9_-]{32})";keyid="alice";alg="ed25519"',
        h["Signature-Input"],
    )
    assert m, h["Signature-Input"]
    assert abs(int(m.group(1)) - time.time()) < 5
    assert re.fullmatch(r"sig1=:[A-Za-z0-9+/]{86}==:", h["Signature"])
    v = verify("GET", "/v1/me", h, None, now=time.time())
    assert v == Verified("alice", m.group(2), int(m.group(1)), "sig1", None)


def test_post_round_trip_with_json_body():
    h = signed("POST", "/v1/rooms", BODY)
    assert h["Content-Digest"] == content_digest(BODY)
    assert h["Signature-Input"] == (
        'sig1=("@method" "@path" "@query" "content-digest");'
        f'created={NOW};nonce="{NONCE}";keyid="alice";alg="ed25519"'
    )
    v = verify("POST", "/v1/rooms", h, BODY)
    assert (v.keyid, v.nonce, v.created, v.label) == ("alice", NONCE, NOW, "sig1")
    assert v.content_sha256 == hashlib.sha256(BODY).digest()


def test_round_trip_with_aiohttp_headers_and_query():
    h = signed("GET", "/v1/rooms/abc/keys/me?epoch=3", None, label="req")
    raw = CIMultiDict({"Host": "127.0.0.1:8443", "Accept": "*/*"})
    for k, v in h.items():
        raw.add(k.lower(), v)  # lower-case names, as some proxies send them
    v = verify("GET", "/v1/rooms/abc/keys/me?epoch=3", CIMultiDictProxy(raw), b"")
    assert v.label == "req"


def test_keys_as_raw_bytes_and_pynacl():
    import nacl.signing

    h = signed("PUT", "/v1/rooms/r1/members/bob", b"")
    raw = PUB.public_bytes_raw()
    for key in (raw, bytearray(raw), nacl.signing.VerifyKey(raw), PUB):
        assert verify("PUT", "/v1/rooms/r1/members/bob", h, b"", keys={"alice": key}).keyid == "alice"
    with pytest.raises(SignatureError, match="not an Ed25519 public key"):
        verify("PUT", "/v1/rooms/r1/members/bob", h, b"", keys={"alice": raw[:31]})


def test_exact_signature_base_fixed_vector():
    """sign_request's signature is over exactly the RFC 9421 base, written out."""
    base = (
        '"@method": GET\n'
        '"@path": /v1/me\n'
        '"@query": ?\n'
        '"@signature-params": ("@method" "@path" "@query");created=1700000000;'
        'nonce="abcdefghijklmnop0123456789_-ABCD";keyid="alice";alg="ed25519"'
    )
    h = signed("GET", "/v1/me")
    assert h["Signature"] == "sig1=:" + base64.b64encode(KEY.sign(base.encode())).decode() + ":"
    pending = check_request("GET", "/v1/me", "", h, None, now=NOW, skew=SKEW)
    assert pending.signature_base == base.encode()


def test_interop_hand_built_base_verifies():
    """A request signed from a base built by hand (cryptography Ed25519)."""
    q = "epoch=2&x=%2F%20y"
    for method, target, body in (
        ("GET", "/v1/me", None),
        ("GET", f"/v1/rooms/r1/keys/me?{q}", None),
        ("POST", "/v1/rooms/r1/keys", BODY),
        ("DELETE", "/v1/members/bob", None),
    ):
        path, query = split_path_query(target)
        comp = [("@method", method), ("@path", path), ("@query", "?" + query)]
        headers = {}
        if body is not None:
            headers["content-digest"] = content_digest(body)
            comp.append(("content-digest", headers["content-digest"]))
        params = [("created", NOW - 5), ("nonce", "Zz_-" * 5), ("keyid", "alice"), ("alg", "ed25519")]
        base, sig_params = rfc_signature_base(comp, params)
        headers["signature-input"] = "sig1=" + sig_params
        headers["signature"] = "sig1=:" + base64.b64encode(KEY.sign(base.encode())).decode() + ":"
        v = verify(method, target, headers, body)
        assert (v.nonce, v.created) == ("Zz_-" * 5, NOW - 5)


def test_interop_other_parameter_order_and_extra_header():
    h = hand_signed(
        "POST",
        "/v1/members",
        BODY,
        components=["content-type", "@method", "content-digest", "@query", "@path"],
        params=[("keyid", "alice"), ("alg", "ed25519"), ("nonce", NONCE), ("created", NOW), ("tag", "unibus")],
        extra_headers={"Content-Type": "application/json"},
    )
    assert verify("POST", "/v1/members", h, BODY).keyid == "alice"


def test_non_canonical_whitespace_goes_through_general_parser():
    h = hand_signed("GET", "/v1/me")
    inner = h["Signature-Input"].split("=", 1)[1]
    h["Signature-Input"] = "  sig1=( " + inner[1:].replace('" "', '"  "', 1) + "  "
    h["Signature"] = " " + h["Signature"] + " "
    assert signing._CANONICAL_INPUT.fullmatch(h["Signature-Input"].strip()) is None
    assert verify("GET", "/v1/me", h, None).keyid == "alice"


def test_library_verifier_accepts_our_signatures():
    """http-message-signatures (the reference) verifies what sign_request makes."""

    class Msg:
        def __init__(self, method, url, headers):
            self.method, self.url, self.headers = method, url, headers

    class V(HTTPMessageVerifier):
        max_clock_skew = datetime.timedelta(seconds=SKEW)

    lib = V(signature_algorithm=algorithms.ED25519, key_resolver=MappingKeyResolver(public_keys={"alice": PUB}, private_keys={}))
    for method, target, body in (("GET", "/v1/me", None), ("POST", "/v1/rooms?x=1", BODY)):
        h = sign_request(method, target, body, keyid="alice", private_key=KEY)
        (res,) = lib.verify(
            Msg(method, "https://membershipd.example:8443" + target, h),
            max_age=datetime.timedelta(seconds=SKEW),
            require_components=("@method", "@path", "@query"),
            body=body,
        )
        assert res.parameters["keyid"] == "alice" and NONCE_RE.fullmatch(res.nonce)


def test_library_signatures_verify():
    """What the library signs (its own parameter order) verify_request accepts."""

    class Msg:
        def __init__(self, method, url):
            self.method, self.url, self.headers = method, url, {}

    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=MappingKeyResolver(public_keys={}, private_keys={"alice": KEY})
    )
    for method, target, body in (("GET", "/v1/bus", None), ("PATCH", "/v1/members/bob?z=%41", BODY)):
        msg = Msg(method, "http://127.0.0.1:8080" + target)
        signer.sign(
            msg,
            key_id="alice",
            nonce=NONCE,
            label="pyhms",
            created=datetime.datetime.fromtimestamp(NOW, datetime.UTC),
            covered_component_ids=("@method", "@path", "@query"),
            body=body,
        )
        assert ";keyid=" in msg.headers["Signature-Input"]
        v = verify(method, target, msg.headers, body)
        assert (v.keyid, v.label, v.nonce) == ("alice", "pyhms", NONCE)


# ---------------------------------------------------------------------------
# Rejections: each says which check failed


def reject(match, method="GET", target="/v1/me", headers=None, body=None, **kw):
    with pytest.raises(SignatureError, match=match) as ei:
        verify(method, target, headers, body, **kw)
    assert ei.value.reason == str(ei.value)
    return ei.value


def test_missing_headers():
    h = signed()
    reject("missing Signature-Input header", headers={"Signature": h["Signature"]})
    reject("missing Signature header", headers={"Signature-Input": h["Signature-Input"]})
    reject("missing Signature-Input header", headers={})


def test_exactly_one_signature():
    h = signed()
    other = hand_signed(label="sig2", params=[("created", NOW), ("nonce", "x" * 16), ("keyid", "alice")])
    two = {
        "Signature-Input": h["Signature-Input"] + ", " + other["Signature-Input"],
        "Signature": h["Signature"] + ", " + other["Signature"],
    }
    reject("expected exactly one signature, found 2", headers=two)
    # the same label twice (RFC 8941 would keep only the last): refused
    dup = {"Signature-Input": h["Signature-Input"] + "," + h["Signature-Input"], "Signature": h["Signature"]}
    reject("malformed Signature-Input header: a label appears twice", headers=dup)
    # two field lines of the same header (aiohttp)
    md = CIMultiDict(h)
    md.add("Signature", other["Signature"])
    reject("exactly one signature", headers=CIMultiDictProxy(md))
    reject("malformed Signature-Input header", headers={"Signature-Input": "", "Signature": ""})
    reject("labels differ", headers={**h, "Signature": h["Signature"].replace("sig1=", "sig9=")})


def test_malformed_structured_fields():
    h = signed()
    for bad in ('sig1=("@method" "@path"', "sig1=(@method)", "Sig1=()", 'sig1=("@method");created=', "sig1=()x", "sig1=(),"):
        reject("malformed Signature-Input header", headers={**h, "Signature-Input": bad})
    reject("malformed Signature-Input header: expected an inner list", headers={**h, "Signature-Input": 'sig1="x"'})
    # A repeated parameter: the later one counts (RFC 8941), and it is the one checked and signed over.
    reject("nonce must be 16-64", headers={**h, "Signature-Input": h["Signature-Input"] + ";nonce=\"again-and-again\""})
    reject("signature verification failed", headers={**h, "Signature-Input": h["Signature-Input"] + ";nonce=\"" + "n" * 20 + "\""})
    reject("a label appears twice", headers={**h, "Signature": h["Signature"] + ", " + h["Signature"]})
    for bad in ("sig1=:not base64!:", "sig1=:AAA:", "sig1=", "sig1=:" + "A" * 86 + "==:;"):
        reject("malformed Signature header", headers={**h, "Signature": bad})
    reject("expected a byte sequence", headers={**h, "Signature": 'sig1="abc"'})
    reject("64 bytes", headers={**h, "Signature": "sig1=:" + base64.b64encode(b"x" * 63).decode() + ":"})
    reject("repeated component", headers=hand_signed(components=["@method", "@path", "@query", "@path"]))
    reject("bad component identifier", headers=hand_signed(components=["@method", "@path", "@query", "Content-Type"], extra_headers={"Content-Type": "x"}))


def test_alg_must_be_ed25519():
    params = [("created", NOW), ("nonce", NONCE), ("keyid", "alice"), ("alg", "rsa-pss-sha512")]
    reject(r"unsupported alg \(expected ed25519\)", headers=hand_signed(params=params))
    # alg is optional
    assert verify("GET", "/v1/me", hand_signed(params=[("created", NOW), ("nonce", NONCE), ("keyid", "alice")]), None)


def test_unknown_signature_parameter():
    params = [("created", NOW), ("nonce", NONCE), ("keyid", "alice"), ("foo", "bar")]
    reject("unexpected signature parameter", headers=hand_signed(params=params))


def test_required_components():
    reject("does not cover @query", headers=hand_signed(components=["@method", "@path"]))
    reject("does not cover @method, @path", headers=hand_signed(components=["@query"]))
    # a body needs content-digest covered
    reject("does not cover content-digest", method="POST", headers=hand_signed("POST", body=BODY, components=["@method", "@path", "@query"]), body=BODY)
    # body not read yet (streamed): Content-Length or Transfer-Encoding tells
    h = hand_signed("PUT", "/v1/rooms/r/blobs", None)
    reject("does not cover content-digest", method="PUT", target="/v1/rooms/r/blobs", headers={**h, "Content-Length": "10"})
    reject("does not cover content-digest", method="PUT", target="/v1/rooms/r/blobs", headers={**h, "Transfer-Encoding": "chunked"})
    # Content-Length: 0 with no body is fine
    assert verify("PUT", "/v1/rooms/r/blobs", {**h, "Content-Length": "0"}, None)


def test_unsupported_components():
    reject("unsupported derived component", headers=hand_signed(components=["@method", "@path", "@query", "@authority"], extra_headers={"@authority": "x"}))
    h = hand_signed(components=["@method", "@path", "@query", "x-missing"], extra_headers={"x-missing": "v"})
    del h["x-missing"]
    reject("covered header x-missing is missing", headers=h)
    h = signed()
    h["Signature-Input"] = h["Signature-Input"].replace('"@query"', '"@query";req')
    reject("component parameters are not supported", headers=h)


def test_content_digest_checks():
    h = signed("POST", "/v1/rooms", BODY)
    reject("Content-Digest does not match the body", "POST", "/v1/rooms", h, BODY + b" ")
    no_digest = {k: v for k, v in h.items() if k != "Content-Digest"}
    reject("missing Content-Digest header", "POST", "/v1/rooms", no_digest, BODY)
    reject("malformed Content-Digest header", "POST", "/v1/rooms", {**h, "Content-Digest": "sha-256=abc"}, BODY)
    reject("sha-256 must be 32 bytes", "POST", "/v1/rooms", {**h, "Content-Digest": "sha-256=:AAAA:"}, BODY)
    sha512 = "sha-512=:" + base64.b64encode(hashlib.sha512(BODY).digest()).decode() + ":"
    h512 = hand_signed("POST", "/v1/rooms", BODY, extra_headers={"Content-Digest": sha512})
    reject("Content-Digest must include sha-256", "POST", "/v1/rooms", h512, BODY)
    # streamed body: the digest is returned for the caller to compare
    v = verify("POST", "/v1/rooms", {**h, "Content-Length": str(len(BODY))}, None)
    assert v.content_sha256 == hashlib.sha256(BODY).digest()
    # a covered digest is checked even for an empty body
    h_empty = signed("POST", "/v1/rooms", b"")
    assert verify("POST", "/v1/rooms", h_empty, b"").content_sha256 == hashlib.sha256(b"").digest()
    reject("does not match the body", "POST", "/v1/rooms", h_empty, b"x")
    # an unsigned Content-Digest on a request without a body is ignored
    g = signed("GET", "/v1/me")
    assert verify("GET", "/v1/me", {**g, "Content-Digest": content_digest(b"")}, b"").content_sha256 is None


def test_created_window():
    h = signed(created=NOW)
    assert verify("GET", "/v1/me", h, None, now=NOW + SKEW)
    assert verify("GET", "/v1/me", h, None, now=NOW - SKEW)
    reject("signature expired", headers=h, now=NOW + SKEW + 1)
    reject("created is in the future", headers=h, now=NOW - SKEW - 1)
    reject("missing created parameter", headers=hand_signed(params=[("nonce", NONCE), ("keyid", "alice")]))
    h = signed()
    h["Signature-Input"] = h["Signature-Input"].replace(f"created={NOW}", f'created="{NOW}"')
    reject("created must be an integer", headers=h)
    reject("signature expired \\(expires", headers=hand_signed(params=[("created", NOW), ("expires", NOW - SKEW - 1), ("nonce", NONCE), ("keyid", "alice")]))


def test_nonce_rules():
    reject("missing nonce parameter", headers=hand_signed(params=[("created", NOW), ("keyid", "alice")]))
    for bad in ("a" * 15, "b" * 65, "abcdefghijklmno!", "abcdefghijklmnop.", "abc defghijklmnopq", ""):
        h = hand_signed(params=[("created", NOW), ("nonce", bad), ("keyid", "alice")])
        reject(r"nonce must be 16-64 characters of \[A-Za-z0-9_-\]", headers=h)
    for good in ("a" * 16, "Z" * 64, "-_" * 8):
        assert verify("GET", "/v1/me", hand_signed(params=[("created", NOW), ("nonce", good), ("keyid", "alice")]), None)
    h = signed()
    h["Signature-Input"] = h["Signature-Input"].replace(f'nonce="{NONCE}"', "nonce=abcdefghijklmnopq")  # token, not string
    reject("nonce must be", headers=h)


def test_keyid_rules():
    reject("missing keyid parameter", headers=hand_signed(params=[("created", NOW), ("nonce", NONCE)]))
    reject("unknown keyid", headers=signed(keyid="mallory"))
    reject("keyid must be a non-empty string", headers=hand_signed(params=[("created", NOW), ("nonce", NONCE), ("keyid", "")]))


def test_tampering_is_rejected():
    h = signed("POST", "/v1/rooms/r1/keys?x=1", BODY)
    assert verify("POST", "/v1/rooms/r1/keys?x=1", h, BODY)
    bad_sig = "signature verification failed"
    reject("does not match the body", "POST", "/v1/rooms/r1/keys?x=1", h, BODY.replace(b"ops", b"opz"))
    reject(bad_sig, "POST", "/v1/rooms/r2/keys?x=1", h, BODY)  # path
    reject(bad_sig, "POST", "/v1/rooms/r1/keys?x=2", h, BODY)  # query
    reject(bad_sig, "POST", "/v1/rooms/r1/keys", h, BODY)  # query removed
    reject(bad_sig, "PUT", "/v1/rooms/r1/keys?x=1", h, BODY)  # method
    reject(bad_sig, "POST", "/v1/rooms/r1/keys?x=1", h, BODY, keys={"alice": OTHER.public_key()})  # wrong key
    # body and digest both replaced: the digest is signed
    evil = b'{"name": "evil"}'
    reject(bad_sig, "POST", "/v1/rooms/r1/keys?x=1", {**h, "Content-Digest": content_digest(evil)}, evil)
    # signed by someone else under alice's keyid
    reject(bad_sig, headers=signed(private_key=OTHER))
    # a GET signature replayed as a POST with a body
    g = signed("GET", "/v1/me")
    reject("does not cover content-digest", "POST", "/v1/me", {**g, "Content-Digest": content_digest(BODY)}, BODY)


def test_verify_in_two_steps():
    h = signed("POST", "/v1/rooms", BODY)
    pending = check_request("POST", "/v1/rooms", "", h, BODY, now=NOW, skew=SKEW)
    assert pending.keyid == "alice"
    assert pending.verify(PUB).nonce == NONCE
    with pytest.raises(SignatureError, match="unknown keyid"):
        pending.verify(None)


def test_sign_request_argument_errors():
    with pytest.raises(ValueError):
        sign_request("GET", "/v1/a b", None, keyid="alice", private_key=KEY)
    with pytest.raises(ValueError):
        sign_request("GET", "v1/me", None, keyid="alice", private_key=KEY)
    with pytest.raises(ValueError, match="nonce"):
        sign_request("GET", "/v1/me", None, keyid="alice", private_key=KEY, nonce="short")
    with pytest.raises(ValueError):
        sign_request("GET", "/v1/me", None, keyid="", private_key=KEY)
    # default nonces are fresh and valid
    n1 = re.search(r'nonce="([^"]+)"', sign_request("GET", "/v1/me", None, keyid="a", private_key=KEY)["Signature-Input"])
    n2 = re.search(r'nonce="([^"]+)"', sign_request("GET", "/v1/me", None, keyid="a", private_key=KEY)["Signature-Input"])
    assert n1[1] != n2[1] and len(n1[1]) == 32 and NONCE_RE.fullmatch(n1[1])


# ---------------------------------------------------------------------------
# Property tests

pchar = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@") + ["%20", "%2F", "%C3%A9"])
paths = st.lists(st.lists(pchar, max_size=8).map("".join), min_size=1, max_size=5).map(lambda segs: "/" + "/".join(segs))
queries = st.one_of(st.just(""), st.lists(st.one_of(pchar, st.sampled_from(["/", "?"])), min_size=1, max_size=20).map("".join))
methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
nonces = st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True)
keyids = st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True)
bodies = st.one_of(st.none(), st.binary(max_size=300))


@st.composite
def requests(draw):
    method = draw(methods)
    target = draw(paths)
    query = draw(queries)
    if query:
        target += "?" + query
    return dict(
        method=method,
        target=target,
        body=draw(bodies),
        keyid=draw(keyids),
        nonce=draw(nonces),
        created=NOW + draw(st.integers(-SKEW, SKEW)),
        label=draw(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)),
    )


def sign(r, key=KEY):
    return sign_request(r["method"], r["target"], r["body"], keyid=r["keyid"], private_key=key, created=r["created"], nonce=r["nonce"], label=r["label"])


@FAST
@given(requests())
def test_valid_requests_always_verify(r):
    h = sign(r)
    v = verify(r["method"], r["target"], h, r["body"], keys={r["keyid"]: PUB})
    assert v == Verified(
        r["keyid"], r["nonce"], r["created"], r["label"], None if r["body"] is None else hashlib.sha256(r["body"]).digest()
    )


MUTATIONS = ["body", "method", "path", "query", "digest", "created", "nonce", "keyid", "signature", "components"]


@FAST
@given(requests(), st.sampled_from(MUTATIONS), st.data())
def test_mutated_requests_are_rejected(r, what, data):
    h = sign(r)
    method, body = r["method"], r["body"]
    path, query = split_path_query(r["target"])
    if what == "body":
        if body:
            i = data.draw(st.integers(0, len(body) - 1))
            body = body[:i] + bytes([body[i] ^ data.draw(st.integers(1, 255))]) + body[i + 1 :]
        else:
            body = (body or b"") + b"x"
    elif what == "method":
        method = data.draw(methods.filter(lambda m: m != r["method"]))
    elif what == "path":
        i = data.draw(st.integers(0, len(path) - 1))
        c = data.draw(st.sampled_from("abxyzAB09/-_.").filter(lambda ch: ch != path[i]))
        path = path[:i] + c + path[i + 1 :]
    elif what == "query":
        query = data.draw(queries.filter(lambda q: q != query))
    elif what == "digest":
        other = data.draw(st.binary(min_size=1, max_size=50).filter(lambda b: b != r["body"]))
        h["Content-Digest"] = content_digest(other)
        body = other if data.draw(st.booleans()) else body
        if r["body"] is None and body is None:
            body = other  # a digest nobody signed, on a request that now has a body
    elif what == "created":
        delta = data.draw(st.integers(-SKEW, SKEW).filter(bool))
        h["Signature-Input"] = h["Signature-Input"].replace(f"created={r['created']}", f"created={r['created'] + delta}")
    elif what == "nonce":
        n = data.draw(nonces.filter(lambda n: n != r["nonce"]))
        h["Signature-Input"] = h["Signature-Input"].replace(f'nonce="{r["nonce"]}"', f'nonce="{n}"')
    elif what == "keyid":
        # another key registered under the claimed keyid
        h["Signature-Input"] = h["Signature-Input"].replace(f'keyid="{r["keyid"]}"', 'keyid="zz-other"')
    elif what == "signature":
        sig = bytearray(base64.b64decode(h["Signature"].split(":")[1]))
        sig[data.draw(st.integers(0, 63))] ^= 1 << data.draw(st.integers(0, 7))
        h["Signature"] = f"{r['label']}=:{base64.b64encode(bytes(sig)).decode()}:"
    elif what == "components":
        h["Signature-Input"] = h["Signature-Input"].replace('"@path" "@query"', '"@query" "@path"')
    keys = {r["keyid"]: PUB, "zz-other": OTHER.public_key()}
    with pytest.raises(SignatureError):
        verify_request(method, path, query, h, body, resolve_key=keys.get, now=NOW, skew=SKEW)


# The canonical form the fast path takes is its own re-serialization: http_sfv
# parses it and writes it back byte for byte (so both paths sign over the same text).


@FAST
@given(st.from_regex(signing._CANONICAL_INPUT, fullmatch=True))
def test_canonical_input_is_its_own_serialization(raw):
    label, _, sig_params = raw.partition("=")
    parsed = signing._parse_dictionary(raw)
    assert list(parsed) == [label] and str(parsed[label]) == sig_params
    ref = http_sf.parse(raw.encode(), tltype="dictionary")[label]
    assert [c for c, _ in ref[0]] == [i.value for i in parsed[label]] and dict(ref[1]) == dict(parsed[label].params)


# check_request's fast path for exactly what sign_request writes must give the
# same PendingSignature, or the same SignatureError reason, as the general path
# (_check_general) for every request around it.

b64_64 = st.binary(min_size=64, max_size=64).map(lambda b: base64.b64encode(b).decode())
# mostly "", sometimes what no signature base may hold
odd_text = st.sampled_from(["", "", "", "", "", "", "\n", "\r", "é", "\x00", " "])
mostly = st.sampled_from([True, True, True, True, False])


@st.composite
def canonical_inputs(draw):
    """(Signature-Input, label) in the canonical form, mostly with plausible values."""
    raw = draw(st.from_regex(signing._CANONICAL_INPUT, fullmatch=True))
    if draw(mostly):
        label = draw(st.from_regex(r"[a-z*][a-z0-9_.*-]{0,63}", fullmatch=True))
        digest = ' "content-digest"' if draw(st.booleans()) else ""
        created = NOW + draw(st.integers(-SKEW - 2, SKEW + 2))
        raw = (
            f'{label}=("@method" "@path" "@query"{digest});created={created};nonce="{draw(nonces)}";'
            f'keyid="{draw(st.from_regex(r"[A-Za-z0-9_.-]{1,128}", fullmatch=True))}";alg="ed25519"'
        )
    assert signing._CANONICAL_INPUT.fullmatch(raw)
    return raw, raw.partition("=")[0]


@st.composite
def around_canonical(draw):
    raw_input, label = draw(canonical_inputs())
    sig_label = label if draw(mostly) else draw(st.from_regex(r"[a-z][a-z0-9]{0,3}", fullmatch=True))
    if draw(mostly):
        raw_sig = f"{sig_label}=:{draw(b64_64)}:"  # canonical
    else:
        raw_sig = draw(
            st.one_of(
                b64_64.map(lambda v: f"{sig_label}=:{v}:;p"),
                st.binary(max_size=70).map(lambda b: f"{sig_label}=:{base64.b64encode(b).decode()}:"),
            )
        )
    body = draw(bodies)
    headers = {"Signature-Input": raw_input, "Signature": raw_sig}
    if draw(mostly if '"content-digest"' in raw_input else st.booleans()):
        digest_of = draw(st.sampled_from([body or b"", b"", b"other"]))
        headers["Content-Digest"] = draw(
            st.sampled_from(
                [
                    content_digest(digest_of),
                    "sha-512=:AAAA:, " + content_digest(digest_of),
                    "sha-256=:AAAA:",
                    "sha-256=abc",
                    content_digest(digest_of) + "\n",
                ]
            )
        )
    if draw(st.booleans()):
        headers["Content-Length"] = draw(st.sampled_from(["0", "1", "10", "-1", "abc", " 3 "]))
    if draw(st.booleans()):
        headers["Transfer-Encoding"] = "chunked"
    method = draw(methods) + draw(odd_text)
    path = draw(st.one_of(paths, st.just(""))) + draw(odd_text)
    query = draw(st.one_of(queries, odd_text))
    now = NOW + draw(st.integers(-3, 3)) + draw(st.sampled_from([0, 0.5]))
    if draw(st.booleans()):
        headers = CIMultiDictProxy(CIMultiDict([("Host", "127.0.0.1:8443"), *((k.lower(), v) for k, v in headers.items())]))
    return method, path, query, headers, body, now


def outcome(f, *args, **kw):
    try:
        return f(*args, **kw)
    except SignatureError as e:
        return e.reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(around_canonical())
def test_canonical_fast_path_agrees_with_general_path(r):
    method, path, query, headers, body, now = r
    fast = outcome(check_request, method, path, query, headers, body, now=now, skew=SKEW)
    raw_input = signing._get_header(headers, "signature-input")
    raw_sig = signing._get_header(headers, "signature")
    general = outcome(signing._check_general, method, path, query, headers, body, raw_input, raw_sig, now, SKEW)
    assert fast == general


@FAST
@given(requests())
def test_sign_request_output_takes_the_canonical_fast_path(r):
    h = sign(r)
    m = signing._CANONICAL_INPUT.fullmatch(h["Signature-Input"])
    assert m is not None and signing._FAST_SIGNATURE.fullmatch(h["Signature"])
    assert m.group(2) == h["Signature-Input"].partition("=")[2]  # the @signature-params text


SF_SAMPLES = [
    'sig1=("@method" "@path");created=1;keyid="a\\"b\\\\c";x=?1;y=tok/en:1;z=:AAEC:;w=-5;v=1.25',
    'a=1, b=?0;p, c=(1 2 "x");q=:AA==:, d',
    'sig1=( "@method"   "@path" );created=12',
    "k=*tok, l=-0",
]


@pytest.mark.parametrize("raw", SF_SAMPLES)
def test_sf_parser_matches_http_sf(raw):
    def plain(v):
        return float(v) if type(v).__name__ == "Decimal" else v

    ours = signing._parse_dictionary(raw)
    ref = http_sf.parse(raw.encode(), tltype="dictionary")
    assert list(ours) == list(ref)
    for key, member in ours.items():
        rv, rp = ref[key]
        assert {k: plain(v) for k, v in member.params.items()} == dict(rp)
        if hasattr(member, "value"):
            assert rv == plain(member.value)
        else:  # an inner list
            assert [(v, dict(p)) for v, p in rv] == [(plain(i.value), dict(i.params)) for i in member]


@pytest.mark.parametrize("raw", ["a=(1 2", "a=1,", "a=1 b=2", "a=\"x", "A=1", "a=1;", "a=1.2345", "a=1234567890123456", "a=(1)(2)"])
def test_sf_parser_rejects_like_http_sf(raw):
    with pytest.raises(signing._SFError):
        signing._parse_dictionary(raw)
    with pytest.raises(Exception):
        http_sf.parse(raw.encode(), tltype="dictionary")


@pytest.mark.parametrize("raw", ["a=:AA=:", "a=é", "a=1, a=2"])
def test_sf_parser_is_stricter_than_http_sf(raw):
    # bad base64 padding, non-ASCII, a repeated dictionary key: refused here
    with pytest.raises(signing._SFError):
        signing._parse_dictionary(raw)


# ---------------------------------------------------------------------------
# Cost of one verify: the direct implementation vs. the library's verifier.


def measure(number=2000, repeat=5):
    class Msg:
        def __init__(self, method, url, headers):
            self.method, self.url, self.headers = method, url, headers

    class V(HTTPMessageVerifier):
        max_clock_skew = datetime.timedelta(seconds=SKEW)

    body = b'{"name": "room-1", "note": "' + b"a" * 200 + b'"}'
    now = time.time()
    h = sign_request("POST", "/v1/rooms", body, keyid="alice", private_key=KEY)
    headers = CIMultiDictProxy(
        CIMultiDict({"Host": "127.0.0.1:8443", "Content-Type": "application/json", "Content-Length": str(len(body)), **h})
    )
    lib = V(signature_algorithm=algorithms.ED25519, key_resolver=MappingKeyResolver(public_keys={"alice": PUB}, private_keys={}))
    raw = PUB.public_bytes_raw()

    def library():
        lib.verify(
            Msg("POST", "https://127.0.0.1:8443/v1/rooms", headers),
            max_age=datetime.timedelta(seconds=SKEW),
            require_components=("@method", "@path", "@query", "content-digest"),
            body=body,
        )

    def direct():
        verify_request("POST", "/v1/rooms", "", headers, body, resolve_key=lambda k: raw, now=now, skew=SKEW)

    def direct_cryptography_key():
        verify_request("POST", "/v1/rooms", "", headers, body, resolve_key=lambda k: PUB, now=now, skew=SKEW)

    def checks_only():
        check_request("POST", "/v1/rooms", "", headers, body, now=now, skew=SKEW)

    def sign():
        sign_request("POST", "/v1/rooms", body, keyid="alice", private_key=KEY)

    out = {}
    for f in (library, direct, direct_cryptography_key, checks_only, sign):
        out[f.__name__] = min(timeit.repeat(f, number=number, repeat=repeat)) / number * 1e6
    return out


if __name__ == "__main__":
    for name, us in measure().items():
        print(f"{name:26s} {us:7.1f} µs")
