"""The real llama.cpp ``llama-server`` in router mode, as ``make run``'s ``primary`` slot runs it:
both demo models in one directory, at most one loaded. What hal0web will build on (issue 21):
the listing with each model's state, explicit loads and unloads, the swap, and answers that
make sense, from the server built by ``make`` (tools/llama_build.py)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatch.lifecycle import demo
from tests.real_llama import LOADED, UNLOADED, RealRouter, running_router

pytestmark = pytest.mark.llama

SMOL, GEMMA = demo.SMOLLM2.id, demo.GEMMA.id
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealRouter]:
    with running_router(tmp_path_factory.mktemp("router")) as started:
        yield started


@pytest.fixture
def idle(router: RealRouter) -> RealRouter:
    """The router with nothing loaded, whatever the test before left."""
    router.unload_all()
    return router


def content(answer: Any) -> str:
    return str(answer["choices"][0]["message"]["content"])


def test_it_lists_both_models_by_their_file_names_none_loaded(idle: RealRouter) -> None:
    assert idle.states() == {SMOL: UNLOADED, GEMMA: UNLOADED}
    # The OpenAI listing is the same list, with the same states.
    body = demo.http_get_json(idle.api_url + "/models")
    assert isinstance(body, dict)
    assert {m["id"]: m["status"]["value"] for m in body["data"]} == idle.states()


def test_a_load_returns_at_once_and_the_model_reads_loaded(idle: RealRouter) -> None:
    assert idle.load(SMOL) == (200, {"success": True})
    assert idle.wait_for(SMOL, LOADED) == {SMOL: LOADED, GEMMA: UNLOADED}
    # Its instance runs with the demo's arguments.
    args = idle.models()[SMOL]["status"]["args"]
    assert args[args.index("--ctx-size") + 1] == "2048"
    assert args[args.index("--threads") + 1] == "1"


def test_loading_another_model_unloads_the_first(idle: RealRouter) -> None:
    """--models-max 1: the swap a newcomer sees."""
    idle.load(SMOL)
    idle.wait_for(SMOL, LOADED)
    assert idle.load(GEMMA) == (200, {"success": True})
    assert idle.wait_for(GEMMA, LOADED) == {SMOL: UNLOADED, GEMMA: LOADED}


def test_what_the_router_refuses(idle: RealRouter) -> None:
    status, answer = idle.unload(SMOL)
    assert (status, answer["error"]["message"]) == (400, "model is not running")
    idle.load(SMOL)
    status, answer = idle.load(SMOL)
    assert (status, answer["error"]["message"]) == (400, "model is already running")
    status, answer = idle.load("no-such-model")
    assert status == 404, answer
    status, answer = idle.post(
        "/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user"}]}
    )
    assert (status, answer["error"]["message"]) == (400, "model 'no-such-model' not found")


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_a_chat_loads_its_model_and_answers_the_question(idle: RealRouter, model: str) -> None:
    """Greedy answers to a plain question, with a system message: both say Paris.

    SmolLM2 uses the template its GGUF carries; Gemma 3 270M (a pretrained model with none)
    the demo's question-and-answer template, which stops at the next "Question:"."""
    answer = idle.chat(model, QUESTION, system="You are a helpful assistant.")
    assert answer["model"] == model
    assert "Paris" in content(answer), answer
    other = GEMMA if model == SMOL else SMOL
    assert idle.states() == {model: LOADED, other: UNLOADED}


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_without_a_system_message_neither_model_repeats_the_question(
    router: RealRouter, model: str
) -> None:
    """What they answer with the templates as they are, no system message: Gemma "Paris";
    SmolLM2 (with its GGUF's own default system prompt) something French about Paris's
    landmarks, not the answer, but not the question repeated either: in Gemma's own chat
    format Gemma repeated the question, over and over (issue 21)."""
    text = content(router.chat(model, QUESTION, max_tokens=24))
    assert text.strip()
    assert "capital of France" not in text
    if model == GEMMA:
        assert text.strip() == "Paris"


def test_a_crashed_instance_reads_failed_and_the_router_stays_up(idle: RealRouter) -> None:
    """An instance that dies mid-answer (as a build with instructions the process may not use
    does on its first matrix multiply, issue 11): the router answers 500 and lists the model
    `unloaded` with `failed` and exit code 1, which the demo's first-token check reports."""
    idle.load(SMOL)
    idle.wait_for(SMOL, LOADED)
    instance = _instance_pid(idle, SMOL)
    answers: list[tuple[int, Any]] = []
    body = {
        "model": SMOL,
        "max_tokens": 400,
        "messages": [{"role": "user", "content": "Tell a story."}],
    }
    asking = threading.Thread(
        target=lambda: answers.append(idle.post("/v1/chat/completions", body, 60))
    )
    asking.start()
    try:
        _wait_until_generating(idle, SMOL)
        os.kill(instance, signal.SIGSEGV)
    finally:
        asking.join(60)
    assert answers and answers[0][0] == 500, answers
    status = idle.wait_for(SMOL, UNLOADED)
    assert status[SMOL] == UNLOADED
    entry = idle.models()[SMOL]["status"]
    assert (entry.get("failed"), entry.get("exit_code")) == (True, 1)
    assert idle.server.running
    # The next request starts a new instance.
    assert "Paris" in content(idle.chat(SMOL, QUESTION, system="You are a helpful assistant."))


def _instance_pid(router: RealRouter, model: str) -> int:
    """The pid of the router's child instance serving ``model`` (by its --alias)."""
    assert router.server.proc is not None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == router.server.proc.pid and model.encode() in args:
            return int(entry.name)
    raise AssertionError(f"no instance of {model} under the router")


def _wait_until_generating(router: RealRouter, model: str) -> None:
    """Until the instance has a slot processing a task (its /slots, through the router)."""
    from tests.polling import wait_until

    def busy() -> bool:
        slots = demo.http_get_json(f"{router.base_url}/slots?model={model}", timeout=5)
        return isinstance(slots, list) and any(s.get("is_processing") for s in slots)

    wait_until(busy, f"{model} to be generating", 30, every=0.05)
