"""What a hal0 slot manifest is: its dataclass, its keys, and its errors. No I/O.

Shared by the reader (``parse``), the writer (``export``) and the importer (``apply``). The
keys and defaults of the slot's own fields come from ``dispatch.routing.slot_fields``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatch.models import ModelSource
from dispatch.routing import slot_fields
from dispatch.routing.slot_fields import DEFAULTS as _D

LOCAL_URL = "http://127.0.0.1:{port}/v1"

# Top-level keys we model, in the order the writer emits them: the slot's, and hal0's `port`
# (the URL's short form) right after `url`.
TOP_KEYS: tuple[str, ...] = tuple(
    key
    for f in slot_fields.MANIFEST_TOP
    for key in ((slot_fields.manifest_key(f), "port") if f.name == "url" else (f.manifest,))
    if key is not None
)
MODEL_KEYS = ("default", "models", "aliases")
LIMIT_KEYS: tuple[str, ...] = tuple(
    slot_fields.manifest_key(f) for f in slot_fields.MANIFEST_LIMITS
)
# Slot fields a manifest declares. Runtime fields (state, state_changed_at, last_error, drift)
# belong to the watcher and the operator: an import never touches them.
DECLARED_FIELDS: tuple[str, ...] = (
    *(f.name for f in slot_fields.MANIFEST if f.name != "name"),
    "extra",
)
# Model field → the manifest key an error on it is reported under.
FIELD_KEYS: Mapping[str, str] = {
    **{f.name: f.manifest for f in slot_fields.MANIFEST if f.manifest},
    "extra": "extra",
}


@dataclass(frozen=True)
class ManifestError:
    path: str
    field: str  # the manifest key, dotted ("model.aliases.hermes"); "" for the whole file
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f": line {self.line}, column {self.column}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class ManifestErrors(Exception):
    """One or more manifests are invalid; ``errors`` says where and why."""

    def __init__(self, errors: Sequence[ManifestError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


@dataclass(frozen=True)
class Manifest:
    """One slot as a manifest declares it. Its slot fields are those of
    ``dispatch.routing.slot_fields`` with a manifest key, with their defaults (checked by
    tests/test_slot_fields.py)."""

    path: str
    name: str
    url: str
    kind: str = _D["kind"]
    type: str = _D["type"]
    # The endpoints the slot serves (dispatch.routing.endpoints names); empty: the type's defaults.
    endpoints: tuple[str, ...] = _D["endpoints"]
    device: str = _D["device"]
    enabled: bool = _D["enabled"]
    is_default: bool = _D["is_default"]
    priority: int = _D["priority"]
    api_key_env: str = _D["api_key_env"]
    default_model: str | None = None
    models: tuple[str, ...] = ()  # every declared model, the default included, sorted
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, target), sorted
    max_concurrency: int = _D["max_concurrency"]
    connect_timeout_s: float = _D["connect_timeout_s"]
    first_byte_timeout_s: float = _D["first_byte_timeout_s"]
    idle_timeout_s: float = _D["idle_timeout_s"]
    max_duration_s: float = _D["max_duration_s"]
    unload_idle_s: float = _D["unload_idle_s"]  # hal0's top-level idle_timeout_s
    extra: dict[str, Any] = field(default_factory=dict)

    def slot_fields(self) -> dict[str, Any]:
        fields = {f: getattr(self, f) for f in DECLARED_FIELDS}
        fields["endpoints"] = list(self.endpoints)  # a JSON list in the database
        return fields


@dataclass(frozen=True)
class Want:
    """One model row a manifest declares."""

    model_id: str
    upstream: str
    source: str
    is_default: bool


def want_key(w: Want) -> str:
    """The manifest key that declares ``w``."""
    if w.source == ModelSource.ALIAS:
        return f"model.aliases.{w.model_id}"
    return "model.default" if w.is_default else "model.models"


def sorted_json(value: Any) -> Any:
    """Keys sorted at every level: the writer's order must not depend on the database's JSON."""
    if isinstance(value, dict):
        return {k: sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sorted_json(v) for v in value]
    return value
