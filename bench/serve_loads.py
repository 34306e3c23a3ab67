"""hal0web under Uvicorn with a what-if for the loader: an unload is done when the server
says so, not when it answers.

Used by ``python -m bench models unload-wait``. The loader (``SlotLoader.evict`` in
``dispatch.lifecycle.loader``) asks a server to unload a model and, as soon as the server
has *answered*, marks the model unloaded and asks for the next load. llama.cpp's router
answers ``POST /models/unload`` once it has asked the model's server to stop
(``LlamaCpp.unload_call_waits`` is False) and refuses a load until that server has exited:
``500 model limit reached, try again later``, which hal0web takes for a failed load and
gives its waiters as 502 ``model_load_failed``.

Here, in this process only, the loader's unload call to a llama.cpp router returns only once
the router lists the model as ``unloaded`` (at most ``UNLOAD_WAIT_S``): inside ``evict``,
while the model is still held and ``unloading`` (no new request lands on it), as
``_until_loaded`` waits after a load. A candidate fix, measured before it is made.

Run: ``python -m bench.serve_loads PORT``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import uvicorn

UNLOAD_WAIT_S = 60.0
POLL_S = 0.05
UNLOAD = "/models/unload"


class UnloadsWait:
    """``upstream`` as the loader sees it: the same, but for a router's unload call."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def ask(
        self, method: str, url: str, body: object, timeout: float, limit: int, key: str = ""
    ) -> Any:
        answer = await self.real.ask(method, url, body, timeout, limit, key)
        if method == "POST" and url.endswith(UNLOAD) and answer.status == 200:
            model = body.get("model") if isinstance(body, dict) else None
            await self._until_unloaded(url.removesuffix(UNLOAD) + "/models", model, limit, key)
        return answer

    async def _until_unloaded(self, listing: str, model: object, limit: int, key: str) -> None:
        deadline = time.monotonic() + UNLOAD_WAIT_S
        while time.monotonic() < deadline:
            said = await self.real.ask("GET", listing, None, 5.0, limit, key)
            entries = said.body.get("data") if isinstance(said.body, dict) else None
            status = next(
                (
                    e.get("status", {}).get("value")
                    for e in entries or ()
                    if isinstance(e, dict) and e.get("id") == model
                ),
                None,
            )
            if status in (None, "unloaded"):
                return
            await asyncio.sleep(POLL_S)


def wait_for_unloads() -> None:
    from dispatch.lifecycle import loader

    loader.upstream = UnloadsWait(loader.upstream)  # type: ignore[assignment]


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")
    from hal0web.asgi import application

    wait_for_unloads()
    uvicorn.run(
        application,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,  # hal0web's own logging (HAL0_LOG_LEVEL), as under `python -m uvicorn`
        backlog=4096,
    )


if __name__ == "__main__":
    main()
