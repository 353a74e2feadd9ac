"""
Fixtures shared by the test modules.

The broker fixtures run a real C{twistd -n tinymq} in a subprocess on
127.0.0.1, on a port the kernel picks, and read that port back from the
broker's "listening on" log line. The browser fixtures find Chromium and
drive a headless page over the DevTools protocol; C{clients} collects the
raw-socket clients of L{tests.rawclient} and closes them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import tinymq
from tests.browser_helpers import (
    DEVTOOLS_WAIT,
    Chromium,
    DevTools,
    find_chromium,
    no_proxy_get,
)

if TYPE_CHECKING:
    # Only for an annotation: the raw clients import the reactor, which
    # pytest-twisted installs after this module is loaded.
    from tests.rawclient import Closable

LISTENING = re.compile(r"TinyMQ \S+ listening on 127\.0\.0\.1:(\d+)")
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def twistd_command() -> list[str]:
    """Return the command that runs this interpreter's twistd."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(twistd, os.X_OK):
        return [twistd]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _broker_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    """
    The environment of a broker: this one without C{TINYMQ_*} settings, so
    that a test sees the defaults unless it passes settings itself, and with
    the checkout under test first on the path, so that twistd finds the
    plugin of the code these tests import.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TINYMQ_")
    }
    source = Path(tinymq.__file__).resolve().parent.parent
    if (source / "twisted" / "plugins" / "tinymq_plugin.py").exists():
        paths = [str(source), environment.get("PYTHONPATH", "")]
        environment["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(extra or {})
    return environment


class Broker:
    """One running broker: its process, its address and its log."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, log_path: Path
    ) -> None:
        self.process = process
        self.port = port
        self.host = HOST
        self.base_url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self.startup_log = self.log()

    @property
    def pid(self) -> int:
        """The process id of the broker."""
        return self.process.pid

    def log(self, since: int = 0) -> str:
        """Return what the broker has logged so far, from byte C{since} on."""
        data = self.log_path.read_bytes()[since:]
        return data.decode("utf-8", errors="replace")

    def log_size(self) -> int:
        """Return the size of the broker's log in bytes."""
        return self.log_path.stat().st_size

    def signal(self, number: int = signal.SIGTERM) -> None:
        """Send a signal to the broker, by its process id."""
        if self.process.poll() is None:
            os.kill(self.process.pid, number)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the broker, wait for it, kill it if it hangs; return rc."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)


class BrokerLauncher:
    """Starts brokers in one directory and stops every one it started."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.brokers: list[Broker] = []

    def start(self, *options: str, env: Mapping[str, str] | None = None) -> Broker:
        """
        Start C{twistd -n tinymq} with extra C{options} and environment
        variables C{env}; return once it listens.
        """
        number = len(self.brokers)
        log_path = self.directory / f"broker-{number}.log"
        command = twistd_command() + [
            "-n",
            "--pidfile=",
            "tinymq",
            "--port",
            f"tcp:0:interface={HOST}",
            *options,
        ]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=_broker_environment(env),
            )
        broker = Broker(process, self._wait_for_port(process, log_path), log_path)
        self.brokers.append(broker)
        return broker

    def _wait_for_port(self, process: subprocess.Popen[bytes], log_path: Path) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = LISTENING.search(log_path.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            if process.poll() is not None:
                break
            time.sleep(0.02)
        if process.poll() is None:
            process.kill()
            process.wait()
        pytest.fail(
            "The broker did not start listening; its log:\n"
            + log_path.read_text(errors="replace")
        )

    def stop_all(self) -> None:
        """Stop every broker this launcher started."""
        for broker in self.brokers:
            broker.stop()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """
    A function that starts a broker with extra options and environment,
    e.g. C{broker_factory("--max-message-size", "1000")}; every broker it
    started is stopped after the test.
    """
    launcher = BrokerLauncher(tmp_path)
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_broker_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Broker]]:
    """
    Like L{broker_factory}, for brokers shared by the tests of one module;
    they are stopped after the module.
    """
    launcher = BrokerLauncher(tmp_path_factory.mktemp("brokers"))
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(scope="module")
def broker(module_broker_factory: Callable[..., Broker]) -> Broker:
    """
    A broker with the default settings, shared by the tests of one module:
    each test uses topics of its own.
    """
    return module_broker_factory()


@pytest.fixture
def clients() -> Iterator[list[Closable]]:
    """A list to put raw clients in; each is closed after the test."""
    opened: list[Closable] = []
    yield opened
    for client in opened:
        client.close()


@pytest.fixture
def chromium_binary() -> str:
    """The Chromium binary; without one, skip locally but fail in CI."""
    binary = find_chromium()
    if binary is None:
        message = "no chromium found (install the Debian package chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture
def devtools(chromium_binary: str, tmp_path: Path) -> Iterator[DevTools]:
    """Headless Chromium on a blank page, driven over the DevTools protocol."""
    profile = tmp_path / "profile"
    browser = Chromium(chromium_binary, profile, "about:blank")
    client = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + DEVTOOLS_WAIT
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or browser.process.poll() is not None:
                pytest.fail("Chromium did not start: " + browser.output.read_text())
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        pages = [
            t
            for t in no_proxy_get(f"http://127.0.0.1:{port}/json/list")
            if t["type"] == "page"
        ]
        client = DevTools(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Page", "Log"):
            client.send(f"{domain}.enable")
        client.send(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=760,
            deviceScaleFactor=1,
            mobile=False,
        )
        yield client
    finally:
        if client is not None:
            client.close()
        browser.close()
