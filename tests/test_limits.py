"""
End-to-end tests of the limits on a real broker: each trips at its
configured value with its status and a JSON error body, and a normal
subscriber keeps getting its messages meanwhile, also while a client opens
connections in a loop and others send their headers a byte at a time.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from tests.conftest import Broker
from tests.e2e import (
    HOST,
    HTTPStream,
    WebSocketClient,
    assert_error,
    connect,
    drop,
    http_request,
    open_sse,
    open_ws,
    publish,
    read_until_closed,
    request,
    sleep,
    wait_until,
    ws_command,
)

pytestmark = pytest.mark.e2e

UNTRUSTED = ("--trusted-addresses", "")
"""Loopback is trusted by default; these options make it count."""


def assert_closed_after(stream: HTTPStream) -> None:
    """Check that an early answer was whole and said it closes."""
    assert stream.complete is True
    assert stream.closed is True
    assert stream.headers["connection"] == ["close"]


async def hold(port: int) -> HTTPStream:
    """Open a connection that sends nothing."""
    stream = HTTPStream(b"")
    await connect(port, stream)
    return stream


async def refused(port: int) -> HTTPStream:
    """Open a connection that sends nothing; return once the server closed it."""
    return await read_until_closed(port)


async def ws_publish(client: WebSocketClient, topic: str, data: Any) -> Any:
    """Publish over C{/ws}; return the reply."""
    return await ws_command(client, {"type": "publish", "topic": topic, "data": data})


async def received(stream: HTTPStream, count: int) -> list[str]:
    """Wait for C{count} messages on an SSE stream; return their data."""
    await wait_until(lambda: len(stream.data()) >= count, f"{count} messages")
    return stream.data()


# Connections


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_the_next_with_503(
    broker_factory: Callable[..., Broker],
) -> None:
    """With --max-connections 4 the fifth connection gets 503; four work."""
    small = broker_factory("--max-connections", "4")
    subscriber = await open_sse(small.port, "/api/topics/lim.conn/sse")
    publisher = await open_ws(small.port, "/ws")
    holders = [await hold(small.port) for _ in range(2)]

    over = await refused(small.port)
    reply = await ws_publish(publisher, "lim.conn", "still served")
    messages = await received(subscriber, 1)
    held = [(holder.raw, holder.closed) for holder in holders]
    await drop(subscriber, publisher, *holders)

    assert over.raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert_error(over, 503, "unavailable")
    assert_closed_after(over)
    assert held == [(b"", False), (b"", False)]
    assert reply["type"] == "published"
    assert messages == ['"still served"']


@pytest_twisted.ensureDeferred
async def test_max_connections_per_address_refuses_with_429(
    broker_factory: Callable[..., Broker],
) -> None:
    """With 3 per address and loopback untrusted, the fourth gets 429."""
    small = broker_factory("--max-connections-per-address", "3", *UNTRUSTED)
    subscriber = await open_sse(small.port, "/api/topics/lim.addr/sse")
    publisher = await open_ws(small.port, "/ws")
    holder = await hold(small.port)

    over = await refused(small.port)
    reply = await ws_publish(publisher, "lim.addr", "still served")
    messages = await received(subscriber, 1)
    held = (holder.raw, holder.closed)
    await drop(subscriber, publisher, holder)

    assert over.raw.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert_error(over, 429, "too-many-requests")
    assert over.headers["retry-after"] == ["10"]
    assert_closed_after(over)
    assert held == (b"", False)
    assert reply["type"] == "published"
    assert messages == ['"still served"']


@pytest_twisted.ensureDeferred
async def test_trusted_address_is_exempt_from_the_per_address_limit(
    broker_factory: Callable[..., Broker],
) -> None:
    """Loopback, trusted by default, may open more than the per-address limit."""
    small = broker_factory("--max-connections-per-address", "2")
    holders = [await hold(small.port) for _ in range(3)]

    reply = await request("GET", f"{small.base_url}/healthz")
    held = [(holder.raw, holder.closed) for holder in holders]
    await drop(*holders)

    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert held == [(b"", False)] * 3


# Subscriptions and topics


@pytest_twisted.ensureDeferred
async def test_max_subscriptions_on_api_sse(
    broker_factory: Callable[..., Broker],
) -> None:
    """With --max-subscriptions 2, /api/sse takes two topics and refuses three."""
    small = broker_factory("--max-subscriptions", "2")
    two = await open_sse(small.port, "/api/sse?topic=lim.s1&topic=lim.s2")

    three = await request(
        "GET", f"{small.base_url}/api/sse?topic=lim.s1&topic=lim.s2&topic=lim.s3"
    )
    await publish(small.base_url, "lim.s2", '"two"')
    messages = await received(two, 1)
    await drop(two)

    assert two.status == 200
    assert_error(three, 400, "bad-request")
    assert [json.loads(data)["data"] for data in messages] == ["two"]


@pytest_twisted.ensureDeferred
async def test_max_subscriptions_on_ws(broker_factory: Callable[..., Broker]) -> None:
    """With --max-subscriptions 2, a third /ws topic is refused; two still work."""
    small = broker_factory("--max-subscriptions", "2")
    client = await open_ws(small.port, "/ws")
    first = await ws_command(client, {"type": "subscribe", "topic": "lim.w1"})
    second = await ws_command(client, {"type": "subscribe", "topic": "lim.w2"})

    third = await ws_command(client, {"type": "subscribe", "topic": "lim.w3"})
    again = await ws_command(client, {"type": "subscribe", "topic": "lim.w1"})
    await publish(small.base_url, "lim.w3", '"three"')
    await publish(small.base_url, "lim.w2", '"two"')
    await wait_until(lambda: len(client.messages) == 5, "the message")
    await drop(client)

    assert [first["type"], second["type"]] == ["subscribed", "subscribed"]
    assert (third["type"], third["error"]) == ("error", "bad-request")
    assert again == {"type": "subscribed", "topic": "lim.w1"}
    message = client.json_messages()[4]
    assert (message["topic"], message["data"]) == ("lim.w2", "two")


@pytest_twisted.ensureDeferred
async def test_max_topics_refuses_a_new_topic_with_503(
    broker_factory: Callable[..., Broker],
) -> None:
    """With --max-topics 3, a fourth topic is 503; the three keep working."""
    small = broker_factory("--max-topics", "3")
    subscriber = await open_sse(small.port, "/api/topics/lim.t1/sse")
    first = [await publish(small.base_url, f"lim.t{n}", f"{n}") for n in (1, 2, 3)]

    fourth = await publish(small.base_url, "lim.t4", "4")
    again = await publish(small.base_url, "lim.t1", "11")
    messages = await received(subscriber, 2)
    await drop(subscriber)

    assert [reply.status for reply in first] == [200, 200, 200]
    assert_error(fourth, 503, "unavailable")
    assert again.status == 200
    assert messages == ["1", "11"]


# Publish rate


RATE = ("--publish-rate", "0.1", "--publish-burst", "3")


@pytest_twisted.ensureDeferred
async def test_publish_rate_answers_429_with_retry_after(
    broker_factory: Callable[..., Broker],
) -> None:
    """Past a burst of 3 at 0.1/s, REST and /ws publishes get 429."""
    small = broker_factory(*RATE, *UNTRUSTED)
    subscriber = await open_sse(small.port, "/api/topics/lim.rate/sse")
    client = await open_ws(small.port, "/ws")
    started = time.monotonic()

    burst = [await publish(small.base_url, "lim.rate", f"{n}") for n in (1, 2, 3)]
    over = await publish(small.base_url, "lim.rate", "4")
    elapsed = time.monotonic() - started
    over_ws = await ws_publish(client, "lim.rate", 5)
    await sleep(0.2)
    await drop(client, subscriber)

    # The wait is what the bucket lacks for one token: 10 s less the time
    # that passed since the burst began, in whole seconds.
    waits = {str(max(1, n)) for n in range(round(10 - elapsed), 11)}
    assert [reply.status for reply in burst] == [200, 200, 200]
    assert_error(over, 429, "too-many-requests")
    assert over.header("retry-after")[0] in waits
    assert (over_ws["type"], over_ws["error"]) == ("error", "too-many-requests")
    assert subscriber.data() == ["1", "2", "3"]


@pytest_twisted.ensureDeferred
async def test_publish_rate_does_not_apply_to_trusted_loopback(
    broker_factory: Callable[..., Broker],
) -> None:
    """With loopback trusted (the default), the rate does not apply to it."""
    small = broker_factory(*RATE)

    replies = [await publish(small.base_url, "lim.rate", f"{n}") for n in range(6)]

    assert [reply.status for reply in replies] == [200] * 6


@pytest_twisted.ensureDeferred
async def test_publish_rate_is_per_api_key(
    broker_factory: Callable[..., Broker], tmp_path: Path
) -> None:
    """Each API key has its own bucket, even from a trusted address."""
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[keys.one]\nkey = "first-key-0123456789abcdef"\npublish = [">"]\n'
        '[keys.two]\nkey = "second-key-0123456789abcdef"\npublish = [">"]\n'
    )
    small = broker_factory(*RATE, "--auth-keys", str(keys))

    async def send(key: str) -> int:
        reply = await request(
            "POST",
            f"{small.base_url}/api/topics/lim.key",
            b"1",
            {"Authorization": f"Bearer {key}"},
        )
        return reply.status

    first = [await send("first-key-0123456789abcdef") for _ in range(4)]
    second = [await send("second-key-0123456789abcdef") for _ in range(4)]

    assert first == [200, 200, 200, 429]
    assert second == [200, 200, 200, 429]


# Request headers


HEADER_LIMIT = 1024


def _padded_request(port: int, size: int) -> bytes:
    """Return a GET whose request line and header lines total C{size} bytes."""
    head = ["GET /healthz HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close"]
    used = sum(len(line) for line in head) + len("X-Pad: ")
    head.append("X-Pad: " + "p" * (size - used))
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii")


@pytest_twisted.ensureDeferred
async def test_max_header_size_is_exact_and_answers_431(
    broker_factory: Callable[..., Broker],
) -> None:
    """Headers of exactly --max-header-size are served; one byte more is 431."""
    small = broker_factory("--max-header-size", str(HEADER_LIMIT))
    subscriber = await open_sse(small.port, "/api/topics/lim.head/sse")

    exact = HTTPStream(_padded_request(small.port, HEADER_LIMIT))
    await connect(small.port, exact)
    over = HTTPStream(_padded_request(small.port, HEADER_LIMIT + 1))
    await connect(small.port, over)
    long_line = HTTPStream(
        http_request("GET", "/healthz", small.port, {"X-Long": "l" * 2000})
    )
    await connect(small.port, long_line)
    await wait_until(
        lambda: exact.closed and over.closed and long_line.closed, "the answers"
    )
    await publish(small.base_url, "lim.head", '"ok"')
    messages = await received(subscriber, 1)
    await drop(subscriber)

    assert (exact.status, exact.json()) == (200, {"status": "ok"})
    assert_error(over, 431, "headers-too-large")
    assert_closed_after(over)
    assert_error(long_line, 431, "headers-too-large")
    assert_closed_after(long_line)
    assert messages == ['"ok"']


class SlowClient(HTTPStream):
    """Sends C{first} at once, then C{rest} one byte every C{interval} s."""

    def __init__(self, first: bytes, rest: bytes, interval: float = 0.5) -> None:
        super().__init__(first)
        self.rest = rest
        self.sent = 0
        self.interval = interval
        self._loop = LoopingCall(self._trickle)
        self._loop.clock = reactor

    def connectionMade(self) -> None:
        super().connectionMade()
        self._loop.start(self.interval, now=False)

    def _trickle(self) -> None:
        if self.sent < len(self.rest) and self.transport is not None:
            self.transport.write(self.rest[self.sent : self.sent + 1])
            self.sent += 1

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.stop()
        super().connectionLost()

    def stop(self) -> None:
        """Send no more bytes."""
        if self._loop.running:
            self._loop.stop()


@pytest.fixture
def slow_clients() -> Iterator[list[SlowClient]]:
    """A list for the slow clients of a test; all are dropped after it."""
    clients: list[SlowClient] = []
    yield clients
    for client in clients:
        client.stop()
        client.abort()


HEADER_TIMEOUT = 2.0
SLOW_HEADERS = b"Host: 127.0.0.1\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_slow_headers_are_cut_off_with_408(
    broker_factory: Callable[..., Broker], slow_clients: list[SlowClient]
) -> None:
    """Headers sent a byte per 0.5 s after the request line get 408 in time."""
    small = broker_factory("--header-timeout", str(HEADER_TIMEOUT))
    subscriber = await open_sse(small.port, "/api/topics/lim.slow/sse")
    slow = SlowClient(b"GET /healthz HTTP/1.1\r\n", SLOW_HEADERS)
    slow_clients.append(slow)

    await connect(small.port, slow)
    await wait_until(lambda: slow.closed, "the 408", timeout=HEADER_TIMEOUT + 4)
    await publish(small.base_url, "lim.slow", '"ok"')
    messages = await received(subscriber, 1)
    await drop(subscriber)

    assert slow.raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert_error(slow, 408, "request-timeout")
    assert_closed_after(slow)
    assert 1 <= slow.sent < len(SLOW_HEADERS)
    assert messages == ['"ok"']


@pytest_twisted.ensureDeferred
async def test_slow_request_line_is_cut_off_with_408(
    broker_factory: Callable[..., Broker], slow_clients: list[SlowClient]
) -> None:
    """A request sent a byte per 0.5 s from its first byte gets 408 in time."""
    small = broker_factory("--header-timeout", str(HEADER_TIMEOUT))
    slow = SlowClient(b"G", b"ET /healthz?" + b"q" * 100 + b" HTTP/1.1\r\n")
    slow_clients.append(slow)

    await connect(small.port, slow)
    await wait_until(lambda: slow.closed, "the 408", timeout=HEADER_TIMEOUT + 4)

    assert slow.raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert_error(slow, 408, "request-timeout")


# Under attack


FLOOD = 2000
SLOW_CLIENTS = 20
MESSAGES = 100


class Flood(threading.Thread):
    """
    Opens connections one after another as fast as it can, closing each at
    once: C{count} of them at least, and on until told to stop.
    """

    def __init__(self, port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.count = count
        self.opened = 0
        self.failed = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while self.opened < self.count or not self.stopping.is_set():
            try:
                with socket.create_connection((HOST, self.port), timeout=10):
                    self.opened += 1
            except OSError:
                self.failed += 1


@pytest_twisted.ensureDeferred
async def test_flood_and_slow_clients_do_not_disturb_a_subscriber(
    broker_factory: Callable[..., Broker], slow_clients: list[SlowClient]
) -> None:
    """
    While one client opens connections in a loop and 20 send headers a byte
    at a time, a subscriber gets every message published meanwhile, in order,
    and the slow clients are cut off with 408.
    """
    small = broker_factory("--header-timeout", str(HEADER_TIMEOUT))
    subscriber = await open_sse(small.port, "/api/topics/lim.flood/sse")
    slow = [SlowClient(b"", b"GET /healthz HTTP/1.1\r\n") for _ in range(SLOW_CLIENTS)]
    slow_clients.extend(slow)
    for client in slow:
        await connect(small.port, client)
    flood = Flood(small.port, FLOOD)
    before = small.log_size()

    flood.start()
    replies = [
        await publish(small.base_url, "lim.flood", f"{n}") for n in range(MESSAGES)
    ]
    flood.stopping.set()
    await wait_until(lambda: not flood.is_alive(), "the flood to end", timeout=60)
    messages = await received(subscriber, MESSAGES)
    await wait_until(
        lambda: all(client.closed for client in slow),
        "the slow clients to be cut off",
        timeout=HEADER_TIMEOUT + 5,
    )
    alive = not subscriber.closed and not subscriber.complete
    await drop(subscriber)

    assert (flood.opened >= FLOOD, flood.failed) == (True, 0)
    assert [reply.status for reply in replies] == [200] * MESSAGES
    assert messages == [str(n) for n in range(MESSAGES)]
    assert alive is True
    assert [client.status for client in slow] == [408] * SLOW_CLIENTS
    log = small.log(before)
    assert "Traceback" not in log
    assert "Unhandled" not in log
