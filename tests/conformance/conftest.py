"""The delivery contract, run on every backend: the `bus` fixture here is parametrized over
memory, sqlite, redis, nats and amqp (with quorum queues, and with classic ones), each against
the real service."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventwire import EventBus
from eventwire.backends import open_backend
from tests.services import require_service, unique_namespace, with_namespace

BACKENDS = ("memory", "sqlite", "redis", "nats", "amqp", "amqp-classic")
_SERVICE_OF = {"redis": "redis", "nats": "nats", "amqp": "rabbitmq"}


def backend_url(backend: str, tmp_path: Path) -> str:
    """A URL of `backend` no other test shares (skips when its service is unreachable)."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/bus.db"
    # RabbitMQ keeps no handled ids (idempotent=True): a SQLite file of the test keeps them.
    handled = f"&handled=sqlite:///{tmp_path}/handled.db"
    if backend == "amqp-classic":
        # RabbitMQ with classic queues (?queues=classic), light enough for 10,000 on a node.
        url = require_service("rabbitmq") + "?queues=classic" + handled
        return with_namespace(url, unique_namespace())
    if backend == "amqp-journal":
        # RabbitMQ, with durable runs journaled in a SQLite file (RabbitMQ has no store).
        return backend_url("amqp", tmp_path) + f"&journal=sqlite:///{tmp_path}/runs.db"
    if backend == "amqp-history":
        # RabbitMQ keeping a history stream, for the tools that read the past.
        return backend_url("amqp", tmp_path) + "&history=1d"
    if importlib.util.find_spec(f"eventwire.backends.{backend}") is None:
        pytest.skip(f"the {backend}:// backend is not built yet")
    service = require_service(_SERVICE_OF[backend])
    if backend == "amqp":
        service += "?" + handled[1:]
    return with_namespace(service, unique_namespace())


async def destroy(url: str) -> None:
    """Remove what a test stored on its broker."""
    backend = open_backend(url)
    with contextlib.suppress(Exception):
        await backend.connect()
        await backend.destroy()
    await backend.close()


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def bus_url(backend_name: str, tmp_path: Path) -> AsyncIterator[str]:
    url = backend_url(backend_name, tmp_path)
    yield url
    await destroy(url)


@pytest.fixture
async def bus(bus_url: str) -> AsyncIterator[EventBus]:
    """A running bus on each backend, closed after the test."""
    async with EventBus(bus_url, close_grace=2.0, redeliver_after=5.0) as running:
        yield running
