"""Models on demand with llama.cpp's own ``llama-server`` in router mode (the demo's two tiny
models, at most one loaded) behind hal0web: the states read, a load on request with the swap
made by hal0web, the progress pushed, a request arriving mid-load, and two worker processes
on PostgreSQL + Redis asking for different models of the slot at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot
from tests.fakes import ServerThread
from tests.polling import wait_until
from tests.real_llama import LOADED, UNLOADED, RealRouter, running_router

SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def real_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealRouter]:
    with running_router(tmp_path_factory.mktemp("router")) as router:
        yield router


@pytest.fixture
def router_slot(real_router: RealRouter, transactional_db: None, settings: Any) -> RealRouter:
    settings.HAL0_SWAP_WAIT_S = 60
    real_router.unload_all()
    real_router.load(SMOL)
    real_router.wait_for(SMOL, LOADED)
    add_slot("primary", real_router.api_url, [SMOL, GEMMA])
    return real_router


def loads_of() -> dict[str, str]:
    return dict(
        SlotModel.objects.filter(slot__name="primary").values_list("model_id", "load_state")
    )


def chat(hal0: ServerThread, model: str) -> httpx.Response:
    body = {
        "model": model,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi."}],
    }
    return httpx.post(hal0.url + "/v1/chat/completions", json=body, timeout=120)


def test_the_routers_states_are_read_and_a_swap_is_made_by_hal0web(router_slot, hal0):
    httpx.get(hal0.url + "/healthz", timeout=5)
    wait_until(lambda: loads_of() == {SMOL: "loaded", GEMMA: "unloaded"}, what="states read")
    slot = Slot.objects.get(name="primary")
    assert slot.loads_models and slot.model_limit == 1  # --models-max 1, from /props
    answer = chat(hal0, GEMMA)
    assert answer.status_code == 200, answer.text
    assert int(answer.headers["X-Hal0-Queued-Ms"]) > 0
    assert router_slot.states() == {SMOL: UNLOADED, GEMMA: LOADED}
    wait_until(lambda: loads_of() == {SMOL: "unloaded", GEMMA: "loaded"}, what="the swap")
    listing = httpx.get(hal0.url + "/v1/models", timeout=5).json()["data"]
    status = {m["id"]: m["status"]["value"] for m in listing}
    assert status == {SMOL: "unloaded", GEMMA: "loaded"}
    assert "args" not in str(listing) and "--port" not in str(listing)


def loads_asked(hal0: ServerThread, model: str) -> float:
    """hal0web's own count of the loads it asked for (hal0_model_loads_total)."""
    text = httpx.get(hal0.url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("hal0_model_loads_total{") and f'model="{model}"' in line
    )


def test_a_stream_arriving_mid_load_joins_it(router_slot, hal0, settings):
    settings.HAL0_METRICS_PUBLIC = True
    httpx.get(hal0.url + "/healthz", timeout=5)
    before = loads_asked(hal0, GEMMA)
    wait_until(lambda: loads_of().get(SMOL) == "loaded", what="states read")
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(chat(hal0, GEMMA)))
    first.start()
    wait_until(lambda: loads_of().get(GEMMA) == "loading", what="the load under way", every=0.01)
    body = {
        "model": GEMMA,
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Say hi."}],
    }
    with httpx.stream("POST", hal0.url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    first.join()
    assert results[0].status_code == 200
    assert lines[-1] == "data: [DONE]"
    assert any(line.startswith("data: {") for line in lines)
    assert loads_asked(hal0, GEMMA) == before + 1  # the second request joined the first's


@pytest.mark.postgres
@pytest.mark.redis
def test_two_workers_asking_for_both_models_at_once_get_one_load_at_a_time(
    real_router: RealRouter, tmp_path: Path, pg_url: str
) -> None:
    """Two real workers in front of the real router, each asked for the model the other is
    not: no request lost, and the leader's loader runs the loads one at a time, in the order
    they were asked for."""
    import time

    from tests.processes import Hal0Process, manage, redis_url_or_skip, server_env

    real_router.unload_all()
    env = server_env(
        tmp_path,
        DATABASE_URL=pg_url,
        REDIS_URL=redis_url_or_skip(),
        HAL0_PROBE_INTERVAL_S="0.5",
        HAL0_SWAP_WAIT_S="90",
    )
    manage(env, "migrate", "-v0")
    folder = tmp_path / "slots"
    folder.mkdir()
    (folder / "primary.toml").write_text(
        f'name = "primary"\nurl = "{real_router.api_url}"\nkind = "llamacpp"\n\n'
        f'[model]\ndefault = "{SMOL}"\nmodels = ["{SMOL}", "{GEMMA}"]\n'
    )
    manage(env, "slots", "import", str(folder))
    workers = [Hal0Process(env, tmp_path / f"worker-{i}.log").wait_ready() for i in (1, 2)]
    try:
        wait_until(lambda: sum("leads the watcher" in w.log() for w in workers) == 1, "a leader")
        [leader] = [w for w in workers if "leads the watcher" in w.log()]
        answers: dict[str, httpx.Response] = {}

        def ask(worker: Hal0Process, model: str, after: float) -> None:
            time.sleep(after)
            answers[model] = httpx.post(
                worker.url + "/v1/chat/completions",
                json={
                    "model": model,
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                timeout=120,
            )

        # Both unloaded: the two loads are asked for a moment apart, from the two workers.
        threads = [
            threading.Thread(target=ask, args=(workers[0], GEMMA, 0.0)),
            threading.Thread(target=ask, args=(workers[1], SMOL, 0.3)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for model, answer in answers.items():
            assert answer.status_code == 200, (model, answer.text, leader.log())
            assert answer.headers["X-Hal0-Slot"] == "primary"
        steps = [
            line.split("slot primary: ", 1)[1].split(" in ")[0]
            for line in leader.log().splitlines()
            if "slot primary: load" in line or "slot primary: unloaded" in line
        ]
        assert steps == [
            f"loading {GEMMA}",
            f"loaded {GEMMA}",
            f"unloaded {GEMMA}",
            f"loading {SMOL}",
            f"loaded {SMOL}",
        ], leader.log()
    finally:
        for worker in workers:
            worker.stop()
