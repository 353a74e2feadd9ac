"""
The twistd service: command-line options in, a listening broker out.
"""

from __future__ import annotations

import atexit
import os
import resource
from typing import Any

from twisted.application.service import IServiceMaker, Service
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from . import __version__
from ._auth import Authenticator
from ._config import Config
from ._http import API
from ._hub import Hub
from ._logging import use_json_log
from ._site import Root, TinyMQSite


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


class Options(usage.Options):
    """Options of C{twistd tinymq}; each also reads from C{TINYMQ_*}."""

    synopsis = "[options]"
    longdesc = (
        "Run the TinyMQ broker. Every option can also be given as an "
        "environment variable TINYMQ_<NAME> or in the TOML file named by "
        "--config (or TINYMQ_CONFIG)."
    )
    optParameters: list[list[Any]] = [
        ["config", "c", None, "TOML config file with any of the settings."]
    ] + [
        [
            field.name.replace("_", "-"),
            None,
            None,
            f"{field.metadata['help']} Default: {_shown(field.default)}.",
        ]
        for field in Config.settings()
    ]

    def postOptions(self) -> None:
        given = {
            field.name: self[field.name.replace("_", "-")]
            for field in Config.settings()
        }
        given["config"] = self["config"]
        try:
            self.config = Config.load(given, os.environ)
            # Read the key files now, so that a bad one stops the start.
            Authenticator(self.config)
        except (ValueError, OSError) as error:
            raise usage.UsageError(str(error)) from None
        if self.config.log_format == "json":
            # twistd sets up its logging from its own options, after these.
            use_json_log(self.parent)


def endpoint_description(port: str) -> str:
    """
    Turn a bare port number into a TCP endpoint description, and give TCP
    and TLS listeners a listen backlog fit for thousands of subscribers
    unless the description sets one.
    """
    port = port.strip()
    if port.isdigit():
        port = f"tcp:{port}"
    if port.split(":", 1)[0] in ("tcp", "ssl") and "backlog=" not in port:
        port += ":backlog=1024"
    return port


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


class TinyMQService(Service):
    """The broker: a hub, the HTTP site around it, and a listening port."""

    log = Logger()

    def __init__(self, config: Config, reactor: Any = None) -> None:
        self.config = config
        self.reactor = reactor if reactor is not None else _global_reactor
        self.hub = Hub(self.reactor, config)
        self.api = API(self.hub, config)
        self.site = TinyMQSite(Root(self.api.app.resource(), config), config)
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        soft, hard = raise_open_file_limit()
        self.log.info("Open file limit: {soft} (hard {hard})", soft=soft, hard=hard)
        if self.config.max_connections > soft:
            self.log.warn(
                "max_connections is {limit} but the open file limit is "
                "{soft}: connections past it will fail to be accepted",
                limit=self.config.max_connections,
                soft=soft,
            )
        self.log.info("Authentication: {auth}", auth=self.api.auth.describe())
        self.hub.start()
        endpoint = serverFromString(
            self.reactor, endpoint_description(self.config.port)
        )
        listening = endpoint.listen(self.site)
        listening.addCallbacks(self._listening, self._cannot_listen)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        self.log.info(
            "TinyMQ {version} listening on {host}:{port_number}",
            version=__version__,
            host=getattr(address, "host", address),
            port_number=getattr(address, "port", ""),
        )
        self.listening.callback(port)

    def _cannot_listen(self, failure: Any) -> None:
        self.log.critical(
            "Cannot listen on {description}: {error}",
            description=self.config.port,
            error=failure.getErrorMessage(),
        )
        self.listening.errback(failure)
        # A broker that cannot listen must not look healthy to a
        # supervisor: stop, and exit with status 1.
        atexit.register(os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        stopping = [maybeDeferred(self.port.stopListening)] if self.port else []
        self.hub.stop()
        if self.api.console is not None:
            self.api.console.stop()
        closed = self.site.close_connections()
        timeout = self.reactor.callLater(3, closed.cancel)
        closed.addBoth(lambda _: timeout.cancel() if timeout.active() else None)
        return DeferredList(stopping + [closed], consumeErrors=True)


@implementer(IServiceMaker, IPlugin)
class ServiceMaker:
    """Makes the service of C{twistd tinymq}."""

    tapname = "tinymq"
    description = "TinyMQ: publish over HTTP, receive live over SSE and WebSocket."
    options = Options

    def makeService(self, options: Options) -> TinyMQService:
        """Build the broker from parsed options."""
        return TinyMQService(options.config)
