"""/metrics: the Prometheus exposition, for staff, an API key, or all (HAL0_METRICS_PUBLIC)."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatch.api.keys import presented_key
from dispatch.api.responses import error_response
from dispatch.coordination.keyring import keyring
from dispatch.observability.metrics import registry
from dispatch.routing.endpoints import BY_NAME
from dispatch.wire.errors import ApiError

# The headers a key may come in: those of the model list, which both SDKs read.
_KEY_HEADER = BY_NAME["models"].key_header


async def view(request: HttpRequest) -> HttpResponse:
    if not settings.HAL0_METRICS:
        return error_response(ApiError(404, "not_found", "Metrics are off (HAL0_METRICS=false)."))
    if request.method not in ("GET", "HEAD"):
        response = error_response(ApiError(405, "method_not_allowed", "Use GET for /metrics."))
        response["Allow"] = "GET, HEAD"
        return response
    if not settings.HAL0_METRICS_PUBLIC:
        try:
            allowed = await _may_read(request)
        except ApiError as err:  # a key that is not valid (or no longer)
            return error_response(err)
        if not allowed:
            return error_response(
                ApiError(
                    401,
                    "missing_api_key",
                    "/metrics needs a staff login, an API key (`Authorization: Bearer <key>` "
                    "or `x-api-key`), or HAL0_METRICS_PUBLIC=true.",
                )
            )
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


async def _may_read(request: HttpRequest) -> bool:
    """A valid key, through the API's own check; without one, a staff session."""
    await keyring.ensure_loaded()
    if presented_key(request, _KEY_HEADER) is not None:
        return True
    user = await request.auser()
    return bool(user.is_active and user.is_staff)
