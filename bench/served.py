"""``python -m bench served [REV]``: instructions per request of the whole server process.

The figure issue 23 asks for, the one that does not swing: a real server (Uvicorn configured
as ``make run`` starts it, with the clock's work kept out: bench/quiet_server.py) runs under
callgrind and answers real HTTP requests over loopback,
one at a time, from the fake upstream (bench/fake.py, not measured). After a warm-up the
counters are zeroed, N requests are sent and the counters dumped (``callgrind_control``):
the dump over N is one request's instructions, everything the process did for it counted,
every thread (the log and request-log writers too) and the server's own HTTP parsing.
What runs on a clock whatever the load (Uvicorn's tick, the follower's version check, the
watcher) is measured over an idle window first and taken out by the window's length.

The minimal Starlette + aiohttp proxy (bench/minimal.py) is measured the same way, under
the same Uvicorn command line: hal0web's figures are set against it. So is the floor under
it (``floor``, bench/bare_proxy.py: the same proxy as a raw ASGI app, Uvicorn and aiohttp
alone): what any proxy on this stack pays before doing anything of its own.

Cases: ``chat`` (non-streaming), ``stream32`` (32 events, each its own read), ``404`` (a
model no slot serves: answered by hal0web itself), ``key`` (chat with an API key, keys
required), ``logged`` (chat with the per-request log line at INFO, to a file), ``bare``
(chat with /metrics and the request log switched off: what the two cost). Metrics and the
request log are on in every other case (the defaults).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.fake import ack
from bench.procs import ROOT, Proc, Workspace, fake_proc, free_port

CHAT = b'{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}'
STREAM = b'{"model":"bench-model","stream":true,"messages":[{"role":"user","content":"hi"}]}'
UNKNOWN = b'{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}'
CHUNKS = 32
WARM = 30
IDLE_S = 4.0


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    status: int
    requests: int
    headers: dict[str, str] = field(default_factory=dict)


CASES = {
    "chat": Case("chat", CHAT, 200, 300),
    "stream32": Case(
        "stream32",
        STREAM,
        200,
        30,
        # Lockstep: the fake sends each next event once this client has the last, so each
        # is its own read in the server under test however slow callgrind makes it (a fixed
        # gap let events share a read now and then: the figure swung by 3 %, and by a
        # quarter on a loaded machine).
        {"X-Bench-Chunks": str(CHUNKS + 1), "X-Bench-Lockstep": "1"},
    ),
    "404": Case("404", UNKNOWN, 404, 300),
    "key": Case("key", CHAT, 200, 300),
    "logged": Case("logged", CHAT, 200, 300),
    "bare": Case("bare", CHAT, 200, 300),
}

# Which server configuration each case runs in (one server start per configuration).
CONFIGS: dict[str, tuple[str, ...]] = {
    "floor": ("chat", "stream32"),
    "minimal": ("chat", "stream32"),
    "hal0web": ("chat", "stream32", "404"),
    "hal0web+logged": ("logged",),
    "hal0web+bare": ("bare",),
    # Last: once a key exists in the workspace's database, every later copy requires keys.
    "hal0web+key": ("key",),
}

# The servers hal0web is held against, by configuration: the minimal Starlette + aiohttp
# proxy (the issue's yardstick), and the floor under it, the same proxy as a raw ASGI app
# (Uvicorn and aiohttp alone).
YARDSTICKS = {"floor": "bench.bare_proxy:app", "minimal": "bench.minimal:app"}


@dataclass
class Measured:
    per_request: dict[str, float] = field(default_factory=dict)  # every thread
    main_thread: dict[str, float] = field(default_factory=dict)  # the event loop's alone


class _Callgrind:
    """A process under callgrind, its counters zeroed and dumped on request."""

    def __init__(self, proc: Proc, out: Path) -> None:
        self.proc, self.out, self.dumps = proc, out, 0

    def _control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.proc.pid)], check=True, capture_output=True
        )

    def zero(self) -> None:
        self._control("--zero")

    def dump(self) -> tuple[int, int]:
        """(every thread's instructions, the main thread's) since the last zero."""
        self._control("--dump")
        self.dumps += 1
        files = list(self.out.glob(f"cg.{self.proc.pid}.{self.dumps}-*"))
        deadline = time.monotonic() + 30
        while not files and time.monotonic() < deadline:
            time.sleep(0.1)
            files = list(self.out.glob(f"cg.{self.proc.pid}.{self.dumps}-*"))
        total = main = 0
        threads = {}
        for path in files:
            count = _totals(path)
            total += count
            threads[path.name.rsplit("-", 1)[1]] = count
            if path.name.endswith("-01"):
                main = count
        if os.environ.get("BENCH_THREADS"):
            print(f"    threads: {sorted(threads.items())}", file=sys.stderr)
        return total, main


def _totals(path: Path) -> int:
    for _ in range(100):
        for line in path.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        time.sleep(0.05)  # still being written
    raise RuntimeError(f"callgrind wrote no totals to {path}")


def _request(conn: http.client.HTTPConnection, case: Case, auth: str | None, ack_port: int) -> None:
    headers = {"Content-Type": "application/json", **case.headers}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    conn.request("POST", "/v1/chat/completions", case.body, headers)
    response = conn.getresponse()
    body = _read_acking(response, ack_port) if case.name == "stream32" else response.read()
    if response.status != case.status:
        raise RuntimeError(f"{case.name}: answered {response.status}, not {case.status}: {body!r}")
    if case.name == "stream32" and body.count(b"data:") != CHUNKS + 1:
        raise RuntimeError(f"stream32: {body.count(b'data:')} events, not {CHUNKS + 1}")


def _read_acking(response: http.client.HTTPResponse, ack_port: int) -> bytes:
    """A lockstep stream read whole, each complete event acknowledged to the fake."""
    body = b""
    acked = 0
    while part := response.read1(65536):
        body += part
        # Every event but [DONE] is followed by one the fake holds back for this word.
        for _ in range(min(body.count(b"\n\n"), CHUNKS) - acked):
            ack(ack_port)
            acked += 1
    return body


class _RequestLog:
    """The server's request log, written when told (bench/quiet_server.py): each run of
    requests' rows in one go, the same batches every time."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.sent = 0  # requests so far: one row each

    def write(self) -> None:
        if self.proc.database is None or self.proc.extra_env.get("HAL0_REQUEST_LOG") == "false":
            return  # the minimal proxy keeps no log, nor does hal0web with it switched off
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 120
        while True:
            # The database is looked into only once its files have stood still a while: a
            # reader's lock meeting the writer's commit would send the writer into SQLite's
            # busy-wait, whose retries callgrind would count.
            self._still()
            if self._rows() >= self.sent:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.proc.name}: {self._rows()} rows of {self.sent}")

    def _still(self, quiet_s: float = 1.5) -> None:
        assert self.proc.database is not None
        db = self.proc.database[1]
        files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-journal")]

        def stamp() -> tuple[float, ...]:
            return tuple(f.stat().st_mtime if f.exists() else 0.0 for f in files)

        last, since = stamp(), time.monotonic()
        while time.monotonic() - since < quiet_s:
            time.sleep(0.1)
            now = stamp()
            if now != last:
                last, since = now, time.monotonic()

    def _rows(self) -> int:
        assert self.proc.database is not None
        with sqlite3.connect(self.proc.database[1], timeout=30) as db:
            return int(db.execute("SELECT count(*) FROM dispatch_requestlog").fetchone()[0])


def _measure(
    proc: Proc, cg: _Callgrind, cases: tuple[str, ...], auth: str | None, ack_port: int
) -> Measured:
    conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=120)
    got = Measured()
    log = _RequestLog(proc)
    # The clock's share: what the process does per second with no request at all.
    cg.zero()
    started = time.monotonic()
    time.sleep(IDLE_S)
    idle_total, idle_main = cg.dump()
    idle_s = time.monotonic() - started
    for name in cases:
        case = CASES[name]
        for _ in range(WARM):
            _request(conn, case, auth, ack_port)
        log.sent += WARM
        log.write()
        print(f"  {proc.name}: {name} x {case.requests} ...", file=sys.stderr, flush=True)
        cg.zero()
        started = time.monotonic()
        for _ in range(case.requests):
            _request(conn, case, auth, ack_port)
        log.sent += case.requests
        log.write()
        total, main = cg.dump()
        took = time.monotonic() - started
        got.per_request[name] = (total - idle_total * took / idle_s) / case.requests
        got.main_thread[name] = (main - idle_main * took / idle_s) / case.requests
    conn.close()
    return got


def _server(ws: Workspace, config: str, tree: Path, fake: Proc, out: Path) -> Proc:
    port = free_port()
    app = YARDSTICKS.get(config, "hal0web.asgi:application")
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        f"--callgrind-out-file={out}/cg.%p",
    ]
    argv = [sys.executable, "-m", "bench.quiet_server", app, str(port)]
    proc = ws.server(config, [*valgrind, *argv], port)
    proc.cwd = tree
    proc.extra_env.update(
        PYTHONPATH=str(tree),
        PYTHONHASHSEED="0",
        BENCH_UPSTREAM=fake.base + "/v1",
        HAL0_WATCHER="false",  # no probes: the slot stays as set up, ready
    )
    if config in YARDSTICKS:
        proc.database = None
    if config == "hal0web+key":
        proc.extra_env["HAL0_API_AUTH"] = "required"
    if config == "hal0web+logged":
        proc.extra_env["HAL0_LOG_LEVEL"] = "INFO"
    if config == "hal0web+bare":
        proc.extra_env.update(HAL0_METRICS="false", HAL0_REQUEST_LOG="false")
    return proc


def _issue_key(ws: Workspace) -> str:
    """A key for the keyed configuration (made in the workspace's database, copied to it)."""
    out = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            "from dispatch.models import ApiKey\nprint(ApiKey.issue('bench')[1])",
        ],
        env=ws.env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def measure(tree: Path = ROOT, configs: tuple[str, ...] = tuple(CONFIGS)) -> dict[str, Measured]:
    ws = Workspace()
    fake = fake_proc(ws)
    results: dict[str, Measured] = {}
    try:
        fake.start()
        fake.wait_http("/v1/models")
        ws.setup(fake.port)
        key = None
        for config in sorted(configs, key=list(CONFIGS).index):
            if config == "hal0web+key":
                key = _issue_key(ws)
            with tempfile.TemporaryDirectory(prefix="hal0-cg-") as tmp:
                out = Path(tmp)
                proc = _server(ws, config, tree, fake, out)
                if config in YARDSTICKS:
                    proc.ready_path = "/nothing-here"
                proc.start()
                try:
                    _wait(proc)
                    results[config] = _measure(
                        proc, _Callgrind(proc, out), CONFIGS[config], key, fake.port
                    )
                finally:
                    proc.stop()
    finally:
        fake.stop()
        ws.cleanup()
    return results


def _wait(proc: Proc, timeout: float = 300.0) -> None:
    """Up when it answers HTTP at all (start-up under callgrind takes a minute)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen is not None and proc.popen.poll() is not None:
            break
        try:
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
            conn.request("GET", "/" if proc.name in YARDSTICKS else "/v1/models")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{proc.name} did not come up; log:\n{proc.log_tail()}")


def figures(results: dict[str, Measured]) -> dict[str, float]:
    """Flat ``config/case`` -> instructions per request (every thread)."""
    return {f"{c}/{k}": v for c, m in results.items() for k, v in m.per_request.items()}


def report(results: dict[str, Measured], label: str) -> str:
    minimal = results.get("minimal")
    lines = [
        f"# hal0web: instructions per request, the whole server process ({label})",
        "",
        "callgrind, Uvicorn (httptools, uvloop) configured as `make run` starts it "
        "(bench/quiet_server.py), requests one at a time over loopback from bench/fake.py; "
        "every thread counted, the idle clock's share taken out (bench/served.py).",
        "",
        "| server | case | instructions / request | event loop thread | vs minimal proxy |",
        "|---|---|---|---|---|",
    ]
    for config, m in results.items():
        for case, value in m.per_request.items():
            base = minimal.per_request.get(_yardstick(case)) if minimal else None
            ratio = f"{value / base:.2f}x" if base else ""
            lines.append(
                f"| {config} | {case} | {value:,.0f} | {m.main_thread[case]:,.0f} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def _yardstick(case: str) -> str:
    """The minimal proxy's case a hal0web case is held to (it has no 404, keys or log)."""
    return "stream32" if case == "stream32" else "chat"


def main(argv: list[str]) -> str:
    configs = tuple(argv) or tuple(CONFIGS)
    results = measure(ROOT, configs)
    print(json.dumps(figures(results)), file=sys.stderr)
    label = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return report(results, label)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    print(main(sys.argv[1:]))
