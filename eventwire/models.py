"""Language models for durable runs: a small `Model` protocol (``complete`` and ``stream``),
an adapter for OpenAI-compatible endpoints (`OpenAIModel`, ``pip install eventwire[openai]``)
and a deterministic `FakeModel` for tests and demos, which needs no network.

A run calls a model through `eventwire.runs.Run.complete` (or `Run.stream`): the
completion, with its token counts and cost, is journaled like any step, so a run that
starts again after a crash does not pay for the call twice, and the run's spending is known
for its budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

Prompt = str | Sequence[dict[str, str]]
"""A prompt: plain text (one user message), or chat messages (``{"role", "content"}``)."""


class Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a model call consumed: tokens in and out, and its cost in `Price` units."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost + other.cost,
        )


class Completion(msgspec.Struct, frozen=True):
    """A model's answer: its text, the model's name and what the call consumed."""

    text: str
    model: str
    usage: Usage = Usage()


class Chunk(msgspec.Struct, frozen=True, omit_defaults=True):
    """A piece of a streamed answer; the last one of a stream carries the usage."""

    text: str
    usage: Usage | None = None


class Price(msgspec.Struct, frozen=True):
    """What a model costs per million tokens in and out (in any currency unit)."""

    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def of(self, input_tokens: int, output_tokens: int) -> Usage:
        cost = (
            input_tokens * self.input_per_million + output_tokens * self.output_per_million
        ) / 1_000_000
        return Usage(input_tokens, output_tokens, cost)


FREE = Price()
FAKE_PRICE = Price(1.0, 2.0)
"""What `FakeModel` charges by default: 1 per million tokens in, 2 per million out."""


@runtime_checkable
class Model(Protocol):
    """What `Run.complete` and `Run.stream` call: a named model."""

    name: str

    async def complete(self, prompt: Prompt, **options: Any) -> Completion:
        """The whole answer to `prompt`."""
        ...

    def stream(self, prompt: Prompt, **options: Any) -> AsyncIterator[Chunk]:
        """The answer to `prompt` piece by piece; the last chunk carries the usage."""
        ...


def messages_of(prompt: Prompt) -> list[dict[str, str]]:
    """`prompt` as chat messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(message) for message in prompt]


def _text_of(prompt: Prompt) -> str:
    return "\n".join(message.get("content", "") for message in messages_of(prompt))


class FakeModel:
    """A deterministic model: the same prompt gets the same answer, every time, offline.

    The answer is ``replies[prompt]`` when given, else made from a hash of the prompt; a
    token is a whitespace-separated word. `calls` counts calls by prompt (tests read it to
    prove a journaled call was not made twice); `delay` seconds pass per call (and per
    chunk when streaming), as a real model's latency would.
    """

    def __init__(
        self,
        name: str = "fake",
        *,
        replies: dict[str, str] | None = None,
        price: Price = FAKE_PRICE,
        delay: float = 0.0,
        words: int = 12,
    ) -> None:
        self.name = name
        self.replies = dict(replies or {})
        self.price = price
        self.delay = delay
        self.words = words
        self.calls: dict[str, int] = {}

    def answer(self, prompt: Prompt) -> str:
        """What this model answers to `prompt` (without counting a call)."""
        text = _text_of(prompt)
        if text in self.replies:
            return self.replies[text]
        words: list[str] = []
        digest = text.encode()
        while len(words) < self.words:
            digest = hashlib.sha256(digest).hexdigest().encode()
            words.extend(digest[i : i + 6].decode() for i in range(0, 60, 6))
        return " ".join(words[: self.words])

    def _called(self, prompt: Prompt) -> tuple[str, Usage]:
        text = _text_of(prompt)
        self.calls[text] = self.calls.get(text, 0) + 1
        answer = self.answer(prompt)
        return answer, self.price.of(len(text.split()), len(answer.split()))

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    async def complete(self, prompt: Prompt, **options: Any) -> Completion:
        answer, usage = self._called(prompt)
        if self.delay:
            await asyncio.sleep(self.delay)
        return Completion(answer, self.name, usage)

    async def stream(self, prompt: Prompt, **options: Any) -> AsyncIterator[Chunk]:
        answer, usage = self._called(prompt)
        words = answer.split(" ")
        for index, word in enumerate(words):
            if self.delay:
                await asyncio.sleep(self.delay / max(len(words), 1))
            last = index == len(words) - 1
            yield Chunk(word if index == 0 else " " + word, usage if last else None)


class OpenAIModel:
    """A model behind an OpenAI-compatible chat completions endpoint (OpenAI, vLLM,
    Ollama, LiteLLM...). `base_url` and `api_key` default to the ``OPENAI_BASE_URL`` and
    ``OPENAI_API_KEY`` environment variables; `price` turns its token counts into cost."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        price: Price = FREE,
        client: Any = None,
        **options: Any,
    ) -> None:
        self.name = name
        self.price = price
        self.options = options
        if client is None:
            try:
                import openai
            except ImportError:
                raise ImportError(
                    "OpenAIModel needs the openai package: pip install 'eventwire[openai]'"
                ) from None
            client = openai.AsyncOpenAI(
                base_url=base_url or os.environ.get("OPENAI_BASE_URL"),
                api_key=api_key or os.environ.get("OPENAI_API_KEY") or "not-needed",
            )
        self.client = client

    async def complete(self, prompt: Prompt, **options: Any) -> Completion:
        response = await self.client.chat.completions.create(
            model=self.name, messages=messages_of(prompt), **{**self.options, **options}
        )
        text = response.choices[0].message.content or ""
        usage = response.usage
        counted = self.price.of(usage.prompt_tokens, usage.completion_tokens) if usage else Usage()
        return Completion(text, self.name, counted)

    async def stream(self, prompt: Prompt, **options: Any) -> AsyncIterator[Chunk]:
        response = await self.client.chat.completions.create(
            model=self.name,
            messages=messages_of(prompt),
            stream=True,
            stream_options={"include_usage": True},
            **{**self.options, **options},
        )
        async for part in response:
            usage = getattr(part, "usage", None)
            text = part.choices[0].delta.content or "" if part.choices else ""
            if usage is not None:
                yield Chunk(text, self.price.of(usage.prompt_tokens, usage.completion_tokens))
            elif text:
                yield Chunk(text)
