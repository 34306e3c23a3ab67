"""Prometheus metrics through prometheus-client, one registry per worker process.

Why not prometheus-client's multiprocess mode: it keeps every value in a memory-mapped
file per process, which needs a directory wiped by whatever starts the workers, an
environment variable set before the library is imported, and a clean-up call when a
worker dies — none of which hal0web controls under Daphne or Uvicorn started by hand. So
each process keeps its own registry and labels every sample with ``worker`` (its pid):
scrape each worker (Prometheus sums them with ``sum without (worker)``); with one process,
as ``make run`` starts, there is one worker and nothing to sum.

Per request the cost is a few dictionary lookups and lock-free-ish increments on children
created once per label set (``_child``). Everything that is a state rather than an event —
in-flight and queued counts, slot states, dropped-record counters — is read when scraped
(``_StateCollector``), so it costs nothing per request.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dispatch.decisions import DecisionRecord
from dispatch.errors import ApiError, error_response
from dispatch.resolver import Decision
from dispatch.states import TRANSITIONS

WORKER = str(os.getpid())

registry = CollectorRegistry(auto_describe=True)

# Latency buckets in seconds: local model servers answer in milliseconds (embeddings) to
# minutes (long generations).
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# hal0web's own added time: tens of microseconds to a few milliseconds.
_FAST = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)

REQUESTS = Counter(
    "hal0_requests",
    "Requests to /v1, by endpoint, slot, model, status and resolution kind.",
    ["worker", "endpoint", "slot", "model", "status", "resolution"],
    registry=registry,
)
DURATION = Histogram(
    "hal0_request_duration_seconds",
    "Whole request time, until the last byte of the answer.",
    ["worker", "endpoint", "slot"],
    buckets=_SLOW,
    registry=registry,
)
TTFB = Histogram(
    "hal0_time_to_first_byte_seconds",
    "Time until the upstream's response headers.",
    ["worker", "endpoint", "slot"],
    buckets=_SLOW,
    registry=registry,
)
TTFT = Histogram(
    "hal0_time_to_first_token_seconds",
    "Streams: time until the first chunk of the answer.",
    ["worker", "endpoint", "slot"],
    buckets=_SLOW,
    registry=registry,
)
ADDED = Histogram(
    "hal0_added_seconds",
    "hal0web's own time before forwarding: reading, authorizing, parsing, resolving.",
    ["worker", "endpoint"],
    buckets=_FAST,
    registry=registry,
)
TOKENS = Counter(
    "hal0_tokens",
    "Tokens reported by the upstream's usage (JSON answers, a stream's final usage chunk).",
    ["worker", "slot", "model", "kind"],
    registry=registry,
)
PROBE_DURATION = Histogram(
    "hal0_probe_duration_seconds",
    "Health probe time per slot.",
    ["worker", "slot"],
    buckets=_SLOW,
    registry=registry,
)
PROBE_FAILURES = Counter(
    "hal0_probe_failures",
    "Health probes that found the slot offline or in error.",
    ["worker", "slot"],
    registry=registry,
)

# Label children, created once per label set: .labels() takes a lock and validates every
# call, a dictionary lookup does not.
_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(WORKER, *labels)
    return child


def output(rec: DecisionRecord, data: dict[str, object]) -> None:
    """The decision output (see ``decisions.outputs``)."""
    if not settings.HAL0_METRICS:
        return
    slot = rec.slot or ""
    # Only a model that routed is a label: anything a client typed would be unbounded.
    model = rec.model or "" if isinstance(rec.decision, Decision) else ""
    endpoint = rec.endpoint
    _child(REQUESTS, endpoint, slot, model, str(rec.status), rec.resolution_kind).inc()
    _child(DURATION, endpoint, slot).observe(rec.duration_ms / 1000)
    if rec.ttfb_ms is not None:
        _child(TTFB, endpoint, slot).observe(rec.ttfb_ms / 1000)
    if rec.ttft_ms is not None:
        _child(TTFT, endpoint, slot).observe(rec.ttft_ms / 1000)
    if rec.added_ms is not None:
        _child(ADDED, endpoint).observe(rec.added_ms / 1000)
    if rec.prompt_tokens:
        _child(TOKENS, slot, model, "prompt").inc(rec.prompt_tokens)
    if rec.completion_tokens:
        _child(TOKENS, slot, model, "completion").inc(rec.completion_tokens)


def probe_observed(slot: str, seconds: float, state: str) -> None:
    """The watcher's probe hook (see ``health.probe_listeners``)."""
    if not settings.HAL0_METRICS:
        return
    _child(PROBE_DURATION, slot).observe(seconds)
    if state in ("offline", "error"):
        _child(PROBE_FAILURES, slot).inc()


class _StateCollector(Collector):
    """What is a state, not an event: read from the live objects when scraped."""

    def collect(self) -> Iterator[Metric]:
        from dispatch import events, requestlog
        from dispatch.admission import admission
        from dispatch.store import store
        from hal0web import log_handlers

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
            current = slot.state if slot.enabled else "disabled"
            for s in (*sorted(TRANSITIONS), "disabled"):
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
                "hal0_log_records_dropped",
                "Log lines dropped (the writer's queue was full).",
                log_handlers.dropped(),
            ),
            (
                "hal0_request_log_dropped",
                "Request-log rows dropped (the writer's queue was full).",
                requestlog.writer.dropped,
            ),
            (
                "hal0_request_log_written",
                "Request-log rows written to the database.",
                requestlog.writer.written,
            ),
        ):
            family = CounterMetricFamily(name, help_text, labels=["worker"])
            family.add_metric([WORKER], value)
            yield family


registry.register(_StateCollector())


async def view(request: HttpRequest) -> HttpResponse:
    """/metrics: for a staff session, an API key, or anyone with HAL0_METRICS_PUBLIC."""
    if not settings.HAL0_METRICS:
        return error_response(ApiError(404, "not_found", "Metrics are off (HAL0_METRICS=false)."))
    if request.method not in ("GET", "HEAD"):
        response = error_response(ApiError(405, "method_not_allowed", "Use GET for /metrics."))
        response["Allow"] = "GET, HEAD"
        return response
    if not settings.HAL0_METRICS_PUBLIC and not await _may_read(request):
        return error_response(
            ApiError(
                401,
                "missing_api_key",
                "/metrics needs a staff login, `Authorization: Bearer <API key>`, or "
                "HAL0_METRICS_PUBLIC=true.",
            )
        )
    body = generate_latest(registry)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


async def _may_read(request: HttpRequest) -> bool:
    from dispatch.keys import keyring

    auth = request.headers.get("Authorization", "")
    if auth:
        scheme, _, key = auth.partition(" ")
        await keyring.ensure_loaded()
        return scheme.lower() == "bearer" and keyring.name_of(key.strip()) is not None
    user = await request.auser()
    return bool(user.is_active and user.is_staff)
