"""What a probe result changes in a slot: one pure decision, used to skip a write and to do it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from dispatch.coordination.store import store
from dispatch.kinds import Loads, ModelLoad
from dispatch.lifecycle.changes import CLEARED, ENDED, Changes, changes
from dispatch.lifecycle.persistence import apply
from dispatch.lifecycle.probe import Observation
from dispatch.models import Slot
from dispatch.routing.table import Ejection, ModelEntry, make_slot
from tests.conftest import add_slot


def slot(state="ready", error="", drift=(), models=()):
    return make_slot("s", "http://h/v1", models, state=state, last_error=error, drift=drift)


def declared(model_id, default=False, fields=None):
    return ModelEntry(model_id, model_id, "manifest", default, MappingProxyType(fields or {}))


def test_the_steady_state_changes_nothing():
    s = slot(models=[declared("m", True, {"context_length": 8, "created": 1})])
    obs = Observation("ready", "", ("m",), details={"m": {"context_length": 8, "created": 2}})
    assert not changes(s, obs)  # `created` alone is no change
    assert not changes(
        slot(state="offline", error="refused"), Observation("offline", "refused", None)
    )


def test_a_state_and_an_error_change():
    c = changes(slot(state="ready"), Observation("offline", "refused", None))
    assert c == Changes(state="offline", last_error="refused")
    assert c.slot_changed


def test_a_draining_slot_keeps_its_state_and_its_error():
    assert not changes(slot(state="draining", error="x"), Observation("offline", "refused", None))


def test_models_are_discovered_dropped_and_drift_is_noted():
    s = slot(
        models=[
            declared("want"),
            ModelEntry("gone", "gone", "discovered", True),
            ModelEntry("alias", "want", "alias"),
        ]
    )
    c = changes(s, Observation("ready", "", ("new", "other"), details={"new": {"x": 1}}))
    assert c.dropped == {"gone"}
    assert c.added == ("new", "other")
    assert c.first_is_default  # the default was the dropped one
    assert c.drift == ("want",)
    assert c.slot_changed  # by its drift


def test_changed_upstream_fields_are_written_but_not_for_an_alias():
    s = slot(models=[declared("m", True, {"context_length": 8})])
    c = changes(s, Observation("ready", "", ("m",), details={"m": {"context_length": 16}}))
    assert c.fields == {"m": {"context_length": 16}} and not c.slot_changed


def test_a_failed_load_stands_until_the_server_says_more_than_unloaded():
    """Lemonade and Ollama list a model whose load failed as merely not loaded: the failure
    and its reason stay; a load (the server's, or the loader's) moves it on."""
    failed = ModelEntry("m", "m", "manifest", True, load="failed", load_error="exited")
    s = slot(models=[failed])

    def said(state: str) -> Observation:
        loads = Loads(models={"m": ModelLoad(state)}, loads_models=True)
        return Observation("ready", "", ("m",), loads=loads)

    assert not changes(s, said("unloaded")).loads
    assert changes(s, said("loading")).loads == {"m": ModelLoad("loading")}
    assert changes(s, said("loaded")).loads == {"m": ModelLoad("loaded")}


def test_what_apply_writes_is_what_the_table_then_finds_unchanged(transactional_db):
    add_slot("s", "http://h/v1", ["want"])
    obs = Observation("ready", "", ("want", "extra"), details={"extra": {"owned_by": "me"}})
    before = changes(store.reload().slots["s"], obs)
    assert before.added == ("extra",) and before.state == "ready"
    assert apply("s", obs) is True  # the slot's row changed (its state)
    after = store.reload().slots["s"]
    assert not changes(after, obs)  # so the watcher's next identical probe writes nothing
    assert after.models["extra"].upstream_fields == {"owned_by": "me"}
    assert Slot.objects.get(name="s").state == "ready"
    assert apply("s", obs) is False


# --- an ejection (dispatch.upstream.outliers) and the probes ---------------------------------


def ejected(state="ready", until: float | None = 110.0, count=1):
    return make_slot(
        "s", "http://h/v1", state=state, ejection=Ejection(until, "out of rotation", count)
    )


READY = Observation("ready", "", None)
OFFLINE = Observation("offline", "refused", None)


def test_a_passing_probe_ends_an_ejection_only_once_its_backoff_is_over():
    assert changes(ejected(), READY, now=109.9).ejection is None
    assert not changes(ejected(), READY, now=109.9)  # nothing to write meanwhile
    assert changes(ejected(), READY, now=110.0) == Changes(ejection=ENDED)
    assert not changes(ejected(until=None), READY, now=200.0)  # ended already: the count stays
    assert not changes(slot(), READY, now=200.0)


def test_a_slot_found_down_or_back_up_forgets_its_ejection():
    assert changes(ejected(), OFFLINE, now=100.0).ejection == CLEARED
    assert changes(ejected("offline"), READY, now=100.0).ejection == CLEARED
    assert changes(ejected(until=None, count=3), OFFLINE, now=100.0).ejection == CLEARED
    assert changes(ejected(), Observation("loading", "", None), now=100.0).ejection == CLEARED


def test_apply_writes_the_ejections_end_for_every_process(transactional_db):
    add_slot("s", "http://h/v1", ["m"], state="ready")
    past = datetime.now(UTC) - timedelta(seconds=1)
    Slot.objects.filter(name="s").update(ejected_until=past, ejected_reason="out", ejections=2)
    listed = Observation("ready", "", ("m",))
    assert store.reload().slots["s"].ejection == Ejection(past.timestamp(), "out", 2)
    assert apply("s", listed) is True
    # Back in rotation; the count stays until a request succeeds (the next ejection is longer).
    assert store.reload().slots["s"].ejection == Ejection(None, "", 2)
    assert apply("s", listed) is False
    assert apply("s", OFFLINE) is True  # down: the watcher's, forgotten
    after = store.reload().slots["s"]
    assert after.ejection is None and after.state == "offline"
