"""Making each routing decision visible.

``record`` hands each finished request to a list of outputs (after its answer has gone out): the JSON log line, the
decision's listeners (the live feed, ``dispatch.web.live``, which tells the pages), and (when
on) the Prometheus metrics and the request log. Every output runs on the
event loop after the request's work is done, must be cheap (anything slow is queued to a
thread of its own) and must never fail the request: one that raises is logged and skipped.

Each output is handed the record alone and builds what it needs from it: the decision as the
log line and the pages carry it (``DecisionRecord.data``) is built only when one of them is
there to take it, not for every request (issue 23: under the default WARNING level with no
page open, nobody is).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dispatch.lib.listeners import Listeners
from dispatch.routing.explain import Explanation, explain, explain_no_route
from dispatch.routing.resolver import Decision, NoRoute
from dispatch.wire.adapters import PASSTHROUGH
from dispatch.wire.errors import dumps

log = logging.getLogger("hal0.dispatch")


@dataclass(slots=True)
class DecisionRecord:
    request_id: str
    endpoint: str
    model: str | None
    slot: str | None = None
    upstream_model: str | None = None
    resolution_path: str | None = None
    cache_state: str = "fresh"
    latency_us: float = 0.0
    status: int = 0
    duration_ms: float = 0.0
    error: str | None = None
    inflight: int = 0
    # Who asked: an API key's name, a page user's name, or None (open API).
    client: str | None = None
    # Seconds since the epoch when the request arrived (for the request log and charts).
    at: float = 0.0
    ttfb_ms: float | None = None  # upstream response headers
    ttft_ms: float | None = None  # a stream's first body chunk
    added_ms: float | None = None  # hal0web's own time before forwarding
    queued_ms: float = 0.0  # waiting for its model to be loaded (dispatch.upstream.loads)
    # How the slot that answered was sent it: as it came, or translated to an endpoint it
    # offers (dispatch.wire.adapters); None: no slot was sent it.
    mode: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # What the resolver decided, and the in-flight counts it ranked by: enough to explain
    # the choice later, without doing any of that work while routing.
    decision: Decision | NoRoute | None = None
    seen_inflight: tuple[int, ...] = ()
    # Only with HAL0_LOG_BODIES: the request body as received and the answer as sent, capped.
    body: bytes | None = None
    answer: bytes | None = None
    # perf_counter() when the request arrived: every *_ms above is measured from it.
    started: float = field(default_factory=time.perf_counter, repr=False)
    # ``data()`` once built: the log line and the live event share it.
    _data: dict[str, object] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def arrived(cls, request_id: str, endpoint: str) -> DecisionRecord:
        """The record of a request that arrives now."""
        return cls(request_id=request_id, endpoint=endpoint, model=None, at=time.time())

    def since_arrival_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def decided(
        self,
        result: Decision | NoRoute,
        seen_inflight: tuple[int, ...] = (),
        allowed: bool = True,
    ) -> None:
        """What the resolver decided (``seen_inflight``: the counts its ranking saw). A
        decision the caller may not use is kept to explain; no slot was chosen."""
        self.decision = result
        self.latency_us = result.latency_us
        if not allowed:
            return
        if isinstance(result, NoRoute):
            self.slot = result.slot
        else:
            self.slot, self.upstream_model = result.slot, result.upstream_model
            self.resolution_path = result.resolution_path
            self.seen_inflight = seen_inflight

    def forwarding(self) -> None:
        """hal0web's own work is done: what follows is the upstream's time."""
        self.added_ms = self.since_arrival_ms()

    def answered(
        self,
        slot: str,
        upstream_model: str | None,
        resolution_path: str,
        status: int,
        mode: str = PASSTHROUGH,
    ) -> None:
        """The upstream that answered (after any failover) sent its headers."""
        self.slot, self.upstream_model = slot, upstream_model
        self.resolution_path, self.status, self.mode = resolution_path, status, mode
        self.ttfb_ms = self.since_arrival_ms()

    def first_chunk(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = self.since_arrival_ms()

    def failed(self, status: int, error: str) -> None:
        self.status, self.error = status, error

    def took(self, prompt: int | None, completion: int | None) -> None:
        """Token counts the upstream reported (None: not reported)."""
        if prompt is not None:
            self.prompt_tokens = prompt
        if completion is not None:
            self.completion_tokens = completion

    def ended(self, by_us: bool = False) -> None:
        """The answer is over: the whole request's time. An answer hal0web gave itself
        (``by_us``) before forwarding was all hal0web's own time."""
        self.duration_ms = self.since_arrival_ms()
        if by_us and self.added_ms is None:
            self.added_ms = self.duration_ms

    @property
    def why(self) -> Explanation | None:
        """Why this slot (see ``dispatch.routing.explain``); built when first asked, not routing."""
        return None if self.decision is None else _explained(self)[0]

    def why_dict(self) -> dict[str, object] | None:
        return None if self.decision is None else _explained(self)[1]

    @property
    def resolution_kind(self) -> str:
        """The rule family of the resolution path (model, alias, qualified, failover, ...)."""
        if not self.resolution_path:
            return "none"
        return self.resolution_path.split(":", 1)[0]

    def as_dict(self) -> dict[str, object]:
        return {
            "event": "dispatch.decision",
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "model": self.model,
            "slot": self.slot,
            "upstream_model": self.upstream_model,
            "resolution_path": self.resolution_path,
            "cache_state": self.cache_state,
            "latency_us": round(self.latency_us, 2),
            "status": self.status,
            "duration_ms": round(self.duration_ms, 2),
            "error": self.error,
            "inflight": self.inflight,
            "at": round(self.at, 3),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
            "queued_ms": round(self.queued_ms, 1),
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "why": self.why_dict(),
        }

    def data(self) -> dict[str, object]:
        """The decision as the log line and the live event carry it (``as_dict``, its model
        name made encodable); built when first asked, after the request was recorded."""
        data = self._data
        if data is None:
            data = self._data = self.as_dict()
            if self.model is not None and not self.model.isascii():
                # A lone surrogate (accepted: lib.json_reader) cannot be encoded as UTF-8,
                # which a log line, a channel-layer message and a database row all need: keep
                # it as its escape.
                data["model"] = self.model.encode("utf-8", "backslashreplace").decode()
        return data


# Explanations by everything they depend on. Under load most requests repeat a few cases (the
# same model, on the same table, at the same load): those cost a dictionary lookup, not a new
# explanation. Bounded like the resolver's suggestions memo.
_MEMO_LIMIT = 1024
_memo: dict[tuple[object, ...], tuple[Explanation, dict[str, object]]] = {}


def _explained(rec: DecisionRecord) -> tuple[Explanation, dict[str, object]]:
    decision = rec.decision
    assert decision is not None
    if isinstance(decision, NoRoute):
        # The message too: one model (or none) refused on two endpoints is two explanations.
        key: tuple[object, ...] = (
            decision.table_version,
            decision.requested_model,
            decision.code,
            decision.message,
            rec.endpoint,
        )
    else:
        key = (
            decision.table_version,
            decision.requested_model,
            decision.resolution_path,
            rec.seen_inflight,
            rec.slot,
            rec.resolution_path,
            0 < rec.status < 400,
            rec.endpoint,
            rec.mode,
        )
    found = _memo.get(key)
    if found is None:
        if isinstance(decision, NoRoute):
            why = explain_no_route(decision)
        else:
            why = explain(
                decision,
                rec.seen_inflight,
                answered_by=rec.slot,
                resolution_path=rec.resolution_path,
                status=rec.status,
                endpoint=rec.endpoint,
                mode=rec.mode,
            )
        if len(_memo) >= _MEMO_LIMIT:
            _memo.clear()
        found = _memo[key] = (why, why.as_dict())
    return found


Output = Callable[[DecisionRecord], None]


def log_output(rec: DecisionRecord) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(dumps(rec.data()).decode())


# Whoever else hears of each decision: the live feed subscribes here (``dispatch.web.live``),
# so this module knows nothing of pages.
recorded: Listeners[[DecisionRecord]] = Listeners("the decisions")


# The output the live feed hears decisions through: ``recorded``'s listeners, told directly
# (no wrapper call per request).
event_output: Output = recorded.notify


# The outputs every decision goes to, in order. `dispatch.apps` adds the metrics and the
# request log at start-up when they are on (HAL0_METRICS, HAL0_REQUEST_LOG).
outputs: list[Output] = [log_output, event_output]


# Decisions recorded on the loop and not yet sent to the outputs, and the loop that will send
# them (None: no send scheduled).
_pending: list[DecisionRecord] = []
_scheduled_on: asyncio.AbstractEventLoop | None = None


def record(rec: DecisionRecord) -> None:
    """Send the decision to every output, once the request's own work is done: on the loop,
    at its next turn, after the answer (or the stream's end) has gone to the client; the
    decisions of one turn go together. Only the log, the pages, the metrics and the request
    log need them, so none of that is on the path of the answer. None of the outputs may
    fail the request."""
    global _scheduled_on
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # sync code (a command, a test): at once
        _output(rec)
        return
    _pending.append(rec)
    if _scheduled_on is not loop:  # (a loop that ended with decisions pending left them here)
        _scheduled_on = loop
        loop.call_soon(_flush)


def _flush() -> None:
    global _scheduled_on
    _scheduled_on = None
    batch = _pending[:]
    _pending.clear()
    for rec in batch:
        _output(rec)


def _output(rec: DecisionRecord) -> None:
    for output in outputs:
        try:
            output(rec)
        except Exception:  # an output's bug must not turn a served request into a 500
            log.exception("decision output %s failed", getattr(output, "__name__", output))
    # The log line's and the page's form is theirs alone: a record queued for the request log
    # (thousands of them while the database is away) does not keep it.
    rec._data = None
