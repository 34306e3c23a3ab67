"""Database changes → (after commit) a new routing table and key set.

One path for every change, whoever makes it: the admin, the manifest importer, the watcher,
a shell. Other processes follow through the version (``dispatch.coordination.sync``). The
pages hear of the new table from the live feed (``dispatch.web.live``), which listens to the
table store.
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from dispatch.coordination import sync
from dispatch.models import ApiKey, Slot, SlotModel


@receiver(post_save, sender=Slot)
@receiver(post_delete, sender=Slot)
@receiver(post_save, sender=SlotModel)
@receiver(post_delete, sender=SlotModel)
@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def _changed(sender: type, **kwargs: Any) -> None:
    if kwargs.get("raw"):  # loaddata: the state is rebuilt once the data is in
        return
    # The database's triggers bump StateVersion; this process reloads as soon as it commits
    # (others within dispatch.coordination.sync's check interval), once per transaction.
    sync.reload_after_commit()
