from __future__ import annotations

import asyncio
import importlib.util
import socket

import pytest

from eventwire import EventBus
from eventwire.backends import open_backend, parse_url, require_extra
from eventwire.backends.base import BackendConnectionError
from eventwire.backends.url import URLOptions


def test_parse_url_parts_and_redaction() -> None:
    parsed = parse_url("amqp://guest:s3cret@127.0.0.1:5672/vhost")
    assert (parsed.scheme, parsed.host, parsed.port, parsed.path) == (
        "amqp",
        "127.0.0.1",
        5672,
        "/vhost",
    )
    assert parsed.username == "guest"
    assert parsed.password == "s3cret"
    assert parsed.redacted == "amqp://guest:***@127.0.0.1:5672/vhost"
    assert parse_url("nats://127.0.0.1:4222").redacted == "nats://127.0.0.1:4222"


@pytest.mark.parametrize("url", ["kafka://user:s3cret@host:9092", "amqp://u:s3cret@host:notaport/"])
def test_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"\*\*\*") as info:
        EventBus(url)
    assert "s3cret" not in str(info.value)
    assert "***" in str(info.value)


def test_missing_client_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "aio_pika" else real(name)
    )
    with pytest.raises(ImportError, match=r"pip install 'eventwire\[rabbitmq\]'"):
        require_extra("amqp")
    require_extra("memory")  # nothing to install


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret-pw@127.0.0.1:{port}/0",
        "nats://user:s3cret-pw@127.0.0.1:{port}",
        "amqp://guest:s3cret-pw@127.0.0.1:{port}/",
    ],
)
async def test_an_unreachable_broker_is_a_clear_error_without_the_password(url: str) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bus = EventBus(url.format(port=port))
    with pytest.raises(BackendConnectionError) as info:
        await asyncio.wait_for(bus.start(), timeout=30)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "***" in message
    assert "s3cret-pw" not in message


# -- ?option=value: one checked reader for every scheme ---------------------------------------

# Each broker scheme, written with a password where the scheme has one, and the options it takes.
SCHEMES = {
    "sqlite": ("sqlite:///bus.db", {"namespace", "poll"}),
    "redis": (
        "redis://:s3cret@127.0.0.1:6379/0",
        {"namespace", "dedup_window", "maxlen", "min_replicas", "replica_wait"},
    ),
    "nats": ("nats://user:s3cret@127.0.0.1:4222", {"namespace", "max_age", "replicas", "servers"}),
    "amqp": (
        "amqp://guest:s3cret@127.0.0.1:5672/",
        {
            "namespace",
            "prefetch",
            "connect_timeout",
            "heartbeat",
            "history",
            "queues",
            "journal",
            "handled",
        },
    ),
}


def _refusal(url: str) -> str:
    with pytest.raises(ValueError, match=" in '") as info:
        open_backend(url)
    message = str(info.value)
    assert "s3cret" not in message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_an_unknown_option_is_refused_naming_the_options_of_the_scheme(scheme: str) -> None:
    base, known = SCHEMES[scheme]
    message = _refusal(f"{base}?namspace=app")
    assert f"unknown option namspace= in '{parse_url(base).redacted}?namspace=app'" in message
    assert "did you mean namespace=?" in message
    listed = message.rsplit(f"{scheme}:// URLs take ", 1)[1]
    assert sorted(listed.split(", ")) == sorted(f"{name}=" for name in known)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_an_option_of_another_scheme_is_refused(scheme: str) -> None:
    base, known = SCHEMES[scheme]
    foreign = next(
        name for _, (_, options) in sorted(SCHEMES.items()) for name in sorted(options - known)
    )
    assert f"unknown option {foreign}=" in _refusal(f"{base}?{foreign}=1")


@pytest.mark.parametrize(
    ("scheme", "option", "value", "accepted"),
    [
        ("sqlite", "poll", "abc", "> 0 (seconds, or with a unit: 50ms"),
        ("sqlite", "poll", "-1", "> 0 (seconds"),
        ("sqlite", "poll", "0", "> 0 (seconds"),
        ("sqlite", "poll", "nan", "> 0 (seconds"),
        ("sqlite", "poll", "", "> 0 (seconds"),
        ("sqlite", "poll", "5 parsecs", "> 0 (seconds"),
        ("redis", "maxlen", "-3", ">= 0 (a whole number)"),
        ("redis", "maxlen", "1.5", ">= 0 (a whole number)"),
        ("redis", "dedup_window", "soon", ">= 0 (a whole number)"),
        ("nats", "max_age", "-1", ">= 0 (seconds"),
        ("nats", "max_age", "forever", ">= 0 (seconds"),
        ("nats", "max_age", "inf", ">= 0 (seconds"),
        ("nats", "replicas", "0", ">= 1 (a whole number)"),
        ("nats", "replicas", "two", ">= 1 (a whole number)"),
        ("nats", "servers", "10.0.0.2", "a comma-separated list of host:port"),
        ("nats", "servers", "10.0.0.2:4222,:4223", "a comma-separated list of host:port"),
        ("nats", "servers", "10.0.0.2:99999", "a comma-separated list of host:port"),
        ("redis", "min_replicas", "two", ">= 0 (a whole number)"),
        ("redis", "replica_wait", "0", ">= 0.001 (seconds"),
        ("redis", "replica_wait", "0.5ms", ">= 0.001 (seconds"),
        ("amqp", "prefetch", "0", ">= 1 (a whole number)"),
        ("amqp", "heartbeat", "x", ">= 1 (a whole number)"),
        ("amqp", "connect_timeout", "0", "> 0 (seconds"),
        ("amqp", "history", "forever", "e.g. history=7d"),
        ("amqp", "queues", "mirrored", "one of quorum, classic"),
        ("sqlite", "namespace", "a.b", "1 to 64 of A-Z a-z 0-9 _ -"),
        ("redis", "namespace", "", "1 to 64 of A-Z a-z 0-9 _ -"),
    ],
)
def test_a_bad_value_names_the_option_the_value_what_is_accepted_and_the_url(
    scheme: str, option: str, value: str, accepted: str
) -> None:
    base, _ = SCHEMES[scheme]
    message = _refusal(f"{base}?{option}={value}")
    assert f"{option}={value!r} in " in message or f"{option} {value!r} in " in message
    assert f"'{parse_url(base).redacted}?{option}={value}'" in message
    assert accepted in message


@pytest.mark.parametrize(
    ("url", "attribute", "expected"),
    [
        ("sqlite:///bus.db?poll=50ms", "poll", 0.05),
        ("sqlite:///bus.db?poll=0.2", "poll", 0.2),
        ("sqlite:///bus.db", "poll", 0.05),
        ("nats://127.0.0.1:4222?max_age=7d&replicas=3", "max_age", 7 * 86_400.0),
        ("nats://127.0.0.1:4222?max_age=90", "max_age", 90.0),
        ("nats://127.0.0.1:4222?replicas=3", "replicas", 3),
        ("amqp://127.0.0.1/?connect_timeout=1.5s", "_connect_timeout", 1.5),
        ("amqp://127.0.0.1/?prefetch=5&heartbeat=10", "_heartbeat", 10),
        ("redis://127.0.0.1/0?maxlen=10&dedup_window=60", "_maxlen", 10),
        ("redis://127.0.0.1/0?maxlen=10&dedup_window=60", "_dedup_window", 60),
        ("redis://127.0.0.1/0?min_replicas=2&replica_wait=250ms", "_min_replicas", 2),
        ("redis://127.0.0.1/0?min_replicas=2&replica_wait=250ms", "_replica_wait", 0.25),
        ("nats://127.0.0.1", "seeds", ["127.0.0.1:4222"]),
        (
            "nats://n1:4222?servers=n2:4223, [::1]:4224",
            "seeds",
            ["n1:4222", "n2:4223", "[::1]:4224"],
        ),
    ],
)
def test_good_values_are_read(url: str, attribute: str, expected: object) -> None:
    assert getattr(open_backend(url), attribute) == expected


def test_the_reader_refuses_an_option_it_was_not_told_of() -> None:
    options = URLOptions(parse_url("sqlite:///bus.db?poll=1"), ["poll"])
    assert options.known == {"namespace", "poll"}
    with pytest.raises(KeyError, match="'pol' is not an option of sqlite:// URLs"):
        options.text("pol")


def test_durations_take_units() -> None:
    query = "a=250ms&b=2s&c=5m&d=12h&e=7d&f=1.5&g=1e-3"
    options = URLOptions(parse_url(f"nats://h?{query}"), "abcdefg")
    assert [options.duration(name, 0) for name in "abcdefg"] == [
        0.25,
        2.0,
        300.0,
        43_200.0,
        604_800.0,
        1.5,
        0.001,
    ]
    assert options.duration("namespace", 9.0) == 9.0  # absent: the default


def test_choice_takes_one_of_its_values_without_case() -> None:
    options = URLOptions(parse_url("amqp://h/?mode=FAST&other=slowish"), ["mode", "other"])
    assert options.choice("mode", "safe", ("fast", "safe")) == "fast"
    with pytest.raises(ValueError, match=r"other='slowish' .* must be one of fast, safe"):
        options.choice("other", "safe", ("fast", "safe"))


def test_the_in_process_bus_refuses_unknown_options_too() -> None:
    EventBus("memory://?namespace=app")  # the one option every scheme takes
    with pytest.raises(ValueError, match=r"unknown option namspace=.*did you mean namespace="):
        EventBus("memory://?namspace=app")
