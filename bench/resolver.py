"""Resolver micro-benchmark: 100 slots x 20 models, a mix of ids, timed one call at a time."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from dispatch.routing.resolver import Decision, resolve
from dispatch.routing.table import ModelEntry, RoutingTable, make_slot

SLOTS = 100
MODELS_PER_SLOT = 20
STATES = ("ready", "ready", "ready", "loading", "unknown", "offline")


@dataclass(frozen=True)
class ResolverResult:
    kind: str
    calls: int
    p50_us: float
    p99_us: float
    max_us: float


def build_table(seed: int = 7) -> RoutingTable:
    """100 slots of 20 models each; models shared by 2-3 slots and aliased, like a real fleet."""
    rng = random.Random(seed)
    slots = []
    for s in range(SLOTS):
        models = []
        for m in range(MODELS_PER_SLOT):
            # Every model id is served by this slot and (usually) by its neighbours too, so
            # by-model lookups have several candidates to sort.
            model_id = f"org-{(s + m) % 40}/model-{(s // 3 + m) % 700}-q4"
            models.append(ModelEntry(model_id, model_id, "manifest", is_default=(m == 0)))
        models.append(
            ModelEntry(f"alias-{s}", models[1].upstream_model, "alias"),
        )
        slots.append(
            make_slot(
                f"slot-{s:03d}",
                f"http://127.0.0.1:{9000 + s}/v1",
                models,
                state=rng.choice(STATES),
                priority=rng.randint(0, 3),
            )
        )
    return RoutingTable.build(1, slots)


def _ids(table: RoutingTable, rng: random.Random) -> dict[str, list[str]]:
    slot_names = list(table.slots)
    known = list(table.known_ids)
    return {
        "exact": [rng.choice(known) for _ in range(500)],
        "alias": [f"alias-{rng.randrange(SLOTS)}" for _ in range(500)],
        "qualified": [
            f"{name}/{rng.choice(list(table.slots[name].models))}"
            for name in (rng.choice(slot_names) for _ in range(500))
        ],
        "slot": [rng.choice(slot_names) for _ in range(500)],
        # A miss builds "did you mean" suggestions with difflib over every known id: the slow
        # path, so fewer samples keep the whole run short.
        "miss": [f"no-such-model-{i}" for i in range(40)],
    }


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run(rounds: int = 20) -> list[ResolverResult]:
    table = build_table()
    rng = random.Random(11)
    groups = _ids(table, rng)
    inflight = {name: rng.randrange(4) for name in table.slots}
    # Check the mix does what it says before timing it.
    assert all(isinstance(resolve(table, i, "chat/completions"), Decision) for i in groups["exact"])
    assert not any(
        isinstance(resolve(table, i, "chat/completions"), Decision) for i in groups["miss"]
    )
    results = []
    mixed: list[float] = []
    perf = time.perf_counter_ns
    for kind, ids in groups.items():
        n_rounds = 1 if kind == "miss" else rounds
        samples: list[float] = []
        for _ in range(n_rounds):
            for model_id in ids:
                t0 = perf()
                resolve(table, model_id, "chat/completions", inflight)
                samples.append((perf() - t0) / 1000.0)
        if kind != "miss":
            mixed.extend(samples)
        samples.sort()
        results.append(
            ResolverResult(kind, len(samples), _pct(samples, 0.5), _pct(samples, 0.99), samples[-1])
        )
    mixed.sort()
    results.append(
        ResolverResult("mix (hits)", len(mixed), _pct(mixed, 0.5), _pct(mixed, 0.99), mixed[-1])
    )
    return results
