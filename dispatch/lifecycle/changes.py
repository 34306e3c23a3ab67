"""What one probe result changes in a slot: decided once, from the slot as the routing table
(or the locked database row) has it and the observation. Pure.

The watcher asks it of the table to skip the write in the steady state; the write
(``dispatch.lifecycle.persistence``) asks it again of the locked row and performs the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dispatch.kinds import ModelLoad
from dispatch.routing import speaks, states
from dispatch.routing.table import ModelEntry, SlotEntry

if TYPE_CHECKING:
    from dispatch.lifecycle.probe import Observation

# Fields that do not count as a change on their own: llama.cpp's server answers `created`
# with the time of each request, and every probe would otherwise write.
_VOLATILE = frozenset({"created"})


def fields_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether a model's upstream fields changed in a way worth writing."""
    return {k: v for k, v in old.items() if k not in _VOLATILE} != {
        k: v for k, v in new.items() if k not in _VOLATILE
    }


def reads_models(obs: Observation) -> bool:
    """Whether the observation says anything of the slot's models: only a ready server's
    model list does."""
    return obs.state == states.READY and obs.advertised is not None


@dataclass(frozen=True, slots=True)
class Changes:
    """What to write; None / empty for what stays as it is. False when nothing changes."""

    state: str | None = None
    last_error: str | None = None
    drift: tuple[str, ...] | None = None  # declared upstream models the server does not list
    dropped: frozenset[str] = frozenset()  # discovered models it no longer lists
    added: tuple[str, ...] = ()  # models it lists that the slot does not know: discovered
    first_is_default: bool = False  # the first added becomes the default (there was none)
    fields: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # id -> new fields
    # upstream model id -> its new load state (every row naming it, aliases too)
    loads: Mapping[str, ModelLoad] = field(default_factory=dict)
    loads_models: bool | None = None
    model_limit: int | None = None
    # What the server speaks as now found (endpoint -> yes or no, the earlier finding kept
    # for the endpoints not asked about).
    spoken: Mapping[str, bool] | None = None
    # What becomes of its ejection (dispatch.upstream.outliers): ENDED (back in rotation,
    # the count in a row kept), CLEARED (forgotten), or None (it stands, or there is none).
    ejection: str | None = None

    @property
    def slot_changed(self) -> bool:
        """Whether the slot's own row changes (its models aside)."""
        return (
            self.state is not None
            or self.last_error is not None
            or self.drift is not None
            or self.loads_models is not None
            or self.model_limit is not None
            or self.spoken is not None
            or self.ejection is not None
        )

    def __bool__(self) -> bool:
        return self.slot_changed or bool(self.dropped or self.added or self.fields or self.loads)


def as_load(m: ModelEntry) -> ModelLoad:
    return ModelLoad(m.load, m.progress, m.load_error)


def load_changes(
    slot: SlotEntry, obs: Observation, held: frozenset[str] = frozenset()
) -> dict[str, ModelLoad]:
    """The models whose load state the observation changes, by upstream id. A server that
    says nothing of loading has every model it lists loaded; a model the loader is acting on
    (``held``: loading or evicting it) keeps the loader's state until it is done."""
    said = obs.loads.models if obs.loads is not None else {}
    out: dict[str, ModelLoad] = {}
    for m in slot.models.values():
        up = m.upstream_model
        if up in held or up in out:
            continue
        if obs.loads is None:
            new = ModelLoad(states.LOADED)
        else:
            new = said.get(up) or ModelLoad(states.UNLOADED)
        if m.load == states.FAILED and new.state == states.UNLOADED:
            # A server that keeps no word of a failed load (Lemonade, Ollama) lists the model
            # as merely not loaded: the failure and its reason stand until it loads again.
            continue
        if new.state == m.load and new.progress is None and m.progress is not None:
            # A listing that says "loading" but not how far (llama.cpp's router: only its
            # pushed events say) keeps the progress they said.
            new = ModelLoad(new.state, m.progress, new.error)
        if new != as_load(m):
            out[up] = new
    return out


def spoken_changes(slot: SlotEntry, obs: Observation) -> dict[str, bool] | None:
    """What the server was found to speak, when the observation asked and found otherwise
    than the slot knew; never a finding of another kind, type or URL than the slot's now."""
    if obs.spoken is None or obs.spoken_for != speaks.key(slot.kind, slot.type, slot.url):
        return None
    found = {**slot.spoken, **obs.spoken}
    return found if found != dict(slot.spoken) else None


ENDED = "ended"
CLEARED = "cleared"


def ejection_change(slot: SlotEntry, state: str, now: float | None) -> str | None:
    """What a probe that leaves ``slot`` in ``state`` does to its ejection. A slot that goes
    down, or comes back up, is the watcher's: a server that restarted is not the outlier
    whose requests failed, so its ejection is forgotten. A ready slot whose probe passes
    once the back-off is over (``now``, wall-clock seconds; None: never) is back in
    rotation for every process; before that, probes passing is what made it an outlier."""
    e = slot.ejection
    if e is None:
        return None
    if state != states.READY or slot.state != states.READY:
        return CLEARED
    if e.until is not None and now is not None and now >= e.until:
        return ENDED
    return None


def changes(
    slot: SlotEntry,
    obs: Observation,
    held: frozenset[str] = frozenset(),
    now: float | None = None,
) -> Changes:
    """What ``obs`` changes in ``slot``. A draining slot keeps its state and its last error;
    a model the loader is acting on (``held``) keeps its load state; an ejection ends as
    ``ejection_change`` says (``now``: the wall clock, epoch seconds)."""
    state = states.after_probe(slot.state, obs.state)
    new_state = state if state != slot.state else None
    new_error = obs.error if state != states.DRAINING and slot.last_error != obs.error else None
    spoken = spoken_changes(slot, obs)
    ejection = ejection_change(slot, state, now)
    if not reads_models(obs) or obs.advertised is None:
        return Changes(new_state, new_error, spoken=spoken, ejection=ejection)
    advertised = set(obs.advertised)
    rows = slot.models.values()
    dropped = frozenset(
        m.model_id for m in rows if m.source == "discovered" and m.model_id not in advertised
    )
    details = obs.details or {}
    fields: dict[str, Mapping[str, Any]] = {}
    for m in rows:
        # What the server says of each model it serves, declared or discovered.
        new = details.get(m.model_id)
        if (
            m.source != "alias"
            and m.model_id in advertised
            and new is not None
            and fields_changed(m.upstream_fields or {}, new)
        ):
            fields[m.model_id] = new
    upstreams = {m.upstream_model for m in rows if m.source != "discovered"}
    drift = tuple(sorted(u for u in upstreams if u not in advertised))
    loads_models = obs.loads.loads_models if obs.loads is not None else False
    limit = obs.loads.model_limit if obs.loads is not None else 0
    return Changes(
        state=new_state,
        last_error=new_error,
        loads=load_changes(slot, obs, held),
        loads_models=loads_models if loads_models != slot.loads_models else None,
        model_limit=limit if limit != slot.model_limit else None,
        drift=drift if drift != tuple(slot.drift) else None,
        dropped=dropped,
        added=tuple(m for m in obs.advertised if m not in slot.models),
        first_is_default=not any(m.is_default for m in rows if m.model_id not in dropped),
        fields=fields,
        spoken=spoken,
        ejection=ejection,
    )
