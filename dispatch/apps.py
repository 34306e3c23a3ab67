from django.apps import AppConfig


class DispatchConfig(AppConfig):
    name = "dispatch"
    verbose_name = "Dispatch"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connect the model signals that keep the routing table and the live UI in step
        # with the database.
        from dispatch import signals  # noqa: F401
