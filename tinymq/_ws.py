"""
WebSocket endpoints, on the same port as the REST API.

``/api/topics/{pattern}/ws`` carries raw payloads, one text frame each, and
publishes every text frame the client sends. ``/ws`` speaks a small JSON
command protocol over many topics. Both are Autobahn protocols whose
subscriber writes the hub's prepared frames straight to the transport.
"""

from __future__ import annotations

import json
from typing import Any, cast
from urllib.parse import unquote

import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IConsumer, IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from ._auth import (
    ALLOW_ALL,
    Authenticator,
    Grant,
    authorize_publish,
    authorize_subscribe,
)
from ._config import Config
from ._direct import writer_for
from ._errors import (
    BadRequest,
    InvalidPayload,
    PayloadTooLarge,
    TinyMQError,
)
from ._hub import Hub
from ._limits import RateLimiter, check_publish_rate
from ._subscriber import MAX_LAST, Subscriber, client_options, parse_count
from ._topics import is_wildcard, validate_pattern, validate_topic
from ._wire import BROWSER_JSON

txaio.use_twisted()
# Autobahn logs every frame at debug level; the broker logs at info.
txaio.set_global_log_level("info")  # type: ignore[attr-defined]

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


class WebSocketSubscriber(Subscriber):
    """The hub's side of one WebSocket connection."""

    def __init__(
        self,
        protocol: _BaseProtocol,
        envelope: bool,
        policy: str | None = None,
        max_rate: float | None = None,
    ) -> None:
        assert protocol.transport is not None
        super().__init__(protocol.hub, writer_for(protocol.transport), policy, max_rate)
        self.protocol = protocol
        self.fmt = "ws-envelope" if envelope else "ws"

    def reset(self, last_id: int) -> None:
        """Tell a C{/ws} client that history cannot fill its gap."""
        if self.fmt == "ws-envelope":
            self.protocol.send_json(
                {"type": "reset", "reason": "history-gap", "last_id": str(last_id)}
            )

    def notify_skipped(self, count: int) -> None:
        """Tell a C{/ws} client how many messages were conflated away."""
        if self.fmt == "ws-envelope":
            self.protocol.send_json({"type": "skipped", "skipped": count})

    def overflow(self) -> None:
        """Close with 1013: the client reads too slowly."""
        self.gone()
        self.protocol.close_with(CLOSE_TRY_AGAIN_LATER, "backlog full: read faster")

    def shutdown(self) -> None:
        """Close with 1001: the server is going away."""
        self.gone()
        self.protocol.close_with(CLOSE_GOING_AWAY, "server shutting down")

    def abort(self, reason: str) -> None:
        """Drop the connection at once."""
        self.gone()
        if self.protocol.transport is not None:
            cast(ITCPTransport, self.protocol.transport).abortConnection()


class _BaseProtocol(WebSocketServerProtocol):
    factory: TinyMQWebSocketFactory
    subscriber: WebSocketSubscriber | None = None
    on_lost: Any = None
    grant: Grant = ALLOW_ALL
    _expiry: IDelayedCall | None = None

    @property
    def hub(self) -> Hub:
        return self.factory.hub

    # LIMITATION(L-010): a refused handshake shows the browser only 1006.
    def onConnect(self, request: ConnectionRequest) -> Any:
        origin = request.headers.get("origin")
        host = request.headers.get("host")
        if origin and not self.factory.config.origin_allowed(origin, host):
            raise ConnectionDeny(403, "Origin not allowed")
        auth = self.factory.auth
        try:
            self.grant = auth.authenticate(
                auth.token_from_handshake(request), self.hub.clock.seconds()
            )
            self.accept(request)
        except TinyMQError as error:
            raise ConnectionDeny(error.status, error.message) from None
        return None

    def accept(self, request: ConnectionRequest) -> None:
        """Check the handshake request; raise a L{TinyMQError} to refuse."""

    def onOpen(self) -> None:
        assert self.transport is not None
        expires = self.grant.expires
        if expires is not None:
            self._expiry = self.hub.clock.callLater(
                max(0.0, expires - self.hub.clock.seconds()),
                self.close_with,
                CLOSE_POLICY_VIOLATION,
                "token expired",
            )
        subscriber = self.make_subscriber()
        self.subscriber = subscriber
        # The HTTP channel was the transport's producer until the upgrade.
        consumer = cast(IConsumer, self.transport)
        consumer.unregisterProducer()
        consumer.registerProducer(subscriber, True)
        self.opened(subscriber)

    def make_subscriber(self) -> WebSocketSubscriber:
        raise NotImplementedError

    def opened(self, subscriber: WebSocketSubscriber) -> None:
        """The connection is open and its subscriber registered."""

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.subscriber is not None:
            self.subscriber.gone()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost(reason)

    def close_with(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with any close code of RFC 6455;
        Autobahn's C{sendClose} takes only 1000 and 3000-4999.
        """
        # Nothing more is sent after the close frame.
        if self.subscriber is not None:
            self.subscriber.gone()
        # A close reason is at most 123 bytes; cut between characters.
        cut = reason.encode("utf-8")[:123].decode("utf-8", "ignore")
        self.sendCloseFrame(code, cut.encode("utf-8"), isReply=False)

    def check_rate(self) -> None:
        """Count one publish against this client's rate limit."""
        assert self.transport is not None
        check_publish_rate(
            self.factory.limiter,
            self.factory.config,
            self.grant.subject,
            self.transport.getPeer(),
        )

    def send_json(self, obj: dict[str, Any]) -> None:
        """Send one JSON text frame."""
        payload = json.dumps(obj).encode("utf-8")
        self.sendMessage(payload)  # type: ignore[no-untyped-call]


class TopicProtocol(_BaseProtocol):
    """C{/api/topics/{pattern}/ws}: raw payloads in and out."""

    # LIMITATION(L-001): raw frames carry no ids, so this socket cannot resume.

    pattern = ""
    last = 0
    policy: str | None = None
    max_rate: float | None = None

    def accept(self, request: ConnectionRequest) -> None:
        parts = request.path.split("/")
        if len(parts) != 5 or parts[1:3] != ["api", "topics"] or parts[4] != "ws":
            raise BadRequest("The path is /api/topics/{pattern}/ws.")
        self.pattern = validate_pattern(unquote(parts[3]))
        authorize_subscribe(self.grant, self.pattern)
        params = request.params
        self.last = parse_count((params.get("last") or [None])[0], "last", 0, MAX_LAST)
        self.policy, self.max_rate = client_options(
            self.factory.config,
            (params.get("policy") or [None])[0],
            (params.get("max_rate") or [None])[0],
        )

    def make_subscriber(self) -> WebSocketSubscriber:
        return WebSocketSubscriber(
            self, is_wildcard(self.pattern), self.policy, self.max_rate
        )

    def opened(self, subscriber: WebSocketSubscriber) -> None:
        self.hub.attach(subscriber, [self.pattern], self.last)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.close_with(1003, "Send text frames.")
            return
        if is_wildcard(self.pattern):
            self.close_with(1008, "Cannot publish to a pattern.")
            return
        if not payload.strip():
            self.close_with(1007, "Empty messages are not published.")
            return
        try:
            authorize_publish(self.grant, self.pattern, self.hub.clock.seconds())
            self.check_rate()
            self.hub.publish(self.pattern, payload)
        except TinyMQError as error:
            self.close_with(error.close_code, error.message)


class CommandProtocol(_BaseProtocol):
    """C{/ws}: JSON commands, many topics on one connection."""

    def make_subscriber(self) -> WebSocketSubscriber:
        return WebSocketSubscriber(self, envelope=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        ref = None
        try:
            if isBinary:
                raise BadRequest("Commands are JSON text frames.")
            try:
                command = BROWSER_JSON.decode(payload.decode("utf-8"))
            except (ValueError, RecursionError):
                raise BadRequest("A command is one JSON object.") from None
            if not isinstance(command, dict):
                raise BadRequest("A command is one JSON object.")
            ref = command.get("ref")
            handler = self._handlers.get(command.get("type"))  # type: ignore[arg-type]
            if handler is None:
                raise BadRequest(
                    "'type' is one of subscribe, unsubscribe, publish, ping."
                )
            reply = handler(self, command)
        except TinyMQError as error:
            reply = {"type": "error", **error.as_dict()}
        if reply is None:
            return
        if ref is not None:
            reply["ref"] = ref
        self.send_json(reply)

    def _subscribe(self, command: dict[str, Any]) -> None:
        subscriber = self.subscriber
        assert subscriber is not None
        pattern = validate_pattern(command.get("topic"))  # type: ignore[arg-type]
        authorize_subscribe(self.grant, pattern, self.hub.clock.seconds())
        last = parse_count(command.get("last"), "last", 0, MAX_LAST)
        since = command.get("since")
        if since is not None and not isinstance(since, str):
            raise BadRequest("'since' is a message id string.")
        limit = self.factory.config.max_subscriptions
        if pattern not in subscriber.patterns and len(subscriber.patterns) >= limit:
            raise BadRequest(f"A connection may follow at most {limit} topics.")
        policy, max_rate = client_options(
            self.factory.config, command.get("policy"), command.get("max_rate")
        )
        if policy is not None:
            subscriber.policy = policy
        if max_rate is not None:
            subscriber.max_rate = max_rate

        # The acknowledgement goes out before the replayed history.
        reply: dict[str, Any] = {"type": "subscribed", "topic": pattern}
        if "ref" in command:
            reply["ref"] = command["ref"]
        self.send_json(reply)
        # LIMITATION(L-002): ids are ordered per subscription, not across
        # the subscriptions of one connection.
        self.hub.attach(subscriber, [pattern], last, since)
        return None

    def _unsubscribe(self, command: dict[str, Any]) -> dict[str, Any]:
        subscriber = self.subscriber
        assert subscriber is not None
        pattern = command.get("topic")
        if pattern not in subscriber.patterns:
            raise BadRequest("This connection does not follow that topic.")
        self.hub.detach(subscriber, [pattern])  # type: ignore[list-item]
        return {"type": "unsubscribed", "topic": pattern}

    def _publish(self, command: dict[str, Any]) -> dict[str, Any]:
        topic = validate_topic(command.get("topic"))  # type: ignore[arg-type]
        authorize_publish(self.grant, topic, self.hub.clock.seconds())
        self.check_rate()
        if "data" not in command:
            raise InvalidPayload("A publish command carries 'data'.")
        try:
            text = json.dumps(command["data"], separators=(",", ":"), allow_nan=False)
        except ValueError:
            raise InvalidPayload("'data' must be plain JSON.") from None
        payload = text.encode("utf-8")
        limit = self.factory.config.max_message_size
        if len(payload) > limit:
            raise PayloadTooLarge(f"The message is over the limit of {limit} bytes.")
        message = self.hub.publish(topic, payload)
        return {"type": "published", "topic": topic, "id": str(message.id)}

    def _ping(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"type": "pong"}

    _handlers: dict[str, Any] = {
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "publish": _publish,
        "ping": _ping,
    }


class TinyMQWebSocketFactory(WebSocketServerFactory):
    """A WebSocket factory that knows the hub and the server's settings."""

    def __init__(
        self,
        hub: Hub,
        config: Config,
        protocol: type[_BaseProtocol],
        limiter: RateLimiter,
        auth: Authenticator,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.hub = hub
        self.config = config
        self.protocol = protocol
        self.limiter = limiter
        self.auth = auth
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            maxMessagePayloadSize=config.max_message_size,
            maxFramePayloadSize=config.max_message_size,
            autoPingInterval=config.heartbeat or None,
            autoPingTimeout=max(config.heartbeat, 5.0) if config.heartbeat else None,
            openHandshakeTimeout=10,
            # Close with 1007/1009 and a reason rather than just dropping.
            failByDrop=False,
            closeHandshakeTimeout=2,
        )


class WebSocketEndpoint(WebSocketResource):
    """The WebSocket resource, mounted in the Klein tree."""

    def render(self, request: Request) -> Any:
        channel = request.channel
        if isinstance(channel, HTTPChannel):
            channel.setTimeout(None)
        transport = channel.transport
        connection = _protocol_of(transport)
        result = super().render(request)  # type: ignore[no-untyped-call]
        protocol = _protocol_of(transport)
        if isinstance(protocol, _BaseProtocol) and protocol is not connection:
            # The WebSocket protocol replaced the HTTP connection on the
            # transport; it must tell the site when the connection ends.
            protocol.on_lost = getattr(connection, "connectionLost", None)
        return result


def _protocol_of(transport: Any) -> Any:
    """Return the protocol on C{transport}, looking through TLS."""
    protocol = getattr(transport, "wrappedProtocol", None)
    if protocol is None:
        protocol = getattr(transport, "protocol", None)
    return protocol
