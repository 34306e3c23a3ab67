"""Slot kinds: one module each, registered in one place; how each reads a probe into a state."""

from __future__ import annotations

import pkgutil

import pytest

from dispatch import kinds
from dispatch.models import SlotKind
from dispatch.routing.table import make_slot


@pytest.mark.parametrize(
    ("kind", "health", "body", "models", "expected"),
    [
        ("llamacpp", None, None, None, "offline"),
        ("llamacpp", 503, None, 503, "loading"),  # "Loading model"
        ("llamacpp", 503, None, None, "loading"),  # /health says loading; /models silent
        ("llamacpp", 200, None, 200, "ready"),
        ("llamacpp", None, None, 500, "error"),
        ("openai", None, None, 500, "error"),
        ("openai", None, None, 200, "ready"),
        ("openai", None, None, 503, "loading"),
        ("openai", None, None, None, "offline"),
        ("lemonade", 200, {"model_loaded": None}, 200, "ready"),  # up, no model loaded yet
        ("lemonade", 200, {"model_loaded": "m"}, 200, "ready"),
        ("lemonade", None, None, None, "offline"),
        ("lemonade", 503, None, 200, "loading"),
        ("ollama", None, None, 200, "ready"),
        ("ollama", None, None, None, "offline"),
        ("vllm", None, None, 200, "ready"),
        ("vllm", None, None, 404, "error"),
        ("flm", None, None, 200, "ready"),
        ("flm", None, None, 503, "loading"),
    ],
)
def test_a_probe_reads_as_a_state_through_the_kind(kind, health, body, models, expected):
    assert kinds.get(kind).classify(health, body, models) == expected


def test_no_kind_reads_an_idle_health_as_loading():
    # A server up with no model loaded is ready: its models' load states say what is loaded
    # (tests/test_kind_loads.py), not the slot's state.
    idle = {"status": "ok", "model_loaded": None, "all_models_loaded": []}
    for name in ("lemonade", "llamacpp", "openai", "ollama", "vllm", "flm"):
        assert kinds.get(name).classify(200, idle, 200) == "ready", name


@pytest.mark.parametrize(
    ("kind", "url", "health", "models"),
    [
        ("llamacpp", "http://h:8002/v1", "http://h:8002/health", "http://h:8002/v1/models"),
        (
            "lemonade",
            "http://h:8000/api/v1/",
            "http://h:8000/api/v1/health",
            "http://h:8000/api/v1/models",
        ),
        ("openai", "http://h/v1", None, "http://h/v1/models"),
        ("ollama", "http://h:11434/v1", None, "http://h:11434/v1/models"),
        ("vllm", "http://h:8000/v1", None, "http://h:8000/v1/models"),
        ("flm", "http://h:52625/v1", None, "http://h:52625/v1/models"),
    ],
)
def test_each_kind_probes_what_it_probed_before(kind, url, health, models):
    slot = make_slot("s", url, kind=kind)
    assert kinds.get(kind).health_url(slot) == health
    assert kinds.get(kind).models_url(slot) == models


def test_a_model_list_is_read_into_ids_and_details():
    body = {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "context_length": 4096},
            {"id": 7},  # not a model id: skipped
            "junk",
            {"id": "b", "created": 1},
        ],
    }
    listing = kinds.GENERIC.listing(body)
    assert listing is not None
    assert listing.ids == ("a", "b")
    assert listing.details == {"a": {"context_length": 4096}, "b": {"created": 1}}
    assert kinds.GENERIC.listing({"data": "nope"}) is None
    assert kinds.GENERIC.listing(None) is None


def test_a_slot_listing_no_endpoints_offers_what_its_kind_speaks_for_its_type():
    from dispatch.routing.endpoints import defaults_for

    for kind in kinds.REGISTRY.values():
        assert kind.speaks("embedding") >= defaults_for("embedding")


def test_an_unknown_kind_is_probed_as_a_generic_server():
    assert kinds.get("something-new") is kinds.GENERIC
    assert kinds.GENERIC.name == "openai"


def test_slot_kind_choices_are_the_registry():
    assert SlotKind.choices == [(k.name, k.label) for k in kinds.REGISTRY.values()]
    assert SlotKind.LLAMACPP == "llamacpp"  # the model's default


def test_every_kind_module_is_registered_and_nothing_else():
    modules = {m.name for m in pkgutil.iter_modules(kinds.__path__)} - {
        "base",
        "urls",
    }  # the interface and the URL helpers
    assert modules == {"llamacpp", "lemonade", "ollama", "vllm", "flm", "openai"}
    registered = {type(k).__module__.rsplit(".", 1)[1] for k in kinds.REGISTRY.values()}
    assert registered == modules
    assert len(kinds.REGISTRY) == len(modules)  # one kind per module
