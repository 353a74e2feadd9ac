"""
Test doubles shared by TinyMQ's unit tests: a recording subscriber, a
transport that counts its writes, and a whole server joined to a
L{StringTransport} by a real L{HTTPChannel}.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from tinymq._config import Config
from tinymq._http import API
from tinymq._hub import Hub
from tinymq._site import Root, TinyMQChannel, TinyMQSite
from tinymq._subscriber import Subscriber

from .sse_parser import Event, SSEParser


def make_hub(**settings: Any) -> tuple[MemoryReactorClock, Hub]:
    """Return a fake clock and a hub on it, with C{settings} changed."""
    clock = MemoryReactorClock()
    return clock, Hub(clock, Config(**settings))


class RecordingSubscriber(Subscriber):
    """
    A subscriber whose connection is a list: every write and every call the
    hub makes on it is recorded in order in C{calls}.
    """

    def __init__(
        self,
        hub: Hub,
        policy: str | None = None,
        max_rate: float | None = None,
        fmt: str = "sse",
        chunked: bool = False,
    ) -> None:
        self.calls: list[tuple[str, Any]] = []
        super().__init__(hub, self._record_write, policy, max_rate)
        self.fmt = fmt
        self.chunked = chunked

    def _record_write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    @property
    def written(self) -> list[bytes]:
        """Every write, in order, one item per call."""
        return [data for kind, data in self.calls if kind == "write"]

    def reset(self, last_id: int) -> None:
        self.calls.append(("reset", last_id))

    def notify_skipped(self, count: int) -> None:
        self.calls.append(("skipped", count))

    def overflow(self) -> None:
        self.calls.append(("overflow", None))
        super().overflow()

    def abort(self, reason: str) -> None:
        self.calls.append(("abort", reason))
        self.gone()

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))
        self.gone()

    def count(self, kind: str) -> int:
        """Count the recorded calls of one kind."""
        return sum(1 for recorded, _ in self.calls if recorded == kind)


class WriteCountingTransport(StringTransport):
    """
    A L{StringTransport} that keeps each write as its own item and says it
    is connected, as a TCP transport does until it is closed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.connected = True

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def make_site(hub: Hub) -> TinyMQSite:
    """
    Build the real site around C{hub}, as the service does, with the hub's
    fake clock for the connections' timeouts.
    """
    api = API(hub, hub.config)
    site = TinyMQSite(Root(api.app.resource(), hub.config), hub.config)
    site._reactor = hub.clock
    return site


def connect(site: TinyMQSite) -> tuple[Any, WriteCountingTransport]:
    """
    Open one HTTP connection to C{site} over an in-memory transport; return
    the connection's protocol and its transport.
    """
    protocol = site.buildProtocol(None)
    assert protocol is not None
    transport = WriteCountingTransport()
    protocol.makeConnection(transport)
    assert isinstance(transport.producer, TinyMQChannel)
    return protocol, transport


def get_request(path: bytes, *headers: bytes) -> bytes:
    """Return the bytes of an HTTP/1.1 GET request."""
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: tinymq.test", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def split_response(raw: bytes) -> tuple[bytes, bytes]:
    """Split an HTTP response into its head and its body bytes."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def dechunk(body: bytes) -> bytes:
    """Decode a complete sequence of HTTP/1.1 chunks (no terminator needed)."""
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        assert rest[size : size + 2] == b"\r\n"
        body = rest[size + 2 :]
    return out


def parse_sse(chunks: Iterable[bytes]) -> tuple[list[Event], SSEParser]:
    """Feed C{chunks} to a new WHATWG SSE parser; return its events."""
    parser = SSEParser()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events, parser


def result_of(deferred: Any) -> Any:
    """Return the result a Deferred already has, or raise its failure."""
    box: list[Any] = []
    deferred.addBoth(box.append)
    assert box, "the Deferred has no result yet"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]
