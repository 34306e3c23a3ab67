"""When each API key was last used: noted in memory on every request, written in batches.

A request only sets one dict entry (key id -> time); a thread of this process writes what
gathered every ``FLUSH_S`` seconds in one statement, into ``ApiKeyUse`` (a table without
the StateVersion trigger: a key's use must not make every process reload its keys). Each
process writes its own keys' times; the latest write wins, which is the latest use give or
take one flush interval, across every process.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from django.db import close_old_connections

log = logging.getLogger("hal0.keys")

# How often a process writes its keys' last use. The admin shows it this fresh at worst.
FLUSH_S = 30.0


class KeyUse:
    def __init__(self) -> None:
        self._pending: dict[int, float] = {}
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.flush_s = FLUSH_S

    def used(self, key_id: int, at: float) -> None:
        """Note a use: one dict assignment, safe under the GIL with the writer's swap."""
        self._pending[key_id] = at
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hal0-keyuse", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the database may be briefly away: the next flush catches up
                log.warning("could not record when API keys were last used", exc_info=True)

    def flush(self) -> int:
        """Write what gathered, in one statement; the number of keys written."""
        pending, self._pending = self._pending, {}
        if not pending:
            return 0
        from dispatch.models import ApiKey, ApiKeyUse

        close_old_connections()  # outside any request: Django's connection housekeeping
        # A key deleted since it was used has nothing left to record.
        alive = set(ApiKey.objects.filter(pk__in=pending).values_list("pk", flat=True))
        rows = [
            ApiKeyUse(key_id=pk, last_used_at=dt.datetime.fromtimestamp(at, dt.UTC))
            for pk, at in pending.items()
            if pk in alive
        ]
        ApiKeyUse.objects.bulk_create(
            rows, update_conflicts=True, unique_fields=["key"], update_fields=["last_used_at"]
        )
        return len(rows)

    def wake(self) -> None:
        """Flush now (at shutdown; tests)."""
        self._wake.set()


recorder = KeyUse()
used = recorder.used
