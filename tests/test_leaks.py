"""
End-to-end test that subscribers leave nothing behind: hundreds of SSE and
WebSocket subscribers come and go, some closing cleanly and some vanishing
with a RST, against a real C{twistd -n tinymq} on 127.0.0.1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import Broker
from tests.rawclient import (
    SMALL_RCVBUF,
    Publisher,
    RawClient,
    SSEClient,
    WSClient,
    rss_kib,
)

pytestmark = pytest.mark.e2e

CYCLES = 500
RSS_GROWTH_BOUND_KIB = 4 * 1024


def open_fds(pid: int) -> int:
    """Count the open file descriptors of process C{pid}."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def one_cycle(port: int, publisher: Publisher, n: int) -> None:
    """
    Open an SSE stream, a multi-topic SSE stream with C{max_rate}, a topic
    WebSocket and a C{/ws} subscription with policy C{latest}; publish so
    that each has a message delivered and some have one pending; end them,
    each in one of three ways that turn with C{n}: a FIN, a RST, or a clean
    WebSocket close.
    """
    sse = SSEClient(port, "/api/topics/leak.a/sse")
    multi = SSEClient(port, "/api/sse?topic=leak.a&topic=leak.b.%3E&max_rate=5")
    topic_ws = WSClient(port, "/api/topics/leak.a/ws")
    command_ws = WSClient(port, "/ws")
    command_ws.send_json({"type": "subscribe", "topic": "leak.b.>", "policy": "latest"})
    command_ws.read_until(lambda: command_ws.messages, "the subscribe reply")

    # The second publish to each topic is held back by max_rate.
    for topic in ("leak.a", "leak.b.c", "leak.a", "leak.b.c"):
        publisher.post(topic, b'{"n":%d}' % n)
    sse.read_until(lambda: len(sse.messages()) == 2, "two messages")
    multi.read_until(lambda: len(multi.messages()) >= 2, "two envelopes")
    topic_ws.read_until(lambda: len(topic_ws.messages) == 2, "two frames")
    command_ws.read_until(lambda: len(command_ws.messages) == 3, "two messages")

    clients: list[RawClient] = [sse, multi, topic_ws, command_ws]
    for index, client in enumerate(clients):
        way = (n + index) % 3
        if way == 0:
            client.close()
        elif way == 1:
            client.vanish()
        elif isinstance(client, WSClient):
            client.close_cleanly()
        else:
            client.vanish()


def stall_and_vanish(port: int, publisher: Publisher) -> None:
    """
    Open an SSE stream that reads nothing, publish 10 kB messages until the
    broker pauses it and holds a backlog for it, then drop it with a RST.
    """
    stalled = SSEClient(port, "/api/topics/leak.big/sse", rcvbuf=SMALL_RCVBUF)
    big = b'{"pad":"%s"}' % (b"x" * 10_000)
    for _ in range(100):
        for _ in range(10):
            publisher.post("leak.big", big)
        if publisher.server()["paused"] == 1:
            break
    assert publisher.server()["paused"] == 1
    stalled.vanish()


def settle(publisher: Publisher, pid: int, fds: int | None) -> dict[str, int]:
    """
    Wait until the broker counts no subscriber (and, if given, holds
    C{fds} descriptors); return its server stats.
    """

    def settled() -> bool:
        server = publisher.server()
        if (server["connections"], server["paused"]) != (0, 0):
            return False
        return fds is None or open_fds(pid) == fds

    publisher.wait_for(settled, "every subscriber to be gone")
    time.sleep(0.5)
    return publisher.server()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """A broker of its own, whose memory nothing else touches."""
    return broker_factory()


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publisher]:
    """A publisher to C{broker}, closed after the test."""
    publisher = Publisher(broker.port)
    yield publisher
    publisher.close()


def test_subscribers_that_come_and_go_leave_nothing(
    broker: Broker, publisher: Publisher
) -> None:
    """
    After 500 cycles of four subscribers opened and closed (FIN, RST or a
    clean close), with a paused one dropped by a RST every 100 cycles, the
    broker counts no subscriber, holds the descriptors it held after a
    warm-up of 500 such cycles, and its RSS is within 4 MiB of what it was
    then.
    """
    for n in range(CYCLES):
        one_cycle(broker.port, publisher, n)
        if n % 100 == 0:
            stall_and_vanish(broker.port, publisher)
    settle(publisher, broker.pid, None)
    warm_rss = rss_kib(broker.pid)
    idle_fds = open_fds(broker.pid)

    for n in range(CYCLES, 2 * CYCLES):
        one_cycle(broker.port, publisher, n)
        if n % 100 == 0:
            stall_and_vanish(broker.port, publisher)
    server = settle(publisher, broker.pid, idle_fds)
    rss = rss_kib(broker.pid)
    topics = publisher.get("/api/topics")["topics"]
    print(
        f"\nbroker RSS after {CYCLES} warm-up cycles: {warm_rss / 1024:.1f} MiB, "
        f"after {CYCLES} more: {rss / 1024:.1f} MiB"
    )

    assert {t["topic"]: t["subscribers"] for t in topics} == {
        "leak.a": 0,
        "leak.b.c": 0,
        "leak.big": 0,
    }
    assert (server["connections"], server["paused"]) == (0, 0)
    assert open_fds(broker.pid) == idle_fds
    assert rss - warm_rss < RSS_GROWTH_BOUND_KIB
