"""Durable waits, sleeps, collects and scheduled events (`eventwire.waits`,
`eventwire.durable`, `eventwire.timers`) on every backend with a journal: a run parks with
nothing held in memory and is resumed by an event or a timer, in whichever bus runs then."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from eventwire import Event, EventBus
from eventwire.backends.base import BackendCapabilityError
from eventwire.backends.journal import MemoryJournal
from eventwire.runs import JournalMismatchError, Run, list_runs
from eventwire.waits import ARRIVALS_KEPT_MINUTES, Waits
from tests.conformance.conftest import backend_url, destroy

WAIT = 15.0
STARTED: Counter[str] = Counter()
"""Executions begun, by run id (of the handlers that count them)."""


class Approval(BaseModel):
    query: str
    ok: bool


@pytest.fixture(params=["memory", "sqlite", "redis", "nats"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A bus URL of each backend with a journal, on a namespace of its own."""
    made = backend_url(str(request.param), tmp_path)
    yield made
    await destroy(made)


@pytest.fixture(params=["sqlite", "redis", "nats", "amqp-journal"])
async def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A bus URL of each backend whose journal outlives the process (RabbitMQ's in a SQLite
    file named by ?journal=)."""
    made = backend_url(str(request.param), tmp_path)
    yield made
    await destroy(made)


class Flow:
    """A research run: a step, a wait for approval, an effect; counts what ran."""

    def __init__(self, timeout: float | None = 30.0) -> None:
        self.calls: Counter[str] = Counter()
        self.outcomes: dict[str, Any] = {}
        self.done = asyncio.Event()
        self.timeout = timeout

    async def plan(self, query: str) -> str:
        self.calls["plan"] += 1
        return f"plan for {query}"

    async def handle(self, event: Event[str], run: Run) -> None:
        plan = await run.step("plan", self.plan, event.payload)
        await run.step("ask", self.ask, event)
        approval = await run.wait_for(
            "approval.given",
            match={"query": event.id},
            timeout=self.timeout,
            payload_type=Approval,
        )
        self.calls["after wait"] += 1
        self.outcomes[event.id] = (plan, None if approval is None else approval.payload)
        self.done.set()

    async def ask(self, event: Event[str]) -> None:
        self.calls["ask"] += 1


async def state_of(bus: EventBus, run: str) -> str | None:
    for info in await list_runs(bus.backend.journal()):
        if info.id == run:
            return info.state
    return None


async def until_state(bus: EventBus, run: str, state: str, starts: int = 0) -> None:
    """Wait until the journal says `run` is in `state` (after `starts` executions began)."""
    async with asyncio.timeout(WAIT):
        while await state_of(bus, run) != state or STARTED[run] < starts:  # noqa: ASYNC110 - journal state, no event to await
            await asyncio.sleep(0.02)


async def test_a_run_parks_on_its_wait_and_the_matching_event_resumes_it(url: str) -> None:
    flow = Flow()
    async with EventBus(url) as bus:
        sub = bus.subscribe(
            "query.asked", flow.handle, durable=True, waits=["approval.given"], name="research"
        )
        await sub.ready()
        query = await bus.publish("query.asked", "tides")
        run = f"research/{query.id}"

        await until_state(bus, run, "waiting")
        # Another query's approval does not resume it.
        await bus.publish("approval.given", {"query": "another", "ok": True})
        await bus.publish("approval.given", {"query": query.id, "ok": True})
        async with asyncio.timeout(WAIT):
            await flow.done.wait()
        assert flow.outcomes[query.id] == ("plan for tides", Approval(query=query.id, ok=True))

        await until_state(bus, run, "finished")
    # The code before the wait ran once: the resumed run replayed it.
    assert flow.calls == {"plan": 1, "ask": 1, "after wait": 1}


async def test_an_answer_that_comes_before_the_run_waits_is_not_lost(url: str) -> None:
    """The approver answers the request at once, before the run has filed its wait."""
    flow = Flow()
    async with EventBus(url) as bus:

        async def approver(event: Event[str]) -> None:
            await bus.publish("approval.given", {"query": event.id, "ok": False})

        bus.subscribe("query.asked", approver, name="approver")
        sub = bus.subscribe(
            "query.asked", flow.handle, durable=True, waits=["approval.given"], name="research"
        )
        await sub.ready()
        original = flow.ask

        async def slow_ask(event: Event[str]) -> None:
            await asyncio.sleep(0.3)  # the approval is in before the wait is filed
            await original(event)

        flow.ask = slow_ask  # type: ignore[method-assign]
        query = await bus.publish("query.asked", "tides")
        async with asyncio.timeout(WAIT):
            await flow.done.wait()
    assert flow.outcomes[query.id][1] == Approval(query=query.id, ok=False)


async def test_a_wait_whose_time_runs_out_returns_none(url: str) -> None:
    flow = Flow(timeout=0.5)
    async with EventBus(url) as bus:
        sub = bus.subscribe(
            "query.asked", flow.handle, durable=True, waits=["approval.given"], name="research"
        )
        await sub.ready()
        query = await bus.publish("query.asked", "tides")
        async with asyncio.timeout(WAIT):
            await flow.done.wait()
        # A late answer changes nothing.
        await bus.publish("approval.given", {"query": query.id, "ok": True})
    assert flow.outcomes[query.id] == ("plan for tides", None)
    assert flow.calls == {"plan": 1, "ask": 1, "after wait": 1}


async def test_several_waits_of_one_run_resolve_independently(url: str) -> None:
    results: list[list[str]] = []
    done = asyncio.Event()

    async def review(event: Event[str], run: Run) -> None:
        STARTED[run.id] += 1
        legal, money = await run.gather(
            run.wait_for("review.legal", match={"doc": event.payload}, timeout=30),
            run.wait_for("review.finance", match={"doc": event.payload}, timeout=30),
        )
        assert legal is not None
        assert money is not None
        results.append([legal.payload["by"], money.payload["by"]])
        done.set()

    async with EventBus(url) as bus:
        sub = bus.subscribe(
            "doc.submitted",
            review,
            durable=True,
            waits=["review.legal", "review.finance"],
            name="review",
        )
        await sub.ready()
        submitted = await bus.publish("doc.submitted", "d1")
        run = f"review/{submitted.id}"
        await until_state(bus, run, "waiting", starts=1)
        # The finance review first: the run resumes and parks again on the legal one.
        await bus.publish("review.finance", {"doc": "d1", "by": "fin"})
        await until_state(bus, run, "waiting", starts=2)
        assert not done.is_set()
        await bus.publish("review.legal", {"doc": "d1", "by": "law"})
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert results == [["law", "fin"]]


async def test_a_run_collects_a_count_of_events(url: str) -> None:
    got: list[list[int]] = []
    done = asyncio.Event()

    async def tally(event: Event[str], run: Run) -> None:
        votes = await run.collect("vote.cast", count=3, match={"poll": event.payload}, timeout=30)
        got.append([vote.payload["n"] for vote in votes])
        done.set()

    async with EventBus(url) as bus:
        sub = bus.subscribe("poll.opened", tally, durable=True, waits=["vote.cast"], name="tally")
        await sub.ready()
        await bus.publish("poll.opened", "p1")
        for n in range(5):
            await bus.publish("vote.cast", {"poll": "p1" if n != 1 else "p2", "n": n})
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert got == [[0, 2, 3]]


async def test_a_sleep_parks_the_run_and_its_timer_resumes_it(url: str) -> None:
    marks: list[float] = []
    done = asyncio.Event()

    async def reminder(event: Event[str], run: Run) -> None:
        started = await run.step("start", time.time)
        await run.sleep(timedelta(seconds=0.6))
        marks.append(time.time() - started)
        done.set()

    async with EventBus(url) as bus:
        sub = bus.subscribe("reminder.set", reminder, durable=True, name="reminder")
        await sub.ready()
        await bus.publish("reminder.set", "call mum")
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert len(marks) == 1
    assert marks[0] >= 0.6


async def test_a_wait_on_an_undeclared_pattern_is_refused_with_how_to_declare_it(
    url: str,
) -> None:
    errors: list[BaseException] = []
    done = asyncio.Event()

    async def handler(event: Event[str], run: Run) -> None:
        try:
            await run.wait_for("approval.given", timeout=5)
        except ValueError as exc:
            errors.append(exc)
        done.set()

    async with EventBus(url) as bus:
        sub = bus.subscribe("query.asked", handler, durable=True, name="research")
        await sub.ready()
        await bus.publish("query.asked", "tides")
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert "waits=['approval.given']" in str(errors[0])


async def test_rabbitmq_without_a_journal_refuses_durable_runs_saying_how_to_give_one(
    tmp_path: Path,
) -> None:
    url = backend_url("amqp", tmp_path)

    async def handler(event: Event[str], run: Run) -> None: ...

    bus = EventBus(url)
    with pytest.raises(BackendCapabilityError, match=r"\?journal=sqlite:///runs.db"):
        bus.subscribe("query.asked", handler, durable=True)
    with pytest.raises(ValueError, match="must be a durable store"):
        EventBus(url + "&journal=memory://")


def test_waits_without_durable_is_refused() -> None:
    bus = EventBus()

    async def handler(event: Event[str]) -> None: ...

    with pytest.raises(ValueError, match="durable=True"):
        bus.subscribe("query.asked", handler, waits=["approval.given"])
    with pytest.raises(TypeError, match="list of topics"):
        bus.subscribe("query.asked", handler, durable=True, waits="approval.given")  # type: ignore[arg-type]


async def test_a_parked_run_survives_its_bus_and_resumes_in_the_next(durable_url: str) -> None:
    first = Flow()
    async with EventBus(durable_url) as bus:
        sub = bus.subscribe(
            "query.asked", first.handle, durable=True, waits=["approval.given"], name="research"
        )
        await sub.ready()
        query = await bus.publish("query.asked", "tides")
        run = f"research/{query.id}"

        await until_state(bus, run, "waiting")
    # A new bus (a restarted process): the approval comes while it runs.
    second = Flow()
    async with EventBus(durable_url) as bus:
        sub = bus.subscribe(
            "query.asked", second.handle, durable=True, waits=["approval.given"], name="research"
        )
        await sub.ready()
        await bus.publish("approval.given", {"query": query.id, "ok": True})
        async with asyncio.timeout(WAIT):
            await second.done.wait()
    assert second.outcomes[query.id] == ("plan for tides", Approval(query=query.id, ok=True))
    # Nothing before the wait ran again in the second process.
    assert first.calls == {"plan": 1, "ask": 1}
    assert second.calls == {"after wait": 1}


async def test_a_timer_due_while_no_bus_ran_fires_at_the_next_start(durable_url: str) -> None:
    done = asyncio.Event()
    woke: list[float] = []

    async def reminder(event: Event[str], run: Run) -> None:
        await run.sleep(0.3)
        woke.append(time.monotonic())
        done.set()

    async with EventBus(durable_url) as bus:
        sub = bus.subscribe("reminder.set", reminder, durable=True, name="reminder")
        await sub.ready()
        reminded = await bus.publish("reminder.set", "call mum")

        await until_state(bus, f"reminder/{reminded.id}", "waiting")
    assert not done.is_set()
    await asyncio.sleep(0.6)  # downtime: the timer falls due while no bus runs
    async with EventBus(durable_url) as bus:
        bus.subscribe("reminder.set", reminder, durable=True, name="reminder")
        started = time.monotonic()
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert woke[0] - started < 3.0  # at the start (one tick), not at a later look


async def test_a_scheduled_event_is_published_when_due_also_after_a_restart(
    durable_url: str,
) -> None:
    got: list[tuple[str, Any]] = []
    done = asyncio.Event()

    async def handler(event: Event[Any]) -> None:
        got.append((event.id, event.payload))
        done.set()

    async with EventBus(durable_url) as bus:
        bus.subscribe("report.due", handler, name="reports")
        scheduled = await bus.schedule("report.due", {"week": 49}, at=timedelta(seconds=0.8))
    assert not done.is_set()  # the bus closed before it was due
    await asyncio.sleep(1.0)
    async with EventBus(durable_url) as bus:
        bus.subscribe("report.due", handler, name="reports")
        await bus.schedule("report.later", None, at=timedelta(hours=1))  # runs the timers
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert got == [(scheduled.id, {"week": 49})]


async def test_a_scheduled_event_waits_for_its_time(url: str) -> None:
    got: list[float] = []
    done = asyncio.Event()

    async def handler(event: Event[Any]) -> None:
        got.append(time.time())
        done.set()

    async with EventBus(url) as bus:
        sub = bus.subscribe("report.due", handler, name="reports")
        await sub.ready()
        asked = time.time()
        await bus.schedule("report.due", 1, at=0.7)
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert got[0] - asked >= 0.7


async def test_a_changed_wait_is_refused_instead_of_replayed(url: str) -> None:
    errors: list[BaseException] = []
    done = asyncio.Event()
    version = {"topic": "approval.given"}

    async def handler(event: Event[str], run: Run) -> None:
        try:
            await run.wait_for(version["topic"], timeout=30)
        except JournalMismatchError as exc:
            errors.append(exc)
            done.set()
            raise

    async with EventBus(url) as bus:
        sub = bus.subscribe(
            "query.asked",
            handler,
            durable=True,
            waits=["approval.given", "approval.granted"],
            name="research",
        )
        await sub.ready()
        query = await bus.publish("query.asked", "tides")

        await until_state(bus, f"research/{query.id}", "waiting")
        version["topic"] = "approval.granted"  # a new version of the code
        await bus.publish("approval.given", {})
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert "approval.given" in str(errors[0])
    assert "approval.granted" in str(errors[0])


async def test_arrivals_older_than_a_day_are_dropped_an_hour_at_a_time() -> None:
    journal = MemoryJournal()
    waits = Waits(journal)
    waits.keep_arrivals("agent", "approval.given")
    now = 1_800_000_000.0
    minute = int(now // 60)
    kept = minute - ARRIVALS_KEPT_MINUTES
    for at in (kept - 1430, kept - 61, kept - 1, kept, minute):
        await journal.write(f"~arrivals/agent/approval.given/{at}", "e", b"{}")
    await waits.prune(now)  # the first hour of the day before the kept one
    assert await journal.read(f"~arrivals/agent/approval.given/{kept - 1430}") == {}
    assert await journal.read(f"~arrivals/agent/approval.given/{kept - 1}") != {}
    for _ in range(30):
        await waits.prune(now)
    for at, left in ((kept - 61, False), (kept - 1, False), (kept, True), (minute, True)):
        records = await journal.read(f"~arrivals/agent/approval.given/{at}")
        assert (records != {}) is left, at
