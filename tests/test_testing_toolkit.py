"""The testing toolkit: `bus.record()` (eventwire.record) on the in-process bus and on real
brokers, and the pytest plugin (eventwire.testing) run through pytester."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus, Retry
from tests.services import require_service, unique_namespace, with_namespace

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
DOCS_EXAMPLE_TESTS = 5  # tests the example in docs/testing.md runs (parametrized included)


def chain(bus: EventBus, *, fail_email: bool = False) -> None:
    """user.query -> research.complete -> email.sent, each published by the previous handler."""

    async def research(event: Event[str]) -> None:
        await bus.publish("research.complete", f"about {event.payload}")

    async def email(event: Event[str]) -> None:
        if fail_email:
            raise RuntimeError("smtp down")
        await bus.publish("email.sent", event.payload)

    bus.subscribe("user.query", research, name="research")
    bus.subscribe("research.complete", email, name="email", retry=Retry(attempts=2, backoff=0))


# -- the recorder, in-process ------------------------------------------------------------


async def test_wait_for_returns_events_recorded_before_and_after_the_call(bus: EventBus) -> None:
    chain(bus)
    async with bus.record() as seen:
        root = await bus.publish("user.query", "revenue")
        assert seen.events == [root]  # recorded at publish, before any handler ran
        [sent] = await seen.wait_for("email.sent", timeout=2)
        [query] = await seen.wait_for("user.query", timeout=2)
    assert query is root
    assert sent.payload == "about revenue"
    assert seen.topics == ["user.query", "research.complete", "email.sent"]
    assert [r.subscription for r in seen.handlings] == ["research", "email"]
    assert {r.outcome for r in seen.handlings} == {"handled"}


async def test_wait_for_count_and_where(bus: EventBus) -> None:
    async with bus.record("n.>") as seen:
        for n in range(5):
            await bus.publish(f"n.{n % 2}", n)
        odd = await seen.wait_for("n.*", count=2, where=lambda e: e.payload % 2 == 1)
        assert [e.payload for e in odd] == [1, 3]
        with pytest.raises(AssertionError) as failure:
            await seen.wait_for("n.*", count=3, timeout=0.05, where=lambda e: e.payload > 2)
    message = str(failure.value)
    assert "waited 0.05s for 3 event(s) on 'n.*' passing where=" in message
    assert "saw 2 (on the topic, before where=: 5)" in message


async def test_wait_for_timeout_lists_what_was_seen(bus: EventBus) -> None:
    chain(bus, fail_email=True)
    async with bus.record() as seen:
        await bus.publish("user.query", "revenue")
        with pytest.raises(AssertionError) as failure:
            await seen.wait_for("email.sent", timeout=0.3)
    lines = str(failure.value).splitlines()
    assert lines[0] == "wait_for: waited 0.3s for 1 event(s) on 'email.sent'; saw 0."
    assert lines[1] == "Recorded on '>': 2 event(s): user.query x1, research.complete x1"
    assert re.fullmatch(
        r"  [\d:.]+ research\.complete 'about revenue' id=\S+ from research .*", lines[4]
    )
    assert "Handlings: research handled x1, email retrying x1, email dead_lettered x1" in lines
    assert any(
        re.fullmatch(
            r"  email on research\.complete \S+ attempt 2: dead_lettered: RuntimeError: smtp down",
            line,
        )
        for line in lines
    ), lines


async def test_wait_handled(bus: EventBus) -> None:
    chain(bus)
    async with bus.record() as seen:
        await bus.publish("user.query", "a")
        await bus.publish("user.query", "b")
        records = await seen.wait_handled(bus.subscriptions["email"], count=2, timeout=2)
        assert [r.outcome for r in records] == ["handled", "handled"]
        with pytest.raises(AssertionError) as failure:
            await seen.wait_handled("emial", timeout=0.05)
    message = str(failure.value)
    assert "subscription 'emial' to handle 1 event(s); it handled 0." in message
    assert "No subscription named 'emial' on this bus (it has: 'research', 'email')." in message


async def test_assert_caused_direct_and_transitive(bus: EventBus) -> None:
    chain(bus)
    async with bus.record() as seen:
        root = await bus.publish("user.query", "revenue")
        other = await bus.publish("user.query", "costs")
        await seen.wait_for("email.sent", count=2, timeout=2)
    [complete, _] = seen.of("research.complete")
    assert seen.assert_caused(root, "research.complete", direct=True) is complete
    sent = seen.assert_caused(root.id, "email.sent")  # through research.complete
    assert sent.causation_id == complete.id
    assert seen.assert_caused(complete, sent, direct=True) is sent

    with pytest.raises(AssertionError) as failure:
        seen.assert_caused(root, "email.sent", direct=True)
    message = str(failure.value)
    assert f"no event on 'email.sent' was caused by user.query {root.id} (directly)." in message
    assert (
        f"email.sent {sent.id} <- research.complete {complete.id} <- user.query {root.id}"
        in message
    )
    assert f"Events that user.query {root.id} did cause:" in message

    with pytest.raises(AssertionError, match=r"\(directly or through other events\)"):
        seen.assert_caused(other, sent)


async def test_assert_caused_follows_chains_through_unrecorded_topics(bus: EventBus) -> None:
    chain(bus)
    async with bus.record("email.>") as seen:
        root = await bus.publish("user.query", "revenue")
        await seen.wait_for("email.sent", timeout=2)
    assert seen.topics == ["email.sent"]
    seen.assert_caused(root, "email.sent")


async def test_assert_no_dead_letters_names_subscription_and_error(bus: EventBus) -> None:
    chain(bus, fail_email=True)
    async with bus.record() as seen:
        await bus.publish("user.query", "revenue")
        await seen.wait_for("research.complete", timeout=2)
        await bus.drain(timeout=2)
    assert [letter.topic for letter in seen.dead_letters] == ["_dlq.research.complete"]
    with pytest.raises(AssertionError) as failure:
        seen.assert_no_dead_letters()
    [first, letter, *_] = str(failure.value).splitlines()
    assert first == "assert_no_dead_letters: 1 dead letter(s):"
    assert re.fullmatch(
        r"  'email' gave up on research\.complete \S+ after 2 attempt\(s\): "
        r"RuntimeError: smtp down",
        letter,
    )


async def test_assert_no_dead_letters_passes_on_clean_run(bus: EventBus) -> None:
    chain(bus)
    async with bus.record() as seen:
        await bus.publish("user.query", "revenue")
        await seen.wait_for("email.sent", timeout=2)
    seen.assert_no_dead_letters()


async def test_assert_handled_counts_exactly(bus: EventBus) -> None:
    chain(bus)
    async with bus.record() as seen:
        for query in ("a", "b"):
            await bus.publish("user.query", query)
        await seen.wait_for("email.sent", count=2, timeout=2)
    seen.assert_handled("research", 2)
    for wrong in (1, 3):
        with pytest.raises(AssertionError) as failure:
            seen.assert_handled("research", wrong)
        assert f"handle exactly {wrong} event(s) during the recording; it handled 2:" in str(
            failure.value
        )


async def test_assert_published_with_count_and_payload(bus: EventBus) -> None:
    async with bus.record() as seen:
        await bus.publish("order.placed", {"id": 1})
        await bus.publish("order.placed", {"id": 2})
    assert len(seen.assert_published("order.*")) == 2
    [one] = seen.assert_published("order.placed", count=1, payload={"id": 2})
    assert one.payload == {"id": 2}
    with pytest.raises(AssertionError) as failure:
        seen.assert_published("order.placed", payload={"id": 3})
    message = str(failure.value)
    assert "expected at least 1 event on 'order.placed' with payload {'id': 3}; saw 0." in message
    assert "Events on 'order.placed' with other payloads:" in message
    with pytest.raises(AssertionError, match="exactly 1 event"):
        seen.assert_published("order.placed", count=1)
    with pytest.raises(AssertionError, match="saw 0"):
        seen.assert_published("order.shipped")


async def test_recording_stops_after_exit(bus: EventBus) -> None:
    chain(bus)
    async with bus.record() as seen:
        await bus.publish("user.query", "inside")
        await seen.wait_for("email.sent", timeout=2)
    assert repr(seen).startswith("<Recorder '>' stopped: 3 events")
    assert seen not in bus.observers
    await bus.publish("user.query", "outside")
    await bus.drain(timeout=2)
    assert [e.payload for e in seen.of("user.query")] == ["inside"]
    assert len(seen.handlings) == 2


async def test_pattern_filters_events_and_handlings(bus: EventBus) -> None:
    chain(bus)
    async with bus.record("research.>") as seen:
        await bus.publish("user.query", "x")
        await seen.wait_handled("email", timeout=2)
    assert seen.topics == ["research.complete"]
    assert [r.subscription for r in seen.handlings] == ["email"]
    with pytest.raises(ValueError, match="empty token"):
        bus.record("bad..pattern")


async def test_dropped_events_are_recorded(bus: EventBus) -> None:
    started, gate = asyncio.Event(), asyncio.Event()

    async def slow(event: Event[int]) -> None:
        started.set()
        await gate.wait()

    bus.subscribe("job", slow, name="slow", max_pending=1, overflow="drop_oldest")
    async with bus.record() as seen:
        await bus.publish("job", 1)
        async with asyncio.timeout(2):
            await started.wait()  # the worker holds event 1: the inbox has room for one
        await bus.publish("job", 2)
        await bus.publish("job", 3)  # drops 2
        gate.set()
        await seen.wait_handled("slow", count=2, timeout=2)
    assert [(d.subscription, d.event.payload) for d in seen.drops] == [("slow", 2)]


async def test_lineage_uses_the_lineage_module(bus: EventBus) -> None:
    lineage = pytest.importorskip("eventwire.lineage")
    from rich.tree import Tree

    chain(bus)
    async with bus.record() as seen:
        root = await bus.publish("user.query", "revenue")
        other = await bus.publish("user.query", "costs")
        await seen.wait_for("email.sent", count=2, timeout=2)
    nodes = seen.lineage(root)  # one chain: the root's, not the other query's
    assert len(nodes) == 1
    assert len(seen.lineage(other.correlation_id)) == 1
    assert isinstance(lineage.render_lineage(nodes), Tree)


# -- the recorder on real brokers --------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
async def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bus.db"
        return
    url = with_namespace(require_service("redis"), unique_namespace())
    yield url
    from eventwire.testing import destroy_namespace

    await destroy_namespace(url)


async def test_recorder_on_a_broker(broker_url: str) -> None:
    async with EventBus(broker_url, close_grace=2.0) as bus:
        chain(bus, fail_email=True)
        async with bus.record() as seen:
            root = await bus.publish("user.query", "revenue")
            [complete] = await seen.wait_for("research.complete", timeout=5)
            [gave_up] = await seen.wait_handled("email", outcome="dead_lettered", timeout=5)
            await bus.drain(timeout=5)  # the dead letter is published after that record
        seen.assert_caused(root, complete, direct=True)
        seen.assert_handled("research", 1)
        seen.assert_handled("email", 1, outcome="retrying")
        assert seen.topics == ["user.query", "research.complete"]  # each once, deduplicated
        assert gave_up.error == "RuntimeError: smtp down"
        assert [letter.topic for letter in seen.dead_letters] == ["_dlq.research.complete"]
        with pytest.raises(AssertionError, match=r"'email' gave up on research\.complete"):
            seen.assert_no_dead_letters()


async def test_recorder_sees_events_of_other_processes_when_handled_here(broker_url: str) -> None:
    """On a broker, an event published by another process reaches this one only through a
    subscription here: the recorder records it when the handler starts on it."""
    here = EventBus(broker_url, close_grace=2.0)
    handled: list[Event[Any]] = []
    here.subscribe("remote.job", handled.append, name="worker")  # opened by start()
    async with here, here.record() as seen, EventBus(broker_url) as elsewhere:
        sent = await elsewhere.publish("remote.job", 7)
        [job] = await seen.wait_for("remote.job", timeout=5)
        await seen.wait_handled("worker", timeout=5)
    assert (job.id, job.payload) == (sent.id, 7)
    assert handled == [job]
    seen.assert_handled("worker", 1)


# -- the pytest plugin, through pytester -------------------------------------------------


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester project in asyncio auto mode, outside CI unless a test says otherwise."""
    monkeypatch.delenv("CI", raising=False)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    return pytester


def test_plugin_fixtures_and_failure_message(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        async def test_chain(eventwire_bus, eventwire_recorder):
            async def research(event):
                await eventwire_bus.publish("research.complete", event.payload.upper())

            eventwire_bus.subscribe("user.query", research, name="research")
            root = await eventwire_bus.publish("user.query", "hi")
            [done] = await eventwire_recorder.wait_for("research.complete")
            eventwire_recorder.assert_caused(root, done, direct=True)
            assert eventwire_bus.url == "memory://"

        async def test_waits_in_vain(eventwire_bus, eventwire_recorder):
            await eventwire_bus.publish("user.query", "hi")
            await eventwire_recorder.wait_for("email.sent", timeout=0.05)
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E       AssertionError: wait_for: waited 0.05s for 1 event(s) on 'email.sent'; saw 0.",
            "E       Recorded on '>': 1 event(s): user.query x1",
        ]
    )
    assert "eventwire/record.py" not in result.stdout.str()  # the test's line, not ours


def test_unhandled_events_at_close_fail_the_test(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import asyncio

        async def test_leaves_work_behind(eventwire_bus):
            async def stuck(event):
                await asyncio.Event().wait()

            eventwire_bus.subscribe("job", stuck, name="stuck")
            await eventwire_bus.publish("job", 1)
            await eventwire_bus.publish("job", 2)
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*eventwire_bus: the bus closed with 2 event(s) unhandled after a 2.0s grace:",
            "  stuck <- job * (in flight)",
            "  stuck <- job * (queued)",
            "A handler was still busy*",
        ]
    )


def test_urls_parametrize_tests_by_option_ini_and_marker(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import pytest

        async def test_any(eventwire_bus):
            assert eventwire_bus.running

        @pytest.mark.eventwire(urls=["sqlite"])
        async def test_sqlite_only(eventwire_url, tmp_path):
            assert eventwire_url == f"sqlite:///{tmp_path}/bus.db"
        """
    )
    result = inner.runpytest("-v", "--eventwire-url", "memory", "--eventwire-url", "sqlite")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines_random(
        [
            "*test_any?memory? PASSED*",
            "*test_any?sqlite? PASSED*",
            "*test_sqlite_only?sqlite? PASSED*",
        ]
    )
    # Without the option: the ini list, else memory alone (and test ids as written).
    assert "test_any PASSED" in inner.runpytest("-v").stdout.str()
    inner.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "eventwire_urls = sqlite memory\n"
    )
    inner.runpytest("-v").stdout.fnmatch_lines_random(
        ["*test_any?sqlite? PASSED*", "*test_any?memory? PASSED*"]
    )


def test_broker_url_gets_its_own_namespace_removed_afterwards(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import redis

    url = require_service("redis")
    log = tmp_path / "namespaces.txt"
    monkeypatch.setenv("NAMESPACE_LOG", str(log))
    inner.makepyfile(
        """
        import os
        import redis

        async def test_publish(eventwire_bus, eventwire_url):
            assert eventwire_bus.url == eventwire_url
            namespace = eventwire_bus.backend.namespace
            with open(os.environ["NAMESPACE_LOG"], "a") as log:
                log.write(namespace + "\\n")
            await eventwire_bus.publish("kept", 1)
            client = redis.Redis.from_url(eventwire_url.split("?")[0])
            assert client.keys("{%s}*" % namespace)  # the test stored something
            client.close()
        """
    )
    result = inner.runpytest("--eventwire-url", f"{url}?namespace=app")
    result.assert_outcomes(passed=1)
    [namespace] = log.read_text().split()
    assert namespace.startswith("app_")
    client = redis.Redis.from_url(url)
    try:
        assert client.keys(f"{{{namespace}}}*") == []  # destroyed after the test
    finally:
        client.close()


def test_unreachable_broker_skips_naming_it_or_fails_under_ci(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner.makepyfile("async def test_it(eventwire_bus): pass")
    args = ("-rs", "--eventwire-url", "redis://:secret@127.0.0.1:1/0")
    result = inner.runpytest(*args)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*eventwire: Redis is not reachable at 127.0.0.1:1 (bus URL redis://:***@127.0.0.1:1/0)*"]
    )
    assert "secret" not in result.stdout.str()
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest(*args)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Redis is not reachable*CI is set, so this fails*"])


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:////abs/bus.db", r"sqlite:////abs/bus\.db\?namespace=test_[0-9a-f]{12}"),
        (
            "sqlite:///rel.db?poll=0.01",
            r"sqlite:///rel\.db\?poll=0\.01&namespace=test_[0-9a-f]{12}",
        ),
        (
            "redis://:p%40ss@127.0.0.1:6379/0?namespace=app",
            r"redis://:p%40ss@127\.0\.0\.1:6379/0\?namespace=app_[0-9a-f]{12}",
        ),
        ("nats", r"nats://127\.0\.0\.1:4222\?namespace=test_[0-9a-f]{12}"),
        ("memory", r"memory://"),
    ],
)
def test_isolated_url_keeps_the_url_and_adds_a_namespace(given: str, expected: str) -> None:
    from eventwire.testing import isolated_url

    for service in ("redis", "nats"):
        if given.startswith(service):
            require_service(service)  # isolated_url() checks that it is reachable
    assert re.fullmatch(expected, isolated_url(given))


def test_bad_url_is_a_usage_error(inner: pytest.Pytester) -> None:
    inner.makepyfile("async def test_it(eventwire_url): pass")
    result = inner.runpytest("--eventwire-url", "kafka://x:9092")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown scheme 'kafka'*"])
    inner.makepyfile(
        """
        import pytest

        @pytest.mark.eventwire(urls="memory")
        async def test_it(eventwire_url):
            pass
        """
    )
    result = inner.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error names the test
    result.stdout.fnmatch_lines(["*test_it: @pytest.mark.eventwire takes urls=[[]...[]]*"])


# -- docs/testing.md ----------------------------------------------------------------------


def test_docs_example_runs_as_shown(pytester: pytest.Pytester) -> None:
    """The complete example file of docs/testing.md passes under a bare ``pytest``."""
    text = (ROOT / "docs" / "testing.md").read_text()
    match = re.search(r"<!-- docs_example\.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/testing.md lost its marked example"
    pytester.makepyfile(docs_example=match.group(1))
    result = pytester.runpytest_subprocess("docs_example.py", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=DOCS_EXAMPLE_TESTS)
