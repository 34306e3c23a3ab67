"""A stand-in for ``python -m llama_cpp.server`` that runs as its own process.

It takes the real server's command line (only ``--model_alias``, ``--host`` and ``--port``
matter), lists its model like llama-cpp-python, and answers completions with
:class:`tests.fakes.FakeUpstream` — unless its alias is named in ``HAL0_TEST_CRASH_ON_GENERATE``:
then its first completion kills the process with SIGSEGV, as a llama.cpp built with
instructions the process may not use does on its first matrix multiply (issue 11).

``shim(dir)`` writes a ``llama_cpp.server`` package into ``dir`` that runs this module, so a
``manage.py serve`` child started with ``PYTHONPATH=dir`` starts these instead of llama.cpp.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import uvicorn

from tests.fake_wire import Receive, Send
from tests.fakes import FakeUpstream

CRASH_ENV = "HAL0_TEST_CRASH_ON_GENERATE"


class CrashOnGenerate:
    """Wraps a fake upstream: a completion request kills this process instead."""

    def __init__(self, app: FakeUpstream) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("completions"):
            print("ggml_backend_cpu_mul_mat: about to crash (fake)", flush=True)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash, not a core file
            os.kill(os.getpid(), signal.SIGSEGV)
        await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_alias", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args(argv)
    fake = FakeUpstream(args.model_alias, models=[args.model_alias])
    # llama-cpp-python's server has no /health: the watcher must not rely on one.
    fake.health = "ready"
    crash = args.model_alias in os.environ.get(CRASH_ENV, "").split(",")
    app: Any = CrashOnGenerate(fake) if crash else fake
    print(f"fake llama server for {args.model_alias} on {args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="on")


def shim(directory: Path) -> Path:
    """Write a ``llama_cpp.server`` package that runs :func:`main`; returns ``directory``."""
    package = directory / "llama_cpp" / "server"
    package.mkdir(parents=True, exist_ok=True)
    (directory / "llama_cpp" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("from tests.fake_llama_server import main\n\nmain()\n")
    return directory


if __name__ == "__main__":
    main(sys.argv[1:])
