"""Prometheus metrics through prometheus-client, one registry per worker process.

Why not prometheus-client's multiprocess mode: it keeps every value in a memory-mapped
file per process, which needs a directory wiped by whatever starts the workers, an
environment variable set before the library is imported, and a clean-up call when a
worker dies — none of which hal0web controls under Daphne or Uvicorn started by hand. So
each process keeps its own registry and labels every sample with ``worker`` (its pid):
scrape each worker (Prometheus sums them with ``sum without (worker)``); with one process,
as ``make run`` starts, there is one worker and nothing to sum.

Per request the cost must stay in the microseconds (bench: ``python -m bench cost``), and
prometheus-client's own ``Histogram.observe`` walks its buckets in Python under a lock:
four of them per request cost more than the rest of the recording. So values are gathered
in plain dictionaries keyed by label tuples (a bucket found by ``bisect``), on the event
loop that records them, and handed to prometheus-client as metric families when scraped
(``_Collector``); the exposition is prometheus-client's. Everything that is a state rather
than an event — in-flight and queued counts, slot states, dropped-record counters — is read
from the live objects when scraped, so it costs nothing per request.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from dispatch.observability.decisions import DecisionRecord
from dispatch.routing.resolver import Decision
from dispatch.routing.states import DISABLED, PROBED_DOWN, TRANSITIONS

WORKER = str(os.getpid())

registry = CollectorRegistry(auto_describe=True)

# Latency buckets in seconds: local model servers answer in milliseconds (embeddings) to
# minutes (long generations).
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# hal0web's own added time: tens of microseconds to a few milliseconds.
_FAST = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)

Labels = tuple[str, ...]


class _Counter:
    def __init__(self, name: str, help_text: str, labels: Labels) -> None:
        self.name, self.help, self.labels = name, help_text, labels
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.help, labels=("worker", *self.labels))
        for labels, value in list(self.values.items()):
            family.add_metric((WORKER, *labels), value)
        return family


class _Histogram:
    def __init__(
        self, name: str, help_text: str, labels: Labels, bounds: tuple[float, ...]
    ) -> None:
        self.name, self.help, self.labels = name, help_text, labels
        self.bounds = bounds
        self._le = [floatToGoString(b) for b in bounds] + ["+Inf"]
        # label values -> [count per bucket (the last is +Inf, not cumulative)..., sum]
        self.values: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        row = self.values.get(labels)
        if row is None:
            row = self.values[labels] = [0.0] * (len(self.bounds) + 2)
        row[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        row[-1] += value

    def add(self, labels: Labels, row: list[float]) -> None:
        """Add another histogram's buckets and sum (same bounds) to ``labels``."""
        mine = self.values.get(labels)
        if mine is None:
            mine = self.values[labels] = [0.0] * (len(self.bounds) + 2)
        for i, value in enumerate(row):
            mine[i] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.help, labels=("worker", *self.labels))
        for labels, row in list(self.values.items()):
            total, buckets = 0.0, []
            for le, count in zip(self._le, row[:-1], strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric((WORKER, *labels), buckets, row[-1])
        return family


REQUESTS = _Counter(
    "hal0_requests",
    "Requests to /v1, by endpoint, slot, model, status and resolution kind.",
    ("endpoint", "slot", "model", "status", "resolution"),
)
DURATION = _Histogram(
    "hal0_request_duration_seconds",
    "Whole request time, until the last byte of the answer.",
    ("endpoint", "slot"),
    _SLOW,
)
TTFB = _Histogram(
    "hal0_time_to_first_byte_seconds",
    "Time until the upstream's response headers.",
    ("endpoint", "slot"),
    _SLOW,
)
TTFT = _Histogram(
    "hal0_time_to_first_token_seconds",
    "Streams: time until the first chunk of the answer.",
    ("endpoint", "slot"),
    _SLOW,
)
ADDED = _Histogram(
    "hal0_added_seconds",
    "hal0web's own time before forwarding: reading, authorizing, parsing, resolving.",
    ("endpoint",),
    _FAST,
)
TOKENS = _Counter(
    "hal0_tokens",
    "Tokens reported by the upstream's usage (JSON answers, a stream's final usage chunk).",
    ("slot", "model", "kind"),
)
PROBE_DURATION = _Histogram(
    "hal0_probe_duration_seconds", "Health probe time per slot.", ("slot",), _SLOW
)
PROBE_FAILURES = _Counter(
    "hal0_probe_failures", "Health probes that found the slot offline or in error.", ("slot",)
)
MODEL_LOADS = _Counter(
    "hal0_model_loads",
    "Model loads hal0web asked a slot for, by outcome (ok, failed).",
    ("slot", "model", "outcome"),
)
MODEL_LOAD_DURATION = _Histogram(
    "hal0_model_load_seconds",
    "Time from asking a load to the model loaded.",
    ("slot", "model"),
    _SLOW,
)
MODEL_UNLOADS = _Counter(
    "hal0_model_unloads", "Models hal0web unloaded (to make room, idle, asked).", ("slot", "model")
)
QUEUE_WAIT = _Histogram(
    "hal0_model_queue_wait_seconds",
    "How long requests waited for their model to be loaded.",
    ("slot", "model"),
    _SLOW,
)
_EVENTS: tuple[_Counter | _Histogram, ...] = (
    MODEL_LOADS,
    MODEL_LOAD_DURATION,
    MODEL_UNLOADS,
    QUEUE_WAIT,
    REQUESTS,
    DURATION,
    TTFB,
    TTFT,
    ADDED,
    TOKENS,
    PROBE_DURATION,
    PROBE_FAILURES,
)


class _PerRequest:
    """Everything one request adds, for one label set: one dictionary lookup per request
    instead of one per metric. Projected onto the families' own labels when scraped."""

    __slots__ = ("added", "completion", "count", "duration", "prompt", "ttfb", "ttft")

    def __init__(self) -> None:
        self.count = 0
        self.prompt = 0
        self.completion = 0
        width = len(_SLOW) + 2  # buckets, +Inf, sum
        self.duration = [0.0] * width
        self.ttfb = [0.0] * width
        self.ttft = [0.0] * width
        self.added = [0.0] * (len(_FAST) + 2)


# (endpoint, slot, model, status, resolution path) as the record holds them -> what those
# requests added. The labels (the status as text, the path's kind, "" for None) are made from
# the key when scraped, not per request; keys that make the same labels are summed then.
_Key = tuple[str, str | None, str | None, int, str | None]
_per_request: dict[_Key, _PerRequest] = {}


def output(rec: DecisionRecord) -> None:
    """The decision output (see ``decisions.outputs``; there only with HAL0_METRICS)."""
    # Only a model that routed is a label: anything a client typed would be unbounded. A name
    # an alias pattern routed is still anything a client typed: the pattern is the label.
    # (A routed path comes from the table, as the slot and the model: as bounded as they.)
    decision = rec.decision
    model = (decision.pattern or rec.model) if isinstance(decision, Decision) else None
    key: _Key = (rec.endpoint, rec.slot, model, rec.status, rec.resolution_path)
    stats = _per_request.get(key)
    if stats is None:
        stats = _per_request[key] = _PerRequest()
    stats.count += 1
    seconds = rec.duration_ms / 1000
    row = stats.duration
    row[bisect_left(_SLOW, seconds)] += 1
    row[-1] += seconds
    if rec.ttfb_ms is not None:
        seconds, row = rec.ttfb_ms / 1000, stats.ttfb
        row[bisect_left(_SLOW, seconds)] += 1
        row[-1] += seconds
    if rec.ttft_ms is not None:
        seconds, row = rec.ttft_ms / 1000, stats.ttft
        row[bisect_left(_SLOW, seconds)] += 1
        row[-1] += seconds
    if rec.added_ms is not None:
        seconds, row = rec.added_ms / 1000, stats.added
        row[bisect_left(_FAST, seconds)] += 1
        row[-1] += seconds
    if rec.prompt_tokens:
        stats.prompt += rec.prompt_tokens
    if rec.completion_tokens:
        stats.completion += rec.completion_tokens


def _project() -> None:
    """Fold the per-request stats into the families' own label sets (at scrape time)."""
    for metric in (REQUESTS, DURATION, TTFB, TTFT, ADDED, TOKENS):
        metric.values.clear()
    for (endpoint, slot_, model_, status, path), stats in list(_per_request.items()):
        slot, model = slot_ or "", model_ or ""
        kind = path.split(":", 1)[0] if path else "none"
        REQUESTS.inc((endpoint, slot, model, str(status), kind), float(stats.count))
        for hist, row in ((DURATION, stats.duration), (TTFB, stats.ttfb), (TTFT, stats.ttft)):
            if row[-1] or any(row[:-1]):
                hist.add((endpoint, slot), row)
        if stats.added[-1] or any(stats.added[:-1]):
            ADDED.add((endpoint,), stats.added)
        if stats.prompt:
            TOKENS.inc((slot, model, "prompt"), stats.prompt)
        if stats.completion:
            TOKENS.inc((slot, model, "completion"), stats.completion)


def probe_observed(slot: str, seconds: float, state: str) -> None:
    """The watcher's probe hook (see ``dispatch.lifecycle.hooks.probe_listeners``)."""
    PROBE_DURATION.observe((slot,), seconds)
    if state in PROBED_DOWN:
        PROBE_FAILURES.inc((slot,))


def model_loaded(slot: str, model: str, seconds: float, ok: bool) -> None:
    """The loader's hook (``dispatch.lifecycle.loader.loaded``)."""
    MODEL_LOADS.inc((slot, model, "ok" if ok else "failed"))
    if ok:
        MODEL_LOAD_DURATION.observe((slot, model), seconds)


def model_unloaded(slot: str, model: str) -> None:
    MODEL_UNLOADS.inc((slot, model))


def queue_waited(slot: str, model: str, seconds: float) -> None:
    """A request's wait for its model (``dispatch.upstream.loads``), served."""
    QUEUE_WAIT.observe((slot, model), seconds)


class _Collector(Collector):
    """The gathered events, and what is a state, read from the live objects when scraped."""

    def collect(self) -> Iterator[Metric]:
        _project()
        for metric in _EVENTS:
            yield metric.family()
        from dispatch.coordination import events
        from dispatch.coordination.store import store
        from dispatch.observability import log_handlers, requestlog
        from dispatch.upstream.admission import admission

        inflight = GaugeMetricFamily(
            "hal0_inflight", "Requests in flight per slot.", labels=["worker", "slot"]
        )
        queued = GaugeMetricFamily(
            "hal0_queued", "Requests waiting for a place on a full slot.", labels=["worker", "slot"]
        )
        state = GaugeMetricFamily(
            "hal0_slot_state",
            "1 for the slot's current state, 0 for the others.",
            labels=["worker", "slot", "state"],
        )
        table = store.table
        for name, slot in sorted(table.slots.items()):
            inflight.add_metric([WORKER, name], admission.inflight.get(name, 0))
            queued.add_metric([WORKER, name], admission.queued(name))
            current = slot.state if slot.enabled else DISABLED
            for s in (*sorted(TRANSITIONS), DISABLED):
                state.add_metric([WORKER, name, s], 1.0 if s == current else 0.0)
        yield inflight
        yield queued
        yield state
        for name, help_text, value in (
            (
                "hal0_events_dropped",
                "Live events dropped (the send queue was full).",
                events.dropped(),
            ),
            (
                "hal0_events_missed",
                "Live events this worker's pages did not hear (gaps in their batches), "
                "summed over the pages.",
                events.missed(),
            ),
            (
                "hal0_log_records_dropped",
                "Log lines dropped (the writer's queue was full).",
                log_handlers.dropped(),
            ),
            (
                "hal0_request_log_dropped",
                "Request-log rows lost: the writer's queue was full (rows wait in it while "
                "the database is away), or the database refused the row.",
                requestlog.writer.lost,
            ),
            (
                "hal0_request_log_written",
                "Request-log rows written to the database.",
                requestlog.writer.written,
            ),
            (
                "hal0_request_log_write_failures",
                "Request-log writes that met the database away; their rows wait and are "
                "tried again.",
                requestlog.writer.write_failures,
            ),
        ):
            family = CounterMetricFamily(name, help_text, labels=["worker"])
            family.add_metric([WORKER], value)
            yield family
        backlog = GaugeMetricFamily(
            "hal0_request_log_queued",
            "Request-log rows waiting to be written (all of them while the database is away).",
            labels=["worker"],
        )
        backlog.add_metric([WORKER], requestlog.writer.backlog)
        yield backlog


registry.register(_Collector())
