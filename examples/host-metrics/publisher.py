#!/usr/bin/env python3
"""
Publish this machine's CPU, memory, load and network figures to TinyMQ.

Every interval (one second by default) the figures are read from /proc and
POSTed as one JSON message to the topic ``hosts.<hostname>``. Only the
standard library is used, so the script runs on any Linux with Python 3.

    python3 publisher.py --url http://localhost:7800
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

PROC = "/proc"


def read_cpu(proc: str = PROC) -> tuple[int, int]:
    """Return the busy and total CPU time of all cores, in clock ticks."""
    with open(f"{proc}/stat") as stat:
        for line in stat:
            if line.startswith("cpu "):
                ticks = [int(field) for field in line.split()[1:9]]
                idle = ticks[3] + ticks[4]  # idle and iowait
                return sum(ticks) - idle, sum(ticks)
    raise ValueError(f"no cpu line in {proc}/stat")


def read_memory(proc: str = PROC) -> tuple[int, int]:
    """Return the total and available memory, in bytes."""
    values: dict[str, int] = {}
    with open(f"{proc}/meminfo") as meminfo:
        for line in meminfo:
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                values[name] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


def read_load(proc: str = PROC) -> list[float]:
    """Return the load averages over 1, 5 and 15 minutes."""
    with open(f"{proc}/loadavg") as loadavg:
        return [float(field) for field in loadavg.read().split()[:3]]


def read_network(proc: str = PROC) -> tuple[int, int]:
    """Return the bytes received and sent by every interface but loopback."""
    received = sent = 0
    with open(f"{proc}/net/dev") as dev:
        for line in dev.readlines()[2:]:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                continue
            fields = counters.split()
            received += int(fields[0])
            sent += int(fields[8])
    return received, sent


class Sampler:
    """Turns two readings of the counters into rates and percentages."""

    def __init__(
        self,
        host: str,
        proc: str = PROC,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.proc = proc
        self.clock = clock
        self.cpu = read_cpu(proc)
        self.network = read_network(proc)
        self.when = clock()

    def sample(self) -> dict[str, Any]:
        """Return the figures since the previous sample."""
        cpu = read_cpu(self.proc)
        network = read_network(self.proc)
        now = self.clock()
        busy = cpu[0] - self.cpu[0]
        ticks = cpu[1] - self.cpu[1]
        seconds = max(now - self.when, 1e-6)
        total, available = read_memory(self.proc)
        figures = {
            "host": self.host,
            "time": round(time.time(), 3),
            "cores": os.cpu_count() or 1,
            "cpu_percent": round(100.0 * busy / ticks, 1) if ticks > 0 else 0.0,
            "memory_percent": round(100.0 * (total - available) / total, 1),
            "memory_used_bytes": total - available,
            "memory_total_bytes": total,
            "load": read_load(self.proc),
            "net_rx_bytes_per_s": round((network[0] - self.network[0]) / seconds),
            "net_tx_bytes_per_s": round((network[1] - self.network[1]) / seconds),
        }
        self.cpu, self.network, self.when = cpu, network, now
        return figures


def topic_for(host: str) -> str:
    """Return the topic of a host: C{hosts.} and its name as one segment."""
    return "hosts." + (re.sub(r"[^A-Za-z0-9_-]+", "-", host).strip("-") or "host")


def publish(url: str, topic: str, figures: dict[str, Any], token: str | None) -> str:
    """POST the figures to TinyMQ; return the message id."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{url.rstrip('/')}/api/topics/{topic}",
        data=json.dumps(figures).encode("utf-8"),
        headers=headers,
        method="POST",
    )
    # Talk to the broker directly, never through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=5) as response:
        answer: dict[str, str] = json.load(response)
    return answer["id"]


def main(argv: list[str] | None = None) -> int:
    """Publish figures until interrupted, or C{--count} times."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("TINYMQ_URL", "http://localhost:7800"),
        help="TinyMQ's address (default: $TINYMQ_URL or http://localhost:7800)",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between messages"
    )
    parser.add_argument(
        "--host", default=socket.gethostname(), help="the name to publish as"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TINYMQ_TOKEN"),
        help="API key or JWT, if the broker asks for one (default: $TINYMQ_TOKEN)",
    )
    parser.add_argument(
        "--count", type=int, default=0, help="stop after this many (0: never)"
    )
    args = parser.parse_args(argv)

    topic = topic_for(args.host)
    sampler = Sampler(args.host)
    print(f"Publishing to {args.url} on topic {topic}; Ctrl-C stops.", flush=True)
    sent = 0
    next_time = time.monotonic()
    try:
        while not args.count or sent < args.count:
            next_time += args.interval
            time.sleep(max(0.0, next_time - time.monotonic()))
            figures = sampler.sample()
            try:
                message_id = publish(args.url, topic, figures, args.token)
            except (urllib.error.URLError, OSError) as error:
                print(f"Cannot publish: {error}", file=sys.stderr, flush=True)
                continue
            sent += 1
            print(
                f"{message_id}: cpu {figures['cpu_percent']}%, "
                f"memory {figures['memory_percent']}%",
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
