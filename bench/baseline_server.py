"""
The floor to compare TinyMQ with: a broadcast server in pure Twisted.

It speaks just enough HTTP/1.1 for the benchmark and nothing else: a GET
of C{/api/topics/<t>/sse} opens a chunked event stream, a GET of
C{/api/topics/<t>/ws} with C{Upgrade: websocket} opens a WebSocket, and a
POST to C{/api/topics/<t>} writes its body, encoded once, to every
subscriber of that topic. No history, no flow control, no validation, no
limits. What TinyMQ costs beyond this is the price of its features.

Run it with C{python bench/baseline_server.py --port 8091}; it prints
C{listening on 127.0.0.1:<port>} once it accepts connections.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import resource

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b"4\r\n:ok\n\r\n"
)


def sse_chunk(event_id: int, body: bytes) -> bytes:
    """Encode one single-line SSE event as one HTTP chunk."""
    event = b"id: %d\ndata: %s\n\n" % (event_id, body)
    return b"%x\r\n%s\r\n" % (len(event), event)


def ws_frame(body: bytes) -> bytes:
    """Encode one unmasked WebSocket text frame."""
    size = len(body)
    if size < 126:
        return bytes((0x81, size)) + body
    if size < 65536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + body
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + body


class Broadcast:
    """The subscribers of every topic, by wire format."""

    def __init__(self) -> None:
        self.sse: dict[bytes, dict[Protocol, None]] = {}
        self.ws: dict[bytes, dict[Protocol, None]] = {}
        self.last_id = 0

    def publish(self, topic: bytes, body: bytes) -> None:
        """Write C{body} to every subscriber of C{topic}."""
        self.last_id += 1
        sse = self.sse.get(topic)
        if sse:
            data = sse_chunk(self.last_id, body)
            for subscriber in sse:
                subscriber.transport.write(data)
        ws = self.ws.get(topic)
        if ws:
            data = ws_frame(body)
            for subscriber in ws:
                subscriber.transport.write(data)

    def forget(self, subscriber: Protocol) -> None:
        """Drop a closed connection from every topic."""
        for table in (self.sse, self.ws):
            for subscribers in table.values():
                subscribers.pop(subscriber, None)


class Connection(Protocol):
    """One HTTP/1.1 connection: keep-alive POSTs, or one stream."""

    def __init__(self, hub: Broadcast) -> None:
        self.hub = hub
        self.buffer = b""
        self.streaming = False

    def dataReceived(self, data: bytes) -> None:
        if self.streaming:
            # A subscriber may send WebSocket control frames; the floor
            # ignores them (the benchmark's clients send none).
            return
        self.buffer += data
        while not self.streaming:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].split(b"\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.request(head[0], headers, body)

    def request(self, line: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        method, path = line.split(b" ")[:2]
        parts = path.split(b"?")[0].split(b"/")
        if len(parts) < 4 or parts[1:3] != [b"api", b"topics"]:
            self.answer(b"404 Not Found", b"{}")
            return
        topic = parts[3]
        if method == b"POST" and len(parts) == 4:
            self.hub.publish(topic, body)
            self.answer(b"200 OK", b'{"topic":"%s"}' % topic)
        elif method == b"GET" and parts[4:] == [b"sse"]:
            self.streaming = True
            self.transport.write(_SSE_HEAD)
            self.hub.sse.setdefault(topic, {})[self] = None
        elif method == b"GET" and parts[4:] == [b"ws"]:
            key = headers.get(b"sec-websocket-key", b"")
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
            self.streaming = True
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept
            )
            self.hub.ws.setdefault(topic, {})[self] = None
        else:
            self.answer(b"405 Method Not Allowed", b"{}")

    def answer(self, status: bytes, body: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
        )

    def connectionLost(self, reason: object = None) -> None:
        if self.streaming:
            self.hub.forget(self)


class BroadcastFactory(Factory):
    """Makes one L{Connection} per accepted socket."""

    def __init__(self) -> None:
        self.hub = Broadcast()

    def buildProtocol(self, addr: object) -> Connection:
        return Connection(self.hub)


def main() -> None:
    """Listen on 127.0.0.1 and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Twisted's default backlog (50), as TinyMQ's tcp: endpoint has.
    port = reactor.listenTCP(args.port, BroadcastFactory(), interface="127.0.0.1")
    print(f"listening on 127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
