"""The demo's first-generation check: a model server that loads but cannot generate (llama.cpp
built for instructions the process may not use, issue 11) is reported, never called ready."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from dispatch.lifecycle import demo
from tests.fake_llama_server import CRASH_ENV, shim
from tests.fakes import FakeUpstream, ServerThread, free_port


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


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
                _read_request(conn)  # all of it: closing with bytes unread sends a reset
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


def _fake_llama(tmp_path: Path, spec: demo.DemoSlot, crash: str = "") -> demo.LlamaServer:
    """A LlamaServer whose process is the fake llama-server (a real child process), started
    with the command line the demo gives the real one."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    paths = {}
    for model in spec.models:  # the router lists files; their contents do not matter here
        paths[model.id] = models / f"{model.id}.bin"
        paths[model.id].write_bytes(b"GGUF")
    binary = shim(tmp_path / "shim")
    env = dict(os.environ, PYTHONPATH=str(settings.BASE_DIR), **{CRASH_ENV: crash})
    server = demo.LlamaServer(
        spec,
        binary,
        demo.server_args(spec, paths, models),
        free_port(),
        tmp_path / "llama.log",
        env=env,
    )
    server.start().wait_ready(30)
    return server


ONE = demo.DemoSlot("agent-hermes", (demo.GEMMA,), router=False)
ROUTER = demo.DemoSlot("primary", (demo.SMOLLM2, demo.GEMMA), router=True)


def test_a_server_that_crashes_on_its_first_token_is_reported_with_its_log(tmp_path: Path) -> None:
    server = _fake_llama(tmp_path, ONE, crash=demo.GEMMA.id)
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


def test_a_router_whose_instance_crashes_is_reported_and_stays_up(tmp_path: Path) -> None:
    """In router mode the model runs in a child instance: the router answers 500 and lists
    the model as failed (exit code 1), which is what the report says."""
    server = _fake_llama(tmp_path, ROUTER, crash=demo.SMOLLM2.id)
    try:
        with pytest.raises(demo.GenerationFailed) as failed:
            server.check_generation(timeout=10)
        assert failed.value.reason == (
            "the model instance of smollm2-135m-instruct crashed on its first generation "
            "(exit code 1): see llama.log"
        )
        assert "about to crash (fake)" in failed.value.log_tail
        assert server.running
    finally:
        server.stop()


@pytest.mark.parametrize("spec", [ONE, ROUTER], ids=["one-model", "router"])
def test_a_server_that_generates_passes(tmp_path: Path, spec: demo.DemoSlot) -> None:
    server = _fake_llama(tmp_path, spec)
    try:
        server.check_generation(timeout=10)
        assert server.running
    finally:
        server.stop()
