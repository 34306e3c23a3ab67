"""The Content-Security-Policy in real headless Chromium (issue 14): the chat page, Activity,
the login page and the admin load and work under it, and the browser reports no violation."""

from __future__ import annotations

import time

import pytest

from tests.browser import (  # noqa: F401 - fixtures
    BROWSER_MARKS,
    browser,
    context,
    log_in,
    plain_static,
    staff,
)

pytestmark = BROWSER_MARKS

HERMES = "agent-hermes/qwen3-coder-reap-25b-a3b-q5km"

# Every violation the page sees, recorded before any of its own scripts run.
RECORD_VIOLATIONS = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(`${e.violatedDirective} blocked ${e.blockedURI || "inline"} at ${e.sourceFile}:${e.lineNumber}`);
});
"""


@pytest.fixture
def watched(context):  # noqa: F811 - fixture from tests.browser
    """The context's pages record CSP violations, from the event and from the console."""
    console: list[str] = []
    context.add_init_script(RECORD_VIOLATIONS)
    context.on(
        "page",
        lambda page: page.on(
            "console",
            lambda msg: console.append(msg.text) if "Content Security Policy" in msg.text else None,
        ),
    )
    return context, console


def violations(page, console: list[str]) -> list[str]:
    time.sleep(0.3)  # the event is dispatched after the blocked load
    return [*page.evaluate("window.__csp"), *console]


def goto(page, url: str) -> None:
    r = page.goto(url)
    assert r is not None and r.ok, url
    policy = r.headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy, (url, policy)  # the policy is really in force
    page.wait_for_load_state("networkidle")


def test_the_pages_and_the_admin_run_under_the_policy(
    seed_slots,
    plain_static,  # noqa: F811 - fixture from tests.browser
    hal0,
    staff,  # noqa: F811 - fixture from tests.browser
    watched,
):
    from playwright.sync_api import expect

    ctx, console = watched
    page = ctx.new_page()
    goto(page, hal0.url + "/accounts/login/")
    assert violations(page, console) == []
    log_in(page, hal0.url)
    # The chat page works: the live picker (WebSocket: connect-src 'self'), and an answer
    # rendered as Markdown by the vendored modules app.js imports.
    expect(page.locator(f'#model option[value="{HERMES}"]')).to_be_enabled()
    page.select_option("#model", HERMES)
    page.get_by_label("Message").fill("hi")
    page.get_by_label("Message").press("Enter")
    body = page.locator("#messages .msg.assistant .body").first
    expect(body).to_contain_text("hello from agent-hermes")
    expect(page.locator("#live")).to_have_attribute("data-live", "live")
    assert violations(page, console) == []

    goto(page, hal0.url + "/activity/")
    expect(page.locator("#charts .chart .uplot").first).to_be_visible()
    assert violations(page, console) == []

    slot_id = seed_slots["agent-hermes"].pk
    for path in (
        "/admin/",
        "/admin/dispatch/slot/",
        f"/admin/dispatch/slot/{slot_id}/change/",
        "/admin/dispatch/slot/add/",
        "/admin/auth/user/",
        "/admin/auth/user/add/",
    ):
        goto(page, hal0.url + path)
        assert violations(page, console) == [], path

    # The recording itself works: an inline script, as an attacker's injected markup would
    # have one, is blocked and reported.
    page.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
        " document.body.append(s); }"
    )
    assert page.evaluate("window.ran") is None
    assert any("script-src" in v for v in violations(page, console))
