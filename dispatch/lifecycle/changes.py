"""What one probe result changes in a slot: decided once, from the slot as the routing table
(or the locked database row) has it and the observation. Pure.

The watcher asks it of the table to skip the write in the steady state; the write
(``dispatch.lifecycle.persistence``) asks it again of the locked row and performs the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dispatch.routing import states
from dispatch.routing.table import SlotEntry

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

    @property
    def slot_changed(self) -> bool:
        """Whether the slot's own row changes (its models aside)."""
        return self.state is not None or self.last_error is not None or self.drift is not None

    def __bool__(self) -> bool:
        return self.slot_changed or bool(self.dropped or self.added or self.fields)


def changes(slot: SlotEntry, obs: Observation) -> Changes:
    """What ``obs`` changes in ``slot``. A draining slot keeps its state and its last error."""
    state = states.after_probe(slot.state, obs.state)
    new_state = state if state != slot.state else None
    new_error = obs.error if state != states.DRAINING and slot.last_error != obs.error else None
    if not reads_models(obs) or obs.advertised is None:
        return Changes(new_state, new_error)
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
    return Changes(
        state=new_state,
        last_error=new_error,
        drift=drift if drift != tuple(slot.drift) else None,
        dropped=dropped,
        added=tuple(m for m in obs.advertised if m not in slot.models),
        first_is_default=not any(m.is_default for m in rows if m.model_id not in dropped),
        fields=fields,
    )
