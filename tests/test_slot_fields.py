"""A slot's fields are declared once (dispatch.routing.slot_fields): the model, the table
entry, the page's payload and the manifest all carry what the list says, with its defaults.

A field added to one of them only, or to the list only, fails here."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

import pytest

from dispatch.coordination.store import load_table
from dispatch.manifests.export import dumps, from_slot
from dispatch.manifests.parse import parse
from dispatch.manifests.shape import Manifest
from dispatch.routing import slot_fields
from dispatch.routing.slot_fields import FIELDS, REQUIRED
from dispatch.routing.table import Ejection, SlotEntry, make_slot
from dispatch.web.snapshots import slot_payload

# What the table entry, the payload and the manifest add of their own (derived, not stored).
ENTRY_OWN = {"models", "default_model", "endpoints_listed", "spoken", "ejection"}
PAYLOAD_OWN = {
    "models",
    "default_model",
    "endpoints_listed",
    "endpoints_from",
    "serves",
    "inflight",
    "drain",
}
MANIFEST_OWN = {"path", "default_model", "models", "aliases", "extra"}

# A value other than the default for every field: a new field needs one here.
SAMPLES: dict[str, Any] = {
    "name": "sample",
    "url": "http://10.0.0.9:8123/v1",
    "kind": "vllm",
    "type": "embedding",
    "endpoints": ("embeddings", "rerank"),
    "device": "gpu-rocm",
    "enabled": False,
    "is_default": True,
    "priority": 7,
    "api_key_env": "SAMPLE_KEY",
    "max_concurrency": 3,
    "connect_timeout_s": 1.5,
    "first_byte_timeout_s": 2.5,
    "idle_timeout_s": 3.5,
    "max_duration_s": 4.5,
    "unload_idle_s": 900.0,
    "state": "ready",
    "state_changed_at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    "last_error": "it broke",
    "drift": ("gone-model",),
    "loads_models": True,
    "model_limit": 2,
    "spoken": {"for": "vllm embedding http://10.0.0.9:8123/v1", "found": {"embeddings": True}},
    "ejected_until": dt.datetime(2026, 1, 2, 3, 4, 6, tzinfo=dt.UTC),
    "ejected_reason": "taken out of rotation",
    "ejections": 2,
    "extra": {"runtime": "rocm"},
}


def stored(value: Any) -> Any:
    """A default as the database holds it: JSON lists and objects."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def dataclass_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = REQUIRED
    return out


def test_the_list_is_the_models_fields_with_its_defaults():
    from dispatch.models import Slot

    model_fields = {f.name: f for f in Slot._meta.concrete_fields if f.name != "id"}
    assert set(model_fields) == {f.name for f in FIELDS}
    for f in FIELDS:
        field = model_fields[f.name]
        if f.default is REQUIRED:
            assert not field.has_default(), f.name
        else:
            assert field.get_default() == stored(f.default), f.name
    assert set(SAMPLES) == {f.name for f in FIELDS}


def test_the_table_entry_carries_the_table_fields_with_their_defaults():
    defaults = dataclass_defaults(SlotEntry)
    assert set(defaults) == {f.name for f in slot_fields.TABLE} | ENTRY_OWN
    for f in slot_fields.TABLE:
        want = frozenset(f.default) if f.name == "endpoints" else f.default
        assert defaults[f.name] == want, f.name


def test_the_manifest_carries_the_manifest_fields_with_their_defaults():
    defaults = dataclass_defaults(Manifest)
    assert set(defaults) == {f.name for f in slot_fields.MANIFEST} | MANIFEST_OWN
    for f in slot_fields.MANIFEST:
        assert defaults[f.name] == f.default, f.name


def test_the_payload_shows_the_payload_fields():
    entry = make_slot(**{f.name: SAMPLES[f.name] for f in slot_fields.TABLE})
    payload = slot_payload(entry)
    assert set(payload) == {f.name for f in slot_fields.PAYLOAD} | PAYLOAD_OWN
    plain = {f.name for f in slot_fields.PAYLOAD} - {"endpoints", "drift", "state", "url"}
    for name in plain:
        assert payload[name] == SAMPLES[name], name
    assert "api_key_env" not in payload  # not shown: only what the list says


@pytest.mark.django_db
def test_every_field_reaches_the_table_and_the_manifest_from_the_database():
    from dispatch.models import Slot

    Slot.objects.create(**{f.name: stored(SAMPLES[f.name]) for f in FIELDS})
    entry = load_table(1).slots["sample"]
    for f in slot_fields.TABLE:
        want = frozenset(SAMPLES[f.name]) if f.name == "endpoints" else SAMPLES[f.name]
        assert getattr(entry, f.name) == want, f.name
    # The ejection's three fields, as one.
    until = SAMPLES["ejected_until"].timestamp()
    assert entry.ejection == Ejection(until, SAMPLES["ejected_reason"], SAMPLES["ejections"])
    # Out as a manifest and back: every declared field keeps its (non-default) value.
    manifest = from_slot(Slot.objects.get(name="sample"))
    again = parse(dumps(manifest), "sample.toml")
    for f in slot_fields.MANIFEST:
        assert getattr(manifest, f.name) == SAMPLES[f.name], f.name
        assert getattr(again, f.name) == SAMPLES[f.name], f.name
    assert again.extra == SAMPLES["extra"]


def test_a_field_added_to_the_list_reaches_the_payload(monkeypatch):
    """The payload is built from the list: a field the list adds to it is shown."""
    api_key_env = slot_fields.BY_NAME["api_key_env"]
    monkeypatch.setattr(slot_fields, "PAYLOAD", (*slot_fields.PAYLOAD, api_key_env))
    payload = slot_payload(make_slot("a", "http://h/v1", api_key_env="SOME_KEY"))
    assert payload["api_key_env"] == "SOME_KEY"
