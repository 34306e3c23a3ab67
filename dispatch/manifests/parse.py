"""Reading manifests: TOML text (or files) into ``Manifest``s, every error named by file and key.

``parse()`` checks what it can without the database: TOML types, the models' own field rules
(through ``clean_fields``), alias rules. Rules that need the database (unique names, one
default slot per type) run in ``dispatch.manifests.apply``.

Keys hal0 uses that we do not model (``runtime``, ``profile``, ``[server]``, ``[model]
context_size`` …) are kept verbatim in ``Manifest.extra``: top-level ones at the top level,
unknown keys of ``[model]`` and ``[limits]`` under ``extra["model"]`` and ``extra["limits"]``
(those two names can never be unknown top-level keys, so nothing collides).
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

from django.core.exceptions import ValidationError

from dispatch.manifests.shape import (
    FIELD_KEYS,
    LIMIT_KEYS,
    LOCAL_URL,
    MODEL_KEYS,
    TOP_KEYS,
    Manifest,
    ManifestError,
    ManifestErrors,
    Want,
    sorted_json,
    want_key,
)
from dispatch.models import ModelSource, Slot, SlotModel
from dispatch.routing import slot_fields
from dispatch.routing.endpoints import OFFERABLE

# Limits where 0 means "off" rather than an impossible timeout.
_ZERO_IS_OFF = frozenset({"max_duration_s"})
# The slot's plain top-level keys: read as their type, checked by the model's field rules.
_PLAIN_TOP = tuple(
    f for f in slot_fields.MANIFEST_TOP if f.name not in ("name", "url") and f.type is not tuple
)
_TOML_POS = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")


class _Collector:
    """Collects the field errors of one file instead of stopping at the first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[ManifestError] = []

    def add(self, key: str, message: str) -> None:
        self.errors.append(ManifestError(self.path, key, message))

    def sorted(self) -> list[ManifestError]:
        """In the order a reader meets the keys in a manifest (stable within a key)."""
        order = {k: i for i, k in enumerate((*TOP_KEYS, "model", "limits"))}
        return sorted(
            self.errors, key=lambda e: order.get(re.split(r"[.\[]", e.field)[0], len(order))
        )


@dataclass
class _Models:
    """What ``[model]`` declares."""

    default: str | None = None
    listed: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def declared(self) -> list[str]:
        """Every declared model, the default included, sorted."""
        return sorted(set(self.listed) | ({self.default} if self.default is not None else set()))

    def wants(self) -> list[Want]:
        out = [Want(m, m, ModelSource.MANIFEST, m == self.default) for m in self.declared]
        return out + [Want(a, t, ModelSource.ALIAS, False) for a, t in self.aliases.items()]


def parse(text: str, path: str) -> Manifest:
    """One manifest from TOML text. Raises ``ManifestErrors`` naming the file and each field."""
    doc = _load_toml(text, path)
    c = _Collector(path)
    extra: dict[str, Any] = {
        k: v for k, v in doc.items() if k not in (*TOP_KEYS, "model", "limits")
    }
    name = _get(c, doc, "name", str, required=True)
    url = _url(c, doc, extra)
    given = _top_values(c, doc)
    declared = _models(c, doc, extra)
    given.update(_limits(c, doc, extra))
    _check_json_safe(c, extra, "")
    url_key = "url" if "url" in doc or "port" not in doc else "port"
    _check_fields(c, {"name": name, "url": url, **given}, url_key, declared.wants())
    if c.errors:
        raise ManifestErrors(c.sorted())
    assert name is not None and url is not None  # both reported above when missing
    return Manifest(
        path=path,
        name=name,
        url=url,
        default_model=declared.default,
        models=tuple(declared.declared),
        aliases=tuple(sorted(declared.aliases.items())),
        extra=sorted_json(extra),
        **given,
    )


def _load_toml(text: str, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS.match(str(exc))
        if m:
            err = ManifestError(
                path, "", f"invalid TOML: {m['msg']}", int(m["line"]), int(m["col"])
            )
        else:
            err = ManifestError(path, "", f"invalid TOML: {exc}")
        raise ManifestErrors([err]) from exc


def _url(c: _Collector, doc: Mapping[str, Any], extra: dict[str, Any]) -> str | None:
    """The slot's URL: `url`, or hal0's own `port` (kept verbatim in extra) when none is given."""
    url: str | None = _get(c, doc, "url", str)
    port = doc.get("port")
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            c.add("port", "must be an integer between 1 and 65535")
        else:
            extra["port"] = port
            if url is None:
                url = LOCAL_URL.format(port=port)
    if url is None and "port" not in doc:
        c.add("url", "required (or `port`, meaning http://127.0.0.1:PORT/v1)")
    return url


def _top_values(c: _Collector, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The slot's other top-level fields that are given (and of the right type)."""
    values = {f.name: _get(c, doc, slot_fields.manifest_key(f), f.type) for f in _PLAIN_TOP}
    listed = _get(c, doc, "endpoints", list)
    if listed is not None:
        values["endpoints"] = _endpoints(c, listed)
    return {k: v for k, v in values.items() if v is not None}


def _models(c: _Collector, doc: Mapping[str, Any], extra: dict[str, Any]) -> _Models:
    out = _Models()
    tbl = _table(c, doc, "model")
    if tbl is not None:
        model_extra = {k: v for k, v in tbl.items() if k not in MODEL_KEYS}
        if model_extra:
            extra["model"] = model_extra
        out.default = _get(c, tbl, "default", str, key="model.default")
        listed = _get(c, tbl, "models", list, key="model.models")
        for i, item in enumerate(listed or []):
            if isinstance(item, str):
                out.listed.append(item)
            else:
                c.add(f"model.models[{i}]", f"must be a string, not {_toml_type(item)}")
        raw_aliases = _get(c, tbl, "aliases", dict, key="model.aliases")
        for alias, target in (raw_aliases or {}).items():
            if isinstance(target, str):
                out.aliases[alias] = target
            else:
                c.add(f"model.aliases.{alias}", f"must be a string, not {_toml_type(target)}")
    if out.listed and out.default is None:
        c.add("model.default", "required when model.models is given")
    for alias in out.aliases:
        if alias in out.declared:
            c.add(f"model.aliases.{alias}", "is also a declared model")
    return out


def _limits(c: _Collector, doc: Mapping[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    tbl = _table(c, doc, "limits")
    if tbl is None:
        return limits
    limits_extra = {k: v for k, v in tbl.items() if k not in LIMIT_KEYS}
    if limits_extra:
        extra["limits"] = limits_extra
    for f in slot_fields.MANIFEST_LIMITS:
        name = slot_fields.manifest_key(f)
        key = f"limits.{name}"
        value = _get(c, tbl, name, f.type, key=key)
        if value is None:
            continue
        problem = _limit_problem(f.name, f.type, value)
        if problem:
            c.add(key, problem)
        limits[f.name] = value if f.type is int else float(value)
    return limits


def _limit_problem(name: str, kind: type, value: float) -> str | None:
    if kind is int:
        return "must be >= 0 (0 = unlimited)" if value < 0 else None
    if name in _ZERO_IS_OFF:
        ok = math.isfinite(value) and value >= 0
        return None if ok else "must be a finite number >= 0 (0 = off)"
    return None if math.isfinite(value) and value > 0 else "must be a finite number > 0"


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
    c: _Collector, fields: dict[str, Any], url_key: str, wants: Sequence[Want]
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
            key = url_key if fld == "url" else FIELD_KEYS.get(fld, fld)
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
            key = want_key(w)
            for messages in exc.message_dict.values():
                for msg in messages:
                    c.add(
                        key,
                        f"{w.model_id!r}: {msg}" if key != f"model.aliases.{w.model_id}" else msg,
                    )


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


def load(paths: Iterable[str | Path]) -> list[Manifest]:
    """Every manifest in the given files and directories (``*.toml``, not recursive).

    All files are read before anything is reported, so one run shows every error.
    """
    errors: list[ManifestError] = []
    manifests: list[Manifest] = []
    seen: dict[str, str] = {}
    for raw in paths:
        for f in _files(raw, errors):
            m = _read(f, errors)
            if m is None:
                continue
            if m.name in seen:
                if seen[m.name] != m.path:  # the same file named twice is harmless
                    errors.append(
                        ManifestError(
                            m.path, "name", f"{m.name!r} is also defined in {seen[m.name]}"
                        )
                    )
                continue
            seen[m.name] = m.path
            manifests.append(m)
    if errors:
        raise ManifestErrors(errors)
    return manifests


def _files(raw: str | Path, errors: list[ManifestError]) -> list[Path]:
    """The file named, or the ``*.toml`` files of the directory named."""
    p = Path(raw)
    if p.is_dir():
        files = sorted(p.glob("*.toml"))
        if not files:
            errors.append(ManifestError(str(raw), "", "no *.toml files in this directory"))
        return files
    if p.is_file():
        return [p]
    errors.append(ManifestError(str(raw), "", "no such file or directory"))
    return []


def _read(f: Path, errors: list[ManifestError]) -> Manifest | None:
    shown = str(f)
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(ManifestError(shown, "", f"cannot read: {exc}"))
        return None
    try:
        return parse(text, shown)
    except ManifestErrors as exc:
        errors.extend(exc.errors)
        return None
