"""`eventwire publish` through its real entry point, onto a durable bus that a reader then
replays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from eventwire import EventBus

EVENTWIRE = Path(sys.executable).parent / "eventwire"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [str(EVENTWIRE), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


async def test_published_events_reach_a_subscriber_with_payload_metadata_and_key(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    as_json = cli("publish", "user.query", '{"text": "refund?"}', "-m", "user_id=u-1", "--url", url)
    as_text = cli("publish", "user.query", "just words", "--key", "u-2", "--url", url)
    assert as_json.returncode == 0, as_json.stderr
    assert as_text.returncode == 0, as_text.stderr
    reader = EventBus(url)
    reader.subscribe("user.*", lambda event: None, name="reader", start="earliest")
    async with reader.record() as seen, reader:
        first, second = await seen.wait_for("user.*", count=2, timeout=10)
    assert first.id == as_json.stdout.strip()
    assert (first.payload, dict(first.metadata)) == ({"text": "refund?"}, {"user_id": "u-1"})
    assert second.id == as_text.stdout.strip()
    assert (second.payload, second.key) == ("just words", "u-2")


def test_bad_input_is_a_clear_error_and_exit_code_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    bad_topic = cli("publish", "bad topic", "x", "--url", url)
    assert bad_topic.returncode == 2
    assert "invalid character" in bad_topic.stdout
    bad_metadata = cli("publish", "t.x", "x", "-m", "no-equals", "--url", url)
    assert bad_metadata.returncode == 2
    assert "key=value" in bad_metadata.stdout
    unreachable = cli("publish", "t.x", "x", "--url", "redis://:s3cret@127.0.0.1:1/0")
    assert unreachable.returncode == 2
    assert "127.0.0.1:1" in unreachable.stdout
    assert "s3cret" not in unreachable.stdout + unreachable.stderr


def test_help_shows_an_example() -> None:
    shown = cli("publish", "--help")
    assert shown.returncode == 0
    assert "eventwire publish user.query" in shown.stdout
