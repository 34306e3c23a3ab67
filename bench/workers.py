"""``python -m bench workers``: hal0web with two Uvicorn workers against one, the production
shape (PostgreSQL + Redis).

Issue 23: "2 workers on PostgreSQL + Redis serve >= 1.7x one worker's C=64 throughput with
the load generator outside both cores' budget (or report the ratio per core used)". This
machine has two cores and the load generator and the fake upstream need one of them, so
both are reported: the wall-clock ratio, and the CPU-normalised one (requests per
CPU-second of the hal0web processes, every worker and the supervisor summed, from /proc).

Both deployments run the line of deploy/Procfile (``python -m hal0web.server
hal0web.asgi:application --workers N --loop uvloop --http httptools --backlog 4096
--no-access-log``: Uvicorn's command line, see hal0web/server.py), each on its
own throwaway PostgreSQL database (one migrated, the other made from it as a template, both
dropped at the end) and its own empty Redis database (flushed at the end), so the two do not
form one cluster. The fake upstream and this driver (the load generator) run on core 0; one
worker is pinned to core 1; two workers may run on cores 0 and 1 (``taskset -c 0,1``, i.e.
unpinned on this machine) and so share core 0 with the load generator. Cells at 64
concurrent, interleaved round by round with ``direct`` (the load generator against the fake)
and with one worker of the embedded default (SQLite, no Redis, core 1): what the production
shape's stores cost a worker. PostgreSQL's and Redis's own CPU, the Redis commands and the
PostgreSQL transactions per request, and what other work on the machine took from each cell
(/proc/stat) are reported beside. The report goes to ``bench/results/workers.md``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import time
from dataclasses import dataclass

import psycopg
import redis

from bench import load
from bench.__main__ import Report, _loadavg, fmt, pct, versions
from bench.procs import (
    BIN,
    CLK_TCK,
    HAL0_CORE,
    LOAD_CORE,
    PY,
    Proc,
    Workspace,
    affinity,
    fake_proc,
    free_port,
    tree_pids,
)

PG_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/test"  # tests/conftest.py's
PG_BASE = "postgres://postgres@127.0.0.1:5432/"
REDIS_BASE = "redis://127.0.0.1:6379/"
CONC = 64
CELL_S = 5.0
ROUNDS = 7
WARM_S = 3.0
TARGET = 1.7
ONE, TWO, SQLITE = "1-worker", "2-workers", "1-worker-sqlite"


@dataclass
class Deployment:
    name: str
    workers: int
    cores: str  # taskset's list
    proc: Proc | None  # None: direct, the fake itself
    database: str | None = None  # its PostgreSQL database (None: SQLite, or direct)
    stores: str = ""  # where its state lives, for the report


@dataclass
class WCell:
    rps: float
    p50: float
    p99: float
    errors: int
    answered: int  # every answered request, warm-up included: what the CPU was spent on
    wall_s: float
    cpu_by_pid: dict[int, float]  # the deployment's processes
    load_cpu_s: float  # the driver (load generator) and the fake upstream
    services_cpu_s: float  # every postgres and redis-server process (shared with others)
    redis_calls: dict[str, int]  # Redis commands by name (server-wide counters)
    pg: tuple[int, int, int]  # the deployment's database: commits, rows inserted, updated
    busy_s: float  # CPU seconds the whole machine spent on anything (/proc/stat)

    @property
    def others_cores(self) -> float:
        """What neither this deployment, the load generator, the fake, PostgreSQL nor Redis
        used: other work on the machine, which takes cores from the cell."""
        ours = self.cpu_s + self.load_cpu_s + self.services_cpu_s
        return max(0.0, self.busy_s - ours) / self.wall_s

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_by_pid.values())

    @property
    def cores(self) -> float:
        return self.cpu_s / self.wall_s

    @property
    def cpu_s_per_req(self) -> float:
        return self.cpu_s / self.answered if self.answered else float("nan")

    @property
    def per_cpu_s(self) -> float:
        """Requests per CPU-second of the hal0web processes."""
        return self.answered / self.cpu_s if self.cpu_s else float("nan")


def machine_busy_s() -> float:
    """CPU seconds every core has spent busy since boot (not idle, not waiting on I/O)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK  # without guest (in user)


def _self_cpu_s() -> float:
    return time.process_time()  # every thread of this process: user + system


class Services:
    """What PostgreSQL and Redis do for a cell: CPU of their processes, Redis's command
    counters (server-wide: another user of this Redis adds to them), and the deployment's
    own database's transaction and row counters (PostgreSQL publishes a backend's counters
    within about a second of its transactions)."""

    def __init__(self, admin: psycopg.Connection) -> None:
        self.admin = admin
        self.redis = redis.Redis.from_url(REDIS_BASE + "0")

    def close(self) -> None:
        self.redis.close()

    def cpu_s(self) -> float:
        total = 0.0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/comm") as fh:
                    if fh.read().strip() not in ("postgres", "redis-server"):
                        continue
                with open(f"/proc/{entry.name}/stat") as fh:
                    rest = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(rest[11]) + int(rest[12])) / CLK_TCK
        return total

    def redis_calls(self) -> dict[str, int]:
        stats = self.redis.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    def pg(self, db: str | None) -> tuple[int, int, int]:
        if db is None:
            return (0, 0, 0)
        row = self.admin.execute(
            "SELECT xact_commit, tup_inserted, tup_updated FROM pg_stat_database "
            "WHERE datname = %s",
            (db,),
        ).fetchone()
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)


async def measure(d: Deployment, fake: Proc, svc: Services) -> WCell:
    before = d.proc.cpu_by_pid() if d.proc else {}
    load0 = _self_cpu_s() + fake.cpu_s()
    svc0, calls0, pg0 = svc.cpu_s(), svc.redis_calls(), svc.pg(d.database)
    busy0 = machine_busy_s()
    t0 = time.monotonic()
    base = d.proc.base if d.proc else fake.base
    r = await load.closed_loop(base, CONC, CELL_S)
    wall = time.monotonic() - t0
    load1 = _self_cpu_s() + fake.cpu_s()
    after = d.proc.cpu_by_pid() if d.proc else {}
    svc1, calls1 = svc.cpu_s(), svc.redis_calls()
    busy1 = machine_busy_s()
    await asyncio.sleep(1.2)  # PostgreSQL's counters catch up (then the next cell starts)
    pg1 = svc.pg(d.database)
    cpu = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    calls = {k: n - calls0.get(k, 0) for k, n in calls1.items() if n > calls0.get(k, 0)}
    pg = (pg1[0] - pg0[0], pg1[1] - pg0[1], pg1[2] - pg0[2])
    lat = r.latencies_ms
    return WCell(
        r.rps,
        pct(lat, 0.5),
        pct(lat, 0.99),
        r.errors,
        r.total,
        wall,
        cpu,
        load1 - load0,
        svc1 - svc0,
        calls,
        pg,
        busy1 - busy0,
    )


def _argv(workers: int, port: int) -> list[str]:
    from dispatch.management.commands.serve import server_command

    # deploy/Procfile's line: serve's Uvicorn command with --workers N.
    return [
        *server_command("uvicorn", "127.0.0.1", port, access_log=None),
        "--workers",
        str(workers),
    ]


def role(pid: int, root: int, workers: int) -> str:
    """What a process of a deployment is: Uvicorn's --workers N spawns each worker with
    multiprocessing (``spawn_main``), which may start its resource tracker too."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return "gone"
    if b"resource_tracker" in cmdline:
        return "tracker"
    if pid == root:
        return "supervisor" if workers > 1 else "worker"
    return "worker" if b"spawn_main" in cmdline else "other"


def _free_redis_dbs(n: int) -> list[int]:
    """``n`` Redis databases that hold no key now (tests pick theirs at random in 1-15;
    start from the top, where they are least likely to meet one of ours)."""
    found = []
    for db in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_BASE}{db}")
        try:
            if client.dbsize() == 0:
                found.append(db)
        finally:
            client.close()
        if len(found) == n:
            return found
    raise RuntimeError("no free Redis database")


def _flush(db: int) -> None:
    client = redis.Redis.from_url(f"{REDIS_BASE}{db}")
    try:
        client.flushdb()
    finally:
        client.close()


def _median(cs: list[WCell], attr: str) -> float:
    return statistics.median(getattr(c, attr) for c in cs)


def _report(
    rep: Report,
    deps: list[Deployment],
    cells: dict[str, list[WCell]],
) -> None:
    rows = []
    for d in deps:
        cs = cells[d.name]
        is_direct = d.proc is None
        pids = list(cs[0].cpu_by_pid)
        each = " + ".join(
            fmt(statistics.median(c.cpu_by_pid.get(pid, 0.0) / c.wall_s for c in cs), 2)
            + f" {role(pid, pids[0], d.workers)}"
            for pid in pids
        )
        rows.append(
            [
                d.name,
                d.cores,
                fmt(_median(cs, "rps"), 0),
                fmt(_median(cs, "p50"), 2),
                fmt(_median(cs, "p99"), 2),
                str(sum(c.errors for c in cs)),
                "" if is_direct else fmt(_median(cs, "cores"), 2) + f" ({each})",
                fmt(statistics.median(c.load_cpu_s / c.wall_s for c in cs), 2),
                fmt(_median(cs, "others_cores"), 2),
                "" if is_direct else fmt(_median(cs, "per_cpu_s"), 0),
                "" if is_direct else fmt(statistics.median(1000 / c.per_cpu_s for c in cs), 3),
            ]
        )
    rep.add(
        f"### {CONC} concurrent non-streaming chat completions ({ROUNDS} interleaved rounds, "
        f"{CELL_S:g} s cells after a 0.5 s warm-up; medians over the rounds)",
        "",
    )
    rep.table(
        [
            "target",
            "allowed cores",
            "rps",
            "p50 ms",
            "p99 ms",
            "errors",
            "hal0web cores used (per process)",
            "load generator + fake cores used",
            "other work's cores used",
            "requests per hal0web CPU-second",
            "CPU ms/req",
        ],
        rows,
    )
    rep.add(
        "Cores used = CPU seconds (user + system, /proc/PID/stat) over the cell's wall time "
        "(warm-up included). `other work` is the machine's busy time (/proc/stat) less "
        "hal0web's, the load generator's, the fake's, PostgreSQL's and Redis's: what the "
        "rest of the machine took from the cell. Requests per CPU-second count every answered "
        "request, warm-up included, over the CPU of all the deployment's processes.",
        "",
    )
    rows = []
    for d in deps[1:]:
        cs = cells[d.name]
        per = statistics.median(c.answered for c in cs)
        calls: dict[str, float] = {}
        for c in cs:
            for k, n in c.redis_calls.items():
                calls[k] = calls.get(k, 0.0) + n / c.answered / len(cs)
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:4]
        rows.append(
            [
                d.name,
                fmt(statistics.median(c.services_cpu_s / c.wall_s for c in cs), 2),
                fmt(statistics.median(c.services_cpu_s * 1000 / c.answered for c in cs), 3),
                fmt(sum(calls.values()), 2)
                + " ("
                + ", ".join(f"{k} {v:.2f}" for k, v in top)
                + ")",
                " / ".join(
                    fmt(statistics.median(c.pg[i] / c.answered for c in cs), 3) for i in range(3)
                ),
                fmt(per, 0),
            ]
        )
    rep.add(
        "What PostgreSQL and Redis did meanwhile (means and medians over the same cells; "
        "their CPU is every `postgres` and `redis-server` process's, which other users of "
        "the two servers on this machine add to, as they add to Redis's command counters):",
        "",
    )
    rep.table(
        [
            "deployment",
            "PostgreSQL + Redis cores used",
            "their CPU ms/req",
            "Redis commands per request (top ones)",
            "PG commits / rows inserted / rows updated per request",
            "requests per cell",
        ],
        rows,
    )
    one, two, embedded = cells[ONE], cells[TWO], cells[SQLITE]
    per_round = [b.rps / a.rps for a, b in zip(one, two, strict=True)]
    wall = statistics.median(per_round)
    of_medians = _median(two, "rps") / _median(one, "rps")
    eff = _median(two, "per_cpu_s") / _median(one, "per_cpu_s")
    one_cores, two_cores = _median(one, "cores"), _median(two, "cores")
    # Each worker with a core to itself, at the CPU per request measured with two: what two
    # cores would serve against what one worker's core serves at its own measured cost.
    projected = 2 * eff
    shape = _median(one, "cpu_s_per_req") / _median(embedded, "cpu_s_per_req")

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    rep.add("### Two workers against one", "")
    rep.table(
        ["figure", "measured", f"holds (>= {TARGET}x)"],
        [
            [
                "rps(2) / rps(1), wall clock (median of the per-round ratios)",
                f"{wall:.2f}x (rounds: " + ", ".join(f"{x:.2f}" for x in per_round) + ")",
                yes(wall >= TARGET),
            ],
            [
                "rps(2) / rps(1), the medians' ratio",
                f"{of_medians:.2f}x",
                yes(of_medians >= TARGET),
            ],
            [
                "cores used by hal0web, 2 workers / 1 worker",
                f"{two_cores:.2f} / {one_cores:.2f}",
                "",
            ],
            [
                "requests per hal0web CPU-second, 2 workers / 1 worker",
                f"{eff:.2f}x",
                "",
            ],
            [
                "CPU-normalised: 2 x requests per CPU-second of 2 workers / that of 1 "
                "(two cores of their own, the load generator outside)",
                f"{projected:.2f}x",
                yes(projected >= TARGET),
            ],
            [
                "one worker's CPU per request, PostgreSQL + Redis / SQLite without Redis "
                "(hal0web's own processes only)",
                f"{shape:.2f}x",
                "",
            ],
        ],
    )
    rep.add(
        "The wall-clock ratio cannot reach 2x here: the two workers share the machine's two "
        "cores with the load generator and the fake, whose share the table shows. The "
        "CPU-normalised ratio assumes the work per request stays what it was measured at "
        "with two workers, each on a core of its own.",
        "",
    )


async def run() -> str:
    started = time.time()
    rep = Report()
    ws = Workspace()
    fake = fake_proc(ws)
    stem = f"hal0_bench_{secrets.token_hex(4)}"
    dbs = [f"{stem}_1w", f"{stem}_2w"]
    redis_dbs = _free_redis_dbs(2)
    admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    deps: list[Deployment] = []
    created: list[str] = []
    try:
        fake.start()
        fake.wait_http("/v1/models")
        admin.execute(f'CREATE DATABASE "{dbs[0]}"')
        created.append(dbs[0])
        # The embedded default first (SQLite in the workspace, copied for its server), for
        # what PostgreSQL + Redis cost one worker; then the production shape's database.
        ws.setup(fake.port)  # migrate, one slot `bench` at the fake
        ws.env["DATABASE_URL"] = PG_BASE + dbs[0]
        ws.setup(fake.port)
        # A copy of the migrated database for the other deployment (no connection is open).
        admin.execute(f'CREATE DATABASE "{dbs[1]}" TEMPLATE "{dbs[0]}"')
        created.append(dbs[1])
        deps = [Deployment("direct", 0, str(LOAD_CORE), None)]
        for i, (workers, cores) in enumerate(((1, str(HAL0_CORE)), (2, "0,1"))):
            port = free_port()
            name = ONE if workers == 1 else TWO
            proc = ws.proc(name, _argv(workers, port), cores, port)
            redis_url = f"{REDIS_BASE}{redis_dbs[i]}"
            proc.extra_env.update(DATABASE_URL=PG_BASE + dbs[i], REDIS_URL=redis_url)
            stores = f"PostgreSQL `{dbs[i]}`, Redis db {redis_dbs[i]}"
            deps.append(Deployment(name, workers, cores, proc, dbs[i], stores))
        port = free_port()
        embedded = ws.server(SQLITE, _argv(1, port), port)  # its own copy of the SQLite file
        deps.append(Deployment(SQLITE, 1, str(HAL0_CORE), embedded, None, "SQLite, no Redis"))
        for d in deps[1:]:
            assert d.proc is not None
            d.proc.start()
        for d in deps[1:]:
            assert d.proc is not None
            d.proc.wait_http("/v1/models")
            # Every worker up and warm (the first to answer is not all of them).
            await load.closed_loop(d.proc.base, CONC, WARM_S, warmup_s=0.0)
        _header(rep, started, deps, fake)
        cells: dict[str, list[WCell]] = {}
        svc = Services(admin)
        try:
            for rnd in range(ROUNDS):
                k = rnd % len(deps)
                for d in deps[k:] + deps[:k]:
                    cells.setdefault(d.name, []).append(await measure(d, fake, svc))
        finally:
            svc.close()
        _report(rep, deps, cells)
        for d in deps[1:]:
            assert d.proc is not None
            pids = tree_pids(d.proc.pid)
            workers = sum(1 for pid in pids if role(pid, d.proc.pid, d.workers) == "worker")
            if d.proc.popen is not None and d.proc.popen.poll() is not None:
                rep.add(f"**{d.name} exited during the run.**", "")
            elif workers < d.workers:
                rep.add(f"**{d.name}: only {workers} worker processes at the end.**", "")
        rep.add(
            f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}."
        )
    finally:
        for d in deps:
            if d.proc is not None:
                d.proc.stop()
        fake.stop()
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        for db in redis_dbs:
            _flush(db)
        ws.cleanup()
    return rep.text()


def _header(
    rep: Report,
    started: float,
    deps: list[Deployment],
    fake: Proc,
) -> None:
    rep.add(
        "# hal0web: two Uvicorn workers against one (PostgreSQL + Redis)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))} "
        f"(`python -m bench workers`); {versions()}.",
        "",
        f"The fake upstream (pid {fake.pid}) and this driver, the load generator (aiohttp "
        f"client on uvloop, closed loop), on core {LOAD_CORE}. One worker pinned to core "
        f"{HAL0_CORE} (so is the SQLite one); two workers allowed on cores 0 and 1 (`taskset -c 0,1`: unpinned on this "
        "2-core machine, sharing core 0 with the load generator). HAL0_LOG_LEVEL=WARNING, "
        "metrics and the request log on (the defaults), the slot watcher in every worker "
        "(deploy/Procfile). Load average at start: " + _loadavg() + ".",
        "",
    )
    rows = []
    for d in deps[1:]:
        assert d.proc is not None
        pids = tree_pids(d.proc.pid)
        rows.append(
            [
                d.name,
                ", ".join(
                    f"{pid} {role(pid, pids[0], d.workers)} (cores {affinity(pid)})" for pid in pids
                ),
                d.stores,
                "`" + " ".join(d.proc.argv).replace(PY, "python").replace(f"{BIN}/", "") + "`",
            ]
        )
    rep.table(["deployment", "processes (allowed cores)", "databases", "command line"], rows)
