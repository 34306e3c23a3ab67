"""Slots (upstream model servers) and the models each one serves.

Validation lives in ``clean()`` so the admin, the manifest importer and the tests share it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from dispatch import kinds
from dispatch.routing import endpoints as endpoint_table
from dispatch.routing import patterns
from dispatch.routing.slot_fields import DEFAULTS
from dispatch.routing.states import LOADED, Load, State

SLOT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# The kinds registered in dispatch.kinds, in its order (SlotKind.LLAMACPP, ...).
# Enum's functional form, which django-stubs does not type (it knows only the class form).
SlotKind = models.TextChoices(  # type: ignore[call-overload]
    "SlotKind", [(k.name.upper(), (k.name, k.label)) for k in kinds.REGISTRY.values()]
)


class SlotType(models.TextChoices):
    # hal0's slot types; each one's default endpoints are in dispatch.routing.endpoints.
    LLM = "llm", "LLM"
    EMBEDDING = "embedding", "Embedding"
    RERANKING = "reranking", "Reranking"
    TRANSCRIPTION = "transcription", "Transcription (speech to text)"
    TTS = "tts", "Text to speech"
    IMAGE = "image", "Image"


class ModelSource(models.TextChoices):
    MANIFEST = "manifest", "manifest"
    ALIAS = "alias", "alias"
    DISCOVERED = "discovered", "discovered"


def validate_slot_name(value: str) -> None:
    if not SLOT_NAME_RE.fullmatch(value or ""):
        raise ValidationError(f"must match {SLOT_NAME_RE.pattern}", code="invalid_name")


def validate_upstream_url(value: str) -> None:
    parts = urlsplit(value or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("must be an http:// or https:// URL with a host", code="invalid_url")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ValidationError(f"has a bad port: {exc}", code="invalid_url") from exc
    if parts.query or parts.fragment:
        raise ValidationError("must not carry a query or fragment", code="invalid_url")


def validate_env_name(value: str) -> None:
    if value and not ENV_NAME_RE.fullmatch(value):
        raise ValidationError("must be an environment variable name", code="invalid_env")


def validate_endpoints(value: object) -> None:
    """A slot's `endpoints`: names from dispatch.routing.endpoints.OFFERABLE, or empty (the type's
    defaults)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError("must be a list of endpoint names", code="invalid_endpoints")
    unknown = [v for v in value if v not in endpoint_table.OFFERABLE]
    if unknown:
        raise ValidationError(
            f"unknown endpoint {', '.join(map(repr, unknown))}; known: "
            + ", ".join(endpoint_table.OFFERABLE),
            code="invalid_endpoints",
        )


def validate_model_id(value: str) -> None:
    if not value or value != value.strip() or any(c in value for c in "\r\n\t"):
        raise ValidationError("must be a non-empty id without surrounding spaces", code="invalid")
    if len(value) > 255:
        raise ValidationError("must be at most 255 characters", code="invalid")


class Slot(models.Model):
    # Every field is declared in dispatch.routing.slot_fields (with the places that carry it);
    # the defaults below are read from there.
    name = models.CharField(max_length=32, unique=True, validators=[validate_slot_name])
    url = models.CharField(
        "URL",
        max_length=500,
        validators=[validate_upstream_url],
        help_text="The upstream's OpenAI API root, e.g. http://127.0.0.1:8002/v1",
    )
    kind = models.CharField(max_length=16, choices=SlotKind.choices, default=DEFAULTS["kind"])
    type = models.CharField(max_length=16, choices=SlotType.choices, default=DEFAULTS["type"])
    device = models.CharField(max_length=64, blank=True, default=DEFAULTS["device"])
    enabled = models.BooleanField(default=DEFAULTS["enabled"])
    is_default = models.BooleanField(
        "default",
        default=DEFAULTS["is_default"],
        help_text="Serves requests of this type that name no model.",
    )
    priority = models.IntegerField(
        default=DEFAULTS["priority"],
        help_text="Higher wins when several slots serve the same model.",
    )
    # Nullable: a row inserted by raw SQL (a shell, a script) names no endpoints, which is the
    # type's defaults, as an empty list is.
    endpoints = models.JSONField(
        default=list,
        blank=True,
        null=True,
        validators=[validate_endpoints],
        help_text="The endpoints it serves (chat/completions, responses, rerank, audio/speech, "
        "...); empty: its type's defaults.",
    )
    api_key_env = models.CharField(
        "API key env var",
        max_length=128,
        blank=True,
        default=DEFAULTS["api_key_env"],
        validators=[validate_env_name],
        help_text="Name of the environment variable holding the upstream's key (never the key).",
    )
    max_concurrency = models.PositiveIntegerField(
        default=DEFAULTS["max_concurrency"], help_text="0 = unlimited"
    )
    connect_timeout_s = models.FloatField(default=DEFAULTS["connect_timeout_s"])
    first_byte_timeout_s = models.FloatField(default=DEFAULTS["first_byte_timeout_s"])
    idle_timeout_s = models.FloatField(
        default=DEFAULTS["idle_timeout_s"],
        help_text="The longest silence between two bytes of an answer.",
    )
    max_duration_s = models.FloatField(
        default=DEFAULTS["max_duration_s"],
        help_text="Cap on a whole request once sent to the slot; 0 = no cap.",
    )
    unload_idle_s = models.FloatField(
        "unload idle model after (s)",
        default=DEFAULTS["unload_idle_s"],
        db_default=DEFAULTS["unload_idle_s"],
        help_text="A model no request used for this long is unloaded; 0 = never (hal0's "
        "idle_timeout_s).",
    )
    # The names are dispatch.routing.states'; labelled by themselves.
    state = models.CharField(
        max_length=16, choices=[(s.value, s.value) for s in State], default=DEFAULTS["state"]
    )
    state_changed_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default=DEFAULTS["last_error"])
    # Declared models the server did not advertise at its last probe (drift).
    drift = models.JSONField(default=list, blank=True)
    # What the server says of loading its models (the watcher's, from dispatch.kinds).
    loads_models = models.BooleanField(
        default=DEFAULTS["loads_models"],
        db_default=DEFAULTS["loads_models"],
        editable=False,
        help_text="The server loads and unloads models when asked; hal0web asks for it.",
    )
    model_limit = models.PositiveIntegerField(
        default=DEFAULTS["model_limit"],
        db_default=DEFAULTS["model_limit"],
        editable=False,
        help_text="How many models the server keeps loaded at once; 0 = no limit it tells.",
    )
    # What asking the server found it speaks, and of which kind, type and URL
    # (dispatch.routing.speaks): the watcher's, or a request's that met a missing route.
    # Nullable for the same reason as `endpoints` (raw SQL inserts name none).
    spoken = models.JSONField(
        default=dict,
        blank=True,
        null=True,
        editable=False,
        help_text="What the server was found to speak when asked (endpoint: yes or no).",
    )
    # Out of rotation though its probes pass (dispatch.upstream.outliers, written through
    # dispatch.coordination.ejections): one process's judgement, every process's table.
    ejected_until = models.DateTimeField(null=True, blank=True, editable=False)
    ejected_reason = models.TextField(
        blank=True, default=DEFAULTS["ejected_reason"], db_default="", editable=False
    )
    ejections = models.PositiveIntegerField(
        default=DEFAULTS["ejections"],
        db_default=0,
        editable=False,
        help_text="Ejections in a row without a request that succeeded (the back-off doubles).",
    )
    # Manifest keys hal0 uses that we do not model, kept verbatim for export.
    extra = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-priority", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["type"], condition=Q(is_default=True), name="one_default_slot_per_type"
            ),
            models.CheckConstraint(
                condition=Q(connect_timeout_s__gt=0)
                & Q(first_byte_timeout_s__gt=0)
                & Q(idle_timeout_s__gt=0),
                name="slot_timeouts_positive",
            ),
            models.CheckConstraint(
                condition=Q(max_duration_s__gte=0), name="slot_max_duration_not_negative"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        for field in ("connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s"):
            value = getattr(self, field)
            if value is None or value <= 0:
                errors.setdefault(field, []).append("must be > 0")
        if self.max_duration_s is None or self.max_duration_s < 0:
            errors.setdefault("max_duration_s", []).append("must be >= 0 (0 = no cap)")
        if self.unload_idle_s is None or self.unload_idle_s < 0:
            errors.setdefault("unload_idle_s", []).append("must be >= 0 (0 = never)")
        if self.is_default:
            clash = Slot.objects.filter(type=self.type, is_default=True).exclude(pk=self.pk)
            if clash.exists():
                errors.setdefault("is_default", []).append(
                    f"slot {clash[0].name!r} is already the default {self.type} slot"
                )
        if errors:
            raise ValidationError(errors)

    @property
    def default_model(self) -> SlotModel | None:
        for m in self.models.all():
            if m.is_default:
                return m
        return None


class SlotModel(models.Model):
    slot = models.ForeignKey(Slot, on_delete=models.CASCADE, related_name="models")
    model_id = models.CharField(
        "model id", max_length=255, validators=[validate_model_id], help_text="The id clients send."
    )
    upstream_model = models.CharField(
        max_length=255,
        blank=True,
        default="",
        help_text="What is sent upstream; empty means the same as the model id.",
    )
    source = models.CharField(
        max_length=16, choices=ModelSource.choices, default=ModelSource.MANIFEST
    )
    is_default = models.BooleanField("default", default=False)
    # What the upstream's /models said of the model at the last probe that changed it (less
    # id and object): context_length, capabilities, meta, created, owned_by...
    # Nullable for the same reason as Slot.endpoints (raw SQL inserts name none).
    upstream_fields = models.JSONField(default=dict, blank=True, null=True, editable=False)
    # Its load state (dispatch.routing.states.Load): the watcher's reading of the server, or
    # the loader's since (dispatch.lifecycle.loader); never set by hand.
    # Each with a database default too: a row inserted by raw SQL (a shell, a script) names
    # none of them, as it names no upstream fields.
    load_state = models.CharField(
        max_length=16,
        choices=[(s.value, s.value) for s in Load],
        default=LOADED,
        db_default=LOADED,
        editable=False,
    )
    load_progress = models.FloatField(null=True, blank=True, editable=False)
    load_error = models.TextField(blank=True, default="", db_default="", editable=False)
    last_used_at = models.FloatField(default=0.0, db_default=0.0, editable=False)  # epoch s
    pinned = models.BooleanField(
        default=False,
        db_default=False,
        help_text="Never unloaded by hal0web to make room for another model.",
    )
    # An operator's ask (the admin, the page, `manage.py slots load/unload`) that the leading
    # process's loader has not yet acted on: "load", "unload" or "".
    wanted = models.CharField(max_length=8, blank=True, default="", db_default="", editable=False)

    class Meta:
        ordering = ["slot__name", "-is_default", "model_id"]
        constraints = [
            models.UniqueConstraint(fields=["slot", "model_id"], name="unique_model_per_slot"),
            models.UniqueConstraint(
                fields=["slot"], condition=Q(is_default=True), name="one_default_model_per_slot"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.slot.name}/{self.model_id}" if self.slot_id else self.model_id

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self.upstream_model:
            self.upstream_model = self.model_id
        super().save(*args, **kwargs)

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        if not self.upstream_model:
            self.upstream_model = self.model_id
        if self.source == ModelSource.ALIAS and self.upstream_model == self.model_id:
            errors.setdefault("upstream_model", []).append("an alias must name a different model")
        if self.source != ModelSource.ALIAS and self.upstream_model != self.model_id:
            errors.setdefault("upstream_model", []).append(
                "only an alias may send a different upstream model"
            )
        if self.source == ModelSource.ALIAS and self.is_default:
            errors.setdefault("is_default", []).append("an alias cannot be the slot's default")
        for field, messages in _pattern_errors(self).items():
            errors.setdefault(field, []).extend(messages)
        if errors:
            raise ValidationError(errors)


def _pattern_errors(row: SlotModel) -> dict[str, list[str]]:
    """An id with ``*``, ``?`` or ``[`` is a pattern (dispatch.routing.patterns): only an alias
    may be one, and it must be a usable glob."""
    if not row.model_id or not patterns.is_pattern(row.model_id):
        return {}
    if row.source != ModelSource.ALIAS:
        return {
            "model_id": [
                "is a pattern (it has *, ? or [): only an alias may be one, naming the "
                "model it stands for"
            ]
        }
    problem = patterns.problem(row.model_id)
    if problem is not None:
        return {"model_id": [problem]}
    if patterns.is_pattern(row.upstream_model or ""):
        return {"upstream_model": ["an alias pattern stands for one model, not another pattern"]}
    return {}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def validate_model_patterns(value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValidationError("must be a list of glob patterns", code="invalid")
    for pattern in value:
        if not pattern or pattern != pattern.strip() or len(pattern) > 255:
            raise ValidationError(
                f"{pattern!r} is not a pattern: non-empty, no surrounding spaces, at most 255",
                code="invalid",
            )


class ApiKey(models.Model):
    """A key for the /v1 API. Only its SHA-256 is stored; the key is shown once, on creation.

    Its scope: the models it may use (glob patterns over model ids, aliases and
    ``slot/model`` ids; none = every model) and when it stops working.
    """

    name = models.CharField(max_length=100, unique=True, help_text="Who or what uses this key.")
    prefix = models.CharField(
        max_length=16, editable=False, help_text="The key's first characters."
    )
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    allowed_models = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_model_patterns],
        help_text="Models this key may use: glob patterns such as qwen3-*, primary/*, hermes "
        "(model ids, aliases or slot/model ids). Empty: every model.",
    )
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="The key stops working at this moment. Empty: never."
    )

    class Meta:
        verbose_name = "API key"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(
        cls, name: str, models: list[str] | None = None, expires_at: datetime | None = None
    ) -> tuple[ApiKey, str]:
        """Create a key; returns the row and the plaintext key (the only time it exists)."""
        key = "hal0-" + secrets.token_urlsafe(32)
        row = cls(
            name=name,
            prefix=key[:12],
            key_hash=hash_key(key),
            allowed_models=list(models or []),
            expires_at=expires_at,
        )
        row.full_clean()
        row.save()
        return row, key


class ApiKeyUse(models.Model):
    """When a key was last used: written in batches by each process (``dispatch.observability.keyuse``).

    A table of its own, without the StateVersion trigger: a key's use changes nothing any
    process holds, so recording it must not make every process reload its keys.
    """

    key = models.OneToOneField(ApiKey, on_delete=models.CASCADE, related_name="use")
    last_used_at = models.DateTimeField()


class StateVersion(models.Model):
    """One row: the version of what every process holds in memory (slots, models, API keys).

    Bumped by database triggers (migration 0003) in the same transaction as any change to
    them, whoever makes it and however: the admin, ``slots import``, the watcher, a shell's
    ``save()`` or ``update()``. A process whose copy carries
    another number reloads (``dispatch.coordination.sync``); one that has applied version N routes and
    authorizes exactly as every other process at N.
    """

    ROW = 1
    number = models.BigIntegerField(db_default=0)
    # The watcher's heartbeat, written by the process that leads it (no trigger: the routing
    # does not change). ``probed_at``: every enabled slot was probed since then.
    probed_at = models.DateTimeField(null=True, blank=True)
    watcher = models.CharField(
        max_length=200, blank=True, db_default=""
    )  # the triggers insert rows too

    @classmethod
    def current(cls) -> int:
        number = cls.objects.filter(pk=cls.ROW).values_list("number", flat=True).first()
        return int(number or 0)

    @classmethod
    def read(cls) -> tuple[int, datetime | None, str]:
        """The version and the watcher's heartbeat, in one query."""
        row = cls.objects.filter(pk=cls.ROW).values_list("number", "probed_at", "watcher").first()
        return (int(row[0]), row[1], row[2]) if row else (0, None, "")

    @classmethod
    def beat(cls, probed_at: datetime, watcher: str) -> None:
        """The leading watcher's heartbeat."""
        if not cls.objects.filter(pk=cls.ROW).update(probed_at=probed_at, watcher=watcher):
            cls.objects.get_or_create(
                pk=cls.ROW, defaults={"number": 1, "probed_at": probed_at, "watcher": watcher}
            )

    @classmethod
    def lock(cls) -> None:
        """Inside a transaction that will write several rows: take the version row's lock
        first. The triggers take it after each statement, so two writers that touched their
        first rows in another order could each wait on the other (PostgreSQL; SQLite's
        IMMEDIATE transactions already take one write lock up front)."""
        list(cls.objects.select_for_update().filter(pk=cls.ROW).values_list("pk"))


class RequestLog(models.Model):
    """One row per /v1 request, written in batches by ``dispatch.observability.requestlog``'s thread.

    Never written on the request path and never read by it: the Activity page and the admin
    read it. Bodies are kept only with HAL0_LOG_BODIES (capped by HAL0_LOG_BODY_MAX_KB).
    Two indexes only (time, for retention and Activity; request id, for the admin's search):
    every index is paid for on every insert.
    """

    at = models.DateTimeField(db_index=True)
    request_id = models.CharField(max_length=128, db_index=True)
    client = models.CharField(max_length=160, blank=True, help_text="key:<name> or user:<name>")
    endpoint = models.CharField(max_length=32)
    model = models.CharField(max_length=300, blank=True, help_text="as requested")
    slot = models.CharField(max_length=32, blank=True)
    upstream_model = models.CharField(max_length=300, blank=True)
    resolution = models.CharField(max_length=100, blank=True)
    status = models.PositiveSmallIntegerField()
    error = models.CharField(max_length=64, blank=True)
    duration_ms = models.FloatField()
    ttft_ms = models.FloatField(null=True, blank=True)
    mode = models.CharField(
        max_length=16,
        blank=True,
        db_default="",  # rows an older worker writes during an upgrade name none
        help_text="passthrough, or translated to what the slot offers",
    )
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    why = models.TextField(blank=True, help_text="why this slot, in words")
    candidates = models.JSONField(default=list, blank=True)
    body = models.TextField(blank=True, help_text="the request body; only with HAL0_LOG_BODIES")
    answer = models.TextField(blank=True, help_text="the answer as sent; only with HAL0_LOG_BODIES")

    class Meta:
        ordering = ["-at"]
        verbose_name = "request"

    def __str__(self) -> str:
        return f"{self.request_id} {self.endpoint} {self.status}"


class ResponseAffinity(models.Model):
    """Which slot made a Responses API response: later requests naming its id
    (``previous_response_id``, ``GET /v1/responses/{id}``) go there, the only server that
    holds it. Written when the response (or its stream's ``response.created``) passes, read
    by every worker; pruned after HAL0_RESPONSE_RETENTION_DAYS by the watcher's process.
    Not a routing-table table: no trigger bumps StateVersion for it (dispatch.coordination.triggers).
    """

    response_id = models.CharField(max_length=200, primary_key=True)
    slot = models.CharField(max_length=32)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "response affinity"
        verbose_name_plural = "response affinities"

    def __str__(self) -> str:
        return f"{self.response_id} -> {self.slot}"


class StoredResponse(models.Model):
    """A Responses API response hal0web translated for a slot that speaks only chat and so
    keeps nothing: hal0web keeps it instead (``dispatch.coordination.stored_responses``), for
    ``previous_response_id``, ``GET``/``DELETE /v1/responses/{id}`` and ``.../input_items``
    on any worker. Written when the answer (or its stream's ``response.completed``) passes,
    unless the request said ``store: false``; pruned after HAL0_RESPONSE_RETENTION_DAYS by
    the watcher's process. No trigger bumps StateVersion for it.
    """

    response_id = models.CharField(max_length=200, primary_key=True)
    created_at = models.DateTimeField(db_index=True)
    # Where it was made and under which names (a key's model allowlist reads them).
    slot = models.CharField(max_length=32)
    model = models.CharField(max_length=200, blank=True)
    upstream_model = models.CharField(max_length=200, blank=True)
    response = models.JSONField(help_text="the Response object, as answered")
    input_items = models.JSONField(help_text="the request's input items")
    history = models.JSONField(
        default=list, help_text="the conversation its previous_response_id stood for"
    )

    class Meta:
        verbose_name = "stored response"

    def __str__(self) -> str:
        return f"{self.response_id} ({self.model or '-'} on {self.slot})"
