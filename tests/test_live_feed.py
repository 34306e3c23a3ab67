"""The live feed (dispatch.web.live) builds every event a page hears, and hears the rooms below
through their listener lists, subscribed once."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from dispatch.coordination import events, sync
from dispatch.coordination.store import store
from dispatch.routing.table import RoutingTable, make_slot
from dispatch.web import live

DISPATCH = Path(__file__).resolve().parent.parent / "dispatch"
LIVE = DISPATCH / "web" / "live.py"


def _handled_by_the_pages() -> set[str]:
    """The event types the page scripts act on (``ev.type === "..."``)."""
    found: set[str] = set()
    for script in (DISPATCH / "static" / "dispatch").glob("*.js"):
        found |= set(re.findall(r'ev\.type === "([^"]+)"', script.read_text()))
    return found


# The snapshot is not an event of the feed: the consumer sends it when a page connects or asks
# (dispatch.web.snapshots builds it), and the events that follow build on it.
PAGE_EVENTS = _handled_by_the_pages() - {"snapshot"}


def _strings(tree: ast.AST) -> list[tuple[ast.Constant, str | None]]:
    """Every string in the module with the dict key or keyword argument it is the value of
    (None: neither), leaving out dict keys and docstrings themselves."""
    keys: set[int] = set()
    under: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant):
                    keys.add(id(key))
                    under[id(value)] = str(key.value)
        if isinstance(node, ast.keyword) and node.arg is not None:
            under[id(node.value)] = node.arg
        documented = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        if isinstance(node, documented) and node.body and isinstance(node.body[0], ast.Expr):
            keys.add(id(node.body[0].value))  # the docstring
    return [
        (node, under.get(id(node)))
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in keys
    ]


def test_the_pages_handle_the_events_we_expect_them_to():
    # The check below is only as good as this list: it must hold what the pages act on.
    assert {"slot.state", "slot.inflight", "dispatch.decision", "watcher"} <= PAGE_EVENTS


def _builds_an_event(name: str, key: str | None) -> bool:
    """An event's type given as such (``{"type": ...}``, ``dict(type=...)``), or a dotted
    one (``slot.state``) anywhere, which may end up there through a variable; a plain word
    (``watcher``) elsewhere is a field's name. A decision's log line names itself
    (``"event": "dispatch.decision"``): the page event carries the line, but its type is the
    feed's."""
    return key == "type" or ("." in name and key != "event")


def test_no_module_but_the_live_feed_names_a_page_event():
    found = []
    for path in sorted(DISPATCH.rglob("*.py")):
        if path == LIVE:
            continue
        for node, key in _strings(ast.parse(path.read_text(), str(path))):
            if node.value in PAGE_EVENTS and _builds_an_event(node.value, key):
                found.append(f"{path.relative_to(DISPATCH)}:{node.lineno} {node.value!r}")
    assert not found, "page events are built in dispatch/web/live.py only: " + ", ".join(found)


def test_the_live_feed_builds_every_event_the_pages_handle_and_no_other():
    tree = ast.parse(LIVE.read_text())
    named = {node.value for node, _ in _strings(tree)}
    assert named >= PAGE_EVENTS
    typed = {
        value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant) and key.value == "type" and isinstance(value, ast.Constant)
    }
    assert typed <= PAGE_EVENTS


@pytest.fixture
def told(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    heard: list[dict[str, Any]] = []
    monkeypatch.setattr(events, "tell_own_pages", heard.append)
    return heard


def test_the_feed_is_subscribed_once_however_often_it_is_installed(told):
    live.install()  # apps.ready did already: this one must change nothing
    live.install()
    old = store.table
    new = RoutingTable.build(old.version + 1, [make_slot("a", "http://127.0.0.1:1/v1")])
    store.publish(new)
    assert told == [
        {
            "type": "slot.updated",
            "from_version": old.version,
            "version": new.version,
            "slot": told[0]["slot"],
        }
    ]
    assert told[0]["slot"]["name"] == "a"


def test_the_feed_tells_the_pages_when_the_state_turns_stale(told):
    freshness = {"stale": True, "probed_at": None, "leader": None}
    sync.freshness_changed.notify(freshness)
    assert told == [{"type": "watcher", **freshness}]


def test_the_loaders_news_reaches_the_pages_as_a_queue_event(told):
    """The leading loader's news (heard by every process through sync) becomes one `queue`
    event for this process's pages: who waits, in order, without whose load failed why."""
    news = {
        "type": "loads",
        "slot": "primary",
        "loading": "gemma3",
        "progress": 0.4,
        "evicting": "smollm2",
        "queue": [
            {"ticket": "r1", "model": "gemma3", "since": 100.0},
            {"ticket": "r2", "model": "smollm2", "since": 101.5},
        ],
        "failed": {"r0": "out of memory at /home/someone/models"},
        "at": 114.0,
    }
    sync.loads_news.notify(news)
    assert told == [
        {
            "type": "queue",
            "slot": "primary",
            "loading": "gemma3",
            "progress": 0.4,
            "evicting": "smollm2",
            "queue": [
                {"ticket": "r1", "model": "gemma3", "since": 100.0, "position": 1},
                {"ticket": "r2", "model": "smollm2", "since": 101.5, "position": 2},
            ],
            "at": 114.0,
        }
    ]
    # A page that connects now is shown it in its snapshot; once the loader is idle, not.
    assert live.loader_news.latest(["primary"]) == told
    assert live.loader_news.latest(["another"]) == []
    sync.loads_news.notify({"slot": "primary", "loading": None, "queue": [], "at": 120.0})
    assert told[-1]["queue"] == [] and told[-1]["loading"] is None
    assert live.loader_news.latest() == []


def test_news_without_a_slot_tells_nobody(told):
    sync.loads_news.notify({"type": "loads", "queue": []})
    assert told == []
