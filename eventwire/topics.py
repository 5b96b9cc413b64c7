"""Topic names, subscription patterns and the trie that routes one to the other.

Topics are dot-separated tokens of ``[A-Za-z0-9_-]``. Patterns may use ``*`` (exactly one
token) and ``>`` (one or more trailing tokens, last only), as in NATS. Topics whose first token
starts with ``_`` belong to the bus (``_dlq.…``, ``_bus.…``): a pattern only reaches them when
its own first token starts with ``_``.

A topic or pattern is at most `MAX_TOPIC_BYTES` bytes of UTF-8 (a dead-letter topic, ``_dlq.``
followed by the topic, counts without its prefix), so that every topic, its dead letter and
every pattern fit every broker; see `MAX_TOPIC_BYTES`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from eventwire.errors import InvalidTopicError

T = TypeVar("T")

SINGLE = "*"
TAIL = ">"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_TOPIC = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_TOKEN_RULE = "each dot-separated token must be one or more of A-Z a-z 0-9 _ -"

DEAD_LETTER_PREFIX = "_dlq."
"""A dead letter of topic ``t`` is published on ``_dlq.t``."""

# The tightest broker is RabbitMQ: a routing key (the topic) and a binding key (the pattern,
# whose trailing '>' is bound as '*.#', 2 bytes more) hold 255 bytes, and a dead letter's
# topic, or a pattern picking dead letters, carries the 5 bytes of '_dlq.' on top.
# NATS subjects are '<namespace>.' + topic: at most 64 + 1 + 5 + 248 bytes, far inside the
# server's 4 KB protocol line; SQLite and Redis store the topic as a value of any length.
_AMQP_KEY_BYTES = 255
_TAIL_BINDING_GROWTH = len("*.#") - len(TAIL)
MAX_TOPIC_BYTES = _AMQP_KEY_BYTES - len(DEAD_LETTER_PREFIX) - _TAIL_BINDING_GROWTH
"""The longest topic or pattern in UTF-8 bytes (248), the same on every backend. A topic
starting with ``_dlq.`` may be that much longer, so that every topic's dead letter is legal."""


def _limit_of(text: str) -> int:
    if text.startswith(DEAD_LETTER_PREFIX):
        return MAX_TOPIC_BYTES + len(DEAD_LETTER_PREFIX)
    return MAX_TOPIC_BYTES


def _length_problem(text: str, kind: str) -> str | None:
    size = len(text.encode("utf-8", "surrogatepass"))
    limit = _limit_of(text)
    if size <= limit:
        return None
    shown = text if len(text) <= 40 else text[:40] + "…"
    after_prefix = (
        f" ({MAX_TOPIC_BYTES} after {DEAD_LETTER_PREFIX!r})" if limit > MAX_TOPIC_BYTES else ""
    )
    return (
        f"{kind} {shown!r} is {size} bytes long (UTF-8), over the limit of {limit}{after_prefix}: "
        "shorten it, e.g. move ids or details into the payload or the key (the limit is the "
        f"same on every backend and leaves room for the {DEAD_LETTER_PREFIX!r} prefix of dead "
        "letters)"
    )


def _describe_problem(text: str, kind: str, allow_wildcards: bool) -> str:
    if not text:
        return f"{kind} must not be empty"
    too_long = _length_problem(text, kind)
    if too_long is not None:
        return too_long
    tokens = text.split(".")
    for index, token in enumerate(tokens):
        if not token:
            return f"{kind} {text!r} has an empty token (leading, trailing or double dot)"
        if token in (SINGLE, TAIL):
            if not allow_wildcards:
                return (
                    f"topic {text!r} contains the wildcard {token!r}: wildcards are only "
                    "allowed in subscription patterns, publish to a concrete topic"
                )
            if token == TAIL and index != len(tokens) - 1:
                return f"pattern {text!r} uses '>' before the last token; '>' must be last"
            continue
        if not _TOKEN.fullmatch(token):
            bad = sorted({ch for ch in token if not _TOKEN.fullmatch(ch)})
            wildcard_hint = (
                " ('*' and '>' must stand alone as a whole token)"
                if allow_wildcards and ("*" in bad or ">" in bad)
                else ""
            )
            return (
                f"{kind} {text!r} has token {token!r} with invalid character(s) "
                f"{''.join(bad)!r}: {_TOKEN_RULE}{wildcard_hint}"
            )
    raise AssertionError("unreachable")  # pragma: no cover


def is_topic(text: object) -> bool:
    """Whether `text` is a valid concrete topic (no error: for input from outside)."""
    # A match is ASCII: its length in characters is its length in bytes.
    return (
        isinstance(text, str)
        and _TOPIC.fullmatch(text) is not None
        and len(text) <= _limit_of(text)
    )


def validate_topic(topic: str) -> str:
    """Return `topic` if it is a valid concrete topic, else raise `InvalidTopicError`."""
    # A match is ASCII: its length in characters is its length in bytes.
    if isinstance(topic, str) and len(topic) <= MAX_TOPIC_BYTES and _TOPIC.fullmatch(topic):
        return topic
    if not isinstance(topic, str):
        raise InvalidTopicError(f"topic must be a str, got {type(topic).__name__}: {topic!r}")
    if is_topic(topic):
        return topic  # a dead letter's topic, allowed the length of its prefix on top
    raise InvalidTopicError(_describe_problem(topic, "topic", allow_wildcards=False))


def validate_pattern(pattern: str) -> str:
    """Return `pattern` if it is a valid subscription pattern, else raise `InvalidTopicError`."""
    if not isinstance(pattern, str):
        raise InvalidTopicError(f"pattern must be a str, got {type(pattern).__name__}: {pattern!r}")
    too_long = _length_problem(pattern, "pattern")
    if too_long is not None:
        raise InvalidTopicError(too_long)
    if _TOPIC.fullmatch(pattern):
        return pattern
    tokens = pattern.split(".")
    if pattern and all(
        _TOKEN.fullmatch(t) or t == SINGLE or (t == TAIL and i == len(tokens) - 1)
        for i, t in enumerate(tokens)
    ):
        return pattern
    raise InvalidTopicError(_describe_problem(pattern, "pattern", allow_wildcards=True))


def is_reserved(topic: str) -> bool:
    """True for the bus's own topics (first token starts with ``_``)."""
    return topic.startswith("_")


def pattern_matches(pattern: str, topic: str) -> bool:
    """Whether `pattern` matches the concrete `topic` (both assumed valid)."""
    p_tokens = pattern.split(".")
    t_tokens = topic.split(".")
    if is_reserved(topic) and not p_tokens[0].startswith("_"):
        return False
    for index, p in enumerate(p_tokens):
        if p == TAIL:
            return len(t_tokens) > index
        if index >= len(t_tokens):
            return False
        if p != SINGLE and p != t_tokens[index]:
            return False
    return len(p_tokens) == len(t_tokens)


class _Node(Generic[T]):
    __slots__ = ("children", "here", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.here: list[T] = []  # values whose pattern ends at this node
        self.tail: list[T] = []  # values whose pattern ends with '>' after this node


class TopicTrie(Generic[T]):
    """Maps patterns to values; `match(topic)` walks only the branches the topic can reach,
    so its cost does not grow with the number of patterns that do not match."""

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, pattern: str, value: T) -> None:
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            node = node.children.setdefault(token, _Node())
        last = tokens[-1]
        if last == TAIL:
            node.tail.append(value)
        else:
            node.children.setdefault(last, _Node()).here.append(value)
        self._size += 1

    def remove(self, pattern: str, value: T) -> bool:
        """Remove one (pattern, value) pair; prune empty branches. False if absent."""
        tokens = pattern.split(".")
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for token in tokens[:-1]:
            child = node.children.get(token)
            if child is None:
                return False
            path.append((node, token))
            node = child
        last = tokens[-1]
        if last == TAIL:
            bucket = node.tail
        else:
            leaf = node.children.get(last)
            if leaf is None:
                return False
            path.append((node, last))
            node = leaf
            bucket = node.here
        try:
            bucket.remove(value)
        except ValueError:
            return False
        self._size -= 1
        for parent, token in reversed(path):
            child = parent.children[token]
            if child.children or child.here or child.tail:
                break
            del parent.children[token]
        return True

    def match(self, topic: str) -> list[T]:
        """Values of every pattern matching `topic`, in insertion order per pattern."""
        tokens = topic.split(".")
        found: list[T] = []
        reserved = tokens[0].startswith("_")
        self._walk(self._root, tokens, 0, found, reserved)
        return found

    def _walk(
        self, node: _Node[T], tokens: list[str], index: int, found: list[T], reserved: bool
    ) -> None:
        if index == len(tokens):
            found.extend(node.here)
            return
        # Wildcards at the first position never reach the bus's own '_' topics.
        wildcards_allowed = not (reserved and index == 0)
        if node.tail and wildcards_allowed:
            found.extend(node.tail)
        child = node.children.get(tokens[index])
        if child is not None:
            self._walk(child, tokens, index + 1, found, reserved)
        if wildcards_allowed:
            star = node.children.get(SINGLE)
            if star is not None:
                self._walk(star, tokens, index + 1, found, reserved)

    def __iter__(self) -> Iterator[T]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield from node.here
            yield from node.tail
            stack.extend(node.children.values())


def safe_name(name: str, *, allowed: str = r"A-Za-z0-9_-", limit: int = 200) -> str:
    """A broker-safe identifier for a subscription name (which may hold dots, ``#``, ``<>``):
    disallowed characters become ``_``, and a crc32 of the original keeps distinct names
    distinct."""
    cleaned = re.sub(f"[^{allowed}]", "_", name)[: limit - 9]
    return f"{cleaned}_{zlib.crc32(name.encode()):08x}"
