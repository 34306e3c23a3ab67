from django.apps import AppConfig


class DispatchConfig(AppConfig):
    name = "dispatch"
    verbose_name = "Dispatch"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connect the model signals that keep the routing table and the live UI in step
        # with the database; then hang the metrics and the request log on the decisions
        # and the watcher.
        # Where each decision goes besides the log line and the live event; each output
        # checks its own switch (HAL0_METRICS, HAL0_REQUEST_LOG) when called.
        from dispatch import (
            decisions,
            health,
            metrics,
            requestlog,
            signals,  # noqa: F401
        )

        for output in (metrics.output, requestlog.output):
            if output not in decisions.outputs:
                decisions.outputs.append(output)
        if metrics.probe_observed not in health.probe_listeners:
            health.probe_listeners.append(metrics.probe_observed)
        if requestlog.prune_if_on not in health.housekeeping:
            health.housekeeping.append(requestlog.prune_if_on)
