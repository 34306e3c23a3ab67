"""hal0web under Uvicorn with a what-if for the loader: wait for an unload to be done.

Used by ``python -m bench models unload-wait``. What it tries, in this process only: the
loader (``dispatch.lifecycle.loader.SlotLoader.evict``) asks a server to unload a model and,
as soon as the server has *answered*, goes on to ask for the next load. llama.cpp's router
answers ``POST /models/unload`` once it has asked the model's server to stop
(``LlamaCpp.unload_call_waits`` is False), and refuses a load until that server has exited:
``500 model limit reached, try again later``, which hal0web takes for a failed load and
gives its waiters as 502 ``model_load_failed``. Here, after such an unload, the loader also
waits until the server lists the model as no longer loaded (at most ``UNLOAD_WAIT_S``), as
it does after a load (``_until_loaded``). A candidate fix, measured before it is made.

Run: ``python -m bench.serve_loads PORT``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import uvicorn

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")

from hal0web.asgi import application

UNLOAD_WAIT_S = 60.0
POLL_S = 0.05
_ANSWER_LIMIT = 1 << 20


def wait_for_unloads() -> None:
    from dispatch import kinds
    from dispatch.kinds.urls import upstream_url
    from dispatch.lifecycle.loader import SlotLoader
    from dispatch.routing import states
    from dispatch.upstream.client import upstream

    real = SlotLoader.evict

    async def evict(self: SlotLoader, slot: Any, victim: str, hold: float) -> bool:
        done = await real(self, slot, victim, hold)
        kind = kinds.get(slot.kind)
        if not done or kind.unload_call_waits:
            return done
        deadline = time.monotonic() + UNLOAD_WAIT_S
        while time.monotonic() < deadline:
            answer = await upstream.ask(
                "GET", upstream_url(slot, "models"), None, 5.0, _ANSWER_LIMIT, slot.api_key_env
            )
            said = kind.read_loads(answer.body, None, None) if answer.status == 200 else None
            entry = said.models.get(victim) if said is not None else None
            if entry is None or entry.state not in states.RESIDENT:
                break
            await asyncio.sleep(POLL_S)
        return done

    SlotLoader.evict = evict  # type: ignore[method-assign]


def main() -> None:
    wait_for_unloads()
    uvicorn.run(
        application,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
