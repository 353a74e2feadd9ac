"""
Unit tests of topic names and NATS-style subscribe patterns.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymq._errors import InvalidTopic
from tinymq._topics import (
    MAX_TOPIC_LENGTH,
    is_wildcard,
    matcher,
    validate_pattern,
    validate_topic,
)

VALID_TOPICS = [
    "a",
    "dashboard.metrics",
    "dashboard.cpu.core0",
    "A-Z_a-z.0-9",
    "_.-",
    "a" * 255,
    ".".join(["b"] * 128),
]

INVALID_TOPICS = [
    "",
    "a" * 256,
    ".a",
    "a.",
    "a..b",
    ".",
    "a b",
    "a/b",
    "a\nb",
    "a\n",
    "a:b",
    "a%2Eb",
    "caf\u00e9",
    "\uff41",
    "a\x00",
    "a*",
    "a>",
]


@pytest.mark.parametrize("name", VALID_TOPICS)
def test_valid_topic(name: str) -> None:
    """A name of 1-255 allowed characters in non-empty segments is a topic."""

    result = validate_topic(name)

    assert result == name


@pytest.mark.parametrize("name", INVALID_TOPICS)
def test_invalid_topic(name: str) -> None:
    """A name that is empty, too long, or holds other characters is refused."""

    with pytest.raises(InvalidTopic) as raised:
        validate_topic(name)

    assert raised.value.code == "topic-invalid"
    assert raised.value.status == 400
    assert raised.value.message


def test_topic_length_limit() -> None:
    """The limit is 255 characters; the error for 256 states both figures."""

    validate_topic("x" * MAX_TOPIC_LENGTH)
    with pytest.raises(InvalidTopic) as raised:
        validate_topic("x" * (MAX_TOPIC_LENGTH + 1))

    assert MAX_TOPIC_LENGTH == 255
    assert "256" in raised.value.message
    assert "255" in raised.value.message


@pytest.mark.parametrize("name", ["*", ">", "a.*", "a.>", "*.b", "a.*.c"])
def test_publish_to_wildcard_refused(name: str) -> None:
    """A wildcard is a valid pattern but never a topic to publish to."""

    validate_pattern(name)
    with pytest.raises(InvalidTopic) as raised:
        validate_topic(name)

    assert "Wildcards" in raised.value.message


@pytest.mark.parametrize(
    "pattern",
    ["a", "a.b", "*", ">", "a.*", "a.>", "*.b.>", "*.*", "a.*.c", "x" * 255],
)
def test_valid_pattern(pattern: str) -> None:
    """Topics and patterns with `*` anywhere and `>` last are accepted."""

    result = validate_pattern(pattern)

    assert result == pattern


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "x" * 256,
        ">.a",
        "a.>.b",
        "a.>.>",
        "a*",
        "*a",
        "a.b*",
        "a>",
        "a..*",
        "*.",
        ".>",
        "a.**",
        "a b.*",
    ],
)
def test_invalid_pattern(pattern: str) -> None:
    """`>` not last, wildcards inside a segment and empty segments fail."""

    with pytest.raises(InvalidTopic) as raised:
        validate_pattern(pattern)

    assert raised.value.code == "topic-invalid"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("a", False), ("a.b", False), ("*", True), (">", True), ("a.*.c", True)],
)
def test_is_wildcard(pattern: str, expected: bool) -> None:
    """Only a pattern with a `*` or `>` segment can match several topics."""

    assert is_wildcard(pattern) is expected


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("dashboard.>", "dashboard.metrics", True),
        ("dashboard.>", "dashboard.cpu.core0", True),
        ("dashboard.>", "dashboard", False),
        ("dashboard.>", "dashboards.metrics", False),
        ("dashboard.>", "other.dashboard.metrics", False),
        ("dashboard.*", "dashboard.metrics", True),
        ("dashboard.*", "dashboard.cpu.core0", False),
        ("dashboard.*", "dashboard", False),
        ("*", "a", True),
        ("*", "a.b", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.*.c", "a.b.x.c", False),
        ("*.b.>", "a.b.c", True),
        ("*.b.>", "a.b", False),
        ("a-b.>", "a-b.c", True),
        ("a-b.>", "aab.c", False),
        ("a_b", "a_b", True),
        ("a.b", "a.b.c", False),
        ("a.b", "a", False),
    ],
)
def test_matcher(pattern: str, topic: str, expected: bool) -> None:
    """`*` matches exactly one segment and `>` one or more at the end."""

    match = matcher(validate_pattern(pattern))

    assert match(topic) is expected


def _reference_match(pattern: str, topic: str) -> bool:
    """Match segment by segment, as the NATS documentation describes it."""
    wanted = pattern.split(".")
    got = topic.split(".")
    for index, segment in enumerate(wanted):
        if segment == ">":
            return len(got) > index
        if index >= len(got):
            return False
        if segment != "*" and segment != got[index]:
            return False
    return len(got) == len(wanted)


_segment = st.sampled_from(["a", "b", "ab", "a-b", "_"])
_topics = st.lists(_segment, min_size=1, max_size=5).map(".".join)
_patterns = st.tuples(
    st.lists(st.one_of(_segment, st.just("*")), min_size=1, max_size=4),
    st.booleans(),
).map(lambda parts: ".".join(parts[0] + ([">"] if parts[1] else [])))


@settings(max_examples=300)
@given(pattern=_patterns, topic=_topics)
def test_matcher_agrees_with_segment_rules(pattern: str, topic: str) -> None:
    """For any pattern and topic, the matcher follows the segment rules."""

    match = matcher(validate_pattern(pattern))

    assert match(validate_topic(topic)) is _reference_match(pattern, topic)
