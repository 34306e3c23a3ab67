"""The real CLI clients the suite drives (installed by ``make`` into tests/clients from the
npm registry, pinned by its package-lock.json): Claude Code and Codex."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BIN = Path(__file__).parent / "clients" / "node_modules" / ".bin"


def cli(name: str) -> Path:
    """The installed CLI ``name`` (``claude``, ``codex``, ``compatcanary``). Skips locally
    when it is not installed; fails in CI (.ci/run sets CI=1), where `make test` installs it."""
    path = BIN / name
    if not path.exists():
        reason = f"{path} is not installed; `make test` installs tests/clients (npm ci)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (in CI the real clients must run, not skip)")
        pytest.skip(reason)
    return path
