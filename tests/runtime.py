"""The process runtime's singletons, and how a test puts each back as a fresh process has it.

hal0web keeps its runtime in module-level objects made at import time (the routing table, the
key ring, the watcher, ...). A test that ran before must leave none of its state to the next,
so every reset lives in this one list: a new singleton is added here once, and when a module
moves, this is the one place in tests/ that imports it to fix.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace


def singletons() -> SimpleNamespace:
    """The runtime's objects, by the names the resets use."""
    # Imported when called, not at collection: Django's settings must be configured first.
    from dispatch.api.drain import drain
    from dispatch.coordination import events, outages, stored_responses
    from dispatch.coordination.affinity import affinity
    from dispatch.coordination.keyring import keyring
    from dispatch.coordination.store import store
    from dispatch.lifecycle import loader, persistence
    from dispatch.lifecycle.leadership import leadership
    from dispatch.lifecycle.watcher import watcher
    from dispatch.upstream.admission import admission
    from dispatch.upstream.client import upstream
    from dispatch.upstream.forward import _nudged
    from dispatch.upstream.loads import loads
    from dispatch.upstream.outliers import outliers
    from dispatch.web.live import loader_news

    return SimpleNamespace(
        store=store,
        keyring=keyring,
        watcher=watcher,
        leadership=leadership,
        admission=admission,
        outliers=outliers,
        affinity=affinity,
        nudged=_nudged,
        upstream=upstream,
        events=events,
        loads=loads,
        loader=loader.loader,
        held=persistence.held,
        persistence=persistence,
        loader_news=loader_news,
        outages=outages,
        kept=stored_responses.pending,
        drain=drain,
    )


def _resets() -> tuple[tuple[str, Callable[[], None]], ...]:
    the = singletons()
    return (
        ("store", the.store.reset),
        ("keyring", the.keyring.reset),
        # The watcher and the leadership have no reset of their own: made anew in place.
        ("watcher", the.watcher.__init__),
        ("leadership", the.leadership.__init__),
        ("admission", the.admission.reset),
        ("outliers", the.outliers.reset),
        # This test's response ids only, in the store its settings choose.
        ("affinity", the.affinity.reset),
        # A slot name nudged by the last test is not nudged by this one.
        ("nudged", the.nudged.clear),
        ("transport", lambda: the.upstream.use_transport(None)),
        ("events loop", lambda: the.events.bind_loop(None)),
        # Its pages and their batches were the finished test's loop's.
        ("events pages", the.events.forget_pages),
        ("loads", the.loads.reset),
        # The loader's queues' tasks belong to the finished test's loop: forgotten, not stopped.
        ("loader", the.loader.forget),
        ("held", the.held.clear),
        # Probe results waiting to be written belong to the finished test's loop: forgotten.
        ("probe writer", the.persistence.forget),
        # The loader's news a page connecting now would be shown.
        ("loader news", the.loader_news.clear),
        # Redis and the database up, as a new process takes them to be.
        ("outages", the.outages.reset),
        # Responses kept while the database was away, waiting to be written.
        ("kept", the.kept.reset),
        # A stop a test began (its refusals, its cut) is not the next test's.
        ("drain", the.drain.reset),
    )


def names() -> list[str]:
    """What a reset puts back, in order."""
    return [name for name, _ in _resets()]


def reset(*parts: str) -> None:
    """Put the runtime back as a fresh process has it: all of it, or only the parts named."""
    unknown = set(parts) - set(names())
    if unknown:
        raise ValueError(f"not a part of the runtime: {sorted(unknown)}; the parts: {names()}")
    for name, put_back in _resets():
        if not parts or name in parts:
            put_back()
