"""
The HTTP server around the API: connection limits, request limits, CORS,
and the TCP settings of every connection.

Errors found before a request reaches the API (too many connections, an
oversized body or header, headers sent too slowly) are answered here with
the same JSON error body the API uses, and the connection is closed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ._config import Config
from ._errors import (
    REASONS,
    BadRequest,
    Forbidden,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
    TinyMQError,
    TooManyRequests,
    Unavailable,
)
from ._logging import log_access

_ALLOWED_METHODS = b"GET, POST, OPTIONS"
_ALLOWED_HEADERS = b"Content-Type, Authorization, Last-Event-ID, Cache-Control"

_CallLater = Callable[..., IDelayedCall]


def cors_headers(config: Config, origin: bytes | None) -> list[tuple[bytes, bytes]]:
    """Return the CORS headers for a request from C{origin}."""
    any_origin = "*" in config.cors_origins and not config.cors_credentials
    # Caches must know that the answer depends on the Origin header.
    vary = [] if any_origin else [(b"Vary", b"Origin")]
    if not origin:
        return vary
    try:
        text = origin.decode("ascii")
    except UnicodeDecodeError:
        return vary
    if not config.origin_allowed(text):
        return vary
    expose = (b"Access-Control-Expose-Headers", b"Retry-After, WWW-Authenticate")
    if any_origin:
        return [(b"Access-Control-Allow-Origin", b"*"), expose]
    headers = [(b"Access-Control-Allow-Origin", origin), expose] + vary
    if config.cors_credentials:
        headers.append((b"Access-Control-Allow-Credentials", b"true"))
    return headers


def write_error(
    transport: Any,
    error: TinyMQError,
    headers: list[tuple[bytes, bytes]] = [],  # noqa: B006 - never mutated
) -> None:
    """
    Write a whole HTTP/1.1 error response straight to C{transport} and
    close it, for errors found before the API sees the request.
    """
    if transport is None:
        return
    body = error.as_json()
    lines = [
        b"HTTP/1.1 %d %s" % (error.status, REASONS.get(error.status, b"Error")),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        lines.append(b"Retry-After: %d" % max(1, round(retry_after)))
    lines.extend(name + b": " + value for name, value in headers)
    transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    transport.loseConnection()


def _config_of(channel: Any) -> Config:
    site = getattr(channel, "site", None)
    config = getattr(site, "config", None)
    return config if isinstance(config, Config) else Config()


class TinyMQRequest(Request):
    """
    A request that refuses an oversized body as soon as it is known to be
    too large, without reading the rest of it.
    """

    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > _config_of(self.channel).max_message_size:
            self._refuse()
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > _config_of(self.channel).max_message_size:
            self._refuse()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Any) -> None:
        # A stream that the client closed never finishes; log it anyway.
        site = getattr(self.channel, "site", None)
        if not self.finished and not self._refused and isinstance(site, TinyMQSite):
            site.log(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _refuse(self) -> None:
        """Answer 413 and close, leaving the rest of the body unread."""
        self._refused = True
        # No "100 Continue" for a body we will not take.
        self.requestHeaders.removeHeader(b"expect")
        config = _config_of(self.channel)
        error = PayloadTooLarge(
            f"The message is over the limit of {config.max_message_size} bytes."
        )
        origin = self.requestHeaders.getRawHeaders(b"origin", [None])[0]
        write_error(self.channel.transport, error, cors_headers(config, origin))


class TinyMQChannel(HTTPChannel):
    """
    An HTTP connection that enforces the header limits and a deadline for
    receiving the headers of each request.
    """

    site: TinyMQSite
    _deadline: IDelayedCall | None = None
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        config = self.site.config
        self.totalHeadersSize = config.max_header_size
        self.MAX_LENGTH = config.max_header_size

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        # The clock for the headers starts at their first byte, so that a
        # request line sent a byte at a time is cut off too.
        if self._deadline is None and self.line_mode and not self._handlingRequest:
            self._arm("headers", self.site.config.header_timeout)
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        # The body gets its own deadline, so that a body sent a byte at a
        # time cannot hold the connection either.
        if not self._refused:
            self._arm("body", self.site.config.body_timeout)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _arm(self, part: str, timeout: float) -> None:
        if timeout > 0:
            call_later = cast(_CallLater, self.callLater)
            self._deadline = call_later(timeout, self._late, part, timeout)

    def _late(self, part: str, timeout: float) -> None:
        self._deadline = None
        self._refused = True
        write_error(
            self.transport,
            RequestTimeout(f"The request {part} took longer than {timeout:g} s."),
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        self._receivedHeaderSize = self.totalHeadersSize + 1
        self._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refused = True
        self._cancel_deadline()
        limit = self.site.config.max_header_size
        if self._receivedHeaderSize > self.totalHeadersSize:
            error: TinyMQError = HeadersTooLarge(
                f"The request headers are over the limit of {limit} bytes."
            )
        else:
            error = BadRequest("The request is not valid HTTP/1.1.")
        write_error(self.transport, error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class _Connection(_GenericHTTPChannelProtocol):  # type: ignore[misc]
    """
    One client connection, HTTP/1.1 or HTTP/2 as TLS negotiates, counted
    against the connection limits.
    """

    _refused = False

    def makeConnection(self, transport: Any) -> None:
        site: TinyMQSite = self.site
        refusal = site.channel_opened(self, transport)
        if refusal is not None:
            self._refused = True
            write_error(transport, refusal)
            return
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().dataReceived(data)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Any) -> None:
        self.site.channel_closed(self)
        if not self._refused:
            super().connectionLost(reason)

    def close_if_idle(self) -> None:
        """Close the connection unless it is serving a request."""
        channel = self._channel
        if isinstance(channel, HTTPChannel) and channel._handlingRequest:
            return
        if channel.transport is not None:
            channel.transport.loseConnection()


def _connection_factory(site: Site) -> _Connection:
    return _Connection(TinyMQChannel())  # type: ignore[no-untyped-call]


def _tune_socket(transport: Any, config: Config) -> None:
    """
    Notice peers that vanished without a FIN, and bound the kernel memory
    a client that stops reading can hold.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket):
        return
    send_timeout = config.stall_timeout
    try:
        # Small frames go out at once; the hub already batches per turn.
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if config.send_buffer:
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.send_buffer)
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        if send_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            # Data left unacknowledged for this long ends the connection.
            handle.setsockopt(
                socket.IPPROTO_TCP,
                socket.TCP_USER_TIMEOUT,
                int(send_timeout * 1000),
            )
    except OSError:
        pass


# LIMITATION(L-007): behind a proxy this is the proxy's address.
# LIMITATION(L-012): HTTP/2 streams of one connection count once.
def client_address(transport: Any) -> str:
    """Return the client's IP address as text, or '' if it has none."""
    peer = transport.getPeer() if transport is not None else None
    return str(getattr(peer, "host", ""))


class TinyMQSite(Site):
    """The site: the resource tree, its settings, and its connections."""

    requestFactory = TinyMQRequest
    protocol = _connection_factory
    noisy = False

    def __init__(self, resource: IResource, config: Config) -> None:
        # A publish body is the message itself, never a form; Twisted's form
        # parsing also raises on some Content-Type bytes and drops the
        # connection unanswered.
        super().__init__(  # type: ignore[no-untyped-call]
            resource, timeout=60, parsePOSTFormSubmission=False
        )
        self.config = config
        self.channels: set[_Connection] = set()
        self.per_address: dict[str, int] = {}
        self._all_closed: list[Deferred[None]] = []

    def log(self, request: Request) -> None:  # type: ignore[override]
        """
        Log one combined-format line per finished request when the access
        log is on; by default it is off: one line per publish is too many.
        """
        if self.config.access_log:
            log_access(request)

    def channel_opened(
        self, channel: _Connection, transport: Any
    ) -> TinyMQError | None:
        """
        Count a new connection and tune its socket; return the error to
        answer it with if it is over a limit.
        """
        config = self.config
        address = client_address(transport)
        if len(self.channels) >= config.max_connections:
            return Unavailable(
                f"The server holds its limit of {config.max_connections} connections."
            )
        count = self.per_address.get(address, 0)
        limit = config.max_connections_per_address
        if limit and count >= limit and address not in config.trusted_addresses:
            return TooManyRequests(
                f"Your address holds its limit of {limit} connections.",
                retry_after=10,
            )
        self.channels.add(channel)
        self.per_address[address] = count + 1
        channel.client_address = address  # type: ignore[attr-defined]
        _tune_socket(transport, config)
        return None

    def channel_closed(self, channel: _Connection) -> None:
        """Forget a closed connection."""
        if channel not in self.channels:
            return
        self.channels.discard(channel)
        address = getattr(channel, "client_address", "")
        left = self.per_address.get(address, 1) - 1
        if left > 0:
            self.per_address[address] = left
        else:
            self.per_address.pop(address, None)
        if not self.channels:
            waiting, self._all_closed = self._all_closed, []
            for waiter in waiting:
                waiter.callback(None)

    def close_connections(self) -> Deferred[None]:
        """Close idle connections; fire when every connection is gone."""
        for channel in list(self.channels):
            channel.close_if_idle()
        if not self.channels:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._all_closed.append(waiter)
        return waiter


class Root(Resource):
    """
    The root of the tree: answers CORS preflights, adds CORS headers, and
    hands everything else to the API.
    """

    isLeaf = True

    def __init__(self, api: IResource, config: Config) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.api = api
        self.config = config

    def render(self, request: Request) -> Any:  # type: ignore[override]
        origin = request.getHeader(b"origin")
        for name, value in cors_headers(self.config, origin):
            request.setHeader(name, value)
        if request.method == b"OPTIONS":
            return self._preflight(request, origin)
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if origin and not self.config.origin_allowed(origin.decode("latin-1"), host):
            # A page from another site could otherwise publish, or read
            # with the visitor's cookie, by a simple request.
            return self._refuse_origin(request)
        return self.api.render(request)

    def _refuse_origin(self, request: Request) -> bytes:
        error = Forbidden("This origin is not allowed.")
        request.setResponseCode(error.status, REASONS[error.status])
        request.setHeader(b"Content-Type", b"application/json")
        return error.as_json()

    def _preflight(self, request: Request, origin: bytes | None) -> bytes:
        if origin and not self.config.origin_allowed(origin.decode("latin-1")):
            return self._refuse_origin(request)
        request.setResponseCode(204)
        request.setHeader(b"Allow", _ALLOWED_METHODS)
        if origin:
            request.setHeader(b"Access-Control-Allow-Methods", _ALLOWED_METHODS)
            request.setHeader(b"Access-Control-Allow-Headers", _ALLOWED_HEADERS)
            request.setHeader(b"Access-Control-Max-Age", b"600")
        return b""
