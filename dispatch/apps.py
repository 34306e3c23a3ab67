from django.apps import AppConfig


class DispatchConfig(AppConfig):
    name = "dispatch"
    verbose_name = "Dispatch"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connect the model signals that keep the routing table and the live UI in step
        # with the database.
        from django.db.models.signals import post_migrate

        from dispatch import signals, triggers  # noqa: F401

        post_migrate.connect(triggers.install, sender=self)
