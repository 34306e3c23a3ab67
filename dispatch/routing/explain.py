"""Why this slot: a decision put into words a person can read.

Pure, like the resolver beside it: it reads only what the resolution already produced (the
decision, with each target's slot as the table knew it, and the in-flight counts the
resolver ranked by), never the database or the clock. It runs when the request is recorded,
not while it is being routed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dispatch.routing import states
from dispatch.routing.resolver import Decision, NoRoute


@dataclass(frozen=True, slots=True)
class Candidate:
    slot: str
    state: str
    priority: int
    inflight: int


@dataclass(frozen=True, slots=True)
class Explanation:
    # pinned | slot | default | fallback | only | alias | state | priority | least_busy |
    # name | failover | no_route
    rule: str
    text: str
    candidates: tuple[Candidate, ...] = ()
    chosen: str | None = None
    failover: str | None = None  # "a->b" when the request went past a slot that was down

    def as_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "text": self.text,
            "chosen": self.chosen,
            "failover": self.failover,
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
) -> Explanation:
    """Explain ``decision``.

    ``inflight`` holds each target's in-flight count as the resolver saw it (same order as
    ``decision.targets``); ``answered_by`` and ``resolution_path`` are where the request really
    went, which differs from the decision after a failover in ``forward``.
    """
    counts = tuple(inflight) + (0,) * (len(decision.targets) - len(inflight))
    candidates = tuple(
        Candidate(t.slot.name, t.slot.state, t.slot.priority, counts[i])
        for i, t in enumerate(decision.targets)
    )
    chosen = decision.target
    final = answered_by or chosen.slot.name
    path = resolution_path or decision.resolution_path
    verb = "answered by" if 0 < status < 400 else "routed to"
    head = f"{verb} {final}"
    model = decision.requested_model
    upstream = chosen.upstream_model
    kind = decision.resolution_path.split(":", 1)[0]

    failover: str | None = None
    if path.startswith("failover:"):
        failover = path.removeprefix("failover:")

    if kind == "qualified":
        rule, why = "pinned", f"the request pinned slot {final} ('{model}')"
    elif kind == "slot":
        rule, why = "slot", f"the request named the slot {final}; its default model is '{upstream}'"
    elif kind == "affinity":
        rule, why = (
            "affinity",
            f"{final} made the response the request refers to, and alone holds it",
        )
    elif kind == "default":
        rule, why = "default", f"the request named no model; {final} is the default slot"
    elif kind == "fallback":
        rule = "fallback"
        why = (
            f"no slot serves '{model}'; the operator's fallback slot (HAL0_FALLBACK_SLOT) takes it"
        )
    elif len(candidates) == 1:
        c = candidates[0]
        if chosen.source == "alias":
            rule, why = (
                "alias",
                f"'{model}' is {c.slot}'s alias for '{upstream}', the only slot serving it",
            )
        else:
            rule, why = "only", f"the only slot serving '{model}' ({c.state})"
    else:
        first, second = candidates[0], candidates[1]
        rule = _ranking_rule(first, second)
        served = f"'{model}'" + (f" (alias for '{upstream}')" if chosen.source == "alias" else "")
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
    if failover is not None:
        before = failover.split("->", 1)[0]
        if final != chosen.slot.name:
            # forward() went past the chosen slot: it failed before answering.
            rule = "failover"
            why = (
                f"{before} failed before answering, so the request failed over; first choice: {why}"
            )
        elif kind not in ("qualified", "slot", "default", "fallback", "affinity"):
            rule = "failover"  # the resolver's own: the operator's preferred slot is down
    text = f"{head}: {why}"
    return Explanation(rule, text, candidates, final, failover)


def explain_no_route(no_route: NoRoute) -> Explanation:
    return Explanation("no_route", f"no route: {no_route.message}", (), None, None)


def candidate_text(explanation: Explanation) -> str:
    """The candidates as one line, for a table cell or a tooltip."""
    return "; ".join(_describe(c) for c in explanation.candidates)
