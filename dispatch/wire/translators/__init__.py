"""The translating adapters: one module per (endpoint called, endpoint offered) pair family,
each listing its adapters in ``ADAPTERS``, registered here in one place.

A slot that does not speak what a client called (a llama-cpp-python server and Claude Code's
Anthropic Messages, say) still serves it when one of these turns the request into an
endpoint the slot offers and its answer back (``dispatch.wire.adapters.Translation``).
Adding a translation is one module here and one line in ``_MODULES``. Pure: no Django, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from dispatch.wire import adapters
from dispatch.wire.translators import messages_chat, ollama_openai, responses_chat

# Each module's ADAPTERS: (endpoint called, endpoint offered, adapter), in the order a slot
# offering several endpoints is tried (the first registered that it offers wins).
_MODULES: Sequence[ModuleType] = (messages_chat, ollama_openai, responses_chat)


def install() -> None:
    """Register every translation (again: idempotent, a test may have removed one)."""
    for module in _MODULES:
        for called, offered, adapter in module.ADAPTERS:
            adapters.register(called, offered, adapter)
