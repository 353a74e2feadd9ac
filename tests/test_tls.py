"""
End-to-end tests of TLS on a real broker listening on C{--port ssl:...}
with a self-signed certificate for 127.0.0.1: publishing over HTTPS, SSE
over HTTP/1.1, a WebSocket over TLS, and several SSE streams multiplexed on
one HTTP/2 connection, each getting every message in order.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS

from tests.conftest import Broker
from tests.e2e import (
    HOST,
    WAIT,
    HTTPStream,
    WebSocketClient,
    drop,
    http_request,
    read_answer,
    wait_until,
)
from tests.sse_parser import SSEParser

pytestmark = pytest.mark.e2e

H2_STREAMS = 3
H2_MESSAGES = 50


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The certificate and key of the TLS broker."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_broker(
    module_broker_factory: Callable[..., Broker],
    certificate: tuple[Path, Path],
) -> Broker:
    """A broker that listens with TLS only."""
    cert, key = certificate
    return module_broker_factory(
        "--port", f"ssl:0:interface={HOST}:privateKey={key}:certKey={cert}"
    )


async def connect_tls(port: int, cert: Path, protocol: Protocol) -> Any:
    """Connect C{protocol} over TLS, trusting only the broker's certificate."""
    options = optionsForClientTLS(
        HOST, trustRoot=Certificate.loadPEM(cert.read_bytes())
    )
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, HOST, port))
    return await connectProtocol(endpoint, protocol)


async def publish_tls(broker: Broker, cert: Path, topic: str, body: str) -> HTTPStream:
    """POST C{body} to C{topic} over HTTPS; return the whole answer."""
    data = body.encode("utf-8")
    request = http_request(
        "POST",
        f"/api/topics/{topic}",
        broker.port,
        {"Content-Type": "application/json", "Content-Length": str(len(data))},
        data,
    )
    return await read_answer(
        broker.port, request, lambda port, answer: connect_tls(port, cert, answer)
    )


@pytest_twisted.ensureDeferred
async def test_plain_http_is_not_served_on_the_tls_port(tls_broker: Broker) -> None:
    """A plain HTTP request to the TLS port gets no HTTP answer."""
    answer = HTTPStream(http_request("GET", "/healthz", tls_broker.port))
    endpoint = TCP4ClientEndpoint(reactor, HOST, tls_broker.port)
    await connectProtocol(endpoint, answer)

    await wait_until(lambda: answer.closed, "the broker to close")

    assert answer.status is None


@pytest_twisted.ensureDeferred
async def test_publish_over_https_reaches_sse_and_wss(
    tls_broker: Broker, certificate: tuple[Path, Path]
) -> None:
    """A message published over HTTPS reaches an SSE stream and a wss client."""
    cert = certificate[0]
    stream = HTTPStream(
        http_request(
            "GET",
            "/api/topics/tls.one/sse",
            tls_broker.port,
            {"Accept": "text/event-stream"},
        )
    )
    await connect_tls(tls_broker.port, cert, stream)
    websocket = WebSocketClient("/api/topics/tls.one/ws", tls_broker.port)
    await connect_tls(tls_broker.port, cert, websocket)
    await wait_until(
        lambda: stream.body and websocket.status is not None, "both to open"
    )

    answers = [
        await publish_tls(tls_broker, cert, "tls.one", json.dumps({"n": n}))
        for n in range(3)
    ]
    await wait_until(
        lambda: len(stream.data()) == 3 and len(websocket.messages) == 3,
        "the messages",
    )
    await drop(stream, websocket)

    expected = ['{"n": 0}', '{"n": 1}', '{"n": 2}']
    assert [answer.status for answer in answers] == [200, 200, 200]
    assert answers[0].json()["topic"] == "tls.one"
    assert (stream.status, stream.header("content-type")) == (
        200,
        "text/event-stream",
    )
    assert stream.data() == expected
    assert (websocket.status, websocket.protocol_errors) == (101, [])
    assert websocket.messages == expected


class H2Client(threading.Thread):
    """
    Opens C{count} SSE streams of C{path} on one HTTP/2 connection (TLS with
    ALPN h2) and reads them until each has C{messages} message events, one
    stream ends, or the deadline passes.
    """

    def __init__(
        self, port: int, cert: Path, path: str, count: int, messages: int
    ) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.cert = cert
        self.path = path
        self.count = count
        self.messages = messages
        self.protocol: str | None = None
        self.status: dict[int, str] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.parsers: dict[int, SSEParser] = {}
        self.events: dict[int, list[Any]] = {}
        self.raw: dict[int, bytes] = {}
        self.ended: list[int] = []
        self.opened = threading.Event()
        self.error: BaseException | None = None

    def data(self) -> list[list[str]]:
        """Return the data of the message events of each stream."""
        return [
            [event.data for event in self.events[stream] if event.type == "message"]
            for stream in sorted(self.events)
        ]

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # reported by the test
            self.error = error
        finally:
            self.opened.set()

    def _run(self) -> None:
        context = ssl.create_default_context(cafile=str(self.cert))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection((HOST, self.port), timeout=WAIT)
        with context.wrap_socket(raw, server_hostname=HOST) as sock:
            self.protocol = sock.selected_alpn_protocol()
            connection = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
            )
            connection.initiate_connection()
            for _ in range(self.count):
                stream = connection.get_next_available_stream_id()
                self.parsers[stream] = SSEParser()
                self.events[stream] = []
                self.raw[stream] = b""
                connection.send_headers(
                    stream,
                    [
                        (":method", "GET"),
                        (":scheme", "https"),
                        (":authority", f"{HOST}:{self.port}"),
                        (":path", self.path),
                        ("accept", "text/event-stream"),
                    ],
                    end_stream=True,
                )
            sock.sendall(connection.data_to_send())
            while not self._done():
                data = sock.recv(65536)
                if not data:
                    break
                for event in connection.receive_data(data):
                    self._handle(connection, event)
                sock.sendall(connection.data_to_send())

    def _done(self) -> bool:
        if self.ended:
            return True
        return all(len(self.events[s]) >= self.messages for s in self.events)

    def _handle(self, connection: h2.connection.H2Connection, event: Any) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            headers = dict(event.headers)
            self.headers[event.stream_id] = headers
            self.status[event.stream_id] = headers[":status"]
        elif isinstance(event, h2.events.DataReceived):
            connection.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            parser = self.parsers[event.stream_id]
            self.raw[event.stream_id] += event.data
            self.events[event.stream_id] += [
                e for e in parser.feed(event.data) if e.type == "message"
            ]
            if len(self.status) == self.count and all(
                p.retry is not None for p in self.parsers.values()
            ):
                self.opened.set()
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            self.ended.append(event.stream_id)


@pytest_twisted.ensureDeferred
async def test_sse_streams_multiplexed_on_one_http2_connection(
    tls_broker: Broker, certificate: tuple[Path, Path]
) -> None:
    """Three SSE streams on one HTTP/2 connection each get all 50 messages."""
    cert = certificate[0]
    client = H2Client(
        tls_broker.port, cert, "/api/topics/tls.h2/sse", H2_STREAMS, H2_MESSAGES
    )
    client.start()
    await wait_until(client.opened.is_set, "the HTTP/2 streams to open")

    answers = [
        await publish_tls(tls_broker, cert, "tls.h2", f'"m{n}"')
        for n in range(H2_MESSAGES)
    ]
    await wait_until(lambda: not client.is_alive(), "the HTTP/2 client to finish")

    expected = [f'"m{n}"' for n in range(H2_MESSAGES)]
    assert client.error is None
    assert client.protocol == "h2"
    assert [answer.status for answer in answers] == [200] * H2_MESSAGES
    assert sorted(client.status) == [1, 3, 5]
    assert list(client.status.values()) == ["200"] * H2_STREAMS
    assert [h["content-type"] for h in client.headers.values()] == [
        "text/event-stream"
    ] * H2_STREAMS
    assert client.ended == []
    assert client.data() == [expected] * H2_STREAMS
    # Bare SSE: no HTTP/1.1 chunk framing leaks into the HTTP/2 DATA frames.
    assert [raw.startswith(b":ok\n\n") for raw in client.raw.values()] == [
        True
    ] * H2_STREAMS
    assert [b"\r" in raw for raw in client.raw.values()] == [False] * H2_STREAMS
