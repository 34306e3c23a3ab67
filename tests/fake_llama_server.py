"""A stand-in for llama.cpp's ``llama-server`` that runs as its own process.

It takes the real server's command line, as ``dispatch.lifecycle.demo`` builds it, and
answers as the real one does (llama.cpp's tools/server/README.md, checked against the
server built from the vendored source):

- one model (``--model PATH --alias ID``): ``/health`` 200, ``/v1/models`` lists ``ID``;
- router mode (``--models-dir DIR --models-max N``): every ``*.gguf`` in ``DIR`` is a model
  named like its file without the suffix; ``GET /models`` (and ``/v1/models``) lists each
  with its ``status`` (``unloaded``, ``loading``, ``loaded``; ``failed`` and ``exit_code``
  after an instance died); ``POST /models/load`` and ``/models/unload`` load and unload
  (``{"success": true}``; 400 "model is already running" / "model is not running"; 404 for
  a name it does not have); a completion for a model that is not loaded loads it first; past
  ``N`` loaded models the least recently used is unloaded.

Completions are answered by :class:`tests.fakes.FakeUpstream`, one per model, named by the
model's id. A model named in ``HAL0_TEST_CRASH_ON_GENERATE`` crashes on its first
completion, as a llama.cpp built with instructions the process may not use does on its first
matrix multiply (issue 11): in one-model mode the process dies of SIGSEGV; in router mode
only the model's instance does, so the router answers 500 and lists the model as failed
(exit code 1), as the real router does.

``shim(dir)`` writes an executable ``llama-server`` into ``dir`` that runs this module: set
``HAL0_LLAMA_SERVER`` to it and ``manage.py serve`` starts these instead of llama.cpp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import uvicorn

from tests.fake_wire import Receive, Send, read_request, send_bytes, send_json
from tests.fakes import FakeUpstream

CRASH_ENV = "HAL0_TEST_CRASH_ON_GENERATE"
BASE_DIR = Path(__file__).resolve().parent.parent
LOAD_S = 0.05  # how long a fake load takes


def _crashing(model: str) -> bool:
    return model in os.environ.get(CRASH_ENV, "").split(",")


def _die() -> None:
    print("ggml_backend_cpu_mul_mat: about to crash (fake)", flush=True)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash, not a core file
    os.kill(os.getpid(), signal.SIGSEGV)


class CrashOnGenerate:
    """Wraps a fake upstream: a completion request kills this process instead."""

    def __init__(self, app: FakeUpstream) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("completions"):
            _die()
        await self.app(scope, receive, send)


class FakeRouter:
    """llama-server in router mode: models loaded on demand, at most ``models_max`` at once."""

    def __init__(self, models: list[str], models_max: int) -> None:
        self.models_max = models_max
        self.status: dict[str, dict[str, Any]] = {m: {"value": "unloaded"} for m in models}
        self.upstreams = {m: FakeUpstream(m, models=[m], listing="llama.cpp") for m in models}
        self.used: dict[str, float] = {}  # model -> when it last served (for the LRU)
        self.loads: dict[str, asyncio.Task[None]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await read_request(scope, receive, send)
        if body is None:
            return
        path = scope["path"]
        if path in ("/health", "/v1/health"):
            return await send_json(send, 200, {"status": "ok"})
        if path in ("/models", "/v1/models") and scope["method"] == "GET":
            return await send_json(send, 200, {"object": "list", "data": self._listing()})
        try:
            req = json.loads(body) if body else {}
        except ValueError:
            return await _error(send, 400, "invalid JSON")
        model = req.get("model") if isinstance(req, dict) else None
        if path == "/models/load":
            return await self._load_request(model, send)
        if path == "/models/unload":
            return await self._unload_request(model, send)
        if not model:
            return await _error(send, 400, "model name is missing from the request")
        if model not in self.status:
            return await _error(send, 400, f"model '{model}' not found")
        await self._ensure_loaded(model)
        self.used[model] = time.monotonic()
        if path.endswith("completions") and _crashing(model):
            print(f"[instance {model}] about to crash (fake)", flush=True)
            self.status[model] = {"value": "unloaded", "failed": True, "exit_code": 1}
            return await send_bytes(
                send, 500, b"proxy error: Failed to read connection", b"text/plain"
            )
        await self.upstreams[model](scope, _replay(body), send)

    def _listing(self) -> list[dict[str, Any]]:
        return [
            {
                "id": model,
                "object": "model",
                "owned_by": "llamacpp",
                "created": int(time.time()),
                "status": dict(status),
            }
            for model, status in sorted(self.status.items())
        ]

    async def _load_request(self, model: Any, send: Send) -> None:
        if model not in self.status:
            return await _error(send, 404, "File Not Found", "not_found_error")
        if self.status[model]["value"] in ("loaded", "loading"):
            return await _error(send, 400, "model is already running")
        self._start_load(model)
        await send_json(send, 200, {"success": True})

    async def _unload_request(self, model: Any, send: Send) -> None:
        if model not in self.status or self.status[model]["value"] not in ("loaded", "loading"):
            return await _error(send, 400, "model is not running")
        self._unload(model)
        await send_json(send, 200, {"success": True})

    def _unload(self, model: str) -> None:
        task = self.loads.pop(model, None)
        if task is not None:
            task.cancel()
        self.status[model] = {"value": "unloaded", "exit_code": 0}
        self.used.pop(model, None)

    def _start_load(self, model: str) -> asyncio.Task[None]:
        running = [m for m, s in self.status.items() if s["value"] in ("loaded", "loading")]
        while self.models_max > 0 and len(running) >= self.models_max:
            oldest = min(running, key=lambda m: self.used.get(m, 0.0))
            self._unload(oldest)
            running.remove(oldest)
        self.status[model] = {"value": "loading"}

        async def load() -> None:
            await asyncio.sleep(LOAD_S)
            self.status[model] = {"value": "loaded"}
            self.used[model] = time.monotonic()

        task = self.loads[model] = asyncio.create_task(load())
        return task

    async def _ensure_loaded(self, model: str) -> None:
        if self.status[model]["value"] == "loaded":
            return
        task = self.loads.get(model)
        if task is None or task.done():
            task = self._start_load(model)
        await task


def _replay(body: bytes) -> Receive:
    """A receive() that gives the already-read body once, then waits for the disconnect."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves before the answer here
        return {"type": "http.disconnect"}

    return receive


async def _error(
    send: Send, status: int, message: str, kind: str = "invalid_request_error"
) -> None:
    await send_json(send, status, {"error": {"code": status, "message": message, "type": kind}})


def app_for(args: argparse.Namespace) -> Any:
    """The ASGI app that the command line asks for."""
    if args.models_dir:
        models = sorted(p.name.removesuffix(".gguf") for p in Path(args.models_dir).glob("*.gguf"))
        return FakeRouter(models, args.models_max)
    if not args.alias:
        raise SystemExit("fake llama-server: --alias or --models-dir is required")
    fake = FakeUpstream(args.alias, models=[args.alias], listing="llama.cpp")
    return CrashOnGenerate(fake) if _crashing(args.alias) else fake


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llama-server (fake)")
    parser.add_argument("-m", "--model")
    parser.add_argument("-a", "--alias")
    parser.add_argument("--models-dir")
    parser.add_argument("--models-max", type=int, default=4)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args(argv)
    app = app_for(args)
    what = f"router over {args.models_dir}" if args.models_dir else args.alias
    print(f"fake llama-server ({what}) on {args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="on")


def shim(directory: Path) -> Path:
    """Write an executable ``llama-server`` that runs :func:`main`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "llama-server"
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(BASE_DIR)!r})\n"
        "from tests.fake_llama_server import main\n"
        "main(sys.argv[1:])\n"
    )
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
