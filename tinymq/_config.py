"""
The broker's settings, and how they are read.

Each setting has one name. On the command line it is ``--name-with-dashes``,
in the environment ``TINYMQ_NAME_WITH_UNDERSCORES``, and in the optional TOML
config file ``name_with_underscores = value``. The command line wins over the
environment, which wins over the file, which wins over the default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

POLICIES = ("disconnect", "latest")


def _positive_int(text: object) -> int:
    value = int(str(text))
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive_float(text: object) -> float:
    value = float(str(text))
    if not 0 <= value < float("inf"):
        raise ValueError("must be a number, 0 or more")
    return value


def _boolean(text: object) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _origins(text: object) -> tuple[str, ...]:
    if isinstance(text, (list, tuple)):
        items = [str(item) for item in text]
    else:
        items = str(text).replace(",", " ").split()
    origins = tuple(item.rstrip("/") for item in items if item)
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ValueError(f"{origin!r} is not an origin: write scheme://host[:port]")
    return origins


def _words(text: object) -> tuple[str, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(str(item) for item in text)
    return tuple(str(text).replace(",", " ").split())


def _optional(text: object) -> str | None:
    value = str(text).strip()
    return value or None


def _log_format(text: object) -> str:
    value = str(text).strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be 'text' or 'json'")
    return value


def _policy(text: object) -> str:
    value = str(text).strip().lower()
    if value not in POLICIES:
        raise ValueError("must be one of " + ", ".join(POLICIES))
    return value


def _setting(default: Any, parse: Callable[[object], Any], help: str) -> Any:
    return dataclasses.field(default=default, metadata={"parse": parse, "help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a TinyMQ server, with its default."""

    port: str = _setting(
        "tcp:7800",
        str,
        "Port number or Twisted endpoint description to listen on.",
    )
    max_message_size: int = _setting(
        1024 * 1024, _positive_int, "Largest message body accepted, in bytes."
    )
    heartbeat: float = _setting(
        15.0, _positive_float, "Seconds between SSE heartbeat comments."
    )
    cors_origins: tuple[str, ...] = _setting(
        ("*",),
        _origins,
        "Origins allowed for CORS and WebSockets, space- or comma-separated; "
        "'*' allows any.",
    )
    sse_retry: int = _setting(
        2000,
        _positive_int,
        "Milliseconds a browser waits before reconnecting an SSE stream.",
    )
    history_size: int = _setting(
        100, _positive_int, "Messages kept per topic for resume and 'last'."
    )
    history_ttl: float = _setting(
        3600.0, _positive_float, "Seconds a message is kept in history."
    )
    history_bytes: int = _setting(
        64 * 1024 * 1024,
        _positive_int,
        "Bytes of payload kept in history across all topics.",
    )
    backlog_bytes: int = _setting(
        1024 * 1024,
        _positive_int,
        "Bytes held for one paused (slow) subscriber before the policy acts.",
    )
    backlog_messages: int = _setting(
        10000,
        _positive_int,
        "Messages held for one paused (slow) subscriber before the policy acts.",
    )
    slow_policy: str = _setting(
        "disconnect",
        _policy,
        "What to do with a subscriber whose backlog is full: 'disconnect' or 'latest'.",
    )
    client_policy: bool = _setting(
        True,
        _boolean,
        "Let subscribers choose their own slow-consumer policy and max_rate.",
    )
    stall_timeout: float = _setting(
        60.0,
        _positive_float,
        "Seconds a subscriber may read nothing while data waits for it.",
    )
    send_buffer: int = _setting(
        262144,
        _positive_int,
        "Kernel send buffer of each connection, in bytes (SO_SNDBUF), so a "
        "client that stops reading holds a bounded amount of kernel memory; "
        "0 leaves it to the kernel.",
    )
    max_topics: int = _setting(100000, _positive_int, "Topics that may exist at once.")
    max_subscriptions: int = _setting(
        100, _positive_int, "Topics or patterns one connection may follow."
    )

    auth_keys: str | None = _setting(
        None,
        _optional,
        "TOML file of API keys and the topic patterns each may publish and "
        "subscribe to; turns authentication on.",
    )
    jwt_secret: str | None = _setting(
        None,
        _optional,
        "HS256 secret for JWTs; turns authentication on. Prefer the "
        "environment variable TINYMQ_JWT_SECRET to the command line.",
    )
    jwt_public_key: str | None = _setting(
        None,
        _optional,
        "PEM file of the public key that verifies RS256/ES256 JWTs; turns "
        "authentication on.",
    )
    jwt_audience: str | None = _setting(
        None, _optional, "Required 'aud' claim of JWTs, if any."
    )
    jwt_issuer: str | None = _setting(
        None, _optional, "Required 'iss' claim of JWTs, if any."
    )
    auth_cookie: str = _setting("tinymq_token", str, "Cookie that may carry the token.")
    cors_credentials: bool = _setting(
        False,
        _boolean,
        "Allow credentialed CORS requests (cookies) from the allowed "
        "origins; needs an explicit origin list.",
    )
    max_connections: int = _setting(50000, _positive_int, "Open connections in total.")
    max_connections_per_address: int = _setting(
        1000,
        _positive_int,
        "Open connections from one client address (trusted addresses are "
        "exempt); 0 turns the limit off.",
    )
    publish_rate: float = _setting(
        1000.0,
        _positive_float,
        "Publishes per second allowed per API key, per JWT subject, or else "
        "per client address (trusted addresses are exempt); 0 turns the "
        "limit off.",
    )
    publish_burst: int = _setting(
        2000, _positive_int, "Publishes allowed in a burst above the rate."
    )
    trusted_addresses: tuple[str, ...] = _setting(
        ("127.0.0.1", "::1"),
        _words,
        "Client addresses exempt from the per-address limits.",
    )
    max_header_size: int = _setting(
        16384, _positive_int, "Bytes of request line and headers accepted."
    )
    header_timeout: float = _setting(
        10.0,
        _positive_float,
        "Seconds a client has to send its request headers.",
    )
    body_timeout: float = _setting(
        30.0,
        _positive_float,
        "Seconds a client has to send a request body once its headers are in.",
    )
    access_log: bool = _setting(
        False, _boolean, "Log one line per HTTP request, in combined format."
    )
    log_format: str = _setting(
        "text", _log_format, "Log format: 'text' or 'json' (one object a line)."
    )
    console: bool = _setting(
        True, _boolean, "Serve the live web console at / and /console."
    )
    metrics: bool = _setting(True, _boolean, "Serve Prometheus metrics at /metrics.")
    metrics_topics: int = _setting(
        50,
        _positive_int,
        "Topics with their own metric series; the rest are summed.",
    )

    @classmethod
    def settings(cls) -> list[dataclasses.Field[Any]]:
        """Return the description of every setting."""
        return list(dataclasses.fields(cls))

    @classmethod
    def load(
        cls,
        given: Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
        path: str | None = None,
    ) -> Config:
        """
        Build a config from command-line values, the environment and a
        config file, in that order of precedence.

        @raise ValueError: if a value does not parse; the message names the
            setting and where it came from.
        """
        if environ is None:
            environ = os.environ
        if path is None:
            path = (given or {}).get("config") or environ.get("TINYMQ_CONFIG")  # type: ignore[assignment]

        file_values: dict[str, object] = {}
        if path:
            with open(str(path), "rb") as config_file:
                try:
                    file_values = tomllib.load(config_file)
                except tomllib.TOMLDecodeError as error:
                    raise ValueError(f"{path}: {error}") from None
            unknown = set(file_values) - {f.name for f in cls.settings()}
            if unknown:
                raise ValueError(
                    f"{path}: unknown settings: {', '.join(sorted(unknown))}"
                )

        values: dict[str, object] = {}
        for field in cls.settings():
            env_name = "TINYMQ_" + field.name.upper()
            sources = [
                ("--" + field.name.replace("_", "-"), (given or {}).get(field.name)),
                (env_name, environ.get(env_name)),
                (f"{path}: {field.name}", file_values.get(field.name)),
            ]
            for where, raw in sources:
                if raw is None:
                    continue
                try:
                    values[field.name] = field.metadata["parse"](raw)
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
                break
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.cors_credentials and "*" in self.cors_origins:
            raise ValueError(
                "--cors-credentials needs an explicit list of --cors-origins, not '*'"
            )

    def origin_allowed(self, origin: str, host: str | None = None) -> bool:
        """
        Tell whether a browser page from C{origin} may use the broker; a
        page served by the broker itself, at C{host}, always may.
        """
        origin = origin.rstrip("/")
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        return host is not None and origin in (f"http://{host}", f"https://{host}")
