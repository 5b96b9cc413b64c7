"""In-process routing: which inboxes an event published on a topic goes to.

The router owns the topic trie of the in-process subscriptions, the cache of resolved routes
(one per topic seen) and the competing groups: in a group, each event goes to one member, and
same-key events always to the same one.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from eventwire.requests import REPLY_PREFIX
from eventwire.topics import SINGLE, TAIL, TopicTrie, validate_topic

if TYPE_CHECKING:
    from eventwire.inbox import Inbox
    from eventwire.subscription import Subscription

logger = logging.getLogger("eventwire")

# Past this many distinct topics the route cache starts over, so that an unbounded topic space
# (ids in topic names) cannot grow memory without bound.
ROUTE_CACHE_LIMIT = 100_000


def member_for_key(key: str, members: int) -> int:
    """The index of the group member that handles every event of `key`. crc32, not hash():
    the same in every process, whatever its hash seed."""
    return zlib.crc32(key.encode()) % members


class GroupRoute:
    """Competing consumers of one group that match one topic: each event goes to one."""

    __slots__ = ("inboxes", "next")

    def __init__(self, members: Sequence[Subscription]) -> None:
        self.inboxes = [member.inbox for member in members]
        self.next = 0

    @property
    def group(self) -> str:
        return self.inboxes[0].subscription.group or ""

    def pick(self, key: str | None) -> Inbox:
        inboxes = self.inboxes
        count = len(inboxes)
        if key is not None:
            # Same key, same member: per-key order holds across the group.
            return inboxes[member_for_key(key, count)]
        start = self.next
        for offset in range(count):
            inbox = inboxes[(start + offset) % count]
            if len(inbox) < inbox.capacity:
                self.next = (start + offset + 1) % count
                return inbox
        self.next = (start + 1) % count
        return inboxes[start]


class GroupedRoute:
    """A route with competing groups. Routes without groups are plain tuples of inboxes,
    one object less for publish to look through."""

    __slots__ = ("groups", "inboxes")

    def __init__(self, inboxes: tuple[Inbox, ...], groups: tuple[GroupRoute, ...]):
        self.inboxes = inboxes
        self.groups = groups

    def targets(self, key: str | None) -> list[Inbox]:
        return [*self.inboxes, *(group.pick(key) for group in self.groups)]


Route = tuple["Inbox", ...] | GroupedRoute


class Router:
    """The in-process subscriptions by pattern, and the route of every topic published."""

    __slots__ = ("routes", "trie")

    def __init__(self) -> None:
        self.trie: TopicTrie[Subscription] = TopicTrie()
        # topic -> its route; read directly by the publish hot path.
        self.routes: dict[str, Route] = {}

    def add(self, subscription: Subscription) -> None:
        self.trie.add(subscription.pattern, subscription)
        self._refresh(subscription.pattern)

    def remove(self, subscription: Subscription) -> None:
        self.trie.remove(subscription.pattern, subscription)
        self._refresh(subscription.pattern)

    def _refresh(self, pattern: str) -> None:
        """Bring the route cache up to date after `pattern` gained or lost a subscription."""
        if SINGLE in pattern or TAIL in pattern:
            self.routes.clear()
        else:
            # An exact pattern is a topic: resolve it now, so that the first publish to a
            # declared topic pays no more than any other.
            self.routes.pop(pattern, None)
            self.route(pattern)

    def route(self, topic: str) -> Route:
        cached = self.routes.get(topic)
        if cached is not None:
            return cached
        validate_topic(topic)
        solo: list[Inbox] = []
        grouped: dict[str, list[Subscription]] = {}
        replies_only = topic.startswith(REPLY_PREFIX)
        for subscription in self.trie.match(topic):
            if replies_only and not subscription.pattern.startswith(REPLY_PREFIX):
                continue  # a request's replies go to its requester alone, not to `_bus.>`
            if subscription.group is None:
                solo.append(subscription.inbox)
            else:
                grouped.setdefault(subscription.group, []).append(subscription)
        route: Route = (
            GroupedRoute(tuple(solo), tuple(GroupRoute(m) for m in grouped.values()))
            if grouped
            else tuple(solo)
        )
        if len(self.routes) >= ROUTE_CACHE_LIMIT:
            self.routes.clear()
        self.routes[topic] = route
        return route

    def receivers(self, topic: str) -> list[str]:
        """Who an event on `topic` reaches: subscription names, and a group's name once."""
        route = self.route(topic)
        if isinstance(route, GroupedRoute):
            return [inbox.subscription.name for inbox in route.inboxes] + [
                group.group for group in route.groups
            ]
        return [inbox.subscription.name for inbox in route]


def targeted(targets: Sequence[Inbox], target: str) -> tuple[Inbox, ...]:
    """Of the inboxes an event goes to, the one of the subscription (or group) it is meant
    for: a dead letter sent back by a retry goes to no other subscriber."""
    chosen = [
        inbox
        for inbox in targets
        if inbox.subscription.name == target or inbox.subscription.group == target
    ]
    if not chosen:
        logger.warning(
            "eventwire: an event is meant for subscription %r, which this bus does not "
            "have among those matching its topic; nobody handles it",
            target,
        )
    return tuple(chosen[:1])
