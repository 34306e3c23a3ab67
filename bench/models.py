"""``python -m bench models``: models on demand in front of llama.cpp's own router (issue 21).

llama.cpp's ``llama-server`` in router mode (``--models-max 1``: one model loaded at a time;
one thread per model server) over a directory of the demo's two tiny GGUF models, on core 0
with the load generator; hal0web under Uvicorn on core 1 with one slot on the router, its
models and their load states learned by the watcher as in ``make run``. Measured:

1. **Load asked -> first token.** A streaming chat for a model the router has not loaded,
   sent through hal0web (which asks ``POST /models/load``, waits for the router to say it
   is loaded, then forwards) and sent to the router itself (which loads on its own:
   autoload), from the same state each time: nothing loaded (``cold``), or the other model
   loaded (``swap``: one unload first). Rounds interleaved, the order of the two targets
   alternating; medians.
2. **Swaps.** Interleaved workloads through hal0web, from nothing loaded: ``A B A A C``
   sent 0.3 s apart (each its own stream), and 20 requests over three models by 3
   closed-loop workers, where requests for the loaded model keep arriving while another is
   wanted; once with ``HAL0_SWAP_HOLD_S`` at its default (10 s: a busy model finishes its
   requests before it is swapped out) and once at 0 (no hold). Loads are counted by
   hal0web (``hal0_model_loads_total``) and by the router itself (its ``/models/sse``:
   every model turning ``loading``, whoever asked).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson

from bench import router
from bench.procs import HAL0_CORE, LOAD_CORE, Proc, Workspace, uvicorn_proc
from bench.router import A, B, C

ROUNDS = 5
SLOT = "primary"
HOLDS = (10.0, 0.0)  # HAL0_SWAP_HOLD_S: the default, and the rule off
ABAAC = (A, B, A, A, C)
ABAAC_GAP_S = 0.3
# 20 requests, mostly for A: while B or C waits, A's requests keep coming.
LONG = (A, A, B, A, A, A, C, A, A, B, A, A, A, A, C, A, B, A, A, A)
LONG_WORKERS = 3
TTFT_TOKENS = 4
WORK_TOKENS = 16
SETTLE_S = 60.0
# The router's status words, which /v1/models repeats (dispatch.routing.states took them).
_LOADED, _UNLOADED, _FAILED = "loaded", "unloaded", "failed"
_QUEUED = re.compile(rb"^: hal0 dequeued queued_ms=(\d+)")
_METRIC = re.compile(r"^(hal0_model_(?:loads|unloads)_total)\{([^}]*)\} ([0-9.e+]+)$", re.M)
_OUTCOME = re.compile(r'outcome="(\w+)"')


def _body(model: str, tokens: int) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "stream": True,
            "max_tokens": tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}],
        }
    )


@dataclass
class Answer:
    model: str
    status: int = 0
    ttft_ms: float = float("nan")
    total_ms: float = float("nan")
    queued_ms: float | None = None  # hal0web's word for the wait (header or SSE comment)
    done: bool = False  # the stream's [DONE] arrived
    error: str = ""
    sent_at: float = 0.0  # time.perf_counter() when it was sent

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.ttft_ms == self.ttft_ms and not self.error


async def chat(session: aiohttp.ClientSession, base: str, model: str, tokens: int) -> Answer:
    """One streaming chat: when its first token came, and what hal0web said of its wait."""
    ans = Answer(model)
    started = ans.sent_at = time.perf_counter()
    try:
        async with session.post(
            base + "/v1/chat/completions",
            data=_body(model, tokens),
            headers={"content-type": "application/json"},
        ) as resp:
            ans.status = resp.status
            said = resp.headers.get("X-Hal0-Queued-Ms")
            ans.queued_ms = float(said) if said else None
            if resp.status != 200:
                ans.error = _said(resp.status, await resp.read())
            async for line in resp.content:
                if (m := _QUEUED.match(line)) is not None:
                    ans.queued_ms = float(m.group(1))
                elif line.startswith(b"data: [DONE]"):
                    ans.done = True
                elif line.startswith(b"data: {"):
                    if b'"error"' in line:
                        ans.error = _said(200, line[6:])
                    elif b'"content"' in line and ans.ttft_ms != ans.ttft_ms:
                        ans.ttft_ms = (time.perf_counter() - started) * 1000
    except aiohttp.ClientError as exc:
        ans.error = f"{type(exc).__name__}: {exc}"
    ans.total_ms = (time.perf_counter() - started) * 1000
    return ans


def _said(status: int, body: bytes) -> str:
    """An error answer in a few words: its status (a stream's error event: "in stream"), its
    code and message."""
    where = "in stream" if status == 200 else str(status)
    try:
        error = orjson.loads(body)["error"]
        return f"{where} {error.get('code')}: {error.get('message')}"
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return f"{where}: {body[:120].decode(errors='replace').strip()}"


async def hal0_states(session: aiohttp.ClientSession, base: str) -> dict[str, str]:
    async with session.get(base + "/v1/models") as resp:
        body = orjson.loads(await resp.read())
    return {e["id"]: (e.get("status") or {}).get("value", "") for e in body["data"]}


async def settle(
    session: aiohttp.ClientSession, llama: str, hal0: str, loaded: frozenset[str]
) -> None:
    """The router with exactly ``loaded`` loaded, and hal0web saying so too. (Asked again
    while it differs: hal0web's loader may still be working off a queue the last workload
    left, whose requests gave up.)"""
    want = {m: (_LOADED if m in loaded else _UNLOADED) for m in (A, B, C)}

    async def router_agrees() -> bool:
        now = await router.states(session, llama)
        for model, status in now.items():
            if model not in loaded and status == _LOADED:
                await router.ask(session, llama, "unload", model)
        others_out = all(s == _UNLOADED for m, s in now.items() if m not in loaded)
        for model in loaded:
            if now.get(model) == _UNLOADED and others_out:
                await router.ask(session, llama, "load", model)
        return all(now.get(m) == v for m, v in want.items())

    async def hal0_agrees() -> bool:
        # A model whose last load failed stays ``failed`` in hal0web until loaded again: it
        # is not loaded, as wanted.
        now = await hal0_states(session, hal0)
        return all(
            now.get(m) == v or (v, now.get(m)) == (_UNLOADED, _FAILED) for m, v in want.items()
        )

    async def both_agree() -> bool:
        return await router_agrees() and await hal0_agrees()

    try:
        await router.until(
            both_agree, SETTLE_S, f"the router and hal0web to have {sorted(loaded)} loaded"
        )
    except RuntimeError as exc:
        said = await router.states(session, llama), await hal0_states(session, hal0)
        raise RuntimeError(f"{exc}: the router says {said[0]}, hal0web {said[1]}") from None


async def loads_metric(session: aiohttp.ClientSession, hal0: str) -> Counter[str]:
    async with session.get(hal0 + "/metrics") as resp:
        text = (await resp.read()).decode()
    out: Counter[str] = Counter()
    for name, labels, value in _METRIC.findall(text):
        outcome = _OUTCOME.search(labels)
        out[name + (f":{outcome.group(1)}" if outcome else "")] += int(float(value))
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _f(x: float | None, nd: int = 0) -> str:
    return "-" if x is None or x != x else f"{x:,.{nd}f}"


# --- 1. load asked -> first token ----------------------------------------------------------

# (name, the model asked for, the models loaded before it is asked)
SCENARIOS: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("cold", A, frozenset()),
    ("swap", B, frozenset({A})),
)


async def first_tokens(
    session: aiohttp.ClientSession,
    llama: str,
    hal0: str,
    count: router.LoadCount,
    lines: list[str],
) -> None:
    samples: dict[tuple[str, str], list[Answer]] = {}
    for rnd in range(ROUNDS):
        for scenario, model, loaded in SCENARIOS:
            targets = [("direct", llama), ("hal0web", hal0)]
            for name, base in targets if rnd % 2 == 0 else targets[::-1]:
                await settle(session, llama, hal0, loaded)
                ans = await chat(session, base, model, TTFT_TOKENS)
                samples.setdefault((scenario, name), []).append(ans)
    lines += [
        f"### Load asked -> first token ({ROUNDS} rounds, interleaved; medians of the "
        "requests answered)",
        "",
        "| scenario | target | answered | TTFT p50 ms | min | max | hal0web - direct, p50 ms | "
        "hal0web's queued ms p50 | failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, model, loaded in SCENARIOS:
        direct = _median([a.ttft_ms for a in samples[(scenario, "direct")] if a.ok])
        what = f"{scenario}: {model}" + (f" ({', '.join(sorted(loaded))} loaded)" if loaded else "")
        for name in ("direct", "hal0web"):
            got = samples[(scenario, name)]
            ttfts = [a.ttft_ms for a in got if a.ok]
            p50 = _median(ttfts)
            queued = [a.queued_ms for a in got if a.ok and a.queued_ms is not None]
            added = (
                ""
                if name == "direct"
                else f"{p50 - direct:+,.0f} ({(p50 / direct - 1) * 100:+.1f} %)"
            )
            lines.append(
                f"| {what} | {name} | {len(ttfts)} / {len(got)} | {_f(p50)} | "
                f"{_f(min(ttfts) if ttfts else None)} | {_f(max(ttfts) if ttfts else None)} | "
                f"{added} | {_f(_median(queued)) if name != 'direct' else ''} | "
                f"{_failures(got)} |"
            )
    lines.append("")
    _phases(samples, count, lines)


def _phases(
    samples: dict[tuple[str, str], list[Answer]], count: router.LoadCount, lines: list[str]
) -> None:
    """Where each answered request's time to first token went, by the router's own events
    (as the bench heard them on /models/sse): before the router began the load, the load,
    and from "loaded" to the first token."""
    lines += [
        "Where the time went (medians, ms; the router's `loading` and `loaded` events as "
        "heard on its /models/sse):",
        "",
        "| scenario | target | sent -> router loading | loading -> loaded | "
        "loaded -> first token |",
        "|---|---|---|---|---|",
    ]
    for (scenario, name), got in samples.items():
        parts: list[tuple[float, float, float]] = []
        for a in got:
            if not a.ok:
                continue
            first = a.sent_at + a.ttft_ms / 1000
            span = count.load_between(a.model, a.sent_at, first)
            if span is not None:
                began, ended = span
                parts.append((began - a.sent_at, ended - began, first - ended))
        cols = [_f(_median([p[i] * 1000 for p in parts])) for i in range(3)]
        lines.append(f"| {scenario} | {name} | " + " | ".join(cols) + " |")
    lines.append("")


def _failures(answers: list[Answer]) -> str:
    said = Counter(a.error or f"HTTP {a.status}, no [DONE]" for a in answers if not a.ok)
    return "; ".join(f"{n} x {e}" for e, n in said.items()).replace("|", "/") or "-"


# --- 2. swaps ------------------------------------------------------------------------------


@dataclass
class Run:
    hold: float
    workload: str
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0
    loads_hal0: int = 0
    failed_loads_hal0: int = 0
    unloads_hal0: int = 0
    loads_router: Counter[str] = field(default_factory=Counter)


async def _abaac(session: aiohttp.ClientSession, hal0: str) -> list[Answer]:
    async def later(i: int, model: str) -> Answer:
        await asyncio.sleep(i * ABAAC_GAP_S)
        return await chat(session, hal0, model, WORK_TOKENS)

    return list(await asyncio.gather(*(later(i, m) for i, m in enumerate(ABAAC))))


async def _long(session: aiohttp.ClientSession, hal0: str) -> list[Answer]:
    todo = iter(enumerate(LONG))
    out: list[Answer | None] = [None] * len(LONG)

    async def worker() -> None:
        for i, model in todo:
            out[i] = await chat(session, hal0, model, WORK_TOKENS)

    await asyncio.gather(*(worker() for _ in range(LONG_WORKERS)))
    return [a for a in out if a is not None]


WORKLOADS = (
    (f"A B A A C ({ABAAC_GAP_S:g} s apart)", _abaac),
    (f"{len(LONG)} requests, {LONG_WORKERS} workers", _long),
)


async def swaps(
    session: aiohttp.ClientSession, llama: str, hal0: str, hold: float, count: router.LoadCount
) -> list[Run]:
    runs = []
    for name, workload in WORKLOADS:
        await settle(session, llama, hal0, frozenset())
        run = Run(hold, name)
        before, router_before = await loads_metric(session, hal0), Counter(count.loads)
        started = time.monotonic()
        run.answers = await workload(session, hal0)
        run.seconds = time.monotonic() - started
        await asyncio.sleep(0.5)  # the last events from the router
        after = await loads_metric(session, hal0)
        ok, failed = "hal0_model_loads_total:ok", "hal0_model_loads_total:failed"
        run.loads_hal0 = after[ok] - before[ok]
        run.failed_loads_hal0 = after[failed] - before[failed]
        run.unloads_hal0 = after["hal0_model_unloads_total"] - before["hal0_model_unloads_total"]
        run.loads_router = count.loads - router_before
        runs.append(run)
    return runs


def swaps_table(runs: list[Run], lines: list[str]) -> None:
    lines += [
        "### Swaps: model loads for interleaved workloads, with the hold and without",
        "",
        "| workload | HAL0_SWAP_HOLD_S | loads ok + failed (hal0web) | loads (router's own count) | "
        "unloads (hal0web) | ok / sent | wall s | TTFT p50 / max ms | failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        ok = [a for a in run.answers if a.ok]
        ttfts = [a.ttft_ms for a in ok]
        per_model = ", ".join(f"{m} {n}" for m, n in sorted(run.loads_router.items()))
        lines.append(
            f"| {run.workload} | {run.hold:g} | {run.loads_hal0} + {run.failed_loads_hal0} | "
            f"{sum(run.loads_router.values())} ({per_model}) | {run.unloads_hal0} | "
            f"{len(ok)} / {len(run.answers)} | {run.seconds:.1f} | "
            f"{_f(_median(ttfts))} / {_f(max(ttfts) if ttfts else None)} | "
            f"{_failures(run.answers)} |"
        )
    lines.append("")


# --- the run -------------------------------------------------------------------------------


def _hal0(ws: Workspace, hold: float) -> Proc:
    """hal0web under Uvicorn as `make run` starts it."""
    proc = uvicorn_proc(ws, f"uvicorn-hold{hold:g}")
    # INFO: the loader's every load and unload in the log (a few hundred lines a run).
    proc.extra_env.update(
        HAL0_SWAP_HOLD_S=f"{hold:g}", HAL0_METRICS_PUBLIC="true", HAL0_LOG_LEVEL="INFO"
    )
    return proc


def _keep_log(proc: Proc) -> None:
    """A copy of the process's log beside the report (bench/results/models-logs/)."""
    from bench.__main__ import RESULTS

    where = RESULTS / "models-logs"
    where.mkdir(parents=True, exist_ok=True)
    if proc.log_path.is_file():
        shutil.copy(proc.log_path, where / proc.log_path.name)


def _load_warnings(proc: Proc) -> list[str]:
    """What the loader logged of loads and unloads that failed, each kind of line counted."""
    said = Counter(
        re.sub(r"\b(smollm2-b|smollm2|gemma)\b", "X", line.split("slot ", 1)[1])
        for line in proc.log_tail(1 << 22).splitlines()
        if "slot " in line and ("failed:" in line or "failed a step" in line)
    )
    return [f"- {proc.name}: {n} x `{line.strip()}`" for line, n in said.most_common()]


async def _listed(session: aiohttp.ClientSession, hal0: str) -> None:
    async def all_known() -> bool:
        now = await hal0_states(session, hal0)
        return all(now.get(m) for m in (A, B, C))

    await router.until(all_known, SETTLE_S, "hal0web to list the router's models")


async def run() -> str:
    from bench.__main__ import _loadavg

    started = time.time()
    ws = Workspace()
    models = router.models_dir(ws)
    llama = router.router_proc(ws, models)
    procs = [_hal0(ws, hold) for hold in HOLDS]
    lines: list[str] = []
    runs: list[Run] = []
    warnings: list[str] = []
    count = router.LoadCount()
    try:
        llama.start()
        llama.wait_http("/models", timeout=60)
        ws.manage("migrate", "-v0")
        ws.manage(
            "shell",
            "-c",
            "from dispatch.models import Slot\n"
            f"Slot.objects.create(name={SLOT!r}, url='{llama.base}/v1', kind='llamacpp', "
            "is_default=True)\n",
        )
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_read=120)
        ) as session:
            count.start(session, llama.base)
            for i, proc in enumerate(procs):
                proc.start()
                try:
                    proc.wait_http("/healthz")
                    await _listed(session, proc.base)
                    await chat(session, proc.base, A, 1)  # warm-up: pools, the first load
                    if i == 0:
                        await first_tokens(session, llama.base, proc.base, count, lines)
                    runs += await swaps(session, llama.base, proc.base, HOLDS[i], count)
                finally:
                    proc.stop()
                    warnings += _load_warnings(proc)
                    _keep_log(proc)
            await count.stop()
    finally:
        for p in [*procs, llama]:
            p.stop()
        _keep_log(llama)
        ws.cleanup()
    runs.sort(key=lambda r: (r.workload, -r.hold))
    swaps_table(runs, lines)
    head = [
        "# Models on demand against llama.cpp's router",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}: `llama-server` "
        f"({router.binary()}) in router mode, `--models-max 1 -t 1 -c 1024`, models {A} "
        f"(SmolLM2-135M Q4_1), {B} (Gemma 3 270M Q4_K_M), {C} (SmolLM2 again, under a second "
        f"name), on core {LOAD_CORE} with the load generator; hal0web (Uvicorn, one worker, "
        f"SQLite) on core {HAL0_CORE}, slot `{SLOT}` (kind llamacpp) on the router. Load "
        f"average at start {_loadavg()}.",
        "",
    ]
    tail = [
        "hal0web's own warnings about loads and unloads (its log; the logs are kept in "
        "bench/results/models-logs/):",
        "",
        *(warnings or ["- none"]),
        "",
        f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}.",
    ]
    return "\n".join(head + lines + tail) + "\n"
