"""Helpers for the live UI's tests: Debian's Chromium through Playwright, logged-in pages,
and a screenshot of every page when a test fails."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct-horse-battery"

# The marks of every test module that drives a page: `pytestmark = BROWSER_MARKS`.
BROWSER_MARKS = [
    pytest.mark.browser,
    # WhiteNoise hands Django a sync file iterator, and Django under ASGI says so once per
    # static file it serves; harmless (the file is read in a thread), so not an error here.
    pytest.mark.filterwarnings(
        "ignore:StreamingHttpResponse must consume synchronous iterators:Warning"
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("the browser tests need Debian's `chromium` on PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser tests need the `playwright` Python package (the dev extra)")
    # Playwright's sync API keeps an event loop running in this thread, which makes Django
    # refuse the test's own ORM calls (fixtures, teardown flush) as "async unsafe". They are
    # plain sync calls from the test thread, so say so while the browser is up.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium, headless=True, args=CHROMIUM_ARGS
            )
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def context(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser profile per test; its pages are photographed if the test fails."""
    ctx = browser.new_context(viewport={"width": 1200, "height": 800})
    ctx.set_default_timeout(15_000)
    failed_before = request.session.testsfailed
    yield ctx
    # The call phase's report is counted before fixtures are torn down, so a rise in the
    # session's failure count here means this test just failed.
    if request.session.testsfailed > failed_before:
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
        for i, page in enumerate(ctx.pages):
            try:
                page.screenshot(path=str(ARTIFACTS / f"{name}-{i}.png"), full_page=True)
            except Exception as exc:  # a crashed page must not hide the test's own failure
                print(f"could not save a screenshot of page {i}: {exc}")
    ctx.close()


@pytest.fixture
def plain_static(settings: Any) -> None:
    """Unhashed static URLs: the manifest storage needs `collectstatic`, which tests skip
    (WhiteNoise serves the files straight from the app folders instead)."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def staff(transactional_db: None) -> Any:
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_superuser("operator", "op@example.invalid", PASSWORD)


def log_in(page: Any, base_url: str, username: str = "operator") -> None:
    """Log in through the login form, the way a person does."""
    page.goto(base_url + "/")
    page.wait_for_url(re.compile(r"/accounts/login/"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(base_url + "/")
