"""From a decision to an open upstream response, honouring slot state.

The resolver said where a request should go; this is where that meets the slots as they are
now: wait out a model swap, skip a slot that is down, queue for a full slot, and fail over
once when the chosen slot fails before its first byte.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from dispatch import kinds
from dispatch.conf import conf
from dispatch.coordination import spoken
from dispatch.coordination.store import store
from dispatch.kinds.urls import upstream_url
from dispatch.routing import eviction, states
from dispatch.routing.resolver import Decision, Target
from dispatch.routing.table import SlotEntry
from dispatch.upstream.admission import admission
from dispatch.upstream.client import upstream
from dispatch.upstream.loads import Waiting, loads
from dispatch.upstream.outliers import outliers
from dispatch.upstream.response import UpstreamError, UpstreamResponse
from dispatch.wire import adapters
from dispatch.wire.adapters import (
    PASSTHROUGH,
    TRANSLATED,
    ClientRequest,
    Mode,
    Outgoing,
    Translation,
)
from dispatch.wire.errors import ApiError

_FAILOVER_STATUSES = frozenset({502, 503})


@dataclass
class Forwarded:
    response: UpstreamResponse
    slot: SlotEntry
    upstream_model: str | None
    resolution_path: str
    # How long it waited for its model to be loaded (seconds), and whether its model's use
    # is counted for the loader (dispatch.upstream.loads): given back by release().
    queued_s: float = 0.0
    counted: bool = False
    # How its answer goes back to the client when the slot was sent another endpoint than
    # the one called (dispatch.wire.adapters); None: passed through as it comes.
    translation: Translation | None = None

    @property
    def mode(self) -> Mode:
        return PASSTHROUGH if self.translation is None else TRANSLATED

    def release(self) -> None:
        """The answer is done: its place on the slot (and its model's use) go back."""
        admission.release(self.slot.name)
        if self.counted and self.upstream_model is not None:
            loads.ended(self.slot.name, self.upstream_model)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _current(target: Target) -> SlotEntry | None:
    """The slot as the newest table knows it (its state may have moved since resolution)."""
    return store.table.slots.get(target.slot.name)


async def _await_ready(target: Target) -> SlotEntry:
    """Wait while the slot is loading; return it once it is not (or raise 503 slot_loading)."""
    wait = conf.HAL0_SWAP_WAIT_S
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        # Register for the next change *before* looking, so a change between the look and the
        # wait cannot be missed.
        changed = store.next_change()
        slot = _current(target)
        if slot is None or not slot.enabled:
            changed.cancel()
            raise ApiError(
                503,
                "slot_unavailable",
                f"Slot '{target.slot.name}' was removed or disabled.",
                headers=_retry_after(1),  # a retry is resolved afresh
            )
        if slot.state != states.LOADING:
            changed.cancel()
            return slot
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            changed.cancel()
            raise ApiError(
                503,
                "slot_loading",
                f"Slot '{slot.name}' is still loading its model after {wait:g}s; try again shortly.",
                headers=_retry_after(min(wait, 10) or 5),
            )
        try:
            await asyncio.wait_for(changed, remaining)
        except TimeoutError:
            pass


# When a request last asked the watcher to look at a down slot (loop time, per slot).
_nudged: dict[str, float] = {}
NUDGE_EVERY_S = 1.0


def _nudge(slot: SlotEntry, on_suspect: Callable[[str, str], None]) -> bool:
    """Ask the in-process watcher to probe a down slot now, at most once a second per slot
    (a burst of requests must not become a burst of probes). True when a probe is now
    under way or was started less than a second ago: a retry in 1 s sees its result."""
    if not conf.HAL0_WATCHER or slot.state not in states.PROBED_DOWN:
        # Probed elsewhere (`manage.py watch`) or by nobody (draining is the operator's).
        return False
    now = asyncio.get_running_loop().time()
    if now - _nudged.get(slot.name, -math.inf) >= NUDGE_EVERY_S:
        _nudged[slot.name] = now
        on_suspect(slot.name, f"a request found it {slot.state}")
    return True


def _degraded(slot: SlotEntry) -> ApiError:
    return ApiError(
        503,
        "slot_unavailable",
        f"Slot '{slot.name}' is degraded: {outliers.degraded(slot)}",
        headers=_retry_after(outliers.retry_after(slot)),
    )


# A drain lasts as long as its operator wants (a swap, maintenance): a retry sooner than this
# would most likely meet it again.
DRAINING_RETRY_S = 30


def _unavailable(slot: SlotEntry, probing: bool) -> ApiError:
    """503 for a down slot. Retry-After says when a retry can help: right after the probe
    just asked for (1 s), else the next scheduled probe (HAL0_PROBE_INTERVAL_S). The SDKs
    honour it, twice by default: 5 s each made a dead slot cost their users 10 s."""
    if slot.state == states.DRAINING:
        return ApiError(
            503,
            "slot_draining",
            f"Slot '{slot.name}' is draining: it finishes its requests in flight and takes no "
            "new ones until an operator undrains it.",
            headers=_retry_after(DRAINING_RETRY_S),
        )
    detail = f": {slot.last_error}" if slot.last_error else ""
    return ApiError(
        503,
        "slot_unavailable",
        f"Slot '{slot.name}' is {slot.state}{detail}",
        headers=_retry_after(1 if probing else conf.HAL0_PROBE_INTERVAL_S),
    )


class _Attempts:
    """What trying the targets in turn has found so far: the first slot that failed (there is
    one failover, before any byte reached the client) and the error to give if none serves."""

    def __init__(
        self,
        decision: Decision,
        on_suspect: Callable[[str, str], None],
        on_wait: Callable[[Waiting], None] | None = None,
    ) -> None:
        self.decision = decision
        self.on_suspect = on_suspect
        self.on_wait = on_wait
        self.first_failed: str | None = None
        self.last_error: ApiError | None = None
        self.queued_s = 0.0
        self.request_id: str | None = None

    async def loaded(self, slot: SlotEntry, target: Target) -> SlotEntry:
        """The slot once the model asked of it is loaded (asking its loader, waiting in its
        queue); at once when it is loaded already."""
        model = slot.models.get(self.decision.requested_model or "")
        if model is None or model.upstream_model != target.upstream_model:
            model = eviction.served(slot).get(target.upstream_model or "")
        if model is None or model.load in states.SERVABLE:
            return slot
        began = asyncio.get_running_loop().time()
        try:
            return await loads.wait(slot, model, self.on_wait, self.request_id)
        except ApiError as err:
            err.queued_s = self.queued_s + asyncio.get_running_loop().time() - began
            raise
        finally:
            self.queued_s += asyncio.get_running_loop().time() - began

    def failed(self, slot: SlotEntry, error: ApiError) -> None:
        self.last_error = self.last_error or error
        self.first_failed = self.first_failed or slot.name

    async def ready(self, target: Target, later: list[Target]) -> SlotEntry | None:
        """A loading slot once it is ready (the swap wait); None to go on to the next."""
        try:
            return await _await_ready(target)
        except ApiError as err:
            self.last_error = err
            if self.first_failed is None and any(_usable_later(t) for t in later):
                return None
            raise

    def usable(self, slot: SlotEntry | None) -> SlotEntry | None:
        """The slot if it can take the request now; None to go on to the next. (Not a
        coroutine: this runs for every request, and only a loading slot makes it wait.)"""
        if slot is None or not slot.enabled:
            return None
        if slot.state in states.DOWN:
            self.failed(slot, _unavailable(slot, _nudge(slot, self.on_suspect)))
            return None
        if not outliers.admit(slot):
            # Out of rotation (its probes pass, its requests did not): fail over at once
            # rather than wait out first_byte_timeout_s again.
            self.failed(slot, _degraded(slot))
            return None
        return slot

    async def open(
        self, slot: SlotEntry, sent: Outgoing, headers: dict[str, str], method: str
    ) -> UpstreamResponse | None:
        """The slot's response (its place on the slot taken); None when it could not be
        reached and the next target may be tried."""
        if not await admission.acquire(slot.name, slot.max_concurrency, conf.HAL0_QUEUE_WAIT_S):
            outliers.abandoned(slot.name)
            raise _busy(slot)
        try:
            response = await upstream.open(slot, sent.path, sent.body, headers, method)
        except UpstreamError as exc:
            admission.release(slot.name)
            if slot.state == states.READY and exc.connected:
                outliers.failed(slot, exc.message, conf.HAL0_OUTLIER_BACKOFF_S)
            else:
                # Down as its probes say, or no connection made (a refused port: a server
                # that is not there fails its probe too): the watcher's to tell, poked now.
                outliers.abandoned(slot.name)
            self.on_suspect(slot.name, exc.message)
            self.last_error = _transport_error(exc)
            if self.first_failed is None:
                self.first_failed = slot.name
                return None  # fail over once, before any byte reached the client
            raise self.last_error from exc
        except BaseException:
            # The client went away while the slot was still thinking (a long prompt, a model
            # loading): its place on the slot must not outlive it.
            admission.release(slot.name)
            outliers.abandoned(slot.name)
            raise
        if response.status_code < 500:
            outliers.succeeded(slot)  # it answered: not an outlier (any more)
        else:
            outliers.abandoned(slot.name)
        return response

    async def passed_on(self, slot: SlotEntry, response: UpstreamResponse, more: bool) -> bool:
        """Whether the slot's 502/503 is left for the next target (closed, its place freed).
        Called only for those statuses: no coroutine for every other answer."""
        status = response.status_code
        if self.first_failed is not None or not more:
            return False
        admission.release(slot.name)
        await response.aclose()
        self.on_suspect(slot.name, f"upstream answered {status}")
        self.first_failed = slot.name
        self.last_error = ApiError(
            503,
            "slot_unavailable",
            f"Slot '{slot.name}' answered {status} and no other slot could serve.",
            # on_suspect above has the watcher probing it now.
            headers=_retry_after(1 if conf.HAL0_WATCHER else conf.HAL0_PROBE_INTERVAL_S),
        )
        return True

    async def send(
        self,
        slot: SlotEntry,
        target: Target,
        endpoint: str,
        request: ClientRequest,
        headers: dict[str, str],
        method: str,
        sent: Outgoing,
    ) -> tuple[UpstreamResponse | None, Outgoing]:
        """The slot's response to what it is sent for ``endpoint`` (as it came, or translated
        to an endpoint it speaks); None to go on to the next target.

        A server that answers as one without the route (``Kind.lacks_route``) does not speak
        the endpoint it was sent, whatever the table said: that is written down for every
        process (``dispatch.coordination.spoken``), and the request is sent again, translated
        to another endpoint it speaks when an adapter can, or refused (404
        ``endpoint_not_supported`` naming the slot, unless another target serves it).
        ``sent``: what the target is sent first (made before any wait, so a body its adapter
        cannot translate was refused at once)."""
        offers = target.slot.endpoints
        while True:
            if sent.translation is not None:  # how long it waited for its model (Ollama says)
                sent.translation.load_s = self.queued_s
            offered = endpoint if endpoint in offers else adapters.translated_to(endpoint, offers)
            response = await self.open(slot, sent, headers, method)
            if (
                response is None
                or response.status_code not in _NO_ROUTE_STATUSES
                or offered is None
                or not await _no_route(slot, sent, offered, response)
            ):
                return response, sent
            admission.release(slot.name)
            await response.aclose()
            if target.slot.spoken.get(offered) is not False:  # (a listed slot's, again)
                await spoken.not_spoken(target.slot, offered)
            offers = offers - {offered}
            if not adapters.serves(endpoint, offers):
                self.failed(slot, _not_served(slot, endpoint, offered, response.status_code))
                return None, sent
            sent = adapters.outgoing(endpoint, offers, request, target.upstream_model)

    def resolution_path(self, slot: SlotEntry) -> str:
        if self.first_failed is not None and self.first_failed != slot.name:
            return f"failover:{self.first_failed}->{slot.name}"
        return self.decision.resolution_path

    def error(self) -> ApiError:
        """Why no target served."""
        if self.last_error is not None:
            self.last_error.queued_s = self.queued_s
        return self.last_error or ApiError(
            503,
            "slot_unavailable",
            f"No enabled slot serves '{self.decision.requested_model}'.",
            headers=_retry_after(1),  # a retry is resolved afresh
        )


def _busy(slot: SlotEntry) -> ApiError:
    """No place on the slot within HAL0_QUEUE_WAIT_S."""
    return ApiError(
        429,
        "slot_busy",
        f"Slot '{slot.name}' is at its limit of {slot.max_concurrency} concurrent requests.",
        headers=_retry_after(conf.HAL0_QUEUE_WAIT_S or 1),
    )


async def forward(
    decision: Decision,
    endpoint: str,
    request: ClientRequest,
    headers: dict[str, str],
    on_suspect: Callable[[str, str], None],
    method: str = "POST",
    on_wait: Callable[[Waiting], None] | None = None,
) -> Forwarded:
    """Open the upstream response for ``decision``; the caller owns (and must close) it.

    Each target is sent what it is asked for (``dispatch.wire.adapters``: the path and body
    for the endpoint its slot offers), by ``endpoint`` (as slots offer it) and the client's
    ``request``. The caller must also ``admission.release(result.slot.name)`` when the
    response is done (``Forwarded.release``). A model its slot has not loaded is asked for
    and waited for first (``dispatch.upstream.loads``); ``on_wait`` hears how that goes.
    """
    targets = list(decision.targets)
    attempts = _Attempts(decision, on_suspect, on_wait)
    attempts.request_id = headers.get("X-Request-Id")
    for i, target in enumerate(targets):
        # What the target is sent, first: a body its adapter cannot translate is the
        # client's 400 before any wait for the slot or its model.
        sent = adapters.outgoing(endpoint, target.slot.endpoints, request, target.upstream_model)
        slot = _current(target)
        if slot is not None and slot.enabled and slot.state == states.LOADING:
            slot = await attempts.ready(target, targets[i + 1 :])
        slot = attempts.usable(slot)
        if slot is None:
            continue
        counted = None  # the model whose use the loader is told of (its slot loads models)
        if slot.loads_models and target.upstream_model is not None:
            slot = await attempts.loaded(slot, target)
            counted = target.upstream_model
            loads.began(slot.name, counted)  # busy from now: never evicted under a request
        try:
            response, sent = await attempts.send(
                slot, target, endpoint, request, headers, method, sent
            )
            if response is not None and (
                response.status_code in _FAILOVER_STATUSES
                and await attempts.passed_on(slot, response, i + 1 < len(targets))
            ):
                response = None
        except BaseException:
            if counted is not None:
                loads.ended(slot.name, counted)
            raise
        if response is None:
            if counted is not None:
                loads.ended(slot.name, counted)
            continue
        fwd = Forwarded(response, slot, target.upstream_model, attempts.resolution_path(slot))
        fwd.queued_s, fwd.counted = attempts.queued_s, counted is not None
        fwd.translation = sent.translation
        return fwd
    raise attempts.error()


# How a server says it has no such route; and how much of its answer is read to tell.
_NO_ROUTE_STATUSES = frozenset({404, 405})
_NO_ROUTE_READ = 4096


async def _no_route(
    slot: SlotEntry, sent: Outgoing, offered: str, response: UpstreamResponse
) -> bool:
    """Whether ``response`` (a 404 or 405) is the slot's server saying it has no route for
    the endpoint it was sent (``offered``, at its own path), rather than that route's own
    answer (a model or a response it does not know, which goes to the client as it is).
    What is read of the body to tell stays in it for the relay."""
    if upstream_url(slot, sent.path.partition("?")[0]) != upstream_url(slot, offered):
        return False  # a path below it (count_tokens, a response by id), or another server path
    head = await response.peek(_NO_ROUTE_READ)
    try:
        body = orjson.loads(head)
    except orjson.JSONDecodeError:
        body = None
    text = head.decode("utf-8", "replace") if body is None else ""
    return kinds.get(slot.kind).lacks_route(response.status_code, body, text)


def _not_served(slot: SlotEntry, endpoint: str, offered: str, status: int) -> ApiError:
    """404 for a slot found not to speak what it was sent, with no other way to serve
    ``endpoint``: hal0web's own error naming the slot, never the upstream's 404 passed on."""
    how = "" if offered == endpoint else f" (translated to {offered})"
    return ApiError(
        404,
        "endpoint_not_supported",
        f"Slot '{slot.name}' does not serve {endpoint}{how}: its server has no such route (it "
        f"answered {status}), and hal0web translates {endpoint} to nothing else it speaks.",
    )


def _usable_later(target: Target) -> bool:
    slot = _current(target)
    return slot is not None and slot.enabled and slot.state not in states.DOWN


def _transport_error(exc: UpstreamError) -> ApiError:
    if exc.kind == "timeout":
        return ApiError(504, "upstream_timeout", exc.message)
    return ApiError(502, "upstream_unreachable", exc.message)
