"""Alias patterns through hal0web over HTTP: Anthropic's model names, as an unchanged Claude
Code sends them, reach the slots the operator's `claude-*` patterns name; and the real
CLIs with their default model names, Claude Code answered by a slot that speaks Anthropic
Messages natively, Codex by one that speaks the Responses API."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from dispatch.models import RequestLog
from dispatch.observability import requestlog
from tests.clients import cli
from tests.conftest import add_slot
from tests.fakes import FakeUpstream, ServerThread

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def claude_fleet(transactional_db: None) -> Iterator[dict[str, FakeUpstream]]:
    """`big` takes every claude-* name (its own qwen3-30b), `small` the haiku ones (its
    gemma3-270m, for Claude Code's background work); `exact` serves one Anthropic name
    as a model id of its own. Each a fake that speaks Anthropic Messages natively."""
    fakes = {
        "big": FakeUpstream("big", models=["qwen3-30b"]),
        "small": FakeUpstream("small", models=["gemma3-270m"]),
        "exact": FakeUpstream("exact", models=["claude-opus-4-1"]),
    }
    servers = {name: ServerThread(f).start() for name, f in fakes.items()}
    add_slot("big", servers["big"].url + "/v1", ["qwen3-30b"], aliases={"claude-*": "qwen3-30b"})
    add_slot(
        "small",
        servers["small"].url + "/v1",
        ["gemma3-270m"],
        aliases={"claude-haiku-*": "gemma3-270m"},
    )
    add_slot("exact", servers["exact"].url + "/v1", ["claude-opus-4-1"])
    yield fakes
    for server in servers.values():
        server.stop()


def sent_model(fake: FakeUpstream) -> str:
    return str(fake.seen("/v1/messages")[-1].json["model"])


def test_anthropic_names_reach_the_slots_their_patterns_name(claude_fleet, hal0):
    client = anthropic.Anthropic(base_url=hal0.url, api_key="unused", max_retries=0)
    try:
        raw = client.messages.with_raw_response.create(
            model="claude-haiku-4-5-20251001", max_tokens=16, messages=HI
        )
        assert raw.headers["x-hal0-slot"] == "small"
        assert raw.headers["x-hal0-resolution"] == "pattern:small"
        assert raw.parse().content[0].text == "hello from small"
        assert sent_model(claude_fleet["small"]) == "gemma3-270m"  # the pattern's model

        raw = client.messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=16, messages=HI
        )
        assert raw.headers["x-hal0-resolution"] == "pattern:big"
        assert raw.parse().content[0].text == "hello from big"
        assert sent_model(claude_fleet["big"]) == "qwen3-30b"

        # An exact id wins over every pattern, and goes upstream as it is.
        raw = client.messages.with_raw_response.create(
            model="claude-opus-4-1", max_tokens=16, messages=HI
        )
        assert raw.headers["x-hal0-resolution"] == "model:exact"
        assert sent_model(claude_fleet["exact"]) == "claude-opus-4-1"

        # Streamed, the same way.
        with client.messages.stream(model="claude-haiku-4-5", max_tokens=16, messages=HI) as stream:
            assert "".join(stream.text_stream) == "hello from small"

        # Case sensitive, as model ids are: no pattern takes it, an Anthropic-shaped 404.
        with pytest.raises(anthropic.NotFoundError) as exc:
            client.messages.create(model="Claude-Sonnet-4-5", max_tokens=16, messages=HI)
        assert exc.value.status_code == 404
        assert "Claude-Sonnet-4-5" in str(exc.value)
    finally:
        client.close()


def test_the_explanation_and_the_model_list_say_what_a_pattern_did(claude_fleet, hal0):
    r = httpx.post(
        hal0.url + "/v1/chat/completions",
        json={"model": "claude-haiku-4-5", "messages": HI},
        timeout=10,
    )
    assert r.status_code == 200 and r.headers["x-hal0-resolution"] == "pattern:small"
    listing = httpx.get(hal0.url + "/v1/models?all=true", timeout=10).json()["data"]
    ids = {e["id"] for e in listing}
    # A pattern is no id a client could send as it is listed: never an entry of its own...
    assert not any("*" in i for i in ids)
    assert {"qwen3-30b", "gemma3-270m", "claude-opus-4-1", "small/gemma3-270m"} <= ids
    # ...but said in the hal0 object of the model it stands for, on its slot.
    gemma = next(e for e in listing if e["id"] == "gemma3-270m")
    assert gemma["hal0"]["slots"][0]["patterns"] == ["claude-haiku-*"]
    pinned = next(e for e in listing if e["id"] == "small/gemma3-270m")
    assert pinned["hal0"]["patterns"] == ["claude-haiku-*"]
    exact = next(e for e in listing if e["id"] == "claude-opus-4-1")
    assert "patterns" not in exact["hal0"]["slots"][0]


def test_metrics_label_a_pattern_routed_request_by_its_pattern(claude_fleet, hal0, settings):
    settings.HAL0_METRICS_PUBLIC = True
    for i in range(3):
        r = httpx.post(
            hal0.url + "/v1/messages",
            json={"model": f"claude-haiku-random-{i}", "max_tokens": 8, "messages": HI},
            timeout=10,
        )
        assert r.status_code == 200
    text = httpx.get(hal0.url + "/metrics", timeout=10).text
    assert 'model="claude-haiku-*"' in text
    assert "claude-haiku-random" not in text  # what a client typed is no label


# --- the real Claude Code -------------------------------------------------------------------


def test_claude_code_with_its_default_model_names_is_answered(claude_fleet, hal0, tmp_path):
    """Claude Code 2.1.197, unchanged: no ANTHROPIC_MODEL, so it asks for Anthropic's own
    names (a sonnet or opus for the answer, haiku for background work). The `claude-*`
    patterns route them; a slot that speaks Messages natively answers."""
    claude = cli("claude")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "ANTHROPIC_BASE_URL": hal0.url,
        "ANTHROPIC_API_KEY": "x",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    done = subprocess.run(
        [str(claude), "-p", "hi"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    asked = {name: messages(f) for name, f in claude_fleet.items()}
    assert done.returncode == 0, (done.stdout, done.stderr, asked)
    assert "hello from big" in done.stdout, (done.stdout, asked)
    # It asked with Anthropic's own names; hal0web sent the slots' own (a haiku name, for
    # background work, would be small's gemma3-270m).
    assert asked["big"] and all(m == "qwen3-30b" for m in asked["big"]), asked
    assert all(m == "gemma3-270m" for m in asked["small"]) and not asked["exact"], asked
    requestlog.writer.flush(5)
    rows = RequestLog.objects.filter(endpoint="messages")
    assert rows and all(
        r.model.startswith("claude-") and r.resolution.startswith("pattern:") for r in rows
    ), [(r.model, r.resolution) for r in rows]


def messages(fake: FakeUpstream) -> list[str]:
    """The models a fake was sent on /v1/messages (Claude Code adds ?beta=true)."""
    return [s.json["model"] for s in fake.requests if s.path.split("?")[0] == "/v1/messages"]


def test_codex_with_its_default_model_name_is_answered(transactional_db, hal0, tmp_path):
    """Codex 0.171.0 configured as the README says, with no `model`: it asks for its own
    default (a gpt-… name), which a `gpt-*` pattern routes to a slot speaking Responses."""
    fake = FakeUpstream("coder", models=["qwen3-30b"])
    server = ServerThread(fake).start()
    try:
        add_slot("coder", server.url + "/v1", ["qwen3-30b"], aliases={"gpt-*": "qwen3-30b"})
        codex_home = tmp_path / "home" / ".codex"
        codex_home.mkdir(parents=True)
        (codex_home / "config.toml").write_text(
            'model_provider = "hal0"\n\n[model_providers.hal0]\nname = "hal0web"\n'
            f'base_url = "{hal0.url}/v1"\nwire_api = "responses"\nenv_key = "HAL0_API_KEY"\n'
        )
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path / "home"),
            "HAL0_API_KEY": "x",
        }
        done = subprocess.run(
            [str(cli("codex")), "exec", "--skip-git-repo-check", "hi"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        sent = [s.json["model"] for s in fake.requests if s.path == "/v1/responses"]
        assert done.returncode == 0, (done.stdout, done.stderr, sent)
        assert "hello from coder" in done.stdout
        assert sent and all(m == "qwen3-30b" for m in sent)
        requestlog.writer.flush(5)
        rows = RequestLog.objects.filter(endpoint="responses")
        assert rows and all(
            r.model.startswith("gpt-") and r.resolution == "pattern:coder" for r in rows
        ), [(r.model, r.resolution) for r in rows]
    finally:
        server.stop()
