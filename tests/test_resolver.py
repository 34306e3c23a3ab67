"""The resolver: a pure function from (table, model, endpoint) to a decision or no route."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.routing.resolver import Decision, NoRoute, resolve
from dispatch.routing.table import ModelEntry, RoutingTable, make_slot


def m(model_id: str, default: bool = False, source: str = "manifest", upstream: str | None = None):
    return ModelEntry(model_id, upstream or model_id, source, default)


def seed_table(**hermes_kwargs) -> RoutingTable:
    primary = make_slot(
        "primary",
        "http://127.0.0.1:8001/v1",
        [m("qwen3-coder-40b", True)],
        is_default=True,
        state="ready",
    )
    hermes = make_slot(
        "agent-hermes",
        "http://127.0.0.1:8002/v1",
        [
            m("qwen3-coder-reap-25b-a3b-q5km", True),
            m("hermes", source="alias", upstream="qwen3-coder-reap-25b-a3b-q5km"),
        ],
        **{"state": "ready", **hermes_kwargs},
    )
    return RoutingTable.build(1, [primary, hermes])


def test_model_goes_to_the_slot_that_serves_it_not_the_default():
    # The bug that started the project: agent-hermes' model went to primary.
    d = resolve(seed_table(), "qwen3-coder-reap-25b-a3b-q5km", "chat/completions")
    assert isinstance(d, Decision)
    assert d.slot == "agent-hermes"
    assert d.resolution_path == "model:agent-hermes"
    assert d.upstream_model == "qwen3-coder-reap-25b-a3b-q5km"


def test_alias_rewrites_to_upstream_model():
    d = resolve(seed_table(), "hermes", "chat/completions")
    assert isinstance(d, Decision)
    assert (d.slot, d.upstream_model, d.resolution_path) == (
        "agent-hermes",
        "qwen3-coder-reap-25b-a3b-q5km",
        "alias:agent-hermes",
    )


def test_qualified_id_pins_the_slot():
    d = resolve(seed_table(), "agent-hermes/qwen3-coder-reap-25b-a3b-q5km", "chat/completions")
    assert isinstance(d, Decision)
    assert (d.slot, d.resolution_path) == ("agent-hermes", "qualified:agent-hermes")
    assert d.upstream_model == "qwen3-coder-reap-25b-a3b-q5km"


def test_qualified_id_for_a_model_the_slot_does_not_serve_is_404():
    r = resolve(seed_table(), "agent-hermes/qwen3-coder-40b", "chat/completions")
    assert isinstance(r, NoRoute)
    assert (r.status, r.code) == (404, "model_not_found")
    assert "agent-hermes" in r.message


def test_model_ids_with_slashes_are_not_mistaken_for_qualifiers():
    vllm = make_slot("vllm", "http://127.0.0.1:8003/v1", [m("Qwen/Qwen3-8B", True)], state="ready")
    table = RoutingTable.build(1, [vllm])
    d = resolve(table, "Qwen/Qwen3-8B", "chat/completions")
    assert isinstance(d, Decision)
    assert (d.slot, d.upstream_model, d.resolution_path) == ("vllm", "Qwen/Qwen3-8B", "model:vllm")
    d = resolve(table, "vllm/Qwen/Qwen3-8B", "chat/completions")
    assert isinstance(d, Decision)
    assert (d.slot, d.upstream_model) == ("vllm", "Qwen/Qwen3-8B")


def test_slot_name_uses_its_default_model():
    d = resolve(seed_table(), "agent-hermes", "chat/completions")
    assert isinstance(d, Decision)
    assert (d.slot, d.upstream_model, d.resolution_path) == (
        "agent-hermes",
        "qwen3-coder-reap-25b-a3b-q5km",
        "slot:agent-hermes",
    )


def test_no_model_uses_the_default_slot_of_the_endpoint_type():
    d = resolve(seed_table(), None, "chat/completions")
    assert isinstance(d, Decision)
    assert (d.slot, d.resolution_path, d.upstream_model) == (
        "primary",
        "default:primary",
        "qwen3-coder-40b",
    )
    r = resolve(seed_table(), None, "embeddings")
    assert isinstance(r, NoRoute)
    assert (r.status, r.code) == (400, "model_required")


def test_unknown_model_is_404_with_suggestions_and_never_a_silent_default():
    r = resolve(seed_table(), "qwen3-coder-reap-25b", "chat/completions")
    assert isinstance(r, NoRoute)
    assert (r.status, r.code) == (404, "model_not_found")
    assert "'qwen3-coder-reap-25b-a3b-q5km'" in r.message


def test_fallback_slot_only_when_the_operator_opts_in():
    d = resolve(seed_table(), "mystery", "chat/completions", fallback_slot="primary")
    assert isinstance(d, Decision)
    assert (d.slot, d.resolution_path, d.upstream_model) == (
        "primary",
        "fallback:primary",
        "mystery",
    )


def test_candidates_prefer_ready_then_priority_then_least_busy():
    a = make_slot("a", "http://a/v1", [m("x", True)], state="loading", priority=10)
    b = make_slot("b", "http://b/v1", [m("x", True)], state="ready", priority=0)
    c = make_slot("c", "http://c/v1", [m("x", True)], state="ready", priority=5)
    d_ = make_slot("d", "http://d/v1", [m("x", True)], state="ready", priority=5)
    table = RoutingTable.build(1, [a, b, c, d_])
    d = resolve(table, "x", "chat/completions", inflight={"c": 3, "d": 1})
    assert isinstance(d, Decision)
    assert d.candidates == ("d", "c", "b", "a")


def test_a_down_preferred_slot_is_skipped_and_the_path_says_failover():
    a = make_slot("a", "http://a/v1", [m("x", True)], state="offline", priority=10)
    b = make_slot("b", "http://b/v1", [m("x", True)], state="ready")
    d = resolve(RoutingTable.build(1, [a, b]), "x", "chat/completions")
    assert isinstance(d, Decision)
    assert (d.slot, d.resolution_path) == ("b", "failover:a->b")


def test_disabled_slots_serve_nothing():
    table = seed_table(enabled=False)
    r = resolve(table, "qwen3-coder-reap-25b-a3b-q5km", "chat/completions")
    assert isinstance(r, NoRoute)
    assert r.status == 404
    r = resolve(table, "agent-hermes/qwen3-coder-reap-25b-a3b-q5km", "chat/completions")
    assert isinstance(r, NoRoute)
    assert (r.status, r.code) == (503, "slot_unavailable")


# --- properties over random tables ------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True)
model_ids = st.one_of(
    st.from_regex(r"[a-z][a-z0-9.-]{0,8}", fullmatch=True),
    st.from_regex(r"[A-Z][a-z]{0,4}/[a-z0-9-]{1,6}", fullmatch=True),
)
states = st.sampled_from(["unknown", "offline", "loading", "ready", "error", "draining"])


@st.composite
def tables(draw):
    slot_names = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    slots = []
    default_taken = False
    for name in slot_names:
        ids = draw(st.lists(model_ids, min_size=0, max_size=4, unique=True))
        entries = [
            m(i, default=(j == 0), source=draw(st.sampled_from(["manifest", "discovered"])))
            for j, i in enumerate(ids)
        ]
        if ids:
            for alias in draw(st.lists(model_ids, max_size=2, unique=True)):
                if alias not in ids:
                    entries.append(m(alias, source="alias", upstream=ids[0]))
        is_default = not default_taken and draw(st.booleans())
        default_taken = default_taken or is_default
        slots.append(
            make_slot(
                name,
                f"http://127.0.0.1:1/{name}/v1",
                entries,
                state=draw(states),
                enabled=draw(st.booleans()),
                priority=draw(st.integers(-2, 2)),
                is_default=is_default,
            )
        )
    return RoutingTable.build(7, slots)


@given(table=tables(), data=st.data())
@settings(max_examples=300, deadline=None)
def test_every_decision_names_a_slot_that_serves_the_model(table, data):
    known = (
        list(table.known_ids)
        + list(table.slots)
        + [f"{s}/{mid}" for s in table.slots for mid in table.slots[s].models]
    )
    requested = data.draw(
        st.one_of(st.none(), st.sampled_from(known) if known else st.none(), model_ids)
    )
    result = resolve(table, requested, "chat/completions", inflight={})
    if isinstance(result, NoRoute):
        assert result.status in (400, 404, 503) and result.code and result.message
        return
    assert result.table_version == 7
    for target in result.targets:
        slot = target.slot
        assert slot.enabled, "never routes to a disabled slot"
        assert target.upstream_model is not None
        served = {e.upstream_model for e in slot.models.values()}
        assert target.upstream_model in served, "the upstream model is one the slot declares"
    path_kind, _, path_slot = result.resolution_path.partition(":")
    assert path_kind in {"qualified", "model", "alias", "discovered", "default", "slot", "failover"}
    assert path_slot.split("->")[-1] == result.slot
    if requested and requested in table.by_model and path_kind not in ("qualified", "slot"):
        assert set(result.candidates) == set(table.by_model[requested])


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_unknown_with_no_fallback_is_never_routed(endpoint):
    r = resolve(seed_table(), "not-a-model", endpoint)
    assert isinstance(r, NoRoute)
