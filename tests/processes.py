"""hal0web as real server processes for the multi-process tests: the environment each gets,
``manage.py`` commands run beside them, and a logged-in session for the live page."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from dispatch.management.commands.serve import server_command
from tests.fakes import free_port
from tests.polling import wait_until

REDIS_HOST = ("127.0.0.1", 6379)


def redis_url_or_skip() -> str:
    """A Redis database of its own (1-15, picked at random) so parallel runs do not meet."""
    try:
        with socket.create_connection(REDIS_HOST, timeout=2):
            pass
    except OSError as exc:
        pytest.skip(f"Redis is not reachable at {REDIS_HOST[0]}:{REDIS_HOST[1]}: {exc}")
    pytest.importorskip("channels_redis", reason="channels-redis is not installed (scale extra)")
    db = random.randint(1, 15)
    USED_REDIS_DBS.add(db)
    return f"redis://{REDIS_HOST[0]}:{REDIS_HOST[1]}/{db}"


# The Redis databases this test took (redis_url_or_skip): emptied once it ends
# (tests/conftest.py), so no group, response id or lock of one test's processes outlives
# it to meet a later test that draws the same database.
USED_REDIS_DBS: set[int] = set()


def empty_used_redis_dbs() -> None:
    import redis

    while USED_REDIS_DBS:
        db = USED_REDIS_DBS.pop()
        client = redis.Redis(host=REDIS_HOST[0], port=REDIS_HOST[1], db=db, socket_timeout=5)
        try:
            client.flushdb()
        except redis.RedisError:
            pass  # Redis went away with the test (an outage test's own server is elsewhere)
        finally:
            client.close()


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a hal0web process: this machine's, without the test's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAL0_", "PYTEST"))}
    for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DEBUG", "DJANGO_SETTINGS_MODULE"):
        env.pop(name, None)
    env.update(HAL0_ENV_FILE="/nonexistent", HAL0_DATA_DIR=str(data_dir), **extra)
    return env


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)}: {done.stderr}"
    return done.stdout


def create_user(env: dict[str, str], username: str, password: str) -> None:
    """A user in the processes' database, who logs in through the form."""
    manage(
        env,
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model; "
        f"get_user_model().objects.create_user({username!r}, password={password!r})",
    )


def session_cookie(env: dict[str, str], username: str = "ann", staff: bool = False) -> str:
    """Create a user and a logged-in session in the processes' database: its Cookie header."""
    code = (
        "from django.contrib.auth import get_user_model; from django.test import Client; "
        f"u = get_user_model().objects.create_user({username!r}, password='not-a-real-password',"
        f" is_staff={staff}); c = Client(); c.force_login(u); print(c.cookies['sessionid'].value)"
    )
    return "sessionid=" + manage(env, "shell", "-c", code).strip().splitlines()[-1]


class Hal0Process:
    """One hal0web server process under Uvicorn (serve's own command line), on a free port,
    or another long-running ``manage.py`` command."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        command: list[str] | None = None,
        port: int | None = None,  # the one ``command`` serves on, when it names one
    ) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._log = log_path.open("ab")
        # Another command (`manage.py watch`, a recipe's command line) runs the same way.
        self.proc = subprocess.Popen(
            command or server_command("uvicorn", "127.0.0.1", self.port, None),
            cwd=settings.BASE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> Hal0Process:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"hal0web exited ({self.proc.returncode}):\n{self.log()}")
            try:
                return httpx.get(self.url + "/healthz", timeout=2).status_code in (200, 503)
            except httpx.TransportError:
                return False

        wait_until(answers, f"hal0web on port {self.port} to answer", timeout, 0.1, show=self.log)
        return self

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
