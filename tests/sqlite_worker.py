"""One writer process against the embedded SQLite database, for tests/test_sqlite_busy.py.

    python -m tests.sqlite_worker ROLE SECONDS [URL]

``watcher`` applies probe results the way the slot watcher does; ``admin`` edits a slot in a
read-then-write transaction the way the admin's change form does. Each prints one JSON line:
how many writes succeeded and the errors it met.

``locked`` probes slot ``primary`` (pointed at the fake server at URL) while another connection holds
the database's write lock past a short busy timeout, then again once the lock is gone, and
prints what each probe saved.
"""

from __future__ import annotations

import json
import os
import sys
import time

import django


def main(role: str, seconds: float, url: str = "") -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")
    django.setup()
    if role == "locked":
        return probe_while_locked(url)
    from django.db import OperationalError, transaction

    from dispatch.lifecycle.persistence import apply
    from dispatch.lifecycle.probe import Observation
    from dispatch.models import Slot

    done, errors = 0, []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            if role == "watcher":
                state = "ready" if i % 2 else "offline"
                apply("primary", Observation(state, "" if i % 2 else f"refused {i}", None))
            else:
                with transaction.atomic():
                    slot = Slot.objects.get(name="primary")
                    slot.priority = (slot.priority + 1) % 100
                    slot.full_clean()
                    slot.save()
            done += 1
        except OperationalError as exc:
            errors.append(str(exc))
    print(json.dumps({"role": role, "done": done, "errors": len(errors), "first": errors[:1]}))


def probe_while_locked(url: str) -> None:
    import asyncio
    import sqlite3

    from django.db import connections

    # Before the first connection opens: wait 0.2 s for a lock, not the real 20 s.
    db = connections["default"].settings_dict
    db["OPTIONS"]["timeout"] = 0.2

    from dispatch.coordination.store import store
    from dispatch.lifecycle.watcher import watcher
    from dispatch.models import Slot
    from dispatch.upstream.client import upstream

    Slot.objects.filter(name="primary").update(url=url)
    store.reload()

    async def probe() -> bool:
        try:
            return await watcher.probe_once(store.table.slots["primary"])
        finally:
            await upstream.aclose()  # the loop ends here: close its pool with it

    holder = sqlite3.connect(db["NAME"])
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held like a long admin transaction
    first = asyncio.run(probe())
    while_locked = Slot.objects.get(name="primary").state
    holder.rollback()
    second = asyncio.run(probe())
    after = Slot.objects.get(name="primary").state
    result = {"first": first, "while_locked": while_locked, "second": second, "after": after}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), *sys.argv[3:4])
