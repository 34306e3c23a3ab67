"""``manage.py serve`` (what ``make run`` runs), as a real process: start-up, the ready
banner, the admin credentials, and Ctrl-C / SIGTERM leaving no child process behind."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from dispatch.lifecycle import demo
from tests.fake_llama_server import CRASH_ENV, shim
from tests.fakes import free_port
from tests.llama_servers import skip_without_demo, skip_without_models
from tests.polling import wait_until
from tests.processes import server_env

READY = "hal0web is ready: "


class Served:
    """A ``manage.py serve`` child whose merged output is read by a thread."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "serve"],
            cwd=settings.BASE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # so a failing test can still kill all of it
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {text!r} within {timeout:.0f} s; output:\n{self.output}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"serve exited ({self.proc.wait()}) before {text!r}:\n{self.output}")
            if text in line:
                return

    def children(self) -> set[int]:
        return set(_children_of(self.proc.pid))

    def stop(self, sig: signal.Signals, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {timeout:.0f} s of {sig.name}:\n{self.output}")
        self.close()
        return code

    def close(self) -> None:
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        self.close()


def _children_of(pid: int) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (after the parenthesised command name) is the parent pid.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            yield int(entry.name)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _get_json(url: str, run: Served | None = None) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        pytest.fail(f"GET {url}: {exc.code} {exc.read()!r}\n{run.output if run else ''}")


def _demo_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], int, int, int]:
    """serve's environment with the demo on free ports: (env, hal0web, primary, hermes)."""
    port, p_port, h_port = free_port(), free_port(), free_port()
    env = server_env(
        tmp_path,
        HAL0_BIND=f"127.0.0.1:{port}",
        HAL0_DEMO_PRIMARY_PORT=str(p_port),
        HAL0_DEMO_HERMES_PORT=str(h_port),
        HAL0_PROBE_INTERVAL_S="1",
        **extra,
    )
    return env, port, p_port, h_port


@pytest.fixture
def serve_runs() -> Iterator[list[Served]]:
    runs: list[Served] = []
    yield runs
    for run in runs:  # a failed test must not leave servers behind either
        if run.proc.poll() is None:
            run.kill()
        run.close()


def _password_hash(data_dir: Path) -> str:
    with sqlite3.connect(data_dir / "hal0web.sqlite3") as db:
        row = db.execute(
            "SELECT password FROM auth_user WHERE username = 'admin' AND is_superuser"
        ).fetchone()
    assert row is not None, "no admin superuser was created"
    return str(row[0])


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_serve_without_demo_prints_credentials_once_and_stops_cleanly(
    tmp_path: Path, serve_runs: list[Served]
) -> None:
    from django.contrib.auth.hashers import check_password

    port = free_port()
    env = server_env(tmp_path, HAL0_DEMO="0", HAL0_BIND=f"127.0.0.1:{port}")
    run = Served(env)
    serve_runs.append(run)
    run.wait_for(READY, 90)
    url = f"http://127.0.0.1:{port}"
    assert f"{READY}{url}/" in run.output

    # The repository's manifests were imported; without the demo nothing serves them here.
    slots = _get_json(url + "/healthz", run)["slots"]
    assert set(slots) == {"primary", "agent-hermes"}
    assert "llama-server" not in run.output and "model server" not in run.output

    match = re.search(r"user admin\s+password (\S+)", run.output)
    assert match, run.output
    password = match.group(1)
    assert check_password(password, _password_hash(tmp_path))
    # Printed, never written down: only Django's hash is stored.
    assert _files_containing(tmp_path, password.encode()) == []
    assert f"curl -si {url}/v1/chat/completions" in run.output
    assert f'base_url="{url}/v1"' in run.output

    children = run.children()
    assert children, "serve runs the ASGI server as a child process"
    assert run.stop(signal.SIGINT) == 0
    assert [pid for pid in children if _alive(pid)] == []
    assert "all stopped" in run.output

    # A second run: nothing to create, no password shown, static files already collected.
    again = Served(env)
    serve_runs.append(again)
    again.wait_for(READY, 90)
    assert "password" not in again.output
    assert "collecting static files" not in again.output
    assert _get_json(url + "/healthz", again)["ok"] is True
    children = again.children()
    assert again.stop(signal.SIGTERM) == 0
    assert [pid for pid in children if _alive(pid)] == []


def test_serve_can_run_uvicorn(tmp_path: Path, serve_runs: list[Served]) -> None:
    port = free_port()
    env = server_env(tmp_path, HAL0_DEMO="0", HAL0_SERVER="uvicorn", HAL0_BIND=f"127.0.0.1:{port}")
    run = Served(env)
    serve_runs.append(run)
    run.wait_for(READY, 90)
    assert "starting hal0web (Uvicorn)" in run.output
    url = f"http://127.0.0.1:{port}"
    assert _get_json(url + "/healthz", run)["ok"] is True
    children = run.children()
    # Uvicorn through hal0web.server (its header timeout, its graceful stop), as deploy/ runs it.
    assert any("hal0web.server" in Path(f"/proc/{pid}/cmdline").read_text() for pid in children)
    assert run.stop(signal.SIGTERM) == 0
    assert [pid for pid in children if _alive(pid)] == []


def _serve_refuses(env: dict[str, str]) -> str:
    """Run `manage.py serve`, which must stop before serving: its stderr."""
    done = subprocess.run(
        [sys.executable, "manage.py", "serve"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0, done.stdout
    return done.stderr


def test_serve_refuses_a_bad_setting(tmp_path: Path) -> None:
    stderr = _serve_refuses(server_env(tmp_path, HAL0_DEMO="maybe"))
    assert "HAL0_DEMO='maybe' is not a boolean" in stderr


@pytest.mark.parametrize("weak", ["password", "12345678"])
def test_serve_refuses_a_weak_admin_password_naming_the_variable(tmp_path: Path, weak: str) -> None:
    # Issue 14: the superuser's password meets the same rules as any other.
    stderr = _serve_refuses(server_env(tmp_path, HAL0_DEMO="0", HAL0_ADMIN_PASSWORD=weak))
    last = stderr.strip().splitlines()[-1]
    assert "HAL0_ADMIN_PASSWORD is too weak" in last, stderr
    assert "too common" in last or "entirely numeric" in last
    # Refused before the user exists: a later run with a good password creates it.
    with sqlite3.connect(tmp_path / "hal0web.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM auth_user").fetchone() == (0,)


@pytest.mark.llama
def test_serve_with_demo_starts_both_models_and_stops_them(
    tmp_path: Path, serve_runs: list[Served]
) -> None:
    skip_without_demo()
    env, port, p_port, h_port = _demo_env(
        tmp_path, HAL0_ADMIN_PASSWORD="correct horse battery staple"
    )
    run = Served(env)
    serve_runs.append(run)
    run.wait_for(READY, 100)
    url = f"http://127.0.0.1:{port}"

    assert _get_json(url + "/healthz", run)["slots"] == {
        "primary": "ready",
        "agent-hermes": "ready",
    }
    # The demo slots point at the configured ports: primary's router lists both models (its
    # default loaded by the first-token check), agent-hermes Gemma alone.
    models = _get_json(f"http://127.0.0.1:{p_port}/v1/models")["data"]
    assert {m["id"]: m["status"]["value"] for m in models} == {
        demo.SMOLLM2.id: "loaded",
        demo.GEMMA.id: "unloaded",
    }
    models = _get_json(f"http://127.0.0.1:{h_port}/v1/models")["data"]
    assert [m["id"] for m in models] == [demo.GEMMA.id]
    assert f"http://127.0.0.1:{p_port}/v1" in run.output
    assert "(the value of HAL0_ADMIN_PASSWORD)" in run.output
    assert "correct horse" not in run.output

    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(
            {
                "model": "agent-hermes",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "Hi"}],
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.headers["X-Hal0-Slot"] == "agent-hermes"
            assert json.loads(resp.read())["usage"]["completion_tokens"] > 0
    except urllib.error.HTTPError as exc:
        logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("llama-*.log"))
        pytest.fail(f"{exc.code} {exc.read()!r}\n{run.output}\n{logs[-3000:]}")

    children = run.children()
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children}
    binary = Path(settings.HAL0_LLAMA_SERVER)
    servers = [pid for pid, c in commands.items() if c.split(b"\0")[0] == bytes(binary)]
    assert len(servers) == 2
    assert sum(b"hal0web.server" in c for c in commands.values()) == 1  # make run's default server
    # primary's router started SmolLM2's instance from its own binary (/proc/self/exe):
    # the installed copy, in serve's process group, so it stops with the rest.
    router = next(pid for pid in servers if str(p_port).encode() in commands[pid])
    [instance] = _children_of(router)
    assert Path(f"/proc/{instance}/exe").resolve() == binary.resolve()
    children.add(instance)

    # A model server that dies is reported; its slot goes offline, the other still serves.
    hermes = next(pid for pid, c in commands.items() if str(h_port).encode() in c)
    os.kill(hermes, signal.SIGKILL)
    run.wait_for("model server agent-hermes exited", 30)
    wait_until(
        lambda: _get_json(url + "/healthz", run)["slots"]["agent-hermes"] == "offline",
        "agent-hermes to go offline",
        30,
        0.2,
        show=lambda: run.output,
    )
    assert _get_json(url + "/healthz", run)["slots"]["primary"] == "ready"

    assert run.stop(signal.SIGINT) == 0
    assert [pid for pid in children if _alive(pid)] == []
    for slot_port in (p_port, h_port):
        assert demo.http_get_json(f"http://127.0.0.1:{slot_port}/v1/models") is None


def test_serve_reports_a_model_server_that_crashes_on_its_first_token(
    tmp_path: Path, serve_runs: list[Served]
) -> None:
    """Both demo servers load; agent-hermes dies on its first generation (as llama.cpp built
    for AMX does where the process may not use it). serve says so with the log, never calls
    that slot ready, and primary still serves. The servers are tests/fake_llama_server.py."""
    skip_without_models()
    env, port, _, _ = _demo_env(
        tmp_path,
        HAL0_LLAMA_SERVER=str(shim(tmp_path / "shim")),
        **{CRASH_ENV: demo.GEMMA.id},
    )
    run = Served(env)
    serve_runs.append(run)
    run.wait_for(READY, 100)
    url = f"http://127.0.0.1:{port}"
    reason = (
        "the model server crashed on its first generation (signal 11): see llama-agent-hermes.log"
    )
    assert f"slot agent-hermes: {reason}" in run.output
    assert "about to crash (fake)" in run.output  # the tail of its log
    banner = run.output[run.output.index(READY) :]
    [hermes_line] = [line for line in banner.splitlines() if "slot agent-hermes" in line]
    assert "ready" not in hermes_line.split()
    assert reason in banner
    assert _get_json(url + "/healthz", run)["slots"] == {
        "primary": "ready",
        "agent-hermes": "offline",
    }

    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(
            {"model": "primary", "messages": [{"role": "user", "content": "Hi"}]}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.headers["X-Hal0-Slot"] == "primary"
        assert json.loads(resp.read())["slot"] == demo.SMOLLM2.id

    children = run.children()
    assert run.stop(signal.SIGINT) == 0
    assert [pid for pid in children if _alive(pid)] == []


def test_serve_reports_a_router_whose_model_instance_crashes_on_its_first_token(
    tmp_path: Path, serve_runs: list[Served]
) -> None:
    """primary's router stays up when the instance of its default model dies: serve reports
    the instance's exit (the router lists the model as failed), stops it, agent-hermes serves.
    """
    skip_without_models()
    env, port, _, _ = _demo_env(
        tmp_path, HAL0_LLAMA_SERVER=str(shim(tmp_path / "shim")), **{CRASH_ENV: demo.SMOLLM2.id}
    )
    run = Served(env)
    serve_runs.append(run)
    run.wait_for(READY, 100)
    reason = (
        "the model instance of smollm2-135m-instruct crashed on its first generation "
        "(exit code 1): see llama-primary.log"
    )
    assert f"slot primary: {reason}" in run.output
    url = f"http://127.0.0.1:{port}"
    assert _get_json(url + "/healthz", run)["slots"] == {
        "primary": "offline",
        "agent-hermes": "ready",
    }
    children = run.children()
    assert run.stop(signal.SIGINT) == 0
    assert [pid for pid in children if _alive(pid)] == []
