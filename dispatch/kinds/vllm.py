"""vLLM's OpenAI-compatible server: ``GET /health`` at the server's root (200 once the engine
is up, empty body) and ``GET /v1/models`` (the model it serves, and any LoRA adapters).

Probed as any OpenAI-compatible server: vLLM answers ``/v1/models`` only once its engine is
up, so ``/models`` alone tells the state; its ``/health`` would add nothing hal0web reads.
"""

from __future__ import annotations

from dispatch.kinds.base import Kind


class VLLM(Kind):
    name = "vllm"
    label = "vLLM"


KIND = VLLM()
