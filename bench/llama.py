"""Time to first token against a real llama.cpp server: direct, and through hal0web.

`python -m bench llama`. The end-to-end tests prove routing against the demo's real servers;
how many milliseconds hal0web adds to the first token is measured here, not asserted there.
SmolLM2-135M (the demo's `primary` default model) under llama.cpp's llama-server (the binary
`make` installs, serving that one model) on core 0 with one thread; hal0web under Daphne and
Uvicorn on core 1; the same prompt, sequential requests, interleaved target by target.
"""

from __future__ import annotations

import time

import aiohttp

from bench.procs import HAL0_CORE, LOAD_CORE, Proc, Workspace, daphne_proc, free_port, uvicorn_proc
from dispatch.lifecycle import demo
from tools.llama_build import installed_binary

MODEL = "smollm2-135m-instruct"
ROUNDS = 12
BODY = {
    "model": MODEL,
    "stream": True,
    "max_tokens": 4,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Say hello."}],
}


async def first_token_ms(session: aiohttp.ClientSession, base: str) -> float:
    started = time.perf_counter()
    async with session.post(base + "/v1/chat/completions", json=BODY) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"content"' in line:
                return (time.perf_counter() - started) * 1000
    raise RuntimeError(f"{base}: the stream carried no token")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


async def run() -> str:
    demo.require_packages()
    binary = installed_binary()
    demo.check_binary(binary)
    ws = Workspace()
    port = free_port()
    spec = demo.DemoSlot("primary", (demo.SMOLLM2,), router=False)
    args = demo.server_args(spec, {demo.SMOLLM2.id: demo.smollm2_path()}, ws.dir)
    command = demo.LlamaServer(spec, binary, args, port, ws.dir / "l.log").command()
    llama = Proc("llama", command, ws.env, LOAD_CORE, port, ws.dir / "llama.log")
    servers = [daphne_proc(ws), uvicorn_proc(ws)]
    try:
        llama.start()
        llama.wait_http("/health", timeout=120)
        ws.manage("migrate", "-v0")
        ws.manage(
            "shell",
            "-c",
            "from dispatch.models import Slot, SlotModel\n"
            f"s = Slot.objects.create(name='primary', url='{llama.base}/v1', is_default=True)\n"
            f"SlotModel.objects.create(slot=s, model_id={MODEL!r}, is_default=True)\n",
        )
        for s in servers:
            s.start()
        for s in servers:
            s.wait_http("/healthz")
        targets = {"direct": llama.base, **{s.name: s.base for s in servers}}
        samples: dict[str, list[float]] = {name: [] for name in targets}
        async with aiohttp.ClientSession() as session:
            for base in targets.values():  # warm-up: load the prompt cache, pools, slots
                await first_token_ms(session, base)
            for _ in range(ROUNDS):
                for name, base in targets.items():
                    samples[name].append(await first_token_ms(session, base))
    finally:
        for p in [*servers, llama]:
            p.stop()
        ws.cleanup()
    direct = _median(samples["direct"])
    lines = [
        "# Time to first token against a real llama.cpp server",
        "",
        f"SmolLM2-135M-Instruct Q4_1 under llama.cpp's llama-server (1 thread, core {LOAD_CORE}); "
        f"hal0web on "
        f"core {HAL0_CORE}; {ROUNDS} sequential streaming requests per target after a warm-up, "
        "interleaved; `max_tokens` 4, the same prompt each time.",
        "",
        "| target | TTFT p50 ms | added p50 ms | min ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, values in samples.items():
        added = "" if name == "direct" else f"{_median(values) - direct:+.2f}"
        lines.append(
            f"| {name} | {_median(values):.2f} | {added} | {min(values):.2f} | {max(values):.2f} |"
        )
    return "\n".join(lines) + "\n"
