"""
A write path for fan-out that skips the reactor when it can.

Twisted's TCP transport buffers every write and sends it on the next reactor
iteration, which costs two epoll_ctl calls and a wake-up per connection per
write. For fan-out to thousands of sockets that dominates. When nothing is
buffered on the transport, the writer returned here sends at once, as libuv
does, and hands only what the kernel did not take to the transport, which
then keeps order and applies flow control as usual.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp


def writer_for(transport: Any) -> Callable[[bytes], None]:
    """
    Return a function that writes bytes to C{transport}, sending directly on
    its socket when the transport has nothing buffered.
    """
    write: Callable[[bytes], None] = transport.write
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return write
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket) or not hasattr(transport, "dataBuffer"):
        return write
    send = sock.send

    def write_now(data: bytes) -> None:
        if (
            transport.dataBuffer
            or transport._tempDataLen
            or not transport.connected
            or transport.disconnecting
        ):
            write(data)
            return
        try:
            sent = send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let the transport meet the error and report the lost
            # connection the usual way.
            sent = 0
        if sent < len(data):
            write(data[sent:])

    return write_now
