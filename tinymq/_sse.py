"""
Server-Sent Events streams.

A stream is a L{Subscriber} bound to one twisted.web request. Over HTTP/1.1
the hub's bytes, already wrapped as HTTP chunks once per group, go straight
to the TCP transport; the request only writes the headers, the opening
bytes and, at the end, the last chunk.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from ._direct import writer_for
from ._errors import TinyMQError, Unauthorized
from ._hub import Hub
from ._subscriber import Subscriber
from ._wire import http_chunk, sse_comment, sse_event


class SSEStream(Subscriber):
    """One open C{text/event-stream} response."""

    log = Logger()

    def __init__(
        self,
        hub: Hub,
        request: Request,
        envelope: bool,
        policy: str | None = None,
        max_rate: float | None = None,
    ) -> None:
        super().__init__(hub, request.write, policy, max_rate)
        self.request = request
        self.fmt = "sse-envelope" if envelope else "sse"
        self.done: Deferred[None] = Deferred(lambda _: self.gone())

    def open(
        self, patterns: list[str], last: int = 0, since: str | None = None
    ) -> Deferred[None]:
        """
        Send the response headers and the opening bytes, subscribe, and
        return a Deferred that fires when the server ends the stream.
        """
        request = self.request
        open_event_stream(request, self.hub.config.sse_retry)
        self._choose_write()
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(lambda _: self.gone())
        self.hub.attach(self, patterns, last, since)
        return self.done

    def _choose_write(self) -> None:
        request = self.request
        channel = request.channel
        transport = getattr(channel, "transport", None)
        if not isinstance(channel, HTTPChannel) or transport is None:
            return
        self.write = writer_for(transport)
        self.chunked = bool(request.chunked)

    def expire_at(self, when: float) -> None:
        """End the stream with an C{error} event when the token expires."""
        call = self.hub.clock.callLater(
            max(0.0, when - self.hub.clock.seconds()),
            self.error,
            Unauthorized("The token has expired."),
        )
        self.done.addBoth(cancel_call, call)

    def reset(self, last_id: int) -> None:
        """Send the C{reset} event: history cannot fill the client's gap."""
        data = json.dumps({"reason": "history-gap", "last_id": str(last_id)})
        self._write_event(sse_event(data.encode(), str(last_id), "reset"))

    def notify_skipped(self, count: int) -> None:
        """Send the C{skipped} event after conflation."""
        data = json.dumps({"skipped": count}).encode()
        self._write_event(sse_event(data, event="skipped"))

    def error(self, error: TinyMQError) -> None:
        """Send an C{error} event, then end the stream."""
        data = json.dumps(error.as_dict()).encode()
        self._write_event(sse_event(data, event="error"))
        self._finish()

    def _write_event(self, event: bytes) -> None:
        if not self.closed:
            self.write(http_chunk(event) if self.chunked else event)

    def overflow(self) -> None:
        """
        End the response so that EventSource reconnects and resumes from
        history, and close the connection; a client that does not read even
        that is cut off after the stall timeout.
        """
        self.log.info(
            "Disconnecting slow SSE subscriber {peer}",
            peer=self._peer(),
        )
        transport = self._transport()
        self._finish()
        if transport is not None:
            transport.loseConnection()
            grace = self.hub.config.stall_timeout or 10.0
            self.hub.clock.callLater(grace, _abort_if_open, transport)

    def shutdown(self) -> None:
        """End the response cleanly."""
        self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.gone()
        request = self.request
        request.unregisterProducer()
        self.done.callback(None)
        if getattr(request, "channel", None) is not None and not request.finished:
            request.finish()

    def abort(self, reason: str) -> None:
        """Drop the connection at once."""
        self.log.info(
            "Dropping SSE subscriber {peer}: {reason}",
            peer=self._peer(),
            reason=reason,
        )
        self.gone()
        transport = self._transport()
        if transport is not None:
            transport.abortConnection()

    def _peer(self) -> str:
        address = self.request.getClientAddress()
        host, port = getattr(address, "host", "?"), getattr(address, "port", "")
        return f"{host}:{port}"

    def _transport(self) -> Any:
        channel = getattr(self.request, "channel", None)
        return getattr(channel, "transport", None)


def open_event_stream(request: Request, retry: int) -> None:
    """
    Send the headers and the opening bytes of an event stream at once, so
    that the client sees it open before the first event.
    """
    request.setHeader(b"Content-Type", b"text/event-stream")
    request.setHeader(b"Cache-Control", b"no-cache")
    request.setHeader(b"X-Accel-Buffering", b"no")
    request.write(sse_comment(b"ok") + b"retry: %d\n\n" % (retry,))
    channel = request.channel
    if isinstance(channel, HTTPChannel):
        # A stream is long-lived by design; the idle timeout is for
        # connections between requests.
        channel.setTimeout(None)


def cancel_call(result: object, call: IDelayedCall) -> object:
    """Cancel C{call} if it is still pending; pass C{result} on."""
    if call.active():
        call.cancel()
    return result


def _abort_if_open(transport: Any) -> None:
    if getattr(transport, "connected", False):
        transport.abortConnection()
