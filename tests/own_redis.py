"""A Redis server of the test's own, to stop, start again and freeze: the shared one at 6379,
which other tests (and other runs) use, is never touched. (PostgreSQL's outage is
tests/cut_proxy.py's.)"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from typing import Any

import pytest

from tests.fakes import free_port
from tests.polling import wait_until


class OwnRedis:
    """``redis-server`` on a free port, without persistence: stopped and started again it
    comes back empty, as a Redis restarted without a snapshot does."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            reason = "these tests need `redis-server` on PATH (apt-get install redis-server)"
            if os.environ.get("CI"):  # .ci/run: a Redis test that skips there is a failure
                pytest.fail(f"{reason} (in CI the Redis tests must run, not skip)")
            pytest.skip(reason)
        pytest.importorskip("channels_redis", reason="channels-redis is not installed")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        no_persistence = ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *no_persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, f"redis-server on port {self.port}", 10)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> Any:  # redis.Redis, imported only where Redis is installed
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a hung host, a paused VM)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False
