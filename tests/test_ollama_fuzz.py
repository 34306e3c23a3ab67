"""Fuzzed Ollama requests through the real server, translated to a slot that speaks OpenAI's
API and passed to one that speaks Ollama's: every answer is one a client parses (JSON, or
NDJSON lines), every error Ollama's ``{"error": "..."}``, never a 500 nor an HTML page."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import add_slot
from tests.fake_ollama import FakeOllama
from tests.fake_openai_chat import FakeChat
from tests.fakes import ServerThread
from tests.ollama_bodies import JSON, OLLAMA_BODY

PATHS = [
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/api/tags",
    "/api/ps",
    "/api/version",
    "/api/pull",
]
MODELS = st.sampled_from(["gemma3", "gemma3:latest", "nomic", "llama3.2:1b", "nope", ""]) | JSON
BODIES = st.one_of(
    st.tuples(OLLAMA_BODY, MODELS).map(lambda p: json.dumps({**p[0], "model": p[1]}).encode()),
    OLLAMA_BODY.map(lambda d: json.dumps(d).encode()),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=100),
)
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def client(transactional_db: None, settings, hal0) -> Iterator[httpx.Client]:
    settings.HAL0_SWAP_WAIT_S = 5
    chat = FakeChat("chat", models=["gemma3"])
    emb = FakeChat("emb", models=["nomic"])
    ol = FakeOllama(models=["llama3.2:1b"])
    servers = [ServerThread(f).start() for f in (chat, emb, ol)]
    add_slot("chat", servers[0].url + "/v1", ["gemma3"])
    add_slot("emb", servers[1].url + "/v1", ["nomic"], type="embedding")
    add_slot("ol", servers[2].url + "/v1", ["llama3.2:1b"], kind="ollama")
    with httpx.Client(base_url=hal0.url, timeout=30) as c:
        yield c
    for server in servers:
        server.stop()


def _ollama_error(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("error"), str)


@FUZZ
@given(
    method=st.sampled_from(["POST"] * 5 + ["GET", "DELETE"]),
    path=st.sampled_from(PATHS[:2] * 3 + PATHS),
    body=BODIES,
)
def test_fuzzed_ollama_requests_get_ollamas_answers(client, method, path, body):
    with client.stream(method, path, content=body) as r:
        content = r.read()
    assert r.status_code != 500, content[:300]
    event(f"{path} {r.status_code}")  # --hypothesis-show-statistics: how far they went
    kind = r.headers.get("content-type", "")
    assert kind.startswith(("application/json", "application/x-ndjson")), (kind, content[:300])
    lines = [json.loads(line) for line in content.split(b"\n") if line.strip()]
    assert lines, (r.status_code, content[:300])
    if r.status_code >= 400:
        assert len(lines) == 1 and _ollama_error(lines[0]), lines
    for line in lines:
        assert isinstance(line, dict) and ("error" not in line or _ollama_error(line)), line
