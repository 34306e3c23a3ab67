"""Applying manifests to the database: upsert the slots they declare, in one transaction.

``apply()`` validates through the models' ``full_clean()`` (the same rules the admin uses) and
writes everything in one transaction: one bad manifest imports nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import IntegrityError, transaction

from dispatch.manifests.shape import (
    FIELD_KEYS,
    LOCAL_URL,
    Manifest,
    ManifestError,
    ManifestErrors,
    Want,
    want_key,
)
from dispatch.models import ModelSource, Slot, SlotModel, StateVersion


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
        _apply_one(m, existing.get(m.name), errors, report)
    if errors:
        raise ManifestErrors(errors)
    report.created.sort()
    report.updated = dict(sorted(report.updated.items()))


def _apply_one(
    m: Manifest, found: Slot | None, errors: list[ManifestError], report: ImportReport
) -> None:
    created = found is None
    slot = Slot(name=m.name) if found is None else found
    changes = _set_fields(slot, m)
    try:
        slot.full_clean()
    except ValidationError as exc:
        errors += _slot_errors(m, exc)
        return
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


def _set_fields(slot: Slot, m: Manifest) -> list[str]:
    """Set the declared fields; returns ``"field:description"`` for each that changed."""
    changes = []
    for name, new in m.slot_fields().items():
        old = getattr(slot, name)
        if old != new:
            setattr(slot, name, new)
            shown = "changed" if name == "extra" else f"{old!r} → {new!r}"
            changes.append(f"{name}:{FIELD_KEYS[name]} {shown}")
    return changes


def _slot_errors(m: Manifest, exc: ValidationError) -> list[ManifestError]:
    out = []
    for fld, messages in exc.message_dict.items():
        key = "" if fld == NON_FIELD_ERRORS else FIELD_KEYS.get(fld, fld)
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
    want: dict[str, Want] = {}
    for mid in m.models:
        want[mid] = Want(mid, mid, ModelSource.MANIFEST, mid == m.default_model)
    for alias, target in m.aliases:
        want[alias] = Want(alias, target, ModelSource.ALIAS, False)
    rows = {} if created else {r.model_id: r for r in slot.models.all()}
    final_default = _final_defaults(rows, want, m.default_model is not None)
    changes = _drop_rows(rows, final_default)
    changes += _write_wanted(slot, m, rows, want, errors)
    changes += _move_discovered_default(rows, want, final_default)
    return changes


def _final_defaults(
    rows: dict[str, SlotModel], want: dict[str, Want], has_declared_default: bool
) -> dict[str, bool]:
    """The default flag of every row that stays, decided before anything is written."""
    final: dict[str, bool] = {}
    for mid, row in rows.items():
        if mid in want:
            final[mid] = want[mid].is_default
        elif row.source == ModelSource.DISCOVERED:
            final[mid] = row.is_default and not has_declared_default
    if not any(final.values()) and not has_declared_default:
        # No declared default: the first discovered model serves requests that name the slot.
        discovered = sorted(mid for mid in final if mid not in want)
        if discovered:
            final[discovered[0]] = True
    return final


def _drop_rows(rows: dict[str, SlotModel], final_default: dict[str, bool]) -> list[str]:
    """Delete the rows that leave, and unflag the default that moves."""
    changes: list[str] = []
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
    return changes


def _write_wanted(
    slot: Slot,
    m: Manifest,
    rows: dict[str, SlotModel],
    want: dict[str, Want],
    errors: list[ManifestError],
) -> list[str]:
    """Add or change the rows the manifest declares."""
    changes: list[str] = []
    for mid, w in want.items():
        known = rows.get(mid)
        if known is None:
            row, what = SlotModel(slot=slot, model_id=mid), "added"
        elif (known.upstream_model, known.source, known.is_default) == (
            w.upstream,
            w.source,
            w.is_default,
        ):
            continue
        else:
            row, what = known, _what_changed(known, w)
        row.upstream_model, row.source, row.is_default = w.upstream, w.source, w.is_default
        try:
            row.full_clean(exclude=["slot"])
        except ValidationError as exc:
            for msgs in exc.message_dict.values():
                errors.extend(ManifestError(m.path, want_key(w), msg) for msg in msgs)
            continue
        row.save()
        if what == "changed" and w.source == ModelSource.ALIAS:
            what = f"now → {w.upstream}"
        changes.append(f"{_label(w.source)} {mid} {what}")
    return changes


def _what_changed(row: SlotModel, w: Want) -> str:
    if row.source != w.source:
        return f"declared (was {row.source})"
    return "now the default" if w.is_default else "changed"


def _move_discovered_default(
    rows: dict[str, SlotModel], want: dict[str, Want], final_default: dict[str, bool]
) -> list[str]:
    """Flag the discovered model that becomes the default (now that no other row is)."""
    changes: list[str] = []
    for mid, row in rows.items():
        if mid not in want and mid in final_default and row.is_default != final_default[mid]:
            row.is_default = final_default[mid]
            row.save(update_fields=["is_default"])
            if row.is_default:
                changes.append(f"discovered model {mid} now the default")
    return changes


def _label(source: str) -> str:
    return {"alias": "alias", "discovered": "discovered model"}.get(source, "model")
