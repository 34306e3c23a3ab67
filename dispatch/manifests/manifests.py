"""hal0 slot manifests (one TOML file per slot): parse, validate, write, and apply to the DB.

Reading and writing are pure: ``parse()`` turns TOML text into a ``Manifest``, ``dumps()`` turns
a ``Manifest`` into canonical TOML, and ``from_slot()`` reads one back out of the database. The
writer is deterministic (known keys in a fixed order, unknown keys sorted), so
export → import → export is byte-identical whatever database stored the JSON in between.

Keys hal0 uses that we do not model (``runtime``, ``profile``, ``[server]``, ``[model]
context_size`` …) are kept verbatim in ``Slot.extra`` and written back on export: top-level ones
at the top level, unknown keys of ``[model]`` and ``[limits]`` under ``extra["model"]`` and
``extra["limits"]`` (those two names can never be unknown top-level keys, so nothing collides).

``apply()`` validates through the models' ``full_clean()`` (the same rules the admin uses) and
writes everything in one transaction: one bad manifest imports nothing.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import IntegrityError, transaction

from dispatch.lib.toml_writer import Inline, dumps_table
from dispatch.models import ModelSource, Slot, SlotModel, StateVersion
from dispatch.routing.endpoints import OFFERABLE

LOCAL_URL = "http://127.0.0.1:{port}/v1"

# Top-level keys we model, in the order the writer emits them.
_TOP_KEYS = (
    "name",
    "url",
    "port",
    "kind",
    "type",
    "endpoints",
    "device",
    "enabled",
    "default",
    "priority",
    "api_key_env",
)
_MODEL_KEYS = ("default", "models", "aliases")
_LIMIT_KEYS = (
    "max_concurrency",
    "connect_timeout_s",
    "first_byte_timeout_s",
    "idle_timeout_s",
    "max_duration_s",
)
_LIMIT_DEFAULTS: dict[str, float] = {
    "max_concurrency": 0,
    "connect_timeout_s": 5.0,
    "first_byte_timeout_s": 300.0,
    "idle_timeout_s": 120.0,
    "max_duration_s": 0.0,
}
# Limits where 0 means "off" rather than an impossible timeout.
_ZERO_IS_OFF = frozenset({"max_duration_s"})
# Slot fields a manifest declares. Runtime fields (state, state_changed_at, last_error, drift)
# belong to the watcher and the operator: an import never touches them.
DECLARED_FIELDS = (
    "url",
    "kind",
    "type",
    "endpoints",
    "device",
    "enabled",
    "is_default",
    "priority",
    "api_key_env",
    *_LIMIT_KEYS,
    "extra",
)
# Model field → the manifest key an error on it is reported under.
_FIELD_KEYS = {
    "name": "name",
    "url": "url",
    "kind": "kind",
    "type": "type",
    "endpoints": "endpoints",
    "device": "device",
    "enabled": "enabled",
    "is_default": "default",
    "priority": "priority",
    "api_key_env": "api_key_env",
    "extra": "extra",
    **{k: f"limits.{k}" for k in _LIMIT_KEYS},
}


# --- errors --------------------------------------------------------------------------------


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


# --- the manifest --------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    path: str
    name: str
    url: str
    kind: str = "llamacpp"
    type: str = "llm"
    # The endpoints the slot serves (dispatch.routing.endpoints names); empty: the type's defaults.
    endpoints: tuple[str, ...] = ()
    device: str = ""
    enabled: bool = True
    is_default: bool = False
    priority: int = 0
    api_key_env: str = ""
    default_model: str | None = None
    models: tuple[str, ...] = ()  # every declared model, the default included, sorted
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, target), sorted
    max_concurrency: int = 0
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 300.0
    idle_timeout_s: float = 120.0
    max_duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def slot_fields(self) -> dict[str, Any]:
        fields = {f: getattr(self, f) for f in DECLARED_FIELDS}
        fields["endpoints"] = list(self.endpoints)  # a JSON list in the database
        return fields


@dataclass(frozen=True)
class _Want:
    """One model row a manifest declares."""

    model_id: str
    upstream: str
    source: str
    is_default: bool


class _Collector:
    """Collects the field errors of one file instead of stopping at the first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[ManifestError] = []

    def add(self, key: str, message: str) -> None:
        self.errors.append(ManifestError(self.path, key, message))

    def sorted(self) -> list[ManifestError]:
        """In the order a reader meets the keys in a manifest (stable within a key)."""
        order = {k: i for i, k in enumerate((*_TOP_KEYS, "model", "limits"))}
        return sorted(
            self.errors, key=lambda e: order.get(re.split(r"[.\[]", e.field)[0], len(order))
        )


_TOML_POS = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def parse(text: str, path: str) -> Manifest:
    """One manifest from TOML text. Raises ``ManifestErrors`` naming the file and each field."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS.match(str(exc))
        if m:
            err = ManifestError(
                path, "", f"invalid TOML: {m['msg']}", int(m["line"]), int(m["col"])
            )
        else:
            err = ManifestError(path, "", f"invalid TOML: {exc}")
        raise ManifestErrors([err]) from exc

    c = _Collector(path)
    extra: dict[str, Any] = {
        k: v for k, v in doc.items() if k not in (*_TOP_KEYS, "model", "limits")
    }

    name = _get(c, doc, "name", str, required=True)
    url = _get(c, doc, "url", str)
    port = doc.get("port")
    if port is not None:
        # `port` is hal0's own key: kept verbatim, and the URL when no `url` is given.
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            c.add("port", "must be an integer between 1 and 65535")
        else:
            extra["port"] = port
            if url is None:
                url = LOCAL_URL.format(port=port)
    if url is None and "port" not in doc:
        c.add("url", "required (or `port`, meaning http://127.0.0.1:PORT/v1)")

    values: dict[str, Any] = {
        "kind": _get(c, doc, "kind", str),
        "type": _get(c, doc, "type", str),
        "device": _get(c, doc, "device", str),
        "enabled": _get(c, doc, "enabled", bool),
        "is_default": _get(c, doc, "default", bool),
        "priority": _get(c, doc, "priority", int),
        "api_key_env": _get(c, doc, "api_key_env", str),
    }
    listed = _get(c, doc, "endpoints", list)
    if listed is not None:
        values["endpoints"] = _endpoints(c, listed)

    default_model: str | None = None
    models: list[str] = []
    aliases: dict[str, str] = {}
    model_tbl = _table(c, doc, "model")
    if model_tbl is not None:
        model_extra = {k: v for k, v in model_tbl.items() if k not in _MODEL_KEYS}
        if model_extra:
            extra["model"] = model_extra
        default_model = _get(c, model_tbl, "default", str, key="model.default")
        listed = _get(c, model_tbl, "models", list, key="model.models")
        for i, item in enumerate(listed or []):
            if isinstance(item, str):
                models.append(item)
            else:
                c.add(f"model.models[{i}]", f"must be a string, not {_toml_type(item)}")
        raw_aliases = _get(c, model_tbl, "aliases", dict, key="model.aliases")
        for alias, target in (raw_aliases or {}).items():
            if isinstance(target, str):
                aliases[alias] = target
            else:
                c.add(f"model.aliases.{alias}", f"must be a string, not {_toml_type(target)}")
    if models and default_model is None:
        c.add("model.default", "required when model.models is given")
    declared = sorted(set(models) | ({default_model} if default_model is not None else set()))
    for alias in aliases:
        if alias in declared:
            c.add(f"model.aliases.{alias}", "is also a declared model")

    limits: dict[str, Any] = {}
    limits_tbl = _table(c, doc, "limits")
    if limits_tbl is not None:
        limits_extra = {k: v for k, v in limits_tbl.items() if k not in _LIMIT_KEYS}
        if limits_extra:
            extra["limits"] = limits_extra
        v = _get(c, limits_tbl, "max_concurrency", int, key="limits.max_concurrency")
        if v is not None:
            if v < 0:
                c.add("limits.max_concurrency", "must be >= 0 (0 = unlimited)")
            limits["max_concurrency"] = v
        for key in _LIMIT_KEYS[1:]:
            t = _get(c, limits_tbl, key, float, key=f"limits.{key}")
            if t is not None:
                if key in _ZERO_IS_OFF:
                    if not math.isfinite(t) or t < 0:
                        c.add(f"limits.{key}", "must be a finite number >= 0 (0 = off)")
                elif not math.isfinite(t) or t <= 0:
                    c.add(f"limits.{key}", "must be a finite number > 0")
                limits[key] = float(t)

    _check_json_safe(c, extra, "")
    given = {k: v for k, v in {**values, **limits}.items() if v is not None}
    url_key = "url" if "url" in doc or "port" not in doc else "port"
    wants = [_Want(mid, mid, ModelSource.MANIFEST, mid == default_model) for mid in declared]
    wants += [_Want(a, t, ModelSource.ALIAS, False) for a, t in aliases.items()]
    _check_fields(c, {"name": name, "url": url, **given}, url_key, wants)
    if c.errors:
        raise ManifestErrors(c.sorted())
    assert name is not None and url is not None  # both reported above when missing
    return Manifest(
        path=path,
        name=name,
        url=url,
        default_model=default_model,
        models=tuple(declared),
        aliases=tuple(sorted(aliases.items())),
        extra=_sorted_json(extra),
        **given,
    )


def _endpoints(c: _Collector, listed: list[Any]) -> tuple[str, ...]:
    """A manifest's `endpoints`: known names only, in the endpoint table's order."""
    if not listed:
        c.add("endpoints", "must name at least one endpoint (leave it out for the type's defaults)")
    names: set[str] = set()
    for i, item in enumerate(listed):
        if not isinstance(item, str):
            c.add(f"endpoints[{i}]", f"must be a string, not {_toml_type(item)}")
        elif item not in OFFERABLE:
            c.add(f"endpoints[{i}]", f"unknown endpoint {item!r}; known: {', '.join(OFFERABLE)}")
        else:
            names.add(item)
    return tuple(e for e in OFFERABLE if e in names)


def _check_fields(
    c: _Collector, fields: dict[str, Any], url_key: str, wants: Sequence[_Want]
) -> None:
    """The models' own field rules (regexes, choices, alias rules): no database needed.

    Rules that need the database (unique names, one default slot per type) run in ``apply``.
    """
    present = {k: v for k, v in fields.items() if v is not None}
    if "endpoints" in present:
        present["endpoints"] = list(present["endpoints"])  # checked above, name by name
    try:
        Slot(**present).clean_fields(exclude=[k for k in ("name", "url") if k not in present])
    except ValidationError as exc:
        for fld, messages in exc.message_dict.items():
            key = url_key if fld == "url" else _FIELD_KEYS.get(fld, fld)
            for msg in messages:
                c.add(key, msg)
    for w in wants:
        row = SlotModel(
            model_id=w.model_id, upstream_model=w.upstream, source=w.source, is_default=w.is_default
        )
        try:
            row.clean_fields(exclude=["slot"])
            row.clean()
        except ValidationError as exc:
            key = _want_key(w)
            for messages in exc.message_dict.values():
                for msg in messages:
                    c.add(
                        key,
                        f"{w.model_id!r}: {msg}" if key != f"model.aliases.{w.model_id}" else msg,
                    )


def _want_key(w: _Want) -> str:
    if w.source == ModelSource.ALIAS:
        return f"model.aliases.{w.model_id}"
    return "model.default" if w.is_default else "model.models"


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


_EXPECTED = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}


def _get(
    c: _Collector,
    tbl: Mapping[str, Any],
    name: str,
    kind: type,
    *,
    required: bool = False,
    key: str | None = None,
) -> Any:
    key = key or name
    if name not in tbl:
        if required:
            c.add(key, "required")
        return None
    value = tbl[name]
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is list:
        ok = isinstance(value, list)
    elif kind is dict:
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = _EXPECTED.get(kind) or ("an array" if kind is list else "a table")
        c.add(key, f"must be {expected}, not {_toml_type(value)}")
        return None
    return value


def _table(c: _Collector, doc: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    if name not in doc:
        return None
    if not isinstance(doc[name], dict):
        c.add(name, f"must be a table ([{name}]), not {_toml_type(doc[name])}")
        return None
    return dict(doc[name])


def _check_json_safe(c: _Collector, value: Any, key: str) -> None:
    # Slot.extra is JSON: TOML's dates/times and inf/nan have no faithful JSON form.
    if isinstance(value, dict):
        for k, v in value.items():
            _check_json_safe(c, v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_safe(c, v, f"{key}[{i}]")
    elif isinstance(value, dt.date | dt.time):
        c.add(key, "dates and times cannot be kept in an unknown key (hal0web stores them as JSON)")
    elif isinstance(value, float) and not math.isfinite(value):
        c.add(key, "inf and nan cannot be kept in an unknown key (hal0web stores them as JSON)")


def extra_problems(extra: object) -> list[tuple[str, str]]:
    """What keeps ``extra`` (edited in the admin, say) from being written back as TOML.

    Returns ``(key, message)`` pairs; empty when the export will carry it faithfully.
    """
    if not isinstance(extra, dict):
        return [("", "must be a JSON object of manifest keys")]
    out: list[tuple[str, str]] = []
    for key in extra:
        if key in _TOP_KEYS and key != "port":
            out.append((key, "is a field of the slot: set it there, not in the extra keys"))
    port = extra.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    ):
        out.append(("port", "must be an integer between 1 and 65535"))
    for table, known in (("model", _MODEL_KEYS), ("limits", _LIMIT_KEYS)):
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

    def walk(value: Any, key: str) -> None:
        if value is None:
            out.append((key, "TOML has no null"))
        elif isinstance(value, float) and not math.isfinite(value):
            out.append((key, "inf and nan cannot be stored"))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")

    walk(extra, "")
    return out


def _sorted_json(value: Any) -> Any:
    """Keys sorted at every level: the writer's order must not depend on the database's JSON."""
    if isinstance(value, dict):
        return {k: _sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_json(v) for v in value]
    return value


# --- files ---------------------------------------------------------------------------------


def load(paths: Iterable[str | Path]) -> list[Manifest]:
    """Every manifest in the given files and directories (``*.toml``, not recursive).

    All files are read before anything is reported, so one run shows every error.
    """
    errors: list[ManifestError] = []
    manifests: list[Manifest] = []
    seen: dict[str, str] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(p.glob("*.toml"))
            if not files:
                errors.append(ManifestError(str(raw), "", "no *.toml files in this directory"))
        elif p.is_file():
            files = [p]
        else:
            errors.append(ManifestError(str(raw), "", "no such file or directory"))
            continue
        for f in files:
            shown = str(f)
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(ManifestError(shown, "", f"cannot read: {exc}"))
                continue
            try:
                m = parse(text, shown)
            except ManifestErrors as exc:
                errors.extend(exc.errors)
                continue
            if m.name in seen:
                if seen[m.name] != shown:  # the same file named twice is harmless
                    errors.append(
                        ManifestError(
                            shown, "name", f"{m.name!r} is also defined in {seen[m.name]}"
                        )
                    )
                continue
            seen[m.name] = shown
            manifests.append(m)
    if errors:
        raise ManifestErrors(errors)
    return manifests


# --- from the database ---------------------------------------------------------------------


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
    return Manifest(
        path=f"{slot.name}.toml",
        name=slot.name,
        url=slot.url,
        kind=slot.kind,
        type=slot.type,
        endpoints=tuple(e for e in OFFERABLE if e in (slot.endpoints or ())),
        device=slot.device,
        enabled=slot.enabled,
        is_default=slot.is_default,
        priority=slot.priority,
        api_key_env=slot.api_key_env,
        default_model=default,
        models=tuple(declared),
        aliases=tuple(aliases),
        max_concurrency=slot.max_concurrency,
        connect_timeout_s=slot.connect_timeout_s,
        first_byte_timeout_s=slot.first_byte_timeout_s,
        idle_timeout_s=slot.idle_timeout_s,
        max_duration_s=slot.max_duration_s,
        extra=_sorted_json(slot.extra or {}),
    )


# --- the writer ----------------------------------------------------------------------------


def dumps(m: Manifest) -> str:
    """Canonical TOML for a manifest: the same manifest always gives the same bytes.

    Raises ``ValueError`` when the slot's extra keys cannot be written (see ``extra_problems``).
    """
    problems = extra_problems(m.extra)
    if problems:
        raise ValueError(
            "; ".join(f"{m.name}: extra{'.' + k if k else ''}: {msg}" for k, msg in problems)
        )
    extra = dict(_sorted_json(m.extra))
    port = extra.pop("port", None)
    doc: dict[str, Any] = {"name": m.name}
    # hal0 itself reads `port`; write the manifest back in that form while it still holds.
    if isinstance(port, int) and m.url == LOCAL_URL.format(port=port):
        doc["port"] = port
    else:
        doc["url"] = m.url
        if port is not None:
            doc["port"] = port
    doc.update(kind=m.kind, type=m.type)
    if m.endpoints:
        doc["endpoints"] = list(m.endpoints)
    doc.update(
        device=m.device,
        enabled=m.enabled,
        default=m.is_default,
        priority=m.priority,
    )
    if m.api_key_env:
        doc["api_key_env"] = m.api_key_env
    model_extra = extra.pop("model", None)
    limits_extra = extra.pop("limits", None)

    model: dict[str, Any] = {}
    if m.default_model is not None:
        model["default"] = m.default_model
    if set(m.models) - {m.default_model}:
        model["models"] = list(m.models)
    if m.aliases:
        model["aliases"] = Inline(m.aliases)
    if isinstance(model_extra, dict):
        model.update(model_extra)
    if model:
        doc["model"] = model

    limits: dict[str, Any] = {}
    for key in _LIMIT_KEYS:
        value = getattr(m, key)
        if value != _LIMIT_DEFAULTS[key]:
            # `5`, not `5.0`, as people write it; the model stores floats either way.
            whole = float(value).is_integer() and abs(value) < 2**53
            limits[key] = int(value) if whole else value
    if isinstance(limits_extra, dict):
        limits.update(limits_extra)
    if limits:
        doc["limits"] = limits
    # Unknown scalars are still written before any table (the emitter groups them), and
    # unknown tables after [model] and [limits].
    doc.update(extra)

    return dumps_table(doc)


# --- applying to the database --------------------------------------------------------------


@dataclass
class ImportReport:
    dry_run: bool = False
    created: list[str] = field(default_factory=list)
    updated: dict[str, list[str]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)

    def lines(self) -> list[str]:
        would = "would " if self.dry_run else ""
        out = [f"{would}create slot {n}" for n in self.created]
        for name, changes in self.updated.items():
            out.append(f"{would}update slot {name}: " + "; ".join(changes))
        out += [f"{would}delete slot {n}" for n in self.deleted]
        out.append(
            f"{len(self.created)} created, {len(self.updated)} updated, "
            f"{len(self.deleted)} deleted, {len(self.unchanged)} unchanged"
            + (" (dry run: nothing was changed)" if self.dry_run else "")
        )
        return out


class _DryRunRollback(Exception):
    pass


def apply(
    manifests: Sequence[Manifest], *, prune: bool = False, dry_run: bool = False
) -> ImportReport:
    """Upsert the slots the manifests declare, in one transaction (sync, ORM).

    Raises ``ManifestErrors`` (and writes nothing) when any slot or model fails validation.
    A dry run does every write, validation and constraint check, then rolls back.
    """
    report = ImportReport(dry_run=dry_run)
    try:
        with transaction.atomic():
            StateVersion.lock()  # many rows follow: the version's lock first (see lock())
            _apply(manifests, prune, report)
            if dry_run:
                raise _DryRunRollback
    except _DryRunRollback:
        pass
    except IntegrityError as exc:
        # Validation ran first; this is a concurrent writer (the admin, another import)
        # getting in between. The transaction rolled back; say so plainly.
        where = ", ".join(m.path for m in manifests) or "(no files)"
        raise ManifestErrors(
            [
                ManifestError(
                    where, "", f"the database refused the import (concurrent change?): {exc}"
                )
            ]
        ) from exc
    return report


def _apply(manifests: Sequence[Manifest], prune: bool, report: ImportReport) -> None:
    errors: list[ManifestError] = []
    first: dict[str, str] = {}
    for m in manifests:
        if first.setdefault(m.name, m.path) != m.path:
            errors.append(
                ManifestError(m.path, "name", f"{m.name!r} is also defined in {first[m.name]}")
            )
    if errors:
        raise ManifestErrors(errors)
    existing = {s.name: s for s in Slot.objects.select_for_update().order_by("name")}
    wanted = {m.name for m in manifests}
    if prune:
        for name, slot in existing.items():
            if name not in wanted:
                slot.delete()
                report.deleted.append(name)
    # Slots that stop being a default are written before the ones that become one, so the
    # one-default-per-type constraint holds after every single write.
    for m in sorted(manifests, key=lambda m: (m.is_default, m.name)):
        found = existing.get(m.name)
        created = found is None
        slot = Slot(name=m.name) if found is None else found
        changes = _set_fields(slot, m)
        try:
            slot.full_clean()
        except ValidationError as exc:
            errors += _slot_errors(m, exc)
            continue
        if created:
            slot.save()
        elif changes:
            slot.save(update_fields=[c.split(":", 1)[0] for c in changes])
        model_changes = _sync_models(slot, m, errors, created)
        if created:
            report.created.append(m.name)
        elif changes or model_changes:
            report.updated[m.name] = [c.split(":", 1)[1] for c in changes] + model_changes
        else:
            report.unchanged.append(m.name)
    if errors:
        raise ManifestErrors(errors)
    report.created.sort()
    report.updated = dict(sorted(report.updated.items()))


def _set_fields(slot: Slot, m: Manifest) -> list[str]:
    """Set the declared fields; returns ``"field:description"`` for each that changed."""
    changes = []
    for name, new in m.slot_fields().items():
        old = getattr(slot, name)
        if old != new:
            setattr(slot, name, new)
            shown = "changed" if name == "extra" else f"{old!r} → {new!r}"
            changes.append(f"{name}:{_FIELD_KEYS[name]} {shown}")
    return changes


def _slot_errors(m: Manifest, exc: ValidationError) -> list[ManifestError]:
    out = []
    for fld, messages in exc.message_dict.items():
        key = "" if fld == NON_FIELD_ERRORS else _FIELD_KEYS.get(fld, fld)
        if fld == "url" and "url" not in _source_keys(m):
            key = "port"
        for msg in messages:
            out.append(ManifestError(m.path, key, msg))
    return out


def _source_keys(m: Manifest) -> set[str]:
    # The URL came from `port` when the manifest has a port and the URL is the local one.
    port = m.extra.get("port")
    if isinstance(port, int) and m.url == LOCAL_URL.format(port=port):
        return {"port"}
    return {"url"}


def _sync_models(slot: Slot, m: Manifest, errors: list[ManifestError], created: bool) -> list[str]:
    """Make the slot's declared models and aliases those of the manifest.

    Discovered rows belong to the watcher and survive; a declared model the watcher had
    already discovered becomes declared (same row). Returns a description of each change.
    """
    want: dict[str, _Want] = {}
    for mid in m.models:
        want[mid] = _Want(mid, mid, ModelSource.MANIFEST, mid == m.default_model)
    for alias, target in m.aliases:
        want[alias] = _Want(alias, target, ModelSource.ALIAS, False)

    rows = {} if created else {r.model_id: r for r in slot.models.all()}
    has_declared_default = m.default_model is not None
    changes: list[str] = []
    # The default flag of every row that stays, decided before anything is written.
    final_default: dict[str, bool] = {}
    for mid, row in rows.items():
        if mid in want:
            final_default[mid] = want[mid].is_default
        elif row.source == ModelSource.DISCOVERED:
            final_default[mid] = row.is_default and not has_declared_default
    if not any(final_default.values()) and not has_declared_default:
        # No declared default: the first discovered model serves requests that name the slot.
        discovered = sorted(mid for mid in final_default if mid not in want)
        if discovered:
            final_default[discovered[0]] = True

    # Rows losing the default flag (or leaving) go first: at most one default per slot,
    # after every write.
    for mid, row in rows.items():
        if row.is_default and not final_default.get(mid, False):
            if mid in final_default:
                row.is_default = False
                row.save(update_fields=["is_default"])
            else:
                row.delete()
    for mid, row in rows.items():
        if mid not in final_default and row.pk is not None:
            row.delete()
        if mid not in final_default:
            changes.append(f"{_label(row.source)} {mid} removed")

    for mid, w in want.items():
        known = rows.get(mid)
        if known is None:
            row = SlotModel(slot=slot, model_id=mid)
            what = "added"
        else:
            row = known
            before = (row.upstream_model, row.source, row.is_default)
            if before == (w.upstream, w.source, w.is_default):
                continue
            what = (
                f"declared (was {row.source})"
                if row.source != w.source
                else ("now the default" if w.is_default else "changed")
            )
        row.upstream_model, row.source, row.is_default = w.upstream, w.source, w.is_default
        try:
            row.full_clean(exclude=["slot"])
        except ValidationError as exc:
            for msgs in exc.message_dict.values():
                errors.extend(ManifestError(m.path, _want_key(w), msg) for msg in msgs)
            continue
        row.save()
        if what == "changed" and w.source == ModelSource.ALIAS:
            what = f"now → {w.upstream}"
        changes.append(f"{_label(w.source)} {mid} {what}")

    for mid, row in rows.items():
        if mid not in want and mid in final_default and row.is_default != final_default[mid]:
            row.is_default = final_default[mid]
            row.save(update_fields=["is_default"])
            if row.is_default:
                changes.append(f"discovered model {mid} now the default")
    return changes


def _label(source: str) -> str:
    return {"alias": "alias", "discovered": "discovered model"}.get(source, "model")
