"""Settings: read once from the environment (and an optional .env), validated loudly.

Each case starts a fresh interpreter: settings are read at import time, once per process.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Prints what the settings came out as, for the cases that start.
PROBE = """
import json, django
django.setup()
from django.conf import settings as s
print(json.dumps({
    "DEBUG": s.DEBUG,
    "SECRET_KEY": s.SECRET_KEY,
    "ALLOWED_HOSTS": s.ALLOWED_HOSTS,
    "DB_ENGINE": s.DATABASES["default"]["ENGINE"],
    "DB_NAME": str(s.DATABASES["default"]["NAME"]),
    "LAYER": s.CHANNEL_LAYERS["default"]["BACKEND"],
    "PROBE": s.HAL0_PROBE_INTERVAL_S,
    "BIND": s.HAL0_BIND,
    "SEEING": [s.HAL0_METRICS, s.HAL0_METRICS_PUBLIC, s.HAL0_REQUEST_LOG,
               s.HAL0_LOG_RETENTION_DAYS, s.HAL0_LOG_BODIES, s.HAL0_LOG_BODY_MAX_BYTES],
}))
"""


def start(tmp_path: Path, code: str = PROBE, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HAL0_")
        and k not in {"DEBUG", "SECRET_KEY", "DATABASE_URL", "REDIS_URL", "ALLOWED_HOSTS"}
    }
    clean.update(
        DJANGO_SETTINGS_MODULE="hal0web.settings",
        HAL0_DATA_DIR=str(tmp_path / "data"),
        HAL0_ENV_FILE=str(tmp_path / "no.env"),
    )
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=clean, capture_output=True, text=True
    )


def started(tmp_path: Path, **env: str) -> dict:
    proc = start(tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEBUG", "maybe"),
        ("DATABASE_URL", "nonsense://x"),
        ("HAL0_PROBE_INTERVAL_S", "-1"),
        ("HAL0_PROBE_INTERVAL_S", "often"),
        ("HAL0_MAX_BODY_MB", "0"),
        ("HAL0_SWAP_WAIT_S", "-3"),
        ("HAL0_WATCHER", "sometimes"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("HAL0_BIND", "everywhere"),
        ("HAL0_LOG_LEVEL", "LOUD"),
        ("HAL0_CORS_ORIGINS", "example.com"),
        ("HAL0_CORS_ORIGINS", "https://a.example/path"),
        ("HAL0_CORS_ORIGINS", "*"),
        ("HAL0_OUTLIER_BACKOFF_S", "-1"),
        ("HAL0_METRICS", "perhaps"),
        ("HAL0_METRICS_PUBLIC", "kinda"),
        ("HAL0_REQUEST_LOG", "2"),
        ("HAL0_LOG_RETENTION_DAYS", "0"),
        ("HAL0_LOG_RETENTION_DAYS", "fortnight"),
        ("HAL0_LOG_QUEUE_SIZE", "-5"),
        ("HAL0_LOG_BODIES", "all"),
        ("HAL0_LOG_BODY_MAX_KB", "0"),
        ("HAL0_LOGIN_FAILURES", "0"),
        ("HAL0_LOGIN_FAILURES", "many"),
        ("HAL0_LOGIN_LOCKOUT_MIN", "soon"),
        ("HAL0_HTTPS", "maybe"),
        ("HAL0_DRAIN_S", "-1"),
        ("HAL0_HEADER_TIMEOUT_S", "0"),
    ],
)
def test_bad_value_stops_start_up_naming_the_variable(tmp_path, name, value):
    proc = start(tmp_path, **{name: value})
    assert proc.returncode != 0
    assert "ImproperlyConfigured" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert name in last and value in last, last


def test_defaults(tmp_path):
    s = started(tmp_path)
    assert s["DEBUG"] is False
    assert s["ALLOWED_HOSTS"] == ["localhost", "127.0.0.1", "[::1]"]
    assert s["DB_ENGINE"] == "django.db.backends.sqlite3"
    assert s["DB_NAME"] == str(tmp_path / "data" / "hal0web.sqlite3")
    assert s["LAYER"] == "channels.layers.InMemoryChannelLayer"
    assert s["PROBE"] == 5
    assert s["BIND"] == "127.0.0.1:8000"
    # metrics on but not public, request log on for 14 days, no bodies
    assert s["SEEING"] == [True, False, True, 14, False, 16 * 1024]


def test_values_are_read(tmp_path):
    s = started(
        tmp_path,
        DEBUG="yes",
        ALLOWED_HOSTS="a.example,b.example",
        DATABASE_URL="postgres://u:p@db.example:5432/hal0",
        REDIS_URL="redis://127.0.0.1:6379/0",
        HAL0_PROBE_INTERVAL_S="0.5",
        HAL0_BIND="[::1]:9000",
    )
    assert s["DEBUG"] is True
    assert s["ALLOWED_HOSTS"] == ["a.example", "b.example"]
    assert s["DB_ENGINE"] == "django.db.backends.postgresql" and s["DB_NAME"] == "hal0"
    assert s["LAYER"] == "dispatch.coordination.channel_layer.RedisChannelLayer"
    assert s["PROBE"] == 0.5
    assert s["BIND"] == "[::1]:9000"


def test_env_file_is_read_and_the_environment_wins(tmp_path):
    env_file = tmp_path / "my.env"
    env_file.write_text("HAL0_PROBE_INTERVAL_S=7\nHAL0_BIND=0.0.0.0:9999\n")
    s = started(tmp_path, HAL0_ENV_FILE=str(env_file), HAL0_BIND="127.0.0.1:8123")
    assert s["PROBE"] == 7
    assert s["BIND"] == "127.0.0.1:8123"


def test_bad_value_in_env_file_also_stops_start_up(tmp_path):
    env_file = tmp_path / "my.env"
    env_file.write_text("DEBUG=perhaps\n")
    proc = start(tmp_path, HAL0_ENV_FILE=str(env_file))
    assert proc.returncode != 0 and "DEBUG" in proc.stderr.strip().splitlines()[-1]


def test_secret_key_is_generated_once_and_persisted(tmp_path):
    first = started(tmp_path)["SECRET_KEY"]
    key_file = tmp_path / "data" / "secret_key"
    assert key_file.read_text().strip() == first
    assert len(first) >= 50
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert started(tmp_path)["SECRET_KEY"] == first  # reused, not regenerated

    other = tmp_path / "other"
    s = started(other, HAL0_DATA_DIR=str(other / "data"))
    assert s["SECRET_KEY"] != first  # never a hard-coded key


def test_given_secret_key_wins_and_is_not_written(tmp_path):
    s = started(tmp_path, SECRET_KEY="from-the-environment")
    assert s["SECRET_KEY"] == "from-the-environment"
    assert not (tmp_path / "data" / "secret_key").exists()


def test_cors_origins_default_empty_and_are_read(tmp_path):
    code = "import django; django.setup(); from django.conf import settings as s; print(s.HAL0_CORS_ORIGINS)"
    assert start(tmp_path, code).stdout.strip() == "frozenset()"
    proc = start(tmp_path, code, HAL0_CORS_ORIGINS="https://App.example, http://localhost:5173/")
    assert proc.returncode == 0, proc.stderr
    assert eval(proc.stdout) == {"https://app.example", "http://localhost:5173"}


HARDENING = """
import json, django
django.setup()
from django.conf import settings as s
print(json.dumps({
    "axes": [s.AXES_FAILURE_LIMIT, s.AXES_COOLOFF_TIME.total_seconds(), s.AXES_LOCKOUT_PARAMETERS],
    "https": [s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SESSION_COOKIE_SECURE,
              s.CSRF_COOKIE_SECURE, s.SECURE_PROXY_SSL_HEADER, s.SECURE_SSL_REDIRECT],
}))
"""


def test_login_throttling_and_https_defaults_and_values(tmp_path):
    proc = start(tmp_path, HARDENING)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["axes"] == [5, 15 * 60, ["username", "ip_address"]]
    assert s["https"] == [0, False, False, False, None, False]
    proc = start(
        tmp_path,
        HARDENING,
        HAL0_LOGIN_FAILURES="3",
        HAL0_LOGIN_LOCKOUT_MIN="0.5",
        HAL0_HTTPS="true",
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["axes"] == [3, 30, ["username", "ip_address"]]
    year = 365 * 24 * 3600
    assert s["https"] == [year, False, True, True, ["HTTP_X_FORWARDED_PROTO", "https"], False]
