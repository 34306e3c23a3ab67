"""What the page hears of models on demand (dispatch.web.snapshots): each model's load state,
progress, failure, pin and eviction preview in the slot's payload; the load-state words and
the loader's latest news in the snapshot. Pure: built from tables made here."""

from __future__ import annotations

import orjson

from dispatch.routing import states
from dispatch.routing.table import ModelEntry, RoutingTable, make_slot
from dispatch.web.consumers import without_urls
from dispatch.web.snapshots import slot_payload, snapshot


def router(**fields):
    """A slot keeping at most one model: gemma3 loaded, smollm2 on disk, qwen's load failed."""
    models = [
        ModelEntry("gemma3", "gemma3", "manifest", is_default=True, load="loaded", last_used=5.0),
        ModelEntry("smollm2", "smollm2", "manifest", load="unloaded"),
        ModelEntry(
            "qwen",
            "qwen",
            "manifest",
            load="failed",
            load_error="cannot open http://u:pw@10.0.0.7:9/qwen.gguf",
        ),
        ModelEntry("g", "gemma3", "alias", load="loaded", pinned=False),
    ]
    base = {"loads_models": True, "model_limit": 1, "state": "ready"}
    return make_slot("router", "http://10.0.0.7:9/v1", models, **{**base, **fields})


def by_id(payload):
    return {m["id"]: m for m in payload["models"]}


def test_each_model_carries_its_load_and_what_choosing_it_unloads():
    models = by_id(slot_payload(router()))
    assert models["gemma3"] == {
        "id": "gemma3",
        "upstream": "gemma3",
        "source": "manifest",
        "default": True,
        "load": "loaded",
        "progress": None,
        "load_error": "",
        "pinned": False,
        "pattern": False,
        "would_unload": None,
    }
    assert models["qwen"]["load_error"] == "cannot open http://***@10.0.0.7:9/qwen.gguf"
    # At its limit: choosing either model on disk first unloads gemma3.
    assert models["smollm2"]["would_unload"] == models["qwen"]["would_unload"] == "gemma3"
    assert models["g"]["would_unload"] is None  # the alias of a loaded model
    loading = make_slot(
        "r", "http://h/v1", [ModelEntry("a", "a", "manifest", load="loading", progress=0.4)]
    )
    assert (by_id(slot_payload(loading))["a"]["progress"]) == 0.4


def test_no_preview_without_a_limit_or_when_the_server_loads_on_its_own():
    assert by_id(slot_payload(router(model_limit=0)))["qwen"]["would_unload"] is None
    assert by_id(slot_payload(router(loads_models=False)))["qwen"]["would_unload"] is None


def test_a_pinned_model_is_never_previewed_as_unloaded():
    slot = make_slot(
        "r",
        "http://h/v1",
        [
            ModelEntry("a", "a", "manifest", load="loaded", pinned=True),
            ModelEntry("b", "b", "manifest", load="unloaded"),
        ],
        loads_models=True,
        model_limit=1,
    )
    assert by_id(slot_payload(slot))["b"]["would_unload"] is None
    unpinned = make_slot(
        "r",
        "http://h/v1",
        [
            ModelEntry("a", "a", "manifest", load="loaded"),
            ModelEntry("b", "b", "manifest", load="unloaded"),
        ],
        loads_models=True,
        model_limit=1,
    )
    assert by_id(slot_payload(unpinned))["b"]["would_unload"] == "a"


def test_progress_and_failure_only_where_they_mean_something():
    slot = make_slot(
        "r",
        "http://h/v1",
        [ModelEntry("a", "a", "manifest", load="loaded", progress=1.0, load_error="earlier")],
    )
    a = by_id(slot_payload(slot))["a"]
    assert (a["progress"], a["load_error"]) == (None, "")


def test_a_draining_slot_says_so():
    assert slot_payload(router(state=states.DRAINING))["drain"] is True
    assert slot_payload(router())["drain"] is False
    assert slot_payload(router(state=states.DRAINING, enabled=False))["drain"] is False


def test_the_snapshot_carries_the_load_words_and_the_loaders_news():
    table = RoutingTable.build(3, [router()])
    news = [{"type": "queue", "slot": "router", "loading": "qwen", "queue": []}]
    snap = snapshot(table, {}, {"stale": False}, None, news)
    assert snap["loads"] == states.page_loads()
    assert snap["loads"]["drained"] == states.DRAINED
    assert snap["queues"] == news
    assert orjson.loads(orjson.dumps(snap))["loads"] == snap["loads"]
    assert snapshot(table, {}, {"stale": False})["queues"] == []


def test_a_non_staff_page_does_not_learn_the_host_from_a_failed_load():
    public = without_urls({"type": "slot.models", "slot": slot_payload(router())})
    qwen = by_id(public["slot"])["qwen"]
    assert "10.0.0.7" not in qwen["load_error"]
    assert qwen["load_error"] == "cannot open http://***@(the slot's host):9/qwen.gguf"
