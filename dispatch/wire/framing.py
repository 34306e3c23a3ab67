"""How a stream's events are framed on the wire: SSE (OpenAI, Anthropic) and NDJSON (Ollama).

Pure: no Django, no I/O. A framing knows where one event ends (so a relay can tell whether a
stream was cut inside one) and how to frame one more event after what was already sent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator


class Framing(ABC):
    """A stream format. ``content_type`` is the media type an upstream names it by."""

    content_type: str
    # The ends of what was sent that leave a parser between two events.
    _event_ends: tuple[bytes, ...]
    # What ends an event that was cut, before another one can follow it.
    _close: bytes

    def between_events(self, tail: bytes) -> bool:
        """Whether a stream whose last bytes are ``tail`` (up to 4) ends between two events."""
        return not tail or tail.endswith(self._event_ends)

    def is_stream(self, content_type: str) -> bool:
        return content_type.startswith(self.content_type)

    def event(self, payload: bytes, tail: bytes = b"", name: str | None = None) -> bytes:
        """One complete event carrying ``payload``, sent after a stream ending in ``tail``.

        If an event was cut at ``tail``, it is ended first, so this one is an event a
        client's parser can read, not glued onto half of another (which the client would
        see as one invalid JSON, losing both).
        """
        close = b"" if self.between_events(tail) else self._close
        return close + self._frame(payload, name)

    @abstractmethod
    def payloads(self, chunk: bytes) -> Iterator[bytes]:
        """The JSON payloads of the events in ``chunk``, last first."""

    @abstractmethod
    def _frame(self, payload: bytes, name: str | None) -> bytes:
        """One event carrying ``payload`` (named ``name`` where the framing names events)."""


class ServerSentEvents(Framing):
    """text/event-stream: ``data:`` lines, events ended by a blank line."""

    content_type = "text/event-stream"
    # A blank line, in any of the three line-ending styles the format allows.
    _event_ends = (b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n", b"\r\n\n", b"\n\r")
    _close = b"\n\n"

    def payloads(self, chunk: bytes) -> Iterator[bytes]:
        for line in reversed(chunk.split(b"\n")):
            if line.startswith(b"data:"):
                yield line[5:]

    def _frame(self, payload: bytes, name: str | None) -> bytes:
        named = b"event: " + name.encode() + b"\n" if name else b""
        return named + b"data: " + payload + b"\n\n"


class NewlineDelimitedJson(Framing):
    """application/x-ndjson: one JSON value a line (Ollama's streams). Events have no names."""

    content_type = "application/x-ndjson"
    _event_ends = (b"\n",)
    _close = b"\n"

    def payloads(self, chunk: bytes) -> Iterator[bytes]:
        for line in reversed(chunk.split(b"\n")):
            if line.strip():
                yield line

    def _frame(self, payload: bytes, name: str | None) -> bytes:
        return payload + b"\n"


SSE = ServerSentEvents()
NDJSON = NewlineDelimitedJson()


class EventReader:
    """An upstream SSE stream's events, whole, as its chunks arrive: what a translation
    reads (a chunk may end inside an event; that event waits for the rest, nothing more
    is kept). ``feed`` gives each complete event's name (None when unnamed) and data
    (its ``data:`` lines joined); comments and events without data are skipped."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[tuple[str | None, bytes]]:
        text = self._rest + chunk
        held = b""
        if b"\r" in text:
            if text.endswith(b"\r"):  # a CRLF cut in two: the LF may be in the next chunk
                text, held = text[:-1], b"\r"
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *whole, rest = text.split(b"\n\n")
        self._rest = rest + held
        events: list[tuple[str | None, bytes]] = []
        for block in whole:
            name: str | None = None
            data: list[bytes] = []
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                elif line.startswith(b"event:"):
                    name = line[6:].strip().decode("utf-8", "replace")
            if data:
                events.append((name, b"\n".join(data)))
        return events

    @property
    def cut(self) -> bool:
        """Whether the stream so far ends inside an event (bytes wait for their rest)."""
        return bool(self._rest.strip())
