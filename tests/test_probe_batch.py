"""Probe results written together (issue 24): those that come while a write is under way
share one transaction and one reload; a lone one is written at once; what one slot's write
cannot take costs that slot alone."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async
from django.db import IntegrityError

from dispatch.coordination.store import store
from dispatch.kinds import Loads, ModelLoad
from dispatch.lifecycle import persistence
from dispatch.lifecycle.changes import changes
from dispatch.lifecycle.probe import Observation
from dispatch.models import Slot, SlotModel
from dispatch.routing import speaks
from tests.conftest import add_slot

SLOTS = 20


@pytest.fixture
def tables() -> Iterator[list[int]]:
    """The version of every table this process publishes from now on."""
    seen: list[int] = []

    def heard(old: object, new: object) -> None:
        seen.append(new.version)  # type: ignore[attr-defined]

    store.on_change(heard)
    yield seen
    store._listeners.remove(heard)


def ready(*models: str, url: str = "") -> Observation:
    """A ready server listing ``models``, each with a context length, found to speak both
    endpoints it is asked about."""
    return Observation(
        "ready",
        "",
        models,
        details={m: {"context_length": 4096, "owned_by": "fake"} for m in models},
        spoken={"messages": True, "responses": False},
        spoken_for=speaks.key("llamacpp", "llm", url),
    )


def url(i: int) -> str:
    return f"http://127.0.0.1:{i + 1}/v1"


@pytest.mark.django_db(transaction=True)
async def test_results_that_come_together_are_one_transaction_and_one_reload(tables):
    for i in range(SLOTS):
        await sync_to_async(add_slot)(f"s{i}", url(i), [f"m{i}"])
    await store.ensure_loaded()
    tables.clear()
    # The first finds the writer idle and is written at once; the others come while it is.
    first = asyncio.create_task(persistence.save("s0", ready("m0", "x0", url=url(0))))
    await asyncio.sleep(0.01)
    rest = [persistence.save(f"s{i}", ready(f"m{i}", f"x{i}", url=url(i))) for i in range(1, SLOTS)]
    saved = await asyncio.gather(first, *rest)
    assert saved == [True] * SLOTS
    # They wait for it, and go together. One result, one transaction and one reload each,
    # was 20 tables here and in every other process.
    assert len(tables) == 2
    for i in range(SLOTS):
        slot = store.table.slots[f"s{i}"]
        assert slot.state == "ready" and set(slot.models) == {f"m{i}", f"x{i}"}
        assert slot.models[f"x{i}"].upstream_fields == {"context_length": 4096, "owned_by": "fake"}
        assert slot.spoken == {"messages": True, "responses": False}
        assert not changes(slot, ready(f"m{i}", f"x{i}", url=url(i)))  # nothing left to write


@pytest.mark.django_db(transaction=True)
async def test_a_lone_result_is_written_and_published_at_once(tables):
    await sync_to_async(add_slot)("a", url(0), ["m"])
    await store.ensure_loaded()
    tables.clear()
    assert await persistence.save("a", ready("m", url=url(0))) is True
    assert len(tables) == 1 and store.table.slots["a"].state == "ready"


@pytest.mark.django_db(transaction=True)
def test_what_a_batch_writes_models_and_loads_and_drops_as_one_at_a_time_would(tables):
    """Every kind of change in one batch: new models (one the new default), changed upstream
    fields, load states from a server that loads models (aliases follow their target), a
    discovered model gone, a state and an error."""
    add_slot("a", url(0), ["declared"], aliases={"al": "declared"})
    add_slot("b", url(1), [])
    add_slot("c", url(2), ["kept"])
    SlotModel.objects.create(
        slot=Slot.objects.get(name="c"), model_id="gone", upstream_model="gone", source="discovered"
    )
    store.reload()
    loads = Loads(
        models={"declared": ModelLoad("unloaded"), "new": ModelLoad("loading", 0.5)},
        loads_models=True,
        model_limit=1,
    )
    router = Observation(
        "ready",
        "",
        ("declared", "new"),
        details={"declared": {"context_length": 8}, "new": {"context_length": 16}},
        loads=loads,
    )
    results = [
        ("a", router),
        ("b", ready("first", "second", url=url(1))),
        ("c", Observation("offline", "refused", None)),
    ]
    tables.clear()
    assert persistence.apply_all(results) == [True, True, True]
    assert len(tables) == 1
    a, b, c = (store.table.slots[n] for n in "abc")
    assert a.loads_models and a.model_limit == 1
    assert {m: (e.load, e.progress) for m, e in a.models.items()} == {
        "declared": ("unloaded", None),
        "al": ("unloaded", None),
        "new": ("loading", 0.5),
    }
    assert a.models["declared"].upstream_fields == {"context_length": 8}
    assert a.models["new"].source == "discovered" and not a.models["new"].is_default
    assert b.default_model == "first" and b.models["second"].upstream_fields["owned_by"] == "fake"
    assert (c.state, c.last_error) == ("offline", "refused")
    assert set(c.models) == {"kept", "gone"}  # an offline server says nothing of its models
    for slot, (_, obs) in zip((a, b, c), results, strict=True):
        assert not changes(slot, obs)
    assert persistence.apply_all([("c", ready("kept", url=url(2)))]) == [True]
    assert set(store.table.slots["c"].models) == {"kept"}  # ready, and no longer listing it


@pytest.mark.django_db(transaction=True)
def test_a_result_that_cannot_be_written_costs_its_own_slot_only():
    """A server that lists one id twice cannot have both rows (one model id per slot): its
    result fails, the others in its batch are written."""
    for name in "abc":
        add_slot(name, url(0), ["m"])
    store.reload()
    written = persistence.apply_all(
        [("a", ready("m", "x")), ("b", ready("m", "twice", "twice")), ("c", ready("m", "y"))]
    )
    assert written[0] is True and written[2] is True
    assert isinstance(written[1], IntegrityError)
    states = dict(Slot.objects.values_list("name", "state"))
    assert states == {"a": "ready", "b": "unknown", "c": "ready"}
    assert set(store.table.slots["c"].models) == {"m", "y"}


@pytest.mark.django_db(transaction=True)
async def test_a_disabled_or_deleted_slot_is_not_written():
    await sync_to_async(add_slot)("a", url(0), ["m"], enabled=False)
    saved = await asyncio.gather(
        persistence.save("a", ready("m")), persistence.save("nobody", ready("m"))
    )
    assert saved == [False, False]
    assert await Slot.objects.filter(name="a", state="unknown").aexists()


@pytest.mark.django_db(transaction=True)
async def test_a_stopped_watcher_leaves_no_write_behind():
    """Its probes cancelled, the write under way finishes (what it read is true) and what
    still waits is dropped; ``idle`` returns after both, so nothing is written later."""
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("holds SQLite's write lock to keep a write under way")
    for name in "ab":
        await sync_to_async(add_slot)(name, url(0), ["m"])
    await store.ensure_loaded()
    holder = sqlite3.connect(connection.settings_dict["NAME"])
    holder.execute("BEGIN IMMEDIATE")  # the writer's transaction waits for it
    try:
        under_way = asyncio.create_task(persistence.save("a", ready("m")))
        await asyncio.sleep(0.05)  # the writer has taken it, and waits for the lock
        waiting = asyncio.create_task(persistence.save("b", ready("m")))
        await asyncio.sleep(0)
        for task in (under_way, waiting):
            task.cancel()
        await asyncio.gather(under_way, waiting, return_exceptions=True)
    finally:
        holder.rollback()
        holder.close()
    await persistence.idle()
    # Written and published when idle returns (a query would only queue behind the write).
    assert store.table.slots["a"].state == "ready"
    states = {s.name: s.state async for s in Slot.objects.all()}
    assert states == {"a": "ready", "b": "unknown"}


@pytest.mark.django_db(transaction=True)
def test_what_a_server_says_of_a_new_model_is_kept_as_it_said_it():
    said = {"created": 2**70, "name": 'é "quoted"', "meta": {"a": [1, None, True, 0.5]}}
    add_slot("a", url(0), ["m"])
    obs = Observation("ready", "", ("m", "new"), details={"new": said})
    assert persistence.apply_all([("a", obs)]) == [True]
    assert store.table.slots["a"].models["new"].upstream_fields == said
    assert SlotModel.objects.get(model_id="new").upstream_fields == said
