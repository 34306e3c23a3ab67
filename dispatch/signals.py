"""Database changes → (after commit) a new routing table and key set → events for the live UI.

One path for every change, whoever makes it: the admin, the manifest importer, the watcher,
a shell. Other processes follow through the version (``dispatch.coordination.sync``).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from dispatch.coordination import events, sync
from dispatch.coordination.store import store
from dispatch.models import ApiKey, Slot, SlotModel
from dispatch.observability.decisions import InflightReporter
from dispatch.routing.states import DEGRADED
from dispatch.routing.table import RoutingTable
from dispatch.upstream.admission import admission
from dispatch.upstream.outliers import outliers
from dispatch.web.snapshots import slot_payload, table_events


@receiver(post_save, sender=Slot)
@receiver(post_delete, sender=Slot)
@receiver(post_save, sender=SlotModel)
@receiver(post_delete, sender=SlotModel)
@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def _changed(sender: type, **kwargs: Any) -> None:
    if kwargs.get("raw"):  # loaddata: the state is rebuilt once the data is in
        return
    conn = transaction.get_connection()
    # The database's triggers bump StateVersion; this process reloads as soon as it commits
    # (others within dispatch.coordination.sync's check interval). One reload per transaction however
    # many rows it saves (an import saves hundreds): Django drops the queued callback itself
    # if the transaction rolls back.
    if any(func is sync.committed for _, func, _ in conn.run_on_commit):
        return
    transaction.on_commit(sync.committed)


def _announce(old: RoutingTable, new: RoutingTable) -> None:
    for event in table_events(old, new, admission.inflight, outliers.overlay()):
        events.tell_own_pages(event)


def _announce_outlier(name: str) -> None:
    """An ejection began or ended: the table did not change, so say it here."""
    table = store.table
    slot = table.slots.get(name)
    if slot is None:
        return
    over = outliers.overlay().get(name)
    payload = slot_payload(slot, admission.inflight.get(name, 0), over)
    payload["previous_state"] = slot.state if over is not None else DEGRADED
    # Ejections are this process's own judgement (dispatch.upstream.outliers): its own pages hear it.
    versions = {"from_version": table.version, "version": table.version}
    events.tell_own_pages({"type": "slot.state", **versions, "slot": payload})


store.on_change(_announce)
outliers.on_change(_announce_outlier)
admission.on_change(InflightReporter(admission.inflight).note)
