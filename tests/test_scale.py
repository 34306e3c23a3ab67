"""The `scale` extra for real: PostgreSQL as the database, Redis as the channel layer.

Skipped, with the reason, when the service (or the extra's package) is not there.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live import Heard

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"

HAL0_STYLE = """\
name = "brain"
port = 8089
type = "llm"
runtime = "container"
profile = "brain"
n_gpu_layers = -1
a = 1

[model]
default = "MiniCPM5-1B"
context_size = 65536

[server]
zz_long_key_name = "x"
b = 2
"""


# --- PostgreSQL ------------------------------------------------------------------------------


def manage(db_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "SECRET_KEY"}}
    env.update(
        DATABASE_URL=db_url,
        HAL0_DATA_DIR=str(tmp_path / "data"),
        HAL0_ENV_FILE="/nonexistent",
        DJANGO_SETTINGS_MODULE="hal0web.settings",
    )
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def query(db_url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(db_url) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.postgres
def test_migrate_import_export_on_postgresql(pg_url, tmp_path):
    assert manage(pg_url, tmp_path, "migrate", "-v0").returncode == 0
    extra_dir = tmp_path / "extra"
    extra_dir.mkdir()
    (extra_dir / "brain.toml").write_text(HAL0_STYLE)

    r = manage(pg_url, tmp_path, "slots", "import", "slots/", str(extra_dir))
    assert r.returncode == 0, r.stderr
    assert "3 created" in r.stdout
    assert query(pg_url, "SELECT name, url, is_default FROM dispatch_slot ORDER BY name") == [
        ("agent-hermes", "http://127.0.0.1:8002/v1", False),
        ("brain", "http://127.0.0.1:8089/v1", False),
        ("primary", "http://127.0.0.1:8001/v1", True),
    ]
    models = query(
        pg_url,
        "SELECT s.name, m.model_id, m.upstream_model, m.source, m.is_default "
        "FROM dispatch_slotmodel m JOIN dispatch_slot s ON s.id = m.slot_id ORDER BY 1, 2",
    )
    assert models == [
        ("agent-hermes", "gemma3-270m", "gemma3-270m", "manifest", True),
        ("agent-hermes", "hermes", "gemma3-270m", "alias", False),
        ("brain", "MiniCPM5-1B", "MiniCPM5-1B", "manifest", True),
        ("primary", "smollm2-135m-instruct", "smollm2-135m-instruct", "manifest", True),
    ]

    # jsonb stores keys in its own order; the export must not depend on it.
    first, second = tmp_path / "first", tmp_path / "second"
    assert manage(pg_url, tmp_path, "slots", "export", str(first)).returncode == 0
    r = manage(pg_url, tmp_path, "slots", "import", str(first))
    assert "0 created, 0 updated, 0 deleted, 3 unchanged" in r.stdout, r.stdout + r.stderr
    assert manage(pg_url, tmp_path, "slots", "export", str(second)).returncode == 0
    for f in first.iterdir():
        assert f.read_bytes() == (second / f.name).read_bytes(), f.name
    assert "[server]\nb = 2\nzz_long_key_name = " in (first / "brain.toml").read_text()


@pytest.mark.postgres
def test_constraints_and_rollback_on_postgresql(pg_url, tmp_path):
    import psycopg

    assert manage(pg_url, tmp_path, "migrate", "-v0").returncode == 0
    assert manage(pg_url, tmp_path, "slots", "import", "slots/").returncode == 0
    before = query(pg_url, "SELECT name, is_default, url FROM dispatch_slot ORDER BY name")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "aaa.toml").write_text('name = "aaa"\nport = 9001\n')
    (bad / "zzz.toml").write_text('name = "zzz"\nport = 9002\ndefault = true\n')
    r = manage(pg_url, tmp_path, "slots", "import", str(bad))
    assert r.returncode == 1
    assert f"{bad}/zzz.toml: default: slot 'primary' is already the default llm slot" in r.stderr
    # `aaa` was written before `zzz` failed: the one transaction rolled it back.
    assert query(pg_url, "SELECT name, is_default, url FROM dispatch_slot ORDER BY name") == before

    # The rules hold in the database itself, not only in clean().
    with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("UPDATE dispatch_slot SET is_default = true WHERE name = 'agent-hermes'")
    with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO dispatch_slotmodel (slot_id, model_id, upstream_model, source, is_default) "
            "SELECT id, 'second-default', 'second-default', 'manifest', true "
            "FROM dispatch_slot WHERE name = 'primary'"
        )
    with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE dispatch_slot SET idle_timeout_s = 0 WHERE name = 'primary'")

    r = manage(pg_url, tmp_path, "slots", "import", "slots/primary.toml", "--prune", "--dry-run")
    assert "would delete slot agent-hermes" in r.stdout, r.stderr
    assert query(pg_url, "SELECT count(*) FROM dispatch_slot") == [(2,)]
    r = manage(pg_url, tmp_path, "slots", "import", "slots/primary.toml", "--prune")
    assert r.returncode == 0, r.stderr
    assert query(pg_url, "SELECT name FROM dispatch_slot") == [("primary",)]
    assert query(pg_url, "SELECT count(*) FROM dispatch_slotmodel") == [(1,)]


# --- Redis -----------------------------------------------------------------------------------


def _redis_reachable() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2):
            return None
    except OSError as exc:
        return f"Redis is not reachable at {REDIS_URL}: {exc}"


@pytest.fixture
def redis_layers(settings):
    """This process's channel layer on Redis, plus a second, separate layer instance.

    The second instance stands in for another worker process: it shares nothing with the
    first but Redis. A random prefix keeps the test's groups apart from anything else.
    """
    pytest.importorskip(
        "channels_redis", reason="channels-redis is not installed (the scale extra)"
    )
    reason = _redis_reachable()
    if reason:
        pytest.skip(reason)
    from channels_redis.core import RedisChannelLayer  # type: ignore[import-untyped]

    prefix = f"hal0test{secrets.token_hex(4)}"
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": prefix},
        }
    }
    other = RedisChannelLayer(hosts=[REDIS_URL], prefix=prefix)
    return other


@pytest.mark.redis
async def test_group_send_reaches_a_member_on_another_worker(redis_layers):
    from channels.layers import get_channel_layer

    from dispatch.coordination import events

    other = redis_layers
    ours = get_channel_layer()
    assert type(ours).__name__ == "RedisChannelLayer" and ours is not other
    try:
        # A page on this worker joins through the app's own join()...
        page = Heard()
        await events.join(page, staff=True, username="op")
        # ...and the other worker's pages' channel is in the group too.
        theirs = await other.new_channel()
        await other.group_add(events.GROUP, theirs)

        # This worker tells every page, through its batches.
        event = {"type": "slot.state", "slot": "primary", "state": "ready"}
        events.tell_pages(event)
        batch = await asyncio.wait_for(other.receive(theirs), 10)
        assert (batch["type"], batch["group"], batch["events"]) == (
            "dispatch.batch",
            events.GROUP,
            [event],
        )
        await page.until(1, timeout=10)
        assert page.events == [event]

        # And the other way round: the other worker's batches reach this one's page, and
        # one that comes after a gap tells it how many it missed.
        stream = "other " + events.GROUP
        for count, n in ((1, 2), (4, 3)):
            batch = events.batch_message(events.GROUP, count, [{"n": n}], stream)
            await other.group_send(events.GROUP, batch)
        await page.until(3, missed=2, timeout=10)
        assert page.events == [event, {"n": 2}, {"n": 3}]
        await events.leave(page)
        await other.group_send(
            events.GROUP, events.batch_message(events.GROUP, 5, [{"n": 4}], stream)
        )
        await asyncio.sleep(0.5)
        assert page.events == [event, {"n": 2}, {"n": 3}]  # gone: it hears no more
    finally:
        for layer in (ours, other):
            await layer.flush()
            await layer.close_pools()


WRITE_REQUEST_LOG = """
import time, django
django.setup()
from dispatch.observability import requestlog
from dispatch.observability.decisions import DecisionRecord
from dispatch.models import RequestLog
from dispatch.routing.resolver import resolve
from dispatch.coordination.store import store
store.reload()
for i in range(30):
    rec = DecisionRecord(request_id=f"pg-{i}", endpoint="chat/completions", model="hermes",
                         slot="agent-hermes", status=200, duration_ms=1.5, at=time.time(),
                         resolution_path="alias:agent-hermes", completion_tokens=i)
    rec.decision = resolve(store.table, "hermes", "chat/completions")
    requestlog.output(rec)
assert requestlog.writer.flush(10)
row = RequestLog.objects.get(request_id="pg-7")
print(RequestLog.objects.count(), row.completion_tokens, row.candidates[0]["slot"], row.at.tzname(), row.why)
"""


@pytest.mark.postgres
def test_the_request_log_writer_on_postgresql(pg_url, tmp_path):
    """The writer's plain-values INSERT on PostgreSQL: timestamps and JSON as Django stores them."""
    assert manage(pg_url, tmp_path, "migrate", "-v0").returncode == 0
    assert manage(pg_url, tmp_path, "slots", "import", "slots/").returncode == 0
    r = manage(pg_url, tmp_path, "shell", "-c", WRITE_REQUEST_LOG)
    assert r.returncode == 0, r.stderr
    count, tokens, slot, tz, why = r.stdout.strip().splitlines()[-1].split(" ", 4)
    assert (count, tokens, slot, tz) == ("30", "7", "agent-hermes", "UTC")
    assert why.startswith("answered by agent-hermes: 'hermes' is agent-hermes's alias")
