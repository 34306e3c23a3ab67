"""The slot states have one home (dispatch.routing.states): the router's sets, the model's
choices and the page's words all come from it, and the page hears them in the snapshot."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from dispatch.routing import states
from dispatch.routing.table import Ejection, RoutingTable, make_slot
from dispatch.web.snapshots import slot_payload, snapshot

DISPATCH = Path(__file__).resolve().parent.parent / "dispatch"


def test_the_snapshot_carries_the_states_the_page_shows():
    table = RoutingTable.build(3, [make_slot("a", "http://h/v1")])
    snap = snapshot(table, {}, {"stale": False})
    assert snap["states"] == states.page_states()
    assert orjson.loads(orjson.dumps(snap))["states"] == snap["states"]  # as the socket sends it
    page = snap["states"]
    assert page["names"] == [*states.State, states.DEGRADED, states.DISABLED]
    assert page["unknown"] == "unknown"
    assert set(page["unusable"]) <= set(page["names"])
    assert set(page["tones"]) <= set(page["names"])


def test_every_state_a_payload_can_show_is_one_the_page_is_told_of():
    names = set(states.page_states()["names"])
    shown = {slot_payload(make_slot("a", "http://h/v1", state=s))["state"] for s in states.State}
    shown.add(slot_payload(make_slot("a", "http://h/v1", enabled=False))["state"])
    overlay = (states.DEGRADED, "ejected")
    shown.add(slot_payload(make_slot("a", "http://h/v1", state="ready"), 0, overlay)["state"])
    ejected = make_slot("a", "http://h/v1", state="ready", ejection=Ejection(1.0, "ejected", 1))
    assert slot_payload(ejected)["state"] == states.DEGRADED
    assert shown <= names
    assert shown == names


def test_the_page_cannot_use_what_the_router_does_not_route_to():
    # The page greys out the router's down states and the two it lays over them.
    assert set(states.UNUSABLE_WHY) == states.DOWN | {states.DEGRADED, states.DISABLED}
    assert states.PROBED_DOWN < states.DOWN
    assert set(states.RANK) == set(states.State) == set(states.TRANSITIONS)
    assert all(states.RANK[s] < states.RANK_LAST for s in states.State)


def test_the_model_offers_exactly_the_states():
    from dispatch.models import Slot

    field = Slot._meta.get_field("state")
    assert [value for value, _ in field.choices] == list(states.State)
    assert field.default == states.UNKNOWN


def test_no_state_name_is_written_outside_its_home():
    """Python and the page's scripts name states through dispatch.routing.states (the page
    through its snapshot), never by a string of their own. `error` and `disabled` are left
    out: they are also plain words there (an error body's key, a CSS class, a log verb)."""
    names = set(states.page_states()["names"]) - {"error", "disabled"}
    alternatives = "|".join(sorted(names))
    quoted = re.compile(rf"""["']({alternatives})["']""")
    home = DISPATCH / "routing" / "states.py"
    offenders = []
    for path in [*DISPATCH.rglob("*.py"), *(DISPATCH / "static" / "dispatch").glob("*.js")]:
        if path == home or "migrations" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0] if path.suffix == ".py" else line.split("//", 1)[0]
            for m in quoted.finditer(code):
                offenders.append(f"{path.relative_to(DISPATCH)}:{n}: {m.group(0)}")
    assert offenders == []
