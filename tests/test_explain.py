"""Why this slot: the explanation of each of the resolver's cases, from real resolutions."""

from __future__ import annotations

from dispatch.routing.explain import explain, explain_no_route
from dispatch.routing.resolver import Decision, NoRoute, resolve
from dispatch.routing.table import ModelEntry, RoutingTable, make_slot

MODEL = "qwen3-coder-25b"


def m(model_id: str, default: bool = False, source: str = "manifest", upstream: str | None = None):
    return ModelEntry(model_id, upstream or model_id, source, default)


def two_servers(primary: dict, hermes: dict) -> RoutingTable:
    return RoutingTable.build(
        1,
        [
            make_slot("primary", "http://127.0.0.1:1/v1", [m(MODEL, True)], **primary),
            make_slot(
                "agent-hermes",
                "http://127.0.0.1:2/v1",
                [m(MODEL, True), m("hermes", source="alias", upstream=MODEL)],
                **hermes,
            ),
        ],
    )


def decide(table: RoutingTable, model: str | None, inflight=None, fallback=None) -> Decision:
    d = resolve(table, model, "chat/completions", inflight or {}, fallback)
    assert isinstance(d, Decision)
    return d


def test_pinned():
    d = decide(two_servers({"state": "ready"}, {"state": "ready"}), f"agent-hermes/{MODEL}")
    e = explain(d)
    assert e.rule == "pinned" and e.chosen == "agent-hermes"
    assert (
        e.text
        == f"answered by agent-hermes: the request pinned slot agent-hermes ('agent-hermes/{MODEL}')"
    )


def test_slot_name_and_default():
    table = two_servers({"state": "ready", "is_default": True}, {"state": "ready"})
    assert explain(decide(table, "agent-hermes")).rule == "slot"
    e = explain(decide(table, None))
    assert e.rule == "default"
    assert e.text == "answered by primary: the request named no model; primary is the default slot"


def test_alias_served_by_one_slot():
    d = decide(two_servers({"state": "ready"}, {"state": "ready"}), "hermes")
    e = explain(d)
    assert e.rule == "alias"
    assert e.text == (
        f"answered by agent-hermes: 'hermes' is agent-hermes's alias for '{MODEL}', "
        "the only slot serving it"
    )
    assert [c.slot for c in e.candidates] == ["agent-hermes"]


def test_ranked_by_state_names_every_candidate_with_state_priority_and_load():
    table = two_servers({"state": "loading", "priority": 5}, {"state": "ready"})
    d = decide(table, MODEL, {"primary": 0, "agent-hermes": 2})
    e = explain(d, (2, 0))
    assert e.rule == "state"
    assert e.text == f"answered by agent-hermes: the only ready slot serving '{MODEL}'"
    assert [(c.slot, c.state, c.priority, c.inflight) for c in e.candidates] == [
        ("agent-hermes", "ready", 0, 2),
        ("primary", "loading", 5, 0),
    ]


def test_ranked_by_priority_then_by_load():
    table = two_servers({"state": "ready", "priority": 3}, {"state": "ready"})
    assert explain(decide(table, MODEL)).rule == "priority"
    table = two_servers({"state": "ready"}, {"state": "ready"})
    d = decide(table, MODEL, {"primary": 4, "agent-hermes": 1})
    e = explain(d, (1, 4))
    assert (e.rule, e.chosen) == ("least_busy", "agent-hermes")
    assert "the least busy (1 in flight) of 2 ready slots" in e.text


def test_failover_when_the_preferred_slot_is_down():
    # The issue's own example: the operator prefers primary, primary is offline.
    table = two_servers({"state": "offline", "priority": 10}, {"state": "ready"})
    d = decide(table, MODEL)
    assert d.resolution_path == "failover:primary->agent-hermes"
    e = explain(d)
    assert (e.rule, e.failover) == ("failover", "primary->agent-hermes")
    assert e.text == (
        f"answered by agent-hermes: the only ready slot serving '{MODEL}'; primary was offline"
    )


def test_failover_in_forward_after_the_chosen_slot_failed():
    table = two_servers({"state": "ready", "priority": 1}, {"state": "ready"})
    d = decide(table, MODEL)
    assert d.slot == "primary"
    e = explain(d, answered_by="agent-hermes", resolution_path="failover:primary->agent-hermes")
    assert (e.rule, e.chosen, e.failover) == ("failover", "agent-hermes", "primary->agent-hermes")
    assert e.text.startswith("answered by agent-hermes: primary failed before answering")


def test_fallback():
    table = two_servers({"state": "ready"}, {"state": "ready"})
    e = explain(decide(table, "nobody-serves-this", fallback="primary"))
    assert e.rule == "fallback"
    assert "HAL0_FALLBACK_SLOT" in e.text and e.text.startswith("answered by primary")


def test_a_refused_request_is_routed_not_answered():
    d = decide(two_servers({"state": "ready"}, {"state": "ready"}), "hermes")
    assert explain(d, status=503).text.startswith("routed to agent-hermes: ")


def test_no_route():
    table = two_servers({"state": "ready"}, {"state": "ready"})
    r = resolve(table, "qwen3-coder-2b", "chat/completions")
    assert isinstance(r, NoRoute)
    e = explain_no_route(r)
    assert e.rule == "no_route" and e.chosen is None
    assert e.text.startswith("no route: The model 'qwen3-coder-2b' does not exist")
    assert e.as_dict()["candidates"] == []


def test_a_refusal_is_explained_by_its_own_message_not_an_earlier_ones_on_the_same_table():
    # Two requests naming no model, on two endpoints, on one table: the second one's "why"
    # once repeated the first's ("no default llm slot offering responses" for a chat request).
    from dispatch.observability.decisions import DecisionRecord
    from dispatch.routing.resolver import resolve
    from dispatch.routing.table import RoutingTable

    table = RoutingTable.build(7, [])
    texts = []
    for endpoint in ("responses", "chat/completions"):
        rec = DecisionRecord.arrived("r", endpoint)
        rec.decided(resolve(table, None, endpoint))
        why = rec.why
        assert why is not None
        texts.append(why.text)
    assert "offering responses" in texts[0]
    assert "offering chat/completions" in texts[1]


def pattern_servers(primary: dict, hermes: dict) -> RoutingTable:
    """Both serve MODEL; agent-hermes also takes every claude-haiku-* name, and both
    every claude-* name (each as its own model)."""
    return RoutingTable.build(
        1,
        [
            make_slot(
                "primary",
                "http://127.0.0.1:1/v1",
                [m(MODEL, True), m("claude-*", source="alias", upstream=MODEL)],
                **primary,
            ),
            make_slot(
                "agent-hermes",
                "http://127.0.0.1:2/v1",
                [
                    m("gemma3-270m", True),
                    m("claude-haiku-*", source="alias", upstream="gemma3-270m"),
                    m("claude-*", source="alias", upstream="gemma3-270m"),
                ],
                **hermes,
            ),
        ],
    )


def test_an_alias_pattern_says_it_matched():
    d = decide(pattern_servers({"state": "ready"}, {"state": "ready"}), "claude-haiku-4-5")
    e = explain(d)
    assert e.rule == "pattern" and e.chosen == "agent-hermes"
    assert e.text == (
        "answered by agent-hermes: 'claude-haiku-4-5' matched alias pattern 'claude-haiku-*' "
        "→ agent-hermes/gemma3-270m, the only slot serving it"
    )


def test_a_pattern_on_several_slots_is_ranked_and_says_so():
    d = decide(
        pattern_servers({"state": "ready", "priority": 2}, {"state": "ready"}), "claude-sonnet-4-5"
    )
    e = explain(d)
    assert (e.rule, e.chosen) == ("priority", "primary")
    assert e.text == (
        "answered by primary: the highest priority (2) of 2 slots serving 'claude-sonnet-4-5' "
        f"(alias pattern 'claude-*' → '{MODEL}')"
    )
    assert [c.slot for c in e.candidates] == ["primary", "agent-hermes"]


def test_a_pinned_slot_names_the_pattern_that_matched():
    table = pattern_servers({"state": "ready"}, {"state": "ready"})
    e = explain(decide(table, "primary/claude-opus-4-1"))
    assert e.rule == "pinned"
    assert e.text == (
        "answered by primary: the request pinned slot primary ('primary/claude-opus-4-1'), "
        f"matched by its alias pattern 'claude-*' → '{MODEL}'"
    )
