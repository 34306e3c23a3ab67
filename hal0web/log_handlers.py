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


class BackgroundStreamHandler(logging.handlers.QueueHandler):
    """A QueueHandler whose own listener thread writes to ``stream`` (stderr by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        super().__init__(records)
        # The record arrives formatted (QueueHandler.prepare uses this handler's formatter),
        # so the writer prints it as it is.
        self.writer = logging.StreamHandler(stream)
        self._listener = logging.handlers.QueueListener(records, self.writer)
        self._listener.start()
        self._running = True

    def close(self) -> None:
        # logging.shutdown() calls this at exit: what is still queued is written first.
        if self._running:
            self._running = False
            self._listener.stop()
            self.writer.close()
        super().close()
