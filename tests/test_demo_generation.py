"""The demo's first-generation check: a model server that loads but cannot generate (llama.cpp
built for instructions the process may not use, issue 11) is reported, never called ready."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from dispatch.lifecycle import demo
from tests.fake_llama_server import CRASH_ENV
from tests.fakes import FakeUpstream, ServerThread, free_port


class DroppingServer:
    """A raw socket server that reads each request and closes the connection unanswered."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                self.requests += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dropping() -> Iterator[DroppingServer]:
    server = DroppingServer()
    yield server
    server.close()


def test_a_dropped_connection_is_a_problem(dropping: DroppingServer) -> None:
    problem = demo.first_token_problem(f"http://127.0.0.1:{dropping.port}/v1", "m", 5)
    assert problem == "connection dropped: RemoteDisconnected"
    assert dropping.requests == 1


def test_a_server_that_answers_gives_no_problem() -> None:
    server = ServerThread(FakeUpstream("a", models=["m"])).start()
    try:
        assert demo.first_token_problem(server.url + "/v1", "m", 5) is None
    finally:
        server.stop()


def test_an_error_status_and_a_refused_port_are_problems() -> None:
    failing = FakeUpstream("a", models=["m"], fail_status=500)
    server = ServerThread(failing).start()
    try:
        assert demo.first_token_problem(server.url + "/v1", "m", 5) == "HTTP 500"
    finally:
        server.stop()
    refused = demo.first_token_problem(f"http://127.0.0.1:{free_port()}/v1", "m", 5)
    assert refused is not None and refused.startswith("could not connect")


def _fake_llama(tmp_path: Path, alias: str, crash: bool) -> demo.LlamaServer:
    """A LlamaServer whose process is the fake server (a real child process)."""
    model = demo.DemoModel("agent-hermes", alias, "fake", None)
    server = demo.LlamaServer(model, tmp_path / "model.gguf", free_port(), tmp_path / "llama.log")
    env = dict(os.environ, PYTHONPATH=str(settings.BASE_DIR))
    env[CRASH_ENV] = alias if crash else ""
    command = [sys.executable, "-m", "tests.fake_llama_server", "--model_alias", alias]
    command += ["--port", str(server.port)]
    with server.log_path.open("ab") as log:
        server.proc = demo.spawn(command, log=log, env=env)
    server.wait_ready(30)
    return server


def test_a_server_that_crashes_on_its_first_token_is_reported_with_its_log(tmp_path: Path) -> None:
    server = _fake_llama(tmp_path, "gemma3-270m", crash=True)
    try:
        with pytest.raises(demo.GenerationFailed) as failed:
            server.check_generation(timeout=10)
        assert failed.value.reason == (
            "the model server crashed on its first generation (signal 11): see llama.log"
        )
        assert "about to crash (fake)" in failed.value.log_tail
        assert not server.running
    finally:
        server.stop()


def test_a_server_that_generates_passes(tmp_path: Path) -> None:
    server = _fake_llama(tmp_path, "smollm2", crash=False)
    try:
        server.check_generation(timeout=10)
        assert server.running
    finally:
        server.stop()
