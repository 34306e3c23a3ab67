"""Log lines are written by a thread of their own: a stalled reader never blocks the logger;
and every record is one line, whatever text a client or an upstream put in it."""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

from dispatch.observability.log_handlers import BackgroundStreamHandler, one_line
from tests.polling import wait_until
from tests.processes import Hal0Process, manage, server_env
from tests.raw_upstream import RawUpstream, http_response

# What a hostile upstream answers on /models: a line of its own that looks like ours, and a
# terminal escape that would clear an operator's screen.
FORGED = "2026-01-01 00:00:00,000 INFO hal0.dispatch slot primary is ready"
HOSTILE = f"boom\n{FORGED}\r\n\x1b[2J".encode()
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def test_one_line_escapes_controls_and_keeps_text() -> None:
    assert one_line("plain text, café") == "plain text, café"
    assert one_line("a\nb\r\tc\x1b[2J\x00\u2028") == "a\\nb\\r\\tc\\x1b[2J\\x00\\u2028"


def test_upstream_text_cannot_forge_a_log_line(tmp_path: Path) -> None:
    def behaviour(sock, request) -> bool:
        sock.sendall(http_response(500, HOSTILE, content_type="text/plain"))
        return True

    upstream = RawUpstream(behaviour)
    env = server_env(tmp_path, HAL0_PROBE_INTERVAL_S="0.3")
    manage(env, "migrate", "-v0")
    manage(
        env,
        "shell",
        "-c",
        "from dispatch.models import Slot; "
        f"Slot.objects.create(name='hostile', url='{upstream.url}/v1', kind='openai')",
    )
    server = Hal0Process(env, tmp_path / "hal0.log").wait_ready()
    try:
        wait_until(lambda: "slot hostile is" in server.log(), "the watcher's line", 20, 0.2)
    finally:
        server.stop()
        upstream.stop()
    ours = [line for line in server.log_path.read_text().splitlines() if "hal0." in line]
    said = [line for line in ours if "slot hostile is" in line]
    assert said, ours
    assert "boom\\n" + FORGED in said[0] and "\\x1b[2J" in said[0]
    for line in ours:
        assert LINE_START.match(line) and not line.startswith(FORGED), line
        assert "\x1b" not in line


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
    from dispatch.observability import log_handlers

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
