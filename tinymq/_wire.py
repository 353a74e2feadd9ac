"""
Wire encodings of a message: SSE events and WebSocket frames.

Each function here runs once per message and wire format, never once per
subscriber: the hub caches what it returns on the message.
"""

from __future__ import annotations

import json
import math
import re

from autobahn.websocket.protocol import PreparedMessage

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large for a JSON number")
    return value


# What a browser's JSON.parse accepts and gives back unchanged: no NaN or
# Infinity, and no number so large it becomes Infinity.
BROWSER_JSON = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_float=_finite_float
)


def is_json(text: str | bytes) -> bool:
    """
    Tell whether C{text} is one JSON value that a browser's C{JSON.parse}
    accepts (so C{NaN} and C{Infinity} are refused).
    """
    if isinstance(text, bytes):
        # json.loads would guess UTF-16 or skip a byte order mark.
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return False
    try:
        BROWSER_JSON.decode(text)
    except (ValueError, RecursionError):
        # Nested too deep for Python is text to TinyMQ, not JSON.
        return False
    return True


def sse_event(
    data: bytes, event_id: str | None = None, event: str | None = None
) -> bytes:
    """
    Encode one SSE event.

    Every line of C{data}, whatever its line break (CRLF, CR or LF), becomes
    its own C{data:} field, so no byte of the payload can end a field or start
    another one. C{event_id} and C{event} are ours and never hold line breaks.
    """
    head = b""
    if event is not None:
        head += b"event: " + event.encode("ascii") + b"\n"
    if event_id is not None:
        head += b"id: " + event_id.encode("ascii") + b"\n"
    if b"\n" not in data and b"\r" not in data:
        return head + b"data: " + data + b"\n\n"
    lines = _LINE_BREAK.split(data)
    return head + b"".join([b"data: " + line + b"\n" for line in lines]) + b"\n"


def sse_comment(text: bytes = b"") -> bytes:
    """Encode an SSE comment line, which a browser ignores."""
    return b":" + _LINE_BREAK.sub(b" ", text) + b"\n\n"


def http_chunk(data: bytes) -> bytes:
    """Wrap C{data} as one chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def ws_text_frame(payload: bytes) -> bytes:
    """Encode one unmasked WebSocket text frame, as a server sends it."""
    prepared = PreparedMessage(
        payload, isBinary=False, applyMask=False, doNotCompress=True
    )
    frame: bytes = prepared.payloadHybi
    return frame


def json_value(payload: bytes) -> bytes:
    """
    Return C{payload} as a JSON value: itself when it is JSON, otherwise as
    a JSON string.
    """
    if is_json(payload):
        return payload.strip()
    return json.dumps(payload.decode("utf-8")).encode("utf-8")


def envelope(topic: str, message_id: str, payload: bytes) -> bytes:
    """
    Encode the JSON object that carries a message on streams of several
    topics and on the C{/ws} protocol.
    """
    return b'{"type":"message","topic":"%s","id":"%s","data":%s}' % (
        topic.encode("ascii"),
        message_id.encode("ascii"),
        json_value(payload),
    )
