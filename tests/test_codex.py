"""Codex CLI (``codex exec``, ``wire_api = "responses"``) through hal0web, against a slot that
speaks the Responses API and one that speaks only chat: both must answer. And the
``models`` array of ``/v1/models`` is what Codex takes its model's metadata from."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.clients import cli
from tests.conftest import add_slot
from tests.fake_chat_agent import ChatAgent
from tests.fakes import FakeUpstream, ServerThread
from tests.polling import wait_until

PROMPT = "Say hello."


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Any]]:
    agent = ChatAgent(FakeUpstream("chatty", models=["talker"], listing="llama.cpp"))
    agent.calls_tools = False  # Codex offers its own tools: the test wants the fake's words
    native = FakeUpstream("native", models=["nat"], listing="llama.cpp")
    threads = [ServerThread(agent).start(), ServerThread(native).start()]
    yield {"agent": agent, "native": native, "urls": [t.url for t in threads]}
    for thread in threads:
        thread.stop()


@pytest.fixture
def slots(servers, transactional_db, hal0) -> dict[str, Any]:
    chat_url, native_url = servers["urls"]
    add_slot("chatty", chat_url + "/v1", ["talker"], endpoints=["chat/completions"])
    add_slot("native", native_url + "/v1", ["nat"])
    return servers


def _codex(
    tmp_path: Path, hal0_url: str, model: str, command_auth: bool = False
) -> subprocess.CompletedProcess[str]:
    """``codex exec`` with a CODEX_HOME of its own whose provider is hal0web."""
    home = tmp_path / "codex-home"
    home.mkdir(exist_ok=True)
    # An auth command makes Codex ask the provider's /models (an env_key does not).
    auth = '[model_providers.hal0.auth]\ncommand = "echo"\nargs = ["unused"]\n'
    (home / "config.toml").write_text(
        f'model = "{model}"\n'
        'model_provider = "hal0"\n'
        "[model_providers.hal0]\n"
        'name = "hal0web"\n'
        f'base_url = "{hal0_url}/v1"\n'
        'wire_api = "responses"\n' + (auth if command_auth else 'env_key = "HAL0_TEST_KEY"\n')
    )
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "CODEX_HOME": str(home),
        "HAL0_TEST_KEY": "unused",
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [str(cli("codex")), "exec", "--skip-git-repo-check", "--sandbox", "read-only", PROMPT],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_codex_on_a_slot_that_speaks_responses(slots, hal0, tmp_path):
    done = _codex(tmp_path, hal0.url, "nat")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hello from native" in done.stdout
    sent = slots["native"].seen("/v1/responses")[-1].json
    assert sent["model"] == "nat" and sent["stream"] is True
    assert sent["input"][-1]["content"][0]["text"] == PROMPT


def test_codex_on_a_slot_that_speaks_only_chat(slots, hal0, tmp_path):
    agent: ChatAgent = slots["agent"]
    done = _codex(tmp_path, hal0.url, "talker")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hello from chatty" in done.stdout
    sent = agent.chats()[-1]
    assert sent["model"] == "talker" and sent["stream"] is True
    # Codex's developer messages are the one system message; the prompt is the last word.
    assert sent["messages"][0]["role"] == "system"
    assert sent["messages"][-1] == {"role": "user", "content": PROMPT}
    # Its function tools reach the slot; hosted and namespaced ones cannot.
    names = {t["function"]["name"] for t in sent["tools"]}
    assert "exec_command" in names
    assert all(t["type"] == "function" for t in sent["tools"])


def _context_windows(home: Path) -> set[int]:
    """The context windows Codex recorded for its turns (its rollout files)."""
    found = set()
    for rollout in (home / "sessions").rglob("*.jsonl"):
        for line in rollout.read_text().splitlines():
            info = json.loads(line).get("payload", {}).get("info") or {}
            if isinstance(info, dict) and info.get("model_context_window"):
                found.add(info["model_context_window"])
    return found


def test_codex_takes_its_models_metadata_from_the_models_array(slots, hal0, tmp_path):
    # The fake lists its model with a 4096-token context (llama.cpp's context_length).
    wait_until(
        lambda: any(
            m.get("context_length") == 4096
            for m in httpx.get(hal0.url + "/v1/models", timeout=5).json()["data"]
        ),
        "hal0web to list what the slot's server said of its model",
    )
    done = _codex(tmp_path, hal0.url, "talker", command_auth=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hello from chatty" in done.stdout
    # Found: no fallback metadata, and the listed context (less Codex's 5 % headroom).
    assert "Model metadata for `talker` not found" not in done.stdout + done.stderr
    assert _context_windows(tmp_path / "codex-home") == {4096 * 95 // 100}


def test_codex_runs_the_tool_a_chat_only_slot_calls_and_answers_after_it(slots, hal0, tmp_path):
    agent: ChatAgent = slots["agent"]
    agent.calls_tools, agent.tool = True, "exec_command"
    agent.arguments = {"cmd": "echo hal0-tool-ran"}
    try:
        done = _codex(tmp_path, hal0.url, "talker")
    finally:
        agent.calls_tools, agent.tool, agent.arguments = False, None, None
    assert done.returncode == 0, done.stderr[-2000:]
    # The call went to Codex as a function_call, its result came back as Codex's next
    # request (function_call + function_call_output), said to the slot as chat.
    asked, answered = agent.chats()[-2:]
    assert asked["messages"][-1] == {"role": "user", "content": PROMPT}
    call, result = answered["messages"][-2:]
    assert call["role"] == "assistant"
    assert call["tool_calls"][0]["function"] == {
        "name": "exec_command",
        "arguments": '{"cmd": "echo hal0-tool-ran"}',
    }
    assert result["role"] == "tool" and result["tool_call_id"] == call["tool_calls"][0]["id"]
    assert "hal0-tool-ran" in result["content"]  # Codex ran it (read-only sandbox)
    assert "the tool said:" in done.stdout


def test_the_models_array_says_what_the_listing_says_and_no_more():
    from dispatch.api.codex_models import models

    data = [
        {"id": "llama", "context_length": 8192, "capabilities": ["completion", "multimodal"]},
        {"id": "vllm", "max_model_len": 32768},
        {"id": "router", "meta": {"n_ctx": 4096, "n_ctx_train": 131072}},
        # What the model was trained for is not what it is served with: no window claimed.
        {"id": "bare", "meta": {"n_ctx_train": 131072}, "context_length": "big"},
    ]
    listed = models(data)
    assert [m["slug"] for m in listed] == ["llama", "vllm", "router", "bare"]
    assert [m["priority"] for m in listed] == [0, 1, 2, 3]
    assert [m["context_window"] for m in listed] == [8192, 32768, 4096, None]
    assert [m["input_modalities"] for m in listed] == [
        ["text", "image"],
        ["text"],
        ["text"],
        ["text"],
    ]
    # Every field Codex 0.171's ModelInfo requires (it refuses the whole array otherwise).
    required = {
        "slug", "display_name", "description", "supported_reasoning_levels", "shell_type",
        "visibility", "supported_in_api", "priority", "upgrade", "base_instructions",
        "supports_reasoning_summaries", "support_verbosity", "default_verbosity",
        "apply_patch_tool_type", "truncation_policy", "supports_parallel_tool_calls",
        "experimental_supported_tools",
    }  # fmt: skip
    assert all(required <= set(m) for m in listed)
