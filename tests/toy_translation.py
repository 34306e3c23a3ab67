"""A toy translation of Anthropic Messages to chat completions, for the tests of what a slot
speaks (tests/test_speaks.py, tests/test_speaks_page.py): it stands for the real ones, which
``dispatch.wire.translators`` may hold for the same pair; the fixtures take those out for the
test and put them back after (``untranslated``, ``toy``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import orjson

from dispatch.routing.endpoints import ENDPOINTS
from dispatch.wire import adapters, translators
from dispatch.wire.adapters import ClientRequest, Outgoing, Translation


class _ToMessage(Translation):
    """A chat completion's answer as an Anthropic message (enough for these tests)."""

    def answer(self, content: bytes) -> bytes:
        data = orjson.loads(content)
        text = data["choices"][0]["message"]["content"]
        return orjson.dumps(
            {"type": "message", "role": "assistant", "content": [{"type": "text", "text": text}]}
        )

    def stream(self, chunk: bytes) -> bytes:
        raise AssertionError("not streamed here")

    def end(self) -> bytes:
        return b""


def messages_to_chat(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    body = request.body.json() or {}
    chat = {"model": upstream_model, "messages": body.get("messages", [])}
    return Outgoing("chat/completions", orjson.dumps(chat), _ToMessage())


@contextmanager
def untranslated() -> Iterator[None]:
    """No translation serves anything meanwhile (the registered ones come back after): these
    tests say what a slot serves, and each translation the project adds would change it."""
    for called in ENDPOINTS:
        for offered in ENDPOINTS:
            adapters.unregister(called.name, offered.name)
    try:
        yield
    finally:
        translators.install()


@contextmanager
def toy() -> Iterator[None]:
    """Only the toy translation serves Anthropic Messages (on a slot speaking chat) meanwhile."""
    with untranslated():
        adapters.register("messages", "chat/completions", messages_to_chat)
        try:
            yield
        finally:
            adapters.unregister("messages", "chat/completions")
