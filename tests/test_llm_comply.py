"""The conformance suite llm-comply (0.5.0, from PyPI) against the real llama-server, through
hal0web both ways: a slot that speaks Anthropic Messages and Open Responses natively (passed
through) and a slot on the same server with those endpoints declared off (its ``endpoints``
lists only chat/completions and completions), which hal0web serves by translation. Same
model, greedy sampling (``--temp 0``), the same requests.

Per test, the result must be the same both ways, and so must what llm-comply found wrong
(less the model's own words, which a translated prompt may change). The differences that are
not are listed in ``JUSTIFIED`` and in the README ("What translation changes"), each with its
reason; a difference not listed fails the test, and so does a listed one that went away.
compatcanary (0.2.2, from npm: tests/clients) must give the same results both ways too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatch.lifecycle import demo
from tests.clients import cli
from tests.conftest import add_slot
from tests.fakes import free_port
from tests.llama_servers import llama_server_binary, skip_without_models, wait_for_state

pytestmark = pytest.mark.llama

SMOL = demo.SMOLLM2.id
FORMATS = ("anthropic", "open-responses", "openai-chat")
LLM_COMPLY = Path(sys.executable).parent / "llm-comply"

# llama-server's own Response object (native /v1/responses) leaves out fields the Open
# Responses schema requires (incomplete_details, instructions, tools, tool_choice, text,
# truncation, store, metadata, ... and in its stream's response.created most of the
# Response); hal0web's translation gives every one (dispatch/wire/translators/responses_echo.py).
_RESPONSE_FIELDS = "llama-server's Response omits fields the schema requires; hal0web's has them"
# llama-server's native /v1/messages answers an image it cannot see (no vision model) with a
# 500 in OpenAI's error shape; hal0web's translation says the same error in Anthropic's.
_ERROR_SHAPE = (
    "llama-server's error is OpenAI-shaped on its Anthropic path; hal0web's is Anthropic's"
)
# (format, test id) -> (native result, translated result, why they differ). Every entry is
# also in the README's table.
JUSTIFIED: dict[tuple[str, str], tuple[str, str, str]] = {
    **{
        ("open-responses", test_id): ("failed", "passed", _RESPONSE_FIELDS)
        for test_id in (
            "basic-response",
            "system-prompt",
            "multi-turn",
            "streaming-response",
            "streaming-usage",
            "assistant-phase",
            "response-output-phase-schema",
        )
    },
    # SmolLM2 calls no tool either way; what is left to find wrong is fewer translated.
    ("open-responses", "tool-calling"): ("failed", "failed", _RESPONSE_FIELDS),
    ("anthropic", "anth-image-input"): ("failed", "failed", _ERROR_SHAPE),
}

# What llm-comply quotes of the model's own output: a text block, a usage object.
_QUOTED = re.compile(r"\{'type': 'text', 'text': .*\} is not valid|usage: \{.*\} is not valid")


@pytest.fixture(scope="module")
def greedy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[demo.LlamaServer]:
    """llama-server on SmolLM2 alone, greedy: the same prompt gets the same answer."""
    skip_without_models()
    base = tmp_path_factory.mktemp("llama-comply")
    spec = demo.DemoSlot("comply", (demo.SMOLLM2,), router=False)
    args = [*demo.server_args(spec, {SMOL: demo.smollm2_path()}, base), "--temp", "0"]
    server = demo.LlamaServer(spec, llama_server_binary(), args, free_port(), base / "log")
    try:
        server.start()
        server.wait_ready(60)
        yield server
    finally:
        server.stop()


def _json_report(command: list[str]) -> dict[str, Any]:
    """What a conformance tool printed as its JSON report (it exits non-zero on failures)."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        name = Path(command[0]).name
        raise AssertionError(f"{name} wrote no JSON report: {done.stderr[-2000:]}") from None
    return report


def _report(base_url: str, fmt: str, model: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Each test's result and what it found wrong (the model's quoted words left out)."""
    report = _json_report(
        [str(LLM_COMPLY), "run", "--format", fmt, "-u", base_url, "-m", model, "-k", "unused",
         "--timeout", "60", "--json"],
    )  # fmt: skip
    return {
        r["id"]: (
            r["status"],
            frozenset(_QUOTED.sub("<model output>", e) for e in r.get("errors", [])),
        )
        for r in report["results"]
    }


def test_llm_comply_gives_the_same_results_native_and_translated(
    greedy_server: demo.LlamaServer, transactional_db: None, hal0: Any
) -> None:
    add_slot("native", greedy_server.api_url, [SMOL], kind="llamacpp")
    add_slot(
        "translated",
        greedy_server.api_url,
        [SMOL],
        kind="llamacpp",
        endpoints=["chat/completions", "completions"],
    )
    for name in ("native", "translated"):
        wait_for_state(hal0.url, name, "ready")
    differences: dict[tuple[str, str], tuple[str, str]] = {}
    found_by: dict[tuple[str, str], str] = {}
    for fmt in FORMATS:
        native = _report(hal0.url + "/v1", fmt, f"native/{SMOL}")
        translated = _report(hal0.url + "/v1", fmt, f"translated/{SMOL}")
        assert native.keys() == translated.keys()
        for test_id, (status, found) in native.items():
            other, other_found = translated[test_id]
            if (status, found) != (other, other_found):
                differences[(fmt, test_id)] = (status, other)
                found_by[(fmt, test_id)] = (
                    f"native only: {sorted(found - other_found)}; "
                    f"translated only: {sorted(other_found - found)}"
                )
    assert differences == {k: v[:2] for k, v in JUSTIFIED.items()}, found_by


def _canary(base_url: str, model: str) -> dict[str, str]:
    """compatcanary's result per check (its modern profile: chat, streaming, tools, strict
    structured output, the Responses API and its stream)."""
    report = _json_report(
        [str(cli("compatcanary")), "scan", "--base-url", base_url, "--model", model,
         "--api-key", "unused", "--format", "json", "--timeout", "60", "--fail-on", "never"],
    )  # fmt: skip
    return {r["id"]: r["status"] for r in report["results"]}


def test_compatcanary_gives_the_same_results_native_and_translated(
    greedy_server: demo.LlamaServer, transactional_db: None, hal0: Any
) -> None:
    """compatcanary 0.2.2 (npm) against the same server, Responses native and translated."""
    add_slot("native", greedy_server.api_url, [SMOL], kind="llamacpp")
    add_slot("translated", greedy_server.api_url, [SMOL], kind="llamacpp",
             endpoints=["chat/completions", "completions"])  # fmt: skip
    for name in ("native", "translated"):
        wait_for_state(hal0.url, name, "ready")
    native = _canary(hal0.url + "/v1", f"native/{SMOL}")
    translated = _canary(hal0.url + "/v1", f"translated/{SMOL}")
    assert {"responses.basic", "responses.streaming", "chat.basic"} <= native.keys()
    assert translated == native
    assert native["responses.basic"] == native["responses.streaming"] == "pass"
