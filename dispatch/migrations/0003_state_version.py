"""StateVersion: the version of what every process holds in memory (issue 12). The triggers
that bump it are installed after every migrate (dispatch/triggers.py): SQLite drops a
table's triggers when a later migration rebuilds the table."""

from django.db import migrations, models


def first_row(apps, schema_editor):
    apps.get_model("dispatch", "StateVersion").objects.get_or_create(pk=1, defaults={"number": 1})


class Migration(migrations.Migration):
    dependencies = [
        ("dispatch", "0002_api_keys"),
    ]

    operations = [
        migrations.CreateModel(
            name="StateVersion",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("number", models.BigIntegerField(db_default=0)),
                ("probed_at", models.DateTimeField(blank=True, null=True)),
                ("watcher", models.CharField(blank=True, db_default="", max_length=200)),
            ],
        ),
        migrations.RunPython(first_row, migrations.RunPython.noop),
    ]
