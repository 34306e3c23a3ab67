"""The admin: slots with their models inline (``dispatch.admin_models``: the models' side,
their load state, and loading, unloading and pinning them), the API keys, the request log.

Every change goes through ``save()`` (never ``queryset.update()``) so the model signals fire
and the routing table and the live UI follow. Validation is the models' own ``clean()``, plus
the one rule that spans several rows: a slot's default model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from dispatch.admin_models import SlotModelInline, control_each, shared_models, slot_loads
from dispatch.coordination.store import speaks_of
from dispatch.lib import redact
from dispatch.lifecycle import control
from dispatch.manifests.export import extra_problems
from dispatch.models import ApiKey, RequestLog, Slot
from dispatch.routing import speaks, states
from dispatch.routing.endpoints import DEFAULT_ENDPOINTS, OFFERABLE, spoken_in
from dispatch.routing.scopes import split_patterns
from dispatch.wire.protocols import OLLAMA

# Where a slot's native endpoints come from (dispatch.routing.speaks.source), in words.
_FROM = {
    speaks.DECLARED: "listed",
    speaks.DISCOVERED: "its server, asked",
    speaks.ASSUMED: "its kind's, not asked yet",
}

# The states an operator may set by hand (see dispatch/routing/states.py): draining a slot, and
# ending that (back to `unknown`: the watcher probes it afresh).
OPERATOR_STATES = (states.DRAINING, states.UNKNOWN)


class SlotForm(forms.ModelForm):
    # The state itself is shown read-only: the watcher owns it, and a form loaded a minute ago
    # must not write back the state it showed then. The operator asks for a change instead.
    set_state = forms.ChoiceField(
        label="Set state",
        required=False,
        choices=[
            ("", "(leave as it is)"),
            (states.DRAINING, "draining: finish what is in flight, take nothing new"),
            (states.UNKNOWN, "unknown: end draining, let the watcher probe it afresh"),
        ],
    )

    endpoints = forms.MultipleChoiceField(
        required=False,
        choices=[(e, e) for e in OFFERABLE],
        widget=forms.CheckboxSelectMultiple,
        help_text="The endpoints this slot's server speaks natively. None ticked: what asking "
        "the server finds, else what its kind speaks for its type ("
        + "; ".join(f"{t}: {', '.join(sorted(e))}" for t, e in DEFAULT_ENDPOINTS.items())
        + "), and on an Ollama server Ollama's own API as well ("
        + ", ".join(sorted(spoken_in(OLLAMA, "llm") | spoken_in(OLLAMA, "embedding")))
        + "). Tick those only for a server that speaks Ollama's API itself: any other slot "
        "serves them by translation. hal0web translates others to them where it can.",
    )

    class Meta:
        model = Slot
        exclude = ("state", "state_changed_at", "last_error", "drift")

    def clean_endpoints(self) -> list[str]:
        chosen = set(self.cleaned_data.get("endpoints") or ())
        return [e for e in OFFERABLE if e in chosen]  # the manifest's order

    def clean_extra(self) -> Any:
        extra = self.cleaned_data.get("extra")
        if extra is None:  # the field left empty: no extra keys
            return {}
        problems = extra_problems(extra)
        if problems:
            raise forms.ValidationError([f"{k}: {msg}" if k else msg for k, msg in problems])
        return extra

    def clean_set_state(self) -> str:
        new: str = self.cleaned_data.get("set_state") or ""
        current = self.instance.state if self.instance.pk else states.UNKNOWN
        if not new or new == current:
            return ""
        if new not in OPERATOR_STATES:
            raise forms.ValidationError("only draining or unknown can be set by hand")
        try:
            states.check(current, new)
        except states.IllegalTransition as exc:
            raise forms.ValidationError(str(exc)) from exc
        return new


@admin.action(description="Enable selected slots")
def enable_slots(modeladmin: SlotAdmin, request: HttpRequest, queryset: QuerySet[Slot]) -> None:
    _set_enabled(modeladmin, request, queryset, True)


@admin.action(description="Disable selected slots")
def disable_slots(modeladmin: SlotAdmin, request: HttpRequest, queryset: QuerySet[Slot]) -> None:
    _set_enabled(modeladmin, request, queryset, False)


def _set_enabled(
    modeladmin: SlotAdmin, request: HttpRequest, queryset: QuerySet[Slot], enabled: bool
) -> None:
    changed = 0
    for slot in queryset:
        if slot.enabled != enabled:
            slot.enabled = enabled
            slot.save(update_fields=["enabled"])  # per object: the signals must fire
            changed += 1
    verb = "enabled" if enabled else "disabled"
    modeladmin.message_user(request, f"{changed} slot(s) {verb}.", messages.SUCCESS)


def _control_each(
    modeladmin: SlotAdmin,
    request: HttpRequest,
    queryset: QuerySet[Slot],
    act: Callable[[str], None],
    done: str,
) -> None:
    """``act`` (one of ``dispatch.lifecycle.control``'s) on each selected slot, by name."""
    control_each(modeladmin, request, queryset, lambda slot: act(slot.name), f"slot(s) {done}")


@admin.action(description="Drain selected slots (finish in-flight requests, take no new ones)")
def drain_slots(modeladmin: SlotAdmin, request: HttpRequest, queryset: QuerySet[Slot]) -> None:
    _control_each(modeladmin, request, queryset, control.drain, states.DRAINING)


@admin.action(description="Undrain selected slots (take requests again)")
def undrain_slots(modeladmin: SlotAdmin, request: HttpRequest, queryset: QuerySet[Slot]) -> None:
    _control_each(modeladmin, request, queryset, control.undrain, "taking requests again")


@admin.register(Slot)
class SlotAdmin(admin.ModelAdmin):
    form = SlotForm
    inlines = [SlotModelInline]
    actions = [enable_slots, disable_slots, drain_slots, undrain_slots]
    list_display = (
        "name",
        "shown_url",
        "type",
        "endpoints_display",
        "state",
        "default_model_id",
        "model_count",
        "loads",
        "shared",
        "enabled",
        "is_default",
    )
    list_filter = ("type", "kind", "state", "enabled")
    search_fields = ("name", "url", "models__model_id")

    @admin.display(description="URL", ordering="url")
    def shown_url(self, obj: Slot) -> str:
        # A list is glanced at, shared on screens and screenshots: no credentials in it.
        return redact.masked(obj.url)

    readonly_fields = (
        "state",
        "state_changed_at",
        "last_error",
        "drift_display",
        "loads_models",
        "model_limit",
        "endpoints_display",
        "spoken_display",
    )
    fieldsets = (
        (None, {"fields": ("name", "url", "kind", "type", "device", "enabled", "is_default")}),
        ("Routing", {"fields": ("endpoints", "priority", "api_key_env")}),
        (
            "Limits",
            {
                "fields": (
                    "max_concurrency",
                    "connect_timeout_s",
                    "first_byte_timeout_s",
                    "idle_timeout_s",
                    "max_duration_s",
                    "unload_idle_s",
                )
            },
        ),
        (
            "Runtime",
            {
                "fields": (
                    "state",
                    "set_state",
                    "state_changed_at",
                    "last_error",
                    "drift_display",
                    "loads_models",
                    "model_limit",
                    "endpoints_display",
                    "spoken_display",
                )
            },
        ),
        (
            "hal0 manifest keys",
            {
                "classes": ("collapse",),
                "fields": ("extra",),
                "description": "Manifest keys hal0web does not use, written back on export.",
            },
        ),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Slot]:
        qs = super().get_queryset(request)
        return qs.prefetch_related("models").annotate(n_models=Count("models", distinct=True))

    def get_form(
        self, request: HttpRequest, obj: Slot | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm[Slot]]:
        form = super().get_form(request, obj, change, **kwargs)
        # Where the limit holds depends on the deployment: say which, where it is set.
        field = form.base_fields.get("max_concurrency")
        if field is not None:
            field.help_text = (
                "0 = unlimited. Holds across all server processes (kept in Redis)."
                if settings.REDIS_URL
                else "0 = unlimited. Holds per server process: without Redis (REDIS_URL) "
                "each process admits this many."
            )
        return form

    @admin.display(description="default model")
    def default_model_id(self, obj: Slot) -> str:
        m = obj.default_model
        return m.model_id if m else "-"

    @admin.display(description="serves")
    def endpoints_display(self, obj: Slot) -> str:
        """Every endpoint it serves, natively or translated ("messages · translated"), and
        where what it speaks natively comes from."""
        native, found = speaks_of(obj)
        served = speaks.shown(native) or "nothing"
        return f"{served} ({_FROM[speaks.source(bool(obj.endpoints), found)]})"

    @admin.display(description="what its server speaks")
    def spoken_display(self, obj: Slot) -> str:
        """What asking the server found, for its present kind, type and URL."""
        _, found = speaks_of(obj)
        if not found:
            return "not asked yet (asked each time it becomes ready)"
        return ", ".join(f"{e}: {'yes' if yes else 'no'}" for e, yes in found.items())

    @admin.display(description="models", ordering="n_models")
    def model_count(self, obj: Slot) -> int:
        return int(getattr(obj, "n_models", obj.models.count()))

    @admin.display(description="load state")
    def loads(self, obj: Slot) -> str:
        return slot_loads(obj)

    @admin.display(description="shared models")
    def shared(self, obj: Slot) -> str:
        others = shared_models([m.model_id for m in obj.models.all()], obj.pk)
        if not others:
            return "-"
        return format_html_join(
            ", ",
            '<span class="hal0-shared" title="served by more than one slot">{} also on: {}</span>',
            ((mid, ", ".join(names)) for mid, names in sorted(others.items())),
        )

    @admin.display(description="drift")
    def drift_display(self, obj: Slot) -> str:
        if not obj.drift:
            return "none: the server advertises every declared model"
        return format_html(
            "declared but not advertised by the server at its last probe: {}",
            ", ".join(obj.drift),
        )

    def save_model(self, request: HttpRequest, obj: Slot, form: Any, change: bool) -> None:
        asked = form.cleaned_data.get("set_state")
        touched: list[str] = []
        if asked == states.UNKNOWN and obj.state != states.DRAINING:
            # Probed afresh: the watcher's verdict and its error are forgotten.
            obj.state, obj.state_changed_at, obj.last_error = states.UNKNOWN, timezone.now(), ""
            touched = ["state", "state_changed_at", "last_error"]
        if not change:
            obj.save()
        else:
            # Only what the form holds (and an asked-for state): the watcher may have written
            # the runtime fields since this request read the slot, and its writes stand.
            model_fields = {f.name for f in Slot._meta.concrete_fields}
            obj.save(update_fields=[f for f in form.fields if f in model_fields] + touched)
        # Draining and its end through the operator's hands, as the slot actions, `manage.py
        # slots` and the page's buttons: the same row written, whichever asked.
        if asked == states.DRAINING:
            control.drain(obj.name)
        elif asked == states.UNKNOWN and not touched:
            control.undrain(obj.name)


class ApiKeyForm(forms.ModelForm):
    # Typed as text (one pattern per line, or separated by commas), kept as a JSON list.
    allowed_models = forms.CharField(
        label="Models",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text=ApiKey._meta.get_field("allowed_models").help_text,
    )

    class Meta:
        model = ApiKey
        fields = ("name", "enabled", "allowed_models", "expires_at")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["allowed_models"] = "\n".join(self.instance.allowed_models or [])

    def clean_allowed_models(self) -> list[str]:
        return split_patterns(self.cleaned_data.get("allowed_models") or "")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are made here and shown once; only their hash is kept."""

    form = ApiKeyForm
    list_display = (
        "name",
        "prefix",
        "enabled",
        "models_shown",
        "expires_at",
        "last_used",
        "created_at",
    )
    list_filter = ("enabled",)
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used")
    actions = ("enable_keys", "disable_keys")

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        return super().get_queryset(request).select_related("use")

    @admin.display(description="models")
    def models_shown(self, obj: ApiKey) -> str:
        return ", ".join(obj.allowed_models or []) or "all"

    @admin.display(description="last used (within 30 s)")
    def last_used(self, obj: ApiKey) -> Any:
        use = getattr(obj, "use", None)
        return use.last_used_at if use is not None else "never"

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        row, key = ApiKey.issue(obj.name, obj.allowed_models, obj.expires_at)
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = (
            row.pk,
            row.prefix,
            row.key_hash,
            row.created_at,
        )
        if not form.cleaned_data.get("enabled", True):
            row.enabled = False
            row.save(update_fields=["enabled"])
        messages.warning(
            request,
            format_html(
                "The new key is <code>{}</code>. Copy it now: it is not stored and will not be "
                "shown again.",
                key,
            ),
        )

    @admin.action(description="Enable selected keys")
    def enable_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            key.enabled = True
            key.save(update_fields=["enabled"])

    @admin.action(description="Disable selected keys")
    def disable_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            key.enabled = False
            key.save(update_fields=["enabled"])


@admin.register(RequestLog)
class RequestLogAdmin(admin.ModelAdmin):
    """Read-only: the rows are what happened; the request-log writer alone makes them."""

    list_display = (
        "at",
        "request_id",
        "client",
        "endpoint",
        "model",
        "slot",
        "mode",
        "status",
        "error",
        "duration_ms",
        "ttft_ms",
        "completion_tokens",
        "why",
    )
    list_filter = (
        "slot",
        "model",
        "status",
        "client",
        "endpoint",
        "mode",
        ("at", admin.DateFieldListFilter),
    )
    # Exact request ids (what a client's X-Request-Id header says), no LIKE scan of a big table.
    search_fields = ("=request_id",)
    search_help_text = "Search by request id (the X-Request-Id header)."
    date_hierarchy = "at"
    show_full_result_count = False  # a COUNT(*) over millions of rows on every page: no

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
