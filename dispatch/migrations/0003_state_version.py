"""StateVersion, and triggers that bump it in the same transaction as any change to slots,
their models or API keys: whoever writes, through the ORM's save(), a bulk update() or raw
SQL (issue 12). PostgreSQL bumps once per statement, SQLite once per row."""

from django.db import migrations, models

TABLES = ("dispatch_slot", "dispatch_slotmodel", "dispatch_apikey")

BUMP_SQLITE = (
    "INSERT INTO dispatch_stateversion (id, number) VALUES (1, 1) "
    "ON CONFLICT (id) DO UPDATE SET number = number + 1"
)
BUMP_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION hal0_bump_state_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dispatch_stateversion (id, number) VALUES (1, 1)
    ON CONFLICT (id) DO UPDATE SET number = dispatch_stateversion.number + 1;
    RETURN NULL;
END
$$
"""


def add_triggers(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    execute = schema_editor.execute
    if vendor == "postgresql":
        execute(BUMP_PG_FUNCTION)
        for table in TABLES:
            execute(
                f"CREATE TRIGGER hal0_state_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION hal0_bump_state_version()"
            )
    elif vendor == "sqlite":
        for table in TABLES:
            for op in ("INSERT", "UPDATE", "DELETE"):
                execute(
                    f"CREATE TRIGGER hal0_state_version_{table}_{op.lower()} AFTER {op} "
                    f"ON {table} BEGIN {BUMP_SQLITE}; END"
                )
    else:
        raise RuntimeError(f"hal0web supports SQLite and PostgreSQL, not {vendor}")
    apps.get_model("dispatch", "StateVersion").objects.get_or_create(pk=1, defaults={"number": 1})


def drop_triggers(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    for table in TABLES:
        if vendor == "postgresql":
            schema_editor.execute(f"DROP TRIGGER IF EXISTS hal0_state_version ON {table}")
        else:
            for op in ("insert", "update", "delete"):
                schema_editor.execute(f"DROP TRIGGER IF EXISTS hal0_state_version_{table}_{op}")
    if vendor == "postgresql":
        schema_editor.execute("DROP FUNCTION IF EXISTS hal0_bump_state_version()")


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
        migrations.RunPython(add_triggers, drop_triggers),
    ]
