"""Random programs against a model: whatever mix of subscribe, unsubscribe, publish and drain
hypothesis comes up with, every event reaches exactly the subscriptions that matched it when it
was published (one member per group), in publish order per subscription, and drain() accounts
for every delivery."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventwire import Event, EventBus, Retry
from eventwire.topics import pattern_matches

TOPICS = ["a.x", "a.y", "b.x", "a.x.z"]
PATTERNS = ["a.x", "a.*", "a.>", "*.x", ">", "b.x"]


@dataclass
class Sub:
    name: str
    pattern: str
    group: str | None
    concurrency: int
    flaky: bool
    received: list[str] = field(default_factory=list)
    active: bool = True


subscribes = st.tuples(
    st.just("subscribe"),
    st.sampled_from(PATTERNS),
    st.sampled_from([None, None, "g1", "g2"]),
    st.integers(1, 4),
    st.booleans(),
    st.integers(1, 4),
)
publishes = st.tuples(
    st.just("publish"), st.sampled_from(TOPICS), st.sampled_from([None, "k1", "k2"])
)
later = st.one_of(
    subscribes,
    st.tuples(st.just("unsubscribe"), st.integers(0, 20)),
    publishes,
    publishes,
    publishes,  # mostly publishes: overlapping work is where bugs hide
    st.tuples(st.just("drain")),
)
# Some subscriptions first, so that most publishes have someone to reach.
operations = st.builds(
    lambda first, rest: first + rest,
    st.lists(subscribes, min_size=1, max_size=5),
    st.lists(later, min_size=5, max_size=60),
)


@dataclass
class Run:
    """What a program did so far, and what the model says each subscription is owed."""

    rng: random.Random  # the handlers' delays and failures
    subs: list[Sub] = field(default_factory=list)
    published: list[Event[Any]] = field(default_factory=list)
    # event id -> names of solo subscriptions owed it
    expected: dict[str, list[str]] = field(default_factory=dict)
    expected_groups: dict[str, set[str]] = field(default_factory=dict)  # event id -> groups
    group_members: dict[str, list[Sub]] = field(default_factory=dict)
    reshaped: set[str] = field(default_factory=set)  # groups changed once events were flowing

    def keys(self) -> dict[str, str | None]:
        """Each published event's key, by event id."""
        return {e.id: e.key for e in self.published}


async def run_program(program: list[tuple[Any, ...]], seed: int) -> None:
    run = Run(random.Random(seed))
    async with EventBus(close_grace=5, publish_timeout=5) as bus:
        for operation in program:
            await perform(bus, run, operation)
        await bus.drain(timeout=5)
        report = await bus.close()
    assert report.clean
    check_solo_subscriptions(run)
    for group, members in run.group_members.items():
        check_group(run, group, members)


async def perform(bus: EventBus, run: Run, operation: tuple[Any, ...]) -> None:
    kind = operation[0]
    if kind == "subscribe":
        subscribe(bus, run, *operation[1:])
    elif kind == "unsubscribe":
        await unsubscribe_one(bus, run, operation[1])
    elif kind == "publish":
        await publish(bus, run, *operation[1:])
    else:
        await bus.drain(timeout=5)


def subscribe(
    bus: EventBus,
    run: Run,
    pattern: str,
    group: str | None,
    concurrency: int,
    flaky: bool,
    max_pending: int,
) -> None:
    sub = Sub(f"s{len(run.subs)}", pattern, group, concurrency, flaky)

    async def handle(event: Event[Any]) -> None:
        for _ in range(run.rng.randint(0, 4)):
            await asyncio.sleep(0)
        if sub.flaky and run.rng.random() < 0.3:
            raise RuntimeError("flaky")
        sub.received.append(event.id)

    bus.subscribe(
        pattern,
        handle,
        name=sub.name,
        group=group,
        concurrency=concurrency,
        max_pending=max_pending,
        retry=Retry(attempts=25, backoff=0),
    )
    run.subs.append(sub)
    if group:
        run.group_members.setdefault(group, []).append(sub)
        if run.published:
            run.reshaped.add(group)


async def unsubscribe_one(bus: EventBus, run: Run, choice: int) -> None:
    """Unsubscribe the `choice`-th live subscription (modulo how many there are), if any."""
    live = [s for s in run.subs if s.active]
    if live:
        target = live[choice % len(live)]
        target.active = False
        if target.group and run.published:
            run.reshaped.add(target.group)
        await asyncio.wait_for(bus.subscriptions[target.name].unsubscribe(), 5)


async def publish(bus: EventBus, run: Run, topic: str, key: str | None) -> None:
    # no wait_for: its extra task would let every event finish before the next
    sent = await bus.publish(topic, None, key=key)  # bounded by publish_timeout
    run.published.append(sent)
    matching = [s for s in run.subs if s.active and pattern_matches(s.pattern, topic)]
    run.expected[sent.id] = [s.name for s in matching if s.group is None]
    run.expected_groups[sent.id] = {s.group for s in matching if s.group}


def check_solo_subscriptions(run: Run) -> None:
    keys = run.keys()
    for sub in run.subs:
        if sub.group is None:
            owed = [e.id for e in run.published if sub.name in run.expected[e.id]]
            got = sub.received
            assert sorted(got) == sorted(owed), sub  # exactly once, none missing
            if sub.concurrency == 1:
                assert got == owed, sub  # in publish order
            for key in ("k1", "k2"):  # same key: in order, whatever the concurrency
                assert [i for i in got if keys[i] == key] == [i for i in owed if keys[i] == key]


def check_group(run: Run, group: str, members: list[Sub]) -> None:
    keys = run.keys()
    order = {e.id: n for n, e in enumerate(run.published)}
    owed_ids = sorted(e.id for e in run.published if group in run.expected_groups[e.id])
    got_ids = sorted(i for m in members for i in m.received)
    assert got_ids == owed_ids, group  # each event to exactly one member
    for member in members:  # a key stays with one member, in order
        for key in ("k1", "k2"):
            mine = [i for i in member.received if keys[i] == key]
            assert mine == sorted(mine, key=order.__getitem__), (group, member.name)
    if group not in run.reshaped:
        check_one_member_per_key_and_topic(run, group, members)


def check_one_member_per_key_and_topic(run: Run, group: str, members: list[Sub]) -> None:
    keys = run.keys()
    topics = {e.id: e.topic for e in run.published}
    for key in ("k1", "k2"):
        for topic in TOPICS:
            holders = {
                m.name for m in members for i in m.received if keys[i] == key and topics[i] == topic
            }
            assert len(holders) <= 1, (group, key, topic, holders)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(operations, st.integers(0, 2**32))
def test_random_programs_match_the_model(program: list[tuple[Any, ...]], seed: int) -> None:
    asyncio.run(run_program(program, seed))
