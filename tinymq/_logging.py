"""
Access logs and JSON logs.

An access log line is a twisted.logger event in the namespace
C{tinymq.access}; its fields are those of the combined log format, and its
text is one combined-format line. A C{token} in the query string (the way
browsers that cannot set headers send credentials) is written as C{***}.

With C{--log-format json} every event, the broker's and Twisted's, is
written as one JSON object per line: C{time}, C{level}, C{namespace},
C{message}, then the event's own fields.
"""

# twisted.web and twisted.python.logfile have no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, Logger, formatEvent
from twisted.python.logfile import LogFile
from twisted.web.http import datetimeToLogString
from twisted.web.server import Request
from zope.interface import implementer

from ._auth import redact_query

access_log = Logger(namespace="tinymq.access")

_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\]')


def _escape(value: str) -> str:
    """Escape a field of a log line: no quote, backslash or control."""
    escaped = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    return escaped.encode("ascii", "backslashreplace").decode("ascii") or "-"


def _text(value: bytes | None) -> str:
    if value is None:
        return "-"
    return value.decode("utf-8", "backslashreplace")


def access_fields(request: Request) -> dict[str, Any]:
    """
    Return the fields of the access log event of C{request}, as they are,
    with the token redacted; L{combined_line} escapes them for the line.
    """
    address = request.getClientAddress()
    referrer = request.getHeader(b"referer")
    return {
        "peer": str(getattr(address, "host", "-")),
        "method": _text(request.method),
        "uri": _text(redact_query(request.uri)),
        "protocol": _text(request.clientproto),
        "status": int(request.code),
        "size": int(request.sentLength),
        "referrer": _text(redact_query(referrer) if referrer else None),
        "agent": _text(request.getHeader(b"user-agent")),
    }


def combined_line(fields: dict[str, Any], now: float) -> str:
    """Return the access log fields as one line in the combined format."""
    peer, method, uri = fields["peer"], fields["method"], fields["uri"]
    protocol, status, size = fields["protocol"], fields["status"], fields["size"]
    return (
        f"{_escape(peer)} - - {datetimeToLogString(now)} "
        f'"{_escape(method)} {_escape(uri)} {_escape(protocol)}" '
        f"{status} {size or '-'} "
        f'"{_escape(fields["referrer"])}" "{_escape(fields["agent"])}"'
    )


def log_access(request: Request, now: float | None = None) -> None:
    """Log one combined-format line for a finished request."""
    fields = access_fields(request)
    line = combined_line(fields, time.time() if now is None else now)
    # log_text, as Twisted's bridge for old-style log calls names it: the
    # text of the event, while the fields stay as they are for JSON logs.
    access_log.info("{log_text}", log_text=line, **fields)


# JSON logs


def _json_value(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    return repr(value)


def event_as_json(event: LogEvent) -> str:
    """
    Return an event as one line of JSON: C{time} (ISO 8601, UTC),
    C{level}, C{namespace}, C{message}, then the event's own fields.
    """
    when = datetime.fromtimestamp(event.get("log_time") or time.time(), UTC)
    level = event.get("log_level")
    record: dict[str, object] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    for key, value in event.items():
        if key not in record and not key.startswith("log_") and key not in _LEGACY:
            record[key] = _json_value(value)
    return json.dumps(record, ensure_ascii=False)


# Keys of events from twisted.python.log that only repeat the text.
_LEGACY = frozenset({"format", "isError", "why"})


@implementer(ILogObserver)
class JSONLogObserver:
    """Writes each event to a text file as one line of JSON."""

    def __init__(self, output: IO[str]) -> None:
        self.output = output

    def __call__(self, event: LogEvent) -> None:
        self.output.write(event_as_json(event) + "\n")
        self.output.flush()


_destination: dict[str, str | None] = {"logfile": None}


def json_log_observer() -> JSONLogObserver:
    """
    Make the JSON observer for twistd: to standard output when twistd
    would log there, otherwise to its log file.

    twistd calls this, as it would a C{--logger}, after L{use_json_log}.
    """
    logfile = _destination["logfile"]
    if logfile is None:
        return JSONLogObserver(sys.stdout)
    return JSONLogObserver(LogFile.fromFullPath(logfile))


def use_json_log(server_options: MutableMapping[str, Any] | None) -> None:
    """
    Ask twistd to log in JSON, unless its own C{--logger} was given.

    C{server_options} are twistd's options, the parent of the plugin's;
    twistd reads C{logger} from them after the plugin's options are parsed.
    """
    if server_options is None or server_options.get("logger"):
        return
    logfile = server_options.get("logfile")
    nodaemon = server_options.get("nodaemon")
    if logfile == "-" or (not logfile and nodaemon):
        _destination["logfile"] = None
    else:
        _destination["logfile"] = logfile or "twistd.log"
    server_options["logger"] = f"{__name__}.{json_log_observer.__name__}"
