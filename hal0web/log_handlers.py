"""Log output that never makes the event loop wait.

hal0web logs one line per routed request. A plain StreamHandler writes it on the thread that
logs, i.e. the event loop serving every request and stream: a slow or stopped reader of
stderr (a paused terminal, a full pipe to a log shipper) would stall them all. Here the
calling thread only formats the record and queues it; one thread writes.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
from typing import TextIO

# Lines queued and not yet written, at most; past it a line is dropped and counted rather
# than wait for a writer that stopped (hal0_log_records_dropped_total).
QUEUE_LIMIT = 100_000
_dropped = 0


def dropped() -> int:
    """Log records dropped because the writer's queue was full, since the process started."""
    return _dropped


class _Listener(logging.handlers.QueueListener):
    def enqueue_sentinel(self) -> None:
        # At close the queue may be full: wait for room (what is queued is written first)
        # instead of failing the way put_nowait would.
        self.queue.put(self._sentinel)  # type: ignore[attr-defined]


class BackgroundStreamHandler(logging.handlers.QueueHandler):
    """A QueueHandler whose own listener thread writes to ``stream`` (stderr by default)."""

    def __init__(self, stream: TextIO | None = None, limit: int = QUEUE_LIMIT) -> None:
        records: queue.Queue[logging.LogRecord] = queue.Queue(limit)
        super().__init__(records)
        # The record arrives formatted (QueueHandler.prepare uses this handler's formatter),
        # so the writer prints it as it is.
        self.writer = logging.StreamHandler(stream)
        self._listener = _Listener(records, self.writer)
        self._listener.start()
        self._running = True

    def enqueue(self, record: logging.LogRecord) -> None:
        global _dropped
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            _dropped += 1

    def close(self) -> None:
        # logging.shutdown() calls this at exit: what is still queued is written first.
        if self._running:
            self._running = False
            self._listener.stop()
            self.writer.close()
        super().close()
