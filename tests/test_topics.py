from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventwire import InvalidTopicError
from eventwire.topics import (
    DEAD_LETTER_PREFIX,
    MAX_TOPIC_BYTES,
    TopicTrie,
    is_topic,
    pattern_matches,
    validate_pattern,
    validate_topic,
)


@pytest.mark.parametrize("topic", ["user.query", "a", "A-b_c.9", "_dlq.user.query", "x.y.z.w"])
def test_valid_topics_pass(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [
        ("", "must not be empty"),
        ("user..query", "empty token"),
        (".user", "empty token"),
        ("user.", "empty token"),
        ("user.*", "wildcard"),
        ("user.>", "wildcard"),
        ("user query", "invalid character"),
        ("user/query", "invalid character"),
        ("usér", "invalid character"),
    ],
)
def test_bad_topics_are_rejected_with_the_rule(topic: str, fragment: str) -> None:
    with pytest.raises(InvalidTopicError, match=fragment) as info:
        validate_topic(topic)
    assert isinstance(info.value, ValueError)
    if topic:
        assert repr(topic) in str(info.value)


def test_non_string_topic_is_rejected() -> None:
    with pytest.raises(InvalidTopicError, match="must be a str"):
        validate_topic(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", ["user.*", "user.>", ">", "*", "*.query", "a.*.c.>"])
def test_valid_patterns_pass(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("", "must not be empty"),
        ("user.>.x", "'>' must be last"),
        ("user.q*", "stand alone"),
        ("user..x", "empty token"),
        ("us er", "invalid character"),
    ],
)
def test_bad_patterns_are_rejected_with_the_rule(pattern: str, fragment: str) -> None:
    with pytest.raises(InvalidTopicError, match=fragment):
        validate_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("user.*", "user.query", True),
        ("user.*", "user.query.x", False),
        ("user.*", "user", False),
        ("user.>", "user.query", True),
        ("user.>", "user.query.x", True),
        ("user.>", "user", False),
        ("*.query", "user.query", True),
        (">", "user.query", True),
        (">", "_dlq.user.query", False),
        ("*.user.query", "_dlq.user.query", False),
        ("_dlq.>", "_dlq.user.query", True),
        ("_dlq.*.query", "_dlq.user.query", True),
        ("user.query", "user.query", True),
        ("user.query", "user.other", False),
    ],
)
def test_matching_rules(pattern: str, topic: str, expected: bool) -> None:
    assert pattern_matches(pattern, topic) is expected
    trie: TopicTrie[str] = TopicTrie()
    trie.add(pattern, "x")
    assert (trie.match(topic) == ["x"]) is expected


def reference_match(pattern: str, topic: str) -> bool:
    """A deliberately naive matcher, written independently of the trie."""
    p, t = pattern.split("."), topic.split(".")
    if t[0].startswith("_") and not p[0].startswith("_"):
        return False
    if p[-1] == ">":
        head = p[:-1]
        return len(t) > len(head) and all(a in ("*", b) for a, b in zip(head, t, strict=False))
    return len(p) == len(t) and all(a in ("*", b) for a, b in zip(p, t, strict=True))


token = st.sampled_from(["a", "b", "c", "_x", "user", "q-1"])
topics = st.lists(token, min_size=1, max_size=5).map(".".join)
pattern_tokens = st.sampled_from(["a", "b", "c", "_x", "user", "q-1", "*"])
patterns = st.builds(
    lambda head, tail: ".".join(head + ([">"] if tail else [])),
    st.lists(pattern_tokens, min_size=0, max_size=4),
    st.booleans(),
).filter(bool)


@given(st.lists(patterns, min_size=1, max_size=30, unique=True), topics)
def test_trie_agrees_with_reference_matcher(pattern_list: list[str], topic: str) -> None:
    trie: TopicTrie[str] = TopicTrie()
    for pattern in pattern_list:
        trie.add(pattern, pattern)
    expected = sorted(p for p in pattern_list if reference_match(p, topic))
    assert sorted(trie.match(topic)) == expected
    assert all(pattern_matches(p, topic) == reference_match(p, topic) for p in pattern_list)


@given(st.lists(patterns, min_size=1, max_size=20, unique=True), topics, st.data())
def test_trie_remove_keeps_the_rest(
    pattern_list: list[str], topic: str, data: st.DataObject
) -> None:
    trie: TopicTrie[str] = TopicTrie()
    for pattern in pattern_list:
        trie.add(pattern, pattern)
    removed = data.draw(st.sampled_from(pattern_list))
    assert trie.remove(removed, removed)
    assert not trie.remove(removed, removed)
    assert len(trie) == len(pattern_list) - 1
    expected = sorted(p for p in pattern_list if p != removed and reference_match(p, topic))
    assert sorted(trie.match(topic)) == expected


def test_trie_match_visits_only_reachable_branches() -> None:
    trie: TopicTrie[int] = TopicTrie()
    for n in range(10_000):
        trie.add(f"topic.{n}", n)
    visited: list[int] = []
    original = TopicTrie._walk

    def counting_walk(self, node, tokens, index, found, reserved):  # type: ignore[no-untyped-def]
        visited.append(index)
        return original(self, node, tokens, index, found, reserved)

    TopicTrie._walk = counting_walk  # type: ignore[method-assign]
    try:
        assert trie.match("topic.1234") == [1234]
    finally:
        TopicTrie._walk = original  # type: ignore[method-assign]
    # root, "topic", "1234": the other 9,999 subscriptions are never looked at
    assert len(visited) == 3


def topic_of_bytes(size: int, prefix: str = "") -> str:
    """A valid topic of exactly `size` bytes: `prefix`, then 'a.' tokens, then one token."""
    body = size - len(prefix)
    return prefix + "a." * ((body - 1) // 2) + "b" * (2 - body % 2)


def test_topic_of_bytes_builds_the_asked_length() -> None:
    for size in (1, 2, 3, 10, MAX_TOPIC_BYTES, MAX_TOPIC_BYTES + 1):
        topic = topic_of_bytes(size)
        assert len(topic.encode()) == size
        assert is_topic(topic) is (size <= MAX_TOPIC_BYTES)


def test_the_limit_leaves_room_for_the_dead_letter_prefix_on_a_255_byte_key() -> None:
    # RabbitMQ's routing and binding keys hold 255 bytes; a trailing '>' binds as '*.#'.
    dead_letter_pattern = DEAD_LETTER_PREFIX + topic_of_bytes(MAX_TOPIC_BYTES - 2) + ".>"
    validate_pattern(dead_letter_pattern)
    assert len(dead_letter_pattern.replace(">", "*.#").encode()) <= 255


def test_a_topic_and_a_pattern_at_the_limit_pass() -> None:
    topic = topic_of_bytes(MAX_TOPIC_BYTES)
    assert validate_topic(topic) == topic
    assert validate_pattern(topic) == topic
    pattern = topic_of_bytes(MAX_TOPIC_BYTES - 2) + ".>"
    assert validate_pattern(pattern) == pattern
    assert is_topic(topic)


@pytest.mark.parametrize("kind", ["topic", "pattern"])
def test_one_byte_over_the_limit_names_the_length_the_limit_and_what_to_do(kind: str) -> None:
    text = topic_of_bytes(MAX_TOPIC_BYTES + 1)
    validate = validate_topic if kind == "topic" else validate_pattern
    with pytest.raises(InvalidTopicError) as info:
        validate(text)
    message = str(info.value)
    assert message.startswith(f"{kind} '{text[:40]}…' is {MAX_TOPIC_BYTES + 1} bytes long")
    assert f"over the limit of {MAX_TOPIC_BYTES}:" in message
    assert "shorten it" in message
    assert "\n" not in message
    assert not is_topic(text)


def test_a_pattern_with_wildcards_over_the_limit_is_refused() -> None:
    pattern = topic_of_bytes(MAX_TOPIC_BYTES - 1) + ".*"
    with pytest.raises(InvalidTopicError, match=f"is {MAX_TOPIC_BYTES + 1} bytes long"):
        validate_pattern(pattern)


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    # Two bytes per 'é': fewer characters than the limit, more bytes.
    text = "é" * (MAX_TOPIC_BYTES // 2 + 1)
    assert len(text) < MAX_TOPIC_BYTES
    size = len(text.encode())
    for validate in (validate_topic, validate_pattern):
        with pytest.raises(InvalidTopicError, match=f"is {size} bytes long"):
            validate(text)


def test_dead_letter_topics_may_carry_their_prefix_on_top_of_the_limit() -> None:
    longest = topic_of_bytes(MAX_TOPIC_BYTES)
    dead_letter = DEAD_LETTER_PREFIX + longest
    assert validate_topic(dead_letter) == dead_letter
    assert validate_pattern(dead_letter) == dead_letter
    assert is_topic(dead_letter)
    over = DEAD_LETTER_PREFIX + topic_of_bytes(MAX_TOPIC_BYTES + 1)
    limit = MAX_TOPIC_BYTES + len(DEAD_LETTER_PREFIX)
    for validate in (validate_topic, validate_pattern):
        with pytest.raises(InvalidTopicError, match=f"over the limit of {limit} "):
            validate(over)
    assert not is_topic(over)


def test_only_one_dead_letter_prefix_is_allowed_on_top() -> None:
    doubled = DEAD_LETTER_PREFIX + DEAD_LETTER_PREFIX + topic_of_bytes(MAX_TOPIC_BYTES)
    with pytest.raises(InvalidTopicError, match="bytes long"):
        validate_topic(doubled)


def test_other_reserved_topics_get_no_allowance() -> None:
    with pytest.raises(InvalidTopicError, match=f"over the limit of {MAX_TOPIC_BYTES}:"):
        validate_topic("_bus." + topic_of_bytes(MAX_TOPIC_BYTES - 4))
