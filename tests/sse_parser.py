"""
A Server-Sent Events parser that follows the WHATWG HTML specification's
"event stream interpretation", as a browser's EventSource does. The tests
read TinyMQ's streams back through it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Event:
    """One dispatched event, as EventSource hands it to a page."""

    type: str
    data: str
    last_event_id: str


class SSEParser:
    """
    Feed bytes in any split; get back the events a browser would dispatch.

    Lines end in CRLF, LF or CR, also when CR and LF arrive in different
    feeds. A leading byte order mark is skipped.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._pending_cr = False
        self._started = False
        self._decoder_buffer = b""
        self._data: list[str] = []
        self._type = ""
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse C{chunk}; return the events it completes."""
        raw = self._decoder_buffer + chunk
        try:
            text = raw.decode("utf-8")
            self._decoder_buffer = b""
        except UnicodeDecodeError as error:
            if error.reason != "unexpected end of data":
                raise
            text = raw[: error.start].decode("utf-8")
            self._decoder_buffer = raw[error.start :]
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        events: list[Event] = []
        for char in text:
            if self._pending_cr:
                self._pending_cr = False
                if char == "\n":
                    continue
            if char == "\r":
                self._pending_cr = True
                self._line(self._buffer, events)
                self._buffer = ""
            elif char == "\n":
                self._line(self._buffer, events)
                self._buffer = ""
            else:
                self._buffer += char
        return events

    def _line(self, line: str, events: list[Event]) -> None:
        if line == "":
            self._dispatch(events)
            return
        if line.startswith(":"):
            self.comments.append(line[1:])
            return
        if ":" in line:
            name, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)

    def _dispatch(self, events: list[Event]) -> None:
        data, self._data = self._data, []
        event_type, self._type = self._type, ""
        if not data:
            return
        events.append(
            Event(event_type or "message", "\n".join(data), self.last_event_id)
        )
