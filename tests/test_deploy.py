"""deploy/ agrees with itself and with the drain: the Procfile and the systemd unit run the
same command, systemd waits long enough for a stop to drain, and the file limit fits the
connections a worker holds. (tests/test_shutdown.py runs the Procfile's line for real.)"""

from __future__ import annotations

import shlex

from django.conf import settings

from dispatch.api.runtime import Hal0Application
from hal0web.server import CUT_GRACE_S, graceful_s

DEPLOY = settings.BASE_DIR / "deploy"
# The streams one worker should be able to hold before its descriptors run out: well past
# what its CPU and memory serve (2,000 slow streams cost ~130 MB, docs/performance.md).
STREAMS_PER_WORKER = 30_000


def _procfile() -> list[str]:
    [web] = [
        line.removeprefix("web:").strip()
        for line in (DEPLOY / "Procfile").read_text().splitlines()
        if line.startswith("web:")
    ]
    return shlex.split(web)


def _unit() -> dict[str, str]:
    lines = (DEPLOY / "hal0web.service").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def _options(argv: list[str]) -> dict[str, str]:
    """Each ``--option value`` (flags map to "")."""
    options: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) else ""
            options[arg] = "" if value.startswith("--") else value
    return options


def test_the_unit_runs_the_procfile_command() -> None:
    procfile, unit = _procfile(), shlex.split(_unit()["ExecStart"])
    assert procfile[:3] == ["python", "-m", "hal0web.server"]
    assert unit[0].endswith("/python") and unit[1:3] == ["-m", "hal0web.server"]
    assert procfile[3] == unit[3] == "hal0web.asgi:application"
    ours, theirs = _options(procfile), _options(unit)
    assert ours.keys() == theirs.keys()
    # The same options; only where and how many may differ.
    for name in ours.keys() - {"--host", "--port", "--workers"}:
        assert ours[name] == theirs[name], name


def test_a_stop_is_given_the_drain_and_more() -> None:
    drain_s = settings.HAL0_DRAIN_S
    for argv in (_procfile(), shlex.split(_unit()["ExecStart"])):
        given = _options(argv).get("--timeout-graceful-shutdown")
        graceful_s(int(given) if given else None, drain_s)  # refused (SystemExit) if inside
    uvicorn_s = graceful_s(None, drain_s)
    assert uvicorn_s >= drain_s + CUT_GRACE_S
    # systemd's SIGKILL comes after Uvicorn's bound and the lifespan shutdown (the request
    # log written), or it cuts streams bare.
    stop_s = int(_unit()["TimeoutStopSec"])
    assert stop_s >= uvicorn_s + Hal0Application.REQUEST_LOG_FLUSH_S, stop_s
    assert _unit()["KillSignal"] == "SIGTERM"


def test_the_file_limit_fits_a_workers_connections() -> None:
    # Per process: a client connection is one descriptor, the request it relays one more.
    assert int(_unit()["LimitNOFILE"]) >= 2 * STREAMS_PER_WORKER
