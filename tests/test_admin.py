"""The admin for slots and their models, as a logged-in staff user sees it."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from dispatch.coordination.store import store
from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:dispatch_slot_changelist")


@pytest.fixture(autouse=True)
def _plain_static(settings):
    """Unhashed static URLs: the manifest storage needs `collectstatic` (which `make run` does)."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


def change_url(slot: Slot) -> str:
    return reverse("admin:dispatch_slot_change", args=[slot.pk])


def form_data(slot: Slot, **overrides) -> dict[str, str]:
    """The change form as the browser would post it, with the slot's models inline."""
    data = {
        "name": slot.name,
        "url": slot.url,
        "kind": slot.kind,
        "type": slot.type,
        "device": slot.device,
        "priority": str(slot.priority),
        "api_key_env": slot.api_key_env,
        "max_concurrency": str(slot.max_concurrency),
        "connect_timeout_s": str(slot.connect_timeout_s),
        "first_byte_timeout_s": str(slot.first_byte_timeout_s),
        "idle_timeout_s": str(slot.idle_timeout_s),
        "max_duration_s": str(slot.max_duration_s),
        "unload_idle_s": str(slot.unload_idle_s),
        "state": slot.state,
        "extra": "{}",
    }
    if slot.enabled:
        data["enabled"] = "on"
    if slot.is_default:
        data["is_default"] = "on"
    rows = list(slot.models.order_by("-is_default", "model_id"))
    prefix = "models"
    data.update(
        {
            f"{prefix}-TOTAL_FORMS": str(len(rows)),
            f"{prefix}-INITIAL_FORMS": str(len(rows)),
            f"{prefix}-MIN_NUM_FORMS": "0",
            f"{prefix}-MAX_NUM_FORMS": "1000",
        }
    )
    for i, m in enumerate(rows):
        data.update(
            {
                f"{prefix}-{i}-id": str(m.pk),
                f"{prefix}-{i}-slot": str(slot.pk),
                f"{prefix}-{i}-model_id": m.model_id,
                f"{prefix}-{i}-upstream_model": m.upstream_model,
                f"{prefix}-{i}-source": m.source,
            }
        )
        if m.is_default:
            data[f"{prefix}-{i}-is_default"] = "on"
        if m.pinned:
            data[f"{prefix}-{i}-pinned"] = "on"
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


@pytest.fixture
def two_slots():
    primary = add_slot(
        "primary", "http://127.0.0.1:8001/v1", ["shared-7b", "p-only"], is_default=True
    )
    hermes = add_slot(
        "agent-hermes",
        "http://127.0.0.1:8002/v1",
        ["gemma3-270m"],
        aliases={"hermes": "gemma3-270m"},
    )
    SlotModel.objects.create(slot=hermes, model_id="shared-7b", source="discovered")
    return primary, hermes


def test_changelist_columns_filters_and_shared_models(admin_client, two_slots):
    r = admin_client.get(CHANGELIST)
    assert r.status_code == 200
    html = r.content.decode()
    for header in ("default model", "models", "shared models", "State", "Enabled"):
        assert header.lower() in html.lower()
    assert "shared-7b also on: agent-hermes" in html
    assert "shared-7b also on: primary" in html
    assert 'class="hal0-shared"' in html
    # Filters
    assert "By type" in html and "By kind" in html and "By state" in html and "By enabled" in html


def test_changelist_search_by_model_id(admin_client, two_slots):
    r = admin_client.get(CHANGELIST, {"q": "gemma3"})
    html = r.content.decode()
    assert "agent-hermes" in html and "http://127.0.0.1:8001/v1" not in html


def test_change_form_renders_inline_models_and_runtime(admin_client, two_slots):
    _, hermes = two_slots
    Slot.objects.filter(pk=hermes.pk).update(state="ready", drift=["gemma3-270m"])
    r = admin_client.get(change_url(hermes))
    assert r.status_code == 200
    html = r.content.decode()
    assert "gemma3-270m" in html and "hermes" in html
    assert "declared but not advertised by the server at its last probe: gemma3-270m" in html
    # The state is shown, not edited; the operator may only ask for draining or unknown.
    assert "state" not in r.context["adminform"].form.fields
    set_state = r.context["adminform"].form.fields["set_state"].choices
    assert [c for c, _ in set_state] == ["", "draining", "unknown"]
    assert "primary" in html  # shared-7b's "also on"


# Real commits: the routing table reloads once the admin's transaction commits.
@pytest.mark.django_db(transaction=True)
def test_change_form_saves_and_reloads_routing(admin_client, two_slots):
    primary, _ = two_slots
    r = admin_client.post(change_url(primary), form_data(primary, priority="7"))
    assert r.status_code == 302, r.context["adminform"].form.errors if r.context else r
    primary.refresh_from_db()
    assert primary.priority == 7
    assert store.table.slots["primary"].priority == 7


def test_validation_errors_are_shown_in_the_form(admin_client, two_slots):
    primary, _ = two_slots
    r = admin_client.post(change_url(primary), form_data(primary, name="Not Valid", url="ftp://x"))
    assert r.status_code == 200
    html = r.content.decode()
    assert "must match ^[a-z0-9]" in html
    assert "must be an http:// or https:// URL with a host" in html
    assert Slot.objects.get(pk=primary.pk).name == "primary"


def test_second_default_slot_of_a_type_is_refused(admin_client, two_slots):
    _, hermes = two_slots
    r = admin_client.post(change_url(hermes), form_data(hermes, is_default="on"))
    assert r.status_code == 200
    assert "slot &#x27;primary&#x27; is already the default llm slot" in r.content.decode()
    assert not Slot.objects.get(pk=hermes.pk).is_default


def test_inline_needs_exactly_one_default_model(admin_client, two_slots):
    primary, _ = two_slots
    data = form_data(primary)
    data.pop("models-0-is_default")  # no default left
    r = admin_client.post(change_url(primary), data)
    assert r.status_code == 200
    assert "mark one of the slot&#x27;s models as its default" in r.content.decode()

    data = form_data(primary, **{"models-1-is_default": "on"})  # two defaults
    r = admin_client.post(change_url(primary), data)
    assert r.status_code == 200
    assert "a slot has one default model" in r.content.decode()


def test_inline_moves_the_default_model(admin_client, two_slots):
    primary, _ = two_slots
    data = form_data(primary)
    data.pop("models-0-is_default")
    data["models-1-is_default"] = "on"
    r = admin_client.post(change_url(primary), data)
    assert r.status_code == 302, r.context["inline_admin_formsets"][0].formset.non_form_errors()
    assert primary.default_model.model_id == data["models-1-model_id"]


def test_inline_alias_rules(admin_client, two_slots):
    _, hermes = two_slots
    # hermes rows ordered: gemma3-270m (default), hermes (alias), shared-7b (discovered)
    data = form_data(hermes, **{"models-1-upstream_model": "hermes"})
    r = admin_client.post(change_url(hermes), data)
    assert r.status_code == 200
    assert "an alias must name a different model" in r.content.decode()


def test_operator_may_drain_and_undrain(admin_client, two_slots):
    _, hermes = two_slots
    Slot.objects.filter(pk=hermes.pk).update(state="ready", last_error="")
    r = admin_client.post(change_url(hermes), form_data(hermes, set_state="draining"))
    assert r.status_code == 302
    hermes.refresh_from_db()
    assert hermes.state == "draining" and hermes.state_changed_at is not None

    r = admin_client.post(change_url(hermes), form_data(hermes, set_state="ready"))
    assert r.status_code == 200  # only draining/unknown may be set by hand
    assert "Select a valid choice" in r.content.decode()
    assert Slot.objects.get(pk=hermes.pk).state == "draining"

    Slot.objects.filter(pk=hermes.pk).update(last_error="probe failed earlier")
    r = admin_client.post(change_url(hermes), form_data(hermes, set_state="unknown"))
    assert r.status_code == 302
    hermes.refresh_from_db()
    assert (hermes.state, hermes.last_error) == ("unknown", "")


def test_a_stale_form_does_not_overwrite_the_watcher(admin_client, two_slots):
    _, hermes = two_slots
    stale = form_data(hermes, priority="5")  # the form as loaded: state unknown, no error
    # Meanwhile the watcher probes the slot and writes what it saw.
    Slot.objects.filter(pk=hermes.pk).update(state="error", last_error="boom", drift=["x"])
    r = admin_client.post(change_url(hermes), stale)
    assert r.status_code == 302
    hermes.refresh_from_db()
    assert hermes.priority == 5
    assert (hermes.state, hermes.last_error, hermes.drift) == ("error", "boom", ["x"])


def test_runtime_fields_are_read_only(admin_client, two_slots):
    _, hermes = two_slots
    Slot.objects.filter(pk=hermes.pk).update(last_error="boom", drift=["x"])
    hermes.refresh_from_db()
    r = admin_client.post(change_url(hermes), form_data(hermes, last_error="edited", drift='["y"]'))
    assert r.status_code == 302
    hermes.refresh_from_db()
    assert (hermes.last_error, hermes.drift) == ("boom", ["x"])


@pytest.mark.django_db(transaction=True)
def test_enable_disable_actions_save_each_slot(admin_client, two_slots):
    primary, hermes = two_slots
    r = admin_client.post(
        CHANGELIST,
        {"action": "disable_slots", "_selected_action": [primary.pk, hermes.pk]},
        follow=True,
    )
    assert "2 slot(s) disabled." in r.content.decode()
    assert not Slot.objects.filter(enabled=True).exists()
    # The signals fired (save(), not update()): the routing table followed.
    assert not store.table.slots["primary"].enabled
    assert not store.table.slots["agent-hermes"].enabled

    r = admin_client.post(
        CHANGELIST, {"action": "enable_slots", "_selected_action": [hermes.pk]}, follow=True
    )
    assert "1 slot(s) enabled." in r.content.decode()
    assert store.table.slots["agent-hermes"].enabled and not store.table.slots["primary"].enabled


def test_add_form_creates_a_slot(admin_client):
    r = admin_client.get(reverse("admin:dispatch_slot_add"))
    assert r.status_code == 200
    data = {
        "name": "new",
        "url": "http://127.0.0.1:9100/v1",
        "kind": "vllm",
        "type": "embedding",
        "device": "",
        "enabled": "on",
        "priority": "0",
        "api_key_env": "",
        "max_concurrency": "0",
        "connect_timeout_s": "5",
        "first_byte_timeout_s": "300",
        "idle_timeout_s": "120",
        "max_duration_s": "0",
        "unload_idle_s": "0",
        "state": "unknown",
        "extra": "{}",
        "models-TOTAL_FORMS": "1",
        "models-INITIAL_FORMS": "0",
        "models-MIN_NUM_FORMS": "0",
        "models-MAX_NUM_FORMS": "1000",
        "models-0-model_id": "nomic-embed",
        "models-0-upstream_model": "",
        "models-0-source": "manifest",
        "models-0-is_default": "on",
    }
    r = admin_client.post(reverse("admin:dispatch_slot_add"), data)
    assert r.status_code == 302, r.content.decode()[:3000]
    slot = Slot.objects.get(name="new")
    assert slot.default_model.model_id == "nomic-embed"
    assert slot.default_model.upstream_model == "nomic-embed"


def test_slot_model_admin_lists_shared_models(admin_client, two_slots):
    r = admin_client.get(reverse("admin:dispatch_slotmodel_changelist"))
    assert r.status_code == 200
    html = r.content.decode()
    assert "shared-7b" in html and "agent-hermes" in html


def test_anonymous_users_are_sent_to_login(client):
    r = client.get(CHANGELIST)
    assert r.status_code == 302 and "/admin/login/" in r["Location"]


def test_extra_keys_must_be_writable_as_a_manifest(admin_client, two_slots):
    primary, _ = two_slots
    bad = '{"name": "x", "port": "8001", "model": {"default": "m"}, "server": {"host": null}}'
    r = admin_client.post(change_url(primary), form_data(primary, extra=bad))
    assert r.status_code == 200
    html = r.content.decode()
    assert "name: is a field of the slot" in html
    assert "port: must be an integer between 1 and 65535" in html
    assert "model.default: is a field of the slot" in html
    assert "server.host: TOML has no null" in html

    good = '{"runtime": "container", "model": {"context_size": 4096}}'
    r = admin_client.post(change_url(primary), form_data(primary, extra=good))
    assert r.status_code == 302
    primary.refresh_from_db()
    assert primary.extra == {"runtime": "container", "model": {"context_size": 4096}}
    r = admin_client.post(change_url(primary), form_data(primary, extra=""))
    assert r.status_code == 302
    primary.refresh_from_db()
    assert primary.extra == {}


def test_the_form_says_where_max_concurrency_holds(admin_client, two_slots, settings):
    _, hermes = two_slots
    settings.REDIS_URL = None
    html = admin_client.get(change_url(hermes)).content.decode()
    assert "Holds per server process: without Redis (REDIS_URL) each process admits" in html
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"
    html = admin_client.get(change_url(hermes)).content.decode()
    assert "Holds across all server processes (kept in Redis)." in html


def test_endpoints_are_shown_and_set_in_the_admin(admin_client, two_slots):
    _, hermes = two_slots
    html = admin_client.get(CHANGELIST).content.decode()
    assert (
        "chat/completions, completions, responses, messages, api/chat · translated, "
        "api/generate · translated, responses/compact (its kind&#x27;s, not asked yet)" in html
    )
    # An Ollama server speaks Ollama's own API besides.
    add_slot("ol", "http://127.0.0.1:11434/v1", ["gemma3:latest"], kind="ollama")
    html = admin_client.get(CHANGELIST).content.decode()
    assert "api/chat, api/generate" in html
    r = admin_client.get(change_url(hermes))
    assert 'value="audio/speech"' in r.content.decode()  # a checkbox per endpoint
    data = form_data(hermes)
    data["endpoints"] = ["embeddings", "chat/completions"]
    r = admin_client.post(change_url(hermes), data)
    assert r.status_code == 302, r.context["adminform"].form.errors
    hermes.refresh_from_db()
    assert hermes.endpoints == ["chat/completions", "embeddings"]
    listed = admin_client.get(CHANGELIST).content.decode()
    # Listed ones native; what hal0web translates to them besides, said so.
    assert "chat/completions, responses · translated, messages · translated, embeddings" in listed
    r = admin_client.post(change_url(hermes), {**form_data(hermes), "endpoints": ["video"]})
    assert r.status_code == 200 and "endpoints" in r.context["adminform"].form.errors


# --- models on demand: load state shown; drain, load, unload, pin through lifecycle.control ---

MODELS = reverse("admin:dispatch_slotmodel_changelist")


def as_router(slot: Slot, limit: int = 1) -> None:
    """The slot's server loads and unloads models when asked (as the watcher would find)."""
    Slot.objects.filter(pk=slot.pk).update(loads_models=True, model_limit=limit, state="ready")


@pytest.mark.django_db(transaction=True)
def test_drain_by_action_and_by_form_write_the_same_row(admin_client, two_slots):
    primary, hermes = two_slots
    Slot.objects.update(state="ready", last_error="an old probe's error")
    r = admin_client.post(
        CHANGELIST, {"action": "drain_slots", "_selected_action": [primary.pk]}, follow=True
    )
    assert "1 slot(s) draining." in r.content.decode()
    r = admin_client.post(change_url(hermes), form_data(hermes, set_state="draining"))
    assert r.status_code == 302
    rows = {s.name: s for s in Slot.objects.all()}
    assert {n: (s.state, s.last_error) for n, s in rows.items()} == {
        "primary": ("draining", "an old probe's error"),
        "agent-hermes": ("draining", "an old probe's error"),
    }
    assert all(s.state_changed_at is not None for s in rows.values())
    assert store.table.slots["primary"].state == store.table.slots["agent-hermes"].state
    # Undrained either way: unknown (probed afresh), the old error gone, both alike.
    r = admin_client.post(
        CHANGELIST, {"action": "undrain_slots", "_selected_action": [primary.pk]}, follow=True
    )
    assert "1 slot(s) taking requests again." in r.content.decode()
    hermes.refresh_from_db()
    r = admin_client.post(change_url(hermes), form_data(hermes, set_state="unknown"))
    assert r.status_code == 302
    assert set(Slot.objects.values_list("state", "last_error")) == {("unknown", "")}
    assert store.table.slots["agent-hermes"].state == "unknown"


def test_load_state_is_shown_on_the_slot_and_in_the_models_list(admin_client, two_slots):
    primary, hermes = two_slots
    as_router(primary, limit=2)
    primary.models.filter(model_id="shared-7b").update(load_state="loading", load_progress=0.4)
    primary.models.filter(model_id="p-only").update(
        load_state="failed", load_error="out of memory", wanted="load"
    )
    hermes.models.filter(model_id="gemma3-270m").update(load_state="unloaded", pinned=True)
    r = admin_client.get(change_url(primary))
    html = r.content.decode()
    assert "loading 40 %" in html and "failed: out of memory (asked: load)" in html
    # What the watcher found the server to do: shown, never edited.
    runtime = r.context["adminform"].form.fields
    assert "loads_models" not in runtime and "model_limit" not in runtime
    assert re.search(r'Loads models:</label>\s*<div class="readonly"><img[^>]+alt="True"', html)
    assert re.search(r'Model limit:</label>\s*<div class="readonly">2</div>', html)
    listing = admin_client.get(CHANGELIST).content.decode()
    assert "shared-7b: loading 40 %; p-only: failed: out of memory (asked: load)" in listing
    assert "(at most 2 loaded)" in listing
    assert "gemma3-270m: unloaded; shared-7b: loaded" in listing  # the alias is gemma3-270m
    models = admin_client.get(MODELS).content.decode()
    assert "loading 40 %" in models and "as gemma3-270m" in models  # hermes, the alias
    filtered = admin_client.get(MODELS, {"load_state__exact": "unloaded"}).content.decode()
    assert "gemma3-270m" in filtered and "p-only" not in filtered


def test_pinning_in_the_slot_form_pins_every_row_of_the_model(admin_client, two_slots):
    _, hermes = two_slots
    data = form_data(hermes)
    row = next(k for k, v in data.items() if v == "gemma3-270m" and k.endswith("-model_id"))
    data[row.replace("model_id", "pinned")] = "on"
    r = admin_client.post(change_url(hermes), data)
    assert r.status_code == 302, r.context["inline_admin_formsets"][0].formset.errors
    pinned = dict(hermes.models.values_list("model_id", "pinned"))
    assert pinned == {"gemma3-270m": True, "hermes": True, "shared-7b": False}
    # Unticked on the alias: the model itself is unpinned too (one model on the server).
    data = form_data(hermes)
    data.pop(
        next(k for k, v in data.items() if v == "hermes" and k.endswith("-model_id")).replace(
            "model_id", "pinned"
        )
    )
    r = admin_client.post(change_url(hermes), data)
    assert r.status_code == 302
    assert not hermes.models.filter(pinned=True).exists()


def test_pinning_one_model_in_its_own_form_pins_its_alias(admin_client, two_slots):
    _, hermes = two_slots
    row = hermes.models.get(model_id="hermes")
    url = reverse("admin:dispatch_slotmodel_change", args=[row.pk])
    data = {
        "slot": str(hermes.pk),
        "model_id": "hermes",
        "upstream_model": "gemma3-270m",
        "source": "alias",
        "pinned": "on",
    }
    r = admin_client.post(url, data)
    assert r.status_code == 302, r.context["adminform"].form.errors
    assert set(hermes.models.filter(pinned=True).values_list("model_id", flat=True)) == {
        "hermes",
        "gemma3-270m",
    }


def test_model_actions_ask_the_loader_and_say_what_was_refused(admin_client, two_slots):
    primary, hermes = two_slots
    as_router(hermes)
    rows = {f"{m.slot.name}/{m.model_id}": m.pk for m in SlotModel.objects.select_related("slot")}

    def act(action: str, *names: str) -> str:
        chosen = [rows[n] for n in names]
        r = admin_client.post(MODELS, {"action": action, "_selected_action": chosen}, follow=True)
        return r.content.decode()

    html = act("load_models", "agent-hermes/shared-7b", "primary/p-only")
    assert "1 model(s) asked to load." in html
    assert (
        "Not done for primary/p-only: slot &#x27;primary&#x27; does not load or unload models"
        in html
    )
    assert hermes.models.get(model_id="shared-7b").wanted == "load"
    assert primary.models.get(model_id="p-only").wanted == ""
    html = act("pin_models", "agent-hermes/hermes")
    assert "1 model(s) pinned." in html
    assert hermes.models.get(model_id="gemma3-270m").pinned  # through its alias
    html = act("unload_models", "agent-hermes/gemma3-270m")
    assert "&#x27;gemma3-270m&#x27; is pinned; unpin it first" in html
    assert hermes.models.get(model_id="gemma3-270m").wanted == ""
    assert "1 model(s) unpinned." in act("unpin_models", "agent-hermes/gemma3-270m")
    assert "1 model(s) asked to unload." in act("unload_models", "agent-hermes/gemma3-270m")
    assert hermes.models.get(model_id="gemma3-270m").wanted == "unload"
    assert not SlotModel.objects.filter(pinned=True).exists()


def test_unload_idle_is_set_in_the_form(admin_client, two_slots):
    primary, _ = two_slots
    r = admin_client.post(change_url(primary), form_data(primary, unload_idle_s="600"))
    assert r.status_code == 302
    assert Slot.objects.get(pk=primary.pk).unload_idle_s == 600
    r = admin_client.post(change_url(primary), form_data(primary, unload_idle_s="-1"))
    assert r.status_code == 200  # refused: a negative idle time means nothing
    assert "must be &gt;= 0 (0 = never)" in r.content.decode()
    assert Slot.objects.get(pk=primary.pk).unload_idle_s == 600


def with_new_model(slot: Slot, model_id: str, upstream: str, source: str) -> dict[str, str]:
    """The change form with one more model row typed into the inline."""
    data = form_data(slot)
    i = int(data["models-TOTAL_FORMS"])
    data["models-TOTAL_FORMS"] = str(i + 1)
    data.update(
        {
            f"models-{i}-slot": str(slot.pk),
            f"models-{i}-model_id": model_id,
            f"models-{i}-upstream_model": upstream,
            f"models-{i}-source": source,
        }
    )
    return data


@pytest.mark.parametrize(
    ("model_id", "upstream", "source", "says"),
    [
        ("claude-[haiku-*", "gemma3-270m", "alias", "opens a &#x27;[&#x27; it never closes"),
        ("*", "gemma3-270m", "alias", "has no literal character"),
        ("claude-*", "gemma*", "alias", "an alias pattern stands for one model"),
        ("claude-*", "", "manifest", "only an alias may be one"),
    ],
)
def test_a_bad_alias_pattern_is_a_form_error(
    admin_client, two_slots, model_id, upstream, source, says
):
    _, hermes = two_slots
    r = admin_client.post(change_url(hermes), with_new_model(hermes, model_id, upstream, source))
    assert r.status_code == 200
    assert says in r.content.decode()
    assert not hermes.models.filter(model_id=model_id).exists()


@pytest.mark.django_db(transaction=True)
def test_an_alias_pattern_is_set_in_the_form_and_routes(admin_client, two_slots):
    _, hermes = two_slots
    r = admin_client.get(change_url(hermes))
    assert "An alias may be a pattern (claude-haiku-*" in r.content.decode()  # the help
    data = with_new_model(hermes, "claude-haiku-*", "gemma3-270m", "alias")
    r = admin_client.post(change_url(hermes), data)
    assert r.status_code == 302, r.context["inline_admin_formsets"][0].formset.errors
    assert store.table.by_pattern == {"claude-haiku-*": ("agent-hermes",)}
    listing = admin_client.get(reverse("admin:dispatch_slotmodel_changelist")).content.decode()
    assert "pattern: every name it matches, as gemma3-270m" in listing
