"""
Blocking raw-socket clients for the end-to-end tests that run without the
reactor (flow control, resume and leaks): an SSE subscriber and a WebSocket
client on plain sockets, a kept-alive HTTP/1.1 publisher, and helpers that
read clients from a thread or watch the broker's memory.

A subscriber that must stop reading simply never calls C{recv} again, and a
small C{SO_RCVBUF} makes the broker's side fill fast.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Self

from tests.e2e import HOST, WAIT, ChunkedDecoder, parse_head, ws_frame

SMALL_RCVBUF = 4096
"""A receive buffer small enough that the broker's side fills fast."""


def linger_zero(sock: socket.socket) -> None:
    """Make C{close()} send a RST instead of a FIN, as a vanished peer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def open_socket(port: int, rcvbuf: int = 0) -> socket.socket:
    """Connect to the broker; a small C{rcvbuf} is set before connecting."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(WAIT)
    sock.connect((HOST, port))
    return sock


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read a response head; return status, headers and the bytes after it."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"The connection closed in the head: {raw!r}")
        raw += data
    head, _, rest = raw.partition(b"\r\n\r\n")
    status, _, headers = parse_head(head)
    return status, {name: values[-1] for name, values in headers.items()}, rest


@dataclass
class SSEEvent:
    """One dispatched event: its type, its own C{id} field (if any), data."""

    type: str
    id: str | None
    data: bytes

    def json(self) -> Any:
        """Return the data parsed as JSON."""
        return json.loads(self.data)


class EventSplitter:
    """
    Splits an event stream into events, fast enough for many megabytes a
    second. It reads the stream TinyMQ writes (LF line ends, C{data},
    C{id} and C{event} fields, comments); conformance to the whole WHATWG
    grammar is tested with L{tests.sse_parser} elsewhere.
    """

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Return the events completed by C{data}."""
        blocks = (self._rest + data).split(b"\n\n")
        self._rest = blocks.pop()
        events = []
        for block in blocks:
            kind, event_id, lines = "message", None, []
            for line in block.split(b"\n"):
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    lines.append(value)
                elif name == b"id":
                    event_id = value.decode("ascii")
                elif name == b"event":
                    kind = value.decode("ascii")
            if lines:
                events.append(SSEEvent(kind, event_id, b"\n".join(lines)))
        return events


class Ended(Exception):
    """The server closed the connection: C{how} is C{eof} or C{reset}."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class RawClient:
    """A blocking socket with a receive loop; subclasses parse the bytes."""

    sock: socket.socket
    ended: str | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def pump(self, size: int = 262144) -> None:
        """Read once (blocking) and parse; raise L{Ended} at EOF or reset."""
        if self.ended is not None:
            raise Ended(self.ended)
        try:
            data = self.sock.recv(size)
        except ConnectionResetError:
            self.ended = "reset"
            raise Ended("reset") from None
        if not data:
            self.ended = "eof"
            raise Ended("eof")
        self.received(data)

    def received(self, data: bytes) -> None:
        raise NotImplementedError

    def read_until(
        self, check: Callable[[], object], what: str, timeout: float = WAIT
    ) -> None:
        """Read until C{check()} is true; fail after C{timeout} or at the end."""
        deadline = time.monotonic() + timeout
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"Timed out waiting for {what}")
            self.sock.settimeout(left)
            try:
                self.pump()
            except TimeoutError:
                continue
            except Ended as end:
                if not check():
                    raise AssertionError(
                        f"Connection {end.how} before {what}"
                    ) from None

    def drain(self, timeout: float = WAIT) -> str:
        """
        Read everything until the server closes; return C{eof} or C{reset},
        or C{open} if the connection is still open after C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "open"
            self.sock.settimeout(left)
            try:
                self.pump()
            except TimeoutError:
                continue
            except Ended as end:
                return end.how

    def close(self) -> None:
        """Close with a FIN."""
        self.sock.close()

    def vanish(self) -> None:
        """Close with a RST, as a peer that is gone without a word."""
        linger_zero(self.sock)
        self.sock.close()


class SSEClient(RawClient):
    """
    An SSE subscriber on a raw socket; its events are kept in C{events},
    or, for the fast subscribers of the bulk tests, go to a L{StreamCheck}.
    """

    def __init__(
        self,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        rcvbuf: int = 0,
        check: StreamCheck | None = None,
    ) -> None:
        self.sock = open_socket(port, rcvbuf)
        lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}"]
        lines += ["Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.events: list[SSEEvent] = []
        self.check = check
        self.unchunker = ChunkedDecoder()
        self.splitter = EventSplitter()
        self._opened = False
        self.status, self.headers, rest = read_head(self.sock)
        if self.status == 200:
            assert self.headers["transfer-encoding"] == "chunked"
            assert self.headers["content-type"] == "text/event-stream"
            self.received(rest)
            self.read_until(lambda: self.opened, "the opening bytes")

    def received(self, data: bytes) -> None:
        if self.check is not None:
            self.check.feed(data)
            return
        body = self.unchunker.feed(data)
        if body:
            self._opened = True
            self.events += self.splitter.feed(body)

    @property
    def opened(self) -> bool:
        """Tell whether the opening bytes of the stream arrived."""
        return self.check.chunks > 0 if self.check is not None else self._opened

    def messages(self) -> list[SSEEvent]:
        """Return the C{message} events received."""
        return [e for e in self.events if e.type == "message"]


class StreamCheck:
    """
    Checks the stream of a fast subscriber of the bulk tests as it arrives,
    comparing each event in place with the payload it names: C{got} holds
    (id, n) per event, n being -1 unless the data is payload n intact.
    """

    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = payloads
        self.got: list[tuple[str | None, int]] = []
        self.chunks = 0
        self.finished = False
        self._raw = bytearray()
        self._body = bytearray()
        self._size: int | None = None

    def feed(self, data: bytes) -> None:
        """Unchunk C{data} and check the events it completes."""
        raw = self._raw
        raw += data
        start = 0
        with memoryview(raw) as view:
            while not self.finished:
                if self._size is None:
                    end = raw.find(b"\r\n", start)
                    if end < 0:
                        break
                    self._size = int(raw[start:end], 16)
                    self.finished = self._size == 0
                    start = end + 2
                elif len(raw) - start >= self._size + 2:
                    end = start + self._size
                    self._body += view[start:end]
                    start = end + 2
                    self._size = None
                    self.chunks += 1
                else:
                    break
        del raw[:start]
        self._events()

    def _events(self) -> None:
        body, payloads, got = self._body, self.payloads, self.got
        position = 0
        while True:
            # The usual event, "id: <id>\ndata: <payload n>\n\n", is
            # compared without a copy.
            line_end = body.find(b"\n", position, position + 64)
            data = line_end + 7
            digits = body[data + 6 : data + 12]
            if (
                body.startswith(b"id: ", position)
                and body.startswith(b'data: {"n":"', line_end + 1)
                and digits.isdigit()
                and int(digits) < len(payloads)
            ):
                n = int(digits)
                stop = data + len(payloads[n])
                if len(body) < stop + 2:
                    break
                if body.startswith(payloads[n], data) and body.startswith(
                    b"\n\n", stop
                ):
                    got.append((body[position + 4 : line_end].decode(), n))
                    position = stop + 2
                    continue
            # Anything else: the opening, a heartbeat, or a wrong event.
            end = body.find(b"\n\n", position)
            if end < 0:
                break
            fields = dict(
                line.partition(b": ")[::2]
                for line in bytes(body[position:end]).split(b"\n")
            )
            if b"data" in fields:
                event_id = fields.get(b"id")
                got.append((event_id.decode() if event_id else None, -1))
            position = end + 2
        del body[:position]


class WSClient(RawClient):
    """A WebSocket client on a raw socket: text frames in C{messages}."""

    def __init__(self, port: int, path: str, rcvbuf: int = 0) -> None:
        self.sock = open_socket(port, rcvbuf)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode("ascii"))
        self.messages: list[str] = []
        self.close_code: int | None = None
        self._buffer = bytearray()
        self.status, self.headers, rest = read_head(self.sock)
        if self.status == 101:
            digest = hashlib.sha1(
                key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            ).digest()
            assert self.headers["sec-websocket-accept"] == (
                base64.b64encode(digest).decode()
            )
        self.received(rest)

    def received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= 2:
            opcode, length = buffer[start] & 0x0F, buffer[start + 1] & 0x7F
            offset = start + 2
            if length == 126:
                if len(buffer) - start < 4:
                    break
                (length,) = struct.unpack("!H", buffer[offset : offset + 2])
                offset += 2
            elif length == 127:
                if len(buffer) - start < 10:
                    break
                (length,) = struct.unpack("!Q", buffer[offset : offset + 8])
                offset += 8
            if len(buffer) - offset < length:
                break
            assert buffer[start] & 0x80, "a fragmented message"
            self._frame(opcode, bytes(buffer[offset : offset + length]))
            start = offset + length
        del buffer[:start]

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            self.messages.append(payload.decode("utf-8"))
        elif opcode == 0x8:
            if self.close_code is None and len(payload) >= 2:
                (self.close_code,) = struct.unpack("!H", payload[:2])
                self.send(0x8, payload[:2])
        elif opcode == 0x9:
            self.send(0xA, payload)

    def send(self, opcode: int, payload: bytes) -> None:
        """Send one frame, unless the connection is gone."""
        try:
            self.sock.sendall(ws_frame(opcode, payload))
        except OSError:
            pass

    def send_json(self, command: dict[str, Any]) -> None:
        """Send one C{/ws} command."""
        self.send(0x1, json.dumps(command).encode("utf-8"))

    def json_messages(self) -> list[Any]:
        """Return every text message received, parsed."""
        return [json.loads(m) for m in self.messages]

    def close_cleanly(self) -> None:
        """Start the closing handshake, wait for the server's end, close."""
        self.send(0x8, struct.pack("!H", 1000))
        self.drain()
        self.sock.close()


class Publisher:
    """Sequential requests on one kept-alive HTTP/1.1 connection."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection(HOST, port, timeout=WAIT)
        self.connection.connect()
        assert self.connection.sock is not None
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, Any]:
        """Send one request; return its status and its JSON body."""
        self.connection.request(method, path, body, headers)
        response = self.connection.getresponse()
        return response.status, json.loads(response.read())

    def post(
        self, topic: str, body: bytes, content_type: str = "application/json"
    ) -> str:
        """Publish C{body} to C{topic}; return the message id."""
        status, reply = self.request(
            "POST", f"/api/topics/{topic}", body, **{"Content-Type": content_type}
        )
        assert status == 200, reply
        return str(reply["id"])

    def get(self, path: str) -> Any:
        """GET C{path}; return its JSON body, which must come with a 200."""
        status, reply = self.request("GET", path)
        assert status == 200, reply
        return reply

    def subscribers(self, topic: str) -> int:
        """Return the subscriber count of C{topic} in C{GET /api/topics}."""
        topics = self.get("/api/topics")["topics"]
        return sum(t["subscribers"] for t in topics if t["topic"] == topic)

    def server(self) -> dict[str, int]:
        """Return the C{server} object of C{GET /api/topics}."""
        return dict(self.get("/api/topics")["server"])

    def wait_for(
        self, check: Callable[[], object], what: str, timeout: float = WAIT
    ) -> None:
        """Poll the server until C{check()} is true."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"Timed out waiting for {what}")
            time.sleep(0.05)

    def close(self) -> None:
        self.connection.close()


def rss_kib(pid: int) -> int:
    """Return the resident set size of process C{pid}, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"No VmRSS for process {pid}")


class Background:
    """
    Runs C{_run} in a daemon thread for as long as a C{with} block lasts;
    C{_run} returns once C{_stop} is set, then C{_finish} runs.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Clean up once the thread has ended."""

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._finish()


class PeakRSS(Background):
    """Samples a process's RSS from a thread and keeps the peak."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        super().__init__()
        self.pid = pid
        self.every = every
        self.peak = rss_kib(pid)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_kib(self.pid))

    def _finish(self) -> None:
        self.peak = max(self.peak, rss_kib(self.pid))


class ReaderThread(Background):
    """Reads a set of raw clients as fast as their data comes, in a thread."""

    def __init__(self, clients: list[Closable]) -> None:
        super().__init__()
        self.selector = selectors.DefaultSelector()
        for client in clients:
            client.sock.setblocking(True)
            self.selector.register(client, selectors.EVENT_READ)
        self.ended: list[tuple[RawClient, str]] = []
        self.errors: list[BaseException] = []

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for key, _ in self.selector.select(0.05):
                    client = key.fileobj
                    assert isinstance(client, RawClient)
                    try:
                        client.pump()
                    except Ended as end:
                        self.selector.unregister(client)
                        self.ended.append((client, end.how))
        except BaseException as error:
            self.errors.append(error)

    def wait_for(self, check: Callable[[], object], timeout: float = WAIT) -> None:
        """Wait until C{check()} is true, the clients read by the thread."""
        deadline = time.monotonic() + timeout
        while not check() and time.monotonic() < deadline and not self.ended:
            time.sleep(0.005)

    def _finish(self) -> None:
        self.selector.close()
        assert self.errors == []


class Closable(Protocol):
    """A client: a L{RawClient} or a L{Publisher}."""

    def close(self) -> None: ...
