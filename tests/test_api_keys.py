"""Who may call /v1: API keys (hashed, in memory), the page's session with CSRF, or anyone
while no key exists (HAL0_API_AUTH=auto)."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from dispatch.models import ApiKey


@pytest.fixture
def client(seed_slots, hal0):
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        yield c


BODY = {"model": "hermes", "messages": [{"role": "user", "content": "hi"}]}


def test_open_while_no_key_exists(client):
    assert client.post("/v1/chat/completions", json=BODY).status_code == 200


def test_a_key_makes_keys_required_and_only_its_hash_is_stored(client, hal0):
    row, key = ApiKey.issue("ci")
    assert key.startswith("hal0-") and key not in (row.key_hash, row.prefix)
    r = client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = client.post(
        "/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer hal0-wrong"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    sdk = openai.OpenAI(base_url=hal0.url + "/v1", api_key=key, max_retries=0)
    assert (
        sdk.chat.completions.create(**BODY).choices[0].message.content == "hello from agent-hermes"
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=hal0.url + "/v1", api_key="nope", max_retries=0).models.list()
    row.enabled = False
    row.save()  # takes effect at once, through the same on-commit path as slots
    r = client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401


def test_required_mode_needs_a_key_even_when_none_exists(client, settings):
    settings.HAL0_API_AUTH = "required"
    assert client.post("/v1/chat/completions", json=BODY).status_code == 401


@pytest.mark.django_db(transaction=True)
async def test_required_mode_knows_a_key_before_the_first_version_check(settings):
    """The ring is loaded by the process's version check; a request that comes first (just
    after start-up) must still find its valid key."""
    from asgiref.sync import sync_to_async
    from django.test import RequestFactory

    from dispatch.api.keys import authorize
    from dispatch.coordination.keyring import keyring

    settings.HAL0_API_AUTH = "required"
    _, key = await sync_to_async(ApiKey.issue)("early")
    keyring.reset()  # as at start-up: nothing loaded yet, no version check run
    request = RequestFactory().post("/v1/chat/completions", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert (await authorize(request)).client == "key:early"


def test_the_page_session_works_with_csrf_and_not_without(client, django_user_model, settings):
    settings.HAL0_API_AUTH = "required"
    django_user_model.objects.create_user("alice", password="pw-alice-1")
    page = client.get("/accounts/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    r = client.post(
        "/accounts/login/",
        data={"username": "alice", "password": "pw-alice-1", "csrfmiddlewaretoken": token},
    )
    assert r.status_code == 302
    csrf = client.cookies["csrftoken"]
    r = client.post(
        "/v1/chat/completions",
        json=BODY,
        headers={
            "X-CSRFToken": csrf,
            "Origin": client.base_url.scheme + "://" + client.base_url.netloc.decode(),
        },
    )
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"


def test_admin_issues_a_key_once_and_keeps_only_its_hash(admin_client):
    r = admin_client.post(
        "/admin/dispatch/apikey/add/", {"name": "laptop", "enabled": "on"}, follow=True
    )
    assert r.status_code == 200
    shown = re.search(r"<code>(hal0-[^<]+)</code>", r.content.decode())
    assert shown, "the new key is shown once"
    key = shown.group(1)
    row = ApiKey.objects.get(name="laptop")
    assert row.prefix == key[:12] and key not in row.key_hash
    from dispatch.models import hash_key

    assert row.key_hash == hash_key(key)
    page = admin_client.get(f"/admin/dispatch/apikey/{row.pk}/change/").content.decode()
    assert key not in page
