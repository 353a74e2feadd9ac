"""
TinyMQ's fan-out benchmark: many subscribers, one JSON line of results.

It starts a broker pinned to one core (or targets a given URL), opens the
subscribers over SSE or WebSocket in worker processes pinned to another
core, publishes at a fixed rate or as fast as a window of in-flight POSTs
allows, waits until every delivery arrived (or stopped arriving), and
prints one JSON line. Unless told otherwise it then runs the same load
against C{bench/baseline_server.py}, a broadcast server in pure Twisted,
and adds its figures and TinyMQ's ratios to them. See bench/README.md.

Only the standard library and the project's dependencies are needed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_STAMP = struct.Struct("qq")
_PAYLOAD = re.compile(rb'\{"seq":(\d+),"ts":(\d+),"topic":(\d+),"acked":(\d+),')


# The load: what every subscriber and publisher knows about the run.


@dataclass
class Load:
    """The shape of one run, shared with the worker processes."""

    host: str
    port: int
    prefix: str
    proto: str
    subscribers: int
    topics: int
    rate: float
    window: int
    duration: float
    size: int
    procs: int
    client_cpus: set[int]
    connect_timeout: float = 60.0
    settle: float = 1.0
    drain_idle: float = 3.0
    drain_max: float = 30.0

    def topic(self, index: int) -> str:
        return f"{self.prefix}{index}"

    def sub_path(self, index: int) -> str:
        return f"/api/topics/{self.topic(index)}/{self.proto}"


def pin(cpus: set[int]) -> None:
    """Keep this process on C{cpus}, when there are such cores."""
    usable = cpus & set(range(os.cpu_count() or 1))
    if usable:
        os.sched_setaffinity(0, usable)


def raise_nofile() -> None:
    """Let this process open as many sockets as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# Subscriber side: one Reader per connection, many per worker process.

# Every subscriber of a topic receives the same bytes, so an event is parsed
# once per process and then looked up by its bytes.
_PARSED: dict[bytes, tuple[int, int, int, int] | None] = {}


def parse_payload(data: bytes) -> tuple[int, int, int, int] | None:
    """Return (seq, sent_ns, topic, acked) from a benchmark payload."""
    found = _PARSED.get(data, False)
    if found is not False:
        return found
    match = _PAYLOAD.search(data)
    parsed = tuple(map(int, match.groups())) if match else None
    if len(_PARSED) > 8192:
        _PARSED.clear()
    _PARSED[data] = parsed
    return parsed


def sse_data(block: bytes) -> bytes | None:
    """Return the data of one SSE event (lines joined by LF), or None."""
    data = None
    for line in block.split(b"\n"):
        if line.startswith(b"data"):
            name, _, value = line.partition(b":")
            if name != b"data":
                continue
            value = value[1:] if value[:1] == b" " else value
            data = value if data is None else data + b"\n" + value
    return data


class Stats:
    """What the subscribers of one worker process saw."""

    def __init__(self) -> None:
        self.latency_us = array("I")
        self.unique = 0
        self.duplicated = 0
        self.out_of_order = 0
        self.reordered_concurrent = 0
        self.foreign = 0
        self.wrong_topic = 0
        self.disconnects = 0
        self.last_ns = 0
        self.stopping = False


class Reader:
    """
    One subscriber connection after its handshake: reads with the kernel's
    receive stamp, undoes chunked framing, splits SSE events or WebSocket
    frames, and checks each message's sequence number.
    """

    _view = memoryview(bytearray(1 << 18))

    def __init__(
        self, sock: socket.socket, stats: Stats, topic: int, proto: str, chunked: bool
    ) -> None:
        self.sock = sock
        self.stats = stats
        self.topic = topic
        self.sse = proto == "sse"
        self.chunked = chunked
        self.raw = b""
        self.chunk_left = 0
        self.buffer = b""
        self.high = 0
        self.gaps: set[int] = set()
        self.acked = 0

    def readable(self) -> None:
        try:
            size, ancillary, _, _ = self.sock.recvmsg_into([self._view], 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size, ancillary = 0, []
        if not size:
            self.close()
            return
        stamp = 0
        for _, kind, value in ancillary:
            if kind == SO_TIMESTAMPNS:
                seconds, nanos = _STAMP.unpack(value[:16])
                stamp = seconds * 1_000_000_000 + nanos
        self.feed(bytes(self._view[:size]), stamp or time.time_ns())

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        if not self.stats.stopping:
            self.stats.disconnects += 1

    def feed(self, data: bytes, stamp: int) -> None:
        if self.chunked:
            data = self.dechunk(data)
        if self.sse:
            self.feed_sse(data, stamp)
        else:
            self.feed_ws(data, stamp)

    def dechunk(self, data: bytes) -> bytes:
        raw = self.raw + data if self.raw else data
        out = []
        pos = 0
        while pos < len(raw):
            if self.chunk_left:
                piece = raw[pos : pos + self.chunk_left]
                out.append(piece)
                pos += len(piece)
                self.chunk_left -= len(piece)
                continue
            end = raw.find(b"\r\n", pos)
            if end < 0:
                break
            if end == pos:
                pos += 2
                continue
            size = int(raw[pos:end].split(b";")[0], 16)
            pos = end + 2
            self.chunk_left = size
        self.raw = raw[pos:]
        return b"".join(out)

    def feed_sse(self, data: bytes, stamp: int) -> None:
        buffer = self.buffer + data if self.buffer else data
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):
                self.buffer = buffer
                return
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        blocks = buffer.split(b"\n\n")
        self.buffer = blocks.pop()
        for block in blocks:
            parsed = _PARSED.get(block, False)
            if parsed is False:
                payload = sse_data(block)
                parsed = parse_payload(payload) if payload is not None else None
                _PARSED[block] = parsed
            if parsed is not None:
                self.got(parsed, stamp)
            elif block and not block.startswith(b":") and b"data" in block:
                self.stats.foreign += 1

    def feed_ws(self, data: bytes, stamp: int) -> None:
        buffer = self.buffer + data if self.buffer else data
        pos = 0
        end_of_data = len(buffer)
        while end_of_data - pos >= 2:
            opcode = buffer[pos] & 0x0F
            length = buffer[pos + 1] & 0x7F
            head = 2
            if length == 126:
                head = 4
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
            elif length == 127:
                head = 10
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
            if pos + head + length > end_of_data:
                break
            payload = buffer[pos + head : pos + head + length]
            pos += head + length
            if opcode in (1, 2):
                parsed = parse_payload(payload)
                if parsed is None:
                    self.stats.foreign += 1
                else:
                    self.got(parsed, stamp)
            elif opcode == 9:
                self.sock.send(ws_client_frame(10, payload))
            elif opcode == 8:
                self.close()
                return
        self.buffer = buffer[pos:]

    def got(self, parsed: tuple[int, int, int, int], stamp: int) -> None:
        seq, sent, topic, acked = parsed
        stats = self.stats
        if topic != self.topic:
            stats.wrong_topic += 1
            return
        stats.latency_us.append(max(0, stamp - sent) // 1000)
        stats.last_ns = max(stats.last_ns, stamp)
        if seq > self.high:
            if seq > self.high + 1:
                self.gaps.update(range(self.high + 1, seq))
            self.high = seq
            stats.unique += 1
        elif seq in self.gaps:
            # It arrived after a later message. That is a broker fault only
            # if its POST had been answered before the later one was sent.
            self.gaps.discard(seq)
            stats.unique += 1
            if seq <= self.acked:
                stats.out_of_order += 1
            else:
                stats.reordered_concurrent += 1
        else:
            stats.duplicated += 1
        if acked > self.acked:
            self.acked = acked


def ws_client_frame(opcode: int, payload: bytes) -> bytes:
    """Encode a masked client frame (payloads under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


async def subscribe(
    load: Load, topic: int, stats: Stats, gate: asyncio.Semaphore
) -> Reader:
    """Open one subscriber and return its reader once the stream is open."""
    loop = asyncio.get_running_loop()
    path = load.sub_path(topic)
    request = f"GET {path} HTTP/1.1\r\nHost: {load.host}:{load.port}\r\n"
    key = b""
    if load.proto == "sse":
        request += "Accept: text/event-stream\r\n"
    else:
        key = base64.b64encode(os.urandom(16))
        request += (
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        )
    async with gate:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:
            await loop.sock_connect(sock, (load.host, load.port))
            await loop.sock_sendall(sock, (request + "\r\n").encode())
            head = b""
            while b"\r\n\r\n" not in head:
                more = await loop.sock_recv(sock, 65536)
                if not more:
                    raise ConnectionError("closed during the handshake")
                head += more
        except BaseException:
            sock.close()
            raise
    head, _, rest = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status != (200 if load.proto == "sse" else 101):
        sock.close()
        raise ConnectionError(f"HTTP {status}")
    if key:
        digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        if headers.get("sec-websocket-accept") != base64.b64encode(digest).decode():
            sock.close()
            raise ConnectionError("bad Sec-WebSocket-Accept")
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    reader = Reader(sock, stats, topic, load.proto, chunked)
    if rest:
        reader.feed(rest, time.time_ns())
    loop.add_reader(sock.fileno(), reader.readable)
    return reader


def worker(load: Load, subscribers: list[int], pipe: Any) -> None:
    """Run the subscribers C{subscribers} until the main process says stop."""
    pin(load.client_cpus)
    raise_nofile()
    asyncio.run(_work(load, subscribers, pipe))


async def _work(load: Load, subscribers: list[int], pipe: Any) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    gate = asyncio.Semaphore(200)
    attempts = [
        asyncio.wait_for(
            subscribe(load, index % load.topics, stats, gate), load.connect_timeout
        )
        for index in subscribers
    ]
    outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    readers = [o for o in outcomes if isinstance(o, Reader)]
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            kind = type(outcome).__name__ + (f": {outcome}" if str(outcome) else "")
            errors[kind[:80]] = errors.get(kind[:80], 0) + 1
    per_topic = [0] * load.topics
    for reader in readers:
        per_topic[reader.topic] += 1
    pipe.send(("ready", per_topic, errors))

    done = loop.create_future()

    def command() -> None:
        what = pipe.recv()
        if what == "count":
            pipe.send((stats.unique, stats.last_ns))
        elif what == "stop":
            stats.stopping = True
            done.set_result(None)

    loop.add_reader(pipe.fileno(), command)
    await done
    loop.remove_reader(pipe.fileno())
    result = {
        name: getattr(stats, name)
        for name in (
            "unique",
            "duplicated",
            "out_of_order",
            "reordered_concurrent",
            "foreign",
            "wrong_topic",
            "disconnects",
            "last_ns",
        )
    }
    result["latency_us"] = stats.latency_us.tobytes()
    pipe.send(result)
    for reader in readers:
        if reader.sock.fileno() >= 0:
            loop.remove_reader(reader.sock.fileno())
            reader.sock.close()


# Publisher side: persistent HTTP/1.1 connections, one POST in flight each.


@dataclass
class Published:
    """The publisher's counts."""

    ok: list[int]
    errors: dict[str, int] = field(default_factory=dict)
    late: int = 0
    first_ns: int = 0
    end_ns: int = 0


class Publisher:
    """Publishes sequence-numbered payloads of exactly C{load.size} bytes."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.sent = [0] * load.topics
        self.answered: list[set[int]] = [set() for _ in range(load.topics)]
        self.acked = [0] * load.topics
        self.result = Published(ok=[0] * load.topics)
        self.idle: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()

    def body(self, topic: int, seq: int) -> bytes:
        head = b'{"seq":%d,"ts":%d,"topic":%d,"acked":%d,"pad":"' % (
            seq,
            time.time_ns(),
            topic,
            self.acked[topic],
        )
        return head + b"x" * max(0, self.load.size - len(head) - 2) + b'"}'

    async def post(self, connection: tuple[Any, Any], topic: int) -> None:
        reader, writer = connection
        self.sent[topic] += 1
        seq = self.sent[topic]
        body = self.body(topic, seq)
        if not self.result.first_ns:
            self.result.first_ns = time.time_ns()
        writer.write(
            b"POST /api/topics/%s HTTP/1.1\r\nHost: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (
                self.load.topic(topic).encode(),
                self.load.host.encode(),
                len(body),
                body,
            )
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        await self.skip_body(reader, head)
        if 200 <= status < 300:
            self.result.ok[topic] += 1
        else:
            self.result.errors[str(status)] = self.result.errors.get(str(status), 0) + 1
        answered = self.answered[topic]
        answered.add(seq)
        while self.acked[topic] + 1 in answered:
            self.acked[topic] += 1
            answered.discard(self.acked[topic])

    @staticmethod
    async def skip_body(reader: asyncio.StreamReader, head: bytes) -> None:
        """Read a response body framed by Content-Length or chunks."""
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if length:
            await reader.readexactly(int(length.group(1)))
            return
        if not re.search(rb"(?i)\r\ntransfer-encoding:[^\r]*chunked", head):
            return
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if not size:
                await reader.readuntil(b"\r\n")
                return
            await reader.readexactly(size + 2)

    async def run(self) -> Published:
        load = self.load
        connections = [
            await asyncio.open_connection(load.host, load.port)
            for _ in range(load.window)
        ]
        start = time.monotonic()
        stop = start + load.duration
        if load.rate > 0:
            await self._at_rate(connections, start, stop)
        else:
            await asyncio.gather(*(self._flat_out(c, stop) for c in connections))
        self.result.end_ns = time.time_ns()
        for _, writer in connections:
            writer.close()
        return self.result

    async def _flat_out(self, connection: tuple[Any, Any], stop: float) -> None:
        while time.monotonic() < stop:
            topic = sum(self.sent) % self.load.topics
            await self.post(connection, topic)

    async def _at_rate(self, connections: list[Any], start: float, stop: float) -> None:
        for connection in connections:
            self.idle.put_nowait(connection)
        pending = set()
        number = 0
        while True:
            due = start + number / self.load.rate
            if due >= stop:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            connection = await self.idle.get()
            if time.monotonic() - due > 0.005:
                self.result.late += 1
            task = asyncio.create_task(self._post_then_free(connection, number))
            pending.add(task)
            task.add_done_callback(pending.discard)
            number += 1
        if pending:
            await asyncio.gather(*pending)

    async def _post_then_free(self, connection: Any, number: int) -> None:
        try:
            await self.post(connection, number % self.load.topics)
        finally:
            self.idle.put_nowait(connection)


# Measuring the server through /proc.


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU seconds of process C{pid} so far."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_kb(pid: int | None, name: str) -> int:
    """A C{VmRSS}/C{VmHWM} line of C{/proc/<pid>/status}, in KiB."""
    if not pid:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy (not idle, not waiting on I/O)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / TICKS


async def sample_rss(pid: int | None, peak: list[int]) -> None:
    """Keep the highest RSS seen, every 100 ms, until cancelled."""
    while True:
        peak[0] = max(peak[0], memory_kb(pid, "VmRSS"))
        await asyncio.sleep(0.1)


# One run against one server.


def percentile(ordered: list[int], fraction: float) -> float:
    """The value below which C{fraction} of C{ordered} falls, in ms."""
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, int(fraction * len(ordered)))
    return round(ordered[index] / 1000, 2)


def run_load(load: Load, pid: int | None) -> dict[str, Any]:
    """Subscribe, publish, drain and measure; return the figures."""
    rss_before = memory_kb(pid, "VmRSS")
    context = multiprocessing.get_context("fork")
    workers = []
    for number in range(load.procs):
        ours, theirs = context.Pipe()
        shares = list(range(number, load.subscribers, load.procs))
        process = context.Process(target=worker, args=(load, shares, theirs))
        process.start()
        workers.append((process, ours))

    per_topic = [0] * load.topics
    connect_errors: dict[str, int] = {}
    started = time.monotonic()
    for _process, pipe in workers:
        if not pipe.poll(load.connect_timeout + 30):
            raise SystemExit("a subscriber process did not report")
        _, counts, errors = pipe.recv()
        per_topic = [a + b for a, b in zip(per_topic, counts, strict=True)]
        for kind, count in errors.items():
            connect_errors[kind] = connect_errors.get(kind, 0) + count
    connect_s = time.monotonic() - started
    time.sleep(load.settle)
    rss_connected = memory_kb(pid, "VmRSS")

    cpu_start = cpu_seconds(pid)
    harness_pids = [os.getpid()] + [p.pid for p, _ in workers]
    harness_start = sum(cpu_seconds(p) for p in harness_pids)
    busy_start = machine_busy_s()
    wall_start = time.monotonic()
    peak = [rss_connected]
    published = asyncio.run(_publish(load, pid, peak))
    harness_publish = sum(cpu_seconds(p) for p in harness_pids) - harness_start
    publish_wall = time.monotonic() - wall_start

    expected = sum(n * s for n, s in zip(published.ok, per_topic, strict=True))
    drain_start = time.monotonic()
    last_progress, last_count = drain_start, -1
    while True:
        received = 0
        for _, pipe in workers:
            pipe.send("count")
        for _, pipe in workers:
            received += pipe.recv()[0]  # unique deliveries so far
        peak[0] = max(peak[0], memory_kb(pid, "VmRSS"))
        now = time.monotonic()
        if received != last_count:
            last_progress, last_count = now, received
        if received >= expected or now - last_progress > load.drain_idle:
            break
        if now - drain_start > load.drain_max:
            break
        time.sleep(0.05)
    drain_s = time.monotonic() - drain_start
    server_cpu = cpu_seconds(pid) - cpu_start
    harness_cpu = sum(cpu_seconds(p) for p in harness_pids) - harness_start
    outside_cpu = machine_busy_s() - busy_start - server_cpu - harness_cpu
    wall = time.monotonic() - wall_start

    totals: dict[str, int] = {}
    latency = array("I")
    for process, pipe in workers:
        pipe.send("stop")
        result = pipe.recv()
        latency.frombytes(result.pop("latency_us"))
        last_ns = result.pop("last_ns")
        totals["last_ns"] = max(totals.get("last_ns", 0), last_ns)
        for name, value in result.items():
            totals[name] = totals.get(name, 0) + value
        process.join(10)
    ordered = sorted(latency)
    span_ns = max(1, totals["last_ns"] - published.first_ns)
    received = totals["unique"] + totals["duplicated"]
    connected = sum(per_topic)
    return {
        "subscribers_connected": connected,
        "subscribers_failed": load.subscribers - connected,
        "connect_errors": connect_errors,
        "connect_s": round(connect_s, 2),
        "published": sum(published.ok),
        "publish_errors": published.errors,
        "publish_late": published.late,
        "publish_per_s": round(sum(published.ok) / publish_wall, 1),
        "deliveries_expected": expected,
        "deliveries_received": received,
        "deliveries_per_s": round(received / (span_ns / 1e9)),
        "latency_ms": {
            "p50": percentile(ordered, 0.50),
            "p90": percentile(ordered, 0.90),
            "p99": percentile(ordered, 0.99),
            "max": round(ordered[-1] / 1000, 2) if ordered else 0.0,
        },
        "lost": max(0, expected - totals["unique"]),
        "duplicated": totals["duplicated"],
        "out_of_order": totals["out_of_order"],
        "reordered_concurrent": totals["reordered_concurrent"],
        "foreign": totals["foreign"],
        "wrong_topic": totals["wrong_topic"],
        "disconnects": totals["disconnects"],
        "drain_s": round(drain_s, 2),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_util": round(server_cpu / wall, 3),
        "server_cpu_us_per_delivery": round(server_cpu * 1e6 / max(1, received), 3),
        "server_rss_before_mb": round(rss_before / 1024, 1),
        "server_rss_connected_mb": round(rss_connected / 1024, 1),
        "server_rss_per_sub_kb": round(
            (rss_connected - rss_before) / max(1, connected), 1
        ),
        "server_rss_peak_mb": round(max(peak[0], memory_kb(pid, "VmHWM")) / 1024, 1),
        "harness_cpu_util_publish": round(harness_publish / publish_wall, 3),
        "outside_cpu_util": round(max(0.0, outside_cpu) / wall, 3),
    }


async def _publish(load: Load, pid: int | None, peak: list[int]) -> Published:
    sampler = asyncio.create_task(sample_rss(pid, peak))
    try:
        return await Publisher(load).run()
    finally:
        sampler.cancel()


# Starting and stopping the servers.


class Server:
    """A server process this script started, pinned to the server core."""

    def __init__(self, kind: str, cpu: int, args: argparse.Namespace) -> None:
        self.log = tempfile.NamedTemporaryFile(
            "w+", prefix=f"bench-{kind}-", suffix=".log", delete=False
        )
        env = dict(os.environ)
        if kind == "tinymq":
            root = args.tinymq_path or str(HERE.parent)
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [root, env.get("PYTHONPATH")])
            )
            twistd = shutil.which("twistd", path=str(Path(sys.executable).parent))
            command = [twistd or "twistd", "-n", "--pidfile=", "tinymq"]
            command += ["--port", "tcp:0:interface=127.0.0.1", *args.server_arg]
            pattern = re.compile(r"listening on [0-9.]+:(\d+)")
        else:
            command = [sys.executable, str(HERE / "baseline_server.py"), "--port", "0"]
            pattern = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
        if shutil.which("taskset"):
            command = ["taskset", "-c", str(cpu), *command]
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.pid = self.process.pid
        self.port = self._wait_for(pattern)

    def _wait_for(self, pattern: re.Pattern[str]) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = pattern.search(Path(self.log.name).read_text())
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise SystemExit(
            f"the server did not start; its log:\n{Path(self.log.name).read_text()}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.unlink(self.log.name)


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run the load against a server of C{kind}, started here or given."""
    prefix = f"bench{os.urandom(3).hex()}-"
    server = None
    if kind == "tinymq" and args.url:
        url = urlsplit(args.url)
        host, port, pid = url.hostname or "127.0.0.1", url.port or 80, args.pid
    else:
        server = Server(kind, args.server_cpu, args)
        host, port, pid = "127.0.0.1", server.port, server.pid
    load = Load(
        host=host,
        port=port,
        prefix=prefix,
        proto=args.proto,
        subscribers=args.subs,
        topics=args.topics,
        rate=args.rate,
        window=args.window,
        duration=args.duration,
        size=args.size,
        procs=args.procs,
        client_cpus=set(args.client_cpus),
        settle=args.settle,
        drain_idle=args.drain_idle,
        drain_max=args.drain_max,
    )
    try:
        return run_load(load, pid)
    finally:
        if server is not None:
            server.stop()


_COMPARED = (
    "deliveries_per_s",
    "server_cpu_us_per_delivery",
    "server_rss_per_sub_kb",
    "server_rss_peak_mb",
)


def compare(ours: dict[str, Any], floor: dict[str, Any]) -> dict[str, float | None]:
    """TinyMQ's figures divided by the baseline's."""
    pairs = [(name, ours[name], floor[name]) for name in _COMPARED]
    for name in ("p50", "p99", "max"):
        pairs.append(
            (f"latency_{name}", ours["latency_ms"][name], floor["latency_ms"][name])
        )
    return {
        name: round(mine / theirs, 3) if theirs else None
        for name, mine, theirs in pairs
    }


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark for TinyMQ; prints one JSON line."
    )
    add = parser.add_argument
    add("--proto", choices=("sse", "ws"), default="sse")
    add("--subs", type=int, default=1000, help="subscribers (default 1000)")
    add("--topics", type=int, default=1, help="subscriber i follows topic i %% T")
    add("--rate", type=float, default=0, help="msgs/s in total; 0 = flat out")
    add("--window", type=int, default=8, help="POSTs in flight (connections)")
    add("--duration", type=float, default=15.0, help="seconds of publishing")
    add("--size", type=int, default=200, help="payload bytes")
    add("--procs", type=int, default=1, help="subscriber processes")
    add("--settle", type=float, default=1.0, help="seconds between connect and load")
    add("--drain-idle", type=float, default=3.0)
    add("--drain-max", type=float, default=30.0)
    add("--server-cpu", type=int, default=0, help="core for the servers started")
    add("--client-cpus", type=int, nargs="+", default=[1], help="harness cores")
    add("--url", help="target this TinyMQ (http://host:port) instead of starting one")
    add("--pid", type=int, help="with --url: the server's PID for CPU and RSS")
    add("--tinymq-path", help="directory holding the tinymq package to start")
    add(
        "--server-arg",
        action="append",
        default=[],
        help="extra twistd tinymq option, e.g. --server-arg=--heartbeat=0",
    )
    add("--no-baseline", action="store_true", help="skip the pure-Twisted floor")
    add("--label", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    pin(set(args.client_cpus))
    raise_nofile()
    result: dict[str, Any] = {
        "label": args.label,
        "target": args.url or "tinymq (started)",
        "proto": args.proto,
        "subscribers": args.subs,
        "topics": args.topics,
        "rate": args.rate,
        "window": args.window,
        "duration_s": args.duration,
        "size": args.size,
    }
    result.update(measure("tinymq", args))
    if not args.no_baseline:
        floor = measure("baseline", args)
        result["baseline"] = floor
        result["vs_baseline"] = compare(result, floor)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
