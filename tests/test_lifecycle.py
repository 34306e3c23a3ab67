"""Slot lifecycle against fake upstreams whose health we switch: the watcher, states,
discovered models, drift, the swap window, failover and concurrency limits."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx

from dispatch.models import Slot
from tests.conftest import add_slot
from tests.fakes import FakeUpstream, ServerThread, free_port
from tests.polling import decision_lines, wait_until


def state_of(name: str) -> str:
    return Slot.objects.get(name=name).state


def kick(hal0) -> None:
    """Any request starts hal0web's runtime (the watcher) if nothing has yet."""
    httpx.get(hal0.url + "/healthz", timeout=5).raise_for_status()


def test_offline_to_ready_within_two_probe_intervals(transactional_db, hal0, settings):
    port = free_port()
    add_slot("a", f"http://127.0.0.1:{port}/v1", ["m1"])
    kick(hal0)
    wait_until(lambda: state_of("a") == "offline", what="offline")
    assert Slot.objects.get(name="a").last_error
    server = ServerThread(FakeUpstream("a", models=["m1"]), port=port).start()
    try:
        started = time.monotonic()
        # Backoff while offline is capped at the probe interval (0.2 s in tests).
        wait_until(lambda: state_of("a") == "ready", timeout=5, what="ready")
        assert time.monotonic() - started < 2 * settings.HAL0_PROBE_INTERVAL_S + 1.0
        slot = Slot.objects.get(name="a")
        assert slot.last_error == "" and slot.state_changed_at is not None
    finally:
        server.stop()


def test_loading_and_error_states_follow_health(fake, hal0):
    f, server = fake
    add_slot("a", server.url + "/v1", ["m1"])
    f.health = "loading"
    kick(hal0)
    wait_until(lambda: state_of("a") == "loading", what="loading")
    f.health = "error"
    wait_until(lambda: state_of("a") == "error", what="error")
    f.health = "ready"
    wait_until(lambda: state_of("a") == "ready", what="ready")


def test_discovered_models_appear_and_disappear_and_drift_is_flagged(fake, hal0):
    f, server = fake
    f.models = ["m1", "extra-1"]
    add_slot("a", server.url + "/v1", ["m1", "declared-only"])
    kick(hal0)
    wait_until(
        lambda: Slot.objects.get(name="a").models.filter(model_id="extra-1").exists(),
        what="discovered",
    )
    slot = Slot.objects.get(name="a")
    assert slot.models.get(model_id="extra-1").source == "discovered"
    assert slot.drift == ["declared-only"]
    with httpx.Client(base_url=hal0.url, timeout=5) as c:
        r = c.post("/v1/chat/completions", json={"model": "extra-1", "messages": []})
        assert r.status_code == 200 and r.headers["X-Hal0-Resolution"] == "discovered:a"
        f.models = ["m1", "declared-only"]
        wait_until(
            lambda: not Slot.objects.get(name="a").models.filter(model_id="extra-1").exists(),
            what="gone",
        )
        wait_until(lambda: Slot.objects.get(name="a").drift == [], what="drift cleared")
        r = c.post("/v1/chat/completions", json={"model": "extra-1", "messages": []})
        assert r.status_code == 404


def test_cold_start_probes_before_turning_a_request_away(fake, no_watcher, hal0, caplog):
    # no_watcher: nothing probes on its own, only the cold-start probe can.
    f, server = fake
    f.models = ["only-discovered"]
    add_slot("a", server.url + "/v1", [])
    with (
        caplog.at_level(logging.INFO, logger="hal0.dispatch"),
        httpx.Client(base_url=hal0.url, timeout=5) as c,
    ):
        r = c.post("/v1/chat/completions", json={"model": "only-discovered", "messages": []})
        [line] = decision_lines(caplog)
    assert r.status_code == 200, r.text
    assert r.headers["X-Hal0-Slot"] == "a"
    assert state_of("a") == "ready"
    assert line["cache_state"] == "cold" and line["resolution_path"] == "discovered:a"


def test_request_during_loading_waits_and_is_served_when_ready(fake, hal0):
    f, server = fake
    add_slot("a", server.url + "/v1", ["m1"])
    f.health = "loading"
    kick(hal0)
    wait_until(lambda: state_of("a") == "loading", what="loading")
    result: list[httpx.Response] = []
    t = threading.Thread(
        target=lambda: result.append(
            httpx.post(
                hal0.url + "/v1/chat/completions", json={"model": "m1", "messages": []}, timeout=20
            )
        )
    )
    t.start()
    time.sleep(0.5)
    assert not result, "a request for a loading slot must wait, not fail"
    assert not [s for s in f.requests if s.path == "/v1/chat/completions"]
    f.health = "ready"
    t.join(10)
    assert result and result[0].status_code == 200
    assert result[0].json()["slot"] == "a"


def test_loading_too_long_is_503_slot_loading_with_retry_after(fake, hal0, settings):
    f, server = fake
    settings.HAL0_SWAP_WAIT_S = 0.5
    add_slot("a", server.url + "/v1", ["m1"])
    f.health = "loading"
    kick(hal0)
    wait_until(lambda: state_of("a") == "loading", what="loading")
    r = httpx.post(
        hal0.url + "/v1/chat/completions", json={"model": "m1", "messages": []}, timeout=10
    )
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "slot_loading"
    assert int(r.headers["Retry-After"]) >= 1


def test_offline_slot_with_another_serving_the_model_fails_over(fake, hal0):
    _f, server = fake
    add_slot("down", f"http://127.0.0.1:{free_port()}/v1", ["m1"], priority=10)
    add_slot("a", server.url + "/v1", ["m1"])
    kick(hal0)
    wait_until(lambda: state_of("down") == "offline" and state_of("a") == "ready", what="states")
    r = httpx.post(
        hal0.url + "/v1/chat/completions", json={"model": "m1", "messages": []}, timeout=10
    )
    assert r.status_code == 200
    assert r.headers["X-Hal0-Slot"] == "a"
    assert r.headers["X-Hal0-Resolution"] == "failover:down->a"


def test_offline_slot_alone_is_503_slot_unavailable_with_its_error(transactional_db, hal0):
    add_slot("down", f"http://127.0.0.1:{free_port()}/v1", ["m1"])
    kick(hal0)
    wait_until(lambda: state_of("down") == "offline", what="offline")
    r = httpx.post(
        hal0.url + "/v1/chat/completions", json={"model": "m1", "messages": []}, timeout=10
    )
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "slot_unavailable" and "offline" in err["message"]
    assert r.headers["Retry-After"]


def test_refused_connection_before_first_byte_fails_over(fake, hal0, settings):
    _f, server = fake
    settings.HAL0_PROBE_INTERVAL_S = 60  # the watcher will not notice in time: the request must
    dead = FakeUpstream("dead", models=["m1"])
    dead_server = ServerThread(dead).start()
    add_slot("dead", dead_server.url + "/v1", ["m1"], priority=10)
    add_slot("a", server.url + "/v1", ["m1"])
    kick(hal0)
    wait_until(lambda: state_of("dead") == "ready" and state_of("a") == "ready", what="both ready")
    dead_server.stop()  # still "ready" in the table; the next connection is refused
    r = httpx.post(
        hal0.url + "/v1/chat/completions", json={"model": "m1", "messages": []}, timeout=10
    )
    assert r.status_code == 200
    assert r.json()["slot"] == "a"
    assert r.headers["X-Hal0-Resolution"] == "failover:dead->a"
    # Passive health: the failure triggered an immediate probe, long before the 60 s interval.
    wait_until(lambda: state_of("dead") == "offline", timeout=5, what="dead marked offline")


def test_upstream_503_before_first_byte_fails_over_once(fake, hal0):
    _f, server = fake
    sick = FakeUpstream("sick", models=["m1"], fail_status=503)
    sick_server = ServerThread(sick).start()
    try:
        add_slot("sick", sick_server.url + "/v1", ["m1"], priority=10)
        add_slot("a", server.url + "/v1", ["m1"])
        kick(hal0)
        wait_until(lambda: state_of("sick") == "ready" and state_of("a") == "ready", what="ready")
        r = httpx.post(
            hal0.url + "/v1/chat/completions", json={"model": "m1", "messages": []}, timeout=10
        )
        assert r.status_code == 200 and r.json()["slot"] == "a"
        assert r.headers["X-Hal0-Resolution"] == "failover:sick->a"
        # Pinned to the sick slot there is nothing to fail over to: its 503 passes through.
        r = httpx.post(
            hal0.url + "/v1/chat/completions", json={"model": "sick/m1", "messages": []}, timeout=10
        )
        assert r.status_code == 503 and r.headers["X-Hal0-Slot"] == "sick"
    finally:
        sick_server.stop()


def test_concurrency_limit_queues_then_429(fake, hal0, settings):
    f, server = fake
    settings.HAL0_QUEUE_WAIT_S = 0.5
    add_slot("a", server.url + "/v1", ["m1"], max_concurrency=1)
    f.chunks, f.chunk_gap_s = 10, 0.1  # one request holds the slot for ~1 s

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=hal0.url, timeout=10) as c:

            async def one(delay: float) -> int:
                await asyncio.sleep(delay)
                r = await c.post(
                    "/v1/chat/completions", json={"model": "m1", "stream": True, "messages": []}
                )
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "slot_busy" and r.headers["Retry-After"]
                return r.status_code

            return list(await asyncio.gather(one(0), one(0.2)))

    statuses: list[list[int]] = []
    t = threading.Thread(target=lambda: statuses.append(asyncio.run(run())))
    t.start()
    t.join(20)
    assert statuses == [[200, 429]]
    # With a wait longer than the first request, the second queues and is served.
    settings.HAL0_QUEUE_WAIT_S = 5
    statuses.clear()
    t = threading.Thread(target=lambda: statuses.append(asyncio.run(run())))
    t.start()
    t.join(20)
    assert statuses == [[200, 200]]


def test_draining_is_the_operators_and_probes_leave_it(fake, hal0):
    _f, server = fake
    add_slot("a", server.url + "/v1", ["m1"])
    kick(hal0)
    wait_until(lambda: state_of("a") == "ready", what="ready")
    slot = Slot.objects.get(name="a")
    slot.state = "draining"
    slot.save()
    time.sleep(0.6)  # three probe intervals
    assert state_of("a") == "draining"
    r = httpx.post(
        hal0.url + "/v1/chat/completions", json={"model": "m1", "messages": []}, timeout=10
    )
    assert r.status_code == 503 and "draining" in r.json()["error"]["message"]


def test_a_slow_probe_while_requests_flow_is_not_offline(fake, hal0, settings):
    f, server = fake
    add_slot("a", server.url + "/v1", ["m1"], connect_timeout_s=0.3)  # probe timeout 0.3 s
    kick(hal0)
    wait_until(lambda: state_of("a") == "ready", what="ready")
    f.models_delay_s = 1.0  # /models now answers too late for a probe
    f.chunks, f.chunk_gap_s = 20, 0.1
    r = httpx.post(
        hal0.url + "/v1/chat/completions",
        json={"model": "m1", "stream": True, "messages": []},
        timeout=10,
    )
    assert r.text.count("data: ") == 21
    assert state_of("a") == "ready", "probes timed out during a healthy stream"
    # Nothing in flight: a probe that times out now does mean trouble.
    wait_until(lambda: state_of("a") == "offline", timeout=5, what="offline once idle")


def test_one_probe_per_slot_in_flight_however_many_ask(fake, hal0):
    f, server = fake
    f.models = ["only-discovered"]
    f.models_delay_s = 0.4  # each probe takes a while: overlapping asks would show
    add_slot("a", server.url + "/v1", [], connect_timeout_s=2)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=hal0.url, timeout=10) as c:
            # The first request starts the watcher (which probes `a` at once); every miss
            # also asks for a cold-start probe of the never-probed slot.
            rs = await asyncio.gather(
                *(
                    c.post(
                        "/v1/chat/completions", json={"model": "only-discovered", "messages": []}
                    )
                    for _ in range(5)
                )
            )
            return [r.status_code for r in rs]

    statuses: list[list[int]] = []
    t = threading.Thread(target=lambda: statuses.append(asyncio.run(burst())))
    t.start()
    t.join(20)
    assert statuses == [[200] * 5]
    assert f.models_active_max == 1
