"""
Who may publish and subscribe to what.

A request carries a token: a static API key from the keys file, or a JWT
signed with the configured secret or key pair. L{Authenticator} turns the
token into a L{Grant}, the topic patterns the token may publish to and
subscribe to; L{authorize_publish} and L{authorize_subscribe} check a topic
or pattern against it. Authentication is off until C{auth_keys},
C{jwt_secret} or C{jwt_public_key} is set; then a request without a usable
token is refused with 401 and a topic the token does not allow with 403.

Tokens are secrets: no function here logs one or puts one in an error
message, and L{redact_query} removes the C{token} query parameter from a
URI before it is logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias
from urllib.parse import unquote_to_bytes

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ._config import Config
from ._errors import Forbidden, InvalidTopic, Unauthorized
from ._topics import matcher, validate_pattern, validate_topic

if TYPE_CHECKING:
    from autobahn.websocket.types import ConnectionRequest
    from twisted.web.iweb import IRequest

TOKEN_PARAMETER = "token"
"""The query parameter that may carry the token."""

DEFAULT_COOKIE = "tinymq_token"
"""The cookie that may carry the token unless C{auth_cookie} names another."""

MAX_TOKEN_LENGTH = 8192
"""Longer tokens are refused before any work is spent on them."""

MIN_KEY_LENGTH = 16
"""Characters an API key must have at least."""

MIN_SECRET_LENGTH = 32
"""Bytes an HS256 secret must have at least (RFC 7518, section 3.2)."""

_CLAIM = "tinymq"
_KEY_FIELDS = frozenset({"key", "key_sha256", "publish", "subscribe"})
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}\Z")
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

_VerifyKey: TypeAlias = bytes | rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _patterns(patterns: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        raise ValueError(f"the {what} patterns must be a list, not a string")
    checked = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"a {what} pattern is not a string: {pattern!r}")
        try:
            checked.append(validate_pattern(pattern))
        except InvalidTopic as error:
            raise ValueError(
                f"{pattern!r} is not a valid {what} pattern: {error.message}"
            ) from None
    return tuple(checked)


def _covers(pattern: tuple[str, ...], grants: list[tuple[str, ...]]) -> bool:
    """
    Tell whether every topic that C{pattern} matches is matched by one of
    C{grants}; all are lists of segments, validated.

    The segments of a topic range over an unbounded set, so a C{*} of the
    pattern can stand for a segment that no grant names: only grants with a
    C{*} at that place match it, and whatever they cover they also cover for
    the named segments. A C{>} of the pattern is one segment followed by
    either nothing or C{>} again. Topic length limits are ignored, which can
    only refuse a pattern that is covered, never allow one that is not.
    """
    while True:
        if not pattern:
            return any(not grant for grant in grants)
        if (">",) in grants:
            # The pattern still needs one segment or more; '>' takes them all.
            return True
        head = pattern[0]
        grants = [grant[1:] for grant in grants if grant and grant[0] in ("*", head)]
        if head == ">":
            if not any(not grant for grant in grants):
                return False
        else:
            pattern = pattern[1:]


@dataclasses.dataclass(frozen=True)
class Grant:
    """
    What one credential may do: the topic patterns it may publish to and
    subscribe to, until C{expires} (epoch seconds) if that is set.

    C{subject} names the credential (C{key:<name>} or C{jwt:<sub>}), for
    per-credential limits and logs; it is never the secret.
    """

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    expires: float | None = None
    subject: str | None = None
    _publishers: tuple[Callable[[str], bool], ...] = dataclasses.field(
        init=False, repr=False, compare=False
    )
    _subscribers: list[tuple[str, ...]] = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        publish = _patterns(self.publish, "publish")
        subscribe = _patterns(self.subscribe, "subscribe")
        object.__setattr__(self, "publish", publish)
        object.__setattr__(self, "subscribe", subscribe)
        object.__setattr__(self, "_publishers", tuple(map(matcher, publish)))
        object.__setattr__(
            self, "_subscribers", [tuple(p.split(".")) for p in subscribe]
        )

    def may_publish(self, topic: str) -> bool:
        """Tell whether this grant allows publishing to C{topic}."""
        try:
            validate_topic(topic)
        except InvalidTopic:
            return False
        return any(allows(topic) for allows in self._publishers)

    def may_subscribe(self, pattern: str) -> bool:
        """
        Tell whether this grant allows subscribing to C{pattern}: only if
        every topic it can match is allowed by some granted pattern.
        """
        try:
            validate_pattern(pattern)
        except InvalidTopic:
            return False
        return _covers(tuple(pattern.split(".")), self._subscribers)

    def expired(self, now: float) -> bool:
        """Tell whether this grant has expired at C{now} (epoch seconds)."""
        return self.expires is not None and now >= self.expires


ALLOW_ALL = Grant(publish=(">",), subscribe=(">",))
"""The grant of every request while authentication is off."""


def authorize_publish(grant: Grant, topic: str, now: float | None = None) -> None:
    """
    Raise L{Forbidden} unless C{grant} may publish to C{topic}.

    @raise InvalidTopic: if C{topic} is not a valid topic (400 comes first).
    @raise Unauthorized: if C{now} is given and the grant has expired.
    """
    validate_topic(topic)
    if now is not None and grant.expired(now):
        raise Unauthorized("The token has expired.")
    if not grant.may_publish(topic):
        raise Forbidden(f"This token may not publish to '{topic}'.")


def authorize_subscribe(grant: Grant, pattern: str, now: float | None = None) -> None:
    """
    Raise L{Forbidden} unless C{grant} may subscribe to C{pattern}.

    @raise InvalidTopic: if C{pattern} is not a valid pattern.
    @raise Unauthorized: if C{now} is given and the grant has expired.
    """
    validate_pattern(pattern)
    if now is not None and grant.expired(now):
        raise Unauthorized("The token has expired.")
    if not grant.may_subscribe(pattern):
        raise Forbidden(
            f"This token may not subscribe to '{pattern}': it does not allow "
            "every topic that the pattern matches."
        )


def www_authenticate(token_given: bool) -> bytes:
    """Return the C{WWW-Authenticate} value for a 401 (RFC 6750)."""
    if token_given:
        return b'Bearer realm="tinymq", error="invalid_token"'
    return b'Bearer realm="tinymq"'


class _Key(NamedTuple):
    digest: bytes
    grant: Grant


def _load_keys(path: str) -> tuple[_Key, ...]:
    try:
        with open(path, "rb") as keys_file:
            document = tomllib.load(keys_file)
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: {error}") from None

    unknown = set(document) - {"keys"}
    if unknown:
        raise ValueError(f"{path}: unknown tables: {', '.join(sorted(unknown))}")
    table = document.get("keys", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: 'keys' must be a table of [keys.<name>] tables")

    keys: list[_Key] = []
    for name, entry in table.items():
        try:
            key = _key_entry(name, entry)
        except ValueError as error:
            raise ValueError(f"{path}: [keys.{name}]: {error}") from None
        if any(hmac.compare_digest(key.digest, seen.digest) for seen in keys):
            raise ValueError(f"{path}: [keys.{name}]: the same key is listed twice")
        keys.append(key)
    return tuple(keys)


def _key_entry(name: str, entry: object) -> _Key:
    if not isinstance(entry, dict):
        raise ValueError("must be a table")
    unknown = set(entry) - _KEY_FIELDS
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")

    # Both forms are compared as SHA-256 digests: equal lengths, so the
    # comparison does not even reveal a key's length.
    if ("key" in entry) == ("key_sha256" in entry):
        raise ValueError("needs exactly one of 'key' and 'key_sha256'")
    if "key" in entry:
        key = entry["key"]
        if not isinstance(key, str) or not _is_token_text(key):
            raise ValueError("'key' must be printable ASCII without spaces")
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"'key' must have {MIN_KEY_LENGTH} characters or more")
        digest = hashlib.sha256(key.encode("ascii")).digest()
    else:
        hexdigest = entry["key_sha256"]
        if not isinstance(hexdigest, str) or not _SHA256_HEX.match(hexdigest):
            raise ValueError("'key_sha256' must be 64 hexadecimal digits")
        digest = bytes.fromhex(hexdigest)

    publish = entry.get("publish", [])
    subscribe = entry.get("subscribe", [])
    if not isinstance(publish, list) or not isinstance(subscribe, list):
        raise ValueError("'publish' and 'subscribe' must be lists of patterns")
    return _Key(digest, Grant(tuple(publish), tuple(subscribe), None, f"key:{name}"))


def _is_token_text(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text


def _load_public_key(path: str) -> tuple[str, _VerifyKey]:
    try:
        with open(path, "rb") as key_file:
            pem = key_file.read()
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror}") from None

    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: object = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(
            f"{path}: not a PEM public key or certificate (a private key does "
            "not belong on the broker)"
        ) from None

    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"{path}: an RSA key needs 2048 bits or more")
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC_ALGORITHMS.get(key.curve.name)
        if algorithm is None:
            raise ValueError(f"{path}: EC keys must use P-256, P-384 or P-521")
        return algorithm, key
    raise ValueError(f"{path}: only RSA and EC public keys are supported")


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthorized(f"The token's '{name}' claim is not a number.")
    if not math.isfinite(value):
        raise Unauthorized(f"The token's '{name}' claim is not a finite number.")
    return float(value)


def _claim_patterns(section: Mapping[str, Any], name: str) -> tuple[str, ...]:
    patterns = section.get(name, [])
    if not isinstance(patterns, list) or not all(
        isinstance(pattern, str) for pattern in patterns
    ):
        raise Unauthorized(f"The token's '{_CLAIM}.{name}' is not a list of strings.")
    return tuple(patterns)


_JWT_ERRORS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidAudienceError, "The token is meant for another audience."),
    (jwt.InvalidIssuerError, "The token is from another issuer."),
    (jwt.InvalidSignatureError, "The token's signature does not verify."),
)


def _jwt_message(error: Exception) -> str:
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"The token lacks the '{error.claim}' claim."
    for kind, message in _JWT_ERRORS:
        if isinstance(error, kind):
            return message
    return "The token is not a valid JWT."


class Authenticator:
    """
    Turns a request's token into a L{Grant}, by the settings of a
    L{Config}: API keys from the C{auth_keys} file, JWTs verified with
    C{jwt_secret} (HS256) or C{jwt_public_key} (RS256, or ES256/384/512).

    The files are read once, here.

    @raise ValueError: if a file cannot be read or holds something unusable,
        or the secret is too short; the message never holds a secret.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.enabled = bool(
            config.auth_keys or config.jwt_secret or config.jwt_public_key
        )
        self._keys = _load_keys(config.auth_keys) if config.auth_keys else ()

        # Each algorithm has its own key, so a token's header can choose only
        # among the algorithms configured, and never verify an HS256
        # signature with a public key as the secret.
        self._jwt_keys: dict[str, _VerifyKey] = {}
        if config.jwt_secret:
            secret = config.jwt_secret.encode("utf-8")
            if len(secret) < MIN_SECRET_LENGTH:
                raise ValueError(
                    f"--jwt-secret: an HS256 secret needs {MIN_SECRET_LENGTH} "
                    "bytes or more"
                )
            self._jwt_keys["HS256"] = secret
        if config.jwt_public_key:
            algorithm, key = _load_public_key(config.jwt_public_key)
            self._jwt_keys[algorithm] = key

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The JWT algorithms accepted, in a stable order."""
        return tuple(sorted(self._jwt_keys))

    def describe(self) -> str:
        """Return one line, free of secrets, saying how requests are checked."""
        if not self.enabled:
            return "Authentication is off: anyone may publish and subscribe."
        jwts = ", ".join(self.algorithms) or "none"
        return f"Authentication is on: {len(self._keys)} API keys; JWT: {jwts}."

    def authenticate(self, token: str | None, now: float) -> Grant:
        """
        Return the grant of C{token} at C{now} (epoch seconds); while
        authentication is off, L{ALLOW_ALL} whatever the token.

        @raise Unauthorized: if the token is missing, invalid or expired.
        """
        if not self.enabled:
            return ALLOW_ALL
        if not token:
            raise Unauthorized(
                "This request needs a token: an 'Authorization: Bearer' "
                "header, a cookie or a 'token' query parameter."
            )
        if len(token) > MAX_TOKEN_LENGTH or not _is_token_text(token):
            raise Unauthorized("The token is not valid.")

        grant = self._match_key(token)
        if grant is not None:
            return grant
        if self._jwt_keys and token.count(".") == 2:
            return self._decode_jwt(token, now)
        raise Unauthorized("The token is not valid.")

    def _match_key(self, token: str) -> Grant | None:
        digest = hashlib.sha256(token.encode("ascii")).digest()
        found = None
        for key in self._keys:
            # Compare with every key, so the time taken does not tell which
            # key, or how many, came before the one that matched.
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.grant
        return found

    def _decode_jwt(self, token: str, now: float) -> Grant:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("The token is not a valid JWT.") from None
        key = self._jwt_keys.get(algorithm) if isinstance(algorithm, str) else None
        if algorithm is None or key is None:
            accepted = ", ".join(self.algorithms)
            raise Unauthorized(f"The token must be signed with {accepted}.")

        try:
            # Times are checked below against the caller's clock.
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.config.jwt_audience,
                issuer=self.config.jwt_issuer,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except (jwt.PyJWTError, ValueError, TypeError) as error:
            raise Unauthorized(_jwt_message(error)) from None
        return self._grant_from_claims(claims, now)

    def _grant_from_claims(self, claims: Mapping[str, Any], now: float) -> Grant:
        expires = _numeric_date(claims, "exp")
        not_before = _numeric_date(claims, "nbf")
        if expires is not None and now >= expires:
            raise Unauthorized("The token has expired.")
        if not_before is not None and now < not_before:
            raise Unauthorized("The token is not valid yet.")

        section = claims.get(_CLAIM)
        if not isinstance(section, dict):
            raise Unauthorized(f"The token has no '{_CLAIM}' claim.")
        subject = claims.get("sub")
        try:
            return Grant(
                _claim_patterns(section, "publish"),
                _claim_patterns(section, "subscribe"),
                expires,
                f"jwt:{subject}" if isinstance(subject, str) else None,
            )
        except ValueError:
            raise Unauthorized(
                f"The token's '{_CLAIM}' claim holds an invalid topic pattern."
            ) from None

    def token_from_request(
        self,
        headers: Mapping[str, str],
        cookies: Mapping[str, str],
        query: Mapping[str, Sequence[str]],
    ) -> str | None:
        """Return the token of a request; see L{token_from_request}."""
        return token_from_request(headers, cookies, query, self.config.auth_cookie)

    def token_from_web(self, request: IRequest) -> str | None:
        """Return the token of a twisted.web request."""
        return token_from_web(request, self.config.auth_cookie)

    def token_from_handshake(self, request: ConnectionRequest) -> str | None:
        """Return the token of an Autobahn WebSocket opening handshake."""
        return token_from_handshake(request, self.config.auth_cookie)


def _bearer(value: str) -> str | None:
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def token_from_request(
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
    query: Mapping[str, Sequence[str]],
    cookie: str = DEFAULT_COOKIE,
) -> str | None:
    """
    Return the token of a request, or C{None}: from C{Authorization: Bearer},
    else the cookie named C{cookie}, else the first C{token} query parameter
    (EventSource cannot set headers). Header names match in any case; an
    C{Authorization} header of another scheme is passed over.
    """
    for name, value in headers.items():
        if name.lower() == "authorization":
            token = _bearer(value)
            if token is not None:
                return token
            break

    token = cookies.get(cookie, "").strip()
    if token:
        return token

    for value in query.get(TOKEN_PARAMETER, ()):
        return value or None
    return None


def parse_cookies(headers: Iterable[str]) -> dict[str, str]:
    """
    Return the cookies of C{Cookie} header values; the first of a name wins
    and quotes around a value are dropped.
    """
    cookies: dict[str, str] = {}
    for header in headers:
        for pair in header.split(";"):
            name, equals, value = pair.partition("=")
            name, value = name.strip(), value.strip()
            if not equals or not name:
                continue
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies.setdefault(name, value)
    return cookies


def token_from_web(request: IRequest, cookie: str = DEFAULT_COOKIE) -> str | None:
    """Return the token of a twisted.web request; see L{token_from_request}."""
    raw = request.requestHeaders.getRawHeaders
    authorization = raw(b"authorization") or []
    headers = (
        {"authorization": authorization[0].decode("latin-1")} if authorization else {}
    )
    cookies = parse_cookies(value.decode("latin-1") for value in raw(b"cookie") or [])
    args: dict[bytes, list[bytes]] = request.args
    values = args.get(TOKEN_PARAMETER.encode("ascii"), [])
    query = {TOKEN_PARAMETER: [value.decode("latin-1") for value in values]}
    return token_from_request(headers, cookies, query, cookie)


def token_from_handshake(
    request: ConnectionRequest, cookie: str = DEFAULT_COOKIE
) -> str | None:
    """Return the token of an Autobahn opening handshake request."""
    headers: dict[str, str] = request.headers
    cookies = parse_cookies([headers["cookie"]] if "cookie" in headers else [])
    params: dict[str, list[str]] = request.params
    return token_from_request(headers, cookies, params, cookie)


def redact_query(uri: bytes) -> bytes:
    """
    Return C{uri} with the value of every C{token} query parameter replaced
    by C{***}, for logs.

    Names are compared after percent-decoding, in any case. Twisted splits a
    query at C{&} and C{;}, the standard library at C{&} only, so a name is
    looked for in both ways and its value is hidden up to the next C{&}: no
    part of a token that either parser would read is left.
    """
    path, mark, query = uri.partition(b"?")
    if not mark:
        return uri
    fields = query.split(b"&")
    for index, field in enumerate(fields):
        parts = field.split(b";")
        for at, part in enumerate(parts):
            name, equals, _ = part.partition(b"=")
            if equals and _is_token_name(name):
                fields[index] = b";".join([*parts[:at], name + b"=***"])
                break
            if _looks_like_token(part):
                # A mangled field such as token%3D<secret>: no parser
                # reads it as a token, but it may still hold one.
                fields[index] = b";".join([*parts[:at], b"***"])
                break
    return path + mark + b"&".join(fields)


def _looks_like_token(part: bytes) -> bool:
    decoded = unquote_to_bytes(part.replace(b"+", b" ")).strip().lower()
    return decoded.startswith(TOKEN_PARAMETER.encode("ascii"))


def _is_token_name(name: bytes) -> bool:
    decoded = unquote_to_bytes(name.replace(b"+", b" "))
    return decoded.strip().lower() == TOKEN_PARAMETER.encode("ascii")
