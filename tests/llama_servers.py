"""Helpers for the end-to-end tests against the demo's real llama.cpp servers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from dispatch.lifecycle import demo
from tests.fakes import free_port
from tests.polling import wait_until


def _skip_or_fail(reason: str) -> None:
    """Skip locally; in CI (.ci/run sets CI=1) fail: there `make test` has built and installed
    everything, so a test that cannot find the real server is a broken set-up, not a choice."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (in CI the real llama.cpp tests must run, not skip)")
    pytest.skip(reason)


def llama_server_binary() -> Path:
    """The llama-server the demo runs (``HAL0_LLAMA_SERVER``, by default the venv's, where
    ``make`` installs it); skips (fails in CI) when it is not built."""
    binary = Path(settings.HAL0_LLAMA_SERVER)
    try:
        demo.check_binary(binary)
    except demo.DemoUnavailable as exc:
        _skip_or_fail(f"{exc}; `make test` builds it")
    return binary


def skip_without_models() -> None:
    """Skip (fail in CI) unless the demo's model packages are installed."""
    missing = demo.missing_packages()
    if missing:
        _skip_or_fail(
            "the demo's model packages are not installed (missing: " + ", ".join(missing) + "); "
            "`make test` installs them"
        )


def skip_without_demo() -> None:
    """Skip (fail in CI) unless the demo's model packages and llama-server are installed."""
    skip_without_models()
    llama_server_binary()


def start_pair(base: Path) -> Iterator[dict[str, demo.LlamaServer]]:
    """Both demo model servers on free loopback ports, ready, each slot's default model
    loaded; stopped (and the assembled Gemma file removed) when the generator is closed."""
    skip_without_demo()
    paths = demo.model_paths(base / "models")
    ports = {s.name: free_port() for s in demo.SLOTS}
    servers = demo.servers(llama_server_binary(), paths, ports, base)
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(60)
        for server in servers:  # loading is not generating: a bad build dies only here
            server.check_generation()
        yield {s.spec.name: s for s in servers}
    finally:
        for server in servers:
            server.stop()
        # 253 MB per session otherwise lingers in pytest's retained temp directories.
        shutil.rmtree(base / "models", ignore_errors=True)


def slot_states(base_url: str) -> dict[str, str]:
    body = demo.http_get_json(base_url + "/healthz", timeout=2.0)
    if isinstance(body, dict) and isinstance(body.get("slots"), dict):
        return {str(k): str(v) for k, v in body["slots"].items()}
    return {}


def wait_for_state(base_url: str, slot: str, state: str, timeout: float = 30.0) -> None:
    """Poll hal0web's /healthz until ``slot`` is in ``state`` (fails the test otherwise)."""
    wait_until(
        lambda: slot_states(base_url).get(slot) == state,
        f"slot {slot} to become {state}",
        timeout,
        every=0.1,
        show=lambda: slot_states(base_url),
    )
