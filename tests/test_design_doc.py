"""docs/design.md stays true: every module of dispatch/ is named in it, and every module it
names exists (a room split or renamed without the page following fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
# Generated or one-per-command files: the page names their folders instead.
_FOLDERS = ("dispatch/migrations/", "dispatch/management/commands/")


def _modules() -> set[str]:
    found = set()
    for path in (ROOT / "dispatch").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or rel.startswith(_FOLDERS):
            continue
        found.add(rel)
    return found


def test_every_dispatch_module_is_in_the_design_page() -> None:
    text = DESIGN.read_text()
    missing = sorted(m for m in _modules() if m not in text)
    assert not missing, f"docs/design.md does not name: {', '.join(missing)}"


def test_every_module_the_design_page_names_exists() -> None:
    named = set(re.findall(r"`((?:dispatch|hal0web|tools|bench)/[\w/]+\.py)`", DESIGN.read_text()))
    assert named, "the page names no module"
    gone = sorted(m for m in named if not (ROOT / m).exists())
    assert not gone, f"docs/design.md names modules that do not exist: {', '.join(gone)}"


def test_the_readme_links_the_design_page() -> None:
    assert "(docs/design.md)" in (ROOT / "README.md").read_text()
