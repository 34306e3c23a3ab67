"""llama.cpp's own ``llama-server`` in router mode, for ``python -m bench models``.

Where the binary is, a models directory of symlinks to the demo's two tiny GGUF models (and
a second name for one of them, a third model to the router, which lists models by file
name), the process pinned beside the load generator, and what the bench asks of the router
itself: which models it has loaded (``GET /models``), loads and unloads
(``POST /models/load``, ``/models/unload``), and a count of the loads it starts, from its
own event stream (``GET /models/sse``), whoever asked for them.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
import orjson

from bench.procs import LOAD_CORE, Proc, Workspace, free_port

# The demo's models, as the router names them (by file name); C is SmolLM2 under another name.
A, B, C = "smollm2", "gemma", "smollm2-b"
# Where tools/llama_build.py keeps its builds (keyed by flags), newest first when several.
CACHE = Path.home() / ".cache" / "hal0web" / "llama-server"


def binary() -> Path:
    """The newest build in tools/llama_build.py's cache, else the venv's ``bin/llama-server``
    (where ``make`` installs a copy), else one on PATH."""
    built = sorted(CACHE.glob("*/llama-server"), key=lambda p: p.stat().st_mtime, reverse=True)
    if built:
        return built[0]
    venv = Path(sys.executable).parent / "llama-server"
    if venv.is_file():
        return venv
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise SystemExit(
        "llama-server not found (under ~/.cache/hal0web/llama-server/*/, in the venv, or on "
        "PATH): build it first (`make run` builds it)"
    )


def models_dir(ws: Workspace) -> Path:
    """A directory of symlinks the router serves: A and C to SmolLM2, B to Gemma 3 270M."""
    from dispatch.lifecycle import demo

    demo.require_packages()
    smollm2 = demo.smollm2_path()
    # Assembled once (253 MB) into the cache and kept: later runs only check its marker.
    gemma = demo.gemma_path(CACHE.parent / "bench-models")
    where = ws.dir / "models"
    where.mkdir()
    for name, target in ((A, smollm2), (B, gemma), (C, smollm2)):
        (where / f"{name}.gguf").symlink_to(target.resolve())
    return where


def router_proc(ws: Workspace, models: Path, limit: int = 1) -> Proc:
    """The router on the load generator's core, one thread per model server."""
    port = free_port()
    argv = [
        str(binary()),
        "--models-dir", str(models),
        "--models-max", str(limit),
        "--host", "127.0.0.1",
        "--port", str(port),
        "-t", "1",
        "-c", "1024",
    ]  # fmt: skip
    proc = ws.proc("llama-router", argv, LOAD_CORE, port)
    proc.ready_path = "/models"
    return proc


async def states(session: aiohttp.ClientSession, base: str) -> dict[str, str]:
    """Each model's status as the router says it."""
    async with session.get(base + "/models") as resp:
        body = orjson.loads(await resp.read())
    return {e["id"]: e["status"]["value"] for e in body["data"]}


async def ask(session: aiohttp.ClientSession, base: str, what: str, model: str) -> None:
    """``POST /models/load`` or ``/models/unload`` (answered once started, not done)."""
    async with session.post(f"{base}/models/{what}", json={"model": model}) as resp:
        await resp.read()


class LoadCount:
    """The loads the router starts, counted from its own event stream: a model's status
    turning to ``loading``, whoever asked (hal0web, or the router on its own for a request
    that reached it for a model not loaded)."""

    def __init__(self) -> None:
        self.loads: Counter[str] = Counter()
        # (time.perf_counter() when heard, model, status): when each load began and ended.
        self.heard: list[tuple[float, str, str]] = []
        self._last: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self, session: aiohttp.ClientSession, base: str) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(session, base))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def total(self) -> int:
        return sum(self.loads.values())

    async def _follow(self, session: aiohttp.ClientSession, base: str) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with session.get(base + "/models/sse", timeout=timeout) as resp:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    self._heard(orjson.loads(line[6:]))

    def _heard(self, event: Mapping[str, object]) -> None:
        model, data = event.get("model"), event.get("data")
        if not isinstance(model, str) or not isinstance(data, dict):
            return
        status = data.get("status")
        if not isinstance(status, str):
            return
        if status != self._last.get(model):
            self.heard.append((time.perf_counter(), model, status))
            if status == "loading":
                self.loads[model] += 1
        self._last[model] = status

    def load_between(self, model: str, since: float, until: float) -> tuple[float, float] | None:
        """When the router began and ended the first load of ``model`` heard in the span."""
        began = next(
            (t for t, m, s in self.heard if m == model and s == "loading" and since <= t <= until),
            None,
        )
        if began is None:
            return None
        ended = next(
            (t for t, m, s in self.heard if m == model and s == "loaded" and t >= began), None
        )
        return None if ended is None else (began, ended)


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Ask ``check`` again and again until it says yes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")
