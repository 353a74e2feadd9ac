"""
Unit tests of the wire encodings: SSE events read back by a WHATWG parser,
the JSON envelope, HTTP chunks and WebSocket frames.

The one change SSE framing may make to a payload is to its line breaks:
CRLF, CR and LF all end a line in an event stream, and EventSource joins
the data lines with LF, so a browser sees every CRLF and every lone CR of
the payload as LF. Every other character arrives unchanged.
"""

from __future__ import annotations

import json
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymq._wire import (
    envelope,
    http_chunk,
    is_json,
    json_value,
    sse_comment,
    sse_event,
    ws_text_frame,
)

from .helpers import parse_sse


def normalise(text: str) -> str:
    """Turn every CRLF and lone CR into LF, as an SSE parser does."""
    return re.sub(r"\r\n|\r", "\n", text)


# Pieces that stress SSE framing, mixed with any other text.
_TRICKY = [
    "\r",
    "\n",
    "\r\n",
    "\n\r",
    "\r\r\n",
    " ",
    "  ",
    ":",
    ": ",
    "\x00",
    "\ufeff",
    "\u2028",
    "\x85",
    "\u00e9",
    "\U0001f600",
    "data:",
    "id: 666",
    "event: evil",
    "retry: 1",
    "\n\n",
    "\r\r",
]
_payloads = st.lists(
    st.one_of(
        st.sampled_from(_TRICKY),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
    ),
    max_size=12,
).map("".join)
_ids = st.integers(min_value=0, max_value=10**20).map(str)


def _split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    return [raw[a:b] for a, b in zip(points, points[1:], strict=False)]


@settings(max_examples=300)
@given(
    payload=_payloads,
    event_id=_ids,
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_sse_event_round_trip(payload: str, event_id: str, cuts: list[int]) -> None:
    """Any text payload parses back as one event with its id, whatever split."""
    raw = sse_event(payload.encode("utf-8"), event_id)

    split_events, split_parser = parse_sse(_split(raw, cuts))
    byte_events, _ = parse_sse([raw[i : i + 1] for i in range(len(raw))])

    for events in (split_events, byte_events):
        assert len(events) == 1
        assert events[0].type == "message"
        assert events[0].data == normalise(payload)
        assert events[0].last_event_id == event_id
    assert split_parser.retry is None


@settings(max_examples=300)
@given(payload=_payloads, first_id=_ids, second_id=_ids)
def test_sse_payload_cannot_inject(payload: str, first_id: str, second_id: str) -> None:
    """No payload sets a field or ends its event early in a live stream."""
    opening = sse_comment(b"ok") + b"retry: 2000\n\n"
    raw = (
        opening
        + sse_event(payload.encode("utf-8"), first_id)
        + sse_event(b"after", second_id)
    )

    events, parser = parse_sse([raw[i : i + 1] for i in range(len(raw))])

    assert [(e.type, e.data, e.last_event_id) for e in events] == [
        ("message", normalise(payload), first_id),
        ("message", "after", second_id),
    ]
    assert parser.retry == 2000
    assert parser.comments == ["ok"]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", b"data: \n\n"),
        (b"x", b"data: x\n\n"),
        (b" x", b"data:  x\n\n"),
        (b"a\r\nb\rc\nd", b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
        (b"a\n", b"data: a\ndata: \n\n"),
        (b"\r\r\n", b"data: \ndata: \ndata: \n\n"),
        (b"\n\nid: 6\n\n", b"data: \ndata: \ndata: id: 6\ndata: \ndata: \n\n"),
    ],
)
def test_sse_event_bytes(payload: bytes, expected: bytes) -> None:
    """Each payload line, whatever its break, becomes its own `data:` line."""

    raw = sse_event(payload)

    assert raw == expected


def test_sse_event_with_type_and_id() -> None:
    """The event type and id lines come before the data lines."""

    raw = sse_event(b'{"skipped": 3}', "17", "skipped")

    assert raw == b'event: skipped\nid: 17\ndata: {"skipped": 3}\n\n'


def test_sse_comment_cannot_break_lines() -> None:
    """A comment's text can neither end its line nor dispatch an event."""

    raw = sse_comment(b"a\r\nb\rc\nd") + sse_comment()

    events, parser = parse_sse([raw])
    assert raw == b":a b c d\n\n:\n\n"
    assert events == []
    assert parser.comments == ["a b c d", ""]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{"cpu_usage": 45, "ram_usage": 1024}', True),
        (b"[1, 2.5, null, true]", True),
        (b'"text"', True),
        (b" 7 \n", True),
        (b"1e400", False),
        (b"[-1e400]", False),
        (b"[" * 5000 + b"]" * 5000, False),
        ('{"a": "\u00e9"}', True),
        (b"NaN", False),
        (b"Infinity", False),
        (b"-Infinity", False),
        (b'{"a": NaN}', False),
        (b"[Infinity]", False),
        (b"", False),
        (b"{", False),
        (b"hello", False),
        (b"1 2", False),
        (b"'a'", False),
        (b'"\x01"', False),
        (b"\xef\xbb\xbf{}", False),
        (b"1\x00", False),
        (b"\x00\x00\x001", False),
        ("\ufeff{}", False),
    ],
)
def test_is_json(text: bytes | str, expected: bool) -> None:
    """
    Only what a browser's JSON.parse accepts and gives back unchanged is JSON:
    no NaN, no number that overflows to Infinity, no BOM, nothing nested
    deeper than Python can parse.
    """

    assert is_json(text) is expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"cpu_usage": 45}', {"cpu_usage": 45}),
        (b" [1, 2] \n", [1, 2]),
        (b"null", None),
        (b"hello", "hello"),
        (b"NaN", "NaN"),
        (b'{"a": Infinity}', '{"a": Infinity}'),
        (b'line "one"\r\nline\ttwo', 'line "one"\r\nline\ttwo'),
        ("caf\u00e9 \U0001f600".encode(), "caf\u00e9 \U0001f600"),
        (b"\xef\xbb\xbf{}", "\ufeff{}"),
        (b"1\x00", "1\x00"),
    ],
)
def test_envelope(payload: bytes, expected: object) -> None:
    """JSON payloads are embedded raw; any other text as a JSON string."""

    raw = envelope("dashboard.metrics", "42", payload)

    assert json.loads(raw) == {
        "type": "message",
        "topic": "dashboard.metrics",
        "id": "42",
        "data": expected,
    }


def test_envelope_embeds_json_raw() -> None:
    """A JSON payload's bytes appear in the envelope unchanged."""
    payload = b'{"b": 1, "a": [1.50, "x"]}'

    raw = envelope("t", "1", payload)

    assert raw == b'{"type":"message","topic":"t","id":"1","data":' + payload + b"}"


def _expected_data(payload: str) -> object:
    try:
        return json.loads(payload, parse_constant=_refuse)
    except ValueError:
        return payload


def _refuse(name: str) -> None:
    raise ValueError(name)


_json_texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
).map(json.dumps)
# JSON with a byte order mark or NUL around it, which JSON.parse refuses.
_near_json = st.tuples(
    st.sampled_from(["", "\ufeff", "\x00", " "]),
    _json_texts,
    st.sampled_from(["", "\x00", "\x00\x00", "\n"]),
).map("".join)


@settings(max_examples=300)
@given(payload=st.one_of(_payloads, _json_texts, _near_json))
def test_envelope_is_always_json(payload: str) -> None:
    """For any text payload the envelope parses, and its data is the payload."""

    raw = envelope("t", "1", payload.encode("utf-8"))

    assert json.loads(raw.decode("utf-8"))["data"] == _expected_data(payload)


@settings(max_examples=200)
@given(payload=st.one_of(_payloads, _json_texts))
def test_envelope_event_round_trip(payload: str) -> None:
    """An envelope sent as an SSE event parses back to the same JSON."""
    raw = sse_event(envelope("a.b", "9", payload.encode("utf-8")), "9")

    events, _ = parse_sse([raw[i : i + 1] for i in range(len(raw))])

    assert len(events) == 1
    assert json.loads(events[0].data)["data"] == _expected_data(payload)


def test_json_value_strips_only_json() -> None:
    """Whitespace around JSON goes; a text payload is kept whole."""

    assert json_value(b" {} \r\n") == b"{}"
    assert json_value(b" x ") == b'" x "'


@pytest.mark.parametrize("size", [0, 1, 15, 16, 255, 4096])
def test_http_chunk(size: int) -> None:
    """A chunk is the hex size, CRLF, the bytes, CRLF."""
    data = b"z" * size

    raw = http_chunk(data)

    assert raw == f"{size:x}".encode() + b"\r\n" + data + b"\r\n"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_ws_text_frame(size: int) -> None:
    """A server text frame is FIN+text, unmasked, with the shortest length."""
    payload = b"p" * size

    frame = ws_text_frame(payload)

    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    assert frame == header + payload
