"""Shared fixtures: fake upstreams on real sockets, slots in the database, a live hal0web."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings as hypothesis_settings

from tests import runtime
from tests.fakes import FakeUpstream, ServerThread

if TYPE_CHECKING:
    from tests.cut_proxy import CutProxy
    from tests.processes import Hal0Process

# Tests never read the developer's .env or data directory.
os.environ.setdefault("HAL0_ENV_FILE", "/nonexistent")

# Property tests explore new random examples on every local run (pin what they find with
# @example); CI (.ci/run sets CI=1) replays a fixed set, so it never turns red on a new draw.
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def django_db_modify_db_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A file SQLite test database, one per test run.

    The live server runs in another thread; in-memory SQLite's shared cache answers a
    concurrent reader with "table is locked" at once, where a file database in WAL mode
    lets readers and the writer proceed (and waits out write locks).
    """
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.sqlite3":
        db.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("db") / "test.sqlite3")


PG_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database on the local PostgreSQL, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the scale extra)")
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    name = f"hal0_test_{secrets.token_hex(6)}"
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgres://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(autouse=True)
def fresh_runtime() -> Iterator[None]:
    """Each test starts with an empty routing table, no watcher and no pooled clients: the
    whole process runtime put back through one list (tests/runtime.py)."""
    runtime.reset()
    yield
    runtime.reset("transport")  # a test's mock transport is not left in the pool's place


@pytest.fixture(autouse=True)
def redis_left_clean() -> Iterator[None]:
    """A test that took a Redis database (tests/processes.py) leaves it empty."""
    yield
    processes = sys.modules.get("tests.processes")
    if processes is not None:
        processes.empty_used_redis_dbs()


@pytest.fixture
def fake_pair() -> Iterator[dict[str, tuple[FakeUpstream, ServerThread]]]:
    """The seed scenario's two servers: `primary` and `agent-hermes`."""
    primary = FakeUpstream("primary", models=["qwen3-coder-40b"])
    hermes = FakeUpstream("agent-hermes", models=["qwen3-coder-reap-25b-a3b-q5km"])
    servers = {
        "primary": (primary, ServerThread(primary).start()),
        "agent-hermes": (hermes, ServerThread(hermes).start()),
    }
    yield servers
    for _, server in servers.values():
        server.stop()


@pytest.fixture
def fake(transactional_db: None) -> Iterator[tuple[FakeUpstream, ServerThread]]:
    """One fake server, `a`, serving `m1`."""
    f = FakeUpstream("a", models=["m1"])
    server = ServerThread(f).start()
    yield f, server
    server.stop()


def add_slot(name: str, url: str, models: list[str] | None = None, **fields: Any) -> Any:
    """Create a slot with declared models (the first is the default), in one transaction as
    the admin and `slots import` do: a running watcher must not probe the slot, and register
    what it discovers, between the slot and its models."""
    from django.db import transaction

    from dispatch.models import Slot, SlotModel

    aliases: dict[str, str] = fields.pop("aliases", {})
    with transaction.atomic():
        slot = Slot.objects.create(name=name, url=url, **fields)
        for i, model_id in enumerate(models or []):
            SlotModel.objects.create(slot=slot, model_id=model_id, is_default=(i == 0))
        for alias, target in aliases.items():
            SlotModel.objects.create(
                slot=slot, model_id=alias, upstream_model=target, source="alias"
            )
    return slot


@pytest.fixture
def seed_slots(
    fake_pair: dict[str, tuple[FakeUpstream, ServerThread]], transactional_db: None
) -> dict[str, Any]:
    """The seed's two slots in the database, pointing at the two fakes."""
    p_url = fake_pair["primary"][1].url + "/v1"
    h_url = fake_pair["agent-hermes"][1].url + "/v1"
    return {
        "primary": add_slot("primary", p_url, ["qwen3-coder-40b"], is_default=True),
        "agent-hermes": add_slot(
            "agent-hermes",
            h_url,
            ["qwen3-coder-reap-25b-a3b-q5km"],
            aliases={"hermes": "qwen3-coder-reap-25b-a3b-q5km"},
        ),
    }


@pytest.fixture
def no_watcher(settings: Any) -> None:
    """Nothing probes on its own. Request it before `hal0`, which starts the runtime."""
    settings.HAL0_WATCHER = False
    settings.HAL0_PROBE_INTERVAL_S = 60


@pytest.fixture
def hal0(transactional_db: None, settings: Any) -> Iterator[ServerThread]:
    """hal0web itself, served by Uvicorn on a loopback port, sharing the test database."""
    from hal0web.asgi import application

    if settings.HAL0_WATCHER:
        settings.HAL0_PROBE_INTERVAL_S = 0.2
    settings.HAL0_COLD_PROBE_S = 2
    # The application object outlives tests: let each live server start its own runtime (bind
    # its loop for events, start the watcher), not only the first one in the session.
    application._started = False
    server = ServerThread(application).start()
    yield server
    server.stop()
    # Request-log rows still queued belong to this test's database: write them before it is
    # flushed, not into the next test's.
    from dispatch.observability import requestlog

    requestlog.writer.flush(5)


# --- a fleet: two slots for each kind of endpoint, each its own server --------------------
# slot name -> (type, declared models, aliases). Two of each, so a request that lands on the
# wrong slot fails its test.
FLEET: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "llm-a": ("llm", ["alpha"], {"al": "alpha"}),
    "llm-b": ("llm", ["beta"], {}),
    "rr-a": ("reranking", ["rerank-a"], {}),
    "rr-b": ("reranking", ["rerank-b"], {}),
    "stt-a": ("transcription", ["whisper-a"], {"whisper": "whisper-a"}),
    "stt-b": ("transcription", ["whisper-b"], {}),
    "tts-a": ("tts", ["voice-a"], {}),
    "tts-b": ("tts", ["voice-b"], {}),
    "img-a": ("image", ["paint-a"], {"paint": "paint-a"}),
    "img-b": ("image", ["paint-b"], {}),
}


@pytest.fixture(scope="module")
def fleet_servers() -> Iterator[dict[str, tuple[FakeUpstream, ServerThread]]]:
    servers = {}
    for name, (_, models, _) in FLEET.items():
        fake = FakeUpstream(name, models=list(models), listing="llama.cpp")
        servers[name] = (fake, ServerThread(fake).start())
    yield servers
    for _, server in servers.values():
        server.stop()


@pytest.fixture
def fleet(
    fleet_servers: dict[str, tuple[Any, ServerThread]], transactional_db: None
) -> dict[str, Any]:
    """The fleet's slots in the database; the fakes by slot name."""
    for name, (slot_type, models, aliases) in FLEET.items():
        add_slot(
            name,
            fleet_servers[name][1].url + "/v1",
            models,
            type=slot_type,
            aliases=aliases,
            is_default=name == "llm-a",
        )
    return {name: fake for name, (fake, _) in fleet_servers.items()}


@pytest.fixture
def fleet_sdk(fleet: dict[str, Any], hal0: ServerThread) -> Iterator[Any]:
    """The official `openai` SDK pointed at hal0web in front of the fleet."""
    import openai

    client = openai.OpenAI(base_url=hal0.url + "/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The demo's two real llama-servers, ready, for one test module (tests/llama_servers.py:
    skips locally, fails in CI, without the binary or the models)."""
    from tests.llama_servers import start_pair

    yield from start_pair(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def llama_router(llama_pair: dict[str, Any]) -> Any:
    """The demo's ``primary``: llama-server in router mode over both demo models."""
    from dispatch.lifecycle import demo

    return llama_pair[demo.PRIMARY.name]


@pytest.fixture
def processes() -> Iterator[list[Hal0Process]]:
    """Server processes a test starts (append them): stopped after it, whatever happened."""
    started: list[Hal0Process] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def proxy() -> Iterator[CutProxy]:
    """A way to the shared PostgreSQL that the test can cut (and restore)."""
    from tests.cut_proxy import CutProxy

    made = CutProxy()
    yield made
    made.close()
