"""/healthz: whether this process keeps the slot state fresh, for a load balancer."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from dispatch.coordination.store import store
from dispatch.lifecycle.leadership import ensure_running
from dispatch.routing import states
from dispatch.upstream.outliers import outliers


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 while the slot state is kept fresh; 503 once it is stale (no watcher keeps it,
    or this process cannot read the database), so a load balancer stops trusting it."""
    table = await store.ensure_loaded()
    ensure_running()
    watcher = store.freshness()
    response = JsonResponse(
        {
            "ok": not watcher["stale"],
            "version": table.version,
            "slots": {
                s.name: (
                    states.DISABLED
                    if not s.enabled
                    else states.DEGRADED
                    if s.state == states.READY and outliers.degraded(s)
                    else s.state
                )
                for s in table.slots.values()
            },
            "watcher": watcher,
        },
        status=503 if watcher["stale"] else 200,
    )
    # A 503 here is an answer, not a server error: Django would log each one as an ERROR
    # (hal0.sync already warned once, when the state turned stale).
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response
