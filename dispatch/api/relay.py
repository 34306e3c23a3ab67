"""Relaying an upstream's answer: buffered JSON (checked), streams, bytes, upstream errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from django.http import HttpResponse, StreamingHttpResponse

from dispatch.api.drain import drain
from dispatch.api.responses import Answer, error_response, start, visible
from dispatch.conf import conf
from dispatch.coordination import stored_responses
from dispatch.coordination.affinity import StreamSniffer, affinity, response_id
from dispatch.lib import json_reader
from dispatch.observability.decisions import DecisionRecord, record
from dispatch.upstream.forward import Forwarded
from dispatch.upstream.loads import Waiting
from dispatch.upstream.response import UpstreamError
from dispatch.wire.adapters import Translation
from dispatch.wire.errors import ApiError, excerpt, is_openai_error, upstream_error_status
from dispatch.wire.protocols import OPENAI, WireProtocol, streamed_as

# Statuses whose answer has no body to check.
_NO_BODY = frozenset({204, 205, 304})
# How much of an upstream's error answer is read (to quote or pass through); the rest is
# dropped with the connection.
_ERROR_READ_LIMIT = 64 * 1024
# Answers up to this size are parsed whole to check they are JSON (orjson: ~1 ms a MB);
# a larger one (a big batch of embeddings) would hold the event loop, and every stream on
# it, for tens of ms, so only its ends are looked at. (A body cut short is caught anyway:
# its Content-Length or chunked framing is not met.)
_PARSE_CHECK_BYTES = 1024 * 1024


def answer_usage(rec: DecisionRecord, content: bytes, protocol: WireProtocol = OPENAI) -> None:
    """Token counts from a JSON answer (``protocol`` says where it keeps them)."""
    usage = protocol.usage_in_answer(content)
    if usage is not None:
        rec.took(*usage)


def stream_usage(rec: DecisionRecord, chunk: bytes, protocol: WireProtocol = OPENAI) -> None:
    """Token counts from the stream's chunk that carried them (the upstream's choice to
    send; the request is never changed to ask for it)."""
    usage = protocol.usage_in_stream(chunk)
    if usage is not None:
        rec.took(*usage)


def _is_json(content: bytes) -> bool:
    if len(content) <= _PARSE_CHECK_BYTES:
        try:
            json_reader.loads(content)
        except json_reader.TooDeep:
            return True  # nested past what hal0web reads, which it need not: it passes as it came
        except ValueError:
            return False
        return True
    first, last = content[:64].lstrip()[:1], content[-64:].rstrip()[-1:]
    return (first, last) in ((b"{", b"}"), (b"[", b"]"))


def _finish(response: HttpResponse, rec: DecisionRecord) -> HttpResponse:
    visible(response, rec)
    rec.ended()
    record(rec)
    return response


def _proxy_error(
    rec: DecisionRecord, err: ApiError, upstream_status: int, protocol: WireProtocol
) -> HttpResponse:
    response = error_response(err, protocol)
    response["X-Hal0-Upstream-Status"] = str(upstream_status)
    rec.failed(err.status, err.code)
    return response


def _with_headers(response: HttpResponse, fwd: Forwarded) -> HttpResponse:
    for key, value in fwd.response.headers():
        response[key] = value
    if fwd.translation is not None:  # what the translation says of itself (X-Hal0-Dropped)
        for key, value in fwd.translation.headers.items():
            response[key] = value
    return response


async def _keep(fwd: Forwarded, translation: Translation) -> None:
    """What a translation made that the slot does not keep (a Responses response), kept by
    hal0web before the client has the bytes that end it: a follow-up on any worker finds it."""
    kept, translation.kept = translation.kept, None
    if kept is not None:
        await stored_responses.keep(kept, fwd.slot.name, fwd.upstream_model)


def _read_failed(fwd: Forwarded, exc: UpstreamError) -> ApiError:
    if exc.kind == "timeout":  # max_duration_s
        return ApiError(504, "upstream_timeout", exc.message)
    if exc.kind == "too_large":
        return ApiError(
            502,
            "upstream_response_too_large",
            f"Slot '{fwd.slot.name}': {exc.message} (HAL0_MAX_RESPONSE_MB); "
            "ask for less, or stream it.",
        )
    return ApiError(502, "upstream_broken", exc.message)


def _invalid(fwd: Forwarded, said: str) -> ApiError:
    """502 for an answer the client cannot be given as it is (``said``: what the slot did)."""
    return ApiError(502, "upstream_invalid_response", f"Slot '{fwd.slot.name}' {said}.")


async def buffered(
    fwd: Forwarded, rec: DecisionRecord, protocol: WireProtocol, records_response: bool
) -> HttpResponse:
    """A 2xx JSON answer, read whole and checked before it goes out."""
    status = fwd.response.status_code
    try:
        content = await fwd.response.read(int(conf.HAL0_MAX_RESPONSE_MB * 2**20))
    except UpstreamError as exc:
        return _finish(_proxy_error(rec, _read_failed(fwd, exc), status, protocol), rec)
    finally:
        fwd.release()
    encoded = bool(fwd.response.encoding)  # one we do not decode: it passes as it came
    if status not in _NO_BODY and not encoded and not _is_json(content):
        # An OpenAI client would fail on it with its JSON parser's words, or worse, take a
        # proxy's HTML page for an answer: say what happened instead.
        said = f"answered {status} with a body that is not JSON: {excerpt(content) or '(empty)'}"
        return _finish(_proxy_error(rec, _invalid(fwd, said), status, protocol), rec)
    if fwd.translation is not None:
        if encoded:
            said = f"answered in {fwd.response.encoding} encoding, which hal0web cannot translate"
            return _finish(_proxy_error(rec, _invalid(fwd, said), status, protocol), rec)
        try:
            content = fwd.translation.answer(content)
        except ValueError as exc:
            said = f"answered with what hal0web cannot translate: {exc}"
            return _finish(_proxy_error(rec, _invalid(fwd, said), status, protocol), rec)
        await _keep(fwd, fwd.translation)
    elif records_response:  # (a translated response's id is hal0web's own, kept above)
        rid = response_id(content)
        if rid is not None:
            # Before the client has the id: from then on every worker must find it.
            await affinity.remember(rid, fwd.slot.name)
    response = _with_headers(Answer(content, status), fwd)
    if fwd.translation is not None:
        response["Content-Type"] = fwd.translation.answer_type
    if not encoded and protocol.usage_marker in content:
        answer_usage(rec, content, protocol)
    if rec.body is not None:  # HAL0_LOG_BODIES: keep the answer too, capped the same
        rec.answer = content[: conf.HAL0_LOG_BODY_MAX_BYTES]
    return _finish(response, rec)


async def upstream_failed(
    fwd: Forwarded, rec: DecisionRecord, protocol: WireProtocol
) -> HttpResponse:
    """An upstream's error answer, before any byte reached the client.

    The model server's own OpenAI-shaped error passes as it is (its status and words are
    the most precise thing to tell the client: context too long, a bad parameter). Anything
    else (an HTML error page from a proxy or a crashed server, JSON of another shape, a
    stream) becomes hal0web's own error, ``upstream_error``, with the upstream's status kept
    where it means something to the client and a short excerpt of what it said.
    """
    status = fwd.response.status_code
    try:
        content = await fwd.response.read_prefix(_ERROR_READ_LIMIT)
    finally:
        fwd.release()
    own = None if fwd.translation is None else fwd.translation.refused(status, content)
    if own is not None and fwd.translation is not None:
        # The translation does without what the upstream refused (Translation.refused).
        response: HttpResponse = Answer(own, 200, fwd.translation.answer_type)
        response["X-Hal0-Upstream-Status"] = str(status)
        rec.status = response.status_code
        return _finish(response, rec)
    data: Any = None
    stream = streamed_as(protocol, fwd.response.content_type) is not None
    if not stream and len(content) < _ERROR_READ_LIMIT:
        try:
            data = json_reader.loads(content)
        except ValueError:
            pass
    if is_openai_error(data) and fwd.translation is not None:
        # The offered endpoint's error, said again in the protocol the client called.
        said = data["error"]
        code = said.get("code") if isinstance(said.get("code"), str) else None
        err = ApiError(
            status, code or str(said.get("type") or "upstream_error"), str(said.get("message"))
        )
        response = _proxy_error(rec, err, status, protocol)
        rec.error = "upstream_error"
        return _finish(response, rec)
    if is_openai_error(data) or (fwd.translation is None and protocol.is_own_error(data)):
        # (An Ollama server's {"error": "..."} on Ollama's own paths too.)
        response = _with_headers(Answer(content, status), fwd)
        response["X-Hal0-Upstream-Status"] = str(status)
        rec.error = "upstream_error"
        return _finish(response, rec)
    said = excerpt(content)
    err = ApiError(
        upstream_error_status(status),
        "upstream_error",
        f"Slot '{fwd.slot.name}' answered {status}" + (f": {said}" if said else " with no body"),
    )
    response = _proxy_error(rec, err, status, protocol)
    retry_after = fwd.response.header("retry-after")
    if retry_after and err.status in (429, 503):
        response["Retry-After"] = retry_after
    return _finish(response, rec)


async def _ended(fwd: Forwarded, rec: DecisionRecord) -> None:
    """A relayed body is over (or abandoned): the upstream connection and the slot's place
    go back at once."""
    await fwd.response.aclose()
    fwd.release()
    rec.ended()


class _Relayed(StreamingHttpResponse):
    """A stream of the relay's own parts, given out as they are: they are bytes already, and
    Django's ``streaming_content`` would wrap them in one more async generator (and a
    ``make_bytes`` call) on every chunk. Made as ``Answer`` is (``start``), for less."""

    def __init__(
        self, body: AsyncIterator[bytes], status: int, content_type: str | None = None
    ) -> None:
        start(self, status, content_type)
        # What StreamingHttpResponse keeps of an async iterator, without first trying it as
        # a sync one (a TypeError raised and caught on every stream). An async generator
        # has no close() for the resource closers: aclose() is the handler's (aclosing).
        self._iterator: Iterator[bytes] | AsyncIterator[bytes] = body
        self.is_async = True

    @property
    def streaming_content(self) -> Iterator[bytes] | AsyncIterator[bytes]:
        if self.is_async:
            return self._iterator
        return super().streaming_content

    @streaming_content.setter
    def streaming_content(self, value: Iterable[object] | AsyncIterable[object]) -> None:
        self._set_streaming_content(value)  # type: ignore[attr-defined]


def _relayed(body: AsyncIterator[bytes], fwd: Forwarded, rec: DecisionRecord) -> _Relayed:
    response = _Relayed(body, fwd.response.status_code)
    for key, value in fwd.response.headers():
        response[key] = value
    response["X-Accel-Buffering"] = "no"  # nginx must not hold it back
    visible(response, rec)
    return response


def passthrough(fwd: Forwarded, rec: DecisionRecord) -> StreamingHttpResponse:
    """A 2xx answer that is bytes, not JSON (speech audio, a transcript as text/srt/vtt):
    passed through as it arrives, unchecked and unchanged."""

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in fwd.response.chunks():
                rec.first_chunk()
                yield chunk
        except UpstreamError as exc:
            # Audio has no error event: a body cut short must not look whole, so the
            # connection ends without the body's last chunk.
            rec.error = f"upstream_{exc.kind}"
            raise
        except BaseException:
            # (Cut by the drain it ends the same way, without its last chunk.)
            rec.error = "shutting_down" if drain.cut else "client_disconnected"
            raise
        finally:
            await _ended(fwd, rec)
            record(rec)

    return _relayed(relay(), fwd, rec)


class _Watch:
    """What a stream relay keeps an eye on as chunks pass: the last bytes sent (does the
    stream sit between two events?), the chunk with the token counts, what is logged."""

    def __init__(self, rec: DecisionRecord, protocol: WireProtocol, plain: bool) -> None:
        self.last = b""  # the last chunk, or (after one under 4 bytes) the stream's last bytes
        self.usage: bytes | None = None
        # HAL0_LOG_BODIES: what the client was sent, up to the cap (rec.body is set only then).
        self.room = conf.HAL0_LOG_BODY_MAX_BYTES if rec.body is not None else 0
        self.kept: list[bytes] | None = [] if self.room else None
        self.marker = protocol.usage_marker if plain else None

    @property
    def tail(self) -> bytes:
        """The stream's last 4 bytes so far."""
        return self.last[-4:]

    def saw(self, chunk: bytes) -> None:
        # The chunk itself, not its end cut out: a new bytes object on every chunk otherwise.
        self.last = chunk if len(chunk) >= 4 else self.last[-4:] + chunk
        if self.marker is not None and self.marker in chunk:
            self.usage = chunk  # the last one wins: OpenAI sends usage in the final chunk
        if self.kept is not None and self.room > 0:
            self.kept.append(chunk[: self.room])
            self.room -= len(self.kept[-1])


def streaming(
    fwd: Forwarded, rec: DecisionRecord, protocol: WireProtocol, records_response: bool
) -> StreamingHttpResponse:
    """A stream in ``protocol``'s framing, relayed as it arrives. A failure after the first
    byte ends it with one error event of that protocol (an SSE event, an NDJSON line)."""
    response = _relayed(_stream_body(fwd, rec, protocol, records_response), fwd, rec)
    response["Cache-Control"] = "no-cache"
    if fwd.translation is not None:
        response["Content-Type"] = fwd.translation.stream_type
        for key, value in fwd.translation.headers.items():
            response[key] = value
    return response


async def _translated(
    fwd: Forwarded, translation: Translation, plain: bool
) -> AsyncIterator[bytes]:
    """A translated call's stream as the client is sent it: re-framed event by event into
    the client's protocol (``Translation.stream``) as the upstream's chunks arrive."""
    if not plain:
        raise UpstreamError("broken", "a compressed stream cannot be translated")
    async for chunk in fwd.response.chunks():
        out = translation.stream(chunk)
        await _keep(fwd, translation)  # (its last event may be the one that ends the answer)
        if out:  # whole events of the client's protocol, or none yet
            yield out
    last = translation.end()
    await _keep(fwd, translation)
    if last:
        yield last


async def _stream_body(
    fwd: Forwarded, rec: DecisionRecord, protocol: WireProtocol, records_response: bool
) -> AsyncIterator[bytes]:
    """The upstream's stream as it arrives; records the request when it ends."""
    # A compressed stream (the upstream ignored our Accept-Encoding: identity) goes through
    # as it came, header and all: its bytes are no events to look into or to end with one.
    plain = not fwd.response.encoding
    # A Responses stream names its response in its first event, response.created (a
    # translated one's id is hal0web's own: kept by hal0web when it ends, see _keep).
    sniffer = StreamSniffer() if records_response and plain and fwd.translation is None else None
    watch = _Watch(rec, protocol, plain)
    try:
        translation = fwd.translation
        # Passthrough iterates the upstream's chunks directly: no layer more per chunk.
        chunks = (
            fwd.response.chunks() if translation is None else _translated(fwd, translation, plain)
        )
        async for chunk in chunks:
            watch.saw(chunk)
            rec.first_chunk()
            if sniffer is not None and not sniffer.done:
                rid = sniffer.feed(chunk)
                if rid is not None:  # recorded before the client sees the id
                    await affinity.remember(rid, fwd.slot.name)
            yield chunk
        if plain and not protocol.between_events(watch.tail):
            # The upstream ended cleanly as far as HTTP goes, but in the middle of an
            # event: a client's parser would drop the cut event without a word.
            rec.error = "upstream_truncated"
            cut = "the upstream ended the stream in the middle of an event"
            yield protocol.error_event(rec.error, cut, watch.tail)
    except UpstreamError as exc:
        # Headers are gone already; the only honest thing left is a last error event
        # (in a compressed stream it would be garbage: the cut alone says it failed).
        rec.error = f"upstream_{exc.kind}"
        if plain:
            yield protocol.error_event(rec.error, exc.message, watch.tail)
    except ValueError as exc:  # a translation met what the offered endpoint never sends
        rec.error = "upstream_invalid_response"
        said = f"Slot '{fwd.slot.name}' streamed what hal0web cannot translate: {exc}"
        yield protocol.error_event(rec.error, said, watch.tail)
    except asyncio.CancelledError:
        if not drain.taken():
            rec.error = "client_disconnected"
            raise
        # The server stops and HAL0_DRAIN_S is over: the stream ends now, as any stream that
        # fails after its first byte, with the chunked body ended after that last event.
        rec.error = "shutting_down"
        if plain:
            yield _cut_event(protocol, watch.tail)
    except BaseException:
        # The client went away, or (cut while a slow client held the send) the drain ended it.
        rec.error = "shutting_down" if drain.cut else "client_disconnected"
        raise
    finally:
        # Runs on normal end, on upstream failure, and when the client disconnects (Django
        # cancels this generator): closing the response closes the upstream connection.
        await _ended(fwd, rec)
        if watch.usage is not None:
            stream_usage(rec, watch.usage, protocol)
        if watch.kept is not None:
            rec.answer = b"".join(watch.kept)
        record(rec)


# While a streaming request waits for its model, a comment line this often keeps the
# client informed and idle-timeout proxies from cutting the wait.
COMMENT_EVERY_S = 2.0


def waiting_stream(
    forwarding: asyncio.Future[Forwarded],
    latest: Callable[[], Waiting | None],
    rec: DecisionRecord,
    protocol: WireProtocol,
    records_response: bool,
) -> StreamingHttpResponse:
    """A streaming request whose model is still being loaded: its stream starts now, with
    an SSE comment (``: hal0 queued position=2 reason=loading model=gemma3 progress=40``)
    every ``COMMENT_EVERY_S`` until the upstream's first byte; the SDKs skip comments. A
    failure from then on (the load failed, the wait ran out, the upstream refused) is the
    stream's one error event, as for any stream that fails after its first byte."""

    async def body() -> AsyncIterator[bytes]:
        try:
            while not forwarding.done():
                waiting = latest()
                if waiting is not None:
                    yield waiting.comment()
                await asyncio.wait((forwarding,), timeout=COMMENT_EVERY_S)
            failure = forwarding.exception()
        except BaseException as exc:
            forwarding.cancel()  # the client went away: so does the wait, and its demand
            if isinstance(exc, asyncio.CancelledError) and drain.taken():
                # Still waiting for its model when the server's drain ran out.
                rec.failed(503, "shutting_down")
                rec.ended(by_us=True)
                record(rec)
                yield _cut_event(protocol, b"")
                return
            rec.failed(499, "client_disconnected")
            rec.ended()
            record(rec)
            raise
        if isinstance(failure, ApiError):
            rec.failed(failure.status, failure.code)
            rec.ended(by_us=True)
            record(rec)
            yield _error_event(protocol, failure)
            return
        if failure is not None:
            raise failure
        fwd = forwarding.result()
        status = fwd.response.status_code
        rec.answered(fwd.slot.name, fwd.upstream_model, fwd.resolution_path, status, fwd.mode)
        rec.queued_ms = fwd.queued_s * 1000
        yield f": hal0 dequeued queued_ms={rec.queued_ms:.0f}\n\n".encode()
        if status >= 400 or streamed_as(protocol, fwd.response.content_type) is None:
            said = excerpt(await fwd.response.read_prefix(_ERROR_READ_LIMIT))
            await _ended(fwd, rec)
            refused = ApiError(
                upstream_error_status(status) if status >= 400 else 502,
                "upstream_error",
                f"Slot '{fwd.slot.name}' answered {status} where a stream was expected"
                + (f": {said}" if said else ""),
            )
            rec.failed(refused.status, refused.code)
            record(rec)
            yield _error_event(protocol, refused)
            return
        async for chunk in _stream_body(fwd, rec, protocol, records_response):
            yield chunk

    response = _Relayed(body(), 200, protocol.framing.content_type)
    response["X-Accel-Buffering"] = "no"
    response["Cache-Control"] = "no-cache"
    visible(response, rec)
    return response


def _cut_event(protocol: WireProtocol, tail: bytes) -> bytes:
    """A stream's last event when the server's drain ended it (``tail``: what was sent)."""
    err = drain.refusal()
    return protocol.error_event(err.code, err.message, tail, err.status)


def _error_event(protocol: WireProtocol, err: ApiError) -> bytes:
    body = protocol.error_body(err.status, err.code, err.message)
    return protocol.framing.event(body, b"", protocol.error_event_name)
