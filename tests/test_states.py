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


@pytest.mark.parametrize(
    ("kind", "health", "body", "models", "expected"),
    [
        ("llamacpp", None, None, None, "offline"),
        ("llamacpp", 503, None, 503, "loading"),  # "Loading model"
        ("llamacpp", 200, None, 200, "ready"),
        ("openai", None, None, 500, "error"),
        ("lemonade", 200, {"model_loaded": None}, 200, "loading"),
        ("lemonade", 200, {"model_loaded": "m"}, 200, "ready"),
    ],
)
def test_classify(kind, health, body, models, expected):
    assert states.classify(kind, health, body, models) == expected
