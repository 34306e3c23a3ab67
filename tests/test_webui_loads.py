"""Models on demand on the chat page, in real headless Chromium (issue 21): each model's load
state and progress in the picker, the eviction preview, the loader's queue per slot and for
the page's own waiting request, and the staff buttons (drain down to `drained`, load, pin).

No watcher runs: the states are written to the database as the loader and the watcher would
write them (each save reloads the table, and the page follows live), and the loader's news is
told to this process as the leading loader's would be. The model servers are the fakes.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.browser import (  # noqa: F401 - fixtures
    BROWSER_MARKS,
    PASSWORD,
    browser,
    context,
    log_in,
    plain_static,
    staff,
)
from tests.polling import wait_until
from tests.test_webui import answer, ask, group, in_plain_thread, option

pytestmark = BROWSER_MARKS

QWEN = "primary/qwen3-coder-40b"
TIMES = "\N{MULTIPLICATION SIGN}"  # how the card counts the waiting requests per model
GEMMA = "primary/gemma3"


def _as_router() -> None:
    """`primary` fronts a server that loads models when asked and keeps one at a time:
    qwen3-coder-40b loaded, gemma3 and smollm2 on its disk. Both slots ready."""
    from dispatch.models import Slot, SlotModel

    for slot in Slot.objects.all():
        slot.state = "ready"
        if slot.name == "primary":
            slot.loads_models, slot.model_limit = True, 1
        slot.save()
    primary = Slot.objects.get(name="primary")
    SlotModel.objects.filter(slot=primary).update(load_state="loaded", last_used_at=10.0)
    for model_id in ("gemma3", "smollm2"):
        SlotModel.objects.create(slot=primary, model_id=model_id, load_state="unloaded")


def set_model(model_id: str, **fields) -> None:
    """Write a model's load fields as the loader would (a save: the table reloads)."""
    from dispatch.models import SlotModel

    def write() -> None:
        row = SlotModel.objects.get(slot__name="primary", model_id=model_id)
        for name, value in fields.items():
            setattr(row, name, value)
        row.save()

    in_plain_thread(write)


def loader_says(**news) -> None:
    """The leading loader's news of `primary`, as every process hears it (sync.loads_news)."""
    from dispatch.coordination import sync

    event = {
        "type": "loads",
        "slot": "primary",
        "loading": None,
        "progress": None,
        "evicting": None,
        "queue": [],
        "failed": {},
        "at": time.time(),
        **news,
    }
    in_plain_thread(lambda: sync.loads_news.notify(event))


@pytest.fixture
def router_page(seed_slots, no_watcher, plain_static, hal0, staff, context):  # noqa: F811
    """A staff user's chat page over the seed's slots, `primary` a router at its limit."""
    from playwright.sync_api import expect

    in_plain_thread(_as_router)
    page = context.new_page()
    log_in(page, hal0.url)
    expect(group(page, "primary")).to_have_attribute("data-state", "ready")
    return page


def card(page, slot: str = "primary"):
    return page.locator(f'#slots .slot[data-slot="{slot}"]')


def test_the_picker_shows_each_models_load_state_and_what_choosing_it_unloads(router_page):
    from playwright.sync_api import expect

    page = router_page
    expect(option(page, QWEN)).to_have_text("qwen3-coder-40b (default) · loaded")
    expect(option(page, GEMMA)).to_have_text("gemma3 · unloaded")
    expect(option(page, GEMMA)).to_have_attribute(
        "title", re.compile("choosing gemma3 unloads qwen3-coder-40b")
    )
    expect(option(page, QWEN)).not_to_have_attribute("title", re.compile("unloads"))
    # The other slot's server keeps what it serves loaded: nothing to foresee there.
    expect(option(page, "agent-hermes/hermes")).to_have_text(
        "hermes → qwen3-coder-reap-25b-a3b-q5km · loaded"
    )
    note = page.locator("#model-note")
    page.select_option("#model", GEMMA)
    expect(note).to_have_text("choosing gemma3 unloads qwen3-coder-40b")
    page.select_option("#model", QWEN)
    expect(note).to_be_empty()
    page.select_option("#model", GEMMA)

    # Loading, with its progress: live, written into the option in place (an open dropdown
    # stays open), and on the slot's card.
    page.evaluate(f"window.gemmaOption = document.querySelector('option[value=\"{GEMMA}\"]')")
    set_model("gemma3", load_state="loading", load_progress=0.4)
    expect(option(page, GEMMA)).to_have_text("gemma3 · loading 40 %")
    expect(card(page).locator('li[data-model="gemma3"] .load')).to_have_text(" · loading 40 %")
    set_model("gemma3", load_progress=0.75)
    expect(option(page, GEMMA)).to_have_text("gemma3 · loading 75 %")
    assert page.evaluate(
        f"window.gemmaOption === document.querySelector('option[value=\"{GEMMA}\"]')"
    )
    expect(note).to_have_text("choosing gemma3 unloads qwen3-coder-40b")

    # Failed: the reason in the option's title, on the card, and under the picker.
    set_model("gemma3", load_state="failed", load_progress=None, load_error="out of memory")
    expect(option(page, GEMMA)).to_have_text("gemma3 · failed")
    expect(option(page, GEMMA)).to_have_attribute("title", re.compile("failed: out of memory"))
    expect(card(page).locator('li[data-model="gemma3"] .load')).to_have_text(
        " · failed: out of memory"
    )
    expect(card(page).locator('li[data-model="gemma3"] .load')).to_have_class(
        re.compile(r"\btone-bad\b")
    )

    # Loaded (and qwen unloaded to make room): nothing left to foresee for gemma3; choosing
    # qwen now would unload gemma3.
    set_model("qwen3-coder-40b", load_state="unloaded")
    set_model("gemma3", load_state="loaded", load_error="", last_used_at=20.0)
    expect(option(page, GEMMA)).to_have_text("gemma3 · loaded")
    expect(note).to_be_empty()
    expect(option(page, QWEN)).to_have_attribute(
        "title", re.compile("choosing qwen3-coder-40b unloads gemma3")
    )


def test_drain_button_counts_in_flight_down_to_drained(router_page, fake_pair, hal0):
    from playwright.sync_api import expect

    from dispatch.models import Slot

    page = router_page
    primary, _ = fake_pair["primary"]
    primary.chunks = 100_000
    primary.chunk_gap_s = 0.05
    badge = card(page).locator(".badge")
    with httpx.Client(base_url=hal0.url, timeout=30) as other:
        body = {"model": QWEN, "stream": True, "messages": []}
        with other.stream("POST", "/v1/chat/completions", json=body) as held:
            assert held.status_code == 200
            expect(card(page).locator(".meta")).to_contain_text("in flight 1")
            card(page).get_by_role("button", name="Drain primary").click()
            expect(badge).to_have_text("draining (1 in flight)")
            expect(card(page).locator(".note")).to_have_text(
                "slot primary is draining: no new requests, those in flight finish"
            )
            assert Slot.objects.get(name="primary").state == "draining"
            # Nothing new is sent there: its models cannot be chosen.
            expect(option(page, QWEN)).to_be_disabled()
            expect(card(page)).to_have_attribute("data-drained", "false")
    # The one in flight ended: nothing left, the slot reads drained.
    expect(badge).to_have_text("drained")
    expect(card(page)).to_have_attribute("data-drained", "true")
    card(page).get_by_role("button", name="Undrain primary").click()
    expect(badge).to_have_text("unknown")  # probed afresh (no watcher runs here)
    expect(card(page).get_by_role("button", name="Drain primary")).to_be_visible()
    assert Slot.objects.get(name="primary").state == "unknown"


def test_the_loaders_queue_shows_on_the_slot_and_for_the_waiting_chat(router_page, fake_pair):
    from playwright.sync_api import expect

    page = router_page
    now = time.time()
    loader_says(
        loading="gemma3",
        progress=0.4,
        evicting="qwen3-coder-40b",
        queue=[
            {"ticket": "a", "model": "gemma3", "since": now - 14},
            {"ticket": "b", "model": "smollm2", "since": now - 3},
        ],
        at=now,
    )
    queue = card(page).locator(".queue")
    expect(queue.locator(".doing")).to_have_text(
        ["loading gemma3 40 %", "evicting qwen3-coder-40b"]
    )
    expect(queue.locator(".waiting")).to_have_text(f"queued: 2 (gemma3 {TIMES}1, smollm2 {TIMES}1)")
    expect(queue.locator(".waiters li")).to_have_text(
        [re.compile(r"^gemma3 · 1[4-9] s$"), re.compile(r"^smollm2 · [3-9] s$")]
    )
    expect(queue.locator('.waiters li[data-position="2"]')).to_contain_text("smollm2")
    # A page opened now hears it in its snapshot.
    page.reload()
    expect(card(page).locator(".queue .waiting")).to_have_text(
        f"queued: 2 (gemma3 {TIMES}1, smollm2 {TIMES}1)"
    )

    # The page's own request waits (its model server is slow to answer): while it does, the
    # answer says where it stands in the loader's queue, found by its own request id.
    primary, _ = fake_pair["primary"]
    primary.delay_headers_s = 4
    ask(page, QWEN, "are you there?")
    sent = wait_until(
        lambda: primary.seen("/v1/chat/completions"), "the request reached the model server"
    )
    mine = sent[0].headers["x-request-id"]
    loader_says(
        loading="gemma3",
        progress=0.4,
        queue=[
            {"ticket": "a", "model": "gemma3", "since": now - 14},
            {"ticket": mine, "model": "qwen3-coder-40b", "since": time.time()},
        ],
    )
    meta = answer(page).locator(".meta")
    expect(meta).to_have_text(re.compile(r"^queued 2nd — loading gemma3, 40 %, \d+ s$"))
    expect(meta).to_contain_text("answered by primary", timeout=15_000)
    # The loader is idle again: the queue goes from the card.
    loader_says()
    expect(card(page).locator(".queue")).to_have_count(0)


def test_the_streams_own_queue_comments_are_shown_until_the_first_token(router_page, fake_pair):
    from playwright.sync_api import expect

    page = router_page
    primary, _ = fake_pair["primary"]
    primary.stream_comments = ["hal0 queued position=3 reason=loading model=gemma3 progress=55"]
    primary.comment_gap_s = 3
    ask(page, QWEN, "hello?")
    meta = answer(page).locator(".meta")
    expect(meta).to_have_text(re.compile(r"^queued 3rd — loading gemma3, 55 %, \d+ s$"))
    expect(answer(page).locator(".body")).to_contain_text("hello from primary")
    expect(meta).to_contain_text("answered by primary")


def test_staff_buttons_load_and_pin_models_and_show_a_refusal(router_page):
    from playwright.sync_api import expect

    from dispatch.models import SlotModel

    page = router_page
    qwen = card(page).locator('li[data-model="qwen3-coder-40b"]')
    gemma = card(page).locator('li[data-model="gemma3"]')
    gemma.get_by_role("button", name="Load gemma3").click()
    expect(card(page).locator(".note")).to_have_text("asked slot primary to load gemma3")
    assert SlotModel.objects.get(slot__name="primary", model_id="gemma3").wanted == "load"
    qwen.get_by_role("button", name="Pin qwen3-coder-40b").click()
    expect(qwen.locator(".pinned")).to_have_text(" · pinned")
    expect(qwen.get_by_role("button", name="Unpin qwen3-coder-40b")).to_be_visible()
    # Pinned, the only model loaded is never unloaded to make room: no preview any more.
    expect(option(page, GEMMA)).not_to_have_attribute("title", re.compile("unloads"))
    qwen.get_by_role("button", name="Unload qwen3-coder-40b").click()
    expect(card(page).locator(".note.error")).to_have_text(
        "'qwen3-coder-40b' is pinned; unpin it first"
    )
    assert SlotModel.objects.get(slot__name="primary", model_id="qwen3-coder-40b").wanted == ""
    # The slot that does not load models on request offers no load buttons, only pins.
    hermes = card(page, "agent-hermes")
    expect(hermes.get_by_role("button", name=re.compile("^(Load|Unload) "))).to_have_count(0)
    expect(hermes.get_by_role("button", name="Drain agent-hermes")).to_be_visible()


def test_a_page_that_is_not_staff_gets_no_buttons(
    seed_slots,
    no_watcher,
    plain_static,  # noqa: F811
    hal0,
    context,  # noqa: F811
):
    from django.contrib.auth import get_user_model
    from playwright.sync_api import expect

    in_plain_thread(_as_router)
    get_user_model().objects.create_user("someone", password=PASSWORD)
    page = context.new_page()
    log_in(page, hal0.url, "someone")
    expect(option(page, GEMMA)).to_have_text("gemma3 · unloaded")  # the states, all the same
    expect(card(page).locator(".models li")).to_have_count(3)
    expect(page.locator("#slots button")).to_have_count(0)
    # Nor may the page's session call the endpoint behind them.
    status = page.evaluate(
        """async () => {
            const token = document.cookie.match(/csrftoken=([^;]+)/)[1];
            const r = await fetch("/control/", {method: "POST", headers: {"X-CSRFToken": token,
              "Content-Type": "application/json"}, body: JSON.stringify({action: "drain",
              slot: "primary"})});
            return [r.status, (await r.json()).error.code];
        }"""
    )
    assert status == [403, "staff_only"]
