"""A list of callbacks a lower room keeps, so the rooms above hear of its changes without it
importing them (the live feed, ``dispatch.web.live``, hears the table, the in-flight counts
and the ejections this way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, ParamSpec

P = ParamSpec("P")

log = logging.getLogger("hal0.listeners")


class Listeners(Generic[P]):
    """Callbacks, called in the order they were added with what ``notify`` is given.

    Every listener runs: one that raises is logged and the rest still run. What is announced
    has already happened (a count taken, a table swapped in), so a listener's bug must neither
    undo it nor fail the request or the reload that made it.
    """

    __slots__ = ("_listeners", "name")

    def __init__(self, name: str) -> None:
        self.name = name  # whose listeners: for the log line when one fails
        self._listeners: list[Callable[P, object]] = []

    def add(self, listener: Callable[P, object]) -> None:
        self._listeners.append(listener)

    def remove(self, listener: Callable[P, object]) -> None:
        """Stop calling ``listener``; ValueError if it was not added."""
        self._listeners.remove(listener)

    def notify(self, *args: P.args, **kwargs: P.kwargs) -> None:
        # Over a copy: a listener may add or remove listeners while it runs.
        for listener in tuple(self._listeners):
            try:
                listener(*args, **kwargs)
            except Exception:
                log.exception("a listener of %s failed: %r", self.name, listener)

    def __len__(self) -> int:
        return len(self._listeners)
