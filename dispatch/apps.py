import contextlib
from typing import Any

from django.apps import AppConfig


def sync_outputs(**_: Any) -> None:
    """Put the metrics and the request log on the decisions and the watcher when they are on.

    Read once here (and again when a test changes a setting) instead of on every request.
    """
    from django.conf import settings

    from dispatch.coordination import affinity_db, stored_responses
    from dispatch.lifecycle import hooks
    from dispatch.observability import decisions, metrics, requestlog

    wanted = [decisions.log_output, decisions.event_output]
    if settings.HAL0_METRICS:
        wanted.append(metrics.output)
    if settings.HAL0_REQUEST_LOG:
        wanted.append(requestlog.output)
    decisions.outputs[:] = wanted
    hooks.probe_listeners[:] = [metrics.probe_observed] if settings.HAL0_METRICS else []
    from dispatch.lifecycle import loader
    from dispatch.upstream.loads import loads

    for listeners, listener in (
        (loader.loaded, metrics.model_loaded),
        (loader.unloaded, metrics.model_unloaded),
        (loads.waited, metrics.queue_waited),
    ):
        with contextlib.suppress(ValueError):  # not added yet
            listeners.remove(listener)  # type: ignore[arg-type]
        if settings.HAL0_METRICS:
            listeners.add(listener)  # type: ignore[arg-type]
    hooks.housekeeping[:] = [requestlog.prune_if_on, stored_responses.prune]
    if not settings.REDIS_URL:  # (Redis expires its records itself)
        hooks.housekeeping.append(affinity_db.prune)


class DispatchConfig(AppConfig):
    name = "dispatch"
    verbose_name = "Dispatch"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connect the model signals that keep the routing table in step with the database,
        # and the live feed that tells the pages what changes.
        from django.core.signals import setting_changed
        from django.db.models.signals import post_migrate

        from dispatch import signals  # noqa: F401
        from dispatch.wire import translators

        translators.install()
        from dispatch.coordination import triggers
        from dispatch.coordination.store import store
        from dispatch.upstream.outliers import outliers
        from dispatch.web import live

        # Before the live feed's: a slot's state change forgets its ejection here before
        # the pages hear the new table.
        store.on_change(outliers.table_changed)
        live.install()
        from dispatch.coordination import sync
        from dispatch.upstream.loads import loads

        sync.loads_news.add(loads.heard)
        post_migrate.connect(triggers.install, sender=self)
        sync_outputs()
        # Sent by override_settings and pytest-django's `settings` fixture only.
        setting_changed.connect(sync_outputs, dispatch_uid="hal0-sync-outputs")
        from dispatch.api.request import forget_hosts
        from dispatch.conf import conf

        setting_changed.connect(forget_hosts, dispatch_uid="hal0-forget-hosts")
        setting_changed.connect(conf.forget, dispatch_uid="hal0-forget-settings")
