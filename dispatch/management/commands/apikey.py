"""``manage.py apikey create|list|revoke``: API keys from a shell, as the admin makes them."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from dispatch.models import ApiKey
from dispatch.routing.scopes import split_patterns


def _date(text: str) -> dt.datetime:
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise CommandError(f"--expires {text!r}: not a date (YYYY-MM-DD)") from None
    # The key stops working as that day begins (UTC): "expires 2027-01-01" is not usable
    # on New Year's Day.
    return dt.datetime.combine(day, dt.time(), dt.UTC)


class Command(BaseCommand):
    help = "Create, list and revoke API keys for /v1."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="make a key; it is printed once, never stored")
        create.add_argument("name", help="who or what uses the key (unique)")
        create.add_argument(
            "--models",
            nargs="+",
            default=[],
            metavar="PATTERN",
            help="models the key may use: globs over model ids, aliases and slot/model ids "
            "(qwen3-* primary/* hermes); default: every model",
        )
        create.add_argument(
            "--expires", metavar="YYYY-MM-DD", help="the day the key stops working (00:00 UTC)"
        )
        sub.add_parser("list", help="every key: its scope, expiry and last use")
        revoke = sub.add_parser("revoke", help="disable a key: it stops working at once")
        revoke.add_argument("name")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "create":
            self._create(options["name"], options["models"], options["expires"])
        elif action == "list":
            self._list()
        else:
            # Disabled, not deleted: with HAL0_API_AUTH=auto, deleting the last key would
            # open the API to anyone; a disabled key keeps it closed (and is listed).
            if not ApiKey.objects.filter(name=options["name"]).update(enabled=False):
                raise CommandError(f"no API key is named {options['name']!r}")
            self.stdout.write(f"revoked {options['name']}")

    def _create(self, name: str, models: list[str], expires: str | None) -> None:
        expires_at = _date(expires) if expires else None
        if expires_at is not None and expires_at <= dt.datetime.now(dt.UTC):
            raise CommandError(f"--expires {expires}: that day has begun already")
        if ApiKey.objects.filter(name=name).exists():
            raise CommandError(f"an API key is named {name!r} already; choose another name")
        patterns = [p for given in models for p in split_patterns(given)]
        try:
            row, key = ApiKey.issue(name, patterns, expires_at)
        except ValidationError as exc:
            raise CommandError(
                "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            ) from None
        self.stdout.write(key)
        scope = ", ".join(row.allowed_models) or "every model"
        until = f", until {expires}" if expires else ""
        self.stderr.write(f"API key {name!r} ({scope}{until}): copy it now, it is not stored.")

    def _list(self) -> None:
        rows = [("name", "prefix", "enabled", "models", "expires", "last used")]
        for key in ApiKey.objects.select_related("use").order_by("name"):
            use = getattr(key, "use", None)
            rows.append(
                (
                    key.name,
                    key.prefix + "…",
                    "yes" if key.enabled else "no",
                    ",".join(key.allowed_models or []) or "*",
                    key.expires_at.date().isoformat() if key.expires_at else "never",
                    use.last_used_at.isoformat(timespec="seconds") if use else "never",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            self.stdout.write(
                "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
            )
