"""The page's staff buttons call `POST /control/` (dispatch.web.operator): staff only, CSRF
checked, JSON answers in every case, through dispatch.lifecycle.control like the admin."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot

pytestmark = pytest.mark.django_db

URL = "/control/"


@pytest.fixture(autouse=True)
def _plain_static(settings):
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def router():
    slot = add_slot(
        "router", "http://127.0.0.1:9/v1", ["gemma3", "smollm2"], aliases={"g": "gemma3"}
    )
    Slot.objects.filter(pk=slot.pk).update(loads_models=True, model_limit=1, state="ready")
    return slot


def page_client(*, staff: bool) -> Client:
    """A browser's session on the chat page: logged in, with the CSRF cookie the page got."""
    user = get_user_model().objects.create_user(
        "staff" if staff else "someone", password="pw-for-tests", is_staff=staff
    )
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.get("/").status_code == 200
    return client


def post(client: Client, body: object, *, token: bool = True, raw: str | None = None):
    headers = {"X-CSRFToken": client.cookies["csrftoken"].value} if token else {}
    data = raw if raw is not None else json.dumps(body)
    return client.post(URL, data, content_type="application/json", headers=headers)


def test_staff_drain_and_undrain_a_slot(router):
    client = page_client(staff=True)
    r = post(client, {"action": "drain", "slot": "router"})
    assert r.status_code == 200
    assert r.json() == {
        "ok": True,
        "message": "slot router is draining: no new requests, those in flight finish",
    }
    assert Slot.objects.get(name="router").state == "draining"
    r = post(client, {"action": "undrain", "slot": "router"})
    assert r.status_code == 200 and Slot.objects.get(name="router").state == "unknown"


def test_staff_load_unload_pin_a_model(router):
    client = page_client(staff=True)
    assert post(client, {"action": "load", "slot": "router", "model": "smollm2"}).json() == {
        "ok": True,
        "message": "asked slot router to load smollm2",
    }
    assert SlotModel.objects.get(model_id="smollm2").wanted == "load"
    assert post(client, {"action": "pin", "slot": "router", "model": "g"}).status_code == 200
    assert set(SlotModel.objects.filter(pinned=True).values_list("model_id", flat=True)) == {
        "g",
        "gemma3",
    }
    # Refused by the control: 409 with its reason, nothing written.
    r = post(client, {"action": "unload", "slot": "router", "model": "gemma3"})
    assert r.status_code == 409
    assert r.json() == {
        "error": {"code": "refused", "message": "'gemma3' is pinned; unpin it first"}
    }
    assert SlotModel.objects.get(model_id="gemma3").wanted == ""
    assert post(client, {"action": "unpin", "slot": "router", "model": "gemma3"}).status_code == 200
    r = post(client, {"action": "unload", "slot": "router", "model": "gemma3"})
    assert r.status_code == 200 and SlotModel.objects.get(model_id="gemma3").wanted == "unload"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"action": "explode", "slot": "router"}, 400, "action must be one of: drain, undrain"),
        ({"action": "drain"}, 400, "slot must be a slot's name."),
        ({"action": "load", "slot": "router"}, 400, "load needs a model"),
        ({"action": "load", "slot": "router", "model": 7}, 400, "load needs a model"),
        ([1, 2], 400, "The body must be a JSON object."),
        ({"action": "drain", "slot": "nope"}, 409, "no slot named 'nope'"),
        ({"action": "load", "slot": "router", "model": "nope"}, 409, "has no model 'nope'"),
    ],
)
def test_bad_asks_get_a_json_error(router, body, status, message):
    r = post(page_client(staff=True), body)
    assert r.status_code == status
    assert r["Content-Type"] == "application/json"
    assert message in r.json()["error"]["message"]


def test_a_body_that_is_not_json(router):
    r = post(page_client(staff=True), None, raw="action=drain&slot=router")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert Slot.objects.get(name="router").state == "ready"


def test_a_body_nested_too_deep(router):
    # The bound every JSON reader of hal0web holds to (dispatch/lib/json_reader.py).
    deep = '{"action": "drain", "slot": ' + "[" * 600 + '"\\ud83d"' + "]" * 600 + "}"
    r = post(page_client(staff=True), None, raw=deep)
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep"
    assert "512 levels" in r.json()["error"]["message"]
    assert Slot.objects.get(name="router").state == "ready"


def test_only_staff_and_only_from_the_page(router):
    # Not staff: 403 in JSON, nothing done.
    r = post(page_client(staff=False), {"action": "drain", "slot": "router"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "staff_only"
    # Nobody logged in: the same, not a redirect to the login page.
    anon = Client(enforce_csrf_checks=True)
    r = anon.post(
        URL, json.dumps({"action": "drain", "slot": "router"}), content_type="application/json"
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "staff_only"
    # Staff, but without the page's CSRF token (another site's form, say): 403 in JSON.
    r = post(page_client(staff=True), {"action": "drain", "slot": "router"}, token=False)
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    assert Slot.objects.get(name="router").state == "ready"
    # Another method: 405 with Allow.
    r = Client().get(URL)
    assert r.status_code == 405 and r["Allow"] == "POST"


def test_only_a_staff_page_is_given_the_buttons(router):
    staff_page = page_client(staff=True).get("/").content.decode()
    assert 'data-control="/control/"' in staff_page
    other_page = Client()
    user = get_user_model().objects.create_user("other", password="pw-for-tests")
    other_page.force_login(user)
    assert "data-control" not in other_page.get("/").content.decode()
