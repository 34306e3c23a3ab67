"""FastFlowLM (``flm serve``, AMD NPUs): OpenAI-compatible under ``/v1``; ``GET /v1/models``
lists the models it can serve. No separate health endpoint: probed as any OpenAI-compatible
server.
"""

from __future__ import annotations

from dispatch.kinds.base import Kind


class FastFlowLM(Kind):
    name = "flm"
    label = "FastFlowLM"


KIND = FastFlowLM()
