"""Writing manifests: a slot out of the database, and a ``Manifest`` as canonical TOML.

The writer is deterministic (known keys in a fixed order, unknown keys sorted), so
export → import → export is byte-identical whatever database stored the JSON in between.
Unknown keys (``Slot.extra``) are written back where they came from: top-level ones at the top
level, ``extra["model"]`` and ``extra["limits"]`` into ``[model]`` and ``[limits]``.
"""

from __future__ import annotations

import math
from typing import Any

from dispatch.lib.toml_writer import Inline, dumps_table
from dispatch.manifests.shape import (
    LIMIT_KEYS,
    LOCAL_URL,
    MODEL_KEYS,
    TOP_KEYS,
    Manifest,
    sorted_json,
)
from dispatch.models import ModelSource, Slot
from dispatch.routing import slot_fields
from dispatch.routing.endpoints import OFFERABLE


def from_slot(slot: Slot) -> Manifest:
    """The manifest that declares ``slot`` as it is now (discovered models are not declared)."""
    rows = list(slot.models.all())
    declared = sorted(r.model_id for r in rows if r.source == ModelSource.MANIFEST)
    default = next(
        (r.model_id for r in rows if r.is_default and r.source == ModelSource.MANIFEST), None
    )
    if default is None and declared:
        # The default is a discovered model: a manifest cannot say so, and must name one.
        default = declared[0]
    aliases = sorted(
        (r.model_id, r.upstream_model or r.model_id) for r in rows if r.source == ModelSource.ALIAS
    )
    # Every field a manifest declares (dispatch.routing.slot_fields), then those it holds in
    # another shape than the database.
    values = {f.name: getattr(slot, f.name) for f in slot_fields.MANIFEST}
    values["endpoints"] = tuple(e for e in OFFERABLE if e in (slot.endpoints or ()))
    return Manifest(
        path=f"{slot.name}.toml",
        default_model=default,
        models=tuple(declared),
        aliases=tuple(aliases),
        extra=sorted_json(slot.extra or {}),
        **values,
    )


def dumps(m: Manifest) -> str:
    """Canonical TOML for a manifest: the same manifest always gives the same bytes.

    Raises ``ValueError`` when the slot's extra keys cannot be written (see ``extra_problems``).
    """
    problems = extra_problems(m.extra)
    if problems:
        raise ValueError(
            "; ".join(f"{m.name}: extra{'.' + k if k else ''}: {msg}" for k, msg in problems)
        )
    extra = dict(sorted_json(m.extra))
    port = extra.pop("port", None)
    doc: dict[str, Any] = {"name": m.name}
    # hal0 itself reads `port`; write the manifest back in that form while it still holds.
    if isinstance(port, int) and m.url == LOCAL_URL.format(port=port):
        doc["port"] = port
    else:
        doc["url"] = m.url
        if port is not None:
            doc["port"] = port
    for f in slot_fields.MANIFEST_TOP:
        value = getattr(m, f.name)
        if f.name not in ("name", "url") and (f.written_always or value != f.default):
            doc[slot_fields.manifest_key(f)] = list(value) if isinstance(value, tuple) else value
    model = _model_table(m, extra.pop("model", None))
    if model:
        doc["model"] = model
    limits = _limits_table(m, extra.pop("limits", None))
    if limits:
        doc["limits"] = limits
    # Unknown scalars are still written before any table (the emitter groups them), and
    # unknown tables after [model] and [limits].
    doc.update(extra)
    return dumps_table(doc)


def _model_table(m: Manifest, model_extra: object) -> dict[str, Any]:
    model: dict[str, Any] = {}
    if m.default_model is not None:
        model["default"] = m.default_model
    if set(m.models) - {m.default_model}:
        model["models"] = list(m.models)
    if m.aliases:
        model["aliases"] = Inline(m.aliases)
    if isinstance(model_extra, dict):
        model.update(model_extra)
    return model


def _limits_table(m: Manifest, limits_extra: object) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    for f in slot_fields.MANIFEST_LIMITS:
        value = getattr(m, f.name)
        if value != f.default:
            # `5`, not `5.0`, as people write it; the model stores floats either way.
            whole = float(value).is_integer() and abs(value) < 2**53
            limits[slot_fields.manifest_key(f)] = int(value) if whole else value
    if isinstance(limits_extra, dict):
        limits.update(limits_extra)
    return limits


def extra_problems(extra: object) -> list[tuple[str, str]]:
    """What keeps ``extra`` (edited in the admin, say) from being written back as TOML.

    Returns ``(key, message)`` pairs; empty when the export will carry it faithfully.
    """
    if not isinstance(extra, dict):
        return [("", "must be a JSON object of manifest keys")]
    out: list[tuple[str, str]] = []
    for key in extra:
        if key in TOP_KEYS and key != "port":
            out.append((key, "is a field of the slot: set it there, not in the extra keys"))
    port = extra.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    ):
        out.append(("port", "must be an integer between 1 and 65535"))
    for table, known in (("model", MODEL_KEYS), ("limits", LIMIT_KEYS)):
        if table not in extra:
            continue
        if not isinstance(extra[table], dict):
            out.append((table, "must be an object (the unknown keys of that table)"))
            continue
        out += [
            (f"{table}.{k}", "is a field of the slot, not an extra key")
            for k in extra[table]
            if k in known
        ]
    _unwritable(extra, "", out)
    return out


def _unwritable(value: Any, key: str, out: list[tuple[str, str]]) -> None:
    """Values TOML cannot hold, anywhere in ``value``."""
    if value is None:
        out.append((key, "TOML has no null"))
    elif isinstance(value, float) and not math.isfinite(value):
        out.append((key, "inf and nan cannot be stored"))
    elif isinstance(value, dict):
        for k, v in value.items():
            _unwritable(v, f"{key}.{k}" if key else k, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _unwritable(v, f"{key}[{i}]", out)
