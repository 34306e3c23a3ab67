"""Resolution: which slot serves a request. A pure function over an immutable table.

No ORM, no HTTP, no clock other than the one that times the decision itself, so it is cheap
(a few microseconds), deterministic and property-tested.
"""

from __future__ import annotations

import difflib
import heapq
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from dispatch.routing import patterns, states
from dispatch.routing.endpoints import TYPES_OF
from dispatch.routing.table import RoutingTable, SlotEntry
from dispatch.wire import adapters

_NO_INFLIGHT: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Target:
    """One slot that can serve the request, and the model name to send it."""

    slot: SlotEntry
    upstream_model: str | None
    # manifest | alias | discovered | default | slot | fallback | qualified | pattern
    source: str


@dataclass(frozen=True, slots=True)
class Decision:
    requested_model: str | None
    targets: tuple[Target, ...]  # the chosen target first, then ordered fallbacks
    resolution_path: str
    latency_us: float
    table_version: int
    # The alias pattern the requested name matched (dispatch.routing.patterns), when one did.
    pattern: str | None = None

    @property
    def target(self) -> Target:
        return self.targets[0]

    @property
    def slot(self) -> str:
        return self.targets[0].slot.name

    @property
    def upstream_model(self) -> str | None:
        return self.targets[0].upstream_model

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(t.slot.name for t in self.targets)


@dataclass(frozen=True, slots=True)
class NoRoute:
    requested_model: str | None
    status: int
    code: str
    message: str
    latency_us: float
    table_version: int
    slot: str | None = None


def _offers(slot: SlotEntry, endpoint: str) -> bool:
    """Whether ``slot`` can serve ``endpoint``: it offers it, or a request adapter turns the
    request into one it offers (``dispatch.wire.adapters``)."""
    return endpoint in slot.endpoints or adapters.serves(endpoint, slot.endpoints)


_PATH_PREFIX: Mapping[str, str] = MappingProxyType({"alias": "alias", "discovered": "discovered"})


def _source_path(source: str) -> str:
    return _PATH_PREFIX.get(source, "model")


def candidates(
    table: RoutingTable,
    model_id: str,
    inflight: Mapping[str, int] = _NO_INFLIGHT,
    endpoint: str | None = None,
) -> list[tuple[SlotEntry, str, str]]:
    """The enabled slots serving ``model_id`` (and offering ``endpoint``, when given), best
    first: (slot, upstream model, source). ``model_id`` may be an alias pattern."""
    found = []
    for name in table.by_model.get(model_id) or table.by_pattern.get(model_id, ()):
        slot = table.slots[name]
        if endpoint is not None and not _offers(slot, endpoint):
            continue
        entry = slot.models[model_id]
        found.append((slot, entry.upstream_model, entry.source))
    # Ready, then loading, then the rest; then the operator's priority; then the least busy.
    found.sort(
        key=lambda c: (
            states.RANK.get(c[0].state, states.RANK_LAST),
            -c[0].priority,
            inflight.get(c[0].name, 0),
            c[0].name,
        )
    )
    return found


def _by_model(
    table: RoutingTable, requested: str, endpoint: str, inflight: Mapping[str, int], t0: int
) -> Decision | NoRoute:
    names = table.by_model[requested]
    if len(names) == 1:  # the common case: one slot serves the model, nothing to rank
        slot = table.slots[names[0]]
        if not _offers(slot, endpoint):
            return _not_offered(table, requested, endpoint, names, t0)
        entry = slot.models[requested]
        target = Target(slot, entry.upstream_model, entry.source)
        path = f"{_source_path(entry.source)}:{slot.name}"
        return Decision(requested, (target,), path, _elapsed(t0), table.version)
    found = candidates(table, requested, inflight, endpoint)
    if not found:
        return _not_offered(table, requested, endpoint, names, t0)
    chosen, _, source = found[0]
    path = f"{_source_path(source)}:{chosen.name}"
    # The operator's first choice (highest priority) is down and we picked another: say so.
    preferred = min(found, key=lambda c: (-c[0].priority, c[0].name))[0]
    if preferred.name != chosen.name and preferred.state in states.DOWN:
        path = f"failover:{preferred.name}->{chosen.name}"
    targets = tuple(Target(s, up, src) for s, up, src in found)
    return Decision(requested, targets, path, _elapsed(t0), table.version)


def _not_offered(
    table: RoutingTable, requested: str, endpoint: str, names: Sequence[str], t0: int
) -> NoRoute:
    """404 for a model whose slots do not serve ``endpoint``, natively or translated: never
    a forward that fails upstream, never another slot by default. Names the slots and what
    their servers speak."""
    speak = "; ".join(f"slot '{n}' {_speaks(table.slots[n])}" for n in names)
    return NoRoute(
        requested,
        404,
        "endpoint_not_supported",
        f"No slot serving '{requested}' serves {endpoint}, natively or translated: {speak}.",
        _elapsed(t0),
        table.version,
        slot=names[0] if len(names) == 1 else None,
    )


def _speaks(slot: SlotEntry) -> str:
    return f"speaks {', '.join(sorted(slot.endpoints)) or 'nothing'}"


def pinned(
    table: RoutingTable,
    slot_name: str,
    requested_model: str | None,
    endpoint: str,
    response_id: str,
) -> Decision | NoRoute:
    """The slot that made response ``response_id`` (it alone holds it), whatever ``model``
    alone would pick: resolution ``affinity:<slot>``. The model, when the request names one
    the slot serves, goes upstream under the slot's own name for it; otherwise as sent."""
    t0 = time.perf_counter_ns()
    slot = table.slots.get(slot_name)
    if slot is None:
        return NoRoute(
            requested_model,
            404,
            "response_not_found",
            f"Response '{response_id}' was made by slot '{slot_name}', which no longer exists.",
            _elapsed(t0),
            table.version,
            slot=slot_name,
        )
    if not slot.enabled:
        return NoRoute(
            requested_model,
            503,
            "slot_unavailable",
            f"Slot '{slot_name}', which holds response '{response_id}', is disabled.",
            _elapsed(t0),
            table.version,
            slot=slot_name,
        )
    if not _offers(slot, endpoint):
        return _not_offered(table, requested_model or slot_name, endpoint, (slot_name,), t0)
    entry = slot.models.get(requested_model) if requested_model else None
    target = Target(slot, entry.upstream_model if entry else None, "affinity")
    return Decision(
        requested_model, (target,), f"affinity:{slot_name}", _elapsed(t0), table.version
    )


def _elapsed(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1000.0


_MEMO_LIMIT = 1024
_PREFILTER = 64


def _pairs(text: str) -> frozenset[str]:
    low = text.lower()
    return frozenset(low[i : i + 2] for i in range(len(low) - 1))


def suggestions(table: RoutingTable, requested: str) -> tuple[str, ...]:
    """Up to three known ids (or slot names) close to ``requested``."""
    memo = table.suggest_memo
    found = memo.get(requested)
    if found is None:
        if not table.id_pairs:
            names = list(table.known_ids) + [s for s in table.slots if table.slots[s].enabled]
            table.id_pairs.extend((i, _pairs(i)) for i in names)
        want = _pairs(requested)
        # difflib compares slowly; rank by shared letter pairs first and keep the closest.
        ranked = heapq.nlargest(_PREFILTER, table.id_pairs, key=lambda p: len(want & p[1]))
        pool = [i for i, _ in ranked]
        found = tuple(difflib.get_close_matches(requested, pool, n=3, cutoff=0.4))
        if len(memo) >= _MEMO_LIMIT:  # bounded: random garbage ids must not grow it forever
            memo.clear()
        memo[requested] = found
    return found


def resolve(
    table: RoutingTable,
    requested_model: str | None,
    endpoint: str,
    inflight: Mapping[str, int] = _NO_INFLIGHT,
    fallback_slot: str | None = None,
) -> Decision | NoRoute:
    """Decide where a request for ``requested_model`` on ``endpoint`` goes.

    In this order: no model at all (the endpoint type's default slot); a ``slot/model``
    qualified id; a slot's name; a model id or alias; an alias pattern (the most specific);
    the operator's opt-in fallback slot; else no route.
    """
    t0 = time.perf_counter_ns()
    if requested_model is None or requested_model == "":
        return _by_default(table, requested_model, endpoint, t0)
    # The cheap tests first: most requests name a plain model id, and pay no call for the
    # steps that cannot apply.
    found = None
    if "/" in requested_model:
        found = _by_qualified_id(table, requested_model, endpoint, t0)
    if found is None and requested_model in table.slots:
        found = _by_slot_name(table, requested_model, endpoint, t0)
    if found is None and requested_model in table.by_model:
        found = _by_model(table, requested_model, endpoint, inflight, t0)
    if found is None and table.matcher:
        found = _by_pattern(table, requested_model, endpoint, inflight, t0)
    if found is None:
        found = _by_fallback(table, requested_model, endpoint, fallback_slot, t0)
    return found


def _by_default(
    table: RoutingTable, requested_model: str | None, endpoint: str, t0: int
) -> Decision | NoRoute:
    """No model in the body: the default slot of a type that offers the endpoint."""
    types = TYPES_OF.get(endpoint, ("llm",))
    defaults = [
        table.slots[n]
        for n in (table.default_slot.get(t) for t in types)
        if n is not None and table.slots[n].default_model is not None
    ]
    name = next((s.name for s in defaults if _offers(s, endpoint)), None)
    if name is None and defaults:
        # There is a default slot for it, but its server does not speak the endpoint and
        # nothing translates it: say so, naming the slot.
        return NoRoute(
            requested_model,
            404,
            "endpoint_not_supported",
            f"This request names no model, and the default {defaults[0].type} slot "
            f"'{defaults[0].name}' does not serve {endpoint}, natively or translated: it "
            f"{_speaks(defaults[0])}.",
            _elapsed(t0),
            table.version,
            slot=defaults[0].name,
        )
    if name is None:
        return NoRoute(
            requested_model,
            400,
            "model_required",
            f"This request names no model and no default {' or '.join(types)} slot "
            f"offering {endpoint} is configured; set `model` in the request.",
            _elapsed(t0),
            table.version,
        )
    slot = table.slots[name]
    target = Target(slot, slot.default_model, "default")
    return Decision(requested_model, (target,), f"default:{name}", _elapsed(t0), table.version)


def _disabled(table: RoutingTable, requested: str, slot: str, t0: int) -> NoRoute:
    return NoRoute(
        requested,
        503,
        "slot_unavailable",
        f"Slot '{slot}' is disabled.",
        _elapsed(t0),
        table.version,
        slot=slot,
    )


def _by_qualified_id(
    table: RoutingTable, requested: str, endpoint: str, t0: int
) -> Decision | NoRoute | None:
    """``slot/model``. Model ids may contain "/" themselves (vLLM's "Qwen/Qwen3-8B"), so the
    prefix is a qualifier only when it names a slot; None when it is no qualified id."""
    prefix, slash, rest = requested.partition("/")
    slot = table.slots.get(prefix) if slash and prefix else None
    if slot is None:
        return None
    entry = slot.models.get(rest)
    pattern = None
    if entry is None and requested not in table.by_model:
        # The slot serves every name its alias patterns match, asked for as slot/name too.
        pattern = patterns.best_match(rest, (m.model_id for m in slot.models.values() if m.pattern))
        entry = slot.models[pattern] if pattern is not None else None
    if entry is None:
        if requested in table.by_model:
            return None
        return NoRoute(
            requested,
            404,
            "model_not_found",
            f"Slot '{prefix}' does not serve model '{rest}'." + _hint(sorted(slot.models)),
            _elapsed(t0),
            table.version,
            slot=prefix,
        )
    if not slot.enabled:
        return _disabled(table, requested, prefix, t0)
    if not _offers(slot, endpoint):
        return _not_offered(table, requested, endpoint, (prefix,), t0)
    target = Target(slot, entry.upstream_model, "qualified")
    path = f"qualified:{prefix}"
    return Decision(requested, (target,), path, _elapsed(t0), table.version, pattern)


def _by_slot_name(
    table: RoutingTable, requested: str, endpoint: str, t0: int
) -> Decision | NoRoute | None:
    """A slot's name (that is no model id as well): that slot's default model."""
    slot = table.slots.get(requested)
    if slot is None or requested in table.by_model:
        return None
    if not slot.enabled:
        return _disabled(table, requested, requested, t0)
    if slot.default_model is None:
        return NoRoute(
            requested,
            404,
            "model_not_found",
            f"Slot '{requested}' has no models yet.",
            _elapsed(t0),
            table.version,
            slot=requested,
        )
    if not _offers(slot, endpoint):
        return _not_offered(table, requested, endpoint, (requested,), t0)
    target = Target(slot, slot.default_model, "slot")
    return Decision(requested, (target,), f"slot:{requested}", _elapsed(t0), table.version)


def _by_pattern(
    table: RoutingTable, requested: str, endpoint: str, inflight: Mapping[str, int], t0: int
) -> Decision | NoRoute | None:
    """An alias pattern that matches the name (no exact id did): the slots declaring the
    most specific one, ranked as for a model (``dispatch.routing.patterns``). The pattern is
    chosen by the name alone, then its slots must offer the endpoint, as for an exact id:
    a less specific pattern never takes over silently."""
    pattern = table.matcher.match(requested)
    if pattern is None:
        return None
    names = table.by_pattern[pattern]
    found = candidates(table, pattern, inflight, endpoint)
    if not found:
        return _not_offered(table, requested, endpoint, names, t0)
    chosen = found[0][0]
    path = f"pattern:{chosen.name}"
    preferred = min(found, key=lambda c: (-c[0].priority, c[0].name))[0]
    if preferred.name != chosen.name and preferred.state in states.DOWN:
        path = f"failover:{preferred.name}->{chosen.name}"
    targets = tuple(Target(s, up, "pattern") for s, up, _ in found)
    return Decision(requested, targets, path, _elapsed(t0), table.version, pattern)


def _by_fallback(
    table: RoutingTable, requested: str, endpoint: str, fallback_slot: str | None, t0: int
) -> Decision | NoRoute:
    """Nothing serves it. Only an operator's explicit opt-in sends it somewhere anyway."""
    fb = table.slots.get(fallback_slot) if fallback_slot is not None else None
    if fb is not None and fb.enabled and _offers(fb, endpoint):
        target = Target(fb, requested, "fallback")
        return Decision(
            requested, (target,), f"fallback:{fallback_slot}", _elapsed(t0), table.version
        )
    return NoRoute(
        requested,
        404,
        "model_not_found",
        f"The model '{requested}' does not exist or no slot serves it."
        + _hint(suggestions(table, requested)),
        _elapsed(t0),
        table.version,
    )


def _hint(ids: Sequence[str]) -> str:
    if not ids:
        return ""
    return " Did you mean: " + ", ".join(f"'{i}'" for i in ids[:3]) + "?"
