"""The embedded SQLite database with several writers at once (issue 11): the watcher and the
admin never fail with "database is locked", and a probe result that cannot be written is
retried, then saved by the next probe — never lost with a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests.fakes import FakeUpstream, ServerThread
from tests.processes import manage, server_env


@pytest.fixture
def embedded(tmp_path: Path) -> dict[str, str]:
    """A fresh embedded database (settings' own SQLite options) holding the demo's slots."""
    env = server_env(tmp_path, HAL0_LOG_LEVEL="INFO")
    manage(env, "migrate", "-v0")
    manage(env, "slots", "import", str(settings.BASE_DIR / "slots"))
    return env


def _worker(env: dict[str, str], role: str, seconds: float, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.sqlite_worker", role, str(seconds), *args],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_the_watcher_and_the_admin_write_at_once_without_lock_errors(
    embedded: dict[str, str],
) -> None:
    # Measured on the old settings (deferred transactions): about 300 "database is locked"
    # in 4 s from these three writers.
    procs = [_worker(embedded, role, 3) for role in ("watcher", "admin", "admin")]
    results = [_result(p)[0] for p in procs]
    for result in results:
        assert result["errors"] == 0, result
        assert result["done"] > 0, result


def test_a_probe_result_the_database_refuses_is_retried_and_saved_by_the_next_probe(
    embedded: dict[str, str],
) -> None:
    server = ServerThread(FakeUpstream("primary", models=["m1"])).start()
    try:
        result, log = _result(_worker(embedded, "locked", 0, server.url + "/v1"))
    finally:
        server.stop()
    assert result == {"first": False, "while_locked": "unknown", "second": True, "after": "ready"}
    assert "could not save the probe of slot primary (database is locked); the next probe" in log
    assert "Traceback" not in log
