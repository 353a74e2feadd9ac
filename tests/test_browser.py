"""
TinyMQ in a real browser: headless Chromium opens a page served from
another origin, whose EventSource and WebSocket connect to a twistd broker.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from tests.browser_helpers import (
    CuttableProxy,
    PageServer,
    Report,
    browser,
    events,
    header,
    publish,
)
from tests.conftest import Broker

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

TIME_LIMIT = 30
WAIT = 15
METRICS = {"cpu_usage": 45, "ram_usage": 1024}


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    """Fail a test that runs longer than TIME_LIMIT seconds."""

    def expired(signum: int, frame: FrameType | None) -> None:
        pytest.fail(f"the test ran over {TIME_LIMIT} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TIME_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    """A server of the test page, on its own origin."""
    server = PageServer()
    yield server
    server.close()


@pytest.fixture
def other_page_server() -> Iterator[PageServer]:
    """A second server of the test page, on an origin of its own."""
    server = PageServer()
    yield server
    server.close()


def _opened(*sources: str) -> Callable[[list[Report]], bool]:
    def done(reports: list[Report]) -> bool:
        return all(events(reports, source, "open") for source in sources)

    return done


def _messages(source: str, count: int) -> Callable[[list[Report]], bool]:
    def done(reports: list[Report]) -> bool:
        return len(events(reports, source, "message")) >= count

    return done


def test_posted_json_reaches_eventsource_and_websocket(
    chromium_binary: str, broker: Broker, page_server: PageServer, tmp_path: Path
) -> None:
    """A posted object comes out of JSON.parse in a cross-origin page's
    EventSource and WebSocket exactly as it went in."""
    ws_url = broker.base_url.replace("http:", "ws:", 1)
    url = page_server.page_url(
        sse=f"{broker.base_url}/api/topics/dashboard.metrics/sse",
        ws=f"{ws_url}/api/topics/dashboard.metrics/ws",
    )

    with browser(chromium_binary, tmp_path / "profile", url):
        page_server.wait_for(_opened("sse", "ws"), WAIT, "both to open")
        published = publish(broker.base_url, "dashboard.metrics", METRICS)
        reports = page_server.wait_for(
            lambda r: _messages("sse", 1)(r) and _messages("ws", 1)(r),
            WAIT,
            "the message on both",
        )

    assert page_server.origin != broker.base_url
    [sse] = events(reports, "sse", "message")
    assert sse["json"] == {"value": METRICS}
    assert sse["lastEventId"] == published["id"]
    [ws] = events(reports, "ws", "message")
    assert ws["json"] == {"value": METRICS}
    assert events(reports, "sse", "error") == []
    assert events(reports, "ws", "error") == []


def test_eventsource_resumes_after_the_connection_drops(
    chromium_binary: str, broker: Broker, page_server: PageServer, tmp_path: Path
) -> None:
    """An EventSource cut off mid-stream reconnects with Last-Event-ID by
    itself and ends up with every message exactly once, in order."""
    proxy = CuttableProxy(broker.port)
    url = page_server.page_url(sse=f"{proxy.url}/api/topics/dashboard.resume/sse")
    sent = [{"cpu_usage": n, "ram_usage": 1024} for n in range(10)]
    ids: list[str] = []

    def send(batch: list[dict[str, int]]) -> None:
        for message in batch:
            ids.append(publish(broker.base_url, "dashboard.resume", message)["id"])

    try:
        with browser(chromium_binary, tmp_path / "profile", url):
            page_server.wait_for(_opened("sse"), WAIT, "the stream to open")
            send(sent[:3])
            page_server.wait_for(_messages("sse", 3), WAIT, "the first 3")

            proxy.cut()
            page_server.wait_for(
                lambda r: events(r, "sse", "error") != [], WAIT, "the drop"
            )
            send(sent[3:8])
            proxy.restore()
            page_server.wait_for(
                lambda r: len(events(r, "sse", "open")) == 2, WAIT, "the reconnect"
            )
            send(sent[8:])
            reports = page_server.wait_for(_messages("sse", 10), WAIT, "all 10")
    finally:
        proxy.close()

    received = events(reports, "sse", "message")
    assert [r["json"] for r in received] == [{"value": m} for m in sent]
    assert [r["lastEventId"] for r in received] == ids
    resumed = [h for h in proxy.request_heads if h.startswith("GET ")][1:]
    assert [header(h, "last-event-id") for h in resumed] == [ids[2]]


def test_disallowed_origin_cannot_open_websocket_or_read_stream(
    chromium_binary: str,
    broker_factory: Callable[..., Broker],
    page_server: PageServer,
    other_page_server: PageServer,
    tmp_path: Path,
) -> None:
    """With --cors-origins naming one origin, a page of another origin gets
    neither a WebSocket nor the EventSource stream, while a page of the
    allowed origin in the same browser receives the message on both."""
    allowed, refused = other_page_server, page_server
    broker = broker_factory("--cors-origins", allowed.origin)
    ws_url = broker.base_url.replace("http:", "ws:", 1)
    streams = {
        "sse": f"{broker.base_url}/api/topics/dashboard.metrics/sse",
        "ws": f"{ws_url}/api/topics/dashboard.metrics/ws",
    }
    url = refused.page_url(frame=allowed.page_url(**streams), **streams)

    with browser(chromium_binary, tmp_path / "profile", url):
        refused.wait_for(
            lambda r: bool(events(r, "ws", "close") and events(r, "sse", "error")),
            WAIT,
            "the refusals",
        )
        allowed.wait_for(_opened("sse", "ws"), WAIT, "the allowed page")
        publish(broker.base_url, "dashboard.metrics", METRICS)
        allowed_reports = allowed.wait_for(
            lambda r: _messages("sse", 1)(r) and _messages("ws", 1)(r),
            WAIT,
            "the message on the allowed page",
        )
        refused_reports = refused.reports()

    assert [r["json"] for r in events(allowed_reports, "sse", "message")] == [
        {"value": METRICS}
    ]
    assert [r["json"] for r in events(allowed_reports, "ws", "message")] == [
        {"value": METRICS}
    ]
    assert sorted((r["source"], r["kind"]) for r in refused_reports) == [
        ("page", "loaded"),
        ("sse", "error"),
        ("ws", "close"),
        ("ws", "error"),
    ]
    [close] = events(refused_reports, "ws", "close")
    assert (close["code"], close["wasClean"]) == (1006, False)
    [error] = events(refused_reports, "sse", "error")
    assert error["readyState"] == 2
