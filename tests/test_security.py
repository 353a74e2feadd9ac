"""
End-to-end tests of authentication on a real broker: API keys and JWTs
(HS256 and RS256), the three places a token may come from, grants checked
on REST, SSE and both WebSocket routes, streams closed when their token
expires, tokens kept out of the access log, and everything allowed while
authentication is off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import Broker
from tests.e2e import (
    HTTPStream,
    Reply,
    WebSocketClient,
    assert_error,
    connect,
    http_request,
    open_sse,
    open_ws,
    read_answer,
    request,
    wait_until,
    ws_command,
)

pytestmark = pytest.mark.e2e

SECRET = "tinymq-e2e-secret-0123456789abcdef"
READER_KEY = "reader-key-0123456789abcdef"
PUBLISHER_KEY = "publisher-key-0123456789abcdef"
KEYS_FILE = f"""
[keys.reader]
key = "{READER_KEY}"
subscribe = ["a.*"]

[keys.publisher]
key = "{PUBLISHER_KEY}"
publish = [">"]
"""
NO_TOKEN = 'Bearer realm="tinymq"'
BAD_TOKEN = 'Bearer realm="tinymq", error="invalid_token"'


def hs256(
    subscribe: list[str], publish: list[str], lifetime: float = 600.0, **extra: Any
) -> str:
    """Return an HS256 JWT signed with the broker's secret."""
    claims = {
        "sub": "e2e-user",
        "exp": time.time() + lifetime,
        "tinymq": {"subscribe": subscribe, "publish": publish},
        **extra,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header of a token."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def secured(
    module_broker_factory: Callable[..., Broker],
    tmp_path_factory: pytest.TempPathFactory,
) -> Broker:
    """
    A broker with two API keys and an HS256 secret (from the environment),
    with the access log on.
    """
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(KEYS_FILE)
    return module_broker_factory(
        "--auth-keys",
        str(keys),
        "--access-log",
        "true",
        env={"TINYMQ_JWT_SECRET": SECRET},
    )


async def read_whole(port: int, path: str, headers: dict[str, str]) -> HTTPStream:
    """GET C{path} and read the answer until its body is complete."""
    return await read_answer(port, http_request("GET", path, port, headers))


async def open_ws_with(
    port: int, path: str, headers: dict[str, str]
) -> WebSocketClient:
    """Open a WebSocket with extra handshake headers."""
    return await open_ws(port, path, headers=headers)


def www_authenticate(reply: Reply | HTTPStream) -> list[str]:
    """Return the WWW-Authenticate values of an answer."""
    if isinstance(reply, Reply):
        return reply.header("www-authenticate")
    return reply.headers.get("www-authenticate", [])


async def publish_as(
    broker: Broker,
    topic: str,
    body: str,
    headers: dict[str, str] | None = None,
    query: str = "",
) -> Reply:
    """POST C{body} to C{topic} with extra headers and query."""
    return await request(
        "POST",
        f"{broker.base_url}/api/topics/{topic}{query}",
        body.encode("utf-8"),
        {"Content-Type": "application/json", **(headers or {})},
    )


# Without a usable token


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/api/topics/a.none"),
        ("GET", "/api/topics/a.none/sse"),
        ("GET", "/api/sse?topic=a.none"),
        ("GET", "/api/topics"),
        ("GET", "/api/topics/a.none/messages"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_no_token_is_401_with_www_authenticate(
    secured: Broker, method: str, path: str
) -> None:
    """A request without a token gets 401 and a Bearer challenge."""
    reply = await request(method, secured.base_url + path, b"{}")

    assert_error(reply, 401, "unauthorized")
    assert www_authenticate(reply) == [NO_TOKEN]


@pytest.mark.parametrize("path", ["/ws", "/api/topics/a.none/ws"])
@pytest_twisted.ensureDeferred
async def test_websocket_without_token_is_401(secured: Broker, path: str) -> None:
    """A WebSocket handshake without a token is refused with 401."""
    client = await open_ws(secured.port, path)
    client.abort()

    assert client.status == 401
    assert client.frames == []


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("not-a-key-0123456789abcdef", id="unknown-key"),
        pytest.param(hs256(["a.*"], [], lifetime=-1), id="expired-jwt"),
        pytest.param(
            jwt.encode(
                {"exp": time.time() + 600, "tinymq": {"subscribe": ["a.*"]}},
                "another-secret-0123456789abcdef-xyz",
                algorithm="HS256",
            ),
            id="other-secret",
        ),
        pytest.param(
            jwt.encode({"tinymq": {"subscribe": [">"]}}, None, algorithm="none"),
            id="alg-none",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unusable_token_is_401_invalid_token(secured: Broker, token: str) -> None:
    """An unknown key, an expired JWT or a forged JWT is 401 on every route."""
    published = await publish_as(secured, "a.bad", "1", bearer(token))
    stream = await read_whole(secured.port, "/api/topics/a.bad/sse", bearer(token))
    websocket = await open_ws_with(secured.port, "/api/topics/a.bad/ws", bearer(token))
    websocket.abort()

    assert_error(published, 401, "unauthorized")
    assert www_authenticate(published) == [BAD_TOKEN]
    assert_error(stream, 401, "unauthorized")
    assert www_authenticate(stream) == [BAD_TOKEN]
    assert websocket.status == 401


@pytest_twisted.ensureDeferred
async def test_expired_token_says_so(secured: Broker) -> None:
    """A JWT past its exp is refused with a message naming the expiry."""
    token = hs256(["a.*"], ["a.*"], lifetime=-5)

    reply = await publish_as(secured, "a.expired", "1", bearer(token))

    assert_error(reply, 401, "unauthorized")
    assert reply.json()["message"] == "The token has expired."


# What a grant allows


READERS = [
    pytest.param(READER_KEY, id="api-key"),
    pytest.param(hs256(["a.*"], []), id="jwt"),
]


@pytest.mark.parametrize("token", READERS)
@pytest_twisted.ensureDeferred
async def test_grant_of_a_star_subscribes_to_a_b_over_sse(
    secured: Broker, token: str
) -> None:
    """A token for a.* receives a.b on a topic stream and on /api/sse."""
    single = await open_sse(secured.port, "/api/topics/a.sse/sse", bearer(token))
    many = await open_sse(secured.port, "/api/sse?topic=a.sse", bearer(token))

    reply = await publish_as(secured, "a.sse", '{"n": 1}', bearer(PUBLISHER_KEY))
    await wait_until(lambda: single.events and many.events, "the message")
    single.abort()
    many.abort()

    assert (single.status, many.status, reply.status) == (200, 200, 200)
    assert single.data() == ['{"n": 1}']
    assert [json.loads(data)["data"] for data in many.data()] == [{"n": 1}]


@pytest.mark.parametrize("token", READERS)
@pytest_twisted.ensureDeferred
async def test_grant_of_a_star_subscribes_to_a_b_over_websocket(
    secured: Broker, token: str
) -> None:
    """A token for a.* receives a.b on a topic WebSocket and on /ws."""
    topic = await open_ws_with(secured.port, "/api/topics/a.ws/ws", bearer(token))
    commands = await open_ws_with(secured.port, "/ws", bearer(token))
    subscribed = await ws_command(commands, {"type": "subscribe", "topic": "a.ws"})

    reply = await publish_as(secured, "a.ws", '{"n": 2}', bearer(PUBLISHER_KEY))
    await wait_until(
        lambda: topic.messages and len(commands.messages) == 2, "the message"
    )
    topic.abort()
    commands.abort()

    assert (topic.status, commands.status, reply.status) == (101, 101, 200)
    assert subscribed == {"type": "subscribed", "topic": "a.ws"}
    assert topic.messages == ['{"n": 2}']
    message = commands.json_messages()[1]
    assert (message["type"], message["topic"], message["data"]) == (
        "message",
        "a.ws",
        {"n": 2},
    )


@pytest.mark.parametrize("token", READERS)
@pytest.mark.parametrize("pattern", ["c", "a.>", ">", "b.*"])
@pytest_twisted.ensureDeferred
async def test_grant_of_a_star_cannot_subscribe_elsewhere(
    secured: Broker, token: str, pattern: str
) -> None:
    """A token for a.* gets 403 for c, a.> and > on SSE and WebSockets."""
    single = await read_whole(secured.port, f"/api/topics/{pattern}/sse", bearer(token))
    many = await read_whole(
        secured.port, f"/api/sse?topic=a.x&topic={pattern}", bearer(token)
    )
    topic = await open_ws_with(secured.port, f"/api/topics/{pattern}/ws", bearer(token))
    topic.abort()
    commands = await open_ws_with(secured.port, "/ws", bearer(token))
    refused = await ws_command(commands, {"type": "subscribe", "topic": pattern})
    allowed = await ws_command(commands, {"type": "subscribe", "topic": "a.x"})
    commands.abort()

    assert_error(single, 403, "forbidden")
    assert_error(many, 403, "forbidden")
    assert topic.status == 403
    assert (refused["type"], refused["error"]) == ("error", "forbidden")
    assert allowed == {"type": "subscribed", "topic": "a.x"}


@pytest_twisted.ensureDeferred
async def test_publish_only_key_cannot_subscribe_but_can_publish(
    secured: Broker,
) -> None:
    """A key with only a publish grant gets 403 on every subscribe route."""
    auth = bearer(PUBLISHER_KEY)
    stream = await read_whole(secured.port, "/api/topics/a.pub/sse", auth)
    topic = await open_ws_with(secured.port, "/api/topics/a.pub/ws", auth)
    topic.abort()
    commands = await open_ws_with(secured.port, "/ws", auth)
    refused = await ws_command(commands, {"type": "subscribe", "topic": "a.pub"})
    published = await ws_command(
        commands, {"type": "publish", "topic": "a.pub", "data": 1}
    )
    commands.abort()
    posted = await publish_as(secured, "a.pub", "2", auth)

    assert_error(stream, 403, "forbidden")
    assert topic.status == 403
    assert (refused["type"], refused["error"]) == ("error", "forbidden")
    assert (published["type"], published["topic"]) == ("published", "a.pub")
    assert (posted.status, posted.json()["topic"]) == (200, "a.pub")


@pytest.mark.parametrize("token", READERS)
@pytest_twisted.ensureDeferred
async def test_subscribe_only_token_cannot_publish(secured: Broker, token: str) -> None:
    """A token with only a subscribe grant gets 403 on every publish route."""
    posted = await publish_as(secured, "a.sub", "1", bearer(token))
    commands = await open_ws_with(secured.port, "/ws", bearer(token))
    refused = await ws_command(
        commands, {"type": "publish", "topic": "a.sub", "data": 1}
    )
    commands.abort()
    topic = await open_ws_with(secured.port, "/api/topics/a.sub/ws", bearer(token))
    topic.send_text("1")
    await wait_until(lambda: topic.closed, "the server to close")

    assert_error(posted, 403, "forbidden")
    assert (refused["type"], refused["error"]) == ("error", "forbidden")
    assert (topic.status, topic.close_code) == (101, 1008)


# Where the token comes from


def _token_place(place: str, token: str) -> tuple[dict[str, str], str]:
    """Return the headers and query that carry C{token} in C{place}."""
    if place == "header":
        return bearer(token), ""
    if place == "cookie":
        return {"Cookie": f"other=1; tinymq_token={token}"}, ""
    return {}, f"?token={token}"


@pytest.mark.parametrize("place", ["header", "cookie", "query"])
@pytest_twisted.ensureDeferred
async def test_token_from_header_cookie_or_query(secured: Broker, place: str) -> None:
    """A token is read from the Authorization header, the cookie or ?token=."""
    headers, query = _token_place(place, hs256(["a.*"], ["a.*"]))
    topic = f"a.{place}"
    stream = await open_sse(secured.port, f"/api/topics/{topic}/sse{query}", headers)
    websocket = await open_ws_with(
        secured.port, f"/api/topics/{topic}/ws{query}", headers
    )

    reply = await publish_as(secured, topic, '"hello"', headers, query)
    await wait_until(lambda: stream.events and websocket.messages, "the message")
    stream.abort()
    websocket.abort()

    assert (stream.status, websocket.status, reply.status) == (200, 101, 200)
    assert stream.data() == ['"hello"']
    assert websocket.messages == ['"hello"']


# Expiry


@pytest_twisted.ensureDeferred
async def test_open_streams_are_closed_when_their_token_expires(
    secured: Broker,
) -> None:
    """An SSE stream ends with an error event and a WebSocket closes 1008."""
    token = hs256(["a.*"], [], lifetime=2.0)
    stream = await open_sse(secured.port, "/api/topics/a.expiry/sse", bearer(token))
    topic = await open_ws_with(secured.port, "/api/topics/a.expiry/ws", bearer(token))
    commands = await open_ws_with(secured.port, "/ws", bearer(token))
    await ws_command(commands, {"type": "subscribe", "topic": "a.expiry"})
    await publish_as(secured, "a.expiry", "1", bearer(PUBLISHER_KEY))
    await wait_until(
        lambda: stream.events and topic.messages and len(commands.messages) == 2,
        "the message before expiry",
    )

    await wait_until(
        lambda: stream.complete and topic.closed and commands.closed,
        "the broker to end the streams",
        timeout=8.0,
    )
    stream.abort()

    assert [event.type for event in stream.events] == ["message", "error"]
    assert json.loads(stream.events[-1].data) == {
        "error": "unauthorized",
        "message": "The token has expired.",
    }
    assert (topic.close_code, topic.close_reason) == (1008, "token expired")
    assert (commands.close_code, commands.close_reason) == (1008, "token expired")


# Logs


@pytest_twisted.ensureDeferred
async def test_query_token_never_appears_in_the_log(secured: Broker) -> None:
    """With the access log on, no query token reaches the broker's log."""
    good = hs256(["a.*"], ["a.*"])
    bad = "unknown-query-token-0123456789"
    before = secured.log_size()

    stream = await open_sse(secured.port, f"/api/topics/a.log/sse?token={good}")
    posted = await publish_as(secured, "a.log", "1", query=f"?token={good}")
    await wait_until(lambda: stream.events, "the message")
    stream.abort()
    refused = await publish_as(secured, "a.log", "1", query=f"?x=1&token={bad}")
    forbidden = await publish_as(secured, "c", "1", query=f"?token={good}")
    encoded = await publish_as(secured, "a.log", "1", query=f"?%74oken={good}")
    websocket = await open_ws(secured.port, f"/api/topics/a.log/ws?token={good}")
    websocket.close()
    denied = await open_ws(secured.port, f"/api/topics/c/ws?token={bad}")
    denied.abort()
    await wait_until(lambda: websocket.closed, "the WebSocket to close")
    await wait_until(
        lambda: secured.log(before).count("oken=***") == 7, "the access log lines"
    )

    log = secured.log(before)
    assert (posted.status, refused.status, forbidden.status) == (200, 401, 403)
    assert (encoded.status, websocket.status, denied.status) == (200, 101, 401)
    assert good not in log
    assert bad not in log
    assert good[-20:] not in log
    assert "Traceback" not in log


# Redirects


@pytest.mark.parametrize(
    "path", ["/api//topics/a.slash/sse", "/api/topics/a.slash//sse", "/api//sse"]
)
@pytest_twisted.ensureDeferred
async def test_doubled_slash_is_not_redirected_to_the_host_header(
    secured: Broker, path: str
) -> None:
    """
    A path with doubled slashes gets a JSON 404, not a redirect to the site
    that the request's Host header names.
    """
    raw = f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    stream = HTTPStream(raw.encode("ascii"))

    await connect(secured.port, stream)
    await wait_until(lambda: stream.closed, "the answer")

    assert "location" not in stream.headers
    assert_error(stream, 404, "not-found")


# Authentication off


@pytest_twisted.ensureDeferred
async def test_auth_off_allows_everything(broker: Broker) -> None:
    """Without auth settings, any client publishes and subscribes to anything."""
    stream = await open_sse(broker.port, "/api/topics/%3E/sse")
    commands = await open_ws(broker.port, "/ws")
    subscribed = await ws_command(commands, {"type": "subscribe", "topic": ">"})

    posted = await publish_as(broker, "open.topic", '"x"')
    published = await ws_command(
        commands, {"type": "publish", "topic": "open.other", "data": "y"}
    )
    await wait_until(
        lambda: len(stream.events) == 2 and len(commands.messages) == 4,
        "both messages",
    )
    listing = await request("GET", f"{broker.base_url}/api/topics")
    stream.abort()
    commands.abort()

    assert "Authentication is off" in broker.startup_log
    assert (stream.status, posted.status, listing.status) == (200, 200, 200)
    assert subscribed == {"type": "subscribed", "topic": ">"}
    assert published["type"] == "published"
    assert [json.loads(data)["topic"] for data in stream.data()] == [
        "open.topic",
        "open.other",
    ]


# RS256


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """The issuer's RSA key and a stranger's."""
    return _rsa_key(), _rsa_key()


@pytest.fixture(scope="module")
def rs256(
    module_broker_factory: Callable[..., Broker],
    tmp_path_factory: pytest.TempPathFactory,
    rsa_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey],
) -> Broker:
    """A broker that verifies RS256 JWTs with the issuer's public key."""
    pem = (
        rsa_keys[0]
        .public_key()
        .public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    path: Path = tmp_path_factory.mktemp("rsa") / "issuer.pem"
    path.write_bytes(pem)
    return module_broker_factory("--jwt-public-key", str(path))


def rs256_token(key: rsa.RSAPrivateKey) -> str:
    """Return an RS256 JWT that may use a.*, signed with C{key}."""
    claims = {
        "sub": "rsa-user",
        "exp": time.time() + 600,
        "tinymq": {"subscribe": ["a.*"], "publish": ["a.*"]},
    }
    return jwt.encode(claims, key, algorithm="RS256")


@pytest_twisted.ensureDeferred
async def test_rs256_token_is_verified_with_the_public_key(
    rs256: Broker, rsa_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    """An RS256 JWT of the issuer works; a stranger's or an HS256 one is 401."""
    auth = bearer(rs256_token(rsa_keys[0]))
    stream = await open_sse(rs256.port, "/api/topics/a.rsa/sse", auth)

    posted = await publish_as(rs256, "a.rsa", '"signed"', auth)
    await wait_until(lambda: stream.events, "the message")
    stream.abort()
    forbidden = await read_whole(rs256.port, "/api/topics/c/sse", auth)
    stranger = await publish_as(rs256, "a.rsa", "1", bearer(rs256_token(rsa_keys[1])))
    hs = await publish_as(rs256, "a.rsa", "1", bearer(hs256(["a.*"], ["a.*"])))

    assert "JWT: RS256" in rs256.startup_log
    assert (stream.status, posted.status) == (200, 200)
    assert stream.data() == ['"signed"']
    assert_error(forbidden, 403, "forbidden")
    assert_error(stranger, 401, "unauthorized")
    assert_error(hs, 401, "unauthorized")
