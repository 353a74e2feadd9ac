"""
The live web console: its static files and its feed of server figures.

The page, its script and its style sheet are files in C{tinymq/console/},
served as they are, with no build step. The page follows topics with
TinyMQ's own SSE streams, like any other client. The table of topics and
the server's counters come from L{ConsoleFeed}: an SSE stream that sends a
snapshot once a second to each open console, built once for all of them
and never published through the hub, so that watching the server does not
change its counters.
"""

# twisted.web and twisted.python.logfile have no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.web.server import Request
from zope.interface import implementer

from . import __version__
from ._hub import Hub
from ._metrics import backlog_bytes, connection_counts, history_messages, rank_topics
from ._sse import cancel_call, open_event_stream
from ._wire import sse_event

CONSOLE_DIR = Path(__file__).resolve().parent / "console"

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
}

CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; "
    b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
    b"form-action 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS = (
    (b"Content-Security-Policy", CONTENT_SECURITY_POLICY),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-cache"),
)

TOPICS_SHOWN = 100
"""The most active topics sent to the console; the rest are only counted."""


def console_asset(name: str) -> tuple[bytes, bytes] | None:
    """
    Return the bytes and content type of the console file C{name}, or
    C{None} if there is no such file.

    Only a plain file name that is in the console directory is served: no
    path, no hidden file, no type outside L{CONTENT_TYPES}.
    """
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        return None
    content_type = CONTENT_TYPES.get(Path(name).suffix)
    if content_type is None:
        return None
    if name not in {path.name for path in CONSOLE_DIR.iterdir() if path.is_file()}:
        return None
    return (CONSOLE_DIR / name).read_bytes(), content_type


def set_console_headers(request: Request, content_type: bytes) -> None:
    """Set the content type and the strict security headers of the console."""
    request.setHeader(b"Content-Type", content_type)
    for header, value in SECURITY_HEADERS:
        request.setHeader(header, value)


def snapshot(hub: Hub, limit: int = TOPICS_SHOWN) -> dict[str, Any]:
    """Return the figures one console update shows."""
    counts, subscriptions = connection_counts(hub)
    topics = [
        {
            "topic": topic.name,
            "subscribers": subscribers,
            "messages": topic.published,
            "rate": round(topic.rate, 3),
            "history": len(topic.history),
            "last_id": str(topic.last.id) if topic.last else None,
        }
        for topic, subscribers in rank_topics(hub, limit)
    ]
    return {
        "version": __version__,
        "time": hub.clock.seconds(),  # type: ignore[misc]
        "started": hub.started,
        "server": {
            "topics": len(hub.topics),
            "connections_sse": counts["sse"],
            "connections_ws": counts["ws"],
            "subscriptions": subscriptions,
            "published": hub.published,
            "delivered": hub.delivered,
            "skipped": hub.skipped,
            "dropped": hub.dropped,
            "paused": len(hub.paused),
            "backlog_bytes": backlog_bytes(hub),
            "history_messages": history_messages(hub),
            "history_bytes": hub.stats()["history_bytes"],
        },
        "topics": topics,
    }


@implementer(IPushProducer)
class _FeedStream:
    """
    One console's feed. A paused stream skips updates, since only the
    latest counts, and gets the latest one when it resumes.
    """

    def __init__(self, feed: ConsoleFeed, request: Request) -> None:
        self.feed = feed
        self.request = request
        self.paused = False
        self.done: Deferred[None] = Deferred(lambda _: self.close())

    def send(self, event: bytes) -> None:
        """Write one event unless the client cannot take it now."""
        if not self.paused:
            self.request.write(event)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.send(self.feed.latest)

    def stopProducing(self) -> None:
        self.close()

    def close(self) -> None:
        """Forget this stream."""
        self.feed.streams.discard(self)

    def end(self) -> None:
        """End the response and close its connection: the server stops."""
        self.close()
        request = self.request
        if not request.finished and getattr(request, "channel", None) is not None:
            request.unregisterProducer()
            transport = request.channel.transport
            request.finish()
            if transport is not None:
                transport.loseConnection()  # type: ignore[misc]
        if not self.done.called:
            self.done.callback(None)


class ConsoleFeed:
    """The SSE stream of server figures that the open consoles follow."""

    def __init__(self, hub: Hub, interval: float = 1.0) -> None:
        self.hub = hub
        self.interval = interval
        self.streams: set[_FeedStream] = set()
        self.latest = b""
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = hub.clock

    def open(self, request: Request, expires: float | None = None) -> Deferred[None]:
        """
        Start a feed on C{request}; the Deferred fires when it ends, at the
        latest when the token expires at C{expires}.
        """
        open_event_stream(request, self.hub.config.sse_retry)
        stream = _FeedStream(self, request)
        self.streams.add(stream)
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: stream.close())
        self.latest = self._event()
        stream.send(self.latest)
        if not self._ticker.running:
            self._ticker.start(self.interval, now=False)
        if expires is not None:
            clock = self.hub.clock
            expiry = clock.callLater(max(0.0, expires - clock.seconds()), stream.end)
            stream.done.addBoth(cancel_call, expiry)
        return stream.done

    def _event(self) -> bytes:
        data = json.dumps(snapshot(self.hub), separators=(",", ":"))
        return sse_event(data.encode("utf-8"), event="stats")

    def _tick(self) -> None:
        if self.hub.closing:
            self.stop()
            return
        if not self.streams:
            self._ticker.stop()
            return
        self.latest = self._event()
        for stream in list(self.streams):
            stream.send(self.latest)

    def stop(self) -> None:
        """End every feed: the server stops."""
        if self._ticker.running:
            self._ticker.stop()
        for stream in list(self.streams):
            stream.end()
