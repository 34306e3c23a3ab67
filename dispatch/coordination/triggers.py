"""The database triggers that bump ``StateVersion`` with any change to slots, their models
or API keys — whoever writes, through the ORM's save(), a bulk update() or raw SQL.

Installed after every ``migrate`` (``post_migrate``), not by a migration: SQLite rebuilds a
table to alter it (a later AddField on ``dispatch_slot``, say) and its triggers go with the
old table. Idempotent on both engines. PostgreSQL bumps once per statement, SQLite once
per row.
"""

from __future__ import annotations

from typing import Any

from django.db import connections

TABLES = ("dispatch_slot", "dispatch_slotmodel", "dispatch_apikey")

_SQLITE_BUMP = (
    "INSERT INTO dispatch_stateversion (id, number) VALUES (1, 1) "
    "ON CONFLICT (id) DO UPDATE SET number = number + 1"
)
_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION hal0_bump_state_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dispatch_stateversion (id, number) VALUES (1, 1)
    ON CONFLICT (id) DO UPDATE SET number = dispatch_stateversion.number + 1;
    RETURN NULL;
END
$$
"""


def statements(vendor: str) -> list[str]:
    if vendor == "postgresql":
        return [_PG_FUNCTION] + [
            f"CREATE OR REPLACE TRIGGER hal0_state_version AFTER INSERT OR UPDATE OR DELETE "
            f"OR TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION hal0_bump_state_version()"
            for table in TABLES
        ]
    if vendor == "sqlite":
        return [
            f"CREATE TRIGGER IF NOT EXISTS hal0_state_version_{table}_{op.lower()} AFTER {op} "
            f"ON {table} BEGIN {_SQLITE_BUMP}; END"
            for table in TABLES
            for op in ("INSERT", "UPDATE", "DELETE")
        ]
    raise RuntimeError(f"hal0web supports SQLite and PostgreSQL, not {vendor}")


def install(using: str = "default", **_: Any) -> None:
    """Create (or keep) the triggers on database ``using``: the post_migrate receiver."""
    connection = connections[using]
    with connection.cursor() as cursor:
        for sql in statements(connection.vendor):
            cursor.execute(sql)
