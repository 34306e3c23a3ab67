"""The chat page without a browser: login, its markup, and its static files in production mode."""

from __future__ import annotations

import re

import pytest
from django.core.management import call_command

MANIFEST_STORAGE = "whitenoise.storage.CompressedManifestStaticFilesStorage"
PLAIN_STORAGE = "django.contrib.staticfiles.storage.StaticFilesStorage"


def _storage(settings, backend: str) -> None:
    settings.STORAGES = {**settings.STORAGES, "staticfiles": {"BACKEND": backend}}


def _vendor_urls(html: str) -> dict[str, str]:
    """The vendored modules' URLs the page hands app.js (data attributes: the CSP allows no
    inline script, so no import map)."""
    assert "<script>" not in html and 'type="importmap"' not in html
    return dict(re.findall(r'data-(marked|dompurify)="([^"]+)"', html))


def test_chat_page_needs_a_login(client, db, settings):
    _storage(settings, PLAIN_STORAGE)
    r = client.get("/")
    assert r.status_code == 302
    assert r["Location"] == "/accounts/login/?next=/"
    login = client.get(r["Location"])
    assert login.status_code == 200
    assert b'<label for="id_username">Username</label>' in login.content


def test_chat_page_markup_and_csrf_cookie(admin_client, settings):
    _storage(settings, PLAIN_STORAGE)
    r = admin_client.get("/")
    assert r.status_code == 200
    html = r.content.decode()
    assert '<label for="model">Model</label>' in html
    assert '<select id="model"' in html
    assert '<label for="prompt" class="visually-hidden">Message</label>' in html
    assert 'data-api="/v1/chat/completions"' in html
    assert _vendor_urls(html) == {
        "marked": "/static/dispatch/vendor/marked.esm.js",
        "dompurify": "/static/dispatch/vendor/purify.es.mjs",
    }
    # The page's fetch() reads the token from this cookie for its X-CSRFToken header.
    assert "csrftoken" in r.cookies
    assert not r.cookies["csrftoken"]["httponly"]


def test_collectstatic_keeps_the_vendored_modules_and_the_page_links_hashed_names(
    admin_client, settings, tmp_path
):
    settings.STATIC_ROOT = tmp_path
    _storage(settings, MANIFEST_STORAGE)
    # The manifest storage rewrites each file's references (sourceMappingURL included) and
    # fails on any that points nowhere: this is what `manage.py serve` runs before starting.
    call_command("collectstatic", interactive=False, verbosity=0)
    html = admin_client.get("/").content.decode()
    imports = _vendor_urls(html)
    assert set(imports) == {"marked", "dompurify"}
    for url in [*imports.values(), *re.findall(r'src="(/static/[^"]+)"', html)]:
        assert re.search(r"\.[0-9a-f]{12}\.m?js$", url), url
        assert (tmp_path / url.removeprefix("/static/")).is_file(), url
    app_js = re.search(r'src="(/static/dispatch/app\.[0-9a-f]{12}\.js)"', html)
    assert app_js, "the page does not load its hashed app.js"
    # app.js imports the libraries from the URLs the page names, never by a path of its own
    # that hashing would break.
    source = (tmp_path / app_js.group(1).removeprefix("/static/")).read_text()
    assert re.findall(r"^import ", source, re.M) == []
    assert "import(app.dataset.marked)" in source and "import(app.dataset.dompurify)" in source


@pytest.mark.parametrize(
    ("name", "has_map"),
    [
        ("marked.esm.js", True),
        ("purify.es.mjs", True),
        # uPlot's minified build and stylesheet reference no source map.
        ("uPlot.iife.min.js", False),
        ("uPlot.min.css", False),
    ],
)
def test_vendored_files_match_their_recorded_checksums(name, has_map):
    import hashlib
    from pathlib import Path

    vendor = Path(__file__).resolve().parent.parent / "dispatch/static/dispatch/vendor"
    recorded = (vendor / "VENDOR.md").read_text()
    digest = hashlib.sha256((vendor / name).read_bytes()).hexdigest()
    assert f"{digest}  {name}" in recorded
    assert (vendor / f"{name}.map").is_file() == has_map
    assert ("sourceMappingURL" in (vendor / name).read_text()) == has_map


def test_activity_page_is_for_staff_and_loads_uplot(
    client, admin_client, settings, django_user_model
):
    _storage(settings, PLAIN_STORAGE)
    assert client.get("/activity/").status_code == 302  # to the login
    django_user_model.objects.create_user("plain", password="pw-pw-pw-pw")
    # force_login: django-axes wants the request that Client.login() does not pass.
    client.force_login(django_user_model.objects.get(username="plain"))
    assert client.get("/activity/").status_code == 302  # logged in, not staff
    assert b'href="/activity/"' not in client.get("/").content  # no link for non-staff
    html = admin_client.get("/activity/").content.decode()
    assert '<script src="/static/dispatch/vendor/uPlot.iife.min.js"></script>' in html
    assert 'href="/static/dispatch/vendor/uPlot.min.css"' in html
    assert '<script id="seed" type="application/json">' in html
    assert 'href="/activity/"' in admin_client.get("/").content.decode()  # linked from the chat
