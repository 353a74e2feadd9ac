"""
Real peers for the browser tests (the broker comes from conftest.py): a
page server of another origin that collects what its page reports, a TCP
proxy the test can cut, headless Chromium, and L{DevTools}, a small
synchronous client of the DevTools protocol written with the standard
library.

Everything listens on 127.0.0.1 and is started and ended by the test that
uses it. Every wait has a deadline, so a broken peer fails a test instead of
hanging it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

PAGES = Path(__file__).resolve().parent / "browser"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
DEVTOOLS_WAIT = 15.0

Report = dict[str, Any]


def find_chromium() -> str | None:
    """Return the Chromium to drive: C{$CHROMIUM}, else C{chromium} on PATH."""
    return shutil.which(os.environ.get("CHROMIUM") or "chromium")


def publish(base_url: str, topic: str, payload: object) -> dict[str, Any]:
    """POST C{payload} as JSON to C{topic}; return the broker's answer."""
    request = urllib.request.Request(
        f"{base_url}/api/topics/{topic}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    # No proxy from the environment: the broker is on 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        answer: dict[str, Any] = json.load(response)
    return answer


class _Collector(BaseHTTPRequestHandler):
    server: PageServer

    def do_GET(self) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        page = PAGES / name
        if name != "page.html" or not page.is_file():
            self._answer(404, b"not found\n", "text/plain")
            return
        self._answer(200, page.read_bytes(), "text/html; charset=utf-8")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path != "/result":
            self._answer(404, b"not found\n", "text/plain")
            return
        self.server.add_report(json.loads(body))
        self._answer(204, b"", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


class PageServer(ThreadingHTTPServer):
    """
    Serves tests/browser/page.html from its own origin and collects what
    the page reports to C{POST /result}.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Collector)
        self.port = self.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self._reports: list[Report] = []
        self._changed = threading.Condition()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def page_url(self, **query: str) -> str:
        """The address of the test page, asked to open what C{query} names."""
        return f"{self.origin}/page.html?{urlencode(query)}"

    def add_report(self, report: Report) -> None:
        """Keep one report of the page and wake the waiting test."""
        with self._changed:
            self._reports.append(report)
            self._changed.notify_all()

    def reports(self) -> list[Report]:
        """Every report so far, in the order the page made them."""
        with self._changed:
            return sorted(self._reports, key=lambda report: report["seq"])

    def wait_for(
        self,
        done: Callable[[list[Report]], bool],
        timeout: float,
        what: str,
    ) -> list[Report]:
        """
        Wait until C{done} holds for the page's reports; return them.

        @raise AssertionError: if C{timeout} seconds pass first.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(reports := self.reports()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out waiting for {what}; the page reported:\n"
                        + "\n".join(json.dumps(report) for report in reports)
                    )
                self._changed.wait(left)
        return reports

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        self.shutdown()
        self.server_close()


def header(head: str, name: str) -> str | None:
    """The value of header C{name} (lower case) in a request head, if any."""
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def events(reports: list[Report], source: str, kind: str) -> list[Report]:
    """The reports of one source and kind, in the page's order."""
    return [r for r in reports if r["source"] == source and r["kind"] == kind]


class CuttableProxy:
    """
    A TCP proxy from a port of 127.0.0.1 to the broker, which the test can
    cut: L{cut} drops every open connection and holds new ones until
    L{restore}. It keeps the head of every request it forwards.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.request_heads: list[str] = []
        self._open = threading.Event()
        self._open.set()
        self._closing = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        while not self._open.wait(0.1):
            if self._closing:
                break
        if self._closing:
            client.close()
            return
        upstream = socket.create_connection(self.upstream, timeout=10)
        upstream.settimeout(None)
        with self._lock:
            self._sockets.update((client, upstream))
        threading.Thread(
            target=self._pump, args=(upstream, client, False), daemon=True
        ).start()
        self._pump(client, upstream, True)

    def _pump(self, source: socket.socket, sink: socket.socket, keep: bool) -> None:
        head = b""
        try:
            while data := source.recv(65536):
                if keep and b"\r\n\r\n" not in head:
                    head += data
                    if b"\r\n\r\n" in head:
                        self._keep_head(head)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source, sink)

    def _keep_head(self, data: bytes) -> None:
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        with self._lock:
            self.request_heads.append(head)

    def _drop(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with self._lock:
                self._sockets.discard(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut(self) -> None:
        """Drop every open connection; hold new ones until L{restore}."""
        self._open.clear()
        with self._lock:
            sockets = list(self._sockets)
        self._drop(*sockets)

    def restore(self) -> None:
        """Forward connections again, the held ones first."""
        self._open.set()

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._closing = True
        self.listener.close()
        self.cut()


class Chromium:
    """Headless Chromium showing one page, in a fresh profile."""

    def __init__(self, binary: str, profile: Path, url: str) -> None:
        self.output = profile.with_suffix(".log")
        command = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            url,
        ]
        with open(self.output, "wb") as output:
            # A session of its own, so that its helper processes end with it.
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def close(self) -> None:
        """End the browser and its helper processes, by their group id."""
        group = self.process.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
            if _group_gone(group, timeout=5):
                break
        if self.process.poll() is None:
            self.process.wait(timeout=5)


def _group_gone(group: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@contextmanager
def browser(binary: str, profile: Path, url: str) -> Iterator[Chromium]:
    """Run Chromium on C{url} for the duration of the block."""
    chromium = Chromium(binary, profile, url)
    try:
        yield chromium
    finally:
        chromium.close()


# Headless Chromium over the DevTools protocol


class DevTools:
    """
    A synchronous DevTools protocol client on one page target: commands,
    and the events that arrive meanwhile (console calls, exceptions, log
    entries), over a WebSocket written with the standard library.
    """

    def __init__(self, url: str, timeout: float = DEVTOOLS_WAIT) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection(
            (parts.hostname, parts.port), timeout=timeout
        )
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._next_id = 0
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall(
            (
                f"GET {parts.path} HTTP/1.1\r\n"
                f"Host: {parts.hostname}:{parts.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode("ascii")
        )
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self._recv()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("DevTools closed the connection")
        return data

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._buffer += self._recv()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _message(self) -> dict[str, Any]:
        payload = b""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
            payload += self._read(length)
            if first & 0x80:
                result: dict[str, Any] = json.loads(payload)
                return result

    def _send_frame(self, text: str) -> None:
        payload = text.encode("utf-8")
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x81, 0x80 | length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one command; return its result, keeping the events meanwhile."""
        self._next_id += 1
        number = self._next_id
        self._send_frame(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = self._message()
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page; return its value."""
        result = self.send(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(
        self, expression: str, what: str, timeout: float = DEVTOOLS_WAIT
    ) -> Any:
        """Evaluate C{expression} until it is truthy; fail after C{timeout}."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.evaluate(expression)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {found!r}")
            time.sleep(0.1)

    def navigate(self, url: str) -> None:
        """Load C{url} and wait for its load event."""
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", f"{url} to load")

    def errors(self) -> list[str]:
        """Every JavaScript error the page has reported so far."""
        self.evaluate("0")
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description", ""))
            elif method == "Runtime.consoleAPICalled" and params["type"] in (
                "error",
                "assert",
            ):
                found.append(json.dumps(params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def screenshot(self, *paths: Path) -> None:
        """Save a PNG of the page to each of C{paths}."""
        data = base64.b64decode(self.send("Page.captureScreenshot")["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


def no_proxy_get(url: str) -> Any:
    """GET C{url}, bypassing any proxy; return its JSON body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return json.load(response)
