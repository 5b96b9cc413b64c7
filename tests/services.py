"""The real services the backend tests talk to, how a test asks for one, and private
broker processes a test may kill and restart.

Outside CI a test whose service is unreachable is skipped with a message naming it; with
``CI=true`` it fails instead (``.ci/run`` starts the services first).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

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
        message = f"{name} is not reachable on {host}:{port} (start it: see CONTRIBUTING.md)"
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


PROGRAMS = {"redis": "redis-server", "nats": "nats-server", "rabbitmq": "rabbitmq-server"}
# The packaged rabbitmq-server in /usr/sbin re-runs itself as the rabbitmq user; this one runs
# as the caller, with the data, config and node name the environment gives it.
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


# What a broker process may open when its tests ask: RabbitMQ's guidance for production, or
# as much of it as the machine's hard limit allows.
OPEN_FILES_WANTED = 65_536


def open_files_allowed() -> int:
    """The open-files limit a private broker gets (see `raise_open_files_limit`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else hard
    return max(soft, min(ceiling, OPEN_FILES_WANTED))


def raise_open_files_limit() -> None:
    """In a private broker's process, before it starts: raise its open-files limit (a quorum
    queue keeps files open; a thousand of them need more than a default 1,024)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files_allowed(), hard))


class PrivateServer:
    """A redis-server, nats-server or rabbitmq-server of one test's own, on a free port with
    its data in `data`.

    `kill()` (SIGKILL) or `stop()` (SIGTERM) it, then `start()` it again on the same port and
    data: Redis keeps every acknowledged write (fsync-always AOF), NATS runs JetStream,
    RabbitMQ keeps its durable queues (a node of its own, not the shared one's config).
    """

    def __init__(self, kind: str, data: Path, *extra: str) -> None:
        self.kind = kind
        self.data = data
        self.extra = extra  # more server flags, e.g. credentials
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.kind == "redis":
            return f"redis://127.0.0.1:{self.port}/0"
        if self.kind == "rabbitmq":
            return f"amqp://guest:guest@127.0.0.1:{self.port}/"
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        port, data = str(self.port), str(self.data)
        if self.kind == "redis":
            flags = ["--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"]
            flags += ["--appendfsync", "always", "--dir", data]
        elif self.kind == "rabbitmq":
            return [RABBITMQ_SERVER]  # configured by its environment()
        else:
            flags = ["-a", "127.0.0.1", "-p", port, "-js", "-sd", data]
        return [PROGRAMS[self.kind], *flags, *self.extra]

    def environment(self) -> dict[str, str] | None:
        """RabbitMQ's settings: none of the shared node's files (its config names port 5672)."""
        if self.kind != "rabbitmq":
            return None
        for name, text in (("rabbitmq.conf", ""), ("env.conf", ""), ("plugins", "[].\n")):
            (self.data / name).write_text(text, encoding="utf-8")
        return os.environ | {
            "RABBITMQ_NODENAME": f"ew{self.port}@localhost",  # its data dir's name: keep it
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.data / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.data / "env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.data / "plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.data / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.data / "log"),
            "HOME": str(self.data),  # its Erlang cookie
            # The script then execs the VM, so that signals reach the broker itself.
            "RUNNING_UNDER_SYSTEMD": "true",
        }

    def _launch(self) -> subprocess.Popen[bytes]:
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.environment(),
            preexec_fn=raise_open_files_limit if self.kind == "rabbitmq" else None,
        )
        return self.process

    def _still_starting(self, process: subprocess.Popen[bytes], deadline: float) -> bool:
        """False once the server accepts connections; fails if it exited or took too long."""
        if reachable("127.0.0.1", self.port, timeout=0.2):
            return False
        program = PROGRAMS[self.kind]
        assert process.poll() is None, f"{program} exited"
        assert time.monotonic() < deadline, f"{program} did not start"
        return True

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and block until it accepts connections (a RabbitMQ node boots in
        well over 20 s when another test file shares the two cores)."""
        process, deadline = self._launch(), time.monotonic() + timeout
        while self._still_starting(process, deadline):
            time.sleep(0.02)

    async def start_async(self, timeout: float = 60.0) -> None:
        """Start the server and wait, without blocking the event loop, until it is reachable."""
        process, deadline = self._launch(), time.monotonic() + timeout
        while self._still_starting(process, deadline):  # noqa: ASYNC110 - a port, no event
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: as if the machine lost power (what it fsynced survives)."""
        self._end(subprocess.Popen.kill)

    def stop(self) -> None:
        """SIGTERM: an orderly shutdown."""
        self._end(subprocess.Popen.terminate)

    def _end(self, signal: Callable[[subprocess.Popen[bytes]], None]) -> None:
        if self.process is not None and self.process.poll() is None:
            signal(self.process)
            self.process.wait(20)
        self.process = None

    async def restart(self) -> None:
        """Stop it and start it again on the same port and data, the event loop running on."""
        await asyncio.to_thread(self.stop)
        await self.start_async()


@contextlib.contextmanager
def private_server(kind: str, data: Path, *extra: str) -> Iterator[PrivateServer]:
    """A started `PrivateServer`, killed afterwards; skips when the program is not installed."""
    program = PROGRAMS[kind]
    if shutil.which(RABBITMQ_SERVER if kind == "rabbitmq" else program) is None:
        pytest.skip(f"{program} is not installed, so no private {kind} server can be started")
    server = PrivateServer(kind, data, *extra)
    server.start()
    try:
        yield server
    finally:
        server.kill()
