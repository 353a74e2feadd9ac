"""
End-to-end tests of a clean stop: SIGTERM to a real broker with clients
connected.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import pytest
import pytest_twisted

from tests.conftest import Broker
from tests.e2e import open_sse, open_ws, publish, wait_until, ws_command

pytestmark = pytest.mark.e2e


@pytest_twisted.ensureDeferred
async def test_sigterm_ends_every_stream_cleanly(
    broker_factory: Callable[..., Broker],
) -> None:
    """On SIGTERM, SSE bodies end with the last chunk and WebSockets get 1001."""
    broker = broker_factory()
    stream = await open_sse(broker.port, "/api/topics/stop.topic/sse")
    socket = await open_ws(broker.port, "/api/topics/stop.topic/ws")
    commands = await open_ws(broker.port, "/ws")
    await ws_command(commands, {"type": "subscribe", "topic": "stop.>"})
    reply = await publish(broker.base_url, "stop.topic", json.dumps({"n": 1}))
    await wait_until(
        lambda: stream.events and socket.messages and len(commands.messages) == 2,
        "the message on every connection",
    )

    broker.signal(signal.SIGTERM)
    await wait_until(
        lambda: stream.closed and socket.closed and commands.closed,
        "the broker to close every connection",
    )
    await wait_until(lambda: broker.process.poll() is not None, "the broker to exit")
    log = broker.log()

    assert stream.data() == ['{"n": 1}']
    assert stream.complete is True
    assert stream.raw.endswith(b"\r\n0\r\n\r\n")
    assert socket.messages == ['{"n": 1}']
    assert (socket.close_code, commands.close_code) == (1001, 1001)
    assert commands.json_messages()[1]["id"] == reply.json()["id"]
    assert socket.protocol_errors == commands.protocol_errors == []
    # twistd stops cleanly, then ends with the signal it was sent, as a
    # Unix daemon should: the exit status is "killed by SIGTERM".
    assert broker.process.returncode == -signal.SIGTERM
    assert "Traceback" not in log
    assert "Unhandled" not in log
