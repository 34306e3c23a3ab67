"""The process's routing table: reloaded after commit, swapped whole, versioned, awaitable."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction

from dispatch.coordination.store import store
from tests.conftest import add_slot


@pytest.mark.django_db(transaction=True)
def test_a_commit_swaps_in_a_new_table_and_a_rollback_does_not():
    store.reload()
    v0 = store.table.version
    add_slot("a", "http://127.0.0.1:1/v1", ["m1"])
    assert "a" in store.table.slots and store.table.version > v0
    assert store.table.by_model["m1"] == ("a",)
    v1 = store.table.version
    with pytest.raises(RuntimeError), transaction.atomic():
        add_slot("b", "http://127.0.0.1:2/v1", ["m2"])
        raise RuntimeError("roll back")
    assert "b" not in store.table.slots and store.table.version == v1
    store.reload()  # nothing changed: nothing published, the version stays
    assert store.table.version == v1


@pytest.mark.django_db(transaction=True)
def test_one_transaction_of_many_saves_reloads_once():
    seen: list[int] = []

    def heard(old, new) -> None:
        seen.append(new.version)

    store.on_change(heard)
    store.reload()
    seen.clear()
    with transaction.atomic():
        for i in range(10):
            add_slot(f"s{i}", f"http://127.0.0.1:{i + 1}/v1", [f"m{i}"])
    assert len(seen) == 1 and len(store.table.slots) == 10
    store._listeners.remove(heard)


@pytest.mark.django_db(transaction=True)
async def test_next_change_wakes_a_waiter_from_another_thread():
    await store.ensure_loaded()
    changed = store.next_change()
    t = threading.Thread(target=lambda: add_slot("a", "http://127.0.0.1:1/v1", ["m1"]))
    t.start()
    await asyncio.wait_for(changed, 5)
    t.join()
    assert "a" in store.table.slots
    await sync_to_async(lambda: None)()


@pytest.mark.django_db
def test_stale_only_when_following_another_process():
    store.reload()
    assert not store.stale
    store.max_age = 0.05
    time.sleep(0.1)
    assert store.stale
    store.reload()
    assert not store.stale
    store.max_age = None
