"""The one runtime reset (tests/runtime.py) puts back every part a test can leave behind."""

from __future__ import annotations

import httpx
import pytest

from tests import runtime


def test_a_reset_puts_back_what_a_test_left_in_the_runtime() -> None:
    from dispatch.api.keys import keyring
    from dispatch.coordination.affinity import affinity
    from dispatch.coordination.store import store
    from dispatch.lifecycle import health
    from dispatch.upstream import forward
    from dispatch.upstream.admission import admission
    from dispatch.upstream.outliers import outliers
    from dispatch.upstream.proxy import upstream

    mock = httpx.MockTransport(lambda r: httpx.Response(204))
    upstream.use_transport(mock)
    forward._nudged["a"] = 1.0
    affinity._recent["resp_1"] = "a"
    admission._inflight["a"] = 1
    outliers._records["a"] = object()  # type: ignore[assignment]
    store._loaded = True
    keyring._loaded = True
    health.watcher._probed_at["a"] = object()  # type: ignore[assignment]
    health.leadership.leading = True

    runtime.reset()

    assert upstream._given is None
    assert not forward._nudged and not affinity._recent
    assert not admission.inflight and not outliers.overlay()
    assert not store._loaded and not health.watcher._probed_at
    assert not health.leadership.leading


def test_a_reset_of_some_parts_leaves_the_others() -> None:
    from dispatch.upstream import forward
    from dispatch.upstream.proxy import upstream

    mock = httpx.MockTransport(lambda r: httpx.Response(204))
    upstream.use_transport(mock)
    forward._nudged["a"] = 1.0
    runtime.reset("transport")
    assert upstream._given is None and forward._nudged == {"a": 1.0}
    forward._nudged.clear()


def test_an_unknown_part_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="not a part of the runtime: \\['kerying'\\]"):
        runtime.reset("kerying")
