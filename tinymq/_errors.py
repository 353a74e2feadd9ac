"""
Every error a client can see, each with a stable code.

An error is translated to a wire format in one place per protocol: the REST
resource turns it into a JSON body with the HTTP status, the WebSocket
protocols into an ``error`` frame or a close code, the SSE stream into an
``error`` event.
"""

from __future__ import annotations

import json

REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class TinyMQError(Exception):
    """The base of every error that TinyMQ reports to a client."""

    code = "error"
    status = 400
    close_code = 1008

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_dict(self) -> dict[str, str]:
        """Return the JSON object that describes this error to a client."""
        return {"error": self.code, "message": self.message}

    def as_json(self) -> bytes:
        """Return the JSON body that describes this error to a client."""
        return json.dumps(self.as_dict()).encode("utf-8")


class BadRequest(TinyMQError):
    """The request is malformed."""

    code = "bad-request"


class InvalidTopic(TinyMQError):
    """A topic name or pattern is not allowed."""

    code = "topic-invalid"


class InvalidPayload(TinyMQError):
    """A message body is empty, not UTF-8, or not the JSON it claims."""

    code = "payload-invalid"
    close_code = 1007


class PayloadTooLarge(TinyMQError):
    """A message body is over the configured size limit."""

    code = "payload-too-large"
    status = 413
    close_code = 1009


class HeadersTooLarge(TinyMQError):
    """The request line and headers are over the size limit."""

    code = "headers-too-large"
    status = 431


class Unauthorized(TinyMQError):
    """No usable credentials came with the request."""

    code = "unauthorized"
    status = 401


class Forbidden(TinyMQError):
    """The credentials do not allow this topic or this origin."""

    code = "forbidden"
    status = 403


class NotFound(TinyMQError):
    """Nothing is served at this path, or the topic is unknown."""

    code = "not-found"
    status = 404


class MethodNotAllowed(TinyMQError):
    """The path exists but not for this method."""

    code = "method-not-allowed"
    status = 405


class RequestTimeout(TinyMQError):
    """The client took too long to send its request."""

    code = "request-timeout"
    status = 408


class TooManyRequests(TinyMQError):
    """A rate or count limit was reached."""

    code = "too-many-requests"
    status = 429
    close_code = 1013

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(TinyMQError):
    """The server cannot take this now (shutting down, or full)."""

    code = "unavailable"
    status = 503
    close_code = 1013
