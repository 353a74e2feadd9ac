"""
The REST API and the SSE streams: one Klein app in front of the hub, with
the WebSocket resources mounted in the same tree.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed as _WerkzeugNotAllowed
from werkzeug.exceptions import NotFound as _WerkzeugNotFound

from ._auth import (
    Authenticator,
    Grant,
    authorize_publish,
    authorize_subscribe,
    www_authenticate,
)
from ._config import Config
from ._console import ConsoleFeed, console_asset, set_console_headers
from ._errors import (
    REASONS,
    BadRequest,
    InvalidPayload,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TinyMQError,
    Unauthorized,
    Unavailable,
)
from ._hub import Hub, Message, Topic
from ._limits import RateLimiter, check_publish_rate
from ._metrics import ServerMetrics
from ._sse import SSEStream
from ._subscriber import MAX_LAST, client_options, parse_count
from ._topics import is_wildcard, validate_pattern, validate_topic
from ._wire import is_json
from ._ws import (
    CommandProtocol,
    TinyMQWebSocketFactory,
    TopicProtocol,
    WebSocketEndpoint,
)

_JSON_TYPES = (b"application/json",)
_TOPIC_PAGE = 1000


def _json(request: IRequest, obj: object, status: int = 200) -> bytes:
    request.setResponseCode(status, REASONS.get(status))
    request.setHeader(b"Content-Type", b"application/json")
    body = json.dumps(obj).encode("utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def _arg(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))  # type: ignore[attr-defined]
    if not values:
        return None
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(f"'{name}' is not UTF-8.") from None


def _int_arg(request: IRequest, name: str, default: int, top: int) -> int:
    return parse_count(_arg(request, name), name, default, top)


def _message_json(message: Message) -> dict[str, Any]:
    return {
        "id": str(message.id),
        "topic": message.topic,
        "time": message.time,
        "data": json.loads(message.envelope())["data"],
    }


class API:
    """The HTTP routes of one TinyMQ server."""

    app = Klein()
    # No 308 to a merged path built from the Host header; set before routes.
    app.url_map.merge_slashes = False
    log = Logger()

    def __init__(self, hub: Hub, config: Config) -> None:
        self.hub = hub
        self.config = config
        self.limiter = RateLimiter(hub.clock, config.publish_rate, config.publish_burst)
        self.auth = Authenticator(config)
        self.topic_ws = WebSocketEndpoint(  # type: ignore[no-untyped-call]
            TinyMQWebSocketFactory(hub, config, TopicProtocol, self.limiter, self.auth)
        )
        self.command_ws = WebSocketEndpoint(  # type: ignore[no-untyped-call]
            TinyMQWebSocketFactory(
                hub, config, CommandProtocol, self.limiter, self.auth
            )
        )
        # Created now, not at the first scrape, to time every delivery.
        self.metrics = (
            ServerMetrics(hub, config.metrics_topics) if config.metrics else None
        )
        self.console = ConsoleFeed(hub) if config.console else None

    # Publishing

    @app.route("/api/topics/<topic>", methods=["POST"])
    def publish(self, request: IRequest, topic: str) -> bytes:
        """Publish the request body to C{topic}."""
        validate_topic(topic)
        grant = self._grant(request)
        authorize_publish(grant, topic)
        check_publish_rate(
            self.limiter, self.config, grant.subject, request.getClientAddress()
        )
        body = request.content.read()  # type: ignore[union-attr]
        if not body:
            raise InvalidPayload("The message body is empty.")
        if len(body) > self.config.max_message_size:
            raise PayloadTooLarge(self._too_large())
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidPayload("The message body is not UTF-8 text.") from None
        content_type = (request.getHeader(b"content-type") or b"").lower()
        media_type = content_type.split(b";")[0].strip()
        if (media_type in _JSON_TYPES or media_type.endswith(b"+json")) and not is_json(
            text
        ):
            raise InvalidPayload(
                "The body is not valid JSON, but Content-Type says it is."
            )
        message = self.hub.publish(topic, body)
        return _json(request, {"id": str(message.id), "topic": topic})

    def _too_large(self) -> str:
        return f"The message is over the limit of {self.config.max_message_size} bytes."

    # Streams

    @app.route("/api/topics/<pattern>/sse", methods=["GET"])
    def sse(self, request: IRequest, pattern: str) -> Deferred[None]:
        """Stream one topic or pattern as Server-Sent Events."""
        validate_pattern(pattern)
        return self._stream(request, [pattern], is_wildcard(pattern))

    @app.route("/api/sse", methods=["GET"])
    def sse_many(self, request: IRequest) -> Deferred[None]:
        """Stream several topics or patterns on one connection."""
        raw = request.args.get(b"topic") or []  # type: ignore[attr-defined]
        if not raw:
            raise BadRequest("Name at least one topic: /api/sse?topic=a&topic=b.")
        limit = self.config.max_subscriptions
        if len(raw) > limit:
            raise BadRequest(f"A stream may follow at most {limit} topics.")
        try:
            patterns = [validate_pattern(value.decode("utf-8")) for value in raw]
        except UnicodeDecodeError:
            raise BadRequest("'topic' is not UTF-8.") from None
        return self._stream(request, patterns, envelope=True)

    def _stream(
        self, request: IRequest, patterns: list[str], envelope: bool
    ) -> Deferred[None]:
        if self.hub.closing:
            raise Unavailable("The server is shutting down.")
        grant = self._grant(request)
        for pattern in patterns:
            authorize_subscribe(grant, pattern)
        last = _int_arg(request, "last", 0, MAX_LAST)
        since = request.getHeader(b"last-event-id")
        since_text = since.decode("latin-1") if since else _arg(request, "lastEventId")
        policy = _arg(request, "policy")
        max_rate = _arg(request, "max_rate")
        policy, rate = client_options(self.config, policy, max_rate)
        if request.method == b"HEAD":
            # The headers of a stream, without opening one.
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.setHeader(b"Cache-Control", b"no-cache")
            return succeed(None)
        stream = SSEStream(self.hub, request, envelope, policy, rate)  # type: ignore[arg-type]
        done = stream.open(patterns, last, since_text)
        if grant.expires is not None:
            stream.expire_at(grant.expires)
        return done

    def _grant(self, request: IRequest) -> Grant:
        """Return what the request's credentials allow, or raise 401."""
        token = self.auth.token_from_web(request)
        return self.auth.authenticate(token, self.hub.clock.seconds())

    @app.route("/api/topics/<pattern>/ws", methods=["GET"])
    def topic_websocket(self, request: IRequest, pattern: str) -> WebSocketEndpoint:
        """Open a WebSocket bound to one topic or pattern."""
        validate_pattern(pattern)
        return self.topic_ws

    @app.route("/ws", methods=["GET"])
    def command_websocket(self, request: IRequest) -> WebSocketEndpoint:
        """Open a WebSocket that speaks the JSON command protocol."""
        return self.command_ws

    # Inspection

    @app.route("/api/topics", methods=["GET"])
    def topics(self, request: IRequest) -> bytes:
        """
        List the topics with their counters, by name, a page at a time:
        C{prefix} filters, C{after} continues after a name, C{limit} caps.
        """
        grant = self._grant(request)
        prefix = _arg(request, "prefix") or ""
        after = _arg(request, "after") or ""
        limit = _int_arg(request, "limit", _TOPIC_PAGE, _TOPIC_PAGE)
        names = sorted(
            name
            for name in self.hub.topics
            if name.startswith(prefix) and name > after and grant.may_subscribe(name)
        )
        page = names[:limit]
        listing = [self._topic_json(self.hub.topics[name]) for name in page]
        return _json(
            request,
            {
                "topics": listing,
                "more": len(names) > len(page),
                "server": self.hub.stats(),
            },
        )

    @app.route("/api/topics/<topic>", methods=["GET"])
    def topic(self, request: IRequest, topic: str) -> bytes:
        """Describe one topic, with its last message."""
        validate_topic(topic)
        authorize_subscribe(self._grant(request), topic)
        found = self.hub.topics.get(topic)
        if found is None:
            raise NotFound(f"No message was published to '{topic}' yet.")
        description = self._topic_json(found)
        last = found.last
        description["last_message"] = _message_json(last) if last else None
        return _json(request, description)

    @app.route("/api/topics/<topic>/messages", methods=["GET"])
    def messages(self, request: IRequest, topic: str) -> bytes:
        """Return a topic's kept history, oldest first."""
        validate_topic(topic)
        authorize_subscribe(self._grant(request), topic)
        limit = _int_arg(request, "limit", 100, 1000)
        since = _arg(request, "since")
        found = self.hub.messages(topic, since, limit)
        return _json(
            request,
            {
                "topic": topic,
                "messages": [_message_json(m) for m in found],
                "last_id": str(self.hub.last_id),
                "gap": since is not None and self.hub.has_gap(topic, since),
            },
        )

    def _topic_json(self, topic: Topic) -> dict[str, Any]:
        return {
            "topic": topic.name,
            "subscribers": self.hub.subscriber_count(topic.name),
            "messages": topic.published,
            "rate": round(topic.rate, 3),
            "history": len(topic.history),
            "last_id": str(topic.last.id) if topic.last else None,
        }

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        """Answer that the server is alive."""
        return _json(request, {"status": "ok"})

    # Console and metrics

    @app.route("/metrics", methods=["GET"])
    def prometheus_metrics(self, request: IRequest) -> bytes:
        """Serve the server's metrics in the Prometheus text format."""
        if self.metrics is None:
            raise NotFound("Metrics are off on this server.")
        authorize_subscribe(self._grant(request), ">")
        body, content_type = self.metrics.render(request.getHeader(b"accept"))
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body

    @app.route("/", methods=["GET"])
    @app.route("/console", methods=["GET"])
    def console_page(self, request: IRequest) -> bytes:
        """Serve the live web console."""
        return self._console_file(request, "index.html")

    @app.route("/console/", methods=["GET"])
    def console_slash(self, request: IRequest) -> bytes:
        """Send C{/console/} to C{/console}, where relative links work."""
        if self.console is None:
            raise NotFound("The console is off on this server.")
        request.redirect(b"../console")
        return b""

    @app.route("/console/events", methods=["GET"])
    def console_events(self, request: IRequest) -> Deferred[None]:
        """Stream the server's figures to a console, once a second."""
        if self.console is None:
            raise NotFound("The console is off on this server.")
        grant = self._grant(request)
        authorize_subscribe(grant, ">")
        return self.console.open(request, grant.expires)  # type: ignore[arg-type]

    @app.route("/console/<name>", methods=["GET"])
    def console_static(self, request: IRequest, name: str) -> bytes:
        """Serve one of the console's static files."""
        return self._console_file(request, name)

    def _console_file(self, request: IRequest, name: str) -> bytes:
        if self.console is None:
            raise NotFound("The console is off on this server.")
        found = console_asset(name)
        if found is None:
            raise NotFound("The console has no such file.")
        body, content_type = found
        set_console_headers(request, content_type)  # type: ignore[arg-type]
        return body

    # Errors

    @app.handle_errors(TinyMQError)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, TinyMQError)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            request.setHeader(b"Retry-After", b"%d" % max(1, round(retry_after)))
        if isinstance(error, Unauthorized):
            token = self.auth.token_from_web(request)
            request.setHeader(b"WWW-Authenticate", www_authenticate(token is not None))
        return _json(request, error.as_dict(), error.status)

    @app.handle_errors(_WerkzeugNotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        error = NotFound("Nothing is served at this path.")
        return _json(request, error.as_dict(), error.status)

    @app.handle_errors(_WerkzeugNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = set(getattr(failure.value, "valid_methods", None) or [])
        allowed.add("OPTIONS")
        request.setHeader(b"Allow", ", ".join(sorted(allowed)).encode("ascii"))
        error = MethodNotAllowed("This path does not take that method.")
        return _json(request, error.as_dict(), error.status)
