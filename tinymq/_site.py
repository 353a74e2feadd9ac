"""
The HTTP server around the API: request body limits, CORS, and the TCP
settings of every connection.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ._config import Config
from ._errors import Forbidden, PayloadTooLarge

_ALLOWED_METHODS = b"GET, POST, OPTIONS"
_ALLOWED_HEADERS = b"Content-Type, Authorization, Last-Event-ID, Cache-Control"


def _cors_headers(config: Config, origin: bytes | None) -> list[tuple[bytes, bytes]]:
    if not origin:
        return []
    try:
        text = origin.decode("ascii")
    except UnicodeDecodeError:
        return []
    if not config.origin_allowed(text):
        return []
    if "*" in config.cors_origins:
        return [(b"Access-Control-Allow-Origin", b"*")]
    return [(b"Access-Control-Allow-Origin", origin), (b"Vary", b"Origin")]


class TinyMQRequest(Request):
    """
    A request that refuses an oversized body as soon as it is known to be
    too large, without reading the rest of it.
    """

    _refused = False
    _received = 0

    @property
    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        config: Config = getattr(site, "config", None) or Config()
        return config.max_message_size

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        """Answer 413 and close, leaving the rest of the body unread."""
        self._refused = True
        # No "100 Continue" for a body we will not take.
        self.requestHeaders.removeHeader(b"expect")
        error = PayloadTooLarge(
            f"The message is over the limit of {self._limit} bytes."
        )
        body = error.as_json()
        site = getattr(self.channel, "site", None)
        config: Config = getattr(site, "config", None) or Config()
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Connection", b"close"),
        ] + _cors_headers(config, self.requestHeaders.getRawHeaders(b"origin", [None])[0])
        head = b"HTTP/1.1 413 Payload Too Large\r\n" + b"".join(
            name + b": " + value + b"\r\n" for name, value in headers
        )
        transport = self.channel.transport
        if transport is not None:
            transport.write(head + b"\r\n" + body)
            transport.loseConnection()


class TinyMQChannel(HTTPChannel):
    """An HTTP connection with keep-alive probes and a send timeout."""

    def connectionMade(self) -> None:
        super().connectionMade()
        site = getattr(self, "site", None)
        if isinstance(site, TinyMQSite):
            site.channel_opened(self)

    def connectionLost(self, reason: Any) -> None:
        site = getattr(self, "site", None)
        if isinstance(site, TinyMQSite):
            site.channel_closed(self)
        super().connectionLost(reason)


def _tune_socket(transport: Any, send_timeout: float) -> None:
    """Notice peers that vanished without a FIN."""
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket):
        return
    try:
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        if send_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            # Unacknowledged data older than this ends the connection.
            handle.setsockopt(
                socket.IPPROTO_TCP,
                socket.TCP_USER_TIMEOUT,
                int(send_timeout * 1000),
            )
    except OSError:
        pass


class TinyMQSite(Site):
    """The site: the resource tree, its settings, and its connections."""

    requestFactory = TinyMQRequest
    protocol = TinyMQChannel

    def __init__(self, resource: IResource, config: Config) -> None:
        super().__init__(resource, timeout=300)
        self.config = config
        self.channels: set[TinyMQChannel] = set()
        self._all_closed: list[Deferred[None]] = []
        self.noisy = False

    def log(self, request: Request) -> None:  # type: ignore[override]
        """Write no access log line: one per publish is too many."""

    def channel_opened(self, channel: TinyMQChannel) -> None:
        """Count a new connection and tune its socket."""
        self.channels.add(channel)
        _tune_socket(channel.transport, self.config.stall_timeout)

    def channel_closed(self, channel: TinyMQChannel) -> None:
        """Forget a closed connection."""
        self.channels.discard(channel)
        if not self.channels:
            waiting, self._all_closed = self._all_closed, []
            for waiter in waiting:
                waiter.callback(None)

    def close_connections(self) -> Deferred[None]:
        """Close idle connections; fire when every connection is gone."""
        for channel in list(self.channels):
            if channel.transport is not None and not channel._handlingRequest:
                channel.transport.loseConnection()
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
        super().__init__()
        self.api = api
        self.config = config

    def render(self, request: Request) -> Any:  # type: ignore[override]
        origin = request.getHeader(b"origin")
        for name, value in _cors_headers(self.config, origin):
            request.setHeader(name, value)
        if request.method == b"OPTIONS":
            return self._preflight(request, origin)
        return self.api.render(request)

    def _preflight(self, request: Request, origin: bytes | None) -> bytes:
        if origin and not self.config.origin_allowed(origin.decode("latin-1")):
            error = Forbidden("This origin is not allowed.")
            request.setResponseCode(error.status)
            request.setHeader(b"Content-Type", b"application/json")
            return error.as_json()
        request.setResponseCode(204)
        request.setHeader(b"Allow", _ALLOWED_METHODS)
        if origin:
            request.setHeader(b"Access-Control-Allow-Methods", _ALLOWED_METHODS)
            request.setHeader(b"Access-Control-Allow-Headers", _ALLOWED_HEADERS)
            request.setHeader(b"Access-Control-Max-Age", b"600")
        return b""

