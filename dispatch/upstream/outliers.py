"""Outlier ejection: a slot whose probes pass but whose requests fail is taken out of
rotation for a while, so requests for its models fail over at once instead of each waiting
out ``first_byte_timeout_s`` (300 s by default) on a hung server.

After ``EJECT_AFTER`` consecutive first-byte timeouts or transport failures from a slot the
watcher calls ``ready``, the slot is ``degraded`` for a back-off period
(HAL0_OUTLIER_BACKOFF_S, doubled for each ejection without a success in between, up to
``MAX_BACKOFF_FACTOR`` times). Once it has passed, one trial request is let through (the
others still fail over); its success, or a passing probe, brings the slot back; its failure
ejects it again at once.

This lives in memory, per process, beside the routing table rather than in it: the watcher
owns the persisted state (and keeps calling the slot ready, which is the point), and the
state is about this process's requests. The live UI shows it through ``overlay()``.
All calls come from the one event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from dispatch.lib.listeners import Listeners
from dispatch.routing.states import DEGRADED

EJECT_AFTER = 3
MAX_BACKOFF_FACTOR = 8


@dataclass(slots=True)
class _Record:
    failures: int = 0  # consecutive, while in rotation
    until: float = 0.0  # out of rotation until then (clock time); 0 = in rotation
    reason: str = ""
    ejections: int = 0  # consecutive, for the back-off
    trial: bool = False  # the one trial request is in flight


class Outliers:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._listeners: Listeners[[str]] = Listeners("outliers")

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(slot)`` when the slot is ejected or comes back."""
        self._listeners.add(listener)

    def reset(self) -> None:
        self._records.clear()

    def overlay(self) -> dict[str, tuple[str, str]]:
        """Ejected slots → (``degraded``, the reason), for what the UI shows."""
        return {name: (DEGRADED, r.reason) for name, r in self._records.items() if r.until}

    def degraded(self, slot: str) -> str | None:
        """The reason the slot is out of rotation, or None when it is in."""
        r = self._records.get(slot)
        return r.reason if r is not None and r.until else None

    def admit(self, slot: str) -> bool:
        """May a request go to ``slot`` now? Once the back-off has passed, one request (the
        trial) may; the caller then reports it with succeeded, failed or abandoned."""
        r = self._records.get(slot)
        if r is None or not r.until:
            return True
        if r.trial or self._clock() < r.until:
            return False
        r.trial = True
        return True

    def retry_after(self, slot: str) -> float:
        r = self._records.get(slot)
        return max(1.0, r.until - self._clock()) if r is not None and r.until else 1.0

    def failed(self, slot: str, reason: str, backoff_s: float) -> None:
        """A first-byte timeout or transport failure from a slot its probes call ready."""
        if backoff_s <= 0:
            return  # ejection is off
        r = self._records.setdefault(slot, _Record())
        if r.until:
            if r.trial:  # the trial failed: out again, for longer
                r.trial = False
                self._eject(slot, r, reason, backoff_s)
            return  # (a request let through before the ejection: already counted)
        r.failures += 1
        if r.failures >= EJECT_AFTER:
            self._eject(slot, r, reason, backoff_s)

    def succeeded(self, slot: str) -> None:
        """The slot answered: its record is cleared, and an ejected slot is back."""
        r = self._records.pop(slot, None)
        if r is not None and r.until:
            self._listeners.notify(slot)

    def abandoned(self, slot: str) -> None:
        """An admitted request ended without a verdict (client gone, slot full, a 5xx)."""
        r = self._records.get(slot)
        if r is not None:
            r.trial = False

    def probe_passed(self, slot: str) -> None:
        """A passing probe brings an ejected slot back once its back-off is over (before
        that, the probes passing is what made the slot an outlier in the first place)."""
        r = self._records.get(slot)
        if r is None or not r.until or r.trial or self._clock() < r.until:
            return
        r.until, r.failures, r.reason = 0.0, 0, ""  # ejections kept: the back-off grows
        self._listeners.notify(slot)

    def _eject(self, slot: str, r: _Record, reason: str, backoff_s: float) -> None:
        r.ejections += 1
        factor = min(2 ** (r.ejections - 1), MAX_BACKOFF_FACTOR)
        r.until = self._clock() + backoff_s * factor
        r.failures = 0
        r.reason = (
            f"taken out of rotation for {backoff_s * factor:g}s after {EJECT_AFTER} failed "
            f"requests while its probes pass: {reason}"
        )
        self._listeners.notify(slot)


outliers = Outliers()
