"""A server process that stops: from its stop signal on, new API requests are refused
(503 ``shutting_down``), the ones in flight have ``HAL0_DRAIN_S`` to finish, and then what
still runs is cut, each in its client's protocol (``api/pipeline.py``, ``api/relay.py``).

The moment is the signal itself: Uvicorn tells the app of its shutdown (ASGI lifespan) only
after it has waited for every connection, and its own bound on that wait
(``--timeout-graceful-shutdown``) cancels the requests without a word to their clients, a
stream's chunked body left unended. So the handler the server installed for SIGTERM and
SIGINT is wrapped (``watch``): ours notes the stop and hands the rest to the loop, then the
server's runs as before (it stops accepting, closes idle connections, waits). At
``HAL0_DRAIN_S`` the requests still in flight are cancelled (``cut``): a stream catches it
and ends with one complete error event, a request still waiting answers 503 itself
(``taken``), and each is recorded so — before the server's own bound, which hal0web.server
sets past this one, would cancel them bare.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from django.conf import settings

from dispatch.wire.errors import ApiError

log = logging.getLogger("hal0.runtime")

# The signals a server stops on (Uvicorn's own list, less Windows' SIGBREAK).
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A client refused or cut short may try again at once: another instance (the balancer's
# choice), or this one once it is back.
RETRY_AFTER_S = 1

Handler = Callable[[int, FrameType | None], Any]


class Drain:
    """The process's stop: ``stopping`` once the signal came, ``cut`` once the drain ran out."""

    def __init__(self) -> None:
        self.stopping = False
        self.cut = False
        self.requests: set[asyncio.Task[Any]] = set()  # the API requests in flight (``track``)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Hear the stop signals the server listens to, for the requests on ``loop``; False
        when it listens to none here (not the main thread, or no handler of its own: then
        no handler is changed, and only a call to ``stop`` starts the drain)."""
        self._loop = loop
        if threading.current_thread() is not threading.main_thread():
            return False
        watching = False
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if getattr(previous, "hal0_drain", False):
                watching = True  # already ours (a second start-up in one process)
                continue
            if not callable(previous):
                continue  # the default or ignored: no server stops on it here
            signal.signal(sig, _chained(self.stop, previous))
            watching = True
        return watching

    def stop(self) -> None:
        """The process stops: refuse new requests, and cut the ones in flight after
        HAL0_DRAIN_S. Safe from a signal handler or another thread."""
        # In a signal handler it runs between two bytecodes of whatever the main thread
        # runs: note it, and leave the rest to the loop.
        if self.stopping or self._loop is None:
            return
        self.stopping = True
        try:
            self._loop.call_soon_threadsafe(self._begin)
        except RuntimeError:  # the loop is closed: nothing is in flight to drain
            pass

    def _begin(self) -> None:
        drain_s = settings.HAL0_DRAIN_S
        log.info(
            "stopping: new requests are refused; %d in flight may go on for %g s (HAL0_DRAIN_S)",
            len(self.requests),
            drain_s,
        )
        assert self._loop is not None
        self._timer = self._loop.call_later(drain_s, self._cut)

    def _cut(self) -> None:
        self.cut = True
        if self.requests:
            log.warning(
                "HAL0_DRAIN_S (%g s) is over: ending the %d requests still in flight",
                settings.HAL0_DRAIN_S,
                len(self.requests),
            )
        for task in list(self.requests):
            task.cancel()

    def track(self) -> None:
        """The running request is one the drain waits for, and cuts when it runs out."""
        task = asyncio.current_task()
        if task is not None:
            self.requests.add(task)
            task.add_done_callback(self.requests.discard)

    def taken(self) -> bool:
        """Whether the cancellation being handled is the cut's. Then it is taken (the task
        un-cancelled) and the caller ends its answer itself: one error event, or a 503."""
        if not self.cut:
            return False
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()
        return True

    def refusal(self) -> ApiError:
        """503 ``shutting_down``, for a request that came too late or ran too long."""
        if self.cut:
            message = (
                "hal0web is shutting down: this request was still running after "
                f"HAL0_DRAIN_S ({settings.HAL0_DRAIN_S:g} s); send it again."
            )
        else:
            message = "hal0web is shutting down and takes no new requests; send it again."
        # Connection: close: the connection goes with the process, a client must not reuse it.
        headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
        return ApiError(503, "shutting_down", message, headers=headers)

    def reset(self) -> None:
        """As a fresh process has it (tests); the signal handlers stay as they are."""
        if self._timer is not None:
            self._timer.cancel()
        self.__init__()  # type: ignore[misc]


def _chained(ours: Callable[[], None], previous: Handler) -> Handler:
    def heard(signum: int, frame: FrameType | None) -> Any:
        ours()
        return previous(signum, frame)

    heard.hal0_drain = True  # type: ignore[attr-defined]
    return heard


drain = Drain()
