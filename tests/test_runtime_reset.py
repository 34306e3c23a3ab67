"""The one runtime reset (tests/runtime.py) puts back every part a test can leave behind."""

from __future__ import annotations

import httpx
import pytest

from tests import runtime


def test_a_reset_puts_back_what_a_test_left_in_the_runtime() -> None:
    the = runtime.singletons()
    mock = httpx.MockTransport(lambda r: httpx.Response(204))
    the.upstream.use_transport(mock)
    the.nudged["a"] = 1.0
    the.affinity._recent["resp_1"] = "a"
    the.admission._inflight["a"] = 1
    the.outliers._records["a"] = object()
    the.store._loaded = True
    the.keyring._loaded = True
    the.watcher._probed_at["a"] = object()
    the.leadership.leading = True
    the.persistence._writer = object()
    the.loader_news.note(
        {"type": "queue", "slot": "a", "loading": "m", "evicting": None, "queue": []}
    )
    the.outages.REDIS.failed("a test", ConnectionError("refused"))
    the.kept.made["resp_hal0_1"] = object()

    runtime.reset()

    assert the.upstream._given is None
    assert not the.nudged and not the.affinity._recent
    assert not the.admission.inflight and not the.outliers.overlay()
    assert not the.store._loaded and not the.keyring._loaded
    assert not the.watcher._probed_at and not the.leadership.leading
    assert not the.loader_news.latest()
    assert not the.outages.REDIS.away and not the.kept.made
    assert the.persistence._writer is None


def test_a_reset_of_some_parts_leaves_the_others() -> None:
    the = runtime.singletons()
    the.upstream.use_transport(httpx.MockTransport(lambda r: httpx.Response(204)))
    the.nudged["a"] = 1.0
    runtime.reset("transport")
    assert the.upstream._given is None and the.nudged == {"a": 1.0}
    the.nudged.clear()


def test_an_unknown_part_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="not a part of the runtime: \\['kerying'\\]"):
        runtime.reset("kerying")
