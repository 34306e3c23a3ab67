"""The kinds of model server a slot can be, one module each, registered here.

A room of its own, below ``upstream``, ``lifecycle`` and ``coordination``: a kind is
knowledge of a server (where its health and model list are, how to read them, what it
speaks), which the watcher uses to probe, ``dispatch.models`` to offer the choices, and
forwarding may use to know a server's protocols. Sans-I/O: a kind says what to ask and how
to read the answer; the asking (I/O, timing, persistence) is ``dispatch.lifecycle``'s and
``dispatch.upstream``'s. So ``dispatch.models`` imports it at no cost, and the layering
(pyproject.toml) keeps it so.

A new kind is one module here (a ``Kind`` subclass as ``KIND``) and one line in ``_KINDS``;
``dispatch.models.SlotKind`` takes its choices from ``REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from dispatch.kinds import flm, lemonade, llamacpp, ollama, openai, vllm
from dispatch.kinds.base import Call, Kind, Listing, Loads, ModelLoad

__all__ = ["GENERIC", "REGISTRY", "Call", "Kind", "Listing", "Loads", "ModelLoad", "get"]

# In the order the admin lists them (and the migrations' choices: keep it).
_KINDS: tuple[Kind, ...] = (
    llamacpp.KIND,
    lemonade.KIND,
    vllm.KIND,
    ollama.KIND,
    flm.KIND,
    openai.KIND,
)

REGISTRY: Mapping[str, Kind] = MappingProxyType({k.name: k for k in _KINDS})

# What a slot of a kind hal0web does not know (a row written past the model's checks) is
# taken for: a plain OpenAI-compatible server.
GENERIC: Kind = openai.KIND


def get(name: str) -> Kind:
    """The kind named ``name`` (``Slot.kind``); the generic one when there is none such."""
    return REGISTRY.get(name, GENERIC)
