"""Scoped API keys (issue 14): a name, an optional expiry and a model allowlist; made,
listed and revoked from the admin or ``manage.py apikey``; their last use written in
batches, never once per request."""

from __future__ import annotations

import datetime as dt
import io
import re
import time

import httpx
import openai
import pytest
from django.core.management import CommandError, call_command

from dispatch.models import ApiKey, ApiKeyUse, StateVersion
from dispatch.observability.keyuse import recorder
from dispatch.routing.resolver import resolve
from dispatch.routing.scopes import Scope
from dispatch.routing.table import ModelEntry, RoutingTable, make_slot
from tests.polling import wait_until

HERMES = {"model": "hermes", "messages": [{"role": "user", "content": "hi"}]}
CODER = {"model": "qwen3-coder-40b", "messages": [{"role": "user", "content": "hi"}]}


def two_slots_one_model() -> RoutingTable:
    entry = ModelEntry("m", "m", "manifest", True)
    return RoutingTable.build(
        1,
        [
            make_slot("primary", "http://a/v1", [entry], priority=10, state="ready"),
            make_slot("second", "http://b/v1", [entry], state="ready"),
        ],
    )


def test_a_scope_keeps_only_the_slots_it_allows_and_says_which_leads():
    table = two_slots_one_model()
    decision = resolve(table, "m", "chat/completions")
    assert decision.candidates == ("primary", "second")
    assert Scope().narrow(decision) is decision
    assert Scope(("m",)).narrow(decision) is decision
    only_second = Scope(("second/*",)).narrow(decision)
    assert only_second is not None and only_second.candidates == ("second",)
    assert only_second.resolution_path == "model:second"
    assert Scope(("other-*", "primary/m")).narrow(decision).candidates == ("primary",)
    assert Scope(("M",)).narrow(decision) is None  # ids are case sensitive
    assert Scope(("qwen*",)).narrow(decision) is None
    asked_by_slot = resolve(table, "second", "chat/completions")
    assert Scope(("second/*",)).narrow(asked_by_slot) is asked_by_slot


@pytest.fixture
def client(seed_slots, hal0):
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_uses_only_its_models_and_sees_only_them(client):
    _, key = ApiKey.issue("hermes-only", ["hermes", "agent-hermes/*"])
    r = client.post("/v1/chat/completions", json=HERMES, headers=auth(key))
    assert r.status_code == 200 and r.headers["x-hal0-slot"] == "agent-hermes"
    r = client.post("/v1/chat/completions", json=CODER, headers=auth(key))
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_allowed" and error["param"] == "model"
    assert "hermes-only" in error["message"] and "qwen3-coder-40b" in error["message"]
    r = client.post("/v1/chat/completions", json={**CODER, "model": "primary"}, headers=auth(key))
    assert r.status_code == 403  # a slot by name is its default model: out of scope too
    sdk = openai.OpenAI(base_url=str(client.base_url.join("/v1")), api_key=key)
    assert {m.id for m in sdk.models.list()} == {"qwen3-coder-reap-25b-a3b-q5km"}
    every_name = client.get("/v1/models?all=true", headers=auth(key)).json()["data"]
    ids = {m["id"] for m in every_name}
    assert "hermes" in ids and "agent-hermes/hermes" in ids
    assert not any("qwen3-coder-40b" in i for i in ids), ids
    assert client.get("/v1/models/hermes", headers=auth(key)).status_code == 200
    r = client.get("/v1/models/qwen3-coder-40b", headers=auth(key))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # A key without a list may use and see everything.
    _, every = ApiKey.issue("every")
    assert client.post("/v1/chat/completions", json=CODER, headers=auth(every)).status_code == 200
    listed = client.get("/v1/models", headers=auth(every)).json()["data"]
    assert "qwen3-coder-40b" in {m["id"] for m in listed}


def until_refused(client: httpx.Client, key: str, within_s: float = 5) -> httpx.Response:
    """The answer to ``key`` once every process has its change."""
    last: list[httpx.Response] = []

    def refused() -> bool:
        last[:] = [client.post("/v1/chat/completions", json=HERMES, headers=auth(key))]
        return last[0].status_code == 401

    wait_until(refused, "the key to be refused", within_s, 0.1, show=lambda: last[0].text)
    return last[0]


def test_an_expired_key_is_refused_with_its_expiry(client):
    row, key = ApiKey.issue("short", expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert client.post("/v1/chat/completions", json=HERMES, headers=auth(key)).status_code == 200
    ApiKey.objects.filter(pk=row.pk).update(expires_at=dt.datetime.now(dt.UTC))
    r = until_refused(client, key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "expired_api_key", r.text
    assert "expired at" in r.json()["error"]["message"]


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("apikey", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_the_apikey_command_creates_lists_and_revokes(client):
    out, err = run(
        "create", "ci", "--models", "hermes", "agent-hermes/*", "--expires", "2099-01-01"
    )
    key = out.strip()
    assert re.fullmatch(r"hal0-[A-Za-z0-9_-]{40,}", key) and "copy it now" in err
    row = ApiKey.objects.get(name="ci")
    assert row.allowed_models == ["hermes", "agent-hermes/*"]
    assert row.expires_at == dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
    assert key not in row.key_hash
    assert client.post("/v1/chat/completions", json=HERMES, headers=auth(key)).status_code == 200
    assert client.post("/v1/chat/completions", json=CODER, headers=auth(key)).status_code == 403
    listed, _ = run("list")
    line = next(x for x in listed.splitlines() if x.startswith("ci "))
    assert "hermes,agent-hermes/*" in line and "2099-01-01" in line and key not in listed
    with pytest.raises(CommandError, match="already"):
        run("create", "ci")
    with pytest.raises(CommandError, match="not a date"):
        run("create", "x", "--expires", "tomorrow")
    with pytest.raises(CommandError, match="begun"):
        run("create", "x", "--expires", "2020-01-01")
    out, _ = run("revoke", "ci")
    # Kept, disabled: deleting the last key would open the API (HAL0_API_AUTH=auto).
    assert "revoked ci" in out and not ApiKey.objects.get(name="ci").enabled
    assert "ci " in run("list")[0]
    r = until_refused(client, key)
    assert r.status_code == 401
    with pytest.raises(CommandError, match="no API key"):
        run("revoke", "nobody")


def test_last_use_is_written_in_batches_not_per_request(no_watcher, client, monkeypatch):
    # No probes: a slot state written meanwhile would move the version this test holds still.
    monkeypatch.setattr(recorder, "flush_s", 3600.0)  # only when woken, below
    row, key = ApiKey.issue("busy")
    version = StateVersion.current()
    for _ in range(20):
        assert (
            client.post("/v1/chat/completions", json=HERMES, headers=auth(key)).status_code == 200
        )
    assert not ApiKeyUse.objects.exists()  # 20 requests, not one write
    before = time.time()
    recorder.wake()
    wait_until(ApiKeyUse.objects.exists, "the key's use to be recorded")
    use = ApiKeyUse.objects.get(key=row)
    assert before - 60 < use.last_used_at.timestamp() <= time.time()
    # Recording a use changes nothing any process holds: no reload for it.
    assert StateVersion.current() == version


def test_one_flush_is_one_statement_for_many_keys(transactional_db, django_assert_num_queries):
    keys = [ApiKey.issue(f"k{i}")[0] for i in range(30)]
    for key in keys:
        for _ in range(10):
            recorder._pending[key.pk] = time.time()
    # Which keys still exist, then one upsert (in its transaction: BEGIN, INSERT, COMMIT).
    with django_assert_num_queries(4):
        assert recorder.flush() == 30
    assert ApiKeyUse.objects.count() == 30


def test_the_admin_makes_a_scoped_key_and_shows_its_use(admin_client):
    r = admin_client.post(
        "/admin/dispatch/apikey/add/",
        {
            "name": "editor",
            "enabled": "on",
            "allowed_models": "hermes, primary/*\nqwen3-*",
            "expires_at_0": "2099-01-01",
            "expires_at_1": "00:00:00",
        },
        follow=True,
    )
    assert r.status_code == 200 and "<code>hal0-" in r.content.decode(), r.content.decode()[:3000]
    row = ApiKey.objects.get(name="editor")
    assert row.allowed_models == ["hermes", "primary/*", "qwen3-*"]
    assert row.expires_at is not None and row.expires_at.year == 2099
    listing = admin_client.get("/admin/dispatch/apikey/").content.decode()
    assert "hermes, primary/*, qwen3-*" in listing and "never" in listing
    page = admin_client.get(f"/admin/dispatch/apikey/{row.pk}/change/").content.decode()
    assert "hermes\nprimary/*\nqwen3-*" in page


def test_the_scope_holds_on_the_anthropic_path_with_its_own_error_shape(client):
    _, key = ApiKey.issue("hermes-only", ["hermes"])
    r = client.post(
        "/v1/messages",
        json={"model": "qwen3-coder-40b", "max_tokens": 8, "messages": []},
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "permission_error", body
    assert "may not use the model 'qwen3-coder-40b'" in body["error"]["message"]


def test_the_model_list_takes_the_key_from_x_api_key_too(client):
    # The anthropic SDK lists models with its key in x-api-key, as it sends messages.
    _, key = ApiKey.issue("claude-code", ["hermes"])
    assert client.get("/v1/models", headers={"x-api-key": "hal0-wrong"}).status_code == 401
    r = client.get("/v1/models", headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == ["hermes"]  # the one name it may use
    assert client.get("/v1/models/hermes", headers={"x-api-key": key}).status_code == 200
