"""
The known gaps of docs/limitations.md that a test can observe. Each test
states the behaviour users would want and is a strict xfail today: when a
gap is closed its test passes, the xfail fails the suite, and the entry and
its LIMITATION mark in the code are to be removed.
"""

from __future__ import annotations

import pytest

from .helpers import RecordingSubscriber, make_hub, parse_sse


@pytest.mark.xfail(strict=True, reason="L-003: max_rate breaks id order")
def test_rate_limited_stream_stays_in_id_order() -> None:
    """A rate-limited stream of two topics delivers messages in id order."""
    clock, hub = make_hub()
    subscriber = RecordingSubscriber(hub, max_rate=1)
    hub.attach(subscriber, ["a", "b"])

    hub.publish("a", b"a1")
    hub.flush()
    clock.advance(0.1)
    held = hub.publish("a", b"a2")
    hub.flush()
    clock.advance(0.1)
    later = hub.publish("b", b"b1")
    hub.flush()
    clock.advance(1.0)

    ids = [int(e.last_event_id) for e in parse_sse(subscriber.written)[0]]
    assert held.id < later.id
    assert ids == sorted(ids)
