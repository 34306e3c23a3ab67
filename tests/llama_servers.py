"""Helpers for the end-to-end tests against the demo's real llama.cpp servers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatch.lifecycle import demo
from tests.fakes import free_port
from tests.polling import wait_until


def skip_without_demo() -> None:
    missing = demo.missing_packages()
    if missing:
        pytest.skip(
            "the demo extra is not installed (missing: " + ", ".join(missing) + "); "
            "`make test` installs it"
        )


def start_pair(base: Path) -> Iterator[dict[str, demo.LlamaServer]]:
    """Both demo model servers on free loopback ports, ready; stopped (and the assembled
    Gemma file removed) when the generator is closed."""
    skip_without_demo()
    paths = demo.model_paths(base / "models")
    ports = {m.slot: free_port() for m in demo.MODELS}
    servers = demo.servers(paths, ports, base / "logs")
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(60)
        for server in servers:  # loading is not generating: a bad build dies only here
            server.check_generation()
        yield {s.model.slot: s for s in servers}
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
