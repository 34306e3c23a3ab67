"""Model validation: the rules the admin, the importer and the watcher all share."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot

pytestmark = pytest.mark.django_db


def slot_errors(**fields) -> dict[str, list[str]]:
    fields.setdefault("name", "s")
    fields.setdefault("url", "http://127.0.0.1:8001/v1")
    try:
        Slot(**fields).full_clean()
    except ValidationError as exc:
        return exc.message_dict
    return {}


@pytest.mark.parametrize("name", ["a", "primary", "agent-hermes", "gpu_0", "9", "a" * 32])
def test_good_slot_names(name):
    assert slot_errors(name=name) == {}


@pytest.mark.parametrize(
    "name", ["", "Primary", "-a", "_a", "a b", "a.b", "a/b", "a" * 33, "ünï", "a\n"]
)
def test_bad_slot_names(name):
    errors = slot_errors(name=name)
    assert "name" in errors
    if name:
        assert any(m.startswith("must match ^[a-z0-9]") for m in errors["name"]), errors


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8002/v1", "https://api.example.com/v1", "http://[::1]:8080/v1"]
)
def test_good_urls(url):
    assert slot_errors(url=url) == {}


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/v1",
        "127.0.0.1:8002/v1",
        "http:///v1",
        "http://h:99999/v1",
        "http://h/v1?x=1",
        "http://h/v1#frag",
        "",
    ],
)
def test_bad_urls(url):
    assert "url" in slot_errors(url=url)


def test_kind_and_type_choices():
    errors = slot_errors(kind="tgi", type="video")
    assert set(errors) == {"kind", "type"}


def test_api_key_env_is_a_variable_name_never_a_key():
    assert slot_errors(api_key_env="HERMES_KEY") == {}
    assert "api_key_env" in slot_errors(api_key_env="sk-abc 123")
    assert "api_key_env" in slot_errors(api_key_env="KEY\n")


def test_timeouts_must_be_positive():
    errors = slot_errors(connect_timeout_s=0, idle_timeout_s=-1)
    assert errors["connect_timeout_s"] == ["must be > 0"]
    assert errors["idle_timeout_s"] == ["must be > 0"]


def test_unique_name():
    add_slot("primary", "http://127.0.0.1:1/v1")
    assert "name" in slot_errors(name="primary")


def test_one_default_slot_per_type():
    add_slot("primary", "http://127.0.0.1:1/v1", is_default=True)
    errors = slot_errors(name="other", is_default=True)
    assert "slot 'primary' is already the default llm slot" in errors["is_default"]
    # Another type may have its own default.
    assert slot_errors(name="embed", type="embedding", is_default=True) == {}
    # The database holds the rule too, whoever skips clean().
    with pytest.raises(IntegrityError), transaction.atomic():
        Slot.objects.create(name="other", url="http://127.0.0.1:2/v1", is_default=True)


def test_the_default_slot_may_be_saved_again():
    slot = add_slot("primary", "http://127.0.0.1:1/v1", is_default=True)
    slot.priority = 3
    slot.full_clean()


def model_errors(slot: Slot, **fields) -> dict[str, list[str]]:
    try:
        SlotModel(slot=slot, **fields).full_clean()
    except ValidationError as exc:
        return exc.message_dict
    return {}


def test_model_ids():
    slot = add_slot("s", "http://127.0.0.1:1/v1")
    assert model_errors(slot, model_id="Qwen/Qwen3-8B:q4") == {}
    for bad in ["", " x", "x ", "a\tb", "a\nb", "x" * 256]:
        assert "model_id" in model_errors(slot, model_id=bad), bad


def test_upstream_defaults_to_the_model_id():
    slot = add_slot("s", "http://127.0.0.1:1/v1")
    row = SlotModel.objects.create(slot=slot, model_id="m")
    assert row.upstream_model == "m"


def test_alias_rules():
    slot = add_slot("s", "http://127.0.0.1:1/v1", ["gemma3-270m"])
    assert model_errors(slot, model_id="hermes", upstream_model="gemma3-270m", source="alias") == {}
    errors = model_errors(slot, model_id="hermes", upstream_model="hermes", source="alias")
    assert errors["upstream_model"] == ["an alias must name a different model"]
    errors = model_errors(slot, model_id="hermes", upstream_model="", source="alias")
    assert errors["upstream_model"] == ["an alias must name a different model"]
    errors = model_errors(slot, model_id="m", upstream_model="other", source="manifest")
    assert errors["upstream_model"] == ["only an alias may send a different upstream model"]
    errors = model_errors(
        slot, model_id="h2", upstream_model="gemma3-270m", source="alias", is_default=True
    )
    assert "an alias cannot be the slot's default" in errors["is_default"]


def test_model_unique_per_slot_but_shared_across_slots():
    a = add_slot("a", "http://127.0.0.1:1/v1", ["shared"])
    b = add_slot("b", "http://127.0.0.1:2/v1")
    assert model_errors(b, model_id="shared") == {}  # served by several slots: legal
    assert model_errors(a, model_id="shared") != {}


def test_one_default_model_per_slot_in_the_database():
    slot = add_slot("s", "http://127.0.0.1:1/v1", ["m1"])
    with pytest.raises(IntegrityError), transaction.atomic():
        SlotModel.objects.create(slot=slot, model_id="m2", is_default=True)


def test_default_model_property():
    slot = add_slot("s", "http://127.0.0.1:1/v1", ["first", "second"])
    assert slot.default_model is not None and slot.default_model.model_id == "first"
    assert add_slot("empty", "http://127.0.0.1:2/v1").default_model is None


def test_endpoints_are_names_from_the_endpoint_table():
    assert "endpoints" not in slot_errors(endpoints=[])
    assert "endpoints" not in slot_errors(endpoints=["rerank", "audio/speech"])
    assert "endpoints" in slot_errors(endpoints=["rerank", "video"])
    assert "endpoints" in slot_errors(endpoints="rerank")
