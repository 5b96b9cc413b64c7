"""The soak, short form (issue 11): on each durable backend, a steady publisher and two
`eventwire run` consumers, one SIGKILLed and started again every few seconds, and the broker
restarted once midway (a private one; SQLite has no broker, its file stays). Every event whose
`publish` returned is handled by both subscriptions, and every process ends. The long form,
with its figures, is `bench/bench_soak.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak import DURABLE, SoakConfig, soak

SECONDS = 20.0


@pytest.mark.timeout(SECONDS + 150)
@pytest.mark.parametrize("backend", DURABLE)
async def test_no_returned_publish_is_lost_through_kills_and_a_broker_restart(
    backend: str, tmp_path: Path
) -> None:
    config = SoakConfig(seconds=SECONDS, rate=100.0, kill_every=3.0, settle_timeout=60.0)
    result = await soak(backend, tmp_path, config)
    details = result.as_json() | {"memory": f"{len(result.memory)} samples"}
    assert result.total_lost == 0, details
    assert result.publish_errors == {}, details
    assert result.kills >= 3, details
    assert result.restarts == (0 if backend == "sqlite" else 1), details
    assert result.returned >= SECONDS * config.rate / 3, details  # a stalled publisher fails
    # Stopped with SIGTERM once everything was handled: each says it finished clean.
    assert result.exit_codes == {"survivor": 0, "victim": 0}, details
    assert result.left_running == 0, details
