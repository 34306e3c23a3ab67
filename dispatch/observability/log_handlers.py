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

from dispatch.lib import redact

# Lines queued and not yet written, at most; past it a line is dropped and counted rather
# than wait for a writer that stopped (hal0_log_records_dropped_total).
QUEUE_LIMIT = 100_000
_dropped = 0


def dropped() -> int:
    """Log records dropped because the writer's queue was full, since the process started."""
    return _dropped


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """``text`` as one printable line: control characters (newlines, ANSI escapes, NULs)
    become escapes, so no text a client or an upstream sent can start a line of its own or
    repaint the terminal."""
    if text.isprintable():
        return text
    return "".join(
        c
        if c.isprintable()
        else _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


class OneLineFormatter(logging.Formatter):
    """Every record is one line, whoever wrote its text, with URL credentials masked.

    A traceback is kept, escaped onto its record's line: a log shipper reading line by line
    keeps it with the record instead of taking each frame for a record of its own.
    """

    def format(self, record: logging.LogRecord) -> str:
        return one_line(redact.masked(super().format(record)))


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
