"""A guided run of the whole event-driven agent architecture on the in-process bus.

A main agent publishes user queries. An audit logger and a notifier both hear every one; a
research agent answers each with a ``research.complete`` event, which an email agent turns
into a message for the user. An analytics subscriber whose warehouse is down shows retries
and the dead-letter queue, and a watcher on ``_dlq.>`` reports each event it gave up on.
Nothing waits on a timer to know when the work is done: ``bus.drain()`` does.

Run it with ``eventwire demo``, or ``await run_demo()`` from your own code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from eventwire.agent import Agent, on
from eventwire.bus import EventBus
from eventwire.event import Event
from eventwire.retry import Retry
from eventwire.subscription import SubscriptionStats

__all__ = ["DEFAULT_QUERIES", "run_demo"]

DEFAULT_QUERIES: tuple[str, ...] = (
    "How many support tickets did we open last week?",
    "Which product line grew fastest this quarter?",
    "Summarise the open risks in the Q3 roadmap.",
    "What do customers think of the new onboarding?",
)
_USERS: tuple[tuple[str, str], ...] = (
    ("user-101", "sess-7f3a"),
    ("user-202", "sess-91c4"),
    ("user-303", "sess-2be8"),
    ("user-404", "sess-d05e"),
)

# Three tries 10 ms then 20 ms apart: enough to see the retry, short enough to stay quick.
ANALYTICS_RETRY = Retry(attempts=3, backoff=0.01)
DRAIN_TIMEOUT = 5.0
# Users do not all type at the same instant; a short gap lets each query's story unfold
# before the next one starts, so the printed lines read in order.
_QUERY_GAP = 0.01
_RESEARCH_TIME = 0.005

_TAG_WIDTH = len("[ANALYTICS]")


class _Narrator:
    """Prints one short, colored line per thing an agent does, tagged with its query."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._labels: dict[str, str] = {}

    def name_chain(self, root: Event[Any]) -> None:
        self._labels[root.id] = f"q{len(self._labels) + 1}"

    def say(self, tag: str, style: str, event: Event[Any], message: str) -> None:
        # Every event set off by a query shares that query's correlation_id, so one lookup
        # names the chain an event belongs to, however far downstream it is.
        chain = self._labels.get(event.correlation_id, "?")
        label = f"[{tag}]".ljust(_TAG_WIDTH)
        # Text, not markup: a query containing [brackets] prints as typed.
        self.console.print(Text.assemble((label, style), " ", (chain, "bold"), " ", message))


class MainAgent(Agent):
    """The front door: turns user input into ``user.query`` events. It handles nothing."""

    # What it publishes outside any handler, for `eventwire topology`.
    publishes = ("user.query",)

    def __init__(self, narrator: _Narrator, name: str = "main") -> None:
        super().__init__(name)
        self._narrator = narrator

    async def ask(self, query: str, *, user_id: str, session_id: str) -> Event[Any]:
        event = await self.publish(
            "user.query", query, metadata={"user_id": user_id, "session_id": session_id}
        )
        self._narrator.name_chain(event)
        self._narrator.say("MAIN", "bold blue", event, f"{user_id} asks: {query}")
        return event


class ResearchAgent(Agent):
    """Answers each query, then announces the result for whoever cares downstream."""

    def __init__(self, narrator: _Narrator, name: str = "research") -> None:
        super().__init__(name)
        self._narrator = narrator

    @on("user.query", publishes=["research.complete"])
    async def handle_query(self, event: Event[str]) -> None:
        self._narrator.say("RESEARCH", "magenta", event, "searching internal reports")
        await asyncio.sleep(_RESEARCH_TIME)  # stands in for a model or search call
        found = len(event.payload.split()) % 4 + 2
        # Metadata is not inherited by follow-up events: pass on what downstream needs.
        await self.publish(
            "research.complete",
            f"{found} relevant reports found",
            metadata={
                "original_query": event.payload,
                "user_id": event.metadata["user_id"],
                "session_id": event.metadata["session_id"],
            },
        )


class EmailAgent(Agent):
    """Mails each research result to the user who asked; knows nothing of the research agent."""

    def __init__(self, narrator: _Narrator, name: str = "email") -> None:
        super().__init__(name)
        self._narrator = narrator

    @on("research.complete")
    async def send_summary(self, event: Event[str]) -> None:
        self._narrator.say(
            "EMAIL",
            "green",
            event,
            f"to {event.metadata['user_id']}: {event.payload} (source={event.source})",
        )


class _CountingHandler(logging.Handler):
    """Counts what the library logs during the demo, by level."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1


@contextmanager
def _count_library_logs() -> Iterator[Counter[str]]:
    """While active, count the ``eventwire`` logger's warnings and errors.

    The bus logs every dead letter at ERROR with its traceback. With logging left
    unconfigured, Python would dump those tracebacks on stderr and bury the demo; a handler
    on the library's logger stops that, while records still propagate to any handlers the
    application configured.
    """
    logger = logging.getLogger("eventwire")
    handler = _CountingHandler()
    logger.addHandler(handler)
    try:
        yield handler.counts
    finally:
        logger.removeHandler(handler)


def _summary_table(stats: Mapping[str, SubscriptionStats]) -> Table:
    table = Table(title="Subscriptions", title_justify="left", header_style="bold")
    table.add_column("Subscription", style="bold", no_wrap=True)
    table.add_column("Handled", justify="right")
    table.add_column("Retried", justify="right")
    table.add_column("Dead letters", justify="right")
    table.add_column("Mean (ms)", justify="right")
    for name, s in stats.items():
        table.add_row(
            Text(name),
            str(s.handled),
            str(s.retried),
            Text(str(s.dead_lettered), style="bold red" if s.dead_lettered else ""),
            f"{s.mean_handling_seconds * 1000:.2f}",
        )
    return table


async def run_demo(
    console: Console | None = None, *, queries: list[str] | None = None, url: str | None = None
) -> dict[str, SubscriptionStats]:
    """Run the demo on `url` (default: the in-process bus): print what each agent does,
    then a table of every subscription's counters. Returns those counters
    (`SubscriptionStats`) by subscription name."""
    console = console or Console()
    narrator = _Narrator(console)
    say = narrator.say
    queries = list(DEFAULT_QUERIES) if queries is None else list(queries)

    bus = EventBus(url or "memory://")
    where = bus.safe_url if bus.capabilities.durable else "an in-process event bus"

    # Plain functions are enough for subscribers that keep no state of their own.
    @bus.subscribe("user.query", name="audit")
    async def audit(event: Event[str]) -> None:
        say("AUDIT", "cyan", event, f"{event.metadata['user_id']} asked: {event.payload}")

    @bus.subscribe("user.query", name="notifier")
    async def notify(event: Event[str]) -> None:
        say("NOTIFY", "yellow", event, f"new query in session {event.metadata['session_id']}")

    main = bus.register(MainAgent(narrator))
    bus.register(ResearchAgent(narrator))
    bus.register(EmailAgent(narrator))

    attempts: Counter[str] = Counter()

    async def analytics(event: Event[str]) -> None:
        attempts[event.id] += 1
        say(
            "ANALYTICS",
            "red",
            event,
            f"attempt {attempts[event.id]}/{ANALYTICS_RETRY.attempts} failed: "
            "warehouse unreachable",
        )
        raise ConnectionError("analytics warehouse unreachable")

    # Retry waits happen in this subscription's own worker: no other subscriber notices.
    bus.subscribe("user.query", analytics, name="analytics", retry=ANALYTICS_RETRY)

    async def watch_dead_letters(letter: Event[Any]) -> None:
        original: Event[Any] = letter.payload
        why = letter.metadata
        say(
            "DLQ",
            "bold red",
            letter,
            f"{why['subscription']} failed {why['attempts']} times on {original.topic}: "
            f"{why['error_type']}",
        )

    # Only a pattern whose first token starts with `_` reaches the bus's own topics, so
    # dead letters never surprise a catch-all `>` subscriber.
    bus.subscribe("_dlq.>", watch_dead_letters, name="dlq-watcher")

    title = Text.assemble(("eventwire demo", "bold"), f": agents on {where}")
    if console.is_terminal:
        console.rule(title)
    else:
        console.print(title)  # piped: a rule would be as wide as the (unbounded) width
    console.print(
        "qN names a query's chain: every event it sets off shares its correlation_id.",
        style="dim",
        markup=False,
    )
    started = time.perf_counter()
    with _count_library_logs() as log_counts:
        async with bus:
            for index, query in enumerate(queries):
                user_id, session_id = _USERS[index % len(_USERS)]
                if index:
                    await asyncio.sleep(_QUERY_GAP)
                await main.ask(query, user_id=user_id, session_id=session_id)
            # Every query and all it set off: research, emails, retries, dead letters.
            await bus.drain(timeout=DRAIN_TIMEOUT)
            stats = bus.stats()
    elapsed = time.perf_counter() - started

    console.print()
    console.print(_summary_table(stats))
    dead = sum(s.dead_lettered for s in stats.values())
    emails = stats["email.send_summary"].handled
    console.print(
        f"{len(queries)} queries -> {emails} emails, {dead} dead letters on _dlq.user.query; "
        f"all done in {elapsed * 1000:.0f} ms",
        highlight=False,
        markup=False,
    )
    if log_counts:
        logged = ", ".join(f"{count} {level}" for level, count in sorted(log_counts.items()))
        console.print(
            f"The bus also logged {logged} record(s); `eventwire demo -v` shows them.",
            style="dim",
            markup=False,
        )
    return stats
