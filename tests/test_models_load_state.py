"""/v1/models says where each model is (issue 21): a llama.cpp-router-style `status` per entry,
and per slot in the `hal0` object its load state, pin and what choosing it would unload; never
the upstream's child command line (`status.args`) or preset.

The states are written to the database as the loader and the watcher would write them (no
watcher runs here), and read through a live hal0web over HTTP.
"""

from __future__ import annotations

import httpx
import pytest

from dispatch.coordination.store import store
from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot

SECRET = "sk-child-secret"


@pytest.fixture
def router(transactional_db, no_watcher):
    """A slot in front of llama.cpp's router keeping at most one model loaded: gemma3 loaded,
    smollm2 on disk, qwen's last load failed; `g` an alias of gemma3."""
    slot = add_slot(
        "router", "http://127.0.0.1:9/v1", ["gemma3", "smollm2", "qwen"], aliases={"g": "gemma3"}
    )
    Slot.objects.filter(pk=slot.pk).update(loads_models=True, model_limit=1, state="ready")
    rows = SlotModel.objects.filter(slot=slot)
    # What llama.cpp's router lists for a model: the child's command line in status.args.
    listed = {
        "context_length": 8192,
        "status": {"value": "loaded", "args": ["llama-server", "--api-key", SECRET]},
        "preset": f"[gemma3]\napi-key = {SECRET}\n",
        "meta": {"n_params": 270, "preset": SECRET, "nested": [{"args": [SECRET]}]},
    }
    rows.filter(model_id__in=["gemma3", "g"]).update(
        load_state="loaded", last_used_at=100.0, upstream_fields=listed
    )
    rows.filter(model_id="smollm2").update(load_state="unloaded")
    rows.filter(model_id="qwen").update(
        load_state="failed", load_error="out of memory (http://user:pw@10.0.0.7:8080/)"
    )
    store.reload()  # update() sends no signal: reload as the committing process would
    return slot


@pytest.fixture
def models(router, hal0):
    def get(query: str = "") -> dict[str, dict]:
        r = httpx.get(f"{hal0.url}/v1/models{query}", timeout=10)
        assert r.status_code == 200
        assert SECRET not in r.text
        return {m["id"]: m for m in r.json()["data"]}

    return get


def test_each_entry_says_where_its_model_is(models):
    listed = models()
    assert set(listed) == {"gemma3", "smollm2", "qwen"}
    assert listed["gemma3"]["status"] == {"value": "loaded"}
    assert listed["smollm2"]["status"] == {"value": "unloaded"}
    assert listed["qwen"]["status"] == {
        "value": "failed",
        "failed": True,
        "error": "out of memory (http://***@10.0.0.7:8080/)",
    }
    # The upstream's own fields still pass, less the command line and the preset.
    gemma = listed["gemma3"]
    assert gemma["context_length"] == 8192
    assert "preset" not in gemma
    assert gemma["meta"] == {"n_params": 270, "nested": [{}]}


def test_the_hal0_object_says_load_pin_and_what_a_choice_unloads(models):
    slots = {m: e["hal0"]["slots"][0] for m, e in models().items()}
    assert {k: slots["smollm2"][k] for k in ("name", "load", "pinned", "would_unload")} == {
        "name": "router",
        "load": "unloaded",
        "pinned": False,
        "would_unload": "gemma3",  # the slot keeps one model: gemma3 makes room
    }
    assert slots["gemma3"]["would_unload"] is None  # loaded: nothing to make room for
    assert slots["qwen"]["load_error"] == "out of memory (http://***@10.0.0.7:8080/)"
    assert slots["gemma3"]["progress"] is None and slots["gemma3"]["load_error"] is None
    # Pinned (both rows: one model on the server), gemma3 is never unloaded to make room.
    SlotModel.objects.filter(upstream_model="gemma3").update(pinned=True)
    store.reload()
    slots = {m: e["hal0"]["slots"][0] for m, e in models().items()}
    assert slots["gemma3"]["pinned"] is True
    assert slots["smollm2"]["would_unload"] is None


def test_a_loading_model_shows_its_progress(models):
    SlotModel.objects.filter(model_id="smollm2").update(load_state="loading", load_progress=0.4)
    store.reload()
    entry = models()["smollm2"]
    assert entry["status"] == {"value": "loading", "progress": 0.4}
    assert entry["hal0"]["slots"][0]["progress"] == 0.4


def test_every_entry_of_the_full_list_carries_it_too(models, hal0):
    every = models("?all=true")
    assert every["router/smollm2"]["status"] == {"value": "unloaded"}
    assert every["router/smollm2"]["hal0"]["would_unload"] == "gemma3"
    assert every["router/gemma3"]["hal0"]["load"] == "loaded"
    assert every["g"]["status"] == {"value": "loaded"}  # the alias is gemma3
    assert "preset" not in every["g"] and "args" not in every["g"]["status"]
    one = httpx.get(f"{hal0.url}/v1/models/router/qwen", timeout=10).json()
    assert one["status"]["failed"] is True and one["hal0"]["load"] == "failed"


def test_a_model_loaded_on_any_slot_is_listed_loaded(models):
    other = add_slot("other", "http://127.0.0.1:8/v1", ["smollm2"])
    Slot.objects.filter(pk=other.pk).update(state="ready")  # loaded: a plain server's default
    store.reload()
    entry = models()["smollm2"]
    assert entry["status"] == {"value": "loaded"}
    by_slot = {s["name"]: s["load"] for s in entry["hal0"]["slots"]}
    assert by_slot == {"router": "unloaded", "other": "loaded"}
