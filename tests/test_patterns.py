"""Model-name patterns: an alias may be a glob. What a pattern is, which one wins, and the
resolver's order around them (an exact id or alias always first), from real resolutions."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.routing import patterns
from dispatch.routing.resolver import Decision, NoRoute, resolve
from dispatch.routing.scopes import Scope
from dispatch.routing.table import ModelEntry, RoutingTable, make_slot

CHAT = "chat/completions"


def m(model_id: str, default: bool = False, source: str = "manifest", upstream: str | None = None):
    return ModelEntry(model_id, upstream or model_id, source, default)


def alias(name: str, target: str) -> ModelEntry:
    return m(name, source="alias", upstream=target)


def slot(name: str, model: str, *aliases: tuple[str, str], **fields):
    entries = [m(model, True), *(alias(a, t) for a, t in aliases)]
    return make_slot(name, f"http://127.0.0.1:1/{name}/v1", entries, **{"state": "ready", **fields})


def decide(table: RoutingTable, model: str, endpoint: str = CHAT, **kw) -> Decision:
    d = resolve(table, model, endpoint, **kw)
    assert isinstance(d, Decision), d
    return d


# --- what a pattern is -----------------------------------------------------------------------


def test_only_glob_characters_make_a_pattern():
    assert patterns.is_pattern("claude-haiku-*")
    assert patterns.is_pattern("claude-?")
    assert patterns.is_pattern("gpt-[45]o")
    assert not patterns.is_pattern("Qwen/Qwen3-8B")
    assert not patterns.is_pattern("llama3:8b")


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        ("claude-*", 7),
        ("claude-haiku-*", 13),
        ("c?aude", 5),
        ("gpt-[45]o", 5),  # a class is no literal character
        ("x[]]y", 2),  # fnmatch: a "]" right after "[" is a member
        ("x[!]]y", 2),
        ("a[b", 3),  # unclosed: fnmatch reads the "[" as itself
    ],
)
def test_specificity_counts_literal_characters(pattern, literal):
    assert patterns.literal_length(pattern) == literal


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("claude-[haiku-*", "opens a '[' it never closes"),
        ("[!", "opens a '[' it never closes"),
        ("*", "has no literal character"),
        ("*?*", "has no literal character"),
        ("[abc]*", "has no literal character"),
    ],
)
def test_unusable_patterns_are_named(pattern, says):
    problem = patterns.problem(pattern)
    assert problem is not None and says in problem and repr(pattern) in problem


def test_usable_patterns_have_no_problem():
    for pattern in ("claude-*", "claude-haiku-*", "gpt-[45]o", "x[]]y", "[[]x"):
        assert patterns.problem(pattern) is None, pattern


# --- the resolver's order ---------------------------------------------------------------------


def claude_table(**big_fields) -> RoutingTable:
    """`big` takes every claude-* name; `small` the haiku ones (background work)."""
    return RoutingTable.build(
        1,
        [
            slot("big", "qwen3-30b", ("claude-*", "qwen3-30b"), **big_fields),
            slot("small", "gemma3-270m", ("claude-haiku-*", "gemma3-270m")),
        ],
    )


def test_a_pattern_routes_a_name_no_exact_id_claims():
    d = decide(claude_table(), "claude-sonnet-4-5")
    assert (d.slot, d.upstream_model, d.resolution_path) == ("big", "qwen3-30b", "pattern:big")
    assert d.pattern == "claude-*" and d.target.source == "pattern"


def test_the_most_specific_pattern_wins_whatever_the_slot_order():
    d = decide(claude_table(), "claude-haiku-4-5-20251001")
    assert (d.slot, d.upstream_model, d.pattern) == ("small", "gemma3-270m", "claude-haiku-*")
    # Higher priority on the broad pattern's slot changes nothing: specificity first.
    d = decide(claude_table(priority=100), "claude-haiku-4-5-20251001")
    assert d.slot == "small"


def test_an_exact_id_or_alias_always_beats_a_pattern():
    table = RoutingTable.build(
        1,
        [
            slot("big", "qwen3-30b", ("claude-*", "qwen3-30b")),
            slot("exact", "claude-haiku-4-5", ("claude-opus-4-1", "claude-haiku-4-5")),
        ],
    )
    assert decide(table, "claude-haiku-4-5").resolution_path == "model:exact"
    d = decide(table, "claude-opus-4-1")
    assert (d.resolution_path, d.pattern) == ("alias:exact", None)
    assert decide(table, "claude-sonnet-4-5").resolution_path == "pattern:big"


def test_a_slot_name_beats_a_pattern():
    table = RoutingTable.build(
        1, [slot("big", "qwen3-30b", ("c*", "qwen3-30b")), slot("claude", "gemma3-270m")]
    )
    assert decide(table, "claude").resolution_path == "slot:claude"
    assert decide(table, "codex").resolution_path == "pattern:big"


def test_equally_specific_patterns_go_by_code_point_not_declaration_order():
    # Both have 8 literal characters and match; "claude-*5" sorts first ("*" < "h").
    a = slot("a", "a-model", ("claude-h*", "a-model"))
    b = slot("b", "b-model", ("claude-*5", "b-model"))
    for declared in ([a, b], [b, a]):
        d = decide(RoutingTable.build(1, declared), "claude-haiku-4-5")
        assert (d.slot, d.pattern) == ("b", "claude-*5")
    assert patterns.Matcher(["claude-h*", "claude-*5"]).patterns == ("claude-*5", "claude-h*")


def test_one_pattern_on_two_slots_is_ranked_as_one_model_on_two_slots():
    def table(**b_fields):
        return RoutingTable.build(
            1,
            [
                slot("a", "qwen3-30b", ("claude-*", "qwen3-30b"), priority=1),
                slot("b", "qwen3-30b-b", ("claude-*", "qwen3-30b-b"), **b_fields),
            ],
        )

    d = decide(table(priority=5), "claude-sonnet-4-5")
    assert d.resolution_path == "pattern:b"
    assert [(t.slot.name, t.upstream_model) for t in d.targets] == [
        ("b", "qwen3-30b-b"),
        ("a", "qwen3-30b"),
    ]  # the other slot is the failover target, with its own model
    d = decide(table(priority=5, state="offline"), "claude-sonnet-4-5")
    assert d.resolution_path == "failover:b->a"
    d = decide(table(priority=1), "claude-sonnet-4-5", inflight={"a": 3})
    assert d.slot == "b"  # equal priority: the least busy


def test_patterns_are_case_sensitive_as_model_ids_are():
    r = resolve(claude_table(), "Claude-Sonnet-4-5", CHAT)
    assert isinstance(r, NoRoute) and r.code == "model_not_found"


def test_no_match_is_still_model_not_found_with_close_ids():
    r = resolve(claude_table(), "qwen3-30c", CHAT)
    assert isinstance(r, NoRoute)
    assert (r.status, r.code) == (404, "model_not_found")
    assert "Did you mean: 'qwen3-30b'" in r.message
    assert "claude-*" not in r.message  # a pattern is no id to suggest
    assert "claude-*" not in claude_table().known_ids


def test_the_operators_fallback_comes_after_patterns():
    table = claude_table()
    d = decide(table, "claude-sonnet-4-5", fallback_slot="small")
    assert d.resolution_path == "pattern:big"
    d = decide(table, "gpt-5", fallback_slot="small")
    assert d.resolution_path == "fallback:small"


def test_a_disabled_slots_patterns_route_nothing():
    table = claude_table(enabled=False)
    assert decide(table, "claude-haiku-4-5").slot == "small"
    r = resolve(table, "claude-sonnet-4-5", CHAT)
    assert isinstance(r, NoRoute) and r.code == "model_not_found"


def test_the_winning_pattern_must_offer_the_endpoint_no_broader_one_takes_over():
    table = RoutingTable.build(
        1,
        [
            slot("chat", "qwen3-30b", ("text-*", "qwen3-30b")),
            slot("embed", "bge-m3", ("text-embedding-*", "bge-m3"), type="embedding"),
        ],
    )
    d = decide(table, "text-embedding-3-small", "embeddings")
    assert (d.slot, d.upstream_model) == ("embed", "bge-m3")
    r = resolve(table, "text-embedding-3-small", CHAT)
    assert isinstance(r, NoRoute) and r.code == "endpoint_not_supported"
    assert "text-embedding-3-small" in r.message and "embed" in r.message


def test_slot_qualified_names_try_that_slots_patterns():
    table = claude_table()
    d = decide(table, "big/claude-haiku-4-5")  # small's pattern is more specific: not here
    assert (d.slot, d.upstream_model, d.resolution_path) == ("big", "qwen3-30b", "qualified:big")
    assert d.pattern == "claude-*"
    r = resolve(table, "small/claude-sonnet-4-5", CHAT)
    assert isinstance(r, NoRoute) and r.code == "model_not_found"


def test_a_keys_scope_sees_the_name_asked_for_and_the_model_behind_it():
    d = decide(claude_table(), "claude-sonnet-4-5")
    assert Scope(("claude-sonnet-*",)).narrow(d) is d
    assert Scope(("qwen3-*",)).narrow(d) is d
    assert Scope(("gemma*",)).narrow(d) is None


# --- the table's matcher: compiled once, memoized, bounded -----------------------------------


def test_patterns_are_compiled_once_per_table_and_names_remembered():
    table = claude_table()
    matcher = table.matcher
    decide(table, "claude-sonnet-4-5")
    decide(table, "claude-haiku-4-5")
    assert table.matcher is matcher
    assert dict(matcher.memo) == {
        "claude-sonnet-4-5": "claude-*",
        "claude-haiku-4-5": "claude-haiku-*",
    }
    resolve(table, "nope", CHAT)
    assert matcher.memo["nope"] is None  # a miss is remembered too
    # A new table, a new matcher: nothing remembered of the old one's slots.
    assert not claude_table().matcher.memo
    # No pattern at all: no matcher is consulted (exact lookups only).
    assert not RoutingTable.build(1, [slot("x", "m")]).matcher


def test_the_memo_is_bounded():
    table = claude_table()
    for i in range(patterns.MEMO_LIMIT * 2 + 5):
        resolve(table, f"garbage-{i}", CHAT)
        assert len(table.matcher.memo) <= patterns.MEMO_LIMIT
    assert decide(table, "claude-haiku-4-5").slot == "small"  # still right after clearing


def test_exact_ids_never_reach_the_matcher():
    table = claude_table()
    decide(table, "qwen3-30b")
    decide(table, "big")
    assert not table.matcher.memo


# --- a property: the winner is the most specific match, and an exact id always wins --------

_ALPHABET = "ab-*?"
_pattern = st.text(alphabet=_ALPHABET, min_size=1, max_size=6).filter(
    lambda p: patterns.is_pattern(p) and patterns.problem(p) is None
)
_name = st.text(alphabet="ab-", min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(
    pats=st.lists(_pattern, min_size=1, max_size=5, unique=True),
    exact=st.lists(_name, max_size=3, unique=True),
    name=_name,
)
def test_the_winner_is_the_most_specific_matching_pattern(pats, exact, name):
    slots = [
        make_slot(
            f"s{i}", "http://127.0.0.1:1/v1", [m(f"target-{i}", True), alias(p, f"target-{i}")]
        )
        for i, p in enumerate(pats)
    ]
    slots.append(make_slot("exact", "http://127.0.0.1:2/v1", [m(e) for e in exact]))
    table = RoutingTable.build(1, slots)
    found = resolve(table, name, CHAT)
    if name in exact:
        assert isinstance(found, Decision) and found.resolution_path == "model:exact"
        return
    matching = [p for p in pats if fnmatchcase(name, p)]
    if not matching:
        assert isinstance(found, NoRoute)
        return
    best = min(matching, key=lambda p: (-patterns.literal_length(p), p))
    assert isinstance(found, Decision)
    assert found.pattern == best
    assert found.slot == f"s{pats.index(best)}"
