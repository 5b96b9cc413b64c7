"""Models in durable runs (`eventwire.models`, `Run.complete`, `Run.stream`, budgets), and
token streams read back from a sequence number (`eventwire.streams`), on every backend with
a journal."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus, Retry
from eventwire.models import Chunk, Completion, FakeModel, Model, OpenAIModel, Price, Usage
from eventwire.runs import BudgetExceededError, Run
from eventwire.streams import StreamChunk, read_stream
from tests.conformance.conftest import backend_url, destroy

RETRY = Retry(attempts=3, backoff=0.0)
WAIT = 15.0
STREAMS = int(os.environ.get("EVENTWIRE_STREAMS", "50"))


@pytest.fixture(params=["memory", "sqlite", "redis", "nats"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A bus URL of each backend with a journal, on a namespace of its own."""
    made = backend_url(str(request.param), tmp_path)
    yield made
    await destroy(made)


async def test_the_fake_model_answers_the_same_prompt_alike_and_counts_its_calls() -> None:
    model = FakeModel(price=Price(1_000_000, 2_000_000))
    first = await model.complete("plan a trip")
    again = await model.complete("plan a trip")
    other = await model.complete("plan a party")
    assert isinstance(model, Model)
    assert first == again
    assert first.text != other.text
    assert model.calls == {"plan a trip": 2, "plan a party": 1}
    # 3 words in, 12 out, at 1 and 2 per token.
    assert first.usage == Usage(3, 12, 3 + 24)
    streamed = [chunk async for chunk in model.stream("plan a trip")]
    assert "".join(chunk.text for chunk in streamed) == first.text
    assert streamed[-1].usage == first.usage


async def test_a_model_step_is_paid_once_however_often_the_run_runs_again(url: str) -> None:
    model = FakeModel()
    seen: list[Completion] = []
    done = asyncio.Event()

    async def handler(event: Event[str], run: Run) -> None:
        answer = await run.complete("answer", model, event.payload)
        seen.append(answer)
        if len(seen) < 3:
            raise RuntimeError("the process died here")
        assert run.spent == answer.usage
        done.set()

    async with EventBus(url) as bus:
        sub = bus.subscribe("q", handler, durable=True, retry=RETRY, name="answerer")
        await sub.ready()
        await bus.publish("q", "why is the sky blue")
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert model.total_calls == 1
    assert seen[0] == seen[1] == seen[2]
    assert seen[0].usage.tokens > 0


async def test_a_budget_stops_the_run_within_one_call_of_its_limit(url: str) -> None:
    model = FakeModel(price=Price(0, 1_000_000))  # 1 per output token: 12 per call
    errors: list[BaseException] = []
    done = asyncio.Event()

    async def handler(event: Event[str], run: Run) -> None:
        run.budget(cost=20)
        try:
            for n in range(5):
                await run.complete("draft", model, f"draft {n}")
        except BudgetExceededError as exc:
            errors.append(exc)
            done.set()
            raise

    async with EventBus(url) as bus:
        sub = bus.subscribe("q", handler, durable=True, name="drafter")
        await sub.ready()
        await bus.publish("q", "essay")
        async with asyncio.timeout(WAIT):
            await done.wait()
    # The second call crossed the limit (24 > 20); the third was refused.
    assert model.total_calls == 2
    assert "model 'draft#3'" in str(errors[0])
    assert "24" in str(errors[0])
    with pytest.raises(ValueError, match="budget cost"):
        Run("r", Event("t", None), None).budget(cost=0)  # type: ignore[arg-type]


async def test_a_stream_is_published_in_order_and_replayed_without_the_model(url: str) -> None:
    model = FakeModel(words=20)
    tries: list[str] = []
    done = asyncio.Event()
    chunks: list[dict[str, Any]] = []
    finals: list[dict[str, Any]] = []

    async def handler(event: Event[str], run: Run) -> None:
        completion = await run.stream("answer.tokens", model.stream(event.payload))
        tries.append(completion.text)
        if len(tries) < 2:
            raise RuntimeError("the process died after the stream")
        done.set()

    async with EventBus(url) as bus:
        bus.subscribe("answer.tokens", lambda e: chunks.append(e.payload), name="chunks")
        bus.subscribe("answer.tokens.final", lambda e: finals.append(e.payload), name="final")
        sub = bus.subscribe("q", handler, durable=True, retry=RETRY, name="streamer")
        await sub.ready()
        await bus.publish("q", "tell me about tides")
        async with asyncio.timeout(WAIT):
            await done.wait()
            await bus.drain()
    assert model.total_calls == 1  # the second try replayed the recorded answer
    assert tries[0] == tries[1] == model.answer("tell me about tides")
    assert [chunk["seq"] for chunk in chunks] == list(range(20))
    assert "".join(chunk["text"] for chunk in chunks) == tries[0]
    assert len(finals) == 1
    assert finals[0]["seq"] == 20
    assert finals[0]["text"] == tries[0]
    assert finals[0]["usage"]["output_tokens"] == 20


async def test_a_stream_cut_mid_way_restarts_and_readers_see_the_restart(url: str) -> None:
    model = FakeModel(words=10)
    done = asyncio.Event()
    texts: list[str] = []

    async def dying(prompt: str, tries: list[int]) -> AsyncIterator[Chunk]:
        tries.append(1)
        count = 0
        async for chunk in model.stream(prompt):
            if len(tries) == 1 and count == 4:
                raise RuntimeError("the process died mid-stream")
            count += 1
            yield chunk

    tries: list[int] = []

    async def handler(event: Event[str], run: Run) -> None:
        completion = await run.stream("answer.tokens", dying(event.payload, tries))
        texts.append(completion.text)
        done.set()

    async with EventBus(url) as bus:
        sub = bus.subscribe("q", handler, durable=True, retry=RETRY, name="streamer")
        await sub.ready()
        query = await bus.publish("q", "tell me about tides")
        async with asyncio.timeout(WAIT):
            await done.wait()
        stream = f"streamer/{query.id}/answer.tokens"
        read = [c async for c in read_stream(bus.backend.journal(), stream, timeout=WAIT)]
    # 4 chunks, the restart marker, 10 chunks, the final: numbered without a gap.
    assert [c.seq for c in read] == list(range(16))
    assert read[4].restart
    assert read[-1].final
    assert read[-1].text == texts[0] == model.answer("tell me about tides")
    assert "".join(c.text for c in read[5:-1]) == texts[0]


async def test_stream_readers_resume_from_a_sequence_number_with_no_gap_or_duplicate(
    url: str,
) -> None:
    """Many streams at once; each reader disconnects mid-stream and resumes from the last
    sequence number it saw (``EVENTWIRE_STREAMS``: 50 in the suite; bench/durable_crash.py
    runs 1,000)."""
    streams = STREAMS
    model = FakeModel(words=12, delay=0.05)
    ended = asyncio.Event()
    finished = 0

    async def handler(event: Event[str], run: Run) -> None:
        nonlocal finished
        await run.stream("answer.tokens", model.stream(event.payload))
        finished += 1
        if finished == streams:
            ended.set()

    async def reader(journal: Any, stream: str) -> list[StreamChunk]:
        got: list[StreamChunk] = []
        async for chunk in read_stream(journal, stream, timeout=WAIT):
            got.append(chunk)
            if len(got) == 5:
                break  # the reader's connection drops
        await asyncio.sleep(0.1)
        async for chunk in read_stream(journal, stream, after=got[-1].seq, timeout=WAIT):
            got.append(chunk)
        return got

    async with EventBus(url) as bus:
        sub = bus.subscribe(
            "q", handler, durable=True, concurrency=min(streams, 100), name="streamer"
        )
        await sub.ready()
        started = time.perf_counter()
        queries = [await bus.publish("q", f"question {n}") for n in range(streams)]
        journal = bus.backend.journal()
        async with asyncio.timeout(60 + streams / 5):
            results = await asyncio.gather(
                *(reader(journal, f"streamer/{q.id}/answer.tokens") for q in queries)
            )
            await ended.wait()
        seconds = time.perf_counter() - started
    for query, got in zip(queries, results, strict=True):
        assert [chunk.seq for chunk in got] == list(range(13))
        assert got[-1].final
        assert "".join(chunk.text for chunk in got[:-1]) == model.answer(query.payload)
    report = os.environ.get("EVENTWIRE_STREAMS_REPORT")
    if report:
        figures = {"backend": url.partition(":")[0], "streams": streams, "seconds": seconds}
        with Path(report).open("a") as out:  # noqa: ASYNC230 - one line, at the end
            out.write(json.dumps(figures) + "\n")


# -- the OpenAI-compatible adapter, against a local HTTP server speaking the API --------


class _ChatAPI(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible ``/chat/completions`` endpoint."""

    requests: list[dict[str, Any]] = []  # noqa: RUF012 (shared with the test on purpose)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"auth": self.headers.get("Authorization"), **body})
        words = ["the", "sea", "rises"]
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for n, word in enumerate(words):
                delta = {"content": word if n == 0 else " " + word}
                self._event({"choices": [{"index": 0, "delta": delta}]})
            self._event({"choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            return
        answer = {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words)},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _event(self, chunk: dict[str, Any]) -> None:
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
        self.wfile.write(b"data: " + json.dumps({**base, **chunk}).encode() + b"\n\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def chat_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ChatAPI.requests.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


async def test_the_openai_adapter_completes_and_streams_with_usage_and_cost(
    chat_api: str,
) -> None:
    model = OpenAIModel(
        "small-model", base_url=chat_api, api_key="k-123", price=Price(1_000_000, 2_000_000)
    )
    completion = await model.complete([{"role": "user", "content": "tides?"}], temperature=0)
    assert completion == Completion("the sea rises", "small-model", Usage(7, 3, 7 + 6))
    chunks = [chunk async for chunk in model.stream("tides?")]
    assert "".join(chunk.text for chunk in chunks) == "the sea rises"
    assert chunks[-1].usage == Usage(7, 3, 13)
    first, second = _ChatAPI.requests
    assert first["auth"] == "Bearer k-123"
    assert first["temperature"] == 0
    assert first["messages"] == [{"role": "user", "content": "tides?"}]
    assert second["stream"] is True
