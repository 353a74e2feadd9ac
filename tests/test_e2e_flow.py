"""
End-to-end tests of flow control: slow subscribers that stop reading, the
slow-consumer policies C{disconnect} and C{latest}, and C{max_rate}, against
a real C{twistd -n tinymq} on 127.0.0.1.

The subscribers here are plain blocking sockets, read from a thread or not
at all: a subscriber that must stop reading simply never calls C{recv}
again, and a small C{SO_RCVBUF} makes the broker's side fill fast: the
clients are those of L{tests.rawclient}.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.conftest import Broker
from tests.e2e import WAIT
from tests.rawclient import (
    SMALL_RCVBUF,
    Closable,
    PeakRSS,
    Publisher,
    ReaderThread,
    SSEClient,
    StreamCheck,
    WSClient,
)

pytestmark = pytest.mark.e2e


# Flow control


MESSAGES = 2000
PAD = 10_000
WINDOW = 16
RSS_BOUND_MIB = 300


def payload(n: int) -> bytes:
    """Message C{n} of the bulk tests: 10 kB of JSON that says its number."""
    return b'{"n":"%06d","pad":"%s"}' % (n, b"x" * PAD)


def envelope_numbers(client: SSEClient) -> list[tuple[str | None, str, str, int]]:
    """
    Return (SSE id, topic, id, n) of each envelope C{client} received, n
    being -1 for a message that is not a bulk payload.
    """
    found = []
    for event in client.messages():
        envelope = event.json()
        n = int(envelope["data"].get("n", -1))
        found.append((event.id, envelope["topic"], envelope["id"], n))
    return found


def log_errors(broker: Broker) -> list[str]:
    """Return the lines of the broker's log that start a traceback."""
    return [line for line in broker.log().splitlines() if "Traceback" in line]


@dataclass
class BulkRun:
    """What L{bulk_run} saw."""

    ids: list[str]
    checks: list[StreamCheck]
    stalled: list[SSEClient]
    peak_mib: float


def bulk_run(
    broker: Broker, topic: str, clients: list[Closable], stalled_path: str
) -> BulkRun:
    """
    Open 200 fast SSE subscribers of C{topic} and 20 on C{stalled_path}
    that never read, publish 2,000 messages of 10 kB with sequential POSTs,
    and wait until every fast subscriber has them all.

    The publisher never runs more than L{WINDOW} messages ahead of the
    slowest fast subscriber: the fast ones are clients that keep up, read by
    one thread of this process, and must not look slow to the broker.
    """
    payloads = [payload(n) for n in range(MESSAGES)]
    checks = [StreamCheck(payloads) for _ in range(200)]
    path = f"/api/topics/{topic}/sse"
    fast = [SSEClient(broker.port, path, check=check) for check in checks]
    clients += fast
    stalled = [
        SSEClient(broker.port, stalled_path, rcvbuf=SMALL_RCVBUF) for _ in range(20)
    ]
    clients += stalled
    publisher = Publisher(broker.port)
    publisher.wait_for(
        lambda: publisher.server()["connections"] == 220, "220 subscribers"
    )

    def wait_for_fast(count: int) -> None:
        deadline = time.monotonic() + WAIT
        while min(len(check.got) for check in checks) < count:
            if reader.ended or time.monotonic() > deadline:
                slowest = min(len(check.got) for check in checks)
                raise AssertionError(
                    f"A fast subscriber is stuck at {slowest} messages of "
                    f"{len(ids)} published; {len(reader.ended)} were closed."
                )
            time.sleep(0.0005)

    ids: list[str] = []
    with PeakRSS(broker.pid) as rss, ReaderThread(list(fast)) as reader:
        for n, body in enumerate(payloads):
            wait_for_fast(n - WINDOW)
            ids.append(publisher.post(topic, body))
        wait_for_fast(MESSAGES)
    publisher.close()
    return BulkRun(ids, checks, stalled, rss.peak / 1024)


def test_subscribers_that_stop_reading_are_disconnected(
    broker_factory: Callable[..., Broker], clients: list[Closable]
) -> None:
    """
    Under policy C{disconnect}, 20 subscribers that stop reading are closed
    and counted while 200 others get all of 20 MB once and in order, and
    the broker's RSS stays under 300 MiB.
    """
    broker = broker_factory("--backlog-bytes", "262144", "--stall-timeout", "5")
    topic = "flow.cut"

    run = bulk_run(broker, topic, clients, f"/api/sse?topic={topic}")
    publisher = Publisher(broker.port)
    clients.append(publisher)
    publisher.wait_for(lambda: publisher.subscribers(topic) == 200, "200 subscribers")
    server = publisher.server()
    deadline = time.monotonic() + WAIT
    ends = [c.drain(timeout=deadline - time.monotonic()) for c in run.stalled]
    print(
        f"\nbroker peak RSS while publishing 20 MB to 200 + 20 subscribers: "
        f"{run.peak_mib:.1f} MiB (bound {RSS_BOUND_MIB} MiB); "
        f"the stalled connections ended by {sorted(set(ends))}"
    )

    expected = [(message_id, n) for n, message_id in enumerate(run.ids)]
    assert [int(i) for i in run.ids] == sorted(int(i) for i in run.ids)
    for check in run.checks:
        assert check.got == expected
    assert run.peak_mib < RSS_BOUND_MIB
    assert set(ends) <= {"eof", "reset"}
    for client in run.stalled:
        got = envelope_numbers(client)
        assert [e.type for e in client.events] == ["message"] * len(got)
        assert got == [(i, topic, i, n) for i, n in expected[: len(got)]]
    assert (server["connections"], server["paused"], server["dropped"]) == (
        200,
        0,
        20,
    )
    assert log_errors(broker) == []


def test_subscribers_that_stop_reading_keep_the_latest_values(
    broker_factory: Callable[..., Broker], clients: list[Closable]
) -> None:
    """
    Under policy C{latest}, 20 subscribers that stop reading stay connected
    and, when they read again, get what they had, a C{skipped} event and the
    newest message of each topic, while 200 others get everything.
    """
    broker = broker_factory("--backlog-bytes", "262144")
    topic, side = "flow.keep", "flow.keep-side"
    stalled_path = f"/api/sse?topic={topic}&topic={side}&policy=latest"

    run = bulk_run(broker, topic, clients, stalled_path)
    publisher = Publisher(broker.port)
    clients.append(publisher)
    side_ids = [publisher.post(side, b'{"side":%d}' % n) for n in range(3)]
    paused = publisher.server()
    for client in run.stalled:
        client.read_until(
            lambda c=client: any(e.id == side_ids[-1] for e in c.events),
            "the newest side message",
        )
    server = publisher.server()
    print(f"\nbroker peak RSS while publishing 20 MB: {run.peak_mib:.1f} MiB")

    expected = [(message_id, n) for n, message_id in enumerate(run.ids)]
    for check in run.checks:
        assert check.got == expected
    assert run.peak_mib < RSS_BOUND_MIB
    skipped = []
    for client in run.stalled:
        kinds = [e.type for e in client.events]
        before = kinds.index("skipped")
        prefix = envelope_numbers(client)[:before]
        skipped.append(client.events[before].json()["skipped"])
        tail = [(e.type, e.id, e.json()["topic"]) for e in client.events[before + 1 :]]
        assert prefix == [(i, topic, i, n) for i, n in expected[:before]]
        assert before > 0
        assert skipped[-1] == MESSAGES - before - 1 + len(side_ids) - 1
        assert tail == [
            ("message", run.ids[-1], topic),
            ("message", side_ids[-1], side),
        ]
        assert client.events[-1].json()["data"] == {"side": 2}
    assert (paused["connections"], paused["paused"]) == (220, 20)
    assert (server["connections"], server["paused"], server["dropped"]) == (
        220,
        0,
        0,
    )
    assert server["skipped"] == sum(skipped)
    assert log_errors(broker) == []


def test_max_rate_coalesces_to_the_newest_value(
    broker: Broker, clients: list[Closable]
) -> None:
    """
    A subscriber with C{max_rate=2} on a topic published 50 times a second
    for 3 s gets 5 to 8 messages, each the newest of its time, ending on the
    last one published; the rest are counted as skipped.
    """
    topic = "flow.rate"
    subscriber = SSEClient(broker.port, f"/api/topics/{topic}/sse?max_rate=2")
    clients.append(subscriber)
    publisher = Publisher(broker.port)
    clients.append(publisher)
    skipped_before = publisher.server()["skipped"]
    arrivals: list[float] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            subscriber.sock.settimeout(0.05)
            try:
                subscriber.pump()
            except TimeoutError:
                continue
            arrivals.extend(
                [time.monotonic()] * (len(subscriber.events) - len(arrivals))
            )

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ids, acknowledged = [], []
    start = time.monotonic()
    for n in range(150):
        time.sleep(max(0.0, start + n / 50 - time.monotonic()))
        ids.append(publisher.post(topic, b'{"n":%d}' % n))
        acknowledged.append(time.monotonic())
    deadline = time.monotonic() + WAIT
    while not (subscriber.events and subscriber.events[-1].id == ids[-1]):
        assert time.monotonic() < deadline, "the last message never came"
        time.sleep(0.01)
    time.sleep(0.6)
    stop.set()
    reader.join()
    skipped = publisher.server()["skipped"] - skipped_before

    got = [(e.type, e.id, e.json()) for e in subscriber.events]
    positions = [ids.index(event_id) for _, event_id, _ in got]
    print(f"\nmax_rate=2 over {time.monotonic() - start:.1f} s: got {positions}")
    assert 5 <= len(got) <= 8
    assert got == [("message", ids[p], {"n": p}) for p in positions]
    assert positions == sorted(set(positions))
    assert (positions[0], positions[-1]) == (0, 149)
    for previous_arrival, position in zip(arrivals, positions[1:], strict=False):
        newest_then = sum(1 for t in acknowledged if t <= previous_arrival) - 1
        assert position >= newest_then
    assert skipped == 150 - len(got)


def test_websocket_that_stops_reading_is_closed(
    broker_factory: Callable[..., Broker], clients: list[Closable]
) -> None:
    """
    Under policy C{disconnect}, a WebSocket that stops reading is closed
    (code 1013, or dropped) and counted, while one that reads gets all.
    """
    broker = broker_factory("--backlog-bytes", "262144", "--stall-timeout", "5")
    topic = "flow.ws"
    stalled = WSClient(broker.port, f"/api/topics/{topic}/ws", rcvbuf=SMALL_RCVBUF)
    fast = WSClient(broker.port, f"/api/topics/{topic}/ws")
    clients += [stalled, fast]
    publisher = Publisher(broker.port)
    clients.append(publisher)
    publisher.wait_for(lambda: publisher.server()["connections"] == 2, "2 sockets")
    # The kernel takes a few MB for a peer that reads nothing before the
    # broker sees a full buffer: 10 MB goes well past it.
    payloads = [payload(n) for n in range(1000)]

    with ReaderThread([fast]) as reader:
        for n, body in enumerate(payloads):
            deadline = time.monotonic() + WAIT
            while len(fast.messages) < n - WINDOW:
                assert not reader.ended and time.monotonic() < deadline
                time.sleep(0.0005)
            publisher.post(topic, body)
        reader.wait_for(lambda: len(fast.messages) >= len(payloads))
    publisher.wait_for(lambda: publisher.subscribers(topic) == 1, "1 subscriber")
    server = publisher.server()
    end = stalled.drain(timeout=10)
    print(f"\nthe stalled WebSocket got close code {stalled.close_code}, then {end}")

    expected = [body.decode() for body in payloads]
    assert [int(m[6:12]) for m in fast.messages] == list(range(len(payloads)))
    assert fast.messages == expected
    assert fast.close_code is None
    assert stalled.messages == expected[: len(stalled.messages)]
    assert stalled.close_code in (1013, None)
    assert end in ("eof", "reset")
    assert (server["connections"], server["paused"], server["dropped"]) == (1, 0, 1)
    assert log_errors(broker) == []
