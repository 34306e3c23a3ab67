"""What an API key may use: its model allowlist, applied to a decision and to /v1/models.

Pure, like the resolver it follows: the resolver says where a request would go, the scope
keeps only the slots the key may reach there. Patterns are globs (``fnmatch``, case
sensitive as model ids are) over every name a model goes by: its id, the alias asked for,
the model an alias stands for, and ``slot/model``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from dispatch.routing.resolver import Decision, Target
from dispatch.routing.table import SlotEntry


@dataclass(frozen=True, slots=True)
class Scope:
    patterns: tuple[str, ...] = ()  # empty: every model

    @property
    def everything(self) -> bool:
        return not self.patterns

    def allows(self, names: Iterable[str]) -> bool:
        if not self.patterns:
            return True
        return any(fnmatchcase(name, p) for name in names for p in self.patterns)

    def narrow(self, decision: Decision) -> Decision | None:
        """``decision`` with only the targets this scope allows (None: not one of them).

        When the resolver's first choice is out of scope the next allowed one leads, and the
        resolution path names it: a key limited to ``primary/*`` asking for a model two
        slots serve goes to primary, and fails over only among what it may use.
        """
        if not self.patterns:
            return decision
        kept = tuple(t for t in decision.targets if self.allows(names(decision, t)))
        if not kept:
            return None
        if kept == decision.targets:
            return decision
        path = decision.resolution_path
        if kept[0] is not decision.targets[0]:
            path = f"{path.split(':', 1)[0]}:{kept[0].slot.name}"
        return replace(decision, targets=kept, resolution_path=path)


EVERYTHING = Scope()


def names(decision: Decision, target: Target) -> set[str]:
    """Every name the model of ``target`` goes by in this request."""
    slot = target.slot
    requested = decision.requested_model
    if requested is None or requested == slot.name:  # no model, or a slot asked by name
        bare = slot.default_model or ""
    elif requested.startswith(slot.name + "/"):
        bare = requested[len(slot.name) + 1 :]
    else:
        bare = requested
    found = {bare, f"{slot.name}/{bare}"}
    if requested:
        found.add(requested)
    if target.upstream_model:
        found.add(target.upstream_model)
    return found


def model_names(slot: SlotEntry, model_id: str) -> set[str]:
    """Every name ``model_id`` on ``slot`` goes by, as /v1/models lists it."""
    entry = slot.models.get(model_id)
    found = {model_id, f"{slot.name}/{model_id}"}
    if entry is not None and entry.upstream_model:
        found.add(entry.upstream_model)
    return found


def split_patterns(text: str) -> list[str]:
    """Patterns as an operator types them: separated by commas, spaces or new lines."""
    return [p for p in text.replace(",", " ").split() if p]
