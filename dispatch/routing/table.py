"""The routing table: an immutable snapshot of slots and the models they serve.

Pure data. It is built from plain values (see ``dispatch.coordination.store`` for the ORM loader), never
mutated, and replaced whole when anything changes, so a request reads one consistent view
without locks and without touching the database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dispatch.routing import patterns
from dispatch.routing.endpoints import defaults_for
from dispatch.routing.slot_fields import DEFAULTS as _D
from dispatch.routing.states import LOADED, UNKNOWN


@dataclass(frozen=True, slots=True)
class ModelEntry:
    model_id: str  # an alias's may be a pattern (dispatch.routing.patterns): see `pattern`
    upstream_model: str
    source: str  # manifest | alias | discovered
    is_default: bool = False
    # What the upstream's own /models said of it (context_length, capabilities, meta,
    # created, owned_by...), less id and object: /v1/models shows it next to hal0web's.
    # Not compared: it changes no route and nothing the page shows (a new table still has
    # a new version, so it is published).
    upstream_fields: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), compare=False
    )
    # Its load state (dispatch.routing.states.Load) as the server last said or hal0web's
    # loader since set, the load's progress (0..1) when the server tells it, and why the
    # last load failed. Aliases carry their target's.
    load: str = LOADED
    progress: float | None = None
    load_error: str = ""
    pinned: bool = False  # the operator's: hal0web never unloads it
    # When a request last used it (epoch seconds, as the loader last wrote it): least recently
    # used goes first when a slot must make room.
    last_used: float = 0.0

    @property
    def pattern(self) -> bool:
        """An alias whose id is a glob: it names every model id it matches, not itself."""
        return self.source == "alias" and patterns.is_pattern(self.model_id)


# An ejection's back-off doubles with each ejection in a row, up to this many times.
MAX_BACKOFF_FACTOR = 8


@dataclass(frozen=True, slots=True)
class Ejection:
    """A slot out of rotation though its probes pass (``dispatch.upstream.outliers``), as its
    row holds it, so every process honours it. Kept after it ends (``until`` None) while no
    request has succeeded since: the next one lasts twice as long."""

    until: float | None  # wall-clock seconds (epoch); None: ended
    reason: str = ""
    count: int = 0  # ejections in a row without a request that succeeded

    @property
    def out(self) -> bool:
        """Out of rotation: until a request or a probe after ``until`` brings it back."""
        return self.until is not None


def next_ejection(before: int, backoff_s: float, cause: str, now: float) -> Ejection:
    """The ejection after ``before`` in a row: ``backoff_s``, doubled per repeat."""
    count = before + 1
    seconds = backoff_s * min(2 ** (count - 1), MAX_BACKOFF_FACTOR)
    return Ejection(now + seconds, f"taken out of rotation for {seconds:g}s after {cause}", count)


@dataclass(frozen=True, slots=True)
class SlotEntry:
    """One slot as the router sees it. Written out (not generated) so that attribute access
    stays a plain slot read on the request path; its fields are those of
    ``dispatch.routing.slot_fields`` carried by the table, with their defaults (checked by
    tests/test_slot_fields.py), and the few derived here (models, default, endpoints_listed,
    spoken, ejection)."""

    name: str
    url: str
    kind: str = _D["kind"]
    type: str = _D["type"]
    device: str = _D["device"]
    enabled: bool = _D["enabled"]
    is_default: bool = _D["is_default"]
    priority: int = _D["priority"]
    state: str = _D["state"]
    last_error: str = _D["last_error"]
    api_key_env: str = _D["api_key_env"]
    max_concurrency: int = _D["max_concurrency"]
    connect_timeout_s: float = _D["connect_timeout_s"]
    first_byte_timeout_s: float = _D["first_byte_timeout_s"]
    idle_timeout_s: float = _D["idle_timeout_s"]
    max_duration_s: float = _D["max_duration_s"]  # 0: no cap
    unload_idle_s: float = _D["unload_idle_s"]  # 0: never
    models: Mapping[str, ModelEntry] = field(default_factory=lambda: MappingProxyType({}))
    default_model: str | None = None
    drift: tuple[str, ...] = _D["drift"]
    loads_models: bool = _D["loads_models"]
    model_limit: int = _D["model_limit"]
    # The endpoints its server speaks natively (dispatch.routing.endpoints names): its
    # manifest's `endpoints`, else what asking the server found, else what its kind speaks
    # for its type (dispatch.routing.speaks). A request for an endpoint the slot neither
    # speaks nor is served by translation (dispatch.wire.adapters) never reaches it.
    endpoints: frozenset[str] = frozenset(_D["endpoints"])
    # Whether `endpoints` was listed (kept for the manifest and the admin) or is the default.
    endpoints_listed: bool = False
    # What asking its server found it speaks (endpoint -> yes or no), for its present kind,
    # type and URL; empty until asked. The watcher asks again when it is not of them.
    spoken: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))
    # Out of rotation though its probes pass, by one process's judgement, for every process
    # (its row's ``ejected_until``, ``ejected_reason``, ``ejections``); None: never, or
    # since a request succeeded.
    ejection: Ejection | None = None


@dataclass(frozen=True, slots=True)
class RoutingTable:
    version: int
    slots: Mapping[str, SlotEntry]
    # model id -> names of the enabled slots that serve it (declared, alias or discovered);
    # never a pattern: an exact id or alias is one dictionary lookup, and always wins
    by_model: Mapping[str, tuple[str, ...]]
    # slot type -> name of the enabled default slot of that type
    default_slot: Mapping[str, str]
    known_ids: tuple[str, ...]
    # Memo of close-id suggestions for misses (difflib over every id costs tens of ms at
    # 100 x 20): a burst of the same mistyped id pays once per table.
    suggest_memo: dict[str, tuple[str, ...]] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )
    # Each suggestible id with its letter pairs, filled on the first miss.
    id_pairs: list[tuple[str, frozenset[str]]] = field(
        default_factory=list, compare=False, repr=False, hash=False
    )
    # alias pattern -> names of the enabled slots that declare it (dispatch.routing.patterns),
    # and the patterns compiled once for this table, tried only when no exact id matched,
    # with their own bounded memo of names already matched.
    by_pattern: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False, hash=False
    )
    matcher: patterns.Matcher = field(
        default=patterns.NO_PATTERNS, compare=False, repr=False, hash=False
    )

    @classmethod
    def build(cls, version: int, slots: Iterable[SlotEntry]) -> RoutingTable:
        by_name = {s.name: s for s in slots}
        by_model: dict[str, list[str]] = {}
        by_pattern: dict[str, list[str]] = {}
        defaults: dict[str, str] = {}
        for s in by_name.values():
            if not s.enabled:
                continue
            if s.is_default:
                defaults.setdefault(s.type, s.name)
            for model_id, entry in s.models.items():
                into = by_pattern if entry.pattern else by_model
                into.setdefault(model_id, []).append(s.name)
        return cls(
            version=version,
            slots=MappingProxyType(by_name),
            by_model=MappingProxyType({k: tuple(v) for k, v in by_model.items()}),
            default_slot=MappingProxyType(defaults),
            known_ids=tuple(sorted(by_model)),
            by_pattern=MappingProxyType({k: tuple(v) for k, v in by_pattern.items()}),
            matcher=patterns.Matcher(by_pattern) if by_pattern else patterns.NO_PATTERNS,
        )

    @property
    def unprobed(self) -> tuple[str, ...]:
        """Enabled slots never probed yet: a miss may only mean we have not asked them."""
        return tuple(s.name for s in self.slots.values() if s.enabled and s.state == UNKNOWN)


EMPTY_TABLE = RoutingTable.build(0, ())


def make_slot(
    name: str,
    url: str,
    models: Iterable[ModelEntry] = (),
    **kwargs: object,
) -> SlotEntry:
    """Convenience constructor: freezes the model mapping and derives the default model and,
    unless given, the endpoints (the type's defaults)."""
    model_list = list(models)
    if "endpoints" not in kwargs:
        kwargs["endpoints"] = defaults_for(str(kwargs.get("type", "llm")))
    default = next((m.model_id for m in model_list if m.is_default), None)
    if default is None:
        default = next((m.model_id for m in model_list if m.source != "alias"), None)
    return SlotEntry(
        name=name,
        url=url,
        models=MappingProxyType({m.model_id: m for m in model_list}),
        default_model=default,
        **kwargs,  # type: ignore[arg-type]
    )
