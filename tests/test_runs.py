"""Durable runs (`eventwire.runs`): journaled steps and effects, on every backend with a
journal. A failed try stands in for a crash here: the event comes again, and the handler runs
from the top, as it does after a crash."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from eventwire import Agent, Event, EventBus, Retry, on
from eventwire.backends.base import BackendCapabilityError
from eventwire.runs import JournalMismatchError, Run, UnencodableResultError
from tests.conformance.conftest import backend_url, destroy

RETRY = Retry(attempts=3, backoff=0.0)


class Plan(BaseModel):
    queries: list[str]


@pytest.fixture(params=["memory", "sqlite", "redis", "nats"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A bus URL of each backend with a journal, on a namespace of its own."""
    made = backend_url(str(request.param), tmp_path)
    yield made
    await destroy(made)


class Calls:
    """Counts calls of the functions steps run, by name."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def fn(self, name: str, result: Any = None) -> Any:
        async def call(*args: Any) -> Any:
            self.counts[name] += 1
            return result if result is not None else f"{name}:{args}"

        return call


async def handled(bus: EventBus, topic: str, payload: Any, done: asyncio.Event) -> None:
    await bus.publish(topic, payload)
    async with asyncio.timeout(10):
        await done.wait()


async def test_a_try_after_a_failure_replays_finished_steps_and_runs_the_rest(url: str) -> None:
    calls = Calls()
    tries: list[list[Any]] = []
    done = asyncio.Event()

    async def research(event: Event[str], run: Run) -> None:
        plan = await run.step("plan", calls.fn("plan"), event.payload)
        first = await run.step("search", calls.fn("search"), 1)
        second = await run.step("search", calls.fn("search"), 2)  # numbered: search#2
        tries.append([plan, first, second])
        if len(tries) < 3:
            raise RuntimeError("the process died here")
        await run.step("write", calls.fn("write"))
        done.set()

    async with EventBus(url) as bus:
        bus.subscribe("query.asked", research, durable=True, retry=RETRY, name="research")
        await handled(bus, "query.asked", "tides", done)
    # Each step ran once; every try saw the same results.
    assert calls.counts == {"plan": 1, "search": 2, "write": 1}
    assert tries[0] == tries[1] == tries[2] == ["plan:('tides',)", "search:(1,)", "search:(2,)"]


async def test_an_effect_happens_once_however_often_the_run_runs_again(url: str) -> None:
    sent: list[str] = []
    keys: list[str] = []
    done = asyncio.Event()
    tries = 0

    async def notify(event: Event[str], run: Run) -> None:
        nonlocal tries
        tries += 1

        async def send(to: str) -> str:
            sent.append(to)
            keys.append(run.idempotency_key("email"))
            return "sent"

        assert await run.effect("email", send, event.payload) == "sent"
        if tries < 3:
            raise RuntimeError("crash after the effect")
        done.set()

    async with EventBus(url) as bus:
        bus.subscribe("user.joined", notify, durable=True, retry=RETRY, name="notify")
        await handled(bus, "user.joined", "ada@example.com", done)
    assert sent == ["ada@example.com"]
    assert tries == 3
    assert keys[0].startswith("notify/")
    assert keys[0].endswith("/email")


async def raised_in_run(url: str, body: Callable[[Run], Awaitable[Any]]) -> BaseException:
    """What `body(run)` raised inside a durable handler."""
    errors: list[BaseException] = []
    done = asyncio.Event()

    async def handler(event: Event[str], run: Run) -> None:
        try:
            await body(run)
        except Exception as exc:
            errors.append(exc)
        finally:
            done.set()

    async with EventBus(url) as bus:
        bus.subscribe("t", handler, durable=True, name="raising")
        await handled(bus, "t", "x", done)
    assert errors, "nothing was raised"
    return errors[0]


async def test_an_effect_key_used_twice_in_a_run_is_refused(url: str) -> None:
    async def twice(run: Run) -> None:
        await run.effect("email", Calls().fn("a"))
        await run.effect("email", Calls().fn("b"))

    error = await raised_in_run(url, twice)
    assert isinstance(error, ValueError)
    assert "effect key 'email' is used twice" in str(error)


async def test_a_failed_step_is_recorded_and_runs_again_on_the_next_try(url: str) -> None:
    attempts: list[int] = []
    done = asyncio.Event()

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("model endpoint down")
        return "ok"

    async def handler(event: Event[str], run: Run) -> None:
        assert await run.step("call", flaky) == "ok"
        done.set()

    async with EventBus(url) as bus:
        bus.subscribe("t", handler, durable=True, retry=RETRY, name="flaky")
        await handled(bus, "t", "x", done)
    assert len(attempts) == 2


async def test_gather_fans_out_and_joins_and_replays_in_order(url: str) -> None:
    calls = Calls()
    seen: list[list[Any]] = []
    done = asyncio.Event()

    async def handler(event: Event[list[str]], run: Run) -> None:
        results = await run.gather(
            *(run.step(f"search:{q}", calls.fn(f"search:{q}"), q) for q in event.payload)
        )
        seen.append(results)
        if len(seen) < 2:
            raise RuntimeError("crash after the join")
        done.set()

    async with EventBus(url) as bus:
        bus.subscribe("t", handler, durable=True, retry=RETRY, name="fan")
        await handled(bus, "t", ["a", "b", "c"], done)
    assert seen[0] == seen[1] == ["search:a:('a',)", "search:b:('b',)", "search:c:('c',)"]
    assert calls.counts == {"search:a": 1, "search:b": 1, "search:c": 1}


async def test_results_come_back_as_the_functions_return_type(url: str) -> None:
    plans: list[Any] = []
    done = asyncio.Event()

    async def plan(topic: str) -> Plan:
        return Plan(queries=[topic, topic + " history"])

    async def handler(event: Event[str], run: Run) -> None:
        plans.append(await run.step("plan", plan, event.payload))
        if len(plans) < 2:
            raise RuntimeError("crash")
        done.set()

    async with EventBus(url) as bus:
        bus.subscribe("t", handler, durable=True, retry=RETRY, name="typed")
        await handled(bus, "t", "tides", done)
    assert plans[0] == plans[1] == Plan(queries=["tides", "tides history"])
    assert isinstance(plans[1], Plan)


async def test_large_results_replay_from_blobs(url: str) -> None:
    big = "context " * 2000  # 16 KB: over INLINE_BYTES, stored once by its content
    calls = Calls()
    got: list[Any] = []
    done = asyncio.Event()

    async def handler(event: Event[str], run: Run) -> None:
        got.append(await run.step("a", calls.fn("a", big)))
        got.append(await run.step("b", calls.fn("b", big)))
        if len(got) < 4:
            raise RuntimeError("crash")
        done.set()

    async with EventBus(url) as bus:
        bus.subscribe("t", handler, durable=True, retry=RETRY, name="big")
        await handled(bus, "t", "x", done)
    assert got == [big] * 4
    assert calls.counts == {"a": 1, "b": 1}


async def test_a_result_that_cannot_be_stored_is_a_clear_error(url: str) -> None:
    async def unencodable(run: Run) -> None:
        await run.step("socket", lambda: object())

    error = await raised_in_run(url, unencodable)
    assert isinstance(error, UnencodableResultError)
    assert "step 'socket'" in str(error)
    assert "returned a object that cannot be stored" in str(error)


async def test_a_journal_written_by_other_code_is_refused_not_replayed(url: str) -> None:
    errors: list[BaseException] = []
    done = asyncio.Event()
    version = 1

    async def handler(event: Event[str], run: Run) -> None:
        nonlocal version
        if version == 1:
            await run.step("plan", Calls().fn("plan"))
            version = 2  # deployed while the run was open: the next try runs the new code
            raise RuntimeError("crash")
        try:
            await run.step("outline", Calls().fn("outline"))  # "plan", renamed
        except JournalMismatchError as exc:
            errors.append(exc)
            raise
        finally:
            done.set()

    async with EventBus(url) as bus:
        bus.subscribe("t", handler, durable=True, retry=RETRY, name="versioned")
        await handled(bus, "t", "x", done)
    message = str(errors[0])
    assert "new step 'outline'" in message
    assert "step 'plan'" in message


async def test_a_finished_run_is_not_run_again_when_its_event_comes_again(url: str) -> None:
    calls = Calls()
    done = asyncio.Event()
    runs = 0

    async def handler(event: Event[str], run: Run) -> None:
        nonlocal runs
        runs += 1
        await run.step("a", calls.fn("a"))
        done.set()

    async with EventBus(url) as bus:
        bus.subscribe("t", handler, durable=True, name="once")
        event = await bus.publish("t", "x")
        async with asyncio.timeout(10):
            await done.wait()
        done.clear()
        # The same event again, as a broker redelivers it after a lost acknowledgement.
        await bus.publish(event)
        await bus.drain(timeout=10)
    assert runs == 1


def test_durable_needs_an_async_handler_and_a_backend_with_a_journal() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="durable=True needs an async handler"):
        bus.subscribe("t", lambda event, run: None, durable=True)
    amqp = EventBus("amqp://guest:guest@127.0.0.1:5672/")

    async def handler(event: Event[Any], run: Run) -> None:
        pass

    with pytest.raises(BackendCapabilityError, match="amqp:// keeps no run journal"):
        amqp.subscribe("t", handler, durable=True)


async def test_an_agent_method_can_be_durable(url: str) -> None:
    calls = Calls()
    done = asyncio.Event()

    class Researcher(Agent):
        tries = 0

        @on("query.asked", durable=True, retry=RETRY)
        async def handle(self, event: Event[str], run: Run) -> None:
            self.tries += 1
            await run.step("plan", calls.fn("plan"), event.payload)
            if self.tries < 2:
                raise RuntimeError("crash")
            done.set()

    async with EventBus(url) as bus:
        agent = Researcher()
        bus.register(agent)
        await handled(bus, "query.asked", "tides", done)
    assert agent.tries == 2
    assert calls.counts == {"plan": 1}
