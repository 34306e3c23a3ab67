"""The browser pages."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

# What the Activity page charts, and how much of the request log seeds it.
ACTIVITY_WINDOW = dt.timedelta(minutes=15)
ACTIVITY_SEED_ROWS = 20_000  # a busy quarter of an hour is summed by the page, not shipped whole


@login_required
@ensure_csrf_cookie
def chat(request: HttpRequest) -> HttpResponse:
    return render(request, "dispatch/chat.html", {})


def _seed(now: dt.datetime) -> list[dict[str, Any]]:
    from dispatch.models import RequestLog

    rows = (
        RequestLog.objects.filter(at__gte=now - ACTIVITY_WINDOW)
        .order_by("-at")
        .values_list(
            "at",
            "request_id",
            "endpoint",
            "model",
            "slot",
            "resolution",
            "status",
            "error",
            "duration_ms",
            "ttft_ms",
            "completion_tokens",
            "why",
        )[:ACTIVITY_SEED_ROWS]
    )
    # The same shape as a live `dispatch.decision` event, so the page handles both alike.
    return [
        {
            "at": at.timestamp(),
            "request_id": rid,
            "endpoint": endpoint,
            "model": model or None,
            "slot": slot or None,
            "resolution_path": resolution or None,
            "status": status,
            "error": error or None,
            "duration_ms": duration,
            "ttft_ms": ttft,
            "completion_tokens": tokens,
            "why": {"text": why} if why else None,
        }
        for (
            at,
            rid,
            endpoint,
            model,
            slot,
            resolution,
            status,
            error,
            duration,
            ttft,
            tokens,
            why,
        ) in rows
    ]


@staff_member_required
def activity(request: HttpRequest) -> HttpResponse:
    """Live per-slot charts and the latest requests; seeded from the request log."""
    now = dt.datetime.now(dt.UTC)
    context = {
        "seed": {
            "now": now.timestamp(),
            "window_s": ACTIVITY_WINDOW.total_seconds(),
            "requests": _seed(now)[::-1],  # oldest first, as live events arrive
        }
    }
    return render(request, "dispatch/activity.html", context)
