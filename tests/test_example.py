"""
The host-metrics example: its publisher reads /proc right, and its
dashboard, opened in headless Chromium as its README says, shows the live
figures while the publisher runs against a real broker.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.browser_helpers import ARTIFACTS, DevTools
from tests.conftest import Broker

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "host-metrics"
WAIT = 15.0


def _load_publisher() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "host_metrics_publisher", EXAMPLE / "publisher.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


publisher = _load_publisher()


def fake_proc(root: Path, cpu: list[int], rx: int, tx: int, available_kb: int) -> Path:
    """Write the four /proc files the publisher reads; return their root."""
    (root / "net").mkdir(parents=True, exist_ok=True)
    ticks = " ".join(map(str, cpu))
    (root / "stat").write_text(f"cpu  {ticks} 0 0\ncpu0 {ticks} 0 0\nintr 1 2\n")
    (root / "meminfo").write_text(
        f"MemTotal:        8000000 kB\nMemFree:  100 kB\n"
        f"MemAvailable:    {available_kb} kB\n"
    )
    (root / "loadavg").write_text("0.52 0.48 0.40 2/300 12345\n")
    (root / "net" / "dev").write_text(
        "Inter-|   Receive    |  Transmit\n"
        " face |bytes packets errs drop fifo frame compressed multicast|bytes\n"
        f"    lo: 999999 1 0 0 0 0 0 0 999999 1 0 0 0 0 0 0\n"
        f"  eth0: {rx} 10 0 0 0 0 0 0 {tx} 10 0 0 0 0 0 0\n"
        f"  eth1: {rx} 10 0 0 0 0 0 0 {tx} 10 0 0 0 0 0 0\n"
    )
    return root


def test_publisher_figures(tmp_path: Path) -> None:
    """Two readings of /proc become CPU, memory, load and network figures."""
    proc = fake_proc(tmp_path, [100, 0, 100, 700, 100, 0, 0, 0], 1000, 500, 6000000)
    readings = iter([10.0, 12.0])
    sampler = publisher.Sampler("web-1", str(proc), clock=lambda: next(readings))

    fake_proc(tmp_path, [250, 0, 250, 1200, 100, 0, 0, 0], 5000, 2500, 2000000)
    figures = sampler.sample()

    assert figures["host"] == "web-1"
    assert figures["cpu_percent"] == 37.5
    assert figures["memory_percent"] == 75.0
    assert figures["memory_used_bytes"] == 6000000 * 1024
    assert figures["memory_total_bytes"] == 8000000 * 1024
    assert figures["load"] == [0.52, 0.48, 0.40]
    assert figures["net_rx_bytes_per_s"] == 4000
    assert figures["net_tx_bytes_per_s"] == 2000


@pytest.mark.parametrize(
    ("host", "topic"),
    [
        ("web-1", "hosts.web-1"),
        ("db1.example.com", "hosts.db1-example-com"),
        ("Mac Book's", "hosts.Mac-Book-s"),
        ("...", "hosts.host"),
    ],
)
def test_publisher_topic(host: str, topic: str) -> None:
    """A host name becomes one valid topic segment under 'hosts.'."""

    assert publisher.topic_for(host) == topic


@pytest.fixture
def example_server() -> Iterator[str]:
    """Serve the example's directory on 127.0.0.1, as its README says."""
    handler = partial(_QuietHandler, directory=str(EXAMPLE))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def running_publisher(broker: Broker, tmp_path: Path) -> Iterator[Path]:
    """The example publisher, every 0.2 s against the test broker."""
    output = tmp_path / "publisher.log"
    with open(output, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLE / "publisher.py"),
                "--url",
                broker.base_url,
                "--interval",
                "0.2",
                "--host",
                "test-host",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield output
    finally:
        os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


CANVAS_HAS_CPU_LINE = """(() => {
  const canvas = document.getElementById("chart");
  const data = canvas.getContext("2d")
    .getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] === 0x2f && data[i + 1] === 0x6f && data[i + 2] === 0xed) return true;
  }
  return false;
})()"""


@pytest.mark.e2e
@pytest.mark.browser
def test_dashboard_shows_live_cpu(
    broker: Broker,
    example_server: str,
    running_publisher: Path,
    devtools: DevTools,
) -> None:
    """While the publisher runs, the dashboard's CPU figure changes live."""
    url = f"{example_server}/dashboard.html?broker={broker.base_url}"

    devtools.navigate(url)
    devtools.wait_for("Number(document.body.dataset.points) >= 2", "two points")
    seen: list[str] = []
    deadline = time.monotonic() + WAIT
    while len(set(seen)) < 2 and time.monotonic() < deadline:
        seen.append(devtools.evaluate("document.getElementById('cpu').textContent"))
        time.sleep(0.1)
    host = devtools.evaluate("document.getElementById('hosts').value")
    status = devtools.evaluate("document.getElementById('status').textContent")
    drawn = devtools.evaluate(CANVAS_HAS_CPU_LINE)
    devtools.screenshot(ARTIFACTS / "host-metrics.png")

    assert len(set(seen)) >= 2, f"the CPU figure did not change: {seen}"
    assert all(re.fullmatch(r"\d{1,3}\.\d%", text) for text in seen), seen
    assert host == "test-host"
    assert status == "live"
    assert drawn is True
    assert devtools.errors() == []
    assert "Cannot publish" not in running_publisher.read_text()
