"""Why this slot: a decision put into words a person can read.

Pure, like the resolver beside it: it reads only what the resolution already produced (the
decision, with each target's slot as the table knew it, and the in-flight counts the
resolver ranked by), never the database or the clock. It runs when the request is recorded,
not while it is being routed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dispatch.routing import speaks, states
from dispatch.routing.endpoints import BY_NAME
from dispatch.routing.resolver import Decision, NoRoute
from dispatch.wire import adapters


@dataclass(frozen=True, slots=True)
class Candidate:
    slot: str
    state: str
    priority: int
    inflight: int


@dataclass(frozen=True, slots=True)
class Explanation:
    # pinned | slot | default | fallback | only | alias | pattern | state | priority |
    # least_busy | name | failover | no_route
    rule: str
    text: str
    candidates: tuple[Candidate, ...] = ()
    chosen: str | None = None
    failover: str | None = None  # "a->b" when the request went past a slot that was down
    # How the chosen slot serves the endpoint called: "native", or "translated" (to one it
    # speaks); None when not said (no endpoint given).
    served: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "text": self.text,
            "chosen": self.chosen,
            "failover": self.failover,
            "served": self.served,
            "candidates": [
                {"slot": c.slot, "state": c.state, "priority": c.priority, "inflight": c.inflight}
                for c in self.candidates
            ],
        }


def _describe(c: Candidate) -> str:
    return f"{c.slot}: {c.state}, priority {c.priority}, {c.inflight} in flight"


def _ranking_rule(first: Candidate, second: Candidate) -> str:
    """Which of the resolver's keys put ``first`` ahead of ``second`` (see resolver._candidates)."""
    if states.RANK.get(first.state, states.RANK_LAST) != states.RANK.get(
        second.state, states.RANK_LAST
    ):
        return "state"
    if first.priority != second.priority:
        return "priority"
    if first.inflight != second.inflight:
        return "least_busy"
    return "name"


def explain(
    decision: Decision,
    inflight: Sequence[int] = (),
    *,
    answered_by: str | None = None,
    resolution_path: str | None = None,
    status: int = 200,
    endpoint: str | None = None,
    mode: str | None = None,
) -> Explanation:
    """Explain ``decision``.

    ``inflight`` holds each target's in-flight count as the resolver saw it (same order as
    ``decision.targets``); ``answered_by`` and ``resolution_path`` are where the request really
    went, which differs from the decision after a failover in ``forward``. ``endpoint`` is
    the one called and ``mode`` how the slot was sent it (``passthrough``/``translated``; None:
    as the table says it would be): a translated call says so.
    """
    counts = tuple(inflight) + (0,) * (len(decision.targets) - len(inflight))
    candidates = tuple(
        Candidate(t.slot.name, t.slot.state, t.slot.priority, counts[i])
        for i, t in enumerate(decision.targets)
    )
    final = answered_by or decision.target.slot.name
    path = resolution_path or decision.resolution_path
    verb = "answered by" if 0 < status < 400 else "routed to"
    rule, why = _why(decision, candidates, final)
    failover: str | None = None
    if path.startswith("failover:"):
        failover = path.removeprefix("failover:")
        rule, why = _after_failover(decision, rule, why, failover, final)
    served, how = _served(decision, final, endpoint, mode)
    return Explanation(rule, f"{verb} {final}: {why}{how}", candidates, final, failover, served)


def _served(
    decision: Decision, final: str, endpoint: str | None, mode: str | None
) -> tuple[str | None, str]:
    """How ``final`` serves ``endpoint`` (natively or translated), and the words that say a
    translation: " (messages · translated to chat/completions)"."""
    if endpoint is None:
        return None, ""
    slot = next((t.slot for t in decision.targets if t.slot.name == final), decision.target.slot)
    offer = BY_NAME[endpoint].offer if endpoint in BY_NAME else endpoint
    to = adapters.translated_to(offer, slot.endpoints)
    if mode == adapters.PASSTHROUGH or (mode is None and to is None):
        return speaks.NATIVE, ""
    return speaks.TRANSLATED, f" ({endpoint} · translated" + (f" to {to})" if to else ")")


# The resolution paths that name their slot outright (no ranking among candidates).
_NAMED = ("qualified", "slot", "default", "fallback", "affinity")


def _kind(decision: Decision) -> str:
    return decision.resolution_path.split(":", 1)[0]


def _why(decision: Decision, candidates: tuple[Candidate, ...], final: str) -> tuple[str, str]:
    """The rule that chose the slot, and why, as the resolver decided it."""
    model = decision.requested_model
    upstream = decision.target.upstream_model
    kind = _kind(decision)
    if kind == "qualified":
        return "pinned", f"the request pinned slot {final} ('{model}'){_by_pattern(decision)}"
    if kind == "slot":
        return "slot", f"the request named the slot {final}; its default model is '{upstream}'"
    if kind == "affinity":
        return "affinity", f"{final} made the response the request refers to, and alone holds it"
    if kind == "default":
        return "default", f"the request named no model; {final} is the default slot"
    if kind == "fallback":
        return (
            "fallback",
            f"no slot serves '{model}'; the operator's fallback slot (HAL0_FALLBACK_SLOT) takes it",
        )
    if len(candidates) == 1:
        c = candidates[0]
        if decision.pattern is not None:
            return (
                "pattern",
                f"'{model}' matched alias pattern '{decision.pattern}' → {c.slot}/{upstream}, "
                "the only slot serving it",
            )
        if decision.target.source == "alias":
            return (
                "alias",
                f"'{model}' is {c.slot}'s alias for '{upstream}', the only slot serving it",
            )
        return "only", f"the only slot serving '{model}' ({c.state})"
    return _ranked(decision, candidates)


def _by_pattern(decision: Decision) -> str:
    """Which alias pattern of the pinned slot the name matched, when one did."""
    if decision.pattern is None:
        return ""
    return f", matched by its alias pattern '{decision.pattern}' → '{decision.upstream_model}'"


def _ranked(decision: Decision, candidates: tuple[Candidate, ...]) -> tuple[str, str]:
    """Why the first of several candidates: the first of the resolver's keys that set it
    ahead of the second, and which of the others were down."""
    first, second = candidates[0], candidates[1]
    rule = _ranking_rule(first, second)
    chosen = decision.target
    served = f"'{decision.requested_model}'" + (
        f" (alias for '{chosen.upstream_model}')" if chosen.source == "alias" else ""
    )
    if decision.pattern is not None:
        served += f" (alias pattern '{decision.pattern}' → '{chosen.upstream_model}')"
    if rule == "state":
        same = [c for c in candidates if c.state == first.state]
        if len(same) == 1:
            why = f"the only {first.state} slot serving {served}"
        else:
            why = f"ranked first of {len(candidates)} slots serving {served}: {first.state} before {second.state}"
    elif rule == "priority":
        why = f"the highest priority ({first.priority}) of {len(candidates)} slots serving {served}"
    elif rule == "least_busy":
        why = f"the least busy ({first.inflight} in flight) of {len(candidates)} {first.state} slots serving {served}"
    else:
        why = f"tied with {second.slot} on state, priority and load; first by name of the slots serving {served}"
    others = [c for c in candidates[1:] if c.state in states.DOWN]
    if others:
        why += "; " + ", ".join(f"{c.slot} was {c.state}" for c in others)
    return rule, why


def _after_failover(
    decision: Decision, rule: str, why: str, failover: str, final: str
) -> tuple[str, str]:
    """The rule and reason once the request failed over (``failover`` is "a->b")."""
    if final != decision.target.slot.name:
        # forward() went past the chosen slot: it failed before answering.
        before = failover.split("->", 1)[0]
        return (
            "failover",
            f"{before} failed before answering, so the request failed over; first choice: {why}",
        )
    if _kind(decision) not in _NAMED:
        return "failover", why  # the resolver's own: the operator's preferred slot is down
    return rule, why


def explain_no_route(no_route: NoRoute) -> Explanation:
    return Explanation("no_route", f"no route: {no_route.message}", (), None, None)


def candidate_text(explanation: Explanation) -> str:
    """The candidates as one line, for a table cell or a tooltip."""
    return "; ".join(_describe(c) for c in explanation.candidates)
