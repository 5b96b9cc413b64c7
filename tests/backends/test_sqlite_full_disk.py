"""A SQLite bus on a disk that fills up: `publish` fails with `BrokerFullError` (not a raw
sqlite3 error), nothing it accepted is lost, and once space is freed it works again. The disk
is a 2 MiB tmpfs of the test's own (mounting it needs root, as in CI)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventwire import BrokerFullError, Event, EventBus
from tests.conftest import wait_until


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        message = "mounting a small tmpfs needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def publish_until_it_fails(bus: EventBus, returned: list[int]) -> None:
    for n in range(20_000):  # far more than 2 MiB holds
        await bus.publish("disk.fill", {"n": n, "pad": "x" * 1024})
        returned.append(n)


async def test_a_full_disk_fails_publish_clearly_and_loses_nothing(small_disk: Path) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 400_000)  # freed later, to make room again
    seen: list[int] = []

    async def handle(event: Event[Any]) -> None:
        seen.append(event.payload["n"])

    bus = EventBus(f"sqlite:///{small_disk}/bus.db", close_grace=2.0)
    bus.subscribe("disk.fill", handle, name="reader")
    returned: list[int] = []
    async with bus:
        with pytest.raises(BrokerFullError, match="is full") as full:
            await publish_until_it_fails(bus, returned)
        assert "sqlite3" not in type(full.value).__module__
        assert returned, "some publishes were stored before the disk filled"
        filler.unlink()
        after = len(returned) + 1_000_000
        await bus.publish("disk.fill", {"n": after, "pad": ""})  # room again: it works
        await wait_until(lambda: set(returned) | {after} <= set(seen), timeout=60)


async def test_closing_on_a_full_disk_ends_and_what_was_stored_comes_again(
    small_disk: Path,
) -> None:
    # The acknowledgements cannot be written either: closing used to retry them for ever.
    url = f"sqlite:///{small_disk}/bus.db"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 400_000)
    seen: list[int] = []
    bus = EventBus(url, close_grace=1.0)
    bus.subscribe("disk.fill", lambda e: seen.append(e.payload["n"]), name="reader")
    returned: list[int] = []
    await bus.start()
    with pytest.raises(BrokerFullError):
        await publish_until_it_fails(bus, returned)
    await asyncio.wait_for(bus.close(), timeout=30)
    assert returned
    # Nothing that was stored is lost: once there is room, a new process gets whatever the
    # first did not acknowledge, and has handled every stored event between them.
    filler.unlink()
    again: list[int] = []
    later = EventBus(url, close_grace=1.0)
    later.subscribe("disk.fill", lambda e: again.append(e.payload["n"]), name="reader")
    async with later:
        await wait_until(lambda: set(returned) <= set(seen) | set(again), timeout=60)
