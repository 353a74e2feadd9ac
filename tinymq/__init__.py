"""TinyMQ: publish with one HTTP POST, receive live over SSE and WebSocket."""

__version__ = "0.1.0"
