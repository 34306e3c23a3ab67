"""Many fake upstreams behind one port: a fleet of slots without a socket each.

Slot ``name``'s server answers under ``/name/`` (its slot's URL is ``{url}/name/v1``; its
server root, where llama.cpp's ``/health`` is, ``{url}/name``). Each is a whole
``FakeUpstream`` (tests/fakes.py), so anything one of them can do, each here can.

Run as its own process, so the fleet's answers do not share the test's interpreter (and its
GIL) with what the test measures:

    python -m tests.fake_fleet PORT SLOTS MODELS

serves slots ``s000``... each listing ``MODELS`` models ``m{i}-{j}`` (as llama.cpp lists
them) until killed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.fake_wire import Receive, Send, read_request, send_json
from tests.fakes import NO_ROUTE, FakeUpstream, free_port
from tests.polling import wait_until


class FakeFleet:
    """An ASGI app: the fakes by name, each under its own path prefix."""

    def __init__(self, fakes: list[FakeUpstream]) -> None:
        self.fakes = {f.name: f for f in fakes}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await read_request(scope, receive, send)
            return
        name, _, rest = scope["path"].lstrip("/").partition("/")
        fake = self.fakes.get(name)
        if fake is None:
            await read_request(scope, receive, send)
            await send_json(send, 404, NO_ROUTE)
            return
        await fake({**scope, "path": "/" + rest}, receive, send)


def slot_name(i: int) -> str:
    return f"s{i:03d}"


def model_ids(i: int, models: int) -> list[str]:
    return [f"m{i}-{j}" for j in range(models)]


def fleet(slots: int, models: int) -> FakeFleet:
    return FakeFleet(
        [
            FakeUpstream(slot_name(i), models=model_ids(i, models), listing="llama.cpp")
            for i in range(slots)
        ]
    )


class FleetProcess:
    """``python -m tests.fake_fleet`` on a free port, started and waited for."""

    def __init__(self, slots: int, models: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_fleet", str(self.port), str(slots), str(models)],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.DEVNULL,
        )

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the fake fleet exited ({self.proc.returncode})")
            try:
                return httpx.get(f"{self.url}/{slot_name(0)}/health", timeout=2).is_success
            except httpx.TransportError:
                return False

        wait_until(answers, f"the fake fleet on port {self.port}", 30, 0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def slot_url(self, i: int) -> str:
        return f"{self.url}/{slot_name(i)}/v1"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def main(port: int, slots: int, models: int) -> None:
    import uvicorn

    uvicorn.run(fleet(slots, models), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
