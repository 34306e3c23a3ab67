"""Rows kept for a number of days, then deleted by the watcher's housekeeping (one process):
the request log and the response records share this one way of doing it."""

from __future__ import annotations

import datetime as dt
import logging

from django.db import close_old_connections, models


def prune_older(
    model: type[models.Model],
    field: str,
    days: float,
    what: str,
    log: logging.Logger,
    now: dt.datetime | None = None,
) -> int:
    """Delete ``model`` rows whose ``field`` is more than ``days`` before ``now`` (sync)."""
    close_old_connections()  # a housekeeping thread, outside any request
    cutoff = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=days)
    deleted, _ = model._default_manager.filter(**{f"{field}__lt": cutoff}).delete()
    if deleted:
        log.info("pruned %d %s older than %s", deleted, what, cutoff.isoformat())
    return deleted
