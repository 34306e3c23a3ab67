"""The chat page in real headless Chromium against a live hal0web and two fake upstreams.

Plain sync tests: Playwright's sync API runs its own loop in this thread, and hal0web and the
fakes run in their own threads.
"""

from __future__ import annotations

import re
import threading

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
from tests.fakes import ServerThread
from tests.polling import wait_until

pytestmark = BROWSER_MARKS

HERMES = "agent-hermes/qwen3-coder-reap-25b-a3b-q5km"
PRIMARY = "primary/qwen3-coder-40b"


@pytest.fixture
def chat(seed_slots, plain_static, hal0, staff, context):  # noqa: F811 - fixtures from tests.browser
    """A logged-in chat page whose picker shows both slots ready."""
    from playwright.sync_api import expect

    page = context.new_page()
    log_in(page, hal0.url)
    for name in ("primary", "agent-hermes"):
        expect(group(page, name)).to_have_attribute("data-state", "ready")
    return page


def group(page, slot: str):
    return page.locator(f'#model optgroup[data-slot="{slot}"]')


def option(page, value: str):
    return page.locator(f'#model option[value="{value}"]')


def answer(page, n: int = 0):
    return page.locator("#messages .msg.assistant").nth(n)


def ask(page, model: str, text: str) -> None:
    page.select_option("#model", model)
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def in_plain_thread(fn) -> None:
    """Run a database write where no event loop runs (Playwright keeps one in this thread),
    so its after-commit broadcast takes the same path as an admin view's."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)
        finally:
            from django.db import connection

            connection.close()

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


def test_login_is_required_and_the_picker_lists_both_slots_with_states(chat, hal0):
    from playwright.sync_api import expect

    page = chat
    expect(page.get_by_label("Model")).to_have_id("model")
    expect(group(page, "primary")).to_have_attribute("label", "primary · ready")
    expect(group(page, "agent-hermes")).to_have_attribute("label", "agent-hermes · ready")
    # One option per model, qualified; the slot's default first.
    values = (
        group(page, "agent-hermes")
        .locator("option")
        .evaluate_all("os => os.map(o => [o.value, o.disabled])")
    )
    assert values == [[HERMES, False], ["agent-hermes/hermes", False]]
    expect(option(page, PRIMARY)).to_be_enabled()
    # The side panel has a card per slot and says how each is doing.
    expect(page.locator('#slots .slot[data-slot="agent-hermes"] .badge')).to_have_text("ready")
    expect(page.locator('#slots .slot[data-slot="primary"]')).to_contain_text("qwen3-coder-40b")
    # A fresh browser without the session is sent to the login form.
    other = page.context.browser.new_context()
    try:
        anon = other.new_page()
        anon.goto(hal0.url + "/")
        expect(anon).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
    finally:
        other.close()
    # Logging out (a POST form in the top bar) leads back to the login form.
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/$"))
    page.goto(page.url.replace("/accounts/login/", "/"))
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))


def test_the_chosen_slot_answers_and_the_page_says_so(chat, fake_pair):
    from playwright.sync_api import expect

    page = chat
    hermes, _ = fake_pair["agent-hermes"]
    page.select_option("#model", HERMES)
    box = page.get_by_label("Message")
    box.fill("line one")
    box.press("Shift+Enter")  # a new line, not a send
    box.press_sequentially("line two")
    expect(page.locator("#messages .msg")).to_have_count(0)
    box.press("Enter")
    expect(answer(page).locator(".body")).to_contain_text("hello from agent-hermes")
    meta = answer(page).locator(".meta")
    expect(meta).to_contain_text("answered by agent-hermes · qualified:agent-hermes")
    expect(meta).to_contain_text(re.compile(r"TTFT \d+ ms · [\d.]+ tok/s"))
    sent = [s for s in hermes.requests if s.path == "/v1/chat/completions"]
    assert len(sent) == 1
    assert sent[0].json["stream"] is True
    assert sent[0].json["model"] == "qwen3-coder-reap-25b-a3b-q5km"
    assert sent[0].json["messages"] == [{"role": "user", "content": "line one\nline two"}]
    assert "authorization" not in sent[0].headers
    # The routing log shows the decision.
    expect(page.locator("#log li").first).to_contain_text(f"{HERMES} → agent-hermes")
    # A second turn carries the conversation so far.
    ask(page, HERMES, "and again")
    expect(answer(page, 1).locator(".meta")).to_contain_text("answered by agent-hermes")
    sent = [s for s in hermes.requests if s.path == "/v1/chat/completions"]
    assert [m["role"] for m in sent[1].json["messages"]] == ["user", "assistant", "user"]
    assert sent[1].json["messages"][1]["content"].startswith("hello from agent-hermes")
    # The choice survives a reload.
    page.reload()
    expect(group(page, "agent-hermes")).to_have_attribute("data-state", "ready")
    expect(page.locator("#model")).to_have_value(HERMES)


def test_each_answer_says_why_its_slot_answered(chat, fake_pair):
    from playwright.sync_api import expect

    page = chat
    ask(page, HERMES, "why you?")
    expect(answer(page).locator(".body")).to_contain_text("hello from agent-hermes")
    # The live decision event's explanation, matched to this answer by its request id.
    expect(answer(page).locator(".why")).to_have_text(
        f"answered by agent-hermes: the request pinned slot agent-hermes ('{HERMES}')"
    )
    ask(page, PRIMARY, "and you?")
    expect(answer(page, 1).locator(".why")).to_have_text(
        f"answered by primary: the request pinned slot primary ('{PRIMARY}')"
    )
    # Each answer keeps its own explanation.
    expect(answer(page).locator(".why")).to_contain_text("agent-hermes")
    expect(page.locator("#log li").first).to_have_attribute(
        "title", re.compile("answered by primary")
    )


def test_page_calls_ride_on_the_session_when_the_api_requires_keys(chat, hal0, settings):
    from playwright.sync_api import expect

    settings.HAL0_API_AUTH = "required"
    # Outside the page, no key means no answer...
    r = httpx.post(f"{hal0.url}/v1/chat/completions", json={"model": PRIMARY, "messages": []})
    assert r.status_code == 401
    # ...while the logged-in page needs none: its session and CSRF token vouch for it.
    page = chat
    ask(page, PRIMARY, "hello?")
    expect(answer(page).locator(".meta")).to_contain_text("answered by primary")
    expect(answer(page).locator(".error")).to_have_count(0)


def test_picker_follows_an_upstream_going_offline_and_back_without_reload(chat, fake_pair):
    from playwright.sync_api import expect

    page = chat
    page.select_option("#model", HERMES)
    page.evaluate("window.sameDocument = true")
    hermes, server = fake_pair["agent-hermes"]
    server.stop()
    revived = None
    try:
        expect(group(page, "agent-hermes")).to_have_attribute("data-state", "offline")
        expect(group(page, "agent-hermes")).to_have_attribute("label", "agent-hermes · offline")
        expect(option(page, HERMES)).to_be_disabled()
        expect(option(page, HERMES)).to_have_attribute("title", re.compile("offline"))
        expect(option(page, PRIMARY)).to_be_enabled()
        expect(page.locator('#slots .slot[data-slot="agent-hermes"] .badge')).to_have_text(
            "offline"
        )
        revived = ServerThread(hermes, port=server.port).start()
        expect(group(page, "agent-hermes")).to_have_attribute("data-state", "ready")
        expect(option(page, HERMES)).to_be_enabled()
        expect(option(page, HERMES)).not_to_have_attribute("title", re.compile("offline"))
        # Same document all along, and the user's choice held through it.
        assert page.evaluate("window.sameDocument") is True
        expect(page.locator("#model")).to_have_value(HERMES)
    finally:
        if revived is not None:
            revived.stop()


def test_admin_edit_in_a_second_page_reaches_the_picker_live(chat, seed_slots, hal0):
    from playwright.sync_api import expect

    page = chat
    page.evaluate("window.sameDocument = true")
    slot = seed_slots["agent-hermes"]
    admin = page.context.new_page()
    admin.goto(f"{hal0.url}/admin/dispatch/slot/{slot.pk}/change/")
    # The slot's models inline: use its blank extra row, or ask for one.
    model_ids = admin.locator('input[name^="models-"][name$="-model_id"]:not([name*="__prefix__"])')
    if "" not in model_ids.evaluate_all("inputs => inputs.map(i => i.value)"):
        admin.locator(".add-row a").first.click()
    model_ids.last.fill("hermes-extra")
    admin.locator('input[name="_save"]').click()
    expect(admin.locator(".messagelist")).to_contain_text("was changed successfully")
    expect(option(page, "agent-hermes/hermes-extra")).to_be_attached()
    # The fake does not serve it: the card says so once the watcher has looked.
    expect(page.locator('#slots .slot[data-slot="agent-hermes"] .warn')).to_contain_text(
        "hermes-extra"
    )
    # Disable it in the admin: its group says so and its models cannot be chosen.
    admin.goto(f"{hal0.url}/admin/dispatch/slot/{slot.pk}/change/")
    admin.get_by_label("Enabled").uncheck()
    admin.locator('input[name="_save"]').click()
    expect(admin.locator(".messagelist")).to_contain_text("was changed successfully")
    expect(group(page, "agent-hermes")).to_have_attribute("label", "agent-hermes · disabled")
    expect(option(page, HERMES)).to_be_disabled()
    expect(option(page, HERMES)).to_have_attribute("title", re.compile("disabled"))
    # Rename it: the old group goes, the new one comes with the same models.
    admin.goto(f"{hal0.url}/admin/dispatch/slot/{slot.pk}/change/")
    admin.get_by_label("Name").fill("hermes-two")
    admin.locator('input[name="_save"]').click()
    expect(admin.locator(".messagelist")).to_contain_text("was changed successfully")
    expect(group(page, "agent-hermes")).to_have_count(0)
    expect(option(page, "hermes-two/hermes-extra")).to_be_attached()
    expect(page.locator('#slots .slot[data-slot="hermes-two"]')).to_be_visible()
    assert page.evaluate("window.sameDocument") is True


def test_an_alias_pattern_is_on_the_card_and_never_a_picker_choice(chat, seed_slots):
    from playwright.sync_api import expect

    from dispatch.models import SlotModel

    page = chat
    hermes = seed_slots["agent-hermes"]

    def add_pattern() -> None:
        SlotModel.objects.create(
            slot=hermes,
            model_id="claude-haiku-*",
            upstream_model="qwen3-coder-reap-25b-a3b-q5km",
            source="alias",
        )

    in_plain_thread(add_pattern)
    card = page.locator('#slots .slot[data-slot="agent-hermes"] li[data-model="claude-haiku-*"]')
    expect(card).to_contain_text("claude-haiku-* → qwen3-coder-reap-25b-a3b-q5km (pattern)")
    # The picker is unchanged: a pattern names models, it is none to choose.
    values = (
        group(page, "agent-hermes").locator("option").evaluate_all("os => os.map(o => o.value)")
    )
    assert values == [HERMES, "agent-hermes/hermes"]
    # The page still works: the slot's model answers.
    ask(page, HERMES, "hello")
    expect(answer(page)).to_contain_text("agent-hermes")


def test_stop_ends_a_long_stream_and_the_upstream_sees_the_disconnect(chat, fake_pair):
    from playwright.sync_api import expect

    page = chat
    hermes, _ = fake_pair["agent-hermes"]
    hermes.chunks = 100_000
    hermes.chunk_gap_s = 0.05
    ask(page, HERMES, "talk for a long time")
    expect(answer(page).locator(".body")).to_contain_text("hello from agent-hermes 1")
    expect(page.get_by_role("button", name="Send")).to_be_disabled()
    card = page.locator('#slots .slot[data-slot="agent-hermes"] .meta')
    expect(card).to_contain_text("in flight 1")
    page.get_by_role("button", name="Stop").click()
    wait_until(lambda: hermes.disconnects, "the fake upstream saw the client go away", 10)
    expect(answer(page).locator(".meta")).to_contain_text("stopped")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    wait_until(lambda: hermes.active == 0, "the upstream stream ended", 10)
    expect(card).to_contain_text("in flight 0")


def test_model_html_is_shown_as_text_and_markdown_is_rendered(chat, fake_pair):
    from playwright.sync_api import expect

    page = chat
    hermes, _ = fake_pair["agent-hermes"]
    attack = '<img src=x onerror="window.pwned=1"> and **bold**'
    hermes.reply = attack
    hermes.chunks = 1
    ask(page, HERMES, "say something nasty")
    body = answer(page).locator(".body")
    expect(answer(page).locator(".meta")).to_contain_text("answered by agent-hermes")
    expect(body).to_contain_text('<img src=x onerror="window.pwned=1">')
    expect(body.locator("strong")).to_have_text("bold")
    assert body.locator("img").count() == 0
    assert page.evaluate("window.pwned") is None


def test_a_stream_that_breaks_off_keeps_its_text_and_says_why(chat, fake_pair):
    from playwright.sync_api import expect

    page = chat
    hermes, _ = fake_pair["agent-hermes"]
    hermes.chunks = 5
    hermes.break_after_chunks = 2
    ask(page, HERMES, "go on")
    expect(answer(page).locator(".error")).to_contain_text("The stream broke off")
    expect(answer(page).locator(".body")).to_contain_text("hello from agent-hermes 1")
    expect(answer(page).locator(".meta")).to_contain_text("answered by agent-hermes")


def test_loading_slot_error_is_shown_with_its_retry_hint(chat, fake_pair, settings):
    from playwright.sync_api import expect

    settings.HAL0_SWAP_WAIT_S = 0  # answer 503 at once instead of waiting out the load
    page = chat
    hermes, _ = fake_pair["agent-hermes"]
    hermes.health = "loading"
    expect(group(page, "agent-hermes")).to_have_attribute("data-state", "loading")
    ask(page, HERMES, "are you there?")
    error = answer(page).locator(".error")
    expect(error).to_contain_text(f"{HERMES} is not available right now (slot_loading)")
    expect(answer(page).locator(".meta")).not_to_contain_text("answered by")
    expect(error).to_contain_text(re.compile(r"Try again in \d+ s"))
    # The question comes back to the box for a retry.
    expect(page.get_by_label("Message")).to_have_value("are you there?")


def test_full_slot_answers_429_and_the_page_says_so(chat, fake_pair, hal0, settings):
    from playwright.sync_api import expect

    from dispatch.models import Slot

    settings.HAL0_QUEUE_WAIT_S = 0  # a full slot refuses at once instead of queueing

    def limit_to_one() -> None:
        slot = Slot.objects.get(name="agent-hermes")
        slot.max_concurrency = 1
        slot.save()

    page = chat
    in_plain_thread(limit_to_one)
    card = page.locator('#slots .slot[data-slot="agent-hermes"] .meta')
    expect(card).to_contain_text("in flight 0 / 1")
    hermes, _ = fake_pair["agent-hermes"]
    hermes.chunks = 100_000
    hermes.chunk_gap_s = 0.05
    # Someone else holds the slot's only place with a long stream.
    with httpx.Client(base_url=hal0.url, timeout=30) as other:
        body = {"model": "hermes", "stream": True, "messages": []}
        with other.stream("POST", "/v1/chat/completions", json=body) as held:
            assert held.status_code == 200
            expect(card).to_contain_text("in flight 1 / 1")
            ask(page, HERMES, "my turn?")
            error = answer(page).locator(".error")
            expect(error).to_contain_text("Too many requests right now.")
            expect(error).to_contain_text(re.compile(r"Try again in \d+ s"))
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def test_usable_at_360_px(chat):
    from playwright.sync_api import expect

    page = chat
    page.set_viewport_size({"width": 360, "height": 740})
    expect(page.get_by_label("Model")).to_be_visible()
    expect(page.get_by_label("Message")).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    ask(page, PRIMARY, "hi")
    expect(answer(page).locator(".meta")).to_contain_text("answered by primary")


def test_reconnects_after_the_server_restarts_and_rereads_the_snapshot(chat, hal0, seed_slots):
    from playwright.sync_api import expect

    from dispatch.models import SlotModel
    from hal0web.asgi import application

    page = chat
    page.evaluate("window.sameDocument = true")
    live = page.locator("#live")
    expect(live).to_have_attribute("data-live", "live")
    hal0.stop()
    restarted = None
    try:
        expect(live).to_have_attribute("data-live", "down")
        # A change nobody could hear: only a fresh snapshot can bring it to the page.
        in_plain_thread(
            lambda: SlotModel.objects.create(
                slot=seed_slots["primary"], model_id="while-you-were-away"
            )
        )
        application._started = False  # a new server, a new runtime (as the hal0 fixture does)
        restarted = ServerThread(application, port=hal0.port).start()
        expect(live).to_have_attribute("data-live", "live")
        expect(option(page, "primary/while-you-were-away")).to_be_attached()
        assert page.evaluate("window.sameDocument") is True
    finally:
        if restarted is not None:
            restarted.stop()


@pytest.fixture
def short_probe_interval(no_watcher, settings):
    """Before `hal0` starts the runtime, which reads the interval once."""
    settings.HAL0_PROBE_INTERVAL_S = 0.2  # stale 3 s (the least) after the server follows


def test_stale_slot_state_shows_as_unknown_until_the_watcher_beats_again(
    seed_slots,
    plain_static,  # noqa: F811 - fixture from tests.browser
    short_probe_interval,
    hal0,
    staff,  # noqa: F811
    context,  # noqa: F811
):
    """No watcher keeps the state (none runs here): after 3 probe intervals the page must not
    show the database's "ready" as if it were known."""
    from django.utils import timezone
    from playwright.sync_api import expect

    from dispatch.models import Slot, StateVersion

    in_plain_thread(lambda: Slot.objects.update(state="ready"))
    page = context.new_page()
    log_in(page, hal0.url)
    notice = page.locator("#slots .stale")
    expect(notice).to_have_text("slot state unknown since start-up")
    badge = page.locator('#slots .slot[data-slot="primary"] .badge')
    expect(badge).to_have_text("unknown")
    # A heartbeat arrives (as a watcher elsewhere would write it): fresh again, live.
    in_plain_thread(lambda: StateVersion.beat(timezone.now(), "elsewhere:1"))
    expect(notice).to_have_count(0)
    expect(badge).to_have_text("ready")
    # And it goes stale again when no beat follows; the notice names the last one's time.
    expect(notice).to_contain_text("slot state unknown since ")
    assert "start-up" not in notice.inner_text()


def test_the_page_ignores_older_versions_and_asks_again_after_a_gap(chat, seed_slots):
    from playwright.sync_api import expect

    from dispatch.coordination import events

    page = chat
    sent: list[str] = []
    got: list[str] = []

    def watch(ws):
        ws.on("framesent", lambda payload: sent.append(payload))
        ws.on("framereceived", lambda payload: got.append(payload))

    page.on("websocket", watch)
    page.reload()  # a new socket, watched from its start
    card = page.locator('#slots .slot[data-slot="primary"]')
    expect(card).to_have_count(1)

    def pump_until(check) -> None:
        # Playwright's sync API hands events over only while it runs: wait through it.
        for _ in range(100):
            if check():
                return
            page.wait_for_timeout(50)
        raise AssertionError(f"sent {sent}, got {got}")

    # An event leading to an older version than the snapshot's: it arrives and is ignored.
    in_plain_thread(
        lambda: events.tell_own_pages(
            {"type": "slot.deleted", "from_version": -2, "version": -1, "slot": "primary"}
        )
    )
    pump_until(lambda: any('"version":-1' in frame for frame in got))
    expect(card).to_have_count(1)
    # One leading from a version the page never saw: not applied; it asks for a snapshot.
    in_plain_thread(
        lambda: events.tell_own_pages(
            {"type": "slot.deleted", "from_version": 10**9, "version": 10**9 + 1, "slot": "primary"}
        )
    )
    pump_until(lambda: '{"type":"snapshot"}' in sent)
    assert sent.count('{"type":"snapshot"}') == 1, sent
    expect(card).to_have_count(1)  # neither event removed it; the snapshot still has it


def test_an_ejected_slot_shows_degraded_with_its_reason_live(chat, fake_pair, hal0, settings):
    # Issue 13: a slot whose probes pass but whose requests hang is taken out of rotation;
    # the page shows it at once, with the reason, and greys its models out.
    from playwright.sync_api import expect

    from dispatch.models import Slot

    page = chat
    settings.HAL0_OUTLIER_BACKOFF_S = 60

    def short_timeout() -> None:
        slot = Slot.objects.get(name="agent-hermes")
        slot.first_byte_timeout_s = 0.3
        slot.save()

    in_plain_thread(short_timeout)
    hermes, _ = fake_pair["agent-hermes"]
    hermes.delay_headers_s = 5  # completions hang; /health and /v1/models still answer
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        for _ in range(3):
            r = c.post("/v1/chat/completions", json={"model": "hermes", "messages": []})
            assert r.status_code == 504
    card = page.locator('#slots .slot[data-slot="agent-hermes"]')
    expect(card.locator(".badge")).to_have_text("degraded")
    expect(card.locator(".error")).to_contain_text("out of rotation")
    expect(card.locator(".error")).to_contain_text("no response within 0.3s")
    expect(option(page, HERMES)).to_be_disabled()
    expect(option(page, HERMES)).to_have_attribute("title", re.compile("out of rotation"))
    expect(option(page, PRIMARY)).to_be_enabled()


def test_the_page_takes_state_words_and_tones_from_the_snapshot(chat, monkeypatch):
    """The page keeps no list of states: regroup one on the server (here `ready` made
    unusable and shown in a new tone) and a fresh snapshot changes the picker and the card."""
    from playwright.sync_api import expect

    from dispatch.routing import states

    page = chat
    card = page.locator('#slots .slot[data-slot="primary"]')
    expect(card).to_have_class(re.compile(r"\btone-ok\b"))
    expect(option(page, PRIMARY)).to_be_enabled()
    monkeypatch.setattr(
        states, "UNUSABLE_WHY", {**states.UNUSABLE_WHY, "ready": "is held back by this test"}
    )
    monkeypatch.setattr(states, "TONES", {**states.TONES, "ready": "test-only"})
    page.reload()  # a new socket: a new snapshot, with the server's current states
    expect(card).to_have_class(re.compile(r"\btone-test-only\b"))
    expect(option(page, PRIMARY)).to_be_disabled()
    expect(option(page, PRIMARY)).to_have_attribute("title", "primary is held back by this test")
