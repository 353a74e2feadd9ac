"""
The live web console: its files, its feed of server figures, and the page
itself in headless Chromium, driven over the DevTools protocol.

The page is driven by L{tests.browser_helpers.DevTools}, from the
C{devtools} fixture of conftest.py.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import treq
from treq.testing import StubTreq

from tests.browser_helpers import ARTIFACTS, DevTools, publish
from tests.conftest import Broker
from tests.sse_parser import Event, SSEParser
from tinymq._console import CONTENT_SECURITY_POLICY
from tinymq._http import API
from tinymq._site import Root

from .helpers import RecordingSubscriber, make_hub, result_of

URL = "http://tinymq.test"
ROOT = Path(__file__).resolve().parent.parent
WAIT = 15.0


# The console's files and feed, over StubTreq


class Server:
    """A StubTreq client over the real resource tree, a real hub, a fake clock."""

    def __init__(self, **settings: Any) -> None:
        self.clock, self.hub = make_hub(**settings)
        self.api = API(self.hub, self.hub.config)
        self.stub = StubTreq(Root(self.api.app.resource(), self.hub.config))

    def get(self, path: str) -> tuple[int, Any, bytes]:
        """Send a GET; return the status, the headers and the body."""
        response = self._wait(self.stub.get(URL + path, allow_redirects=False))
        return response.code, response.headers, self._wait(response.content())

    def feed(self) -> SSEParser:
        """Open the console feed; return the parser its bytes go to."""
        response = self._wait(self.stub.get(URL + "/console/events"))
        assert response.code == 200
        parser = SSEParser()
        self.events: list[Event] = []
        treq.collect(response, lambda data: self.events.extend(parser.feed(data)))
        self.stub.flush()
        return parser

    def stats(self) -> list[dict[str, Any]]:
        """Return the data of every C{stats} event received so far."""
        return [json.loads(e.data) for e in self.events if e.type == "stats"]

    def _wait(self, deferred: Any) -> Any:
        self.stub.flush()
        return result_of(deferred)


def header(headers: Any, name: str) -> list[str]:
    """Return every value of one response header, decoded."""
    return [v.decode() for v in headers.getRawHeaders(name.encode(), [])]


@pytest.mark.parametrize("path", ["/", "/console"])
def test_console_page(path: str) -> None:
    """The console page is served at / and /console with strict headers."""
    server = Server()

    status, headers, body = server.get(path)

    assert status == 200
    assert body == (ROOT / "tinymq" / "console" / "index.html").read_bytes()
    assert header(headers, "Content-Type") == ["text/html; charset=utf-8"]
    assert header(headers, "Content-Security-Policy") == [
        CONTENT_SECURITY_POLICY.decode()
    ]
    assert header(headers, "X-Content-Type-Options") == ["nosniff"]
    assert header(headers, "X-Frame-Options") == ["DENY"]
    assert header(headers, "Referrer-Policy") == ["no-referrer"]


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("console.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
        ("index.html", "text/html; charset=utf-8"),
    ],
)
def test_console_files(name: str, content_type: str) -> None:
    """Each console file is served whole, with its content type."""
    server = Server()

    status, headers, body = server.get(f"/console/{name}")

    assert status == 200
    assert body == (ROOT / "tinymq" / "console" / name).read_bytes()
    assert header(headers, "Content-Type") == [content_type]
    assert header(headers, "Content-Security-Policy") == [
        CONTENT_SECURITY_POLICY.decode()
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/console/missing.js",
        "/console/..%2f_hub.py",
        "/console/%2e%2e%2f_hub.py",
        "/console/..%5c_hub.py",
        "/console/../_hub.py",
        "/console/.hidden.css",
        "/console/console",
        "/console/a/console.js",
        "/_hub.py",
        "/console/%2e%2e",
    ],
)
def test_nothing_outside_the_console_directory(path: str) -> None:
    """Paths that are not a console file get a JSON 404, never a file."""
    server = Server()

    status, headers, body = server.get(path)

    assert status == 404
    assert header(headers, "Content-Type") == ["application/json"]
    assert json.loads(body)["error"] == "not-found"


def test_console_slash_redirects() -> None:
    """/console/ sends the browser to /console, where relative links work."""
    server = Server()

    status, headers, _ = server.get("/console/")

    assert status == 302
    assert header(headers, "Location") == ["../console"]


@pytest.mark.parametrize(
    "path", ["/", "/console", "/console/", "/console/console.js", "/console/events"]
)
def test_console_off(path: str) -> None:
    """With --console false, nothing of the console is served."""
    server = Server(console=False)

    status, _, body = server.get(path)

    assert status == 404
    assert json.loads(body)["error"] == "not-found"


def test_feed_sends_a_snapshot_at_once_then_every_second() -> None:
    """The feed opens with the figures, then sends new ones each second."""
    server = Server()
    server.hub.attach(RecordingSubscriber(server.hub, fmt="ws"), ["a.>"])
    server.hub.publish("a.b", b'{"x": 1}')
    server.hub.flush()
    parser = server.feed()
    opened = server.stats()

    server.hub.publish("a.b", b"22")
    server.hub.publish("c", b"333")
    server.clock.advance(1.0)
    server.stub.flush()
    later = server.stats()

    assert parser.comments == ["ok"]
    assert parser.retry == 2000
    assert len(opened) == 1
    assert opened[0]["server"] == {
        "topics": 1,
        "connections_sse": 0,
        "connections_ws": 1,
        "subscriptions": 1,
        "published": 1,
        "delivered": 1,
        "skipped": 0,
        "dropped": 0,
        "paused": 0,
        "backlog_bytes": 0,
        "history_messages": 1,
        "history_bytes": 8,
    }
    assert opened[0]["version"] == "0.1.0"
    assert opened[0]["started"] == server.hub.started
    assert len(later) == 2
    assert later[1]["time"] == 1.0
    assert later[1]["server"]["published"] == 3
    assert later[1]["server"]["delivered"] == 2
    assert later[1]["topics"] == [
        {
            "topic": "a.b",
            "subscribers": 1,
            "messages": 2,
            "rate": 0.0,
            "history": 2,
            "last_id": str(server.hub.topics["a.b"].last.id),  # type: ignore[union-attr]
        },
        {
            "topic": "c",
            "subscribers": 0,
            "messages": 1,
            "rate": 0.0,
            "history": 1,
            "last_id": str(server.hub.last_id),
        },
    ]


def test_feed_does_not_touch_the_hub() -> None:
    """Watching the server publishes nothing and subscribes to nothing."""
    server = Server()

    server.feed()
    for _ in range(3):
        server.clock.advance(1.0)
    server.stub.flush()

    assert len(server.stats()) == 4
    assert server.hub.published == 0
    assert server.hub.topics == {}
    assert server.hub.subscribers == set()


def test_feed_limits_the_topics_it_sends() -> None:
    """The feed sends the 100 most active topics, and counts them all."""
    server = Server()
    for number in range(120):
        for _ in range(1 + number % 3):
            server.hub.publish(f"t{number:03d}", b"1")

    server.feed()
    (stats,) = server.stats()

    assert stats["server"]["topics"] == 120
    assert len(stats["topics"]) == 100
    assert [t["messages"] for t in stats["topics"]] == [3] * 40 + [2] * 40 + [1] * 20


def test_paused_feed_skips_to_the_latest() -> None:
    """A feed whose client reads slowly skips updates, then gets the latest."""
    server = Server()
    server.feed()
    (stream,) = server.api.console.streams  # type: ignore[union-attr]

    stream.pauseProducing()
    server.hub.publish("a", b"1")
    server.clock.advance(1.0)
    server.hub.publish("a", b"2")
    server.clock.advance(1.0)
    stream.resumeProducing()
    server.stub.flush()

    assert [s["server"]["published"] for s in server.stats()] == [0, 2]


def test_feed_ends_when_the_server_stops() -> None:
    """When the hub stops, the next tick ends every feed."""
    server = Server()
    server.feed()
    feed = server.api.console
    assert feed is not None

    server.hub.stop()
    server.clock.advance(1.0)
    server.stub.flush()

    assert feed.streams == set()
    assert len(server.stats()) == 1


class SSEClient:
    """A blocking SSE subscriber on a plain socket, over HTTP/1.0."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.parser = SSEParser()
        self.events: list[Event] = []
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(4096)
        self.head, _, body = head.partition(b"\r\n\r\n")
        self.events += self.parser.feed(body)

    def wait_for_events(self, count: int) -> list[Event]:
        """Read until C{count} events arrived; return them."""
        deadline = time.monotonic() + WAIT
        while len(self.events) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(4096)
            assert data, "the stream ended"
            self.events += self.parser.feed(data)
        return self.events

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


def _texts(selector: str) -> str:
    nodes = f"document.querySelectorAll({json.dumps(selector)})"
    return f"[...{nodes}].map(e => e.textContent)"


def _submit(form: str, **values: Any) -> str:
    """JavaScript that fills a form's fields and submits it."""
    steps = [
        f"document.getElementById({json.dumps(k)}).value = {json.dumps(v)};"
        for k, v in values.items()
    ]
    return (
        "".join(steps)
        + f"document.getElementById({json.dumps(form)}).requestSubmit(); true"
    )


@pytest.mark.e2e
@pytest.mark.browser
def test_console_in_chromium(broker: Broker, devtools: DevTools) -> None:
    """
    The console shows a published topic in its table, tails it live, and
    its publish form reaches an SSE subscriber, with no JavaScript error.
    """
    base = broker.base_url
    publish(base, "dashboard.metrics", {"cpu_usage": 45, "ram_usage": 1024})
    publish(base, "orders.created", {"order": 1042, "total": 99.5})

    devtools.navigate(base + "/")
    devtools.wait_for("document.body.dataset.feed === 'live'", "the live feed")
    devtools.wait_for(
        "!!document.querySelector('#topics tr[data-topic=\"orders.created\"]')",
        "the topic in the table",
    )
    devtools.evaluate(_submit("tail-form", **{"tail-pattern": "dashboard.>"}))
    devtools.wait_for("document.body.dataset.tail === 'dashboard.>'", "the tail")
    publish(base, "dashboard.metrics", {"cpu_usage": 47, "ram_usage": 1030})
    devtools.wait_for(
        "document.querySelectorAll('#tail li').length === 2", "two lines in the tail"
    )
    tail = devtools.evaluate(_texts("#tail li .data"))
    tail_topics = devtools.evaluate(_texts("#tail li .topic"))

    subscriber = SSEClient(broker.port, "/api/topics/console.form/sse")
    devtools.evaluate(
        _submit(
            "publish-form",
            **{"publish-topic": "console.form", "publish-body": '{"from": "the form"}'},
        )
    )
    (event,) = subscriber.wait_for_events(1)
    subscriber.close()
    result = devtools.wait_for(
        "document.getElementById('publish-result').className === 'ok'"
        " && document.getElementById('publish-result').textContent",
        "the publish result",
    )
    devtools.wait_for(
        "document.getElementById('c-published').textContent === '4'",
        "the published counter",
    )
    row = devtools.evaluate(_texts('#topics tr[data-topic="dashboard.metrics"] td'))
    devtools.screenshot(ARTIFACTS / "console.png")
    if os.environ.get("TINYMQ_DOCS_SCREENSHOT"):
        devtools.screenshot(ROOT / "docs" / "console.png")

    assert tail == [
        '{"cpu_usage":47,"ram_usage":1030}',
        '{"cpu_usage":45,"ram_usage":1024}',
    ]
    assert tail_topics == ["dashboard.metrics", "dashboard.metrics"]
    assert subscriber.head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert json.loads(event.data) == {"from": "the form"}
    assert result == f"Published message {event.last_event_id} to console.form."
    assert row[:3] == ["dashboard.metrics", "1", "2"]
    assert devtools.errors() == []
