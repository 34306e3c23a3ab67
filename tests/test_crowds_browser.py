"""The pages in real headless Chromium with events in batches (issue 24): the routing log and
Activity's table fill from batches, and events the server could not send are counted on the
page ("N events missed"), never lost without a word."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.browser import (  # noqa: F401 - fixtures
    BROWSER_MARKS,
    browser,
    context,
    log_in,
    plain_static,
    staff,
)
from tests.polling import logged

pytestmark = BROWSER_MARKS

HERMES_MODEL = "qwen3-coder-reap-25b-a3b-q5km"


def _ask(base: str) -> str:
    r = httpx.post(
        base + "/v1/chat/completions",
        json={"model": HERMES_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"]


@pytest.mark.usefixtures("seed_slots", "plain_static", "staff")
def test_pages_show_decisions_from_batches_and_count_what_they_missed(
    hal0,
    context,  # noqa: F811
    monkeypatch,
):
    from playwright.sync_api import expect

    from dispatch.coordination import events

    chat = context.new_page()
    log_in(chat, hal0.url)
    activity = context.new_page()
    activity.goto(hal0.url + "/activity/")
    for page in (chat, activity):
        expect(page.locator("#live")).to_have_text("live")
        expect(page.locator("#missed")).to_be_hidden()
    log = chat.locator("#log li")

    first = _ask(hal0.url)
    expect(chat.locator(f'#log li[title^="{first}"]')).to_have_count(1)
    expect(activity.locator(f'#requests tr[data-request-id="{first}"]')).to_have_count(1)

    # The server cannot send for a while (its batches are full): these three decisions, and
    # the in-flight counts around them, never reach the pages...
    monkeypatch.setattr(events, "QUEUE_LIMIT", 0)
    lost = [_ask(hal0.url) for _ in range(3)]
    # Recorded after the answer: the request log's rows come after the live feed's turn.
    logged(3, request_id__in=lost)
    monkeypatch.undo()
    # ...and the next batch says how many each page missed.
    last = _ask(hal0.url)
    expect(chat.locator(f'#log li[title^="{last}"]')).to_have_count(1)
    expect(activity.locator(f'#requests tr[data-request-id="{last}"]')).to_have_count(1)
    for page in (chat, activity):
        note = page.locator("#missed")
        expect(note).to_be_visible()
        expect(note).to_have_text(re.compile(r"^\d+ events missed$"))
        assert int(note.inner_text().split()[0]) >= len(lost)
    expect(log).to_have_count(2)  # the first and the last: nothing made up for the lost
    for rid in lost:
        expect(activity.locator(f'#requests tr[data-request-id="{rid}"]')).to_have_count(0)
