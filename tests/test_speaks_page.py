"""The page says what each slot serves, natively or translated by hal0web, and where what
it speaks comes from (issue 22), in real headless Chromium against a live hal0web."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.browser import (  # noqa: F401 - fixtures
    BROWSER_MARKS,
    browser,
    context,
    log_in,
    plain_static,
    staff,
)
from tests.conftest import add_slot
from tests.fakes import FakeUpstream, ServerThread
from tests.toy_translation import toy

pytestmark = BROWSER_MARKS


@pytest.fixture
def lcp(transactional_db) -> Iterator[str]:
    """llama-cpp-python's server: no Anthropic Messages, no Responses API."""
    fake = FakeUpstream("lcp", models=["smollm2-lcp"], missing={"/v1/messages", "/v1/responses"})
    server = ServerThread(fake).start()
    yield server.url + "/v1"
    server.stop()


def test_a_slot_card_says_what_it_serves_and_how(lcp, plain_static, hal0, staff, context):  # noqa: F811 - fixtures from tests.browser
    from playwright.sync_api import expect

    with toy():
        add_slot("lcp", lcp, ["smollm2-lcp"])
        page = context.new_page()
        log_in(page, hal0.url)
        served = page.locator('#slots .slot[data-slot="lcp"] .endpoints')
        # Once the watcher has asked: Messages and Responses are missing; Messages is
        # translated (the toy translation), Responses not served at all.
        expect(served).to_have_text("serves chat/completions, completions, messages · translated")
        expect(served).to_have_attribute(
            "title",
            "speaks chat/completions, completions: as its server answered when asked; the rest "
            "is translated by hal0web",
        )
