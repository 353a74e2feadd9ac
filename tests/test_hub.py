"""
Unit tests of the topic hub: routing, fan-out, history, ids and replay, on
a fake clock with recording subscribers.
"""

from __future__ import annotations

import json

import pytest

from tinymq._errors import InvalidTopic, Unavailable
from tinymq._hub import Hub, Message
from tinymq._wire import envelope, sse_event

from .helpers import RecordingSubscriber, make_hub, parse_sse


def frame(message: Message) -> bytes:
    """The SSE bytes of one message on a single-topic stream."""
    return sse_event(message.payload, str(message.id))


def topics_seen(subscriber: RecordingSubscriber) -> list[str]:
    """The topics of the envelopes an SSE subscriber was written."""
    events, _ = parse_sse(subscriber.written)
    return [json.loads(event.data)["topic"] for event in events]


def assert_no_routes(hub: Hub) -> None:
    """Check that the hub keeps nothing for subscribers that left."""
    assert hub._groups == {}
    assert hub._exact == {}
    assert hub._wild == set()
    assert hub._wild_routes == {}
    assert hub.subscribers == set()
    assert hub.paused == {}


# Delivery


def test_delivery_waits_for_end_of_turn() -> None:
    """A publish is written when the reactor turn ends, not during publish."""
    clock, hub = make_hub()
    subscriber = RecordingSubscriber(hub)
    hub.attach(subscriber, ["a"])

    message = hub.publish("a", b"hello")
    before = list(subscriber.written)
    clock.advance(0)

    assert before == []
    assert subscriber.written == [frame(message)]
    assert clock.getDelayedCalls() == []


def test_each_subscriber_gets_message_once() -> None:
    """Every subscriber of a topic receives the message's bytes exactly once."""
    _, hub = make_hub()
    subscribers = [RecordingSubscriber(hub) for _ in range(3)]
    for subscriber in subscribers:
        hub.attach(subscriber, ["a"])

    message = hub.publish("a", b"hello")
    hub.flush()
    hub.flush()

    for subscriber in subscribers:
        assert subscriber.written == [frame(message)]
    assert hub.delivered == 3


def test_group_shares_one_bytes_object() -> None:
    """Subscribers of one group are written the very same bytes object."""
    _, hub = make_hub()
    first = RecordingSubscriber(hub)
    second = RecordingSubscriber(hub)
    hub.attach(first, ["a"])
    hub.attach(second, ["a"])

    hub.publish("a", b"payload")
    hub.flush()

    assert first.group is second.group
    assert len(first.written) == 1
    assert first.written[0] is second.written[0]


def test_message_encoded_once_per_format() -> None:
    """Groups of different patterns but one wire format share the encoding."""
    _, hub = make_hub()
    exact = RecordingSubscriber(hub)
    wide = RecordingSubscriber(hub)
    hub.attach(exact, ["a"])
    hub.attach(wide, ["a", "b"])

    hub.publish("a", b"payload")
    hub.flush()

    assert exact.group is not wide.group
    assert exact.written[0] is wide.written[0]


def test_publishes_in_one_turn_are_one_write() -> None:
    """Several publishes in one turn reach a transport as one write, in order."""
    _, hub = make_hub()
    subscriber = RecordingSubscriber(hub)
    hub.attach(subscriber, ["a", "b"])

    messages = [
        hub.publish("a", b"1"),
        hub.publish("b", b"2"),
        hub.publish("a", b"3"),
    ]
    hub.flush()

    assert subscriber.written == [b"".join(frame(m) for m in messages)]


def test_chunked_group_wraps_one_chunk() -> None:
    """A chunked subscriber gets the whole turn's bytes in one HTTP chunk."""
    _, hub = make_hub()
    subscriber = RecordingSubscriber(hub, chunked=True)
    hub.attach(subscriber, ["a"])

    first = hub.publish("a", b"1")
    second = hub.publish("a", b"2")
    hub.flush()

    data = frame(first) + frame(second)
    assert subscriber.written == [b"%x\r\n%s\r\n" % (len(data), data)]


def test_wildcard_and_exact_routing() -> None:
    """Exact and wildcard subscribers get exactly the topics they match."""
    _, hub = make_hub()
    exact = RecordingSubscriber(hub)
    one = RecordingSubscriber(hub, fmt="sse-envelope")
    many = RecordingSubscriber(hub, fmt="sse-envelope")
    hub.attach(exact, ["dashboard.metrics"])
    hub.attach(one, ["dashboard.*"])
    hub.attach(many, ["dashboard.>"])

    for topic in ["dashboard", "dashboard.metrics", "dashboard.cpu.core0", "x.y"]:
        hub.publish(topic, b'{"v": 1}')
        hub.flush()

    assert parse_sse(exact.written)[0][0].data == '{"v": 1}'
    assert len(exact.written) == 1
    assert topics_seen(one) == ["dashboard.metrics"]
    assert topics_seen(many) == ["dashboard.metrics", "dashboard.cpu.core0"]


def test_deep_nesting_in_one_turn_spares_the_other_messages() -> None:
    """
    A payload nested too deep for Python's JSON parser is carried as text,
    and the other messages of the same turn still reach every subscriber.
    """
    _, hub = make_hub()
    exact = RecordingSubscriber(hub)
    wild = RecordingSubscriber(hub, fmt="sse-envelope")
    hub.attach(exact, ["z.b"])
    hub.attach(wild, ["z.*"])
    deep = b"[" * 5000 + b"]" * 5000

    hub.publish("z.deep", deep)
    hub.publish("z.b", b"after")
    hub.flush()

    assert [event.data for event in parse_sse(exact.written)[0]] == ["after"]
    carried = [json.loads(event.data) for event in parse_sse(wild.written)[0]]
    assert [(c["topic"], c["data"]) for c in carried] == [
        ("z.deep", deep.decode()),
        ("z.b", "after"),
    ]


def test_envelope_format_carries_topic() -> None:
    """A wildcard subscriber's frame is the envelope, encoded as an event."""
    _, hub = make_hub()
    subscriber = RecordingSubscriber(hub, fmt="sse-envelope")
    hub.attach(subscriber, ["a.>"])

    message = hub.publish("a.b", b"plain text")
    hub.flush()

    body = envelope("a.b", str(message.id), b"plain text")
    assert subscriber.written == [sse_event(body, str(message.id))]


def test_overlapping_patterns_deliver_once() -> None:
    """A connection following `a.>` and `a.b` receives a.b's message once."""
    _, hub = make_hub()
    subscriber = RecordingSubscriber(hub)
    hub.attach(subscriber, ["a.>"])
    hub.attach(subscriber, ["a.b"])

    message = hub.publish("a.b", b"once")
    hub.flush()

    assert subscriber.patterns == frozenset({"a.>", "a.b"})
    assert subscriber.written == [frame(message)]
    assert hub.subscriber_count("a.b") == 1


def test_publish_validates_topic() -> None:
    """Publishing to a pattern or an invalid name is refused, nothing stored."""
    _, hub = make_hub()

    for name in ["a.*", "a.>", "", "a..b"]:
        with pytest.raises(InvalidTopic):
            hub.publish(name, b"x")

    assert hub.topics == {}
    assert hub.published == 0


def test_topic_limit() -> None:
    """Past max_topics a new topic is refused while old ones are in use."""
    _, hub = make_hub(max_topics=2)
    hub.publish("a", b"1")
    hub.publish("b", b"2")

    with pytest.raises(Unavailable) as raised:
        hub.publish("c", b"3")

    assert raised.value.status == 503
    assert sorted(hub.topics) == ["a", "b"]


def test_topic_limit_forgets_idle_topics() -> None:
    """At max_topics, topics with no history and no follower make room."""
    _, hub = make_hub(max_topics=2, history_size=0)
    follower = RecordingSubscriber(hub)
    hub.attach(follower, ["a"])
    old_a = hub.publish("a", b"1")
    hub.publish("b", b"2")

    hub.publish("c", b"3")
    gap, gap_reset = hub.replay(["b"], since=str(old_a.id))

    assert sorted(hub.topics) == ["a", "c"]
    assert (gap, gap_reset) == ([], True)


# Detaching


def test_detach_stops_delivery_and_leaks_nothing() -> None:
    """After every subscriber leaves, no group, route or record remains."""
    _, hub = make_hub()
    subscribers = []
    for patterns in (["a"], ["a"], ["a.>"], ["a", "b.*"], [">"]):
        subscriber = RecordingSubscriber(hub)
        hub.attach(subscriber, patterns)
        subscribers.append(subscriber)
    hub.publish("a.x", b"warm the wildcard route cache")
    hub.flush()

    for subscriber in subscribers:
        hub.detach(subscriber)
    hub.publish("a", b"late")
    hub.flush()

    assert_no_routes(hub)
    for subscriber in subscribers:
        assert b"late" not in b"".join(subscriber.written)
        assert subscriber.group is None
        assert subscriber.patterns == frozenset()


def test_detach_one_pattern_keeps_the_rest() -> None:
    """Leaving one pattern moves the subscriber; the other still delivers."""
    _, hub = make_hub()
    subscriber = RecordingSubscriber(hub)
    hub.attach(subscriber, ["a", "b.>"])

    hub.detach(subscriber, ["b.>"])
    hub.publish("b.c", b"gone")
    kept = hub.publish("a", b"kept")
    hub.flush()

    assert subscriber.patterns == frozenset({"a"})
    assert subscriber.written == [frame(kept)]
    assert hub._wild == set()
    assert list(hub._exact) == ["a"]
    assert len(hub._groups) == 1


def test_connection_cycles_leak_nothing() -> None:
    """Many attach, pause, publish and close cycles leave the hub empty."""
    _, hub = make_hub(slow_policy="latest")

    for index in range(200):
        subscriber = RecordingSubscriber(hub)
        hub.attach(subscriber, [f"t{index % 7}", "w.>"], last=1)
        if index % 3 == 0:
            subscriber.pauseProducing()
        hub.publish(f"t{index % 7}", b"x")
        hub.publish(f"w.{index % 5}", b"y")
        hub.flush()
        subscriber.stopProducing()

    assert_no_routes(hub)


# History


def test_history_bounded_by_count() -> None:
    """A topic keeps only its history_size newest messages."""
    _, hub = make_hub(history_size=3)

    messages = [hub.publish("a", b"%d" % i) for i in range(5)]

    assert list(hub.topics["a"].history) == messages[2:]
    assert hub.topics["a"].evicted_upto == messages[1].id
    assert hub.stats()["history_bytes"] == 3


def test_history_bounded_by_age() -> None:
    """The hub's tick drops messages older than history_ttl."""
    clock, hub = make_hub(history_ttl=10.0, heartbeat=0)
    hub.start()
    old = hub.publish("a", b"old")
    clock.advance(5)
    new = hub.publish("a", b"new")

    clock.advance(5)
    kept_at_ten = list(hub.topics["a"].history)
    clock.advance(1)

    assert kept_at_ten == [old, new]
    assert list(hub.topics["a"].history) == [new]
    assert hub.stats()["history_bytes"] == 3
    hub.stop()


def test_history_bounded_by_total_bytes() -> None:
    """Past history_bytes the oldest message across all topics goes first."""
    _, hub = make_hub(history_bytes=10)
    a1 = hub.publish("a", b"aaaa")
    b1 = hub.publish("b", b"bbbb")

    a2 = hub.publish("a", b"AAAA")
    after_third = {name: list(t.history) for name, t in hub.topics.items()}
    c1 = hub.publish("c", b"cccc")

    assert a1.id < b1.id < a2.id < c1.id
    assert after_third == {"a": [a2], "b": [b1]}
    assert list(hub.topics["a"].history) == [a2]
    assert list(hub.topics["b"].history) == []
    assert list(hub.topics["c"].history) == [c1]
    assert hub.stats()["history_bytes"] == 8


def test_history_off() -> None:
    """With history_size 0 nothing is kept, and the last message is known."""
    _, hub = make_hub(history_size=0)

    message = hub.publish("a", b"x")

    assert list(hub.topics["a"].history) == []
    assert hub.topics["a"].last is message
    assert hub.stats()["history_bytes"] == 0


def test_ids_increase_across_topics() -> None:
    """Ids form one strictly increasing sequence over all topics."""
    _, hub = make_hub()

    ids = [hub.publish(topic, b"x").id for topic in "abcabcba"]

    assert ids == list(range(hub.first_id + 1, hub.first_id + 9))
    assert hub.last_id == ids[-1]


def test_ids_differ_between_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids start at the start time in microseconds, so old ones are refused."""
    monkeypatch.setattr("tinymq._hub.time.time", lambda: 1000.0)
    _, first = make_hub()
    old = [first.publish("a", b"x") for _ in range(3)]
    monkeypatch.setattr("tinymq._hub.time.time", lambda: 1001.0)
    _, second = make_hub()
    second.publish("a", b"y")

    replayed, reset = second.replay(["a"], since=str(old[0].id))

    assert [m.id for m in old] == [1_000_000_001, 1_000_000_002, 1_000_000_003]
    assert second.first_id == 1_001_000_000
    assert replayed == []
    assert reset is True


# Replay


def _publish_mixed(hub: Hub) -> list[Message]:
    return [
        hub.publish("a.b", b"1"),
        hub.publish("x", b"2"),
        hub.publish("a.c.d", b"3"),
        hub.publish("a.b", b"4"),
        hub.publish("x", b"5"),
        hub.publish("a.e", b"6"),
    ]


def test_replay_since_gives_later_matching_messages() -> None:
    """since=<id> gives every later message of matching topics, in id order."""
    _, hub = make_hub()
    messages = _publish_mixed(hub)

    replayed, reset = hub.replay(["a.>"], since=str(messages[1].id))

    assert replayed == [messages[2], messages[3], messages[5]]
    assert reset is False


def test_replay_since_several_patterns() -> None:
    """Replay merges several patterns' topics in id order, without doubles."""
    _, hub = make_hub()
    messages = _publish_mixed(hub)

    replayed, reset = hub.replay(["a.b", "a.>", "x"], since=str(messages[0].id))

    assert replayed == messages[1:]
    assert reset is False


def test_replay_since_last_id_is_empty() -> None:
    """A client that saw the newest message gets nothing and no reset."""
    _, hub = make_hub()
    messages = _publish_mixed(hub)

    replayed, reset = hub.replay([">"], since=str(messages[-1].id))

    assert replayed == []
    assert reset is False


def test_replay_since_start_of_run() -> None:
    """since=first_id, before the first message, replays everything kept."""
    _, hub = make_hub()
    messages = _publish_mixed(hub)

    replayed, reset = hub.replay([">"], since=str(hub.first_id))

    assert replayed == messages
    assert reset is False


@pytest.mark.parametrize(
    "since",
    ["below", "above", "", "abc", "-1", "1.5", "0x10", "1" * 40],
)
def test_replay_unknown_id_resets(since: str) -> None:
    """An id from another run or no id at all tells the client to reset."""
    _, hub = make_hub()
    messages = _publish_mixed(hub)
    since = {
        "below": str(hub.first_id - 1),
        "above": str(hub.last_id + 1),
    }.get(since, since)

    replayed, reset = hub.replay(["a.b"], last=1, since=since)

    assert reset is True
    assert replayed == [messages[3]]


def test_replay_older_than_history_resets() -> None:
    """An id whose successors were evicted tells the client to reset."""
    _, hub = make_hub(history_size=2)
    messages = [hub.publish("a", b"%d" % i) for i in range(5)]

    gap, gap_reset = hub.replay(["a"], since=str(messages[1].id))
    whole, whole_reset = hub.replay(["a"], since=str(messages[2].id))

    assert (gap, gap_reset) == ([], True)
    assert (whole, whole_reset) == (messages[3:], False)


def test_replay_after_ttl_expiry_resets() -> None:
    """Messages expired by age count as a gap, even between ticks."""
    clock, hub = make_hub(history_ttl=10.0)
    first = hub.publish("a", b"1")
    hub.publish("a", b"2")
    clock.advance(11)

    replayed, reset = hub.replay(["a"], since=str(first.id - 1))

    assert replayed == []
    assert reset is True


def test_replay_last_per_topic() -> None:
    """last=N gives each matching topic's N newest messages, in id order."""
    _, hub = make_hub()
    messages = _publish_mixed(hub)

    replayed, reset = hub.replay(["a.>", "x"], last=1)
    two, _ = hub.replay(["a.>"], last=2)

    assert replayed == [messages[2], messages[3], messages[4], messages[5]]
    assert two == [messages[0], messages[2], messages[3], messages[5]]
    assert reset is False


def test_messages_since_and_limit() -> None:
    """messages() pages forward after since, or gives the newest without it."""
    _, hub = make_hub()
    messages = [hub.publish("a", b"%d" % i) for i in range(6)]

    forward = hub.messages("a", since=str(messages[1].id), limit=2)
    newest = hub.messages("a", limit=2)

    assert forward == messages[2:4]
    assert newest == messages[4:]
    assert hub.messages("unknown") == []


# Attaching


def test_attach_replays_then_goes_live() -> None:
    """last=N sends history first, then live messages, all exactly once."""
    _, hub = make_hub()
    old = [hub.publish("a", b"%d" % i) for i in range(3)]
    hub.flush()
    subscriber = RecordingSubscriber(hub)

    hub.attach(subscriber, ["a"], last=2)
    live = hub.publish("a", b"live")
    hub.flush()

    assert subscriber.written == [frame(old[1]) + frame(old[2]), frame(live)]


def test_attach_flushes_pending_publishes_first() -> None:
    """A message published in the same turn is replayed, never also live."""
    _, hub = make_hub()
    watcher = RecordingSubscriber(hub)
    hub.attach(watcher, ["a"])
    pending = hub.publish("a", b"pending")
    newcomer = RecordingSubscriber(hub)

    hub.attach(newcomer, ["a"], last=1)
    hub.flush()

    assert newcomer.written == [frame(pending)]
    assert watcher.written == [frame(pending)]


def test_attach_since_resumes_without_gap() -> None:
    """since=<id> replays exactly the missed messages, then live ones."""
    _, hub = make_hub()
    seen = hub.publish("a", b"seen")
    missed = [hub.publish("a", b"m1"), hub.publish("a", b"m2")]
    subscriber = RecordingSubscriber(hub)

    hub.attach(subscriber, ["a"], since=str(seen.id))
    live = hub.publish("a", b"live")
    hub.flush()

    events, _ = parse_sse(subscriber.written)
    assert [e.data for e in events] == ["m1", "m2", "live"]
    assert [e.last_event_id for e in events] == [str(m.id) for m in [*missed, live]]
    assert subscriber.count("reset") == 0


def test_attach_with_unknown_id_resets_first() -> None:
    """The reset notice comes before the last=N messages that replace resume."""
    _, hub = make_hub()
    message = hub.publish("a", b"x")
    subscriber = RecordingSubscriber(hub)

    hub.attach(subscriber, ["a"], last=1, since="12")

    assert subscriber.calls == [
        ("reset", hub.last_id),
        ("write", frame(message)),
    ]


def test_stop_shuts_every_subscriber_down() -> None:
    """Stopping the hub delivers what is pending, then ends each stream."""
    _, hub = make_hub()
    subscribers = [RecordingSubscriber(hub) for _ in range(2)]
    for subscriber in subscribers:
        hub.attach(subscriber, ["a"])
    message = hub.publish("a", b"last words")

    hub.stop()

    for subscriber in subscribers:
        assert subscriber.calls == [("write", frame(message)), ("shutdown", None)]
    assert hub.closing is True
    assert_no_routes(hub)
