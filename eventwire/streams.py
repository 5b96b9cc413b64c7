"""Token streams as events (`eventwire.runs.Run.stream`): a run publishes a model's answer
piece by piece, and a reader can pick a stream up again after a disconnect, from the last
sequence number it saw, with no gap and no duplicate.

A stream has an id (``<run id>/<name>``). Its chunks are published on the stream's topic
with payload ``{"stream", "seq", "text"}`` (`seq` counts from 0, per stream, and the event
key is the stream id), and kept in the journal under ``~stream/<id>`` until `CHUNKS_KEPT`
after the stream ends. The end is one event on ``<topic>.final`` with the whole text and the
usage, kept for good in the run's journal. If the run's process dies mid-stream, the run
streams again from the start when it runs again: a chunk with ``"restart": true`` tells
readers to drop the text they have.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from eventwire.backends.journal import Journal
from eventwire.models import Usage
from eventwire.waits import INTERNAL_PREFIX

CHUNKS_KEPT = 3600.0
"""Seconds a finished stream's chunks are kept for readers catching up (its final stays)."""

FINAL_KEY = "final"
_POLL = 0.05


class StreamChunk(msgspec.Struct, frozen=True, omit_defaults=True):
    """One chunk of a stream as readers get it."""

    stream: str
    seq: int
    text: str = ""
    restart: bool = False
    final: bool = False
    """The last item a reader gets: `text` is the whole answer, `usage` what it cost."""
    usage: Usage | None = None


_chunk_decoder = msgspec.json.Decoder(StreamChunk)


def chunks_id(stream: str) -> str:
    """The journal id under which a stream's chunks are kept."""
    return f"{INTERNAL_PREFIX}stream/{stream}"


def seq_key(seq: int) -> str:
    return f"{seq:010d}"


async def kept_chunks(journal: Journal, stream: str) -> dict[str, bytes]:
    return await journal.read(chunks_id(stream))


def encode_chunk(chunk: StreamChunk) -> bytes:
    return msgspec.json.encode(chunk)


def decode_chunk(data: bytes) -> StreamChunk:
    return _chunk_decoder.decode(data)


async def read_stream(
    journal: Journal, stream: str, *, after: int = -1, timeout: float | None = 60.0
) -> AsyncIterator[StreamChunk]:
    """The chunks of `stream` with a sequence number above `after`, in order, as they come,
    ending with the final one (``final=True``). Raises `TimeoutError` if nothing new comes
    for `timeout` seconds, and `LookupError` if the chunks after `after` expired."""
    next_seq = after + 1
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    while True:
        records = await kept_chunks(journal, stream)
        final = records.get(FINAL_KEY)
        progressed = False
        while (data := records.get(seq_key(next_seq))) is not None:
            yield decode_chunk(data)
            next_seq += 1
            progressed = True
        if final is not None:
            ending = decode_chunk(final)
            if ending.seq > next_seq:
                raise LookupError(
                    f"stream {stream!r}: chunks {next_seq} to {ending.seq - 1} expired "
                    "(kept for CHUNKS_KEPT seconds after the stream ends); read its final "
                    "event for the whole text"
                )
            if ending.seq == next_seq:
                yield ending
                return
        if progressed:
            quiet_since = loop.time()
        elif timeout is not None and loop.time() - quiet_since > timeout:
            raise TimeoutError(f"stream {stream!r}: nothing new for {timeout}s")
        await asyncio.sleep(_POLL)


def final_payload(stream: str, seq: int, text: str, usage: Usage) -> dict[str, Any]:
    return msgspec.to_builtins(StreamChunk(stream, seq, text, final=True, usage=usage))  # type: ignore[no-any-return]
