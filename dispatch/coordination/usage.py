"""What every process's requests are using, as the loader hears it (``dispatch.upstream.loads``
sends each process's report over the channel layer; ``dispatch.lifecycle.loader`` asks here).

A report replaces that process's last one; a process not heard from for ``TTL_S`` (gone,
or its reports lost) no longer counts, so a dead worker's requests cannot hold a model in
memory for ever.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

TTL_S = 10.0

# slot -> upstream model -> [requests in flight, last used (epoch seconds)]
Report = Mapping[str, Mapping[str, list[float]]]


class UsageReports:
    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, Report]] = {}  # worker -> (monotonic, report)

    def heard(self, worker: str, report: Report) -> None:
        self._reports[worker] = (time.monotonic(), report)

    def clear(self) -> None:
        self._reports.clear()

    def busy(self, slot: str) -> dict[str, int]:
        """Requests in flight per upstream model on ``slot``, summed over live processes."""
        now, out = time.monotonic(), dict[str, int]()
        for heard, report in self._reports.values():
            if now - heard > TTL_S:
                continue
            for model, (count, _used) in (report.get(slot) or {}).items():
                out[model] = out.get(model, 0) + int(count)
        return out

    def last_used(self, slot: str) -> dict[str, float]:
        """When each upstream model on ``slot`` was last used, by any process (epoch s)."""
        out: dict[str, float] = {}
        for _heard, report in self._reports.values():
            for model, (_count, used) in (report.get(slot) or {}).items():
                out[model] = max(out.get(model, 0.0), float(used))
        return out
