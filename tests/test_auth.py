"""
Tests for tinymq._auth: grants, API keys, JWTs, where tokens come from, and
the redaction of tokens from logged URIs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from autobahn.websocket.types import ConnectionRequest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web import http
from twisted.web.test.requesthelper import DummyRequest

from tinymq._auth import (
    ALLOW_ALL,
    MAX_TOKEN_LENGTH,
    Authenticator,
    Grant,
    authorize_publish,
    authorize_subscribe,
    parse_cookies,
    redact_query,
    token_from_handshake,
    token_from_request,
    token_from_web,
    www_authenticate,
)
from tinymq._config import Config
from tinymq._errors import Forbidden, InvalidTopic, Unauthorized
from tinymq._topics import matcher

NOW = 1_700_000_000.0
SECRET = "s" * 40
KEY = "k-0123456789abcdef-publisher"
READER = "r-0123456789abcdef-reader"


def _pem(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return str(path)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _claims(**extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "alice",
        "exp": int(NOW) + 60,
        "tinymq": {"publish": ["dashboard.>"], "subscribe": ["a.*"]},
    }
    claims.update(extra)
    return claims


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    reader_digest = hashlib.sha256(READER.encode()).hexdigest()
    return _write(
        tmp_path,
        "keys.toml",
        f"""
[keys.worker]
key = "{KEY}"
publish = ["dashboard.>"]

[keys.browser]
key_sha256 = "{reader_digest}"
subscribe = ["a.*", "dashboard.>"]
""",
    )


@pytest.fixture
def authenticator(keys_file: str) -> Authenticator:
    return Authenticator(Config(auth_keys=keys_file, jwt_secret=SECRET))


@pytest.fixture(scope="module")
def every_kind(
    tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey
) -> Authenticator:
    tmp_path = tmp_path_factory.mktemp("keys")
    keys = _write(tmp_path, "keys.toml", f'[keys.one]\nkey = "{KEY}"\n')
    return _authenticator_with_public_key(
        tmp_path, _pem(rsa_key.public_key()), jwt_secret=SECRET, auth_keys=keys
    )


def _authenticator_with_public_key(
    tmp_path: Path, public: bytes, **settings: Any
) -> Authenticator:
    path = _write(tmp_path, "public.pem", public)
    return Authenticator(Config(jwt_public_key=path, **settings))


# Grants


def test_star_grant_subscribes_to_one_level_only() -> None:
    """A subscribe grant of 'a.*' allows 'a.b' and 'a.*' but no wider pattern."""
    grant = Grant(subscribe=("a.*",))

    allowed = {p: grant.may_subscribe(p) for p in ("a.b", "a.*", "a.>", "c", ">")}

    assert allowed == {"a.b": True, "a.*": True, "a.>": False, "c": False, ">": False}
    assert grant.may_subscribe("a") is False
    assert grant.may_subscribe("a.b.c") is False


def test_tail_grant_subscribes_below_its_prefix() -> None:
    """A subscribe grant of 'a.>' allows every pattern under 'a.' and no other."""
    grant = Grant(subscribe=("a.>",))

    allowed = [grant.may_subscribe(p) for p in ("a.b.c", "a.*", "a.>", "a.*.>")]
    refused = [grant.may_subscribe(p) for p in ("a", ">", "*.b", "b.*", "*")]

    assert allowed == [True, True, True, True]
    assert refused == [False, False, False, False, False]


def test_subscribe_is_checked_against_the_union_of_grants() -> None:
    """Two grants that together cover a pattern allow it though neither does."""
    grant = Grant(subscribe=("a.*", "a.*.>"))

    assert grant.may_subscribe("a.>") is True
    assert Grant(subscribe=("a.*",)).may_subscribe("a.>") is False
    assert Grant(subscribe=("a.*.>",)).may_subscribe("a.>") is False


def test_literal_grants_never_cover_a_wildcard() -> None:
    """Named segments cannot cover '*', which also stands for unnamed ones."""
    grant = Grant(subscribe=("a.b", "a.c", "a.d"))

    assert grant.may_subscribe("a.*") is False
    assert grant.may_subscribe("a.c") is True


def test_everything_grant_allows_any_valid_pattern() -> None:
    """A grant of '>' allows every valid topic and pattern."""
    grant = Grant(publish=(">",), subscribe=(">",))

    assert [grant.may_subscribe(p) for p in (">", "*", "x.*.>", "x")] == [True] * 4
    assert grant.may_publish("any.topic-1") is True


def test_invalid_names_are_never_allowed() -> None:
    """Invalid topics and patterns are refused even by the widest grant."""
    grant = ALLOW_ALL

    assert grant.may_publish("a.*") is False
    assert grant.may_publish("a..b") is False
    assert grant.may_subscribe("a.>.b") is False
    assert grant.may_subscribe("") is False


def test_publish_follows_the_publish_patterns() -> None:
    """may_publish is true exactly for topics a publish pattern matches."""
    grant = Grant(publish=("dashboard.>", "alerts.*"), subscribe=(">",))

    checks = {
        t: grant.may_publish(t)
        for t in ("dashboard.cpu", "dashboard.cpu.0", "alerts.x", "alerts.x.y", "x")
    }

    assert checks == {
        "dashboard.cpu": True,
        "dashboard.cpu.0": True,
        "alerts.x": True,
        "alerts.x.y": False,
        "x": False,
    }


def test_empty_grant_allows_nothing() -> None:
    """A grant without patterns allows neither publishing nor subscribing."""
    grant = Grant()

    assert grant.may_publish("a") is False
    assert grant.may_subscribe("a") is False


@pytest.mark.parametrize("bad", ["a.>.b", "", "a b", "a..b"])
def test_grant_refuses_invalid_patterns(bad: str) -> None:
    """A grant cannot be built from an invalid pattern."""
    with pytest.raises(ValueError, match="not a valid subscribe pattern"):
        Grant(subscribe=(bad,))


def test_grant_refuses_a_bare_string() -> None:
    """A string where a list of patterns belongs is an error, not its letters."""
    with pytest.raises(ValueError, match="must be a list"):
        Grant(publish="abc")  # type: ignore[arg-type]


def test_grant_expiry() -> None:
    """A grant with an expiry is expired from that second on; one without never."""
    grant = Grant(expires=NOW)

    assert grant.expired(NOW - 0.5) is False
    assert grant.expired(NOW) is True
    assert Grant().expired(NOW * 10) is False


_SEGMENT = st.sampled_from(["a", "b"])
_PATTERN_SEGMENT = st.sampled_from(["a", "b", "*"])


@st.composite
def _patterns(draw: st.DrawFn) -> str:
    segments = draw(st.lists(_PATTERN_SEGMENT, min_size=1, max_size=3))
    if draw(st.booleans()):
        segments.append(">")
    return ".".join(segments)


def _brute_force_covers(pattern: str, grants: list[str]) -> bool:
    # Topics over the pattern alphabet plus a segment no pattern names, one
    # segment longer than the longest pattern: matching cannot tell longer
    # topics or other unnamed segments from these.
    longest = max(len(p.split(".")) for p in [pattern, *grants])
    wanted = matcher(pattern)
    granted = [matcher(g) for g in grants]
    for length in range(1, longest + 2):
        for segments in itertools.product(["a", "b", "z"], repeat=length):
            topic = ".".join(segments)
            if wanted(topic) and not any(allows(topic) for allows in granted):
                return False
    return True


@settings(max_examples=600, deadline=None)
@given(pattern=_patterns(), grants=st.lists(_patterns(), max_size=3))
def test_subscribe_check_agrees_with_brute_force(
    pattern: str, grants: list[str]
) -> None:
    """may_subscribe agrees with enumerating every topic over small alphabets."""
    grant = Grant(subscribe=tuple(grants))

    assert grant.may_subscribe(pattern) is _brute_force_covers(pattern, grants)


@given(
    topic=st.lists(_SEGMENT, min_size=1, max_size=4).map(".".join),
    grants=st.lists(_patterns(), max_size=3),
)
def test_publish_check_agrees_with_matching(topic: str, grants: list[str]) -> None:
    """may_publish is true exactly when some publish pattern matches the topic."""
    grant = Grant(publish=tuple(grants))

    expected = any(matcher(g)(topic) for g in grants)

    assert grant.may_publish(topic) is expected


# authorize_publish and authorize_subscribe


def test_authorize_subscribe_refuses_with_403() -> None:
    """A token for 'a.*' may subscribe to 'a.b' but gets 403 for 'c'."""
    grant = Grant(subscribe=("a.*",))

    authorize_subscribe(grant, "a.b")
    with pytest.raises(Forbidden) as caught:
        authorize_subscribe(grant, "c")

    assert caught.value.status == 403
    assert caught.value.code == "forbidden"
    assert "'c'" in caught.value.message


def test_authorize_publish_refuses_with_403() -> None:
    """Publishing outside the publish patterns is a 403 naming the topic."""
    grant = Grant(publish=("dashboard.>",))

    authorize_publish(grant, "dashboard.cpu")
    with pytest.raises(Forbidden) as caught:
        authorize_publish(grant, "other")

    assert caught.value.status == 403
    assert caught.value.message == "This token may not publish to 'other'."


def test_authorize_checks_the_name_first() -> None:
    """An invalid topic or pattern is a 400 even for a grant that allows nothing."""
    with pytest.raises(InvalidTopic):
        authorize_publish(Grant(), "a.*")
    with pytest.raises(InvalidTopic):
        authorize_subscribe(Grant(), "a..b")


def test_authorize_with_a_clock_refuses_expired_grants() -> None:
    """Given the time, authorization of an expired grant is a 401."""
    grant = Grant(publish=(">",), subscribe=(">",), expires=NOW)

    authorize_publish(grant, "a", now=NOW - 1)
    with pytest.raises(Unauthorized):
        authorize_publish(grant, "a", now=NOW)
    with pytest.raises(Unauthorized):
        authorize_subscribe(grant, "a", now=NOW + 1)


def test_www_authenticate() -> None:
    """The 401 challenge says invalid_token only when a token was given."""
    assert www_authenticate(False) == b'Bearer realm="tinymq"'
    assert www_authenticate(True) == b'Bearer realm="tinymq", error="invalid_token"'


# Authenticator: on and off


def test_disabled_allows_everything() -> None:
    """With no auth setting, any token or none gets the allow-all grant."""
    authenticator = Authenticator(Config())

    assert authenticator.enabled is False
    assert authenticator.authenticate(None, NOW) is ALLOW_ALL
    assert authenticator.authenticate("garbage", NOW) is ALLOW_ALL
    assert authenticator.describe().startswith("Authentication is off")


def test_each_setting_turns_authentication_on(
    tmp_path: Path, keys_file: str, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """Each of auth_keys, jwt_secret and jwt_public_key turns auth on alone."""
    public = _write(tmp_path, "ec.pem", _pem(ec_key.public_key()))

    configs = [
        Config(auth_keys=keys_file),
        Config(jwt_secret=SECRET),
        Config(jwt_public_key=public),
    ]

    assert [Authenticator(c).enabled for c in configs] == [True, True, True]
    assert [Authenticator(c).algorithms for c in configs] == [
        (),
        ("HS256",),
        ("ES256",),
    ]


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token_is_401(authenticator: Authenticator, token: str | None) -> None:
    """Without a token an enabled authenticator answers 401."""
    with pytest.raises(Unauthorized) as caught:
        authenticator.authenticate(token, NOW)

    assert caught.value.status == 401
    assert caught.value.code == "unauthorized"


@pytest.mark.parametrize(
    "token",
    ["x" * (MAX_TOKEN_LENGTH + 1), "caf\u00e9-0123456789abcdef", "a b c", "\udcff"],
)
def test_unusable_token_text_is_401(authenticator: Authenticator, token: str) -> None:
    """Overlong, non-ASCII and spaced tokens are refused without a crash."""
    with pytest.raises(Unauthorized, match="The token is not valid."):
        authenticator.authenticate(token, NOW)


# API keys


def test_api_key_gets_its_grant(authenticator: Authenticator) -> None:
    """A listed key gets the patterns and the name its entry gives."""
    grant = authenticator.authenticate(KEY, NOW)

    assert grant == Grant(publish=("dashboard.>",), subject="key:worker")
    assert grant.expires is None


def test_hashed_api_key_gets_its_grant(authenticator: Authenticator) -> None:
    """A key listed by its SHA-256 digest is recognised from the key itself."""
    grant = authenticator.authenticate(READER, NOW)

    assert grant == Grant(subscribe=("a.*", "dashboard.>"), subject="key:browser")


def test_publish_key_cannot_subscribe(authenticator: Authenticator) -> None:
    """A publish-only key gets 403 when it subscribes, even to its own topics."""
    grant = authenticator.authenticate(KEY, NOW)

    authorize_publish(grant, "dashboard.cpu")
    with pytest.raises(Forbidden):
        authorize_subscribe(grant, "dashboard.cpu")


@pytest.mark.parametrize("token", [KEY[:-1], KEY + "x", KEY.upper(), "nope"])
def test_unknown_key_is_401(authenticator: Authenticator, token: str) -> None:
    """A key that is not listed exactly is refused with 401."""
    with pytest.raises(Unauthorized, match="The token is not valid."):
        authenticator.authenticate(token, NOW)


def test_keys_are_compared_in_constant_time_against_every_key(
    authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each attempt runs hmac.compare_digest against every key, match or not."""
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)

    authenticator.authenticate(KEY, NOW)
    first = len(calls)
    with pytest.raises(Unauthorized):
        authenticator.authenticate("not-a-key-0123456789", NOW)

    assert first == 2
    assert len(calls) == 4
    assert {len(a) for a, b in calls} | {len(b) for a, b in calls} == {32}


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ('key = "short"', "16 characters or more"),
        ('key = "has a space in it 0123"', "printable ASCII"),
        ('key_sha256 = "abc"', "64 hexadecimal digits"),
        ("publish = []", "exactly one of 'key' and 'key_sha256'"),
        ('key = "0123456789abcdefgh"\nsubcribe = ["a"]', "unknown fields: subcribe"),
        ('key = "0123456789abcdefgh"\npublish = ["a.>.b"]', "not a valid publish"),
        ('key = "0123456789abcdefgh"\npublish = "a"', "must be lists of patterns"),
    ],
)
def test_bad_key_entries_are_refused_at_start(
    tmp_path: Path, entry: str, complaint: str
) -> None:
    """A key entry that cannot be used stops the start with the file and name."""
    path = _write(tmp_path, "keys.toml", f"[keys.svc]\n{entry}\n")

    with pytest.raises(ValueError) as caught:
        Authenticator(Config(auth_keys=path))

    assert str(caught.value).startswith(f"{path}: [keys.svc]: ")
    assert complaint in str(caught.value)
    assert "0123456789abcdefgh" not in str(caught.value)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    """Two entries with the same key, plain or hashed, stop the start."""
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path = _write(
        tmp_path,
        "keys.toml",
        f'[keys.one]\nkey = "{KEY}"\n[keys.two]\nkey_sha256 = "{digest}"\n',
    )

    with pytest.raises(ValueError, match=r"\[keys.two\]: the same key is listed"):
        Authenticator(Config(auth_keys=path))


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("[other]\n", "unknown tables: other"),
        ("keys = 3\n", "must be a table"),
        ("[keys\n", "Expected"),
    ],
)
def test_bad_keys_files_are_refused(
    tmp_path: Path, content: str, complaint: str
) -> None:
    """A keys file that is not the documented TOML shape stops the start."""
    path = _write(tmp_path, "keys.toml", content)

    with pytest.raises(ValueError, match=complaint):
        Authenticator(Config(auth_keys=path))


def test_missing_keys_file_is_refused(tmp_path: Path) -> None:
    """A keys file that cannot be read stops the start, naming the file."""
    path = str(tmp_path / "absent.toml")

    with pytest.raises(ValueError, match="absent.toml: No such file"):
        Authenticator(Config(auth_keys=path))


# JWT: HS256


def test_hs256_token_gets_its_claims(authenticator: Authenticator) -> None:
    """A valid HS256 token gets its tinymq claim, its subject and its expiry."""
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")

    grant = authenticator.authenticate(token, NOW)

    assert grant == Grant(
        publish=("dashboard.>",),
        subscribe=("a.*",),
        expires=NOW + 60,
        subject="jwt:alice",
    )


def test_token_for_a_star_subscribes_to_one_level(
    authenticator: Authenticator,
) -> None:
    """A JWT whose claim allows 'a.*' may subscribe to 'a.b' but not to 'c'."""
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    grant = authenticator.authenticate(token, NOW)

    authorize_subscribe(grant, "a.b")
    with pytest.raises(Forbidden):
        authorize_subscribe(grant, "c")


@pytest.mark.parametrize("offset", [0, -1, -3600])
def test_expired_token_is_401(authenticator: Authenticator, offset: int) -> None:
    """A token is refused from its exp second on."""
    token = jwt.encode(_claims(exp=int(NOW) + offset), SECRET, algorithm="HS256")

    with pytest.raises(Unauthorized, match="The token has expired."):
        authenticator.authenticate(token, NOW)


def test_token_uses_the_callers_clock(authenticator: Authenticator) -> None:
    """Expiry is judged by the time passed in, not the machine's clock."""
    token = jwt.encode(_claims(exp=int(NOW) + 10), SECRET, algorithm="HS256")

    assert authenticator.authenticate(token, NOW + 9).expires == NOW + 10
    with pytest.raises(Unauthorized):
        authenticator.authenticate(token, NOW + 10)


def test_token_before_nbf_is_401(authenticator: Authenticator) -> None:
    """A token is refused before its nbf second."""
    token = jwt.encode(_claims(nbf=int(NOW) + 5), SECRET, algorithm="HS256")

    with pytest.raises(Unauthorized, match="not valid yet"):
        authenticator.authenticate(token, NOW)
    assert authenticator.authenticate(token, NOW + 5).subject == "jwt:alice"


def test_token_without_exp_never_expires(authenticator: Authenticator) -> None:
    """A token without exp is accepted and its grant has no expiry."""
    claims = _claims()
    del claims["exp"]
    token = jwt.encode(claims, SECRET, algorithm="HS256")

    assert authenticator.authenticate(token, NOW).expires is None


@pytest.mark.parametrize("exp", [float("nan"), float("inf"), "soon", True])
def test_odd_exp_is_401(authenticator: Authenticator, exp: object) -> None:
    """An exp that is not a finite number is refused, so NaN cannot live forever."""
    token = jwt.encode(_claims(exp=exp), SECRET, algorithm="HS256")

    with pytest.raises(Unauthorized, match="'exp' claim is not a"):
        authenticator.authenticate(token, NOW)


def test_wrong_signature_is_401(authenticator: Authenticator) -> None:
    """A token signed with another secret is refused."""
    token = jwt.encode(_claims(), "o" * 40, algorithm="HS256")

    with pytest.raises(Unauthorized, match="signature does not verify"):
        authenticator.authenticate(token, NOW)


def test_tampered_claims_are_401(authenticator: Authenticator) -> None:
    """Changing the claims of a signed token breaks its signature."""
    header, _, signature = jwt.encode(_claims(), SECRET, algorithm="HS256").split(".")
    wider = _claims(tinymq={"publish": [">"], "subscribe": [">"]})
    payload = _b64(json.dumps(wider).encode())

    with pytest.raises(Unauthorized, match="signature does not verify"):
        authenticator.authenticate(f"{header}.{payload}.{signature}", NOW)


def test_alg_none_is_401(authenticator: Authenticator) -> None:
    """An unsigned token (alg none) is refused."""
    header = _b64(b'{"alg":"none","typ":"JWT"}')
    payload = _b64(json.dumps(_claims()).encode())

    for token in (f"{header}.{payload}.", f"{header}.{payload}.AAAA"):
        with pytest.raises(Unauthorized, match="must be signed with HS256"):
            authenticator.authenticate(token, NOW)


def test_hs256_signed_with_the_public_key_is_401(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """An HS256 token whose secret is the RSA public key PEM is refused."""
    public = _pem(rsa_key.public_key())
    authenticator = _authenticator_with_public_key(tmp_path, public)
    signing_input = (
        _b64(b'{"alg":"HS256","typ":"JWT"}')
        + "."
        + _b64(json.dumps(_claims()).encode())
    )
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()

    with pytest.raises(Unauthorized, match="must be signed with RS256"):
        authenticator.authenticate(signing_input + "." + _b64(mac), NOW)


def test_confusion_is_401_with_secret_and_key_both_set(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """With both configured, HS256 verifies only with the secret, never the PEM."""
    public = _pem(rsa_key.public_key())
    authenticator = _authenticator_with_public_key(tmp_path, public, jwt_secret=SECRET)
    signing_input = (
        _b64(b'{"alg":"HS256","typ":"JWT"}')
        + "."
        + _b64(json.dumps(_claims()).encode())
    )
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    rs256 = jwt.encode(_claims(), rsa_key, algorithm="RS256")

    with pytest.raises(Unauthorized, match="signature does not verify"):
        authenticator.authenticate(signing_input + "." + _b64(mac), NOW)
    assert authenticator.authenticate(rs256, NOW).subject == "jwt:alice"
    assert authenticator.algorithms == ("HS256", "RS256")


@pytest.mark.parametrize(
    ("settings", "claims", "message"),
    [
        ({"jwt_audience": "tinymq"}, {"aud": "other"}, "another audience"),
        ({"jwt_audience": "tinymq"}, {}, "lacks the 'aud' claim"),
        ({}, {"aud": "other"}, "another audience"),
        ({"jwt_issuer": "issuer-1"}, {"iss": "evil"}, "another issuer"),
        ({"jwt_issuer": "issuer-1"}, {}, "lacks the 'iss' claim"),
    ],
)
def test_audience_and_issuer_are_checked(
    settings: dict[str, str], claims: dict[str, str], message: str
) -> None:
    """Wrong or missing aud and iss are refused when configured; aud always."""
    authenticator = Authenticator(Config(jwt_secret=SECRET, **settings))
    token = jwt.encode(_claims(**claims), SECRET, algorithm="HS256")

    with pytest.raises(Unauthorized, match=message):
        authenticator.authenticate(token, NOW)


def test_matching_audience_and_issuer_are_accepted() -> None:
    """A token with the configured aud and iss is accepted."""
    authenticator = Authenticator(
        Config(jwt_secret=SECRET, jwt_audience="tinymq", jwt_issuer="id")
    )
    token = jwt.encode(
        _claims(aud=["x", "tinymq"], iss="id"), SECRET, algorithm="HS256"
    )

    assert authenticator.authenticate(token, NOW).subject == "jwt:alice"


@pytest.mark.parametrize(
    ("tinymq", "message"),
    [
        (None, "has no 'tinymq' claim"),
        (["a"], "has no 'tinymq' claim"),
        ({"publish": "a"}, "'tinymq.publish' is not a list of strings"),
        ({"subscribe": [1]}, "'tinymq.subscribe' is not a list of strings"),
        ({"subscribe": ["a.>.b"]}, "holds an invalid topic pattern"),
    ],
)
def test_bad_tinymq_claims_are_401(
    authenticator: Authenticator, tinymq: object, message: str
) -> None:
    """A token whose tinymq claim is missing or malformed is refused."""
    claims = _claims(tinymq=tinymq)
    if tinymq is None:
        del claims["tinymq"]
    token = jwt.encode(claims, SECRET, algorithm="HS256")

    with pytest.raises(Unauthorized, match=message):
        authenticator.authenticate(token, NOW)


def test_errors_never_contain_the_token(authenticator: Authenticator) -> None:
    """No refusal message repeats any part of the token it refuses."""
    tokens = [
        KEY + "x",
        jwt.encode(_claims(exp=1), SECRET, algorithm="HS256"),
        jwt.encode(_claims(), "o" * 40, algorithm="HS256"),
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.bad",
    ]

    for token in tokens:
        with pytest.raises(Unauthorized) as caught:
            authenticator.authenticate(token, NOW)
        for part in token.split("."):
            assert part not in caught.value.message


_TOKEN_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=120)


@settings(max_examples=300, deadline=None)
@given(
    token=st.one_of(
        _TOKEN_TEXT,
        st.lists(
            st.one_of(
                st.binary(max_size=60).map(_b64),
                st.just("eyJhbGciOiJIUzI1NiJ9"),
                st.just(_b64(b'{"alg":"RS256"}')),
            ),
            min_size=3,
            max_size=3,
        ).map(".".join),
    )
)
def test_random_tokens_are_only_ever_401(every_kind: Authenticator, token: str) -> None:
    """Whatever text comes as a token, the answer is 401 and nothing else."""
    with pytest.raises(Unauthorized):
        every_kind.authenticate(token, NOW)


# JWT: public keys


def test_rs256_token_gets_its_claims(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """A token signed with the RSA private key verifies with its public key."""
    authenticator = _authenticator_with_public_key(tmp_path, _pem(rsa_key.public_key()))
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256")

    grant = authenticator.authenticate(token, NOW)

    assert grant.subscribe == ("a.*",)
    assert grant.expires == NOW + 60


def test_es256_token_gets_its_claims(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """A token signed with the P-256 private key verifies with its public key."""
    authenticator = _authenticator_with_public_key(tmp_path, _pem(ec_key.public_key()))
    token = jwt.encode(_claims(), ec_key, algorithm="ES256")

    assert authenticator.authenticate(token, NOW).publish == ("dashboard.>",)


def test_es256_token_of_another_key_is_401(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """A token signed by a different EC key is refused."""
    authenticator = _authenticator_with_public_key(tmp_path, _pem(ec_key.public_key()))
    other = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(_claims(), other, algorithm="ES256")

    with pytest.raises(Unauthorized, match="signature does not verify"):
        authenticator.authenticate(token, NOW)


def test_other_algorithm_of_the_same_family_is_401(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Only the pinned algorithm is accepted, not its RS512 or PS256 siblings."""
    authenticator = _authenticator_with_public_key(tmp_path, _pem(rsa_key.public_key()))

    for algorithm in ("RS512", "PS256"):
        token = jwt.encode(_claims(), rsa_key, algorithm=algorithm)
        with pytest.raises(Unauthorized, match="must be signed with RS256"):
            authenticator.authenticate(token, NOW)


def test_certificate_file_is_accepted(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """A PEM certificate may stand in for the public key it holds."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime(2020, 1, 1, tzinfo=UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=1))
        .sign(ec_key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    authenticator = _authenticator_with_public_key(tmp_path, pem)
    token = jwt.encode(_claims(), ec_key, algorithm="ES256")

    assert authenticator.authenticate(token, NOW).subject == "jwt:alice"


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    ("make", "complaint"),
    [
        (lambda key: _private_pem(key), "not a PEM public key"),
        (lambda key: b"hello", "not a PEM public key"),
        (
            lambda key: _pem(
                rsa.generate_private_key(
                    public_exponent=65537, key_size=1024
                ).public_key()
            ),
            "2048 bits or more",
        ),
        (
            lambda key: _pem(ec.generate_private_key(ec.SECP256K1()).public_key()),
            "P-256, P-384 or P-521",
        ),
    ],
)
def test_unusable_public_key_files_are_refused(
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    make: Callable[[rsa.RSAPrivateKey], bytes],
    complaint: str,
) -> None:
    """A private key, junk, a short RSA key or an odd curve stops the start."""
    path = _write(tmp_path, "key.pem", make(rsa_key))

    with pytest.raises(ValueError, match=complaint):
        Authenticator(Config(jwt_public_key=path))


def test_short_secret_is_refused() -> None:
    """An HS256 secret under 32 bytes stops the start without showing it."""
    with pytest.raises(ValueError) as caught:
        Authenticator(Config(jwt_secret="short-secret"))

    assert "32 bytes or more" in str(caught.value)
    assert "short-secret" not in str(caught.value)


# Where the token comes from


def test_bearer_header_comes_first() -> None:
    """The Authorization Bearer token wins over the cookie and the query."""
    token = token_from_request(
        {"Authorization": "Bearer  h.t "},
        {"tinymq_token": "c"},
        {"token": ["q"]},
    )

    assert token == "h.t"


def test_bearer_scheme_and_header_name_are_case_insensitive() -> None:
    """'authorization: bearer x' is read like 'Authorization: Bearer x'."""
    assert token_from_request({"authorization": "bearer x"}, {}, {}) == "x"
    assert token_from_request({"AUTHORIZATION": "BEARER y"}, {}, {}) == "y"


def test_cookie_comes_before_the_query() -> None:
    """Without a Bearer header the cookie wins over the query parameter."""
    token = token_from_request(
        {"Authorization": "Basic dXNlcjpwYXNz"}, {"tinymq_token": "c"}, {"token": ["q"]}
    )

    assert token == "c"


def test_query_token_is_the_last_resort() -> None:
    """The first token query parameter is used when nothing else carries one."""
    token = token_from_request({}, {"other": "x"}, {"token": ["q1", "q2"]})

    assert token == "q1"


def test_no_token_anywhere() -> None:
    """Empty or absent places give no token at all."""
    nothing = token_from_request(
        {"Authorization": "Bearer "}, {"tinymq_token": ""}, {"token": [""]}
    )

    assert nothing is None
    assert token_from_request({}, {}, {}) is None


def test_cookie_name_comes_from_the_config() -> None:
    """The authenticator reads the cookie that auth_cookie names."""
    authenticator = Authenticator(Config(jwt_secret=SECRET, auth_cookie="sess"))

    token = authenticator.token_from_request(
        {}, {"tinymq_token": "wrong", "sess": "right"}, {}
    )

    assert token == "right"


def test_parse_cookies() -> None:
    """Cookie headers split on ';', drop quotes and keep the first of a name."""
    cookies = parse_cookies(['a=1; tinymq_token="t.u"; a=2', "b=3;junk;=4"])

    assert cookies == {"a": "1", "tinymq_token": "t.u", "b": "3"}


def test_token_from_twisted_web_request() -> None:
    """A twisted.web request gives its token from headers, cookies or query."""
    bearer = DummyRequest([b"api"])
    bearer.requestHeaders.setRawHeaders(b"authorization", [b"Bearer h"])
    cookie = DummyRequest([b"api"])
    cookie.requestHeaders.setRawHeaders(b"cookie", [b"x=1", b"sess=c"])
    query = DummyRequest([b"api"])
    query.args = {b"token": [b"q"]}

    tokens = [token_from_web(r, "sess") for r in (bearer, cookie, query)]

    assert tokens == ["h", "c", "q"]
    assert token_from_web(DummyRequest([b"api"])) is None


def _handshake(headers: dict[str, str], params: dict[str, list[str]]) -> Any:
    return ConnectionRequest(
        "tcp:127.0.0.1:5000", headers, "localhost", "/ws", params, 13, None, [], []
    )


def test_token_from_websocket_handshake() -> None:
    """An Autobahn handshake gives its token from headers, cookies or query."""
    requests = [
        _handshake({"authorization": "Bearer h", "cookie": "tinymq_token=c"}, {}),
        _handshake({"cookie": "a=b; tinymq_token=c"}, {"token": ["q"]}),
        _handshake({}, {"token": ["q"]}),
    ]

    tokens = [token_from_handshake(r) for r in requests]

    assert tokens == ["h", "c", "q"]
    assert token_from_handshake(_handshake({}, {})) is None


# Redaction


@pytest.mark.parametrize(
    ("uri", "redacted"),
    [
        (b"/api/sse?token=abc&last=5", b"/api/sse?token=***&last=5"),
        (b"/x?a=1&token=abc", b"/x?a=1&token=***"),
        (b"/x?token=a&token=b", b"/x?token=***&token=***"),
        (b"/x?%74oken=abc", b"/x?%74oken=***"),
        (b"/x?a=1;token=abc", b"/x?a=1;token=***"),
        (b"/x?token=abc;def&b=2", b"/x?token=***&b=2"),
        (b"/x?z;token=abc", b"/x?z;token=***"),
        (b"/x?TOKEN=abc", b"/x?TOKEN=***"),
        (b"/x?mytoken=abc&token", b"/x?mytoken=abc&***"),
        (b"/x?token%3Dsecret&y=1", b"/x?***&y=1"),
        (b"/x?token%00=secret", b"/x?***"),
        (b"/x", b"/x"),
        (b"/x?", b"/x?"),
        (b"/x?token=abc#f", b"/x?token=***"),
    ],
)
def test_redact_query(uri: bytes, redacted: bytes) -> None:
    """Every spelling of the token parameter loses its value; the rest stays."""
    assert redact_query(uri) == redacted


_QUERY_BYTES = st.lists(
    st.sampled_from([b"token", b"%74", b"oken", b"=", b"&", b";", b"+", b"x", b"%"]),
    max_size=12,
).map(b"".join)


@settings(max_examples=500)
@given(query=_QUERY_BYTES)
def test_redacted_query_never_parses_to_a_token(query: bytes) -> None:
    """Neither Twisted's nor the stdlib's query parser finds a token value left."""
    redacted = redact_query(b"/api/sse?" + query).partition(b"?")[2]

    twisted_values = http.parse_qs(redacted, keep_blank_values=True).get(b"token", [])
    stdlib_values = urllib.parse.parse_qs(
        redacted.decode("latin-1"), keep_blank_values=True
    ).get("token", [])

    assert set(twisted_values) <= {b"***", b""}
    assert set(stdlib_values) <= {"***", ""}
