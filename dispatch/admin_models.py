"""The admin's side of a slot's models: the inline on the slot's page, the models' own list,
their load state, and the operator's hands on them (load, unload, pin, unpin).

Every ask goes through ``dispatch.lifecycle.control``, as ``manage.py slots`` and the page's
staff buttons do: a pin holds for every row that names the same model on the server (an
alias is that model), and a refusal is shown in the control's own words.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest

from dispatch.lib import redact
from dispatch.lifecycle import control
from dispatch.models import ModelSource, Slot, SlotModel
from dispatch.routing import patterns, states

T = TypeVar("T")

PATTERN_HELP = (
    "The id clients send. An alias may be a pattern (claude-haiku-*, with *, ? or [...], "
    "case sensitive): every name it matches that no exact id or alias claims, the most "
    "specific pattern first."
)


def shared_models(model_ids: Iterable[str], exclude_slot_id: int | None) -> dict[str, list[str]]:
    """For each of ``model_ids``: the other slots that serve it too (sorted names)."""
    rows = SlotModel.objects.filter(model_id__in=list(model_ids))
    if exclude_slot_id is not None:
        rows = rows.exclude(slot_id=exclude_slot_id)
    pairs = rows.values_list("model_id", "slot__name")
    out: dict[str, list[str]] = defaultdict(list)
    for model_id, slot_name in pairs:
        out[model_id].append(slot_name)
    return {k: sorted(v) for k, v in out.items()}


def load_shown(obj: SlotModel) -> str:
    """Its load state in words (``loading 40 %``, ``failed: <why>``), and an ask the leading
    process's loader has not acted on yet. An alias shows what it stands for."""
    if obj.source == ModelSource.ALIAS:
        if patterns.is_pattern(obj.model_id):
            return f"pattern: every name it matches, as {obj.upstream_model}"
        return f"as {obj.upstream_model}"
    error = redact.masked(obj.load_error)
    shown = states.load_words(obj.load_state, obj.load_progress, error)
    return f"{shown} (asked: {obj.wanted})" if obj.wanted else shown


def slot_loads(slot: Slot) -> str:
    """A slot's models (those its server knows: an alias is one of them) with their load
    states, and how many it keeps loaded at most."""
    shown = [
        f"{m.model_id}: {load_shown(m)}" for m in slot.models.all() if m.source != ModelSource.ALIAS
    ]
    limit = f" (at most {slot.model_limit} loaded)" if slot.model_limit else ""
    return "; ".join(shown) + limit if shown else "-"


def pin_as_control_does(slot_name: str, rows: Iterable[SlotModel]) -> None:
    """After a form saved ``pinned`` on these rows: the same for every row of their models."""
    for row in rows:
        control.pin(slot_name, row.model_id, row.pinned)


class SlotModelFormSet(BaseInlineFormSet):
    def clean(self) -> None:
        super().clean()
        defaults, non_alias = [], 0
        for form in self.forms:
            data = getattr(form, "cleaned_data", None)
            if not data or data.get("DELETE") or not data.get("model_id"):
                continue
            if data.get("source") != ModelSource.ALIAS:
                non_alias += 1
            if data.get("is_default"):
                defaults.append(data["model_id"])
        if len(defaults) > 1:
            raise forms.ValidationError(
                f"a slot has one default model; {', '.join(defaults)} are all marked default"
            )
        if non_alias and not defaults:
            raise forms.ValidationError("mark one of the slot's models as its default")

    def save(self, commit: bool = True) -> Any:
        saved = super().save(commit)
        if commit:
            pinned = [
                f.instance
                for f in self.forms
                if "pinned" in f.changed_data and f.instance.pk and f not in self.deleted_forms
            ]
            pin_as_control_does(self.instance.name, pinned)
        return saved


class PatternHelp:
    """The model id's help says an alias may be a pattern (here, not on the model field: a
    help text there is a migration)."""

    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        field = super().formfield_for_dbfield(db_field, request, **kwargs)  # type: ignore[misc]
        if db_field.name == "model_id" and field is not None:
            field.help_text = PATTERN_HELP
        return field


class SlotModelInline(PatternHelp, admin.TabularInline):
    model = SlotModel
    formset = SlotModelFormSet
    extra = 0
    fields = ("model_id", "upstream_model", "source", "is_default", "pinned", "load", "also_on")
    readonly_fields = ("load", "also_on")

    @admin.display(description="load state")
    def load(self, obj: SlotModel) -> str:
        return load_shown(obj) if obj.pk else ""

    @admin.display(description="also on")
    def also_on(self, obj: SlotModel) -> str:
        if not obj.pk:
            return ""
        others = shared_models([obj.model_id], obj.slot_id).get(obj.model_id, [])
        return ", ".join(others) or "-"


def control_each(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    rows: Iterable[T],
    act: Callable[[T], None],
    done: str,
) -> None:
    """``act`` (through ``dispatch.lifecycle.control``) on each selected row, slot or model:
    one message for those done, one per refusal, in the control's words."""
    ok = 0
    for row in rows:
        try:
            act(row)
        except control.ControlError as exc:
            modeladmin.message_user(request, f"Not done for {row}: {exc}", messages.ERROR)
        else:
            ok += 1
    if ok:
        modeladmin.message_user(request, f"{ok} {done}.", messages.SUCCESS)


def _each(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[SlotModel],
    act: Callable[[SlotModel], None],
    done: str,
) -> None:
    control_each(modeladmin, request, queryset.select_related("slot"), act, f"model(s) {done}")


@admin.action(description="Load selected models")
def load_models(modeladmin: Any, request: HttpRequest, queryset: QuerySet[SlotModel]) -> None:
    _each(
        modeladmin,
        request,
        queryset,
        lambda m: control.ask(m.slot.name, m.model_id, control.LOAD),
        "asked to load",
    )


@admin.action(description="Unload selected models")
def unload_models(modeladmin: Any, request: HttpRequest, queryset: QuerySet[SlotModel]) -> None:
    _each(
        modeladmin,
        request,
        queryset,
        lambda m: control.ask(m.slot.name, m.model_id, control.UNLOAD),
        "asked to unload",
    )


@admin.action(description="Pin selected models (never unloaded by hal0web)")
def pin_models(modeladmin: Any, request: HttpRequest, queryset: QuerySet[SlotModel]) -> None:
    _each(modeladmin, request, queryset, lambda m: control.pin(m.slot.name, m.model_id), "pinned")


@admin.action(description="Unpin selected models")
def unpin_models(modeladmin: Any, request: HttpRequest, queryset: QuerySet[SlotModel]) -> None:
    _each(
        modeladmin,
        request,
        queryset,
        lambda m: control.pin(m.slot.name, m.model_id, False),
        "unpinned",
    )


@admin.register(SlotModel)
class SlotModelAdmin(PatternHelp, admin.ModelAdmin):
    list_display = (
        "model_id",
        "slot",
        "upstream_model",
        "source",
        "is_default",
        "load",
        "pinned",
        "also_on",
    )
    list_filter = ("source", "load_state", "pinned", "slot")
    search_fields = ("model_id", "upstream_model", "slot__name")
    list_select_related = ("slot",)
    actions = [load_models, unload_models, pin_models, unpin_models]

    @admin.display(description="load state", ordering="load_state")
    def load(self, obj: SlotModel) -> str:
        return load_shown(obj)

    @admin.display(description="also on")
    def also_on(self, obj: SlotModel) -> str:
        return ", ".join(shared_models([obj.model_id], obj.slot_id).get(obj.model_id, [])) or "-"

    def save_model(self, request: HttpRequest, obj: SlotModel, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if "pinned" in form.changed_data:
            pin_as_control_does(obj.slot.name, [obj])
