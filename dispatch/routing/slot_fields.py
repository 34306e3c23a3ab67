"""A slot's fields, declared once: name, type, default, and which places carry each one.

Pure. The places are the database row (``dispatch.models.Slot``, whose defaults read
``DEFAULTS``), the routing table's entry (``SlotEntry``, filled by
``dispatch.coordination.store.load_table``), the page's slot payload
(``dispatch.web.snapshots.slot_payload``) and the manifest (``dispatch.manifests``: its keys,
defaults, parsing and export). Each of them walks this list, so a plain field added here
reaches them all; one that needs shaping on the way (a JSON list stored, a frozenset in the
table, a masked URL on the page) is named in that place's own small table of shapes, and
tests/test_slot_fields.py fails until it is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from dispatch.routing.states import UNKNOWN


class _Required:
    """The default of a field every slot must give (its name, its URL)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class SlotField:
    name: str  # the attribute, on the model and on the table entry alike
    type: type  # its value's type in the table entry and the manifest
    default: Any = REQUIRED  # immutable: the model's mutable JSON defaults are made from it
    table: bool = True  # the routing table's SlotEntry carries it
    payload: bool = False  # the page's slot payload shows it
    # Its manifest key: top-level, or under [limits] ("limits.<name>"); None: an import never
    # sets it (the watcher's and the operator's runtime fields).
    manifest: str | None = None
    # The manifest writes it even when it holds the default (else it leaves it out).
    written_always: bool = False


# In the order the manifest writer emits its keys and the import reports its changes.
FIELDS: tuple[SlotField, ...] = (
    SlotField("name", str, payload=True, manifest="name", written_always=True),
    SlotField("url", str, payload=True, manifest="url", written_always=True),
    SlotField("kind", str, "llamacpp", payload=True, manifest="kind", written_always=True),
    SlotField("type", str, "llm", payload=True, manifest="type", written_always=True),
    # The endpoints it serves (dispatch.routing.endpoints names); none listed: its type's.
    SlotField("endpoints", tuple, (), payload=True, manifest="endpoints"),
    SlotField("device", str, "", payload=True, manifest="device", written_always=True),
    SlotField("enabled", bool, True, payload=True, manifest="enabled", written_always=True),
    SlotField("is_default", bool, False, payload=True, manifest="default", written_always=True),
    SlotField("priority", int, 0, payload=True, manifest="priority", written_always=True),
    # The name of the environment variable holding the upstream's key (never the key).
    SlotField("api_key_env", str, "", manifest="api_key_env"),
    SlotField("max_concurrency", int, 0, payload=True, manifest="limits.max_concurrency"),
    SlotField("connect_timeout_s", float, 5.0, manifest="limits.connect_timeout_s"),
    SlotField("first_byte_timeout_s", float, 300.0, manifest="limits.first_byte_timeout_s"),
    SlotField("idle_timeout_s", float, 120.0, manifest="limits.idle_timeout_s"),
    SlotField("max_duration_s", float, 0.0, manifest="limits.max_duration_s"),  # 0: no cap
    # hal0's own top-level `idle_timeout_s`: a model no request used for this long is unloaded
    # (through the loader, as any unload); 0: never.
    SlotField("unload_idle_s", float, 0.0, payload=True, manifest="idle_timeout_s"),
    SlotField("state", str, UNKNOWN, payload=True),
    SlotField("state_changed_at", dt.datetime, None, table=False),
    SlotField("last_error", str, "", payload=True),
    # Declared models the server did not advertise at its last probe.
    SlotField("drift", tuple, (), payload=True),
    # What the server says of its models' loading (dispatch.kinds), read at each probe: whether
    # it loads and unloads them when asked (then hal0web asks, dispatch.lifecycle.loader),
    # and how many it keeps loaded at once (0: no limit it tells).
    SlotField("loads_models", bool, False, payload=True),
    SlotField("model_limit", int, 0, payload=True),
    # What asking the server found it speaks ({"for": what it was found of, "found":
    # {endpoint: bool}}, dispatch.routing.speaks): the watcher's at each readiness, or a
    # request's that met a missing route. The table carries it shaped: the finding, when it
    # is of the slot's present kind, type and URL.
    SlotField("spoken", dict, MappingProxyType({}), table=False),
    # Out of rotation though its probes pass (dispatch.upstream.outliers): until when (None:
    # not, or no longer), why, and how many ejections in a row (the back-off doubles). One
    # process ejects, every process honours it; the table carries them as one `ejection`.
    SlotField("ejected_until", dt.datetime, None, table=False),
    SlotField("ejected_reason", str, "", table=False),
    SlotField("ejections", int, 0, table=False),
    # The manifest keys hal0 uses that hal0web does not model, kept verbatim for export: the
    # manifest carries them as its unknown keys, never under a key of their own.
    SlotField("extra", dict, MappingProxyType({}), table=False),
)

BY_NAME: Mapping[str, SlotField] = MappingProxyType({f.name: f for f in FIELDS})
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {f.name: f.default for f in FIELDS if f.default is not REQUIRED}
)
TABLE: tuple[SlotField, ...] = tuple(f for f in FIELDS if f.table)
PAYLOAD: tuple[SlotField, ...] = tuple(f for f in FIELDS if f.payload)
MANIFEST: tuple[SlotField, ...] = tuple(f for f in FIELDS if f.manifest)
# Manifest fields at the top level and under [limits], each in the writer's order.
MANIFEST_TOP: tuple[SlotField, ...] = tuple(
    f for f in MANIFEST if f.manifest and not f.manifest.startswith("limits.")
)
MANIFEST_LIMITS: tuple[SlotField, ...] = tuple(f for f in MANIFEST if f not in MANIFEST_TOP)


def manifest_key(f: SlotField) -> str:
    """The field's key inside its manifest table (``connect_timeout_s``, not ``limits.…``)."""
    assert f.manifest is not None
    return f.manifest.rpartition(".")[2]
