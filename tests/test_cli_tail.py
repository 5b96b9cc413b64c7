"""`eventwire tail` through its real entry point, against real brokers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from eventwire import Event
from eventwire.backends.broker import BrokerBackend
from eventwire.bus import DLQ_CONSUMER
from tests.conformance.conftest import backend_url
from tests.test_cli_dlq import EVENTWIRE, cli
from tests.test_history import started

READY = "tailing "


class Command:
    """A running ``eventwire`` command: its process and what it printed so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.printed = {"stdout": "", "stderr": ""}

    @property
    def stderr(self) -> str:
        return self.printed["stderr"]

    async def ready(self, marker: str = READY, stream: str = "stderr", timeout: float = 30) -> None:
        """Wait for `marker` on `stream` (by default, tail's line saying its consumer exists)."""
        reader = self.process.stderr if stream == "stderr" else self.process.stdout
        assert reader is not None
        async with asyncio.timeout(timeout):
            while marker not in self.printed[stream]:
                line = await reader.readline()
                assert line, f"exited before printing {marker!r}: {self.printed}"
                self.printed[stream] += line.decode()

    async def finish(self, timeout: float = 30) -> tuple[int, str]:
        """(exit code, all of stdout) once it exits by itself."""
        stdout, stderr = await asyncio.wait_for(self.process.communicate(), timeout)
        self.printed["stdout"] += stdout.decode()
        self.printed["stderr"] += stderr.decode()
        assert self.process.returncode is not None
        return self.process.returncode, self.printed["stdout"]


@asynccontextmanager
async def eventwire(*args: str, cwd: Path | None = None) -> AsyncIterator[Command]:
    """``eventwire ARGS`` started in the background; killed on exit if still running."""
    environment = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    environment.pop("EVENTWIRE_URL", None)
    process = await asyncio.create_subprocess_exec(
        str(EVENTWIRE),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
        cwd=cwd,
    )
    try:
        yield Command(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def tail(*args: str) -> AbstractAsyncContextManager[Command]:
    return eventwire("tail", *args)


@pytest.mark.parametrize("kind", ["sqlite", "redis", "amqp"])
async def test_shows_each_matching_event_as_it_passes(kind: str, tmp_path: Path) -> None:
    url = backend_url(kind, tmp_path)
    async with started(url) as bus:
        await bus.publish("shop.order", "before tail started")
        async with tail("shop.>", "--url", url, "--count", "2", "--timeout", "60") as running:
            await running.ready()
            assert url.split("?")[0].split("@")[-1] in running.stderr
            root = await bus.publish("shop.order", {"sku": "A-1", "qty": 2}, key="c-9")
            await bus.publish("other.topic", "not shown")
            await bus.publish(Event("shop.paid", "ok", source="billing", causation_id=root.id))
            code, stdout = await running.finish()
    assert code == 0, running.stderr
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout
    assert "shop.order" in lines[0]
    assert root.id[-12:] in lines[0]
    assert '{"sku":"A-1","qty":2}' in lines[0]
    assert "shop.paid" in lines[1]
    assert "billing" in lines[1]
    assert f"cause …{root.id[-12:]}" in lines[1]
    assert "before tail started" not in stdout


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_json_prints_one_document_per_event(kind: str, tmp_path: Path) -> None:
    url = backend_url(kind, tmp_path)
    async with (
        started(url) as bus,
        tail("_dlq.>", "--json", "--url", url, "--count", "1") as running,
    ):
        await running.ready()
        letter = Event("_dlq.shop.order", Event("shop.order", {"n": 1}), {"error": "boom"})
        await bus.publish(letter)
        code, stdout = await running.finish()
    assert code == 0, running.stderr
    [document] = [json.loads(line) for line in stdout.splitlines()]
    assert document["id"] == letter.id
    assert document["topic"] == "_dlq.shop.order"
    assert document["metadata"] == {"error": "boom"}
    assert document["payload"]["topic"] == "shop.order"
    assert document["payload"]["payload"] == {"n": 1}


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_it_cleanly_and_removes_its_consumer(
    stop: signal.Signals, tmp_path: Path
) -> None:
    url = backend_url("sqlite", tmp_path)
    async with started(url) as bus, tail(">", "--url", url) as running:
        await running.ready()
        running.process.send_signal(stop)
        code, _ = await running.finish()
        backend = bus.backend
        assert isinstance(backend, BrokerBackend)
        left = [info.name for info in await backend.consumers()]
    assert code == 0, running.stderr
    assert left == [DLQ_CONSUMER]


async def test_timeout_ends_it_without_events(tmp_path: Path) -> None:
    url = backend_url("sqlite", tmp_path)
    async with started(url), tail("quiet.>", "--url", url, "--timeout", "0.5") as running:
        await running.ready()
        code, stdout = await running.finish()
    assert (code, stdout) == (0, "")


def test_in_process_bus_and_bad_input_are_clear_errors(tmp_path: Path) -> None:
    for args in (["tail", ">"], ["tail", ">", "--url", "memory://"]):
        shown = cli(*args)
        assert shown.returncode == 2
        assert "in-process" in shown.stderr
        assert "no other process can see them" in shown.stderr
    bad = cli("tail", "orders.>.x", "--url", f"sqlite:///{tmp_path}/bus.db")
    assert bad.returncode == 2
    assert "'>' must be last" in bad.stderr
    unreachable = cli("tail", ">", "--url", "redis://:s3cret@127.0.0.1:1/0")
    assert unreachable.returncode == 2
    assert "127.0.0.1:1" in unreachable.stderr
    assert "s3cret" not in unreachable.stderr + unreachable.stdout


def test_help_shows_examples() -> None:
    shown = cli("tail", "--help")
    assert shown.returncode == 0
    assert "eventwire tail 'orders.>' --json" in shown.stdout
