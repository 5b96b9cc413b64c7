"""`eventwire publish` through its real entry point, onto a durable bus that a reader then
replays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from eventwire import Event, EventBus

EVENTWIRE = Path(sys.executable).parent / "eventwire"


def cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``eventwire ARGS`` as a user runs it, without EVENTWIRE_URL unless `env` sets it."""
    environment = {k: v for k, v in os.environ.items() if k != "EVENTWIRE_URL"}
    environment.update(NO_COLOR="1", COLUMNS="200", **(env or {}))
    return subprocess.run(
        [str(EVENTWIRE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        check=False,
    )


async def published(url: str, count: int) -> list[Event[Any]]:
    """The first `count` events on ``t.>`` of the bus at `url`, read from its start."""
    reader = EventBus(url)
    reader.subscribe("t.>", lambda event: None, name="reader", start="earliest")
    async with reader.record() as seen, reader:
        return list(await seen.wait_for("t.>", count=count, timeout=10))


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
    assert "invalid character" in bad_topic.stderr
    bad_metadata = cli("publish", "t.x", "x", "-m", "no-equals", "--url", url)
    assert bad_metadata.returncode == 2
    assert "key=value" in bad_metadata.stderr
    unreachable = cli("publish", "t.x", "x", "--url", "redis://:s3cret@127.0.0.1:1/0")
    assert unreachable.returncode == 2
    assert "127.0.0.1:1" in unreachable.stderr
    assert "s3cret" not in unreachable.stdout + unreachable.stderr
    for failed in (bad_topic, bad_metadata, unreachable):
        assert failed.stdout == ""  # errors go to standard error, as docs/cli.md says
        assert len(failed.stderr.splitlines()) == 1, failed.stderr
        assert failed.stderr.startswith("error: ")


def test_without_a_broker_url_it_refuses_instead_of_publishing_to_no_one() -> None:
    nowhere = cli("publish", "t.x", "hello")
    assert nowhere.returncode == 2
    assert nowhere.stdout == ""
    assert "pass --url" in nowhere.stderr
    assert "EVENTWIRE_URL" in nowhere.stderr
    in_process = cli("publish", "t.x", "hello", env={"EVENTWIRE_URL": "memory://"})
    assert in_process.returncode == 2
    assert "memory:// is the in-process bus" in in_process.stderr


async def test_the_url_may_come_from_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    result = cli("publish", "t.env", "hello", env={"EVENTWIRE_URL": url})
    assert result.returncode == 0, result.stderr
    [event] = await published(url, 1)
    assert (event.id, event.payload) == (result.stdout.strip(), "hello")


async def test_payloads_from_standard_input_and_files(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    (tmp_path / "order.json").write_text('{"order": 7, "items": ["a"]}\n', encoding="utf-8")
    (tmp_path / "notes.md").write_text("[draft] first line\nsecond line\n", encoding="utf-8")
    results = [
        cli("publish", "t.stdin", "-", "--url", url, stdin='{"from": "stdin"}\n'),
        cli("publish", "t.stdin", "-", "--url", url, stdin="just words\n"),
        cli("publish", "t.file", f"@{tmp_path / 'order.json'}", "--url", url),
        cli("publish", "t.file", f"@{tmp_path / 'notes.md'}", "--text", "--url", url),
    ]
    for result in results:
        assert result.returncode == 0, result.stderr
    events = await published(url, len(results))
    assert [event.id for event in events] == [result.stdout.strip() for result in results]
    assert [event.payload for event in events] == [
        {"from": "stdin"},
        "just words",
        {"order": 7, "items": ["a"]},
        "[draft] first line\nsecond line",
    ]
    missing = cli("publish", "t.file", f"@{tmp_path / 'missing.json'}", "--url", url)
    assert missing.returncode == 2
    assert "cannot read the payload from" in missing.stderr
    assert "missing.json" in missing.stderr


async def test_broken_json_is_refused_unless_sent_as_text(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    for broken in ('{"text": "refund?",}', "[1, 2", '"unterminated', "  {oops}"):
        refused = cli("publish", "t.x", broken, "--url", url)
        assert refused.returncode == 2, (broken, refused.stdout)
        assert "looks like JSON but does not parse" in refused.stderr, refused.stderr
        assert "--text" in refused.stderr
    from_stdin = cli("publish", "t.x", "-", "--url", url, stdin='{"a": 1,,}')
    assert from_stdin.returncode == 2
    assert "looks like JSON but does not parse" in from_stdin.stderr
    as_text = cli("publish", "t.x", '{"text": "refund?",}', "--text", "--url", url)
    json_as_text = cli("publish", "t.x", "[1, 2]", "--text", "--url", url)
    not_a_number = cli("publish", "t.x", "NaN", "--url", url)
    for result in (as_text, json_as_text, not_a_number):
        assert result.returncode == 0, result.stderr
    events = await published(url, 3)
    assert [event.payload for event in events] == ['{"text": "refund?",}', "[1, 2]", "NaN"]


def test_help_shows_an_example() -> None:
    shown = cli("publish", "--help")
    assert shown.returncode == 0
    assert "eventwire publish user.query" in shown.stdout
