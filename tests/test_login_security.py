"""Guessing is slow (issue 14): logins locked per user and per address after a few failures,
and weak passwords refused (HAL0_ADMIN_PASSWORD's: tests/test_serve.py). Real HTTP against a
live hal0web, each client from its own loopback address (127.0.0.0/8 is all this machine's),
so "per address" means what it says."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from django.conf import settings as django_settings

GOOD = "correct-horse-battery"
LOCKED = "Too many failed logins"


@pytest.fixture
def users(transactional_db: None) -> None:
    from django.contrib.auth import get_user_model

    User = get_user_model()
    User.objects.create_superuser("op", "op@example.invalid", GOOD)
    User.objects.create_user("ann", password=GOOD)


def log_in(base: str, address: str, username: str, password: str, path: str) -> httpx.Response:
    """One login through the form, from ``address``, as a browser posts it."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(base_url=base, transport=transport, timeout=10) as client:
        form = client.get(path)
        assert form.status_code == 200, form.text
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert token
        return client.post(
            path,
            data={
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": token.group(1),
                "next": "/",
            },
        )


def assert_locked(r: httpx.Response) -> None:
    # A page of ours, not a 500 nor a bare text: the same look as the login form.
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert LOCKED in r.text and "Back to the login" in r.text


@pytest.mark.parametrize("path", ["/admin/login/", "/accounts/login/"])
def test_a_username_is_locked_from_every_address(hal0, users, path):
    limit = django_settings.AXES_FAILURE_LIMIT
    assert limit == 5  # the default: HAL0_LOGIN_FAILURES
    for i in range(limit - 1):  # each guess from another address
        r = log_in(hal0.url, f"127.0.0.{10 + i}", "op", f"guess-{i}", path)
        assert r.status_code == 200  # the form again, with its error (the admin's or ours)
        assert "correct username and password" in r.text or "didn't match" in r.text
    # Before the limit the right password still works...
    assert log_in(hal0.url, "127.0.0.30", "op", GOOD, path).status_code == 302
    assert_locked(log_in(hal0.url, "127.0.0.31", "op", "guess-last", path))
    # ...after it, not even the right one, from an address that never failed.
    assert_locked(log_in(hal0.url, "127.0.0.32", "op", GOOD, path))
    # Other users are not locked out by op's lockout.
    assert log_in(hal0.url, "127.0.0.32", "ann", GOOD, "/accounts/login/").status_code == 302


def test_an_address_is_locked_for_every_username(hal0, users):
    path = "/accounts/login/"
    for i in range(django_settings.AXES_FAILURE_LIMIT):  # one guess per username
        log_in(hal0.url, "127.0.0.40", f"user{i}", "guess", path)
    assert_locked(log_in(hal0.url, "127.0.0.40", "ann", GOOD, path))
    assert_locked(log_in(hal0.url, "127.0.0.40", "op", GOOD, "/admin/login/"))
    # The same users from another address log in: their names were never guessed at.
    assert log_in(hal0.url, "127.0.0.41", "ann", GOOD, path).status_code == 302
    # The lean /v1 handler has no login and no lockout: the locked address still calls it.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.40")) as c:
        r = c.get(hal0.url + "/v1/models")
    assert r.status_code == 200


def test_the_lockout_ends_after_the_cool_off(hal0, users, settings):
    import datetime as dt

    settings.AXES_COOLOFF_TIME = dt.timedelta(seconds=2)
    settings.AXES_FAILURE_LIMIT = 2
    path = "/accounts/login/"
    log_in(hal0.url, "127.0.0.50", "ann", "guess-1", path)
    assert_locked(log_in(hal0.url, "127.0.0.50", "ann", "guess-2", path))
    assert_locked(log_in(hal0.url, "127.0.0.51", "ann", GOOD, path))
    time.sleep(2.5)
    assert log_in(hal0.url, "127.0.0.51", "ann", GOOD, path).status_code == 302


# --- password rules -----------------------------------------------------------------------


@pytest.mark.parametrize("weak", ["password", "12345678", "short1!", "ann-the-user1"])
def test_weak_passwords_are_refused_in_the_admin(admin_client, weak):
    r = admin_client.post(
        "/admin/auth/user/add/",
        {
            "username": "ann-the-user",
            "password1": weak,
            "password2": weak,
            "usable_password": "true",
        },
    )
    assert r.status_code == 200  # the form again, with why
    assert "errornote" in r.content.decode() or "errorlist" in r.content.decode()
    from django.contrib.auth import get_user_model

    assert not get_user_model().objects.filter(username="ann-the-user").exists()


def test_a_strong_password_is_taken_in_the_admin(admin_client):
    r = admin_client.post(
        "/admin/auth/user/add/",
        {"username": "ann", "password1": GOOD, "password2": GOOD, "usable_password": "true"},
    )
    assert r.status_code == 302, r.content.decode()


@pytest.mark.postgres
def test_the_lockout_holds_on_postgresql(tmp_path, pg_url):
    """django-axes keeps attempts in the database: its migrations run with ours, and the
    lockout holds on PostgreSQL (the multi-worker setup) as on SQLite."""
    from tests.processes import Hal0Process, create_user, manage, server_env

    env = server_env(tmp_path, DATABASE_URL=pg_url, HAL0_WATCHER="false", HAL0_LOGIN_FAILURES="2")
    manage(env, "migrate", "-v0")
    create_user(env, "ann", GOOD)
    server = Hal0Process(env, tmp_path / "hal0.log").wait_ready()
    try:
        path = "/accounts/login/"
        assert log_in(server.url, "127.0.0.60", "ann", "guess-1", path).status_code == 200
        assert_locked(log_in(server.url, "127.0.0.61", "ann", "guess-2", path))
        assert_locked(log_in(server.url, "127.0.0.62", "ann", GOOD, path))
        listed = manage(env, "axes_list_attempts")
        assert "ann" in listed
        manage(env, "axes_reset_username", "ann")  # the README's way out
        assert log_in(server.url, "127.0.0.62", "ann", GOOD, path).status_code == 302
    finally:
        server.stop()
