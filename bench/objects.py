"""``python -m bench objects``: what Django's request and response cost one /v1 request.

The stack is Django's, so a /v1 request has a Django request and a Django response: the
lean ones (``ApiRequest``, dispatch/api/request.py; ``Answer``, dispatch/api/responses.py),
but Django's objects all the same. This counts what they cost in instructions, the figure
that does not swing: a child process does, N times, what the handler does with them for a
chat request (the request made from the scope and read as the path reads it; the answer
made with a chat answer's headers and sent, to a send that keeps nothing), under callgrind,
and once with N = 0; the difference over N is one request's.

Set against bench/served.py's figures: the floor (Uvicorn and aiohttp alone) plus these
objects is what any /v1 path on this stack pays before it routes, records or logs anything.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.procs import ROOT

N = 2000
WARM = 100
CHAT = b'{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}'
ANSWER = b'{"id":"chatcmpl-bench","object":"chat.completion","choices":[]}' * 4
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "scheme": "http",
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 50000),
    "method": "POST",
    "root_path": "",
    "path": "/v1/chat/completions",
    "raw_path": b"/v1/chat/completions",
    "query_string": b"",
    # What bench/served.py's client sends.
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"accept-encoding", b"identity"),
        (b"content-length", b"%d" % len(CHAT)),
        (b"content-type", b"application/json"),
    ],
}


def _child(n: int) -> list[Any]:
    """Make ``n`` requests' objects (after a warm-up); the last answer's ASGI messages."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")
    import django

    django.setup()
    from dispatch.api.responses import Answer, visible
    from dispatch.api.runtime import BareASGIHandler
    from dispatch.observability.decisions import DecisionRecord

    handler = BareASGIHandler()
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    def one() -> None:
        # The request: made from the scope, read as a chat request's path reads it.
        request, _ = handler.create_request(SCOPE, io.BytesIO(CHAT))
        assert request is not None
        request.get_host()
        for name in ("Origin", "X-Request-Id", "Authorization", "Content-Length"):
            request.headers.get(name)
        request.body  # noqa: B018
        dict(request.headers.items())
        # The answer: a chat answer's headers (the upstream's, hal0web's), then sent.
        rec = DecisionRecord.arrived("0ed8ec3591185eae0000000000000001", "chat/completions")
        rec.answered("bench", "bench-model", "model:bench", 200)
        sent.clear()
        response = Answer(ANSWER, 200)
        response["content-type"] = "application/json"
        visible(response, rec)
        response.headers._store.setdefault(
            "x-content-type-options", ("X-Content-Type-Options", "nosniff")
        )
        sending = handler.send_response(response, send)
        try:
            sending.send(None)  # nothing awaits for real: it runs to its end at once
        except StopIteration:
            pass
        request.close()

    for _ in range(WARM):
        one()
    for _ in range(n):
        one()
    return sent


def _count(n: int, out: Path) -> int:
    """Instructions of a child that makes ``n`` requests' objects (callgrind's total)."""
    target = out / f"cg.{n}"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={target}",
            sys.executable,
            "-m",
            "bench.objects",
            "--child",
            str(n),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
    )
    for line in target.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no total in {target}")


def per_request() -> float:
    with tempfile.TemporaryDirectory(prefix="hal0-objects-") as tmp:
        base, loaded = _count(0, Path(tmp)), _count(N, Path(tmp))
    return (loaded - base) / N


def run() -> str:
    figure = per_request()
    label = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"# Django's request and response on the /v1 path ({label})\n\n"
        f"callgrind, {N} chat requests' ApiRequest and Answer made, read and sent in one "
        "process, less the same process making none (bench/objects.py).\n\n"
        f"| instructions per request | {figure:,.0f} |\n|---|---|\n"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(int(sys.argv[2]))
    else:
        print(run())
