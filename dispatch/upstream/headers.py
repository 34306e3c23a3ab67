"""Which headers cross the proxy, each way. Pure."""

from __future__ import annotations

from collections.abc import Mapping

# Connection-level headers (RFC 9110 §7.6.1) and ones we recompute; never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Client headers that belong to hal0web, not to the upstream: the client's credentials for
# us (in every header the SDKs put them: OpenAI's, Azure's, Anthropic's) and for a proxy
# between, the WebUI's session and CSRF cookies, and encodings (we ask upstreams for
# identity so SSE is never held back by a compressor). A slot's own credential is added
# from its api_key_env.
NOT_UPSTREAM = HOP_BY_HOP | {
    "authorization",
    "x-api-key",
    "api-key",
    "proxy-authorization",
    "cookie",
    "x-csrftoken",
    "accept-encoding",
    "origin",
    "referer",
}
# Upstream headers that are not the client's business: its cookies, its identity, and its
# CORS answer (which browser origins may read /v1 is hal0web's decision: HAL0_CORS_ORIGINS).
NOT_DOWNSTREAM = HOP_BY_HOP | {"set-cookie", "server", "date"}
NOT_DOWNSTREAM_PREFIX = "access-control-"


def for_upstream(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers the upstream may see (the slot's credential is added apart)."""
    return {k: v for k, v in headers.items() if k.lower() not in NOT_UPSTREAM}


def for_downstream(name: str) -> bool:
    """Whether the upstream's header ``name`` (lower case) goes on to the client."""
    return name not in NOT_DOWNSTREAM and not name.startswith(NOT_DOWNSTREAM_PREFIX)
