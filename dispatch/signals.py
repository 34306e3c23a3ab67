"""Database changes → (after commit) a new routing table → events for the live UI.

One path for every change, whoever makes it: the admin, the manifest importer, the watcher.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from dispatch import events
from dispatch.admission import admission
from dispatch.decisions import InflightReporter
from dispatch.keys import keyring
from dispatch.models import ApiKey, Slot, SlotModel
from dispatch.outliers import outliers
from dispatch.snapshots import slot_payload, table_events
from dispatch.store import store
from dispatch.table import RoutingTable


@receiver(post_save, sender=Slot)
@receiver(post_delete, sender=Slot)
@receiver(post_save, sender=SlotModel)
@receiver(post_delete, sender=SlotModel)
def _schedule_reload(sender: type, **kwargs: Any) -> None:
    if kwargs.get("raw"):  # loaddata: the table is rebuilt once the data is in
        return
    conn = transaction.get_connection()
    # One reload per transaction however many rows it saves (an import saves hundreds):
    # Django drops the queued callback itself if the transaction rolls back.
    if any(func is _reload for _, func, _ in conn.run_on_commit):
        return
    transaction.on_commit(_reload)


def _reload() -> None:
    store.reload()


def _announce(old: RoutingTable, new: RoutingTable) -> None:
    for event in table_events(old, new, admission.inflight, outliers.overlay()):
        events.broadcast(event)


def _announce_outlier(name: str) -> None:
    """An ejection began or ended: the table did not change, so say it here."""
    table = store.table
    slot = table.slots.get(name)
    if slot is None:
        return
    over = outliers.overlay().get(name)
    payload = slot_payload(slot, admission.inflight.get(name, 0), over)
    payload["previous_state"] = slot.state if over is not None else "degraded"
    events.broadcast({"type": "slot.state", "version": table.version, "slot": payload})


store.on_change(_announce)
outliers.on_change(_announce_outlier)
admission.on_change(InflightReporter(admission.inflight).note)


@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def _reload_keys(sender: type, **kwargs: Any) -> None:
    transaction.on_commit(keyring.reload)
