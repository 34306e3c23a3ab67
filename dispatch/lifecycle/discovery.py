"""What a slot's server speaks, found by asking it: once each time the slot becomes ready.

A slot whose manifest lists no endpoints speaks what its kind of server speaks for its type
(``Kind.speaks``); but servers of one kind differ (llama.cpp's ``llama-server`` has Anthropic
Messages and the Responses API, llama-cpp-python neither). So the watcher asks, for each
endpoint the kind says is worth asking (``Kind.asks``), with one cheap request each
(``Kind.ask_call``: an empty JSON body, which a server with the route refuses and one without
it answers 404), one after the other under a short timeout (slots are asked at once, each in
its own probe loop); what the probe's readings already answer is not asked (``Kind.knows``). What it found is written with the
probe's result (``dispatch.lifecycle.persistence``) and reaches every process like any change
of the table; ``dispatch.routing.speaks`` reads it into the slot's endpoints.

Asked again when the slot comes back (ready after being anything else), when its kind, type
or URL changes, and when the process that watches changes; never at every probe.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dispatch import kinds
from dispatch.kinds import Loads
from dispatch.routing import speaks
from dispatch.routing.table import SlotEntry
from dispatch.upstream.client import upstream

log = logging.getLogger("hal0.health")

# Marks hal0web's questions to a server (its logs, a test's fake): not a client's request.
PROBE_HEADERS: Mapping[str, str] = {"x-hal0-probe": "endpoints"}
# An answer to a question is an error body at most: no more of it is read.
_LIMIT = 64 * 1024


class Asked:
    """Which slots were asked in their present readiness, and of what (``speaks.key``): the
    watcher asks a ready slot once, not at every probe."""

    def __init__(self) -> None:
        self._of: dict[str, str] = {}

    def wanted(self, slot: SlotEntry) -> bool:
        """Whether ``slot``, found ready, is to be asked now."""
        if slot.endpoints_listed or not kinds.get(slot.kind).asks(slot.type):
            return False
        return self._of.get(slot.name) != speaks.key(slot.kind, slot.type, slot.url)

    def done(self, slot: SlotEntry) -> None:
        self._of[slot.name] = speaks.key(slot.kind, slot.type, slot.url)

    def forget(self, name: str) -> None:
        """The slot is not ready (any more): ask again when it is."""
        self._of.pop(name, None)


async def discover(slot: SlotEntry, timeout: float, loads: Loads | None = None) -> dict[str, bool]:
    """Ask ``slot``'s server whether it speaks each endpoint its kind says is worth asking,
    but those the probe's readings already tell (``Kind.knows``, from ``loads``); what the
    readings and the answers tell (an endpoint whose answer tells nothing is left out)."""
    kind = kinds.get(slot.kind)
    found: dict[str, bool] = dict(kind.knows(slot.type, loads))
    for endpoint in sorted(kind.asks(slot.type) - found.keys()):
        # One after the other, on a connection the probe just used: a question opens no
        # connection of its own.
        call = kind.ask_call(slot, endpoint)
        answer = await upstream.ask(
            call.method,
            call.url,
            call.body,
            min(timeout, call.timeout_s),
            _LIMIT,
            slot.api_key_env,
            headers=PROBE_HEADERS,
        )
        text = answer.error if answer.body is None else ""
        verdict = kind.spoke(answer.status, answer.body, text)
        if verdict is not None:
            found[endpoint] = verdict
    if found:
        log.info(
            "slot %s speaks %s",
            slot.name,
            ", ".join(f"{e}: {'yes' if yes else 'no'}" for e, yes in sorted(found.items())),
        )
    return found
