from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventwire import InvalidTopicError
from eventwire.topics import TopicTrie, pattern_matches, validate_pattern, validate_topic


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
