"""``manage.py serve``: what ``make run`` runs.

Prepares the database, the slots, an admin user and the static files; starts the demo's two
model servers (unless ``HAL0_DEMO=0``) and the ASGI server (Uvicorn, or Daphne with
``HAL0_SERVER=daphne``) as child processes; waits until the slots are ready; prints how to
use it; and on Ctrl-C / SIGTERM stops every child it started.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.contrib.staticfiles.finders import get_finders
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from dispatch.lifecycle import demo
from dispatch.routing.states import DISABLED, PROBED_DOWN, READY, UNKNOWN

READY_TIMEOUT_S = 180.0  # the model servers load in a second or two; this is a last resort
OWN_SLOTS_WAIT_S = 5.0  # without the demo, give your servers' first probes this long
FIRST_TOKEN_TIMEOUT_S = 60.0  # one token from a 270M model takes well under a second
# Past HAL0_DRAIN_S, how long the ASGI server may take to end what the drain cut and shut
# down before it is killed: Uvicorn's bound is HAL0_DRAIN_S + 5 s (hal0web.server), then the
# lifespan shutdown (the request log written: up to 5 s).
SERVER_STOP_GRACE_S = 15.0


class _Stop(Exception):
    """Raised in the main thread by SIGINT/SIGTERM: unwind and stop the children."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def server_command(server: str, host: str, port: int, access_log: Path | None) -> list[str]:
    """The ASGI server's command line (one worker; see docs/performance.md)."""
    if server == "uvicorn":
        # httptools + uvloop, and a deep accept backlog: Daphne's default one overflowed
        # at 2,000 concurrent streams in the benchmark. Through hal0web.server, as in
        # production (deploy/): Uvicorn with a header-read timeout and a graceful stop.
        return [
            sys.executable,
            "-m",
            "hal0web.server",
            "hal0web.asgi:application",
            "--host",
            host,
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--backlog",
            "4096",
            "--no-access-log",
        ]
    log = ["--access-log", str(access_log)] if access_log is not None else []
    return [
        sys.executable,
        "-m",
        "daphne",
        "-b",
        host,
        "-p",
        str(port),
        *log,
        "hal0web.asgi:application",
    ]


def split_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (HAL0_BIND, already validated by settings) → host for Daphne, port."""
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


def local_url(host: str, port: int) -> str:
    """The URL to reach a server bound to ``host`` from this machine."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Command(BaseCommand):
    help = (
        "Migrate, import slots/, create the admin user, start the demo model servers "
        "(HAL0_DEMO) and the ASGI server (HAL0_SERVER) on HAL0_BIND; Ctrl-C stops everything."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--slots-dir",
            default=str(settings.BASE_DIR / "slots"),
            help="the manifests to import (default: the repository's slots/)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.started = time.monotonic()
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.llama: list[demo.LlamaServer] = []
        self.failed: dict[str, str] = {}  # demo slot -> why its server cannot serve
        previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._run(Path(options["slots_dir"]))
        except _Stop as stop:
            self.say(f"\n{stop} received: stopping")
        except demo.DemoUnavailable as exc:
            raise CommandError(str(exc)) from exc
        finally:
            # A second Ctrl-C must not cut the clean-up short: every step below is bounded.
            for s in previous:
                signal.signal(s, signal.SIG_IGN)
            self._stop_children()
            for s, handler in previous.items():
                signal.signal(s, handler)

    # --- steps ----------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def step(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.started:5.1f}s] {text}")

    def _run(self, slots_dir: Path) -> None:
        self.step("migrating the database")
        call_command("migrate", interactive=False, verbosity=0)
        self.step(f"importing slot manifests from {slots_dir}")
        report = io.StringIO()
        call_command("slots", "import", str(slots_dir), stdout=report)
        for line in report.getvalue().splitlines():
            self.say(f"         {line}")
        if settings.HAL0_DEMO:
            self._point_demo_slots()
        credentials = self._ensure_admin()
        self._collectstatic()

        host, port = split_bind(settings.HAL0_BIND)
        url = local_url(host, port)
        if settings.HAL0_DEMO:
            self._start_demo()
        name = "Uvicorn" if settings.HAL0_SERVER == "uvicorn" else "Daphne"
        self.step(f"starting hal0web ({name}) on {settings.HAL0_BIND}")
        access_log = Path(settings.DATA_DIR) / "logs" / "access.log"
        access_log.parent.mkdir(parents=True, exist_ok=True)
        server = demo.spawn(server_command(settings.HAL0_SERVER, host, port, access_log))
        self.children.append((f"hal0web ({name})", server))
        states = self._wait_until_ready(url)
        self._banner(url, states, credentials)
        self._supervise()

    def _point_demo_slots(self) -> None:
        """The demo's ports are configurable: make the two demo slots point at them."""
        from dispatch.models import Slot

        for name, port in _demo_ports().items():
            slot = Slot.objects.filter(name=name).first()
            if slot is None:
                raise CommandError(
                    f"the demo needs a slot named {name!r} (slots/{name}.toml is missing); "
                    "restore it or run with HAL0_DEMO=0"
                )
            wanted = f"http://127.0.0.1:{port}/v1"
            if slot.url != wanted or not slot.enabled:
                slot.url, slot.enabled = wanted, True
                slot.full_clean()
                slot.save()

    def _ensure_admin(self) -> tuple[str, str] | None:
        """Create the `admin` superuser on first run. Returns (user, password-to-show)."""
        from django.contrib.auth import get_user_model

        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return None
        given = settings.HAL0_ADMIN_PASSWORD
        if given:
            # The rules every password meets (AUTH_PASSWORD_VALIDATORS) hold for this one too:
            # `password` or `12345678` would make the superuser the easiest account to guess.
            from django.contrib.auth.password_validation import validate_password
            from django.core.exceptions import ValidationError

            try:
                validate_password(given, User(username="admin"))
            except ValidationError as exc:
                raise CommandError(
                    "HAL0_ADMIN_PASSWORD is too weak for the admin user: "
                    + " ".join(exc.messages)
                    + " Choose another, or unset it to have one generated."
                ) from exc
        password = given or secrets.token_urlsafe(12)
        user, _ = User.objects.get_or_create(username="admin")
        user.is_staff = user.is_superuser = user.is_active = True
        user.set_password(password)  # only the hash is stored
        user.save()
        shown = "(the value of HAL0_ADMIN_PASSWORD)" if given else password
        self.step(f"created the superuser 'admin', password: {shown}")
        return ("admin", shown)

    def _collectstatic(self) -> None:
        """Collect static files for WhiteNoise, only when the sources changed."""
        root = Path(settings.STATIC_ROOT)
        stamp = root / ".hal0-collected"
        fingerprint = _static_fingerprint()
        if stamp.is_file() and stamp.read_text() == fingerprint:
            return
        self.step("collecting static files")
        call_command("collectstatic", interactive=False, verbosity=0)
        stamp.write_text(fingerprint)

    def _start_demo(self) -> None:
        data = Path(settings.DATA_DIR)
        binary = Path(settings.HAL0_LLAMA_SERVER)
        demo.check_binary(binary)
        self.step("locating the demo models")
        paths = demo.model_paths(data / "models", progress=lambda t: self.step("  " + t))
        self.llama = demo.servers(binary, paths, _demo_ports(), data)
        for server in self.llama:
            self.step(
                f"starting {server.spec.label} as slot {server.spec.name} on "
                f"{server.api_url} (log: {server.log_path})"
            )
            server.start()
            assert server.proc is not None
            self.children.append((f"model server {server.spec.name}", server.proc))

    def _wait_until_ready(self, url: str) -> dict[str, str]:
        """Poll /healthz (which also starts the slot watcher) until the slots are ready."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        if self.llama:
            # Wait for the model servers themselves first: hal0web's first probe then finds
            # them up, instead of marking them offline and backing off.
            self.step("waiting for the model servers to load their models")
            pending = list(self.llama)
            said = time.monotonic()
            while pending:
                self._check_children()
                pending = [s for s in pending if not s.ready()]
                if pending and time.monotonic() - said >= 5:
                    names = ", ".join(s.spec.name for s in pending)
                    self.step(f"  still loading: {names}")
                    said = time.monotonic()
                if time.monotonic() > deadline:
                    raise CommandError(
                        f"the model servers did not answer within {READY_TIMEOUT_S:.0f} s; "
                        + " ".join(f"see {s.log_path}" for s in pending)
                    )
                time.sleep(0.1)
            self._check_generation()
        self.step(f"waiting for {url}/healthz and the slots to be ready")
        own_deadline = time.monotonic() + OWN_SLOTS_WAIT_S
        last: dict[str, str] | None = None
        last_said = time.monotonic()
        while True:
            self._check_children()
            body = demo.http_get_json(url + "/healthz", timeout=2.0)
            states: dict[str, str] = {}
            if isinstance(body, dict) and isinstance(body.get("slots"), dict):
                states = {str(k): str(v) for k, v in body["slots"].items()}
                if settings.HAL0_DEMO:
                    wanted = [s.spec.name for s in self.llama]
                    # A demo slot whose server was stopped must be seen down, never "ready".
                    if all(states.get(name) == READY for name in wanted) and all(
                        states.get(name) in PROBED_DOWN for name in self.failed
                    ):
                        return states
                elif not any(s == UNKNOWN for s in states.values()) or (
                    time.monotonic() > own_deadline
                ):
                    return states
            now = time.monotonic()
            if states != last or now - last_said >= 5:
                shown = ", ".join(f"{k}={v}" for k, v in sorted(states.items()))
                self.step("  " + (f"slots: {shown}" if body else "hal0web is starting"))
                last, last_said = states, now
            if now > deadline:
                raise CommandError(
                    f"the slots were not ready within {READY_TIMEOUT_S:.0f} s: {states}; "
                    + " ".join(f"see {s.log_path}" for s in self.llama)
                )
            time.sleep(0.2)

    def _check_generation(self) -> None:
        """Ask every demo server for one token before its slot may count as ready.

        A server that cannot generate is reported with its log and stopped, so its slot
        reads offline; the other demo slot goes on serving.
        """
        self.step("asking each model server for one token")
        for server in list(self.llama):
            try:
                server.check_generation(timeout=FIRST_TOKEN_TIMEOUT_S)
            except demo.GenerationFailed as failed:
                self.stderr.write(
                    f"slot {server.spec.name}: {failed.reason}\n"
                    f"Last lines of {server.log_path}:\n{failed.log_tail}"
                )
                self.failed[server.spec.name] = failed.reason
                self.llama.remove(server)
                self.children = [(n, p) for n, p in self.children if p is not server.proc]
                server.stop()

    def _check_children(self) -> None:
        for name, proc in self.children:
            if proc.poll() is not None:
                server = next((s for s in self.llama if s.proc is proc), None)
                detail = f"; last lines of its log:\n{server.log_tail()}" if server else ""
                raise CommandError(f"{name} exited with code {proc.returncode}{detail}")

    def _banner(
        self, url: str, states: dict[str, str], credentials: tuple[str, str] | None
    ) -> None:
        from dispatch.models import Slot

        lines = ["", f"hal0web is ready: {url}/", ""]
        for slot in Slot.objects.order_by("name").prefetch_related("models"):
            default = next((m.model_id for m in slot.models.all() if m.is_default), "-")
            state = states.get(slot.name, DISABLED if not slot.enabled else UNKNOWN)
            lines.append(f"  slot {slot.name:<14} {state:<8} {slot.url}  default model {default}")
            if slot.name in self.failed:
                lines.append(f"       {'':<14} {self.failed[slot.name]}")
        lines.append("")
        if credentials:
            lines.append(f"  admin: {url}/admin/  user {credentials[0]}  password {credentials[1]}")
            lines.append("         (shown this once; change it in the admin)")
        else:
            lines.append(f"  admin: {url}/admin/")
        model = demo.HERMES.name if settings.HAL0_DEMO else "MODEL"
        sdk_model = demo.PRIMARY.default.id if settings.HAL0_DEMO else "MODEL"
        lines += [
            "",
            "  Try it with curl (the X-Hal0-Slot header says which slot answered):",
            f"    curl -si {url}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f'      -d \'{{"model": "{model}", "max_tokens": 32, "messages":'
            ' [{"role": "user", "content": "What is the capital of France?"}]}\'',
            "",
            "  or with the openai SDK (pip install openai):",
            "    python - <<'EOF'",
            "    from openai import OpenAI",
            f'    client = OpenAI(base_url="{url}/v1", api_key="unused")',
            "    reply = client.chat.completions.create(",
            f'        model="{sdk_model}", max_tokens=32, temperature=0,',
            '        messages=[{"role": "system", "content": "You are a helpful assistant."},',
            '                  {"role": "user", "content": "What is the capital of France?"}],',
            "    )",
            "    print(reply.choices[0].message.content)",
            "    EOF",
            "",
        ]
        if settings.HAL0_DEMO:
            lines += [
                f"  Slot {demo.PRIMARY.name} holds both demo models, one loaded at a time: ask it for",
                f'  "{demo.PRIMARY.name}/{demo.GEMMA.id}" and it swaps {demo.SMOLLM2.id} out'
                " (a second or two).",
                "",
            ]
        lines += [
            "  Ctrl-C stops hal0web" + (" and the model servers." if settings.HAL0_DEMO else "."),
            "",
        ]
        self.say("\n".join(lines))

    def _supervise(self) -> None:
        """Serve until a signal arrives; the ASGI server exiting ends the run, a model server exiting
        is reported (its slot goes offline and hal0web keeps serving the other)."""
        reported: set[int] = set()
        while True:
            time.sleep(0.5)
            for name, proc in self.children:
                if proc.poll() is None or proc.pid in reported:
                    continue
                reported.add(proc.pid)
                server = next((s for s in self.llama if s.proc is proc), None)
                if server is None:
                    raise CommandError(f"{name} exited with code {proc.returncode}")
                self.stderr.write(
                    f"{name} exited with code {proc.returncode}; its slot is offline now. "
                    f"Last lines of {server.log_path}:\n{server.log_tail()}"
                )

    def _stop_children(self) -> None:
        # The ASGI server first, so no request is sent to a model server that is going away.
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                self.step(f"stopping {name} (pid {proc.pid})")
            if name.startswith("hal0web"):
                # Its requests in flight have HAL0_DRAIN_S to finish (see README, Production).
                demo.stop_process(proc, settings.HAL0_DRAIN_S + SERVER_STOP_GRACE_S)
            else:
                demo.stop_process(proc)
        if self.children:
            self.step("all stopped")
        self.children.clear()


def _demo_ports() -> dict[str, int]:
    return {
        demo.PRIMARY.name: settings.HAL0_DEMO_PRIMARY_PORT,
        demo.HERMES.name: settings.HAL0_DEMO_HERMES_PORT,
    }


def _static_fingerprint() -> str:
    """A digest of every static source file's path, size and mtime."""
    digest = hashlib.sha256()
    for finder in get_finders():
        for path, storage in finder.list([]):
            full = storage.path(path)
            st = Path(full).stat()
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest() + "\n"
