"""The Activity page in real headless Chromium: seeded from the request log, moved by traffic."""

from __future__ import annotations

import datetime as dt
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
from tests.polling import wait_until

pytestmark = BROWSER_MARKS

HERMES_MODEL = "qwen3-coder-reap-25b-a3b-q5km"


@pytest.mark.usefixtures("seed_slots", "plain_static", "staff")
def test_charts_seeded_from_the_log_move_with_traffic(hal0, context):  # noqa: F811
    from playwright.sync_api import expect

    from dispatch.models import RequestLog

    now = dt.datetime.now(dt.UTC)
    for i in range(4):  # the last few minutes, as the request log kept them
        RequestLog.objects.create(
            at=now - dt.timedelta(minutes=3, seconds=i),
            request_id=f"seeded-{i}",
            endpoint="chat/completions",
            model="qwen3-coder-40b",
            slot="primary",
            resolution="model:primary",
            status=200,
            duration_ms=12.0,
            why="answered by primary: the only slot serving 'qwen3-coder-40b' (ready)",
        )
    RequestLog.objects.create(  # older than the window: not charted
        at=now - dt.timedelta(minutes=20),
        request_id="too-old",
        endpoint="chat/completions",
        slot="primary",
        status=200,
        duration_ms=1.0,
    )
    page = context.new_page()
    log_in(page, hal0.url)
    page.get_by_role("link", name="Activity").click()
    page.wait_for_url(hal0.url + "/activity/")
    expect(page.locator("#live")).to_have_text("live")
    primary = page.locator('.chart[data-slot="primary"]')
    hermes = page.locator('.chart[data-slot="agent-hermes"]')
    expect(primary).to_have_attribute("data-requests", "4")
    expect(primary.locator("canvas")).to_have_count(1)
    expect(hermes).to_have_attribute("data-requests", "0")  # from the snapshot: no traffic yet
    expect(page.locator("#requests tbody tr")).to_have_count(4)
    expect(page.locator('#requests tr[data-request-id="seeded-0"] td.why')).to_have_text(
        "answered by primary: the only slot serving 'qwen3-coder-40b' (ready)"
    )
    canvas = hermes.locator("canvas")
    before = canvas.screenshot()
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        for _ in range(6):
            r = c.post(
                "/v1/chat/completions",
                json={"model": HERMES_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200
        last = r.headers["X-Request-Id"]
        assert (
            c.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code
            == 404
        )
    expect(hermes).to_have_attribute("data-requests", "6")
    expect(page.locator("#requests tbody tr")).to_have_count(11)
    row = page.locator(f'#requests tr[data-request-id="{last}"]')
    expect(row.locator("td.why")).to_have_text(
        f"answered by agent-hermes: the only slot serving '{HERMES_MODEL}' (ready)"
    )
    # The line moved: the chart's pixels are not what they were before the requests (uPlot
    # draws on the next frame, so give it a few).
    wait_until(lambda: canvas.screenshot() != before, "the chart to change", 5, 0.1)
    # The table filters as you type, and new rows obey the filter.
    page.get_by_label("Filter").fill("agent-hermes")
    expect(page.locator("#requests tbody tr:visible")).to_have_count(6)
    page.get_by_label("Filter").fill("404")
    expect(page.locator("#requests tbody tr:visible")).to_have_count(1)
    expect(page.locator("#requests tbody tr:visible td").nth(3)).to_have_text(
        re.compile("404 model_not_found")
    )
