"""/healthz: whether this process can route, for a load balancer, and what it cannot do.

A balancer takes a process out on a 503. That is right only when this process routes worse
than the others would: it has no table, or its table lags a state the others route by. A
database or Redis outage, or a watcher that stopped probing, is the same for every process:
answering 503 for it would take the whole fleet out while it routes fine from the table in
memory. Those are 200 with ``record: false`` (or the stale slot state) in the body.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.http import HttpRequest, JsonResponse

from dispatch.coordination import redis_ping
from dispatch.coordination.outages import Unavailable
from dispatch.coordination.store import store
from dispatch.lifecycle.leadership import ensure_running
from dispatch.observability import requestlog
from dispatch.routing import states
from dispatch.upstream.outliers import outliers


def _iso(moment: dt.datetime | float | None) -> str | None:
    """A moment (a datetime, or a ``time.time()`` timestamp) as ISO 8601 text."""
    if moment is None:
        return None
    if isinstance(moment, float):
        moment = dt.datetime.fromtimestamp(moment, dt.UTC)
    return moment.isoformat()


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 while this process can route; 503 when it cannot (no table, or a table that lags
    the state the other processes route by). The body says what is impaired either way."""
    try:
        table = await store.ensure_loaded()
    except Unavailable:  # the database away since this process started: no table to route by
        table = store.table
    ensure_running()
    watcher = store.freshness()
    lagging = store.lagging
    cannot_route = (
        "no routing table yet: the database could not be read since this process started"
        if not store.loaded
        else f"this process's routing table (version {table.version}) lags version {lagging}, "
        "which it could not load"
        if lagging is not None
        else None
    )
    database = {
        "reachable": store.unreadable_since is None,
        "read_at": _iso(store.read_at),
        "unreachable_since": _iso(store.unreadable_since),
    }
    redis = (
        {"reachable": await redis_ping.answers(settings.REDIS_URL)} if settings.REDIS_URL else None
    )
    writer = requestlog.writer
    request_log = (
        {
            "backlog": writer.backlog,
            "lost": writer.lost,
            "failing_since": _iso(writer.failing_since),
        }
        if settings.HAL0_REQUEST_LOG
        else None
    )
    impaired = [
        name
        for name, bad in (
            ("table", cannot_route is not None),
            ("database", not database["reachable"]),
            ("redis", redis is not None and not redis["reachable"]),
            ("request_log", request_log is not None and writer.failing_since is not None),
            ("slot_state", bool(watcher["stale"])),
        )
        if bad
    ]
    route = cannot_route is None
    response = JsonResponse(
        {
            "ok": route,  # as the status: a balancer may read either
            "route": route,
            "record": not {"database", "redis", "request_log"} & set(impaired),
            "impaired": impaired,
            "cannot_route": cannot_route,
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
            "database": database,
            "redis": redis,
            "request_log": request_log,
        },
        status=200 if route else 503,
    )
    # A 503 here is an answer, not a server error: Django would log each one as an ERROR.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response
