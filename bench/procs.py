"""Subprocesses of a bench run: the fake upstream and hal0web servers, pinned to cores.

Also the set-up of a throwaway hal0web data directory (migrate, one slot at the fake) and
what /proc says about a process: resident memory and CPU time.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(PY).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# The fake and the load generator share one core; hal0web gets the other to itself.
LOAD_CORE = 0
HAL0_CORE = 1
SLOT = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile() -> None:
    # 2,000 held streams need ~4,000 descriptors in hal0web (client side + upstream side).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    core: int | str  # taskset's CPU list: one core, or several ("0,1": bench/workers.py)
    port: int
    log_path: Path
    ready_path: str = "/v1/models"
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    extra_env: dict[str, str] = field(default_factory=dict)
    database: tuple[Path, Path] | None = None  # (the workspace's, this process's own copy)
    database_sql: str = ""  # run on this process's copy before it starts (a variant's setting)
    cwd: Path = ROOT  # another checkout's code (bench/commits.py) runs from its own tree

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        if self.database is not None:
            # SQLite's backup API: the file alone may lack what still sits in its WAL.
            src, dst = (sqlite3.connect(path) for path in self.database)
            with src, dst:
                src.backup(dst)
                if self.database_sql:
                    dst.executescript(self.database_sql)  # one statement or several
            src.close()
            dst.close()
        # The child writes to its own copy of the descriptor: ours is closed once it runs.
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                ["taskset", "-c", str(self.core), *self.argv],
                env={**self.env, **self.extra_env},
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile,
            )

    def wait_http(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.base + path, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not come up ({last}); log:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE / 1e6

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process and every process under it: a server
        that runs its workers as child processes (Granian, Uvicorn's --workers) counts
        them all, the supervisor included."""
        return sum(self.cpu_by_pid().values())

    def cpu_by_pid(self) -> dict[int, float]:
        """CPU seconds of each live process of the tree (the server's pid first)."""
        out: dict[int, float] = {}
        for pid in tree_pids(self.pid):
            stat = _stat(pid)
            if stat is not None:
                out[pid] = (int(stat[11]) + int(stat[12])) / CLK_TCK
        return out

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (which may hold spaces): state is
    [0], ppid [1], utime [11], stime [12]; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants, root first (a scan of /proc: children by parent)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, ())))
    return out


def affinity(pid: int) -> str:
    """The cores a process may run on, as taskset writes them (``1``, ``0-1``)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


class Workspace:
    """A temp HAL0_DATA_DIR with a migrated database and one slot pointing at the fake."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hal0-bench-"))
        self.env = {
            **os.environ,
            "HAL0_DATA_DIR": str(self.dir),
            "HAL0_LOG_LEVEL": "WARNING",  # one log line per request would dominate the figures
            "DJANGO_SETTINGS_MODULE": "hal0web.settings",
            "PYTHONUNBUFFERED": "1",
            "DEBUG": "0",
        }
        for name in ("DATABASE_URL", "REDIS_URL", "HAL0_FALLBACK_SLOT", "HAL0_ENV_FILE"):
            self.env.pop(name, None)
        self.env["HAL0_ENV_FILE"] = str(self.dir / "no.env")

    def manage(self, *args: str) -> None:
        subprocess.run(
            [PY, "manage.py", *args], env=self.env, cwd=ROOT, check=True, capture_output=True
        )

    def setup(self, fake_port: int) -> None:
        self.manage("migrate", "-v0")
        self.manage(
            "shell",
            "-c",
            "from dispatch.models import Slot, SlotModel\n"
            f"s = Slot.objects.create(name={SLOT!r}, url='http://127.0.0.1:{fake_port}/v1', "
            "kind='openai', is_default=True, state='ready')\n"
            "SlotModel.objects.create(slot=s, model_id='bench-model', is_default=True)\n",
        )

    def proc(self, name: str, argv: list[str], core: int | str, port: int) -> Proc:
        return Proc(name, argv, self.env, core, port, self.dir / f"{name}.log")

    def server(self, name: str, argv: list[str], port: int) -> Proc:
        """A hal0web server process. SQLite serves one server process (dispatch.coordination.leases), so
        each gets its own copy of the database, made when it starts, after setup()."""
        # Only [a-z0-9-] in the file name: a URL's "+" would be read as a space.
        db = self.dir / (re.sub(r"[^a-z0-9-]", "-", name.lower()) + ".sqlite3")
        proc = self.proc(name, argv, HAL0_CORE, port)
        proc.extra_env = {"DATABASE_URL": f"sqlite:///{db}"}
        proc.database = (self.dir / "hal0web.sqlite3", db)
        return proc

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def fake_proc(ws: Workspace) -> Proc:
    port = free_port()
    return ws.proc("fake", [PY, "-m", "bench.fake", str(port)], LOAD_CORE, port)


def daphne_proc(ws: Workspace, name: str = "daphne") -> Proc:
    return _server_proc(ws, "daphne", name)


def uvicorn_proc(ws: Workspace, name: str = "uvicorn") -> Proc:
    return _server_proc(ws, "uvicorn", name)


def _server_proc(ws: Workspace, server: str, name: str) -> Proc:
    """hal0web as `make run` starts it (the same command line, minus Daphne's access log, as
    Uvicorn runs without one), pinned to its core."""
    from dispatch.management.commands.serve import server_command

    port = free_port()
    argv = server_command(server, "127.0.0.1", port, access_log=None)
    return ws.server(name, argv, port)


def floor_proc(ws: Workspace) -> Proc:
    """Bare Django views under Uvicorn (bench.floor): the floor hal0web is compared with."""
    port = free_port()
    argv = [
        str(BIN / "uvicorn"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
        "--lifespan",
        "off",
        "--backlog",
        "4096",
        "bench.floor:application",
    ]
    proc = ws.proc("floor", argv, HAL0_CORE, port)
    proc.ready_path = "/const/v1/chat/completions"
    return proc


def variant_proc(ws: Workspace, transport: str) -> Proc:
    """hal0web under Uvicorn with a named transport forced at the seam (bench.serve)."""
    port = free_port()
    argv = [PY, "-m", "bench.serve", transport, str(port)]
    return ws.server(f"uvicorn+{transport}", argv, port)
