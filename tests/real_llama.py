"""The real llama.cpp ``llama-server`` in router mode, for tests.

``running_router(base)`` starts the binary that ``make`` builds (``HAL0_LLAMA_SERVER``) on a
free loopback port, in router mode over a directory of links to the demo's two tiny models
(ids ``smollm2-135m-instruct`` and ``gemma3-270m``), at most ``max_loaded`` loaded at once,
exactly as ``make run``'s ``primary`` slot runs (``dispatch.lifecycle.demo``), and yields a
:class:`RealRouter`: the server and a small blocking client for its router API (``GET
/models``, ``POST /models/load``, ``POST /models/unload``) and its chat endpoint. Without the
binary or the model packages the test skips, and fails in CI (tests/llama_servers.py).

    with running_router(tmp_path) as router:
        router.load("gemma3-270m")
        router.wait_for("gemma3-270m", "loaded")
        router.chat("gemma3-270m", "What is the capital of France?")
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatch.lifecycle import demo
from tests.fakes import free_port
from tests.llama_servers import llama_server_binary, skip_without_demo
from tests.polling import wait_until

# llama.cpp's router names for a model's state (GET /models: data[].status.value).
LOADED, LOADING, UNLOADED = "loaded", "loading", "unloaded"


@dataclass
class RealRouter:
    """A running llama-server router and a client for it (every call blocks)."""

    server: demo.LlamaServer

    @property
    def base_url(self) -> str:
        """The server's root (``/health``, ``/models``): ``http://127.0.0.1:PORT``."""
        return self.server.base_url

    @property
    def api_url(self) -> str:
        """Its OpenAI API root, what a slot's ``url`` is: ``http://127.0.0.1:PORT/v1``."""
        return self.server.api_url

    def models(self) -> dict[str, dict[str, Any]]:
        """``GET /models``: each entry by model id, with its ``status`` object."""
        return demo.model_entries(self.base_url + "/models", timeout=10.0)

    def states(self) -> dict[str, str]:
        """Model id -> ``status.value`` (``unloaded``, ``loading``, ``loaded``, ...)."""
        return {m: str(e["status"]["value"]) for m, e in self.models().items()}

    def load(self, model: str) -> tuple[int, Any]:
        """``POST /models/load``: (HTTP status, JSON answer). Returns at once; the model
        loads in the background (``wait_for`` it)."""
        return self.post("/models/load", {"model": model})

    def unload(self, model: str) -> tuple[int, Any]:
        """``POST /models/unload``: (HTTP status, JSON answer)."""
        return self.post("/models/unload", {"model": model})

    def wait_for(self, model: str, value: str, timeout: float = 60.0) -> dict[str, str]:
        """Poll ``GET /models`` until ``model``'s status is ``value``; every model's status."""
        states: dict[str, str] = {}

        def reached() -> bool:
            states.update(self.states())
            return states.get(model) == value

        wait_until(reached, f"{model} to be {value}", timeout, every=0.1, show=self.states)
        return states

    def unload_all(self, timeout: float = 30.0) -> None:
        """Unload whatever is loaded, and wait until nothing is."""
        for model, value in self.states().items():
            if value in (LOADED, LOADING):
                self.unload(model)
        for model in self.states():
            self.wait_for(model, UNLOADED, timeout)

    def chat(
        self,
        model: str,
        content: str,
        system: str | None = None,
        max_tokens: int = 32,
        timeout: float = 120.0,
    ) -> Any:
        """One greedy (temperature 0) chat completion, the parsed answer; fails on an error."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": content})
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        status, answer = self.post("/v1/chat/completions", body, timeout)
        assert status == 200, (status, answer, self.server.log_tail())
        return answer

    def post(self, path: str, body: dict[str, Any], timeout: float = 30.0) -> tuple[int, Any]:
        """POST JSON to ``path`` on the server's root: (HTTP status, parsed answer or text)."""
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status, _parsed(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _parsed(exc.read())


def _parsed(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


@contextmanager
def running_router(
    base: Path,
    models: tuple[demo.DemoModel, ...] = (demo.SMOLLM2, demo.GEMMA),
    max_loaded: int = 1,
    ready_timeout: float = 60.0,
) -> Iterator[RealRouter]:
    """The real llama-server router over ``models`` (files and logs under ``base``), ready
    (its ``/health`` answers and ``/models`` lists them all, none loaded); stopped, and the
    assembled Gemma file removed, on exit. Skips (fails in CI) without the demo installed."""
    skip_without_demo()
    binary = llama_server_binary()
    spec = demo.DemoSlot("router", models, router=True, max_loaded=max_loaded)
    paths = demo.model_paths(base / "models")
    args = demo.server_args(spec, paths, base / "models")
    env = demo.servers_env(base / "models" / "llama-cache")
    log = base / "logs" / f"llama-router-{time.monotonic_ns()}.log"
    server = demo.LlamaServer(spec, binary, args, free_port(), log, env=env)
    try:
        server.start()
        server.wait_ready(ready_timeout)
        yield RealRouter(server)
    finally:
        server.stop()
        shutil.rmtree(base / "models", ignore_errors=True)
