"""
Unit tests of the HTTP API through treq's StubTreq, and of the request size
limit through a real HTTP channel on an in-memory transport.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq

from tinymq._errors import BadRequest
from tinymq._http import API
from tinymq._hub import Hub
from tinymq._site import Root
from tinymq._subscriber import parse_count

from .helpers import connect, make_hub, make_site, result_of, split_response

URL = "http://tinymq.test"


class Client:
    """A StubTreq client over the API's real resource tree, on a fake clock."""

    def __init__(self, **settings: Any) -> None:
        self.clock, self.hub = make_hub(**settings)
        api = API(self.hub, self.hub.config)
        self.stub = StubTreq(Root(api.app.resource(), self.hub.config))

    def request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, Any, bytes]:
        """Send one request; return the status, the headers and the body."""
        sent = {name.replace("_", "-"): value for name, value in headers.items()}
        response = self._wait(
            self.stub.request(method, URL + path, data=body, headers=sent)
        )
        return response.code, response.headers, self._wait(response.content())

    def _wait(self, deferred: Any) -> Any:
        self.stub.flush()
        return result_of(deferred)


def header(headers: Any, name: str) -> list[str]:
    """Return every value of one response header, decoded."""
    return [v.decode() for v in headers.getRawHeaders(name.encode(), [])]


def error_of(status: int, headers: Any, body: bytes) -> tuple[int, str]:
    """Check that an error body is the JSON object clients expect."""
    assert header(headers, "Content-Type") == ["application/json"]
    parsed = json.loads(body)
    assert set(parsed) == {"error", "message"}
    assert isinstance(parsed["message"], str) and parsed["message"]
    return status, parsed["error"]


@pytest.fixture
def client() -> Client:
    """A client of a server with the default settings."""
    return Client()


# Publishing


def test_publish(client: Client) -> None:
    """A publish answers 200 with the id and topic, and stores the bytes."""
    body = b'{"cpu_usage": 45, "ram_usage": 1024}'

    status, headers, answer = client.request(
        "POST",
        "/api/topics/dashboard.metrics",
        body,
        Content_Type="application/json",
    )

    assert status == 200
    assert header(headers, "Content-Type") == ["application/json"]
    assert json.loads(answer) == {
        "id": str(client.hub.last_id),
        "topic": "dashboard.metrics",
    }
    (message,) = client.hub.topics["dashboard.metrics"].history
    assert message.payload == body


def test_publish_ids_increase(client: Client) -> None:
    """Each publish gets a larger id, across topics."""

    ids = [
        int(json.loads(client.request("POST", f"/api/topics/{t}", b"x")[2])["id"])
        for t in ["a", "b", "a"]
    ]

    assert ids[0] < ids[1] < ids[2]


@pytest.mark.parametrize(
    "body",
    [
        b"plain text",
        b"NaN",
        b"{not json",
        b" \r\n leading space",
        "\u00e9\U0001f600".encode(),
    ],
)
def test_publish_text_kept_byte_for_byte(client: Client, body: bytes) -> None:
    """Any UTF-8 text without a JSON content type is published unchanged."""

    status, _, _ = client.request(
        "POST", "/api/topics/t", body, Content_Type="text/plain"
    )

    assert status == 200
    assert client.hub.topics["t"].last.payload == body


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (b"", "text/plain", "payload-invalid"),
        (b"\xff\xfe", "text/plain", "payload-invalid"),
        (b"caf\xe9", "text/plain", "payload-invalid"),
        (b"{not json", "application/json", "payload-invalid"),
        (b"{not json", "application/json; charset=utf-8", "payload-invalid"),
        (b"{not json", "Application/JSON", "payload-invalid"),
        (b"[1,", "application/merge-patch+json", "payload-invalid"),
        (b"[1,", "application/vnd.api+json", "payload-invalid"),
        (b"NaN", "application/json", "payload-invalid"),
        (b'{"a": Infinity}', "application/json", "payload-invalid"),
        (b"[-Infinity]", "application/json", "payload-invalid"),
        (b"\xef\xbb\xbf{}", "application/json", "payload-invalid"),
    ],
)
def test_publish_bad_body(
    client: Client, body: bytes, content_type: str, code: str
) -> None:
    """An empty, non-UTF-8 or falsely-JSON body is a 400 and not published."""

    answer = client.request("POST", "/api/topics/t", body, Content_Type=content_type)

    assert error_of(*answer) == (400, code)
    assert client.hub.published == 0


@pytest.mark.parametrize(
    "path",
    [
        "/api/topics/a.*",
        "/api/topics/a.%3E",
        "/api/topics/%3E",
        "/api/topics/a..b",
        "/api/topics/.a",
        "/api/topics/a%20b",
        "/api/topics/caf%C3%A9",
        "/api/topics/" + "a" * 256,
    ],
)
def test_publish_bad_topic(client: Client, path: str) -> None:
    """A wildcard or malformed topic is a 400 topic-invalid."""

    answer = client.request("POST", path, b"1")

    assert error_of(*answer) == (400, "topic-invalid")
    assert client.hub.published == 0


def test_publish_longest_topic(client: Client) -> None:
    """A 255-character topic is accepted."""

    status, _, _ = client.request("POST", "/api/topics/" + "a" * 255, b"1")

    assert status == 200


def test_publish_over_limit_after_reading() -> None:
    """A body over the limit that reached the API is still a 413."""
    client = Client(max_message_size=4)

    answer = client.request("POST", "/api/topics/t", b"12345")
    at_limit, _, _ = client.request("POST", "/api/topics/t", b"1234")

    assert error_of(*answer) == (413, "payload-too-large")
    assert at_limit == 200
    assert client.hub.published == 1


# Inspection


def test_topics_listing(client: Client) -> None:
    """GET /api/topics lists each topic with counters, sorted by name."""
    client.request("POST", "/api/topics/b", b"1")
    client.request("POST", "/api/topics/a", b"1")
    client.request("POST", "/api/topics/a", b"2")

    status, _, body = client.request("GET", "/api/topics")

    listing = json.loads(body)
    assert status == 200
    assert [
        (t["topic"], t["messages"], t["history"], t["subscribers"])
        for t in listing["topics"]
    ] == [("a", 2, 2, 0), ("b", 1, 1, 0)]
    assert listing["topics"][0]["last_id"] == str(client.hub.last_id)
    assert listing["server"]["published"] == 3
    assert listing["server"]["topics"] == 2


def test_topic_with_last_message(client: Client) -> None:
    """GET /api/topics/{topic} gives its stats and its last message."""
    client.request("POST", "/api/topics/t", b'{"v": 1}')
    client.request("POST", "/api/topics/t", b'{"v": 2}')

    status, _, body = client.request("GET", "/api/topics/t")

    described = json.loads(body)
    assert status == 200
    assert described["topic"] == "t"
    assert described["messages"] == 2
    assert described["last_message"] == {
        "id": str(client.hub.last_id),
        "topic": "t",
        "time": 0.0,
        "data": {"v": 2},
    }


@pytest.mark.parametrize(
    ("payload", "data"),
    [
        (b"plain", "plain"),
        (b"NaN", "NaN"),
        (b"\xef\xbb\xbf{}", "\ufeff{}"),
        (b"1\x00", "1\x00"),
    ],
)
def test_topic_last_message_text(client: Client, payload: bytes, data: str) -> None:
    """A last message that JSON.parse refuses is shown as a JSON string."""
    client.request("POST", "/api/topics/t", payload, Content_Type="text/plain")

    status, _, body = client.request("GET", "/api/topics/t")

    assert status == 200
    assert json.loads(body)["last_message"]["data"] == data


def test_unknown_topic_is_404(client: Client) -> None:
    """A topic nobody published to is a 404 not-found."""

    answer = client.request("GET", "/api/topics/nothing.here")

    assert error_of(*answer) == (404, "not-found")


def test_topic_messages_since_and_limit(client: Client) -> None:
    """/messages pages through history after since, limit at a time."""
    ids = [
        json.loads(client.request("POST", "/api/topics/t", b"%d" % i)[2])["id"]
        for i in range(5)
    ]

    status, _, body = client.request(
        "GET", f"/api/topics/t/messages?since={ids[1]}&limit=2"
    )
    _, _, newest = client.request("GET", "/api/topics/t/messages?limit=2")

    page = json.loads(body)
    assert status == 200
    assert [m["id"] for m in page["messages"]] == ids[2:4]
    assert [m["data"] for m in page["messages"]] == [2, 3]
    assert page["last_id"] == ids[4]
    assert [m["id"] for m in json.loads(newest)["messages"]] == ids[3:]


@pytest.mark.parametrize(
    "query", ["since=abc", "since=-1", "limit=x", "limit=-1", "limit=1.5"]
)
def test_topic_messages_bad_query(client: Client, query: str) -> None:
    """A malformed since or limit is a 400 bad-request."""
    client.request("POST", "/api/topics/t", b"1")

    answer = client.request("GET", f"/api/topics/t/messages?{query}")

    assert error_of(*answer) == (400, "bad-request")


def test_healthz(client: Client) -> None:
    """GET /healthz answers 200 {"status": "ok"}."""

    status, headers, body = client.request("GET", "/healthz")

    assert status == 200
    assert header(headers, "Content-Type") == ["application/json"]
    assert json.loads(body) == {"status": "ok"}


@pytest.mark.parametrize(
    "path", ["/nope", "/api", "/api/topics/a/b/c", "/api/topics/a/nope"]
)
def test_unknown_path_is_404(client: Client, path: str) -> None:
    """Nothing served at a path gives a JSON 404."""

    answer = client.request("GET", path)

    assert error_of(*answer) == (404, "not-found")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/api/topics/a", "GET, HEAD, OPTIONS, POST"),
        ("DELETE", "/api/topics/a", "GET, HEAD, OPTIONS, POST"),
        ("POST", "/healthz", "GET, HEAD, OPTIONS"),
        ("POST", "/api/topics", "GET, HEAD, OPTIONS"),
    ],
)
def test_wrong_method_is_405(
    client: Client, method: str, path: str, allow: str
) -> None:
    """A known path with another method gives a JSON 405 with Allow."""

    status, headers, body = client.request(method, path, b"1")

    assert error_of(status, headers, body) == (405, "method-not-allowed")
    assert header(headers, "Allow") == [allow]


# CORS


def test_cors_any_origin(client: Client) -> None:
    """With the default '*', every response allows any origin."""

    _, ok_headers, _ = client.request("GET", "/healthz", Origin="https://x.test")
    _, error_headers, _ = client.request("GET", "/nope", Origin="https://x.test")
    _, no_origin, _ = client.request("GET", "/healthz")

    assert header(ok_headers, "Access-Control-Allow-Origin") == ["*"]
    assert header(error_headers, "Access-Control-Allow-Origin") == ["*"]
    assert header(no_origin, "Access-Control-Allow-Origin") == []


def test_cors_listed_origins() -> None:
    """With a list, an allowed origin is echoed and others get no header."""
    client = Client(cors_origins=("https://dash.test", "http://localhost:8080"))

    _, allowed, _ = client.request(
        "POST", "/api/topics/t", b"1", Origin="http://localhost:8080"
    )
    _, refused, _ = client.request("GET", "/healthz", Origin="https://evil.test")

    assert header(allowed, "Access-Control-Allow-Origin") == ["http://localhost:8080"]
    assert header(allowed, "Vary") == ["Origin"]
    assert header(refused, "Access-Control-Allow-Origin") == []


def test_preflight_allowed() -> None:
    """A preflight from an allowed origin is a 204 naming methods and headers."""
    client = Client(cors_origins=("https://dash.test",))

    status, headers, body = client.request(
        "OPTIONS",
        "/api/topics/t",
        Origin="https://dash.test",
        Access_Control_Request_Method="POST",
        Access_Control_Request_Headers="content-type",
    )

    assert status == 204
    assert body == b""
    assert header(headers, "Access-Control-Allow-Origin") == ["https://dash.test"]
    methods = header(headers, "Access-Control-Allow-Methods")[0].split(", ")
    allowed_headers = header(headers, "Access-Control-Allow-Headers")[0]
    assert {"GET", "POST", "OPTIONS"} <= set(methods)
    assert {"content-type", "last-event-id"} <= set(allowed_headers.lower().split(", "))


def test_preflight_refused() -> None:
    """A preflight from an origin not in the list is a JSON 403."""
    client = Client(cors_origins=("https://dash.test",))

    status, headers, body = client.request(
        "OPTIONS",
        "/api/topics/t",
        Origin="https://evil.test",
        Access_Control_Request_Method="POST",
    )

    assert error_of(status, headers, body) == (403, "forbidden")
    assert header(headers, "Access-Control-Allow-Origin") == []


# The size limit before the body is read


def _request_head(*headers: bytes) -> bytes:
    lines = [b"POST /api/topics/t HTTP/1.1", b"Host: tinymq.test", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _too_large(raw: bytes, limit: int) -> None:
    head, body = split_response(raw)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 413 Payload Too Large"
    assert b"Content-Type: application/json" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert json.loads(body) == {
        "error": "payload-too-large",
        "message": f"The message is over the limit of {limit} bytes.",
    }


def _server(limit: int) -> tuple[Hub, Any, Any]:
    _, hub = make_hub(max_message_size=limit)
    protocol, transport = connect(make_site(hub))
    return hub, protocol, transport


def test_content_length_over_limit_refused_before_body() -> None:
    """A Content-Length over the limit gets a 413 before any body byte."""
    hub, protocol, transport = _server(16)

    protocol.dataReceived(_request_head(b"Content-Length: 17"))

    _too_large(transport.value(), 16)
    assert transport.disconnecting is True
    assert hub.published == 0


def test_expect_continue_over_limit_gets_no_continue() -> None:
    """With Expect: 100-continue, an oversized body is refused, not invited."""
    hub, protocol, transport = _server(16)

    protocol.dataReceived(
        _request_head(b"Content-Length: 1000000", b"Expect: 100-continue")
    )

    assert b"100 Continue" not in transport.value()
    _too_large(transport.value(), 16)
    assert transport.disconnecting is True


def test_content_length_at_limit_accepted() -> None:
    """A body exactly at the limit is published."""
    hub, protocol, transport = _server(16)

    protocol.dataReceived(_request_head(b"Content-Length: 16") + b"x" * 16)

    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert transport.disconnecting is False
    assert hub.topics["t"].last.payload == b"x" * 16


def test_chunked_body_over_limit_refused_midway() -> None:
    """A chunked body is refused at the byte that crosses the limit."""
    hub, protocol, transport = _server(16)
    body = b"a\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n"
    protocol.dataReceived(_request_head(b"Transfer-Encoding: chunked"))

    answered_at = None
    for index in range(len(body)):
        protocol.dataReceived(body[index : index + 1])
        if answered_at is None and transport.value():
            answered_at = index
    sent = body[: answered_at + 1] if answered_at is not None else body

    # The 17th payload byte is the first second-chunk byte past 6 of them.
    assert sent.endswith(b"012345" + b"6")
    assert sent.count(b"0123456789") == 1
    _too_large(transport.value(), 16)
    assert transport.disconnecting is True
    assert hub.published == 0


def test_chunked_body_within_limit_accepted() -> None:
    """A chunked body within the limit, fed byte by byte, is published."""
    hub, protocol, transport = _server(16)
    body = b"8\r\n01234567\r\n8\r\n89abcdef\r\n0\r\n\r\n"
    protocol.dataReceived(_request_head(b"Transfer-Encoding: chunked"))

    for index in range(len(body)):
        protocol.dataReceived(body[index : index + 1])

    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert hub.topics["t"].last.payload == b"0123456789abcdef"


def test_refused_origin_gets_no_cors_on_413() -> None:
    """The early 413 carries CORS headers only for an allowed origin."""
    _, hub = make_hub(max_message_size=4, cors_origins=("https://dash.test",))
    allowed_protocol, allowed = connect(make_site(hub))
    refused_protocol, refused = connect(make_site(hub))

    allowed_protocol.dataReceived(
        _request_head(b"Content-Length: 5", b"Origin: https://dash.test")
    )
    refused_protocol.dataReceived(
        _request_head(b"Content-Length: 5", b"Origin: https://evil.test")
    )

    assert b"\r\nAccess-Control-Allow-Origin: https://dash.test\r\n" in allowed.value()
    assert b"Access-Control-Allow-Origin" not in refused.value()


def test_history_poll_reports_a_gap() -> None:
    """Polling from an id older than the kept history says there is a gap."""
    client = Client(history_size=2)
    first = json.loads(client.request("POST", "/api/topics/a", b"1")[2])["id"]
    for n in range(2, 6):
        client.request("POST", "/api/topics/a", b"%d" % n)
    kept = json.loads(client.request("GET", "/api/topics/a/messages")[2])

    _, _, old = client.request("GET", f"/api/topics/a/messages?since={first}")
    newest_kept_before = kept["messages"][0]["id"]
    _, _, recent = client.request(
        "GET", f"/api/topics/a/messages?since={newest_kept_before}"
    )

    assert json.loads(old)["gap"] is True
    assert [m["data"] for m in json.loads(old)["messages"]] == [4, 5]
    assert json.loads(recent)["gap"] is False
    assert [m["data"] for m in json.loads(recent)["messages"]] == [5]
    assert kept["gap"] is False


def test_topic_listing_pages_by_name() -> None:
    """The topic list filters by prefix and pages with limit and after."""
    client = Client()
    for topic in ("a.x", "a.y", "a.z", "b.x"):
        client.request("POST", f"/api/topics/{topic}", b"1")

    first = json.loads(client.request("GET", "/api/topics?prefix=a.&limit=2")[2])
    rest = json.loads(
        client.request("GET", "/api/topics?prefix=a.&limit=2&after=a.y")[2]
    )

    assert [t["topic"] for t in first["topics"]] == ["a.x", "a.y"]
    assert first["more"] is True
    assert [t["topic"] for t in rest["topics"]] == ["a.z"]
    assert rest["more"] is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 7), ("0", 0), ("42", 42), ("5000", 1000), (3, 3), (5000, 1000)],
)
def test_counts_a_client_chooses(value: object, expected: int) -> None:
    """'last' and 'limit' read query digits and JSON integers, capped."""
    assert parse_count(value, "last", 7, 1000) == expected


@pytest.mark.parametrize("value", ["-1", "+1", " 1", "1.5", "\u0661", -1, 1.0, True])
def test_bad_counts_are_refused(value: object) -> None:
    """Signs, spaces, fractions, non-ASCII digits and booleans are 400."""
    with pytest.raises(BadRequest):
        parse_count(value, "last", 0, 1000)
