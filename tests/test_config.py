"""
Unit tests of the settings: where each value comes from, how bad values are
reported, and the twistd command-line options.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python.usage import UsageError
from zope.interface.verify import verifyObject

from tinymq._config import Config
from tinymq._service import Options, ServiceMaker, TinyMQService, endpoint_description


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hide any TINYMQ_* variable of the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("TINYMQ_"):
            monkeypatch.delenv(name)
    yield


def write_toml(tmp_path: Path, text: str) -> str:
    """Write a config file and return its path."""
    path = tmp_path / "tinymq.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults() -> None:
    """With no source at all, every setting has its documented default."""

    config = Config.load({}, {}, None)

    assert config == Config()
    assert config.port == "tcp:7800"
    assert config.max_message_size == 1024 * 1024
    assert config.heartbeat == 15.0
    assert config.cors_origins == ("*",)
    assert config.slow_policy == "disconnect"


def test_precedence(tmp_path: Path) -> None:
    """The command line beats the environment, which beats the file."""
    path = write_toml(
        tmp_path,
        'port = "tcp:1"\nheartbeat = 1.5\nmax_message_size = 10\nhistory_size = 7\n',
    )
    environ = {
        "TINYMQ_PORT": "tcp:2",
        "TINYMQ_HEARTBEAT": "2.5",
        "TINYMQ_SSE_RETRY": "500",
    }
    given: dict[str, object] = {"port": "tcp:3", "sse_retry": None}

    config = Config.load(given, environ, path)

    assert config.port == "tcp:3"
    assert config.heartbeat == 2.5
    assert config.sse_retry == 500
    assert config.max_message_size == 10
    assert config.history_size == 7
    assert config.history_ttl == Config().history_ttl


def test_file_named_by_command_line_or_environment(tmp_path: Path) -> None:
    """The config file comes from --config, else from TINYMQ_CONFIG."""
    first = write_toml(tmp_path, "history_size = 1\n")
    second = tmp_path / "other.toml"
    second.write_text("history_size = 2\n", encoding="utf-8")

    by_option = Config.load({"config": first}, {"TINYMQ_CONFIG": str(second)})
    by_environment = Config.load({}, {"TINYMQ_CONFIG": str(second)})

    assert by_option.history_size == 1
    assert by_environment.history_size == 2


def test_value_types(tmp_path: Path) -> None:
    """Each source's text or TOML value is parsed to the setting's type."""
    path = write_toml(
        tmp_path,
        'cors_origins = ["https://a.test/", "https://b.test"]\n'
        "client_policy = false\nport = 7801\n",
    )
    environ = {"TINYMQ_SLOW_POLICY": " Latest ", "TINYMQ_STALL_TIMEOUT": "0"}

    config = Config.load({}, environ, path)
    listed = Config.load({"cors_origins": "https://x.test, https://y.test/"}, {})

    assert config.cors_origins == ("https://a.test", "https://b.test")
    assert config.client_policy is False
    assert config.port == "7801"
    assert config.slow_policy == "latest"
    assert config.stall_timeout == 0.0
    assert listed.cors_origins == ("https://x.test", "https://y.test")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("yes", True), ("On", True), ("0", False), ("off", False)],
)
def test_boolean_words(text: str, expected: bool) -> None:
    """Booleans read the usual words for true and false."""

    config = Config.load({}, {"TINYMQ_CLIENT_POLICY": text})

    assert config.client_policy is expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_message_size", "lots"),
        ("max_message_size", "-1"),
        ("max_message_size", "1.5"),
        ("heartbeat", "often"),
        ("heartbeat", "-0.5"),
        ("heartbeat", "nan"),
        ("slow_policy", "drop"),
        ("client_policy", "maybe"),
        ("history_size", ""),
    ],
)
def test_bad_value_names_setting_and_source(
    tmp_path: Path, name: str, value: str
) -> None:
    """A bad value, from any source, is a ValueError naming setting and source."""
    path = write_toml(tmp_path, f"{name} = {value!r}\n".replace("'", '"'))
    option = "--" + name.replace("_", "-")
    variable = "TINYMQ_" + name.upper()

    with pytest.raises(ValueError) as from_option:
        Config.load({name: value}, {})
    with pytest.raises(ValueError) as from_environment:
        Config.load({}, {variable: value})
    with pytest.raises(ValueError) as from_file:
        Config.load({}, {}, path)

    assert str(from_option.value).startswith(option + ": ")
    assert str(from_environment.value).startswith(variable + ": ")
    assert str(from_file.value).startswith(f"{path}: {name}: ")


def test_bad_type_in_file(tmp_path: Path) -> None:
    """A TOML value of the wrong type is refused with the file and setting."""
    path = write_toml(tmp_path, "history_size = true\n")

    with pytest.raises(ValueError) as raised:
        Config.load({}, {}, path)

    assert str(raised.value).startswith(f"{path}: history_size: ")


def test_unknown_file_key_refused(tmp_path: Path) -> None:
    """A file key that is no setting is refused, naming the key and file."""
    path = write_toml(tmp_path, "heartbeat = 5\nhartbeat = 5\nzzz = 1\n")

    with pytest.raises(ValueError) as raised:
        Config.load({}, {}, path)

    assert str(raised.value) == f"{path}: unknown settings: hartbeat, zzz"


def test_broken_file_names_file(tmp_path: Path) -> None:
    """A file that is not TOML gives a ValueError that names the file."""
    path = write_toml(tmp_path, "heartbeat = = 5\n")

    with pytest.raises(ValueError) as raised:
        Config.load({}, {}, path)

    assert path in str(raised.value)


def test_missing_file() -> None:
    """A config file that does not exist is an OSError."""

    with pytest.raises(OSError):
        Config.load({"config": "/nonexistent/tinymq.toml"}, {})


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://dash.test", True),
        ("https://dash.test/", True),
        ("http://dash.test", False),
        ("https://dash.test:8443", False),
        ("null", False),
    ],
)
def test_origin_allowed(origin: str, allowed: bool) -> None:
    """Listed origins match exactly, apart from a trailing slash."""
    config = Config(cors_origins=("https://dash.test",))

    assert config.origin_allowed(origin) is allowed
    assert Config().origin_allowed(origin) is True


@pytest.mark.parametrize(
    ("port", "description"),
    [
        ("7800", "tcp:7800:backlog=1024"),
        (" 0 ", "tcp:0:backlog=1024"),
        ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=1024"),
        ("tcp:0:backlog=5", "tcp:0:backlog=5"),
        ("unix:/tmp/tinymq.sock", "unix:/tmp/tinymq.sock"),
        ("ssl:7443:privateKey=k.pem", "ssl:7443:privateKey=k.pem:backlog=1024"),
    ],
)
def test_endpoint_description(port: str, description: str) -> None:
    """
    A bare port number becomes a TCP description; TCP and TLS listeners get
    a backlog of 1024 unless they name one; other descriptions are kept.
    """

    assert endpoint_description(port) == description


def test_options_parse() -> None:
    """The twistd options fill the config, command line first."""
    options = Options()

    options.parseOptions(
        [
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--max-message-size",
            "2048",
            "--heartbeat",
            "0.5",
            "--cors-origins",
            "https://a.test https://b.test",
            "--slow-policy",
            "latest",
        ]
    )

    config = options.config
    assert config.port == "tcp:0:interface=127.0.0.1"
    assert config.max_message_size == 2048
    assert config.heartbeat == 0.5
    assert config.cors_origins == ("https://a.test", "https://b.test")
    assert config.slow_policy == "latest"
    assert config.history_size == Config().history_size


def test_options_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An option not on the command line comes from TINYMQ_*."""
    monkeypatch.setenv("TINYMQ_PORT", "tcp:9")
    monkeypatch.setenv("TINYMQ_HEARTBEAT", "3")

    options = Options()
    options.parseOptions(["--heartbeat", "4"])

    assert options.config.port == "tcp:9"
    assert options.config.heartbeat == 4.0


def test_options_config_file(tmp_path: Path) -> None:
    """--config (or -c) names the TOML file."""
    path = write_toml(tmp_path, "history_size = 3\nport = 7900\n")

    options = Options()
    options.parseOptions(["-c", path])

    assert options.config.history_size == 3
    assert endpoint_description(options.config.port) == "tcp:7900:backlog=1024"


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--heartbeat", "soon"], "--heartbeat"),
        (["--max-message-size", "-5"], "--max-message-size"),
        (["--slow-policy", "drop"], "--slow-policy"),
        (["--client-policy", "perhaps"], "--client-policy"),
        (["--config", "/nonexistent/tinymq.toml"], "/nonexistent/tinymq.toml"),
        (["--no-such-option", "1"], "no-such-option"),
    ],
)
def test_options_usage_errors(arguments: list[str], named: str) -> None:
    """A bad option value is a UsageError that names what was wrong."""

    with pytest.raises(UsageError) as raised:
        Options().parseOptions(arguments)

    assert named in str(raised.value)


def test_bad_environment_is_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad TINYMQ_* value stops twistd with a UsageError naming it."""
    monkeypatch.setenv("TINYMQ_HISTORY_TTL", "forever")

    with pytest.raises(UsageError) as raised:
        Options().parseOptions([])

    assert str(raised.value).startswith("TINYMQ_HISTORY_TTL: ")


def test_service_maker() -> None:
    """The plugin's service maker provides its interfaces and builds the broker."""
    maker = ServiceMaker()
    options = Options()
    options.parseOptions(["--port", "tcp:0"])

    service = maker.makeService(options)

    assert verifyObject(IServiceMaker, maker)
    assert verifyObject(IPlugin, maker)
    assert maker.tapname == "tinymq"
    assert isinstance(service, TinyMQService)
    assert service.config is options.config
