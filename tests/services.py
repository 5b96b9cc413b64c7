"""The real services the backend tests talk to, and how a test asks for one.

Outside CI a test whose service is unreachable is skipped with a message naming it; with
``CI=true`` it fails instead (``.ci/run`` starts the services first).
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# name -> (host, port, bus URL without namespace)
SERVICES: dict[str, tuple[str, int, str]] = {
    "redis": ("127.0.0.1", 6379, "redis://127.0.0.1:6379/0"),
    "nats": ("127.0.0.1", 4222, "nats://127.0.0.1:4222"),
    "rabbitmq": ("127.0.0.1", 5672, "amqp://guest:guest@127.0.0.1:5672/"),
}


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str) -> str:
    """The service's bus URL; skip (or, under CI=true, fail) when it is unreachable."""
    host, port, url = SERVICES[name]
    if not reachable(host, port):
        message = f"{name} is not reachable on {host}:{port} (start it: see DEVELOPERS.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url


def unique_namespace() -> str:
    """A namespace no other test uses: its streams, queues and keys are its own."""
    return f"t{uuid.uuid4().hex[:12]}"


def with_namespace(url: str, namespace: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}namespace={namespace}"
