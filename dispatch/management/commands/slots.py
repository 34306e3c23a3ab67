"""``manage.py slots import|export|list``: slot manifests in and out of the database; and
``slots drain|undrain NAME``, ``slots load|unload|pin|unpin NAME MODEL``: the operator's hands
on a slot's traffic and models (``dispatch.lifecycle.control``, as the admin and the page)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dispatch.lib import redact
from dispatch.lifecycle import control
from dispatch.manifests.apply import apply
from dispatch.manifests.export import dumps, from_slot
from dispatch.manifests.parse import load
from dispatch.manifests.shape import ManifestErrors
from dispatch.models import Slot, SlotModel
from dispatch.routing import states


class Command(BaseCommand):
    help = "Import, export and list slots (hal0 TOML manifests, one file per slot)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(
            dest="action",
            required=True,
            metavar="{import,export,list," + ",".join(control.ACTIONS) + "}",
        )
        imp = sub.add_parser(
            "import",
            help="upsert slots from manifest files or directories (one transaction)",
        )
        imp.add_argument("paths", nargs="+", metavar="PATH", help="*.toml files or directories")
        imp.add_argument(
            "--prune", action="store_true", help="delete slots that no given manifest declares"
        )
        imp.add_argument(
            "--dry-run", action="store_true", help="print what would change and change nothing"
        )
        exp = sub.add_parser("export", help="write one <name>.toml per slot into DIR")
        exp.add_argument("dir", metavar="DIR")
        sub.add_parser("list", help="a table of the slots and their models (with load states)")
        for action, (text, takes_model) in control.ACTIONS.items():
            one = sub.add_parser(action, help=text)
            one.add_argument("name", metavar="NAME", help="the slot's name")
            if takes_model:
                one.add_argument("model", metavar="MODEL", help="a model id the slot lists")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action in control.ACTIONS:
            self._control(action, options["name"], options.get("model"))
        elif action == "import":
            self._import(options["paths"], prune=options["prune"], dry_run=options["dry_run"])
        elif action == "export":
            self._export(Path(options["dir"]))
        else:
            self._list()

    def _import(self, paths: list[str], *, prune: bool, dry_run: bool) -> None:
        try:
            loaded = load(paths)
            report = apply(loaded, prune=prune, dry_run=dry_run)
        except ManifestErrors as exc:
            # CommandError: a non-zero exit with every problem, one per line.
            raise CommandError(
                f"{len(exc.errors)} problem(s), nothing imported:\n{exc}", returncode=1
            ) from exc
        for line in report.lines():
            self.stdout.write(line)

    def _export(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        slots = Slot.objects.prefetch_related("models").order_by("name")
        try:
            texts = {s.name: dumps(from_slot(s)) for s in slots}
        except ValueError as exc:  # extra keys set by hand that TOML cannot carry
            raise CommandError(f"nothing exported: {exc}", returncode=1) from exc
        for slot in slots:
            text = texts[slot.name]
            target = directory / f"{slot.name}.toml"
            # Written beside the target and renamed: a reader never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{slot.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
            os.replace(tmp, target)
            self.stdout.write(f"wrote {target}")
        if not slots:
            self.stdout.write("no slots to export")

    def _control(self, action: str, name: str, model: str | None) -> None:
        try:
            said = control.act(action, name, model)
        except control.ControlError as exc:
            # CommandError: exit code 1 with the reason, no traceback.
            raise CommandError(str(exc), returncode=1) from exc
        self.stdout.write(said)

    def _list(self) -> None:
        rows = [("NAME", "URL", "TYPE", "STATE", "DEFAULT MODEL", "MODELS")]
        for slot in Slot.objects.prefetch_related("models").order_by("name"):
            models = sorted(slot.models.all(), key=lambda m: (not m.is_default, m.model_id))
            default = next((m.model_id for m in models if m.is_default), "-")
            shown = ", ".join(_model_cell(m) for m in models)
            state = slot.state if slot.enabled else f"{slot.state} (disabled)"
            name = f"{slot.name} *" if slot.is_default else slot.name
            rows.append((name, redact.masked(slot.url), slot.type, state, default, shown or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)] + [r[-1]]
            self.stdout.write("  ".join(cells).rstrip())
        if len(rows) == 1:
            self.stdout.write("(no slots: `manage.py slots import slots/` loads the examples)")
        else:
            self.stdout.write("* = the default slot of its type")


def _model_cell(m: SlotModel) -> str:
    """A model in the list: an alias with what it stands for; any other with its load state,
    pinned, and an ask the loader has not acted on yet."""
    if m.source == "alias":
        return f"{m.model_id}→{m.upstream_model}"
    error = redact.masked(" ".join(m.load_error.split()))  # one line, no credentials
    notes = [states.load_words(m.load_state, m.load_progress, error)]
    if m.pinned:
        notes.append("pinned")
    if m.wanted:
        notes.append(f"asked: {m.wanted}")
    return f"{m.model_id} [{', '.join(notes)}]"
