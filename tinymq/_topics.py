"""
Topic names and NATS-style subscribe patterns.

A topic is 1-255 characters of ``A-Z a-z 0-9 _ - .``; dots separate
segments, and no segment is empty. A pattern may also use ``*`` for exactly
one segment and, as its last segment only, ``>`` for one or more segments.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ._errors import InvalidTopic

MAX_TOPIC_LENGTH = 255

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+\Z")


def _segments(name: str, what: str) -> list[str]:
    if not isinstance(name, str):
        raise InvalidTopic(f"The {what} must be a string.")
    if not name:
        raise InvalidTopic(f"The {what} is empty.")
    if len(name) > MAX_TOPIC_LENGTH:
        raise InvalidTopic(
            f"The {what} is {len(name)} characters long; "
            f"at most {MAX_TOPIC_LENGTH} are allowed."
        )
    return name.split(".")


def validate_topic(name: str) -> str:
    """
    Return C{name} if it is a valid topic, or raise L{InvalidTopic}.

    Wildcards are refused here: a message is published to one topic.
    """
    for segment in _segments(name, "topic"):
        if segment in ("*", ">"):
            raise InvalidTopic("Wildcards are for subscribing; publish to one topic.")
        if not _SEGMENT.match(segment):
            raise InvalidTopic(
                "A topic is made of segments of A-Z, a-z, 0-9, '_' and '-' "
                "separated by single dots."
            )
    return name


def validate_pattern(pattern: str) -> str:
    """Return C{pattern} if it is a valid subscribe pattern, or raise."""
    segments = _segments(pattern, "topic pattern")
    for index, segment in enumerate(segments):
        if segment == ">":
            if index != len(segments) - 1:
                raise InvalidTopic("'>' may only be the last segment.")
        elif segment != "*" and not _SEGMENT.match(segment):
            raise InvalidTopic(
                "A pattern is made of segments of A-Z, a-z, 0-9, '_' and "
                "'-', or the wildcards '*' and '>', separated by single dots."
            )
    return pattern


def is_wildcard(pattern: str) -> bool:
    """Tell whether C{pattern} can match more than one topic."""
    return any(segment in ("*", ">") for segment in pattern.split("."))


def matcher(pattern: str) -> Callable[[str], bool]:
    """
    Return a function that tells whether a topic matches C{pattern}.

    C{pattern} must have been validated.
    """
    if not is_wildcard(pattern):
        return pattern.__eq__

    parts = []
    for segment in pattern.split("."):
        if segment == "*":
            parts.append(r"[^.]+")
        elif segment == ">":
            parts.append(r".+")
        else:
            parts.append(re.escape(segment))
    compiled = re.compile(r"\.".join(parts) + r"\Z")
    return lambda topic: compiled.match(topic) is not None
