"""The legal slot-state transitions, and what a probe's observation leads to."""

from __future__ import annotations

import pytest

from dispatch.routing import states


def test_probes_never_enter_or_leave_draining():
    assert states.after_probe("draining", "ready") == "draining"
    assert states.after_probe("draining", "offline") == "draining"
    with pytest.raises(states.IllegalTransition):
        states.check("draining", "ready")  # only the operator ends it, through `unknown`
    states.check("draining", "unknown")


def test_unknown_states_are_refused():
    with pytest.raises(states.IllegalTransition):
        states.check("ready", "sleeping")
