from django.apps import AppConfig


class DispatchConfig(AppConfig):
    name = "dispatch"
    verbose_name = "Dispatch"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connect the model signals that keep the routing table and the live UI in step
        # with the database; then hang the request log on the decisions and the watcher.
        from dispatch import (
            decisions,
            health,
            requestlog,
            signals,  # noqa: F401
        )

        # Where each decision goes besides the log line and the live event; each output
        # checks its own switch (HAL0_REQUEST_LOG) when called.
        for output in (requestlog.output,):
            if output not in decisions.outputs:
                decisions.outputs.append(output)
        if requestlog.prune_if_on not in health.housekeeping:
            health.housekeeping.append(requestlog.prune_if_on)
