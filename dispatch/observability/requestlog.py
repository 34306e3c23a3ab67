"""The request log: one database row per /v1 request, written off the request path.

The decision output only offers the record to a bounded queue (``put_nowait``): a full queue
drops the row and counts it, it never makes a request wait. One thread takes what is queued,
turns each record into its row (the loop does not: issue 23, only the log needs the row) and
writes them with one ``executemany`` in batches, so a burst of a thousand requests is a
handful of INSERTs, not a thousand. A record is not changed once recorded, so the writer
reads it as the request left it.

Rows leave the queue only once they are written. While the database is away (a restart, an
outage) the writer keeps them and tries again, backing off, so they wait in the queue in their
order until it answers; only what no longer fits is dropped, and counted. A row the database
refuses for what it holds (a value it cannot take) is the only one lost with its write.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import threading
import time
from collections import deque
from typing import Any

import orjson
from django.conf import settings

from dispatch.coordination.retention import prune_older
from dispatch.observability.decisions import DecisionRecord

log = logging.getLogger("hal0.requestlog")

BATCH = 500  # rows per transaction at most
_ROWS_PER_INSERT = 50
LINGER_S = 0.2  # how long the writer gathers a batch once the first row arrived
# While the database is away the writer tries again after this long, doubling up to the
# most: one cheap connection attempt every 2 s at worst, and rows written within 2 s of its
# return.
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 2.0

Row = tuple[Any, ...]


def _utf8(text: str) -> str:
    """``text`` as a database takes it: a lone surrogate a client sent in its model's name
    (JSON, accepted: lib.json_reader) is no UTF-8, and would lose the row's whole batch."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


def _row(rec: DecisionRecord) -> Row:
    """The record as its database row (in the writer's thread)."""
    why: dict[str, Any] = rec.why_dict() or {}
    body = rec.body.decode("utf-8", "replace") if rec.body is not None else ""
    answer = rec.answer.decode("utf-8", "replace") if rec.answer is not None else ""
    return (
        rec.at,
        rec.request_id,
        rec.client or "",
        rec.endpoint,
        _utf8(rec.model or "")[:300],
        rec.slot or "",
        (rec.upstream_model or "")[:300],
        rec.resolution_path or "",
        rec.status,
        rec.error or "",
        rec.duration_ms,
        rec.ttft_ms,
        rec.mode or "",
        rec.prompt_tokens,
        rec.completion_tokens,
        _utf8(why.get("text", "")),
        why.get("candidates", []),
        body,
        answer,
    )


_FIELDS = (
    "at",
    "request_id",
    "client",
    "endpoint",
    "model",
    "slot",
    "upstream_model",
    "resolution",
    "status",
    "error",
    "duration_ms",
    "ttft_ms",
    "mode",
    "prompt_tokens",
    "completion_tokens",
    "why",
    "candidates",
    "body",
    "answer",
)
# The one JSON column's place in a row (its value is encoded for the database).
_J = _FIELDS.index("candidates")


class Writer:
    """A bounded queue of rows and the one thread that writes them.

    The queue is a deque: ``append`` and ``popleft`` are atomic, so offering a row takes no
    lock. Only the writer takes rows out, and only once they are written (or refused), so the
    queue's length is everything not yet written and its bound holds through an outage. The
    counters are each written by one side only (``offered``/``dropped`` by the event loop,
    the others by the writer), so they need none either.
    """

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit
        self._rows: deque[DecisionRecord] = deque()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._retry = threading.Event()  # cuts a gathering or a back-off short (a flush)
        self.offered = 0
        self.dropped = 0  # the queue was full
        self.written = 0
        self.failed = 0  # refused by the database for what they hold (counted in ``lost``)
        self.write_failures = 0  # writes that met the database away: their rows wait
        self.failing_since: float | None = None  # wall-clock time writes began to fail
        self._dropped_before = 0  # ``dropped`` at the last write before they began to fail
        self._quiet_until = 0.0

    def offer(self, rec: DecisionRecord) -> bool:
        """Queue ``rec``'s row for writing; False (and counted) when the queue is full."""
        limit = self._limit
        if limit is None:
            limit = self._limit = settings.HAL0_LOG_QUEUE_SIZE
        rows = self._rows
        if len(rows) >= limit:
            self.dropped += 1
            return False
        was_empty = not rows
        rows.append(rec)
        self.offered += 1
        if was_empty:
            self._wake.set()  # once per batch, not per row
        return True

    @property
    def lost(self) -> int:
        return self.dropped + self.failed

    @property
    def backlog(self) -> int:
        """Rows waiting to be written (while the database is away, all it has not taken)."""
        return len(self._rows)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="hal0-requestlog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        rows = self._rows
        while True:
            self._wake.wait()
            self._wake.clear()
            # Let a batch gather (one transaction for many rows); a flush cuts it short.
            self._retry.wait(LINGER_S)
            self._retry.clear()
            pause = RETRY_FIRST_S
            while rows:
                away = self._write_head(min(BATCH, len(rows)))
                if away is None:
                    pause = RETRY_FIRST_S
                    continue
                self._failing(away)
                # The rows stay at the head of the queue, in order: tried again after a
                # pause, not in a loop that would spin against a database that is down.
                self._retry.wait(pause)
                self._retry.clear()
                pause = min(pause * 2, RETRY_MAX_S)

    def _write_head(self, n: int) -> BaseException | None:
        """Write the queue's first ``n`` rows and take them out. Returns the error when the
        database is away (the rows stay queued), None when they are written or refused."""
        rows = self._rows
        try:
            # Built again when tried again after an outage: once per try, not per request. (A
            # record whose row cannot be built is found and lost alone, as a refused one.)
            self._write([_row(rows[i]) for i in range(n)])  # rows leave the queue once written
        except Exception as exc:
            if _away(exc):
                return exc
            # Something in the batch itself (a value the database cannot take): one row at a
            # time, so only the row at fault is lost, not the 499 around it.
            return self._one_by_one(n)
        self._taken(n)
        self.written += n
        return None

    def _one_by_one(self, n: int) -> BaseException | None:
        rows = self._rows
        for _ in range(n):
            try:
                self._write([_row(rows[0])])
            except Exception as exc:
                if _away(exc):
                    return exc
                self._taken(1)
                self.failed += 1
                now = time.monotonic()
                if now >= self._quiet_until:  # once a minute, not once a row
                    self._quiet_until = now + 60
                    log.warning(
                        "the database refused a request-log row (%d lost so far)",
                        self.failed,
                        exc_info=True,
                    )
            else:
                self._taken(1)
                self.written += 1
        return None

    def _taken(self, n: int) -> None:
        rows = self._rows
        for _ in range(n):
            rows.popleft()
        if self.failing_since is None:
            self._dropped_before = self.dropped
        else:
            log.warning(
                "request-log rows are written again, after %.1f s (%d rows had waited; %d "
                "more found the queue full and were dropped)",
                time.time() - self.failing_since,
                n + len(rows),
                self.dropped - self._dropped_before,
            )
            self.failing_since = None

    def _failing(self, exc: BaseException) -> None:
        self.write_failures += 1
        if self.failing_since is None:  # one warning when it starts, one when it ends
            self.failing_since = time.time()
            first = str(exc).strip().splitlines()
            log.warning(
                "could not write request-log rows (%s%s): they wait in the queue (%d of "
                "at most %s rows) and are tried again until the database answers",
                type(exc).__name__,
                f": {first[0]}" if first else "",
                len(self._rows),
                self._limit,
            )

    def _write(self, batch: list[Row]) -> None:
        from django.db import connection

        # This thread is outside any request: Django's connection housekeeping is ours. Its
        # connection is kept from batch to batch, and with it the prepared INSERTs: Django's
        # own housekeeping (close_old_connections) closes it after every batch at
        # CONN_MAX_AGE 0, and preparing a 50-row INSERT again each time cost the writer more
        # than the rows themselves (bench/served.py: ~60 % of its instructions). A batch that
        # fails closes it, whatever failed: the next batch starts on a fresh connection.
        try:
            self._insert(batch)
        except BaseException:
            connection.close()
            raise

    def _insert(self, batch: list[Row]) -> None:
        from django.db import connection, transaction

        from dispatch.models import RequestLog

        # One executemany of plain values, not bulk_create: model instances and each field's
        # get_db_prep_save cost ~100 us a row here, and this thread shares the GIL (and the
        # core) with the event loop serving requests.
        meta = RequestLog._meta
        quote = connection.ops.quote_name
        column = {f.name: str(f.column) for f in meta.concrete_fields}
        columns = ", ".join(quote(column[f]) for f in _FIELDS)
        marks = ", ".join(["%s"] * len(_FIELDS))
        sql = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({marks})"
        if connection.vendor == "sqlite":
            # What Django's SQLite backend stores: naive UTC text, JSON as text.
            params = [
                (
                    dt.datetime.fromtimestamp(r[0], dt.UTC).replace(tzinfo=None).isoformat(" "),
                    *r[1:_J],
                    orjson.dumps(r[_J]).decode(),
                    *r[_J + 1 :],
                )
                for r in batch
            ]
            # Many rows per INSERT (a third less CPU per row than executemany, measured),
            # through the driver itself under Django's transaction: Django's cursor wrapper
            # would convert every row's parameters once more. 50 rows x 19 values stay under
            # SQLite's oldest limit of 999 variables per statement.
            one = "(" + ", ".join(["?"] * len(_FIELDS)) + ")"
            head = sql.split(" VALUES ", 1)[0] + " VALUES "
            with transaction.atomic():
                connection.ensure_connection()
                raw = connection.connection
                for i in range(0, len(params), _ROWS_PER_INSERT):
                    part = params[i : i + _ROWS_PER_INSERT]
                    raw.execute(head + ", ".join([one] * len(part)), [v for r in part for v in r])
            return
        at_field, json_field = meta.get_field("at"), meta.get_field("candidates")
        params = [
            (
                at_field.get_db_prep_save(dt.datetime.fromtimestamp(r[0], dt.UTC), connection),
                *r[1:_J],
                json_field.get_db_prep_save(r[_J], connection),
                *r[_J + 1 :],
            )
            for r in batch
        ]
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.executemany(sql, params)

    def write_now(self) -> None:
        """Have the writer write what it holds now: no more gathering, no back-off left."""
        self._retry.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every row offered so far is written or lost (tests, shutdown); False
        after ``timeout`` (the database away: the rows still wait)."""
        target = self.offered
        deadline = time.monotonic() + timeout
        self.write_now()
        while self.written + self.failed < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def _away(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is not answering (down, restarting, its connection
    lost, SQLite locked past its timeout), as opposed to refusing what was written."""
    from django.db import InterfaceError, OperationalError, connection

    # The raw SQLite path raises the driver's own errors, not Django's wrappers of them.
    driver = connection.Database  # type: ignore[attr-defined]  # each backend's wrapper has it
    return isinstance(
        exc, (OperationalError, InterfaceError, driver.OperationalError, driver.InterfaceError)
    )


writer = Writer()


def output(rec: DecisionRecord) -> None:
    """The decision output (see ``decisions.outputs``; there only with HAL0_REQUEST_LOG)."""
    if writer.offer(rec) and writer._thread is None:
        writer.start()


def prune(now: dt.datetime | None = None) -> int:
    """Delete rows older than HAL0_LOG_RETENTION_DAYS (sync; the watcher runs it)."""
    from dispatch.models import RequestLog

    days = settings.HAL0_LOG_RETENTION_DAYS
    return prune_older(RequestLog, "at", days, "request-log rows", log, now)


def prune_if_on() -> None:
    """The watcher's housekeeping job (see ``dispatch.lifecycle.hooks.housekeeping``)."""
    if settings.HAL0_REQUEST_LOG:
        prune()


@atexit.register
def _flush_at_exit() -> None:
    # Bounded: a database that is away must not hold the process's exit.
    if writer._thread is not None and writer._thread.is_alive() and not writer.flush(2.0):
        log.warning("%d request-log rows were not written before exit", writer.backlog)
