from __future__ import annotations

import asyncio
import importlib.util
import socket

import pytest

from eventwire import EventBus
from eventwire.backends import parse_url, require_extra
from eventwire.backends.base import BackendConnectionError


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
