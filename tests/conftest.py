from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from eventwire import EventBus


@pytest.fixture
async def bus() -> AsyncIterator[EventBus]:
    """A running in-process bus, closed after the test."""
    async with EventBus(close_grace=2.0) as running:
        yield running


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait for `condition` to hold, checking at every loop turn; fail after `timeout`."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - polls state that has no event to wait on
            await asyncio.sleep(0.001)
