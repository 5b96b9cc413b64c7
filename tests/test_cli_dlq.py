"""`eventwire dlq list|show|retry|purge` through the real entry point, against real brokers:
against an app in this process, and against an app run by `eventwire run` in its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus, Retry
from tests.conformance.conftest import backend_url, destroy

EVENTWIRE = str(Path(sys.executable).parent / "eventwire")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``eventwire ARGS`` with no terminal on standard input."""
    env = {k: v for k, v in os.environ.items() if k != "EVENTWIRE_URL"}
    env.update(NO_COLOR="1", COLUMNS="200")
    return subprocess.run(
        [EVENTWIRE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        check=False,
    )


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    """`cli` off the event loop, so that the bus of this process goes on working meanwhile."""
    return await asyncio.to_thread(cli, *args)


async def letters(url: str, *options: str) -> list[dict[str, Any]]:
    listed = await run("dlq", "list", "--json", "--url", url, *options)
    assert listed.returncode == 0, listed.stderr
    found: list[dict[str, Any]] = json.loads(listed.stdout)
    return found


@pytest.fixture(params=("sqlite", "redis", "nats", "amqp"))
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    address = backend_url(str(request.param), tmp_path)
    yield address
    await destroy(address)


async def test_list_show_retry_and_purge_on_a_broker(url: str) -> None:
    fixed = False
    handled: list[Event[Any]] = []
    audited: list[Event[Any]] = []

    async def worker(event: Event[Any]) -> None:
        if not fixed:
            raise ValueError(f"bad order {event.payload['n']}")
        handled.append(event)

    bus = EventBus(url, close_grace=2.0, redeliver_after=5.0)
    bus.subscribe("orders.created", worker, name="worker", retry=Retry(attempts=2, backoff=0))
    bus.subscribe("orders.created", audited.append, name="audit")
    async with bus:
        published = [await bus.publish("orders.created", {"n": n}) for n in range(3)]
        await bus.drain(timeout=20)

        found = await letters(url)
        assert [letter["event_id"] for letter in found] == [event.id for event in published]
        assert found[0]["error"] == "ValueError: bad order 0"
        assert [letter["attempts"] for letter in found] == [2, 2, 2]
        assert {letter["subscription"] for letter in found} == {"worker"}
        table = await run("dlq", "list", "--url", url)
        assert table.returncode == 0, table.stderr
        assert "ValueError: bad order 1" in table.stdout
        assert found[1]["id"][-12:] in table.stdout

        first = found[0]["id"][-12:]
        shown = await run("dlq", "show", first, "--json", "--url", url)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["event"]["payload"] == {"n": 0}

        fixed = True
        retried = await run("dlq", "retry", first, "--url", url)
        assert retried.returncode == 0, retried.stderr
        assert "retried 1 dead letter(s)" in retried.stdout
        await bus.drain(timeout=20)
        assert [event.id for event in handled] == [published[0].id]
        assert len(audited) == 3  # the other subscription did not see it again
        assert [letter["id"] for letter in await letters(url)] == [f["id"] for f in found[1:]]

        everything = await run("dlq", "retry", "--all", "--yes", "--url", url)
        assert everything.returncode == 0, everything.stderr
        assert "retried 2 dead letter(s)" in everything.stdout
        await bus.drain(timeout=20)
        assert sorted(event.payload["n"] for event in handled) == [0, 1, 2]
        assert await letters(url) == []

        fixed = False
        await bus.publish("orders.created", {"n": 3})
        await bus.publish("orders.created", {"n": 4})
        await bus.drain(timeout=20)
        unconfirmed = await run("dlq", "purge", "--all", "--url", url)
        assert unconfirmed.returncode == 2
        assert "pass --yes" in unconfirmed.stderr
        assert len(await letters(url)) == 2
        purged = await run("dlq", "purge", "--all", "--yes", "--url", url)
        assert purged.returncode == 0, purged.stderr
        assert "purged 2 dead letter(s)" in purged.stdout
        assert await letters(url) == []

        unknown = await run("dlq", "show", "0123456789ab", "--url", url)
        assert unknown.returncode == 1
        assert "no dead letter has id '0123456789ab'" in unknown.stderr
        assert len(handled) == 3


APP = textwrap.dedent(
    """
    from pathlib import Path

    from eventwire import Event, EventBus, Retry

    HERE = Path(__file__).parent
    bus = EventBus(redeliver_after=5.0)


    def note(name: str, event: Event) -> None:
        with open(HERE / name, "a", encoding="utf-8") as log:
            log.write(event.id + "\\n")


    @bus.subscribe("orders.created", name="worker", retry=Retry(attempts=1))
    async def worker(event: Event) -> None:
        if not (HERE / "fixed").exists():
            raise RuntimeError("payment service down")
        note("worker.log", event)


    @bus.subscribe("orders.created", name="audit")
    async def audit(event: Event) -> None:
        note("audit.log", event)
    """
)


def start_app(directory: Path, url: str) -> subprocess.Popen[str]:
    """`eventwire run` of the shop app on `url`, in its own process."""
    (directory / "shop.py").write_text(APP, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "EVENTWIRE_URL"}
    return subprocess.Popen(
        [EVENTWIRE, "run", "shop:bus", "--url", url, "--grace", "2"],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def stop(app: subprocess.Popen[str]) -> None:
    app.send_signal(signal.SIGTERM)
    try:
        app.wait(20)
    except subprocess.TimeoutExpired:
        app.kill()
        app.wait(5)


@pytest.mark.parametrize("broker", ["sqlite", "redis", "nats"])  # cross-process drain
async def test_a_retried_letter_reaches_the_running_app_for_its_subscription_only(
    broker: str, tmp_path: Path
) -> None:
    url = backend_url(broker, tmp_path)
    app = start_app(tmp_path, url)
    try:
        assert app.stdout is not None
        # Bounded by the app's own exit and by the test's timeout.
        status = await asyncio.wait_for(asyncio.to_thread(app.stdout.readline), 30)
        assert "eventwire: running 2 subscription(s)" in status
        async with EventBus(url) as probe:
            events = [await probe.publish("orders.created", {"n": n}) for n in range(2)]
            await probe.drain(timeout=20)  # waits for the app's subscriptions too
            found = await letters(url)
            assert [letter["event_id"] for letter in found] == [event.id for event in events]
            assert found[0]["error"] == "RuntimeError: payment service down"

            (tmp_path / "fixed").touch()
            retried = await run("dlq", "retry", found[0]["id"], "--url", url)
            assert retried.returncode == 0, retried.stderr
            await probe.drain(timeout=20)
        logged = (tmp_path / "worker.log").read_text(encoding="utf-8").split()
        assert logged == [events[0].id]
        audited = (tmp_path / "audit.log").read_text(encoding="utf-8").split()
        assert sorted(audited) == sorted(event.id for event in events)  # once each
        assert [letter["id"] for letter in await letters(url)] == [found[1]["id"]]
    finally:
        await asyncio.to_thread(stop, app)
        await destroy(url)


def test_the_in_process_bus_is_explained_and_bad_input_is_refused(tmp_path: Path) -> None:
    memory = cli("dlq", "list", "--url", "memory://")
    assert memory.returncode == 2
    assert "_dlq.<topic>" in memory.stderr
    assert "_dlq.>" in memory.stderr
    url = f"sqlite:///{tmp_path}/bus.db"
    nothing = cli("dlq", "retry", "--url", url)
    assert nothing.returncode == 2
    assert "--all" in nothing.stderr
    both = cli("dlq", "purge", "abcdef", "--all", "--url", url)
    assert both.returncode == 2
    assert "not both" in both.stderr
    since = cli("dlq", "list", "--since", "yesterday", "--url", url)
    assert since.returncode == 2
    assert "--since 'yesterday'" in since.stderr
    pattern = cli("dlq", "list", "--topic", "a..b", "--url", url)
    assert pattern.returncode == 2
    assert "empty token" in pattern.stderr


def test_an_unreachable_broker_is_a_clear_error_without_the_password() -> None:
    failed = cli("dlq", "list", "--url", "redis://:s3cret@127.0.0.1:1/0")
    assert failed.returncode == 2
    assert "127.0.0.1:1" in failed.stderr
    assert "s3cret" not in failed.stdout + failed.stderr


@pytest.mark.parametrize("command", ["list", "show", "retry", "purge"])
def test_help_shows_examples(command: str) -> None:
    shown = cli("dlq", command, "--help")
    assert shown.returncode == 0
    assert f"eventwire dlq {command} " in shown.stdout


def answer_prompt(args: list[str], answer: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run ``eventwire ARGS`` on a terminal, type `answer` at its confirmation prompt; its
    exit status and everything it printed."""
    import pty
    import select
    import time

    parent, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "EVENTWIRE_URL"}
    env.update(NO_COLOR="1", COLUMNS="200", TERM="dumb")
    process = subprocess.Popen(
        [EVENTWIRE, *args], stdin=child, stdout=child, stderr=child, env=env, close_fds=True
    )
    os.close(child)
    seen = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([parent], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(parent, 4096)
                except OSError:  # the terminal closed: the command is done
                    break
                if not chunk:
                    break
                seen += chunk
            if not answered and b"[y/N]" in seen:
                os.write(parent, answer.encode() + b"\n")
                answered = True
            if process.poll() is not None and not ready:
                break
        status = process.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(parent)
    assert answered, f"no confirmation prompt came; the command printed: {seen.decode()!r}"
    return status, seen.decode(errors="replace")


async def test_purge_asks_on_a_terminal_and_does_only_what_was_agreed(tmp_path: Path) -> None:
    url = backend_url("sqlite", tmp_path)

    async def always_fails(event: Event[Any]) -> None:
        raise ValueError("cannot handle it")

    async with EventBus(url) as bus:
        bus.subscribe("orders.created", always_fails, name="billing", retry=Retry(attempts=1))
        await bus.publish("orders.created", {"n": 1})
        await bus.publish("orders.created", {"n": 2})
        await bus.drain(timeout=20)
    assert len(await letters(url)) == 2

    status, shown = await asyncio.to_thread(
        answer_prompt, ["dlq", "purge", "--all", "--url", url], "n"
    )
    assert status == 1, shown
    assert "Purge 2 dead letter(s)" in shown
    # The table of what would go came before the question.
    assert shown.index("ATTEMPTS") < shown.index("Purge 2 dead letter(s)")
    assert "nothing done" in shown
    assert len(await letters(url)) == 2

    status, shown = await asyncio.to_thread(
        answer_prompt, ["dlq", "purge", "--all", "--url", url], "y"
    )
    assert status == 0, shown
    assert "purged 2 dead letter(s)" in shown
    assert await letters(url) == []


BURST = 1500  # events and letters: past the 1,000 entries Redis counts per call


async def test_counts_are_right_right_after_a_burst(url: str) -> None:
    async def reject(event: Event[Any]) -> None:
        raise ValueError("rejected")

    bus = EventBus(url, close_grace=2.0, redeliver_after=5.0)
    bus.subscribe("burst.item", reject, name="rejecter")
    async with bus:
        await bus.publish_many([("burst.item", n) for n in range(BURST)])
        await bus.drain(timeout=120)
        # Before anything reads the dead letters (reading moves the queue's position).
        stats = await run("stats", "--json", "--timeout", "0.1", "--url", url)
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["dead_letters"] == BURST
        table = await run("dlq", "list", "--limit", "5", "--url", url)
        assert table.returncode == 0, table.stderr
        assert f"(the queue holds {BURST}; raise --limit)" in table.stdout
        assert len(await letters(url, "--limit", str(2 * BURST))) == BURST
