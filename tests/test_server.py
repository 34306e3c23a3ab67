"""``python -m hal0web.server``, as a real process: a header that does not come in time closes
its connection (HAL0_HEADER_TIMEOUT_S), the open-files limit is raised to the hard one, and a
--timeout-graceful-shutdown that would cut the drain short is refused."""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from django.conf import settings

from dispatch.management.commands.serve import server_command
from tests.fakes import free_port
from tests.processes import Hal0Process, manage, server_env, session_cookie

SERVER = [sys.executable, "-m", "hal0web.server", "hal0web.asgi:application"]
TIMEOUT_S = 1.0
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Hal0Process]:
    """hal0web.server, one worker, started with a soft open-files limit of 1,024 (the hard
    limit unchanged) and a one-second header timeout."""
    env = server_env(tmp_path, HAL0_HEADER_TIMEOUT_S=str(TIMEOUT_S), HAL0_WATCHER="false")
    manage(env, "migrate", "-v0")
    port = free_port()
    command = shlex.join(server_command("uvicorn", "127.0.0.1", port, None))
    proc = Hal0Process(
        env, tmp_path / "hal0.log", command=["bash", "-c", f"ulimit -Sn 1024 && exec {command}"]
    )
    proc.port = port
    proc.cookie = session_cookie(env, staff=True)  # type: ignore[attr-defined]
    proc.wait_ready()
    yield proc
    proc.stop()


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """How long until the server closes ``sock`` (None: still open after ``seconds``),
    sending ``trickle`` a byte every 0.2 s meanwhile (a header that never ends)."""
    started = time.monotonic()
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            sent += 1
    return None


def connect(server: Hal0Process) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=2)


def test_a_header_that_does_not_come_in_time_closes_its_connection(server: Hal0Process) -> None:
    # A header trickled a byte at a time, never ended: closed after the timeout, not
    # kept alive by its bytes.
    with connect(server) as sock:
        took = closed_within(sock, TIMEOUT_S + 3, b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100)
    assert took is not None, "a trickled header kept its connection open"
    assert took >= TIMEOUT_S - 0.2
    # A connection that sends nothing at all.
    with connect(server) as sock:
        assert closed_within(sock, TIMEOUT_S + 3) is not None
    # A kept-alive connection whose next request's header stops half-way.
    with connect(server) as sock:
        sock.sendall(REQUEST)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert closed_within(sock, TIMEOUT_S + 3) is not None
    # A header that comes in pieces, but whole within the timeout, is answered.
    with connect(server) as sock:
        for i in range(0, len(REQUEST), 8):
            sock.sendall(REQUEST[i : i + 8])
            time.sleep(0.05)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert "Exception" not in server.log(), server.log()


async def test_a_websocket_outlives_the_header_timeout(server: Hal0Process) -> None:
    """The live feed's connection is the WebSocket protocol's once upgraded: no header is
    awaited on it any more."""
    headers = {"Cookie": server.cookie, "Origin": server.url}  # type: ignore[attr-defined]
    url = f"ws://127.0.0.1:{server.port}/ws/dispatch/"
    async with websockets.connect(url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "snapshot"
        await asyncio.sleep(TIMEOUT_S * 2.5)
        await asyncio.wait_for(await ws.ping(), 2)
        assert ws.close_code is None


def test_the_open_files_limit_is_raised_to_the_hard_one(server: Hal0Process) -> None:
    limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
    [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    assert soft == hard != "1024", line


def test_a_graceful_shutdown_bound_inside_the_drain_is_refused(tmp_path: Path) -> None:
    env = server_env(tmp_path, HAL0_DRAIN_S="20")
    done = subprocess.run(
        [*SERVER, "--port", "1", "--timeout-graceful-shutdown", "10"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "--timeout-graceful-shutdown 10 would cancel requests before HAL0_DRAIN_S" in done.stderr
