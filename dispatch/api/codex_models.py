"""The ``models`` array of ``/v1/models``, beside ``data``: each listed model as Codex's
``ModelInfo`` (codex-rs ``protocol/src/openai_models.rs``, ``ModelsResponse { models }``).

Codex (0.145 and later) asks a provider's ``GET /models?client_version=…`` when the provider
authenticates by a command (``[model_providers.X.auth]``), and takes that model's metadata
from this array; without it, it warns "Model metadata for `X` not found" and assumes a
272,000-token context. Every field Codex requires is here, filled from what hal0web knows
and no more: the context window the model's server lists (none when it lists none), text
input unless the server says the model sees images, and Codex's own defaults elsewhere
(the values its fallback metadata has). ``base_instructions`` is empty: hal0web has no
instructions for a model, and Codex sends the ones its ``model_instructions_file`` names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Where model servers list the context a model is served with: llama.cpp and OpenRouter's
# context_length, vLLM's max_model_len, llama.cpp's meta.n_ctx. (meta.n_ctx_train is what
# the model was trained for, not what it is served with: a client trusting it would overrun.)
_CONTEXT_KEYS = ("context_length", "max_model_len", "context_window")
# What a server's capabilities list says when the model takes images.
_SEES = frozenset({"vision", "multimodal", "image"})


def _whole(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


def context_window(entry: Mapping[str, Any]) -> int | None:
    """The context the model's server says it serves the model with (None: it says not)."""
    for key in _CONTEXT_KEYS:
        found = _whole(entry.get(key))
        if found is not None:
            return found
    meta = entry.get("meta")
    return _whole(meta.get("n_ctx")) if isinstance(meta, dict) else None


def _modalities(entry: Mapping[str, Any]) -> list[str]:
    capabilities = entry.get("capabilities")
    said = (
        {c for c in capabilities if isinstance(c, str)} if isinstance(capabilities, list) else set()
    )
    return ["text", "image"] if said & _SEES else ["text"]


def model_info(entry: Mapping[str, Any], priority: int) -> dict[str, Any]:
    """One ``/v1/models`` entry as Codex's ``ModelInfo``."""
    return {
        "slug": entry["id"],
        "display_name": entry["id"],
        "description": None,
        "supported_reasoning_levels": [],
        "shell_type": "default",
        "visibility": "list",
        "supported_in_api": True,
        "priority": priority,
        "upgrade": None,
        "base_instructions": "",
        "supports_reasoning_summaries": False,
        "support_verbosity": False,
        "default_verbosity": None,
        "apply_patch_tool_type": None,
        "truncation_policy": {"mode": "bytes", "limit": 10_000},
        "supports_parallel_tool_calls": False,
        "context_window": context_window(entry),
        "experimental_supported_tools": [],
        "input_modalities": _modalities(entry),
    }


def models(data: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``models`` array for the listing ``data``, in its order (Codex's priority)."""
    return [model_info(entry, i) for i, entry in enumerate(data)]
