"""
Clients for the end-to-end tests, run on the test's reactor.

L{HTTPStream} sends raw request bytes and reads the response back, taking
the chunked framing apart itself so that a test can see where a body ends;
an SSE stream's body goes through L{tests.sse_parser.SSEParser}.
L{WebSocketClient} is a minimal RFC 6455 client. L{publish} and L{request}
use treq.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from tests.sse_parser import Event, SSEParser

HOST = "127.0.0.1"
WAIT = 10.0
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


async def wait_until(
    check: Callable[[], object], what: str, timeout: float = WAIT
) -> None:
    """Spin the reactor until C{check()} is true; fail after C{timeout}."""
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not check():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"Timed out waiting for {what}")
        await deferLater(reactor, 0.01)  # type: ignore[arg-type]


async def sleep(seconds: float) -> None:
    """Let the reactor run for C{seconds}."""
    await deferLater(reactor, seconds)  # type: ignore[arg-type]


# HTTP with treq


@dataclass
class Reply:
    """An HTTP response read whole."""

    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> list[str]:
        """Return the values of one header."""
        raw = self.headers.getRawHeaders(name.encode("latin-1"), [])
        return [v.decode("latin-1") for v in raw]

    def json(self) -> Any:
        """Return the body parsed as JSON."""
        return json.loads(self.body)


async def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """Send one request with treq on a connection of its own."""
    raw_headers = {name: [value] for name, value in (headers or {}).items()}
    response = await treq.request(
        method, url, data=body, headers=raw_headers, persistent=False
    )
    content = await treq.content(response)
    return Reply(response.code, response.headers, content)


async def publish(
    base_url: str,
    topic: str,
    body: bytes | str,
    content_type: str = "application/json",
) -> Reply:
    """POST C{body} to C{topic}."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    return await request(
        "POST",
        f"{base_url}/api/topics/{topic}",
        body,
        {"Content-Type": content_type},
    )


# Raw HTTP


def http_request(
    method: str,
    path: str,
    port: int,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    """Return the bytes of an HTTP/1.1 request head, then C{body}."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_head(head: bytes) -> tuple[int, str, dict[str, list[str]]]:
    """Return the status, reason and headers (lower-case names) of a head."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = status_line.split(" ", 2)
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status), (reason or [""])[0], headers


class ChunkedDecoder:
    """
    Takes a chunked HTTP/1.1 body apart as its bytes arrive, in a buffer
    that is cut once per call, so that megabytes of small chunks stay cheap.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._size: int | None = None
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        """Return the body bytes completed by C{data}; note the last chunk."""
        buffer = self._buffer
        buffer += data
        body = []
        start = 0
        while not self.finished:
            if self._size is None:
                end = buffer.find(b"\r\n", start)
                if end < 0:
                    break
                self._size = int(bytes(buffer[start:end]).split(b";")[0], 16)
                start = end + 2
            if self._size == 0:
                # The last chunk: no trailers, then the closing CRLF.
                if len(buffer) - start < 2:
                    break
                if buffer[start : start + 2] != b"\r\n":
                    tail = bytes(buffer[start:])
                    raise ValueError(f"Trailer after last chunk: {tail!r}")
                start += 2
                self.finished = True
                break
            if len(buffer) - start < self._size + 2:
                break
            end = start + self._size
            if buffer[end : end + 2] != b"\r\n":
                tail = bytes(buffer[end : end + 10])
                raise ValueError(f"A chunk does not end in CRLF: {tail!r}")
            body.append(bytes(buffer[start:end]))
            start = end + 2
            self._size = None
        del buffer[:start]
        return b"".join(body)


class HTTPStream(Protocol):
    """
    Sends raw request bytes and reads one response as it arrives: status,
    headers, body (unchunked), and whether the body ended as its framing
    says it should. An event stream's body is parsed as SSE.
    """

    def __init__(self, request_bytes: bytes) -> None:
        self.request_bytes = request_bytes
        self.raw = b""
        self.status: int | None = None
        self.reason = ""
        self.headers: dict[str, list[str]] = {}
        self.body = b""
        self.complete = False
        self.closed = False
        self.events: list[Event] = []
        self.sse = SSEParser()
        self._head = b""
        self._chunked: ChunkedDecoder | None = None
        self._length: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request_bytes)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if self.status is None:
            self._head += data
            head, found, rest = self._head.partition(b"\r\n\r\n")
            if not found:
                return
            self.status, self.reason, self.headers = parse_head(head)
            coding = self.headers.get("transfer-encoding", [""])[0].lower()
            if coding == "chunked":
                self._chunked = ChunkedDecoder()
            elif "content-length" in self.headers:
                self._length = int(self.headers["content-length"][0])
            data = rest
        self._body(data)

    def _body(self, data: bytes) -> None:
        if self._chunked is not None:
            data = self._chunked.feed(data)
            self.complete = self._chunked.finished
        self.body += data
        if self._length is not None:
            self.complete = len(self.body) >= self._length
        if self.header("content-type") == "text/event-stream":
            self.events += self.sse.feed(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True

    def header(self, name: str) -> str | None:
        """Return the first value of a response header."""
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        """Return the body parsed as JSON."""
        return json.loads(self.body)

    def data(self) -> list[str]:
        """Return the data of the C{message} events received so far."""
        return [event.data for event in self.events if event.type == "message"]

    def write(self, data: bytes) -> None:
        """Send more bytes on the connection."""
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection."""
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()


async def connect(port: int, protocol: Protocol) -> Any:
    """Connect C{protocol} to the broker on C{port}."""
    endpoint = TCP4ClientEndpoint(reactor, HOST, port, timeout=WAIT)
    return await connectProtocol(endpoint, protocol)


async def read_until_closed(port: int, data: bytes = b"") -> HTTPStream:
    """Send C{data} and read the answer until the server closes."""
    stream = HTTPStream(data)
    await connect(port, stream)
    await wait_until(lambda: stream.closed, "the server to close")
    return stream


async def read_answer(
    port: int,
    data: bytes,
    connector: Callable[[int, Protocol], Awaitable[Any]] = connect,
) -> HTTPStream:
    """
    Send C{data} on a connection made by C{connector}, read the answer
    until its body is complete or the server closes, then drop it.
    """
    stream = HTTPStream(data)
    await connector(port, stream)
    await wait_until(lambda: stream.complete or stream.closed, "the whole answer")
    stream.abort()
    return stream


def assert_error(reply: Reply | HTTPStream, status: int, code: str) -> None:
    """Check a status and its JSON error body."""
    if isinstance(reply, Reply):
        content_type = reply.header("content-type")
    else:
        content_type = reply.headers.get("content-type", [])
    body = reply.json()

    assert (reply.status, content_type) == (status, ["application/json"])
    assert body == {"error": code, "message": body["message"]}
    assert isinstance(body["message"], str) and body["message"] != ""


async def open_sse(
    port: int, path: str, headers: dict[str, str] | None = None
) -> HTTPStream:
    """Open an SSE stream; return once its opening bytes arrived."""
    stream = HTTPStream(
        http_request(
            "GET", path, port, {"Accept": "text/event-stream", **(headers or {})}
        )
    )
    await connect(port, stream)
    await wait_until(lambda: stream.body or stream.closed, f"the first bytes of {path}")
    return stream


class SSEBody(Protocol):
    """Receives a response body from treq's agent and parses it as SSE."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.events: list[Event] = []
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.events += self.parser.feed(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = reason

    def stop(self) -> None:
        """Drop the connection that carries the body."""
        if self.transport is not None and self.ended is None:
            self.transport.stopProducing()


# WebSocket


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """Encode one masked frame, as a client sends it."""
    length = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    # One big-integer XOR masks a payload of megabytes quickly.
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")
    return head + mask + masked


@dataclass
class Frame:
    """One frame received from the server."""

    fin: bool
    opcode: int
    payload: bytes


class WebSocketClient(Protocol):
    """
    A minimal RFC 6455 client: the opening handshake, unmasked server
    frames with 7-, 16- and 64-bit lengths, pongs and the closing
    handshake.
    """

    def __init__(
        self,
        path: str,
        port: int,
        origin: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.port = port
        self.origin = origin
        self.extra_headers = headers or {}
        self.key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.status: int | None = None
        self.headers: dict[str, list[str]] = {}
        self.refusal = b""
        self.frames: list[Frame] = []
        self.messages: list[str] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = False
        self.protocol_errors: list[str] = []
        self._buffer = b""
        self._sent_close = False

    def connectionMade(self) -> None:
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": self.key,
            "Sec-WebSocket-Version": "13",
        }
        if self.origin is not None:
            headers["Origin"] = self.origin
        headers.update(self.extra_headers)
        assert self.transport is not None
        self.transport.write(http_request("GET", self.path, self.port, headers))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self.status is None:
            head, found, rest = self._buffer.partition(b"\r\n\r\n")
            if not found:
                return
            self.status, _, self.headers = parse_head(head)
            self._buffer = rest
            if self.status == 101:
                self._check_accept()
        if self.status != 101:
            self.refusal += self._buffer
            self._buffer = b""
            return
        while self._read_frame():
            pass

    def _check_accept(self) -> None:
        digest = hashlib.sha1(self.key.encode("ascii") + _WS_GUID).digest()
        expected = base64.b64encode(digest).decode("ascii")
        if self.headers.get("sec-websocket-accept") != [expected]:
            self.protocol_errors.append("bad Sec-WebSocket-Accept")

    def _read_frame(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        if buffer[1] & 0x80:
            self.protocol_errors.append("the server masked a frame")
        length = buffer[1] & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return False
            (length,) = struct.unpack("!H", buffer[2:4])
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return False
            (length,) = struct.unpack("!Q", buffer[2:10])
            offset = 10
        if len(buffer) < offset + length:
            return False
        frame = Frame(
            bool(buffer[0] & 0x80), buffer[0] & 0x0F, buffer[offset : offset + length]
        )
        self._buffer = buffer[offset + length :]
        self.frames.append(frame)
        self._handle(frame)
        return True

    def _handle(self, frame: Frame) -> None:
        if frame.opcode == OP_TEXT:
            if not frame.fin:
                self.protocol_errors.append("a message came in several frames")
            self.messages.append(frame.payload.decode("utf-8"))
        elif frame.opcode == OP_PING:
            self._send(OP_PONG, frame.payload)
        elif frame.opcode == OP_CLOSE:
            if len(frame.payload) >= 2:
                (self.close_code,) = struct.unpack("!H", frame.payload[:2])
                self.close_reason = frame.payload[2:].decode("utf-8")
            if not self._sent_close:
                self._send(OP_CLOSE, frame.payload[:2])
                self._sent_close = True
        elif frame.opcode not in (OP_PONG,):
            self.protocol_errors.append(f"unexpected opcode {frame.opcode}")

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(ws_frame(opcode, payload))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True

    def send_text(self, text: str) -> None:
        """Send one text frame."""
        self._send(OP_TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> None:
        """Send one binary frame."""
        self._send(OP_BINARY, data)

    def send_json(self, obj: object) -> None:
        """Send one JSON command as a text frame."""
        self.send_text(json.dumps(obj))

    def json_messages(self) -> list[Any]:
        """Return every text message received, parsed as JSON."""
        return [json.loads(message) for message in self.messages]

    def close(self, code: int = 1000) -> None:
        """Start the closing handshake."""
        if not self._sent_close:
            self._sent_close = True
            self._send(OP_CLOSE, struct.pack("!H", code))

    def abort(self) -> None:
        """Drop the connection."""
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()


async def open_ws(
    port: int,
    path: str,
    origin: str | None = None,
    headers: dict[str, str] | None = None,
) -> WebSocketClient:
    """
    Open a WebSocket, with extra handshake C{headers}; return once the
    server answered the handshake.
    """
    client = WebSocketClient(path, port, origin, headers)
    await connect(port, client)
    await wait_until(
        lambda: client.status is not None or client.closed,
        f"the handshake answer of {path}",
    )
    return client


async def drop(*connections: HTTPStream | WebSocketClient) -> None:
    """Drop connections and let the reactor close their sockets."""
    for connection in connections:
        connection.abort()
    await wait_until(
        lambda: all(c.closed for c in connections), "the connections to close"
    )


async def ws_command(client: WebSocketClient, command: dict[str, Any]) -> Any:
    """Send a C{/ws} command and return the next frame, parsed."""
    count = len(client.messages)
    client.send_json(command)
    await wait_until(lambda: len(client.messages) > count, f"a reply to {command}")
    return json.loads(client.messages[count])
