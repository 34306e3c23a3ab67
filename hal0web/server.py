"""``python -m hal0web.server``: Uvicorn's own command line, with what hal0web needs of it.

Every option of ``uvicorn`` means what it means there (``python -m hal0web.server
hal0web.asgi:application --workers 4 …``); the differences:

- **A header-read timeout** (``HAL0_HEADER_TIMEOUT_S``): a connection that has not sent a
  request's whole header that long after it opened (or, kept alive, after the request's
  first byte) is closed. Uvicorn has none: a client sending headers a byte at a time held a
  connection, and a file descriptor, for ever. Built on httptools' protocol (``--http
  httptools``, Uvicorn's ``auto`` where it is installed); another ``--http`` is refused.
- **Refusing at once on SIGTERM/SIGINT with ``--workers N``**: the supervisor owns the
  listening socket the workers share, and Uvicorn's keeps it open until the last worker has
  drained, so a new connection was taken by the kernel and never served (a hang, then a
  reset at exit). Here the supervisor closes its copy on the signal and passes it on to the
  workers at once: the socket is gone once each has closed its own (as Uvicorn's shutdown
  begins, within 0.1 s), and a new connection is refused. (One worker owns its socket
  alone, and Uvicorn closes it itself.)
- **The drain's bound**: ``--timeout-graceful-shutdown`` defaults to ``HAL0_DRAIN_S`` plus
  ``CUT_GRACE_S``, and a smaller one is refused: at ``HAL0_DRAIN_S`` hal0web ends what
  still runs itself, each stream with an error event in its protocol
  (``dispatch/api/drain.py``); Uvicorn's bound is only the backstop, and it cancels bare.
- **The file limit**: the soft limit on open files is raised to the hard one (as Go's
  runtime does), so the 1,024 most systems start a process with do not halve service under
  a few thousand connections (each stream holds two: the client's, and the slot's).
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import resource
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors.multiprocess import Multiprocess

# Past HAL0_DRAIN_S, how long Uvicorn still waits for what the drain ended (each stream's
# last event written, each connection closed) before it cancels what is left.
CUT_GRACE_S = 5
# Below this many open files, say so at start: a stream holds two.
FEW_FILES = 4096
PROTOCOL = "hal0web.server:HttpProtocol"


class HttpProtocol(HttpToolsProtocol):
    """Uvicorn's httptools protocol, closing a connection whose request header is not
    whole within ``HAL0_HEADER_TIMEOUT_S``.

    A new connection arms a timer when it opens (nothing may come at all); a kept-alive one
    arms one only when a read between two requests ends with a header begun and not ended
    (nearly every header comes whole in one read: no timer, one check). A header that ends
    (a request begins) disarms it. Waiting for a kept-alive connection's next request is
    Uvicorn's ``--timeout-keep-alive``'s, as is a header begun while a response still goes
    out (pipelined): the keep-alive timer closes that connection when nothing more comes.
    """

    _timeout_s: float | None = None  # HAL0_HEADER_TIMEOUT_S, read with the first connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        timer = self._header_timer
        if self.cycle is not cycle:  # a header ended: its request began
            if timer is not None:
                timer.cancel()
                self._header_timer = None
            return
        # No request began: a header is on its way, or the connection is a WebSocket's now,
        # or it ends.
        gone = self.transport.get_protocol() is not self or self.transport.is_closing()
        if timer is None:
            if not gone and (cycle is None or cycle.response_complete):
                self._arm()  # these bytes began a header, and it did not end
        elif gone:
            timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        timeout = HttpProtocol._timeout_s
        if timeout is None:
            from django.conf import settings  # configured by the app, loaded before serving

            timeout = HttpProtocol._timeout_s = float(settings.HAL0_HEADER_TIMEOUT_S)
        self._header_timer = self.loop.call_later(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._header_timer = None
        # Nothing to answer: no request was read (a client that sent half a header is told
        # by the connection's end, as nginx's client_header_timeout does).
        if not self.transport.is_closing():
            self.transport.close()


class Supervisor(Multiprocess):
    """Uvicorn's supervisor of ``--workers N``, closing its copy of the listening socket
    on SIGTERM/SIGINT (see the module's docstring); every other signal as Uvicorn has it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._closed = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        # In the signal handler: close the sockets, tell the workers at once (Uvicorn's loop
        # would in up to half a second, accepting meanwhile), and queue the signal for that
        # loop as its own handler does. Always SIGTERM: a second SIGINT (the terminal's
        # Ctrl-C reaches the workers too) makes a worker quit without draining.
        if not self._closed:
            self._closed = True
            for sock in self.sockets:
                sock.close()
            for process in self.processes:
                if process.pid is not None:
                    try:
                        os.kill(process.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        self.signal_queue.append(sig)

    def keep_subprocess_alive(self) -> None:
        if self._closed:
            return  # no worker is started on a closed socket (one that died meanwhile)
        super().keep_subprocess_alive()

    def handle_signals(self) -> None:
        try:
            super().handle_signals()
        except Exception:
            if not self._closed:
                raise
            # A restart (SIGHUP) or a new worker (SIGTTIN) met the socket the stop closed
            # meanwhile: the stop goes on (its own signal may be behind in the queue).
            self.should_exit.set()


def raise_file_limit() -> tuple[int, int]:
    """The soft limit on open files raised to the hard one; (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit past the kernel's nr_open
            pass
    return soft, hard


def graceful_s(given: int | None, drain_s: float) -> int:
    """Uvicorn's --timeout-graceful-shutdown: past HAL0_DRAIN_S, or refused."""
    least = math.ceil(drain_s) + 1
    if given is None:
        return math.ceil(drain_s) + CUT_GRACE_S
    if given < least:
        raise SystemExit(
            f"--timeout-graceful-shutdown {given} would cancel requests before HAL0_DRAIN_S "
            f"({drain_s:g} s) ends them in their protocols: give at least {least}, or leave "
            f"it out ({math.ceil(drain_s) + CUT_GRACE_S})"
        )
    return given


def protocol(http: Any) -> str:
    """The HTTP protocol hal0web's options are built on, for Uvicorn's ``--http``."""
    if http in ("auto", "httptools", PROTOCOL):
        return PROTOCOL
    raise SystemExit(
        f"--http {http}: hal0web.server serves with httptools (its header-read timeout is "
        "built on it); leave --http out or give httptools"
    )


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")
    from django.conf import settings  # the workers read the same, from the same environment

    soft, hard = raise_file_limit()
    if soft != resource.RLIM_INFINITY and soft < FEW_FILES:
        print(
            f"hal0web.server: only {soft} open files allowed (hard limit {hard}): about "
            f"{soft // 2} streams at once per worker; raise the limit (LimitNOFILE)",
            file=sys.stderr,
        )
    # `uvicorn.main` the module: the package's attribute of that name is its main().
    cli: Any = importlib.import_module("uvicorn.main")
    stock_run: Callable[..., None] = cli.run

    def run(app: Any, **options: Any) -> None:
        options["http"] = protocol(options.get("http", "auto"))
        options["timeout_graceful_shutdown"] = graceful_s(
            options.get("timeout_graceful_shutdown"), settings.HAL0_DRAIN_S
        )
        stock_run(app, **options)

    cli.run = run
    cli.Multiprocess = Supervisor
    cli.main.main(args=argv, prog_name="python -m hal0web.server")


if __name__ == "__main__":
    main()
