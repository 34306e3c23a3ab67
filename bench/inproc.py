"""``python bench/inproc.py CASE N``: N requests of one case through hal0web's ASGI app in
this process, the upstream a canned httpx transport; no sockets, no load generator.

Run under callgrind by ``python -m bench instructions``: with nothing on the machine or the
clock in the way (no network, no background loop whose work grows with wall time), the
instructions it takes are the same from run to run, so two commits compare to a fraction of
a percent where wall-clock cells swing by tens. Run as a file, not a module, so that it can
drive another checkout's code (its directory first on ``PYTHONPATH``); it knows the module
names from before ``dispatch/`` had rooms too.

The ``-loads`` cases send the same requests to a slot whose server loads models when asked
(issue 21: kind ``llamacpp``, ``loads_models``, ``model_limit`` 1, its model ``loaded``; the
watcher is off, so nothing rewrites those runtime fields): every request takes the
loads path for a model already loaded. A tree from before those fields exits with
``SKIP_STATUS`` and says why.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import httpx

ANSWER = (
    b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":'
    b'"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":1}}'
)
CHUNK = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
MESSAGES = b'"messages":[{"role":"user","content":"hi"}]'
CHAT = b'{"model":"bench-model",' + MESSAGES + b"}"
STREAM = b'{"model":"bench-model","stream":true,' + MESSAGES + b"}"
ANTHROPIC = b'"max_tokens":16,"messages":[{"role":"user","content":"hi"}]'
MESSAGES_BODY = b'{"model":"bench-model",' + ANTHROPIC + b"}"
MESSAGES_STREAM = b'{"model":"bench-model","stream":true,' + ANTHROPIC + b"}"
CASES = {
    "chat": CHAT,
    "stream32": STREAM,
    "chat-loads": CHAT,
    "stream32-loads": STREAM,
    # Anthropic Messages to a slot that speaks it (passed through), and to one that speaks only
    # chat/completions (translated: the request, the answer, each of the 32 chunks).
    "messages": MESSAGES_BODY,
    "messages-translated": MESSAGES_BODY,
    "stream32-messages": MESSAGES_STREAM,
    "stream32-messages-translated": MESSAGES_STREAM,
}
# Exit status of a ``-translated`` case on a tree that cannot translate (before issue 22).
NO_TRANSLATION_STATUS = 4
WARM = 50
# Exit status of a ``-loads`` case on a tree whose slots cannot load models (before issue 21).
SKIP_STATUS = 3


class _Stream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(32):
            yield CHUNK
        yield b"data: [DONE]\n\n"


class Canned(httpx.AsyncBaseTransport):
    """A model server that answers at once: what is measured is hal0web alone."""

    last_path = ""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        Canned.last_path = request.url.path
        if b'"stream":true' in request.content:
            stream_headers = {"content-type": "text/event-stream"}
            return httpx.Response(200, headers=stream_headers, stream=_Stream())
        return httpx.Response(200, headers={"content-type": "application/json"}, content=ANSWER)


def _setup(case: str) -> Any:
    """A fresh database with one slot; the app, its upstream transport canned."""
    data = tempfile.mkdtemp(prefix="hal0-inproc-")
    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)
    os.environ.update(
        HAL0_DATA_DIR=data,
        HAL0_ENV_FILE=os.path.join(data, "no.env"),
        DJANGO_SETTINGS_MODULE="hal0web.settings",
        HAL0_WATCHER="false",
        HAL0_LOG_LEVEL="WARNING",
        DEBUG="0",
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from dispatch.models import Slot, SlotModel

    slot = Slot.objects.create(
        name="bench", url="http://127.0.0.1:9/v1", kind="openai", is_default=True, state="ready"
    )
    model = SlotModel.objects.create(slot=slot, model_id="bench-model", is_default=True)
    if case.endswith("-loads"):
        _loads_models(slot, model)
    if case.endswith("-translated"):
        _speaks_chat_only(slot)
    before_rooms = importlib.util.find_spec("dispatch.proxy") is not None
    client = importlib.import_module(
        "dispatch.proxy" if before_rooms else "dispatch.upstream.client"
    )
    sync = importlib.import_module(
        "dispatch.sync" if before_rooms else "dispatch.coordination.sync"
    )
    # The version check every 0.25 s is no request's work, and under callgrind (50x slower)
    # it would run 50x as often per request.
    sync.ensure_following = lambda: None  # type: ignore[attr-defined]
    client.upstream.use_transport(Canned())
    from hal0web.asgi import application

    return application


def _loads_models(slot: Any, model: Any) -> None:
    """Make ``slot`` one whose server loads models, at its limit with ``model`` loaded."""
    fields = {f.name for f in slot._meta.get_fields()}
    if "loads_models" not in fields:
        print("its Slot has no loads_models field (from before issue 21)", file=sys.stderr)
        raise SystemExit(SKIP_STATUS)
    from dispatch.routing import states

    slot.kind, slot.loads_models, slot.model_limit = "llamacpp", True, 1
    slot.save(update_fields=["kind", "loads_models", "model_limit"])
    model.load_state = states.LOADED
    model.save(update_fields=["load_state"])


def _speaks_chat_only(slot: Any) -> None:
    """Make ``slot`` one whose server speaks only chat/completions: Messages is translated."""
    if importlib.util.find_spec("dispatch.wire.translators") is None:
        print("it has no translators (from before issue 22)", file=sys.stderr)
        raise SystemExit(NO_TRANSLATION_STATUS)
    slot.endpoints = ["chat/completions"]
    slot.save(update_fields=["endpoints"])


def _scope(case: str) -> dict[str, Any]:
    path = "/v1/messages" if "messages" in case else "/v1/chat/completions"
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _one(app: Any, case: str, body: bytes) -> None:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        return {}

    status: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(_scope(case), receive, send)
    if status != [200]:
        raise SystemExit(f"the request was answered {status}, not 200")


async def run(app: Any, case: str, n: int) -> None:
    body = CASES[case]
    for _ in range(WARM + n):
        await _one(app, case, body)
    sent_to = Canned.last_path.rsplit("/", 1)[-1]
    if "messages" in case and sent_to != ("completions" if "translated" in case else "messages"):
        raise SystemExit(f"{case}: the upstream was sent {Canned.last_path}")
    if case.endswith("-loads"):
        from dispatch.upstream.loads import loads

        # Told of every request's use (loads.began/ended): the loads path was taken.
        if "bench-model" not in loads.usage().get("bench", {}):
            raise SystemExit("the requests did not take the loads path")


if __name__ == "__main__":
    application = _setup(sys.argv[1])  # Django's set-up and migrate: before the loop runs
    asyncio.run(run(application, sys.argv[1], int(sys.argv[2])))
