"""Claude Code (the real CLI, tests/clients) through hal0web: against a slot whose server
speaks Anthropic Messages (passed through) and one whose server speaks only Chat Completions
(translated). Either way it prints the server's answer and exits 0."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatch.models import Slot
from dispatch.routing.states import READY
from tests.clients import cli
from tests.conftest import add_slot
from tests.fake_chat import ChatUpstream, ToolCall
from tests.fakes import FakeUpstream, ServerThread
from tests.polling import wait_until


@pytest.fixture
def slots(transactional_db, hal0) -> Iterator[dict[str, FakeUpstream]]:
    native = FakeUpstream("native", models=["claude-local"])
    chat = ChatUpstream("chatty", models=["qwen-local"], reasoning="The user says hi.")
    servers = [ServerThread(native).start(), ServerThread(chat).start()]
    try:
        add_slot("native", servers[0].url + "/v1", ["claude-local"])
        add_slot("chatty", servers[1].url + "/v1", ["qwen-local"], endpoints=["chat/completions"])
        wait_until(
            lambda: all(s.state == READY for s in Slot.objects.all()), "both slots ready", 10
        )
        yield {"native": native, "chatty": chat}
    finally:
        for server in servers:
            server.stop()


def claude(hal0_url: str, model: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": hal0_url,
        "ANTHROPIC_API_KEY": "x",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        # Its background calls (titles, summaries) go to the same model.
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
    }
    return subprocess.run(
        [str(cli("claude")), "-p", "say hi", "--model", model],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_claude_code_on_a_slot_that_speaks_messages(slots, hal0, tmp_path):
    done = claude(hal0.url, "claude-local", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello from native"
    sent = [s for s in slots["native"].calls() if s.path.startswith("/v1/messages")]
    assert sent and all(s.json["model"] == "claude-local" for s in sent)
    assert not slots["chatty"].calls()


def test_claude_code_on_a_slot_that_speaks_only_chat_completions(slots, hal0, tmp_path):
    chatty = slots["chatty"]
    done = claude(hal0.url, "qwen-local", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello from chatty"
    (first, *_) = chatty.seen("/v1/chat/completions")
    body = first.json
    # What Claude Code sends, said as Chat: its system prompt first, its tools as functions,
    # thinking asked of the template, a stream with its counts; nothing of Anthropic's own.
    assert body["messages"][0]["role"] == "system"
    assert "Claude" in body["messages"][0]["content"]
    assert not body["messages"][0]["content"].startswith("x-anthropic-billing-header")
    assert all(m["role"] in ("user", "assistant", "tool") for m in body["messages"][1:])
    assert body["tools"] and all(t["type"] == "function" for t in body["tools"])
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert b"cache_control" not in first.body
    assert not {"context_management", "output_config", "thinking", "metadata"} & set(body)
    assert not slots["native"].calls()


def test_claude_code_runs_a_tool_and_reads_its_result_through_the_translation(
    slots, hal0, tmp_path
):
    """The agent's loop through Chat: the model calls Read (streamed as input_json_delta),
    Claude Code runs it and sends the result back (a tool_result, said as a tool message),
    and prints what the model then says."""
    chatty = slots["chatty"]
    notes = tmp_path / "notes.txt"
    notes.write_text("the secret word is pelican\n")
    chatty.tool_calls = [ToolCall("Read", {"file_path": str(notes)})]
    chatty.finish_reason = "tool_calls"
    chatty.answers_tool_results = True
    done = claude(hal0.url, "qwen-local", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pelican" in done.stdout
    asked = [s.json for s in chatty.seen("/v1/chat/completions")]
    assert len(asked) >= 2
    last = asked[-1]["messages"]
    call = next(m for m in last if m.get("tool_calls"))
    assert call["tool_calls"][0]["function"]["name"] == "Read"
    result = next(m for m in last if m["role"] == "tool")
    assert result["tool_call_id"] == call["tool_calls"][0]["id"]
    assert "pelican" in result["content"]
