"""Log lines are written by a thread of their own: a stalled reader never blocks the logger."""

from __future__ import annotations

import logging
import os
import threading

from hal0web.log_handlers import BackgroundStreamHandler


def test_a_reader_that_stopped_reading_does_not_block_logging() -> None:
    read_fd, write_fd = os.pipe()
    stream = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    handler = BackgroundStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("hal0.test.background")
    log.propagate = False
    log.addHandler(handler)
    lines = [f"line {i} " + "x" * 1000 for i in range(200)]  # ~200 KB: thrice a pipe's buffer
    try:

        def emit_all() -> None:
            for line in lines:
                log.warning(line)

        # Nobody reads the pipe yet: a StreamHandler would block inside the first 64 KB.
        emitter = threading.Thread(target=emit_all, daemon=True)
        emitter.start()
        emitter.join(timeout=10)
        blocked = emitter.is_alive()

        # Once the reader reads again, every line arrives, whole and in order.
        with open(read_fd, encoding="utf-8") as reader:
            got = [reader.readline().rstrip("\n") for _ in lines]
        emitter.join()
        assert not blocked, "logging blocked on a reader that stopped reading"
        assert got == [f"WARNING {line}" for line in lines]
    finally:
        log.removeHandler(handler)
        handler.close()
        stream.close()


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    from hal0web import log_handlers

    read_fd, write_fd = os.pipe()
    stream = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    handler = BackgroundStreamHandler(stream, limit=5)
    log = logging.getLogger("hal0.test.bounded")
    log.propagate = False
    log.addHandler(handler)
    before = log_handlers.dropped()
    try:
        # Nobody reads: the writer blocks inside the pipe's 64 KB, then the queue fills.
        for i in range(300):
            log.warning("line %d %s", i, "x" * 1000)
        assert log_handlers.dropped() - before > 200
    finally:
        log.removeHandler(handler)

        def read_all() -> None:
            with open(read_fd, "rb") as reader:
                while reader.read(65536):
                    pass

        drain = threading.Thread(target=read_all, daemon=True)
        drain.start()
        handler.close()
        stream.close()
        drain.join(timeout=10)
