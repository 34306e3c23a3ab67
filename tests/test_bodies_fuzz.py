"""Bad input on every endpoint, through the real server (issue 24): whatever the body, the
query string, the method or the framing, each endpoint of the table answers in its clients'
protocol — never a 500, never a traceback in the log.

The bodies are generated structure: nesting to any depth, with and without ``\\u`` escapes
(lone surrogates too), huge arrays, bytes that are not UTF-8, empty ones. They go over a raw
socket, so the framing is generated too: chunked, a Content-Length too short or too long,
none, both, invalid. The endpoints are the endpoint table's, every path of every entry.
Behind hal0web are fake model servers for every slot type, one that serves Anthropic's,
the Responses API and Ollama's requests by translation, and an Ollama server.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dispatch.lib.json_reader import MAX_DEPTH
from dispatch.models import RequestLog
from dispatch.observability import requestlog
from dispatch.routing.endpoints import API_PREFIXES, ENDPOINTS, Endpoint
from dispatch.wire.protocols import ANTHROPIC, OLLAMA, OPENAI, WireProtocol
from tests.conftest import add_slot
from tests.fake_ollama import FakeOllama
from tests.fake_openai_chat import FakeChat
from tests.fakes import FakeUpstream, ServerThread
from tests.raw_upstream import RawRequest, RawUpstream, http_response

# slot (its model's name too) -> its fake, its type, its other fields. The default slot is
# "native"; "translated" speaks only chat and completions, so Anthropic's, the Responses
# API's and Ollama's requests reach it translated (and are re-encoded on the way).
OLLAMA_MODEL = "llama3.2:1b"
SLOTS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "native": (FakeUpstream("native", models=["native"], listing="llama.cpp"), "llm", {}),
    "translated": (
        FakeChat("translated", models=["translated"]),
        "llm",
        {"endpoints": ["chat/completions", "completions"]},
    ),
    "emb": (FakeUpstream("emb", models=["emb"]), "embedding", {}),
    "rr": (FakeUpstream("rr", models=["rr"]), "reranking", {}),
    "stt": (FakeUpstream("stt", models=["stt"]), "transcription", {}),
    "tts": (FakeUpstream("tts", models=["tts"]), "tts", {}),
    "img": (FakeUpstream("img", models=["img"]), "image", {}),
    "ol": (FakeOllama(models=[OLLAMA_MODEL]), "llm", {"kind": "ollama"}),
}
MODEL_NAMES = [*(name for name in SLOTS if name != "ol"), OLLAMA_MODEL]

# What uvicorn itself answers to bytes that are no HTTP request: before any application.
SERVER_REFUSALS = {b"Invalid HTTP request received."}


@dataclass
class Served:
    port: int
    fake_threads: frozenset[int]  # the fakes log their own tracebacks: not hal0web's


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, ServerThread]]:
    servers = {name: ServerThread(fake).start() for name, (fake, _, _) in SLOTS.items()}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def served(fakes: dict[str, ServerThread], no_watcher: None, hal0: ServerThread) -> Served:
    for name, (fake, slot_type, fields) in SLOTS.items():
        add_slot(
            name,
            fakes[name].url + "/v1",
            list(fake.models),
            type=slot_type,
            state="ready",
            is_default=name == "native",
            **fields,
        )
    idents = frozenset(s._thread.ident for s in fakes.values() if s._thread and s._thread.ident)
    return Served(hal0.port, idents)


class _Tracebacks(logging.Handler):
    """Every record of hal0web's (and of the server around it) with a traceback or at ERROR."""

    def __init__(self, ignored_threads: frozenset[int]) -> None:
        super().__init__(logging.DEBUG)
        self.ignored = ignored_threads
        self.seen: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread in self.ignored:
            return
        if record.exc_info or record.levelno >= logging.ERROR or "Traceback" in str(record.msg):
            self.seen.append(record)


@pytest.fixture
def tracebacks(served: Served) -> Iterator[list[logging.LogRecord]]:
    """What is logged with a traceback meanwhile. Watched at the root and at every logger
    that does not pass records up to it (hal0web's, Django's, Uvicorn's), once the servers
    have configured them."""
    handler = _Tracebacks(served.fake_threads)
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and not logger.propagate
    ]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.seen
    # What is written after the answers (the request log's rows) fails after the test.
    requestlog.writer.flush(5)
    for logger in loggers:
        logger.removeHandler(handler)
    assert not handler.seen, _logged(handler.seen)


def _logged(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(r) for r in records[:3])


# --- a raw HTTP/1.1 client: any bytes out, h11 reads what comes back --------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(port: int, request: bytes, head: bool, complete: bool) -> list[Answer]:
    """Send ``request`` as it is; the answers that come back before the server closes.
    ``complete``: the server has a whole request (else the write side is closed at once,
    and no answer is due). ``head``: a HEAD request's answer has no body."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(request)
            if not complete:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            raise  # a server that neither answers nor closes: a hang
        except OSError:
            # The server answered and closed before it read all we sent (a refusal, or
            # bytes past the request's end): its close is a reset, which may take the
            # answer with it. Only what arrived is checked.
            pass
    try:
        return read_answers(received, head)
    except h11.RemoteProtocolError:
        if not head:
            raise
        # No HEAD request reached the server (it refused the bytes): its answer has a body.
        return read_answers(received, False)


def read_answers(received: bytes, head: bool) -> list[Answer]:
    """Each answer in ``received``, read by h11 as a client that sent a request it cannot
    see (only HEAD changes how an answer is framed); what follows one is read as the next."""
    answers: list[Answer] = []
    rest = received
    while rest:
        if rest.startswith(b"HTTP/1.1 100 "):  # "go on" to an Expect: 100-continue, not an answer
            rest = rest[rest.index(b"\r\n\r\n") + 4 :]
            continue
        conn = h11.Connection(h11.CLIENT)
        conn.send(
            h11.Request(method="HEAD" if head else "GET", target="/", headers=[("Host", "x")])
        )
        conn.send(h11.EndOfMessage())
        conn.receive_data(rest)
        conn.receive_data(b"")  # the server has closed
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"an answer cut short: {event!r} after {received[:300]!r}")
        answers.append(Answer(status, headers, body))
        rest = conn.trailing_data[0]
        head = False
    return answers


def frame(
    method: bytes, target: bytes, headers: list[bytes], body: bytes, framing: str, cuts: list[int]
) -> tuple[bytes, bool]:
    """The request's bytes with its body framed as ``framing`` says, and whether the server
    then has a whole request (and nothing past it)."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += headers
    complete = True
    if framing in ("chunked", "chunked-ext", "unended-chunks", "bad-chunk", "both"):
        lines.append(b"Transfer-Encoding: chunked")
        if framing == "both":
            lines.append(b"Content-Length: %d" % len(body))
        pieces, at = [], 0
        for cut in sorted(c % (len(body) + 1) for c in cuts):
            pieces.append(body[at:cut])
            at = cut
        pieces.append(body[at:])
        ext = b";ext=1" if framing == "chunked-ext" else b""
        payload = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces if p)
        if framing == "bad-chunk":
            payload = b"zz\r\n" + payload
        if framing == "unended-chunks":
            complete = False
        else:
            payload += b"0\r\nX-Trailer: 1\r\n\r\n" if framing == "chunked-ext" else b"0\r\n\r\n"
    else:
        payload = body
        length = {
            "length": b"%d" % len(body),
            "short": b"%d" % (len(body) // 2),
            "long": b"%d" % (len(body) + 10),
            "bad-length": b"12abc",
            "negative": b"-1",
        }.get(framing)
        if length is not None:
            lines.append(b"Content-Length: " + length)
        # Too long: the server waits for more. Too short or none: the rest is bytes past the
        # request, and the server's close may reset the connection before its answer is read.
        complete = framing == "length" or (framing in ("short", "none") and not body)
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload, complete


# --- what every answer must be ------------------------------------------------------------------


def _protocol_of(ep: Endpoint, target: bytes, code: object) -> WireProtocol:
    if code == "not_found":  # a path the table does not hold (an odd id): its prefix's clients
        path = target.decode("latin-1")
        return next((p for prefix, p in API_PREFIXES.items() if path.startswith(prefix)), OPENAI)
    return ep.protocol


def assert_in_protocol(protocol: WireProtocol, data: Any) -> None:
    if protocol is OPENAI:
        assert set(data["error"]) >= {"message", "type", "param", "code"}, data
    elif protocol is ANTHROPIC:
        assert data["type"] == "error" and set(data["error"]) >= {"type", "message"}, data
    else:
        assert protocol is OLLAMA and isinstance(data["error"], str), data


def _code(answer: Answer) -> str:
    """An answer's error code, for the statistics."""
    try:
        data = json.loads(answer.body)
        code = data["error"].get("code") if isinstance(data["error"], dict) else data["code"]
    except (ValueError, TypeError, KeyError, AttributeError):
        return ""
    return code if isinstance(code, str) else ""


def check(ep: Endpoint, method: bytes, target: bytes, answer: Answer) -> None:
    status, ctype, body = answer.status, answer.headers.get("content-type", ""), answer.body
    said = f"{method!r} {target[:120]!r} -> {status} {ctype} {body[:300]!r}"
    assert status < 500 or status in (502, 503, 504), said
    if status == 400 and "x-request-id" not in answer.headers:
        assert body in SERVER_REFUSALS, said  # the server's own: no HTTP request reached us
        return
    if method == b"HEAD" or status in (204, 304):
        return
    if status < 400:
        if ctype.startswith("text/event-stream"):
            for event in body.split(b"\n\n"):
                for line in event.split(b"\n"):
                    if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                        json.loads(line[5:])
        elif ctype.startswith("application/x-ndjson"):
            for line in filter(None, body.split(b"\n")):
                json.loads(line)
        elif ep.answer == "json":
            assert ctype.startswith("application/json"), said
            json.loads(body)
        return
    assert ctype.startswith("application/json"), said
    data = json.loads(body)
    if answer.headers.get("x-hal0-error") == "1":  # hal0web's own: its clients' shape
        error = data.get("error")
        code = error.get("code") if isinstance(error, dict) else data.get("code")
        assert_in_protocol(_protocol_of(ep, target, code), data)
    else:  # an upstream's error, passed on as it said it
        assert "error" in data or "detail" in data, said


# --- generated requests -------------------------------------------------------------------------

MODELS = st.sampled_from([*MODEL_NAMES, "nope", ""]).map(lambda m: json.dumps(m).encode())
ESCAPES = st.sampled_from(
    [b"", b"\\u00e9", b"\\ud83d", b"\\udc00", b"\\ud83d\\ude00", b"\\u0000", b"\\\\ud83d"]
)
DEPTHS = st.sampled_from(
    [MAX_DEPTH - 2, MAX_DEPTH, MAX_DEPTH + 1, 1000, 1001, 1023, 1024, 1025, 1100, 5000, 20_000]
) | st.integers(0, 3000)
# One level of nesting: how it opens and closes (a sibling before the deeper value, or not).
LEVELS = st.sampled_from(
    [
        (b"[", b"]"),
        (b'{"k":', b"}"),
        (b"[1,", b"]"),
        (b'{"a":"\\ud83d","k":', b"}"),
        (b'[{"t":1},', b"]"),
    ]
)


@st.composite
def deep_bodies(draw: st.DrawFn) -> bytes:
    """A value nested ``depth`` levels (a pattern of arrays and objects, siblings or not), a
    string with an escape inside, in a request's field or alone; whole, or broken."""
    depth = draw(DEPTHS)
    pattern = draw(st.lists(LEVELS, min_size=1, max_size=3))
    escape = draw(ESCAPES)
    levels = [pattern[i % len(pattern)] for i in range(depth)]
    value = (
        b"".join(o for o, _ in levels)
        + b'"x'
        + escape
        + b'"'
        + b"".join(c for _, c in reversed(levels))
    )
    field = draw(st.sampled_from([None, b"messages", b"input", b"prompt", b"model", b"format"]))
    if field is None:
        body = value
    else:
        other = draw(st.sampled_from([b"", b',"user":"u' + escape + b'"', b',"stream":true']))
        body = b'{"model":' + draw(MODELS) + other + b',"' + field + b'":' + value + b"}"
    ending = draw(st.sampled_from(["whole", "whole", "cut", "extra", "mismatched", "trailing"]))
    if ending == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif ending == "extra":
        body += b"]"
    elif ending == "mismatched" and body:
        body = body[:-1] + (b"]" if body.endswith(b"}") else b"}")
    elif ending == "trailing":
        body += b" x"
    return body


@st.composite
def huge_arrays(draw: st.DrawFn) -> bytes:
    """Wide, not deep: many elements (more brackets than MAX_DEPTH), in a field or alone."""
    element = draw(
        st.sampled_from(
            [
                b"0",
                b'""',
                b"{}",
                b"[]",
                b"[[1]]",
                b'{"a":[1,{"b":"\\ud83d"}]}',
                b'"\\u00e9"',
                b"null",
            ]
        )
    )
    field = draw(st.sampled_from([None, b"input", b"messages", b"documents", b"hal0_fuzz"]))
    # Only a field every server leaves alone gets the largest: the rest are read upstream.
    sizes = [MAX_DEPTH + 1, 5_000, 50_000] + ([300_000] if field == b"hal0_fuzz" else [])
    array = b"[" + b",".join([element] * draw(st.sampled_from(sizes))) + b"]"
    if field is None:
        return array
    return b'{"model":' + draw(MODELS) + b',"' + field + b'":' + array + b"}"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# Mostly what the endpoint's clients send, so the request goes all the way upstream.
ROUTED = st.fixed_dictionaries(
    {"model": st.sampled_from(MODEL_NAMES)},
    optional={
        "stream": st.booleans(),
        "messages": st.just([{"role": "user", "content": "hi \ud83d"}]) | JSON_VALUES,
        "input": st.just("hi") | JSON_VALUES,
        "prompt": st.just("hi"),
        "max_tokens": st.integers(1, 4),
        "query": st.just("q"),
        "documents": st.just(["a", "b"]),
        "metadata": JSON_VALUES,
    },
).map(lambda d: json.dumps(d).encode())
NOT_UTF8 = st.sampled_from(
    [
        '{"model":"native","messages":[{"role":"user","content":"é"}]}'.encode("latin-1"),
        '{"model":"native"}'.encode("utf-16"),
        b'\xef\xbb\xbf{"model":"native"}',
        b'{"model":"native","x":"\xed\xa0\xbd"}',  # a surrogate in UTF-8 bytes (CESU-8)
        b'{"model":"\xc0\xaf"}',
        b"\xff\xfe\x00",
    ]
) | st.binary(max_size=200)
FORMS = st.tuples(
    st.sampled_from([b"stt", b"img", b"nope", b"\xff", b'{"a":' * 1100 + b"1" + b"}" * 1100]),
    st.sampled_from([b"", b"RIFF", b"\\ud83d" + b"[" * 2000]),
).map(
    lambda p: (
        b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        + p[0]
        + b'\r\n--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + p[1] + b"\r\n--B--\r\n"
    )
)
BODIES = st.one_of(
    deep_bodies(),
    deep_bodies(),
    huge_arrays(),
    ROUTED,
    ROUTED,
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    NOT_UTF8,
    FORMS,
    st.sampled_from([b"", b" ", b"\r\n", b"{}", b"null"]),
)
CONTENT_TYPES = st.sampled_from(
    [
        b"application/json",
        b"application/json",
        b"application/json; charset=utf-8",
        b"application/json; charset=latin-1",
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=B",
        b"multipart/form-data",
        b"application/x-ndjson",
        b"*/*",
        b"",
        None,
    ]
)
METHODS = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"PUT",
        b"DELETE",
        b"PATCH",
        b"HEAD",
        b"OPTIONS",
        b"TRACE",
        b"PROPFIND",
        b"FOO",
    ]
)
SAFE = string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@/?"
QUERIES = st.sampled_from(
    [
        b"",
        b"?",
        b"?a=1&a=2",
        b"?%ff%fe=%00",
        b"?stream=true&model=nope",
        b"?" + b"x" * 8000,
        b"?a[]=1&a[b]=2",
        b"?%",
        b"?=&=&",
        b"?\xff\xfe",
    ]
) | st.text(SAFE, max_size=60).map(lambda s: b"?" + s.encode())
IDS = st.sampled_from([b"resp_1", b"resp_hal0" + b"0" * 32, b"nope", b"%ff", b"a%2Fb", b"x" * 300])
MODEL_IDS = st.sampled_from([b"native", b"ol/llama3.2:1b", b"nope", b"%2e%2e", b"a/b/c", b"%00"])
FRAMINGS = st.sampled_from(
    ["length"] * 6
    + ["chunked", "chunked-ext", "short", "long", "none", "both", "bad-length", "negative"]
    + ["unended-chunks", "bad-chunk"]
)


@dataclass
class Request:
    ep: Endpoint
    method: bytes
    target: bytes
    headers: list[bytes]
    body: bytes
    framing: str
    cuts: list[int]

    def __repr__(self) -> str:  # a failing example's report: a 300 kB body told in brief
        body = self.body if len(self.body) <= 400 else self.body[:200] + b"..." + self.body[-200:]
        return (
            f"Request({self.ep.name!r}, {self.method!r}, {self.target[:200]!r}, {self.headers!r},"
            f" body={body!r} ({len(self.body)} bytes), framing={self.framing!r}, cuts={self.cuts})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # (Hypothesis's printer)
        printer.text(repr(self))


@st.composite
def requests(draw: st.DrawFn) -> Request:
    ep = draw(st.sampled_from(ENDPOINTS))
    path = draw(st.sampled_from(ep.paths)).encode()
    path = re.sub(rb"<str:\w+>", draw(IDS), path)
    path = re.sub(rb"<path:\w+>", draw(MODEL_IDS), path)
    own = st.sampled_from([m.encode() for m in ep.methods])
    method = draw(st.sampled_from([own, own, own, METHODS]).flatmap(lambda s: s))
    body = draw(FORMS if ep.model_in == "form" and draw(st.booleans()) else BODIES)
    ctype = draw(CONTENT_TYPES)
    if ep.model_in == "form" and body.startswith(b"--B") and draw(st.booleans()):
        ctype = b"multipart/form-data; boundary=B"
    headers = [] if ctype is None else [b"Content-Type: " + ctype]
    if draw(st.booleans()):
        headers.append(b"Expect: 100-continue")
    cuts = draw(st.lists(st.integers(0, 1 << 20), max_size=4))
    return Request(ep, method, b"/" + path + draw(QUERIES), headers, body, draw(FRAMINGS), cuts)


FUZZ = settings(
    max_examples=600,
    deadline=None,
    # The servers are one set per test, not per example: that is the point.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(request=requests())
def test_any_request_on_any_endpoint_gets_an_answer_in_its_protocol(served, tracebacks, request):
    raw, complete = frame(
        request.method, request.target, request.headers, request.body, request.framing, request.cuts
    )
    answers = exchange(served.port, raw, request.method == b"HEAD", complete)
    if complete:
        assert answers, f"no answer to {raw[:300]!r}"
    for answer in answers:
        event(f"{answer.status} {_code(answer)}")  # (--hypothesis-show-statistics)
        check(request.ep, request.method, request.target, answer)
    assert not tracebacks, _logged(tracebacks)


# --- the measured cases, fixed: deep bodies with an escape on every JSON endpoint -----------------

# Every path of every endpoint that reads a JSON body (those that route by it, and Ollama's
# /api/show, which names its model in one).
JSON_PATHS = [
    (ep, path)
    for ep in ENDPOINTS
    if "POST" in ep.methods and ep.model_in in ("json", "none")
    for path in ep.paths
]
MEASURED = [
    # What was measured: past ~1,000 levels, with a \u escape (a lone surrogate, or not).
    b'{"model":"native","messages":' + b"[" * 1001 + b'"\\ud83d"' + b"]" * 1001 + b"}",
    b'{"model":"native","input":' + b'{"k":' * 1100 + b'"\\u00e9"' + b"}" * 1100 + b"}",
    b"[" * 5000 + b'"\\udc00"' + b"]" * 5000,
]


@pytest.mark.parametrize("body", MEASURED, ids=["arrays-1001", "objects-1100", "bare-5000"])
def test_a_deep_body_with_an_escape_is_a_400_in_each_endpoints_protocol(served, tracebacks, body):
    for ep, path in JSON_PATHS:  # (one server for all: a test per path costs a second each)
        ctype = [b"Content-Type: application/json"]
        raw, _ = frame(b"POST", b"/" + path.encode(), ctype, body, "length", [])
        [answer] = exchange(served.port, raw, False, True)
        assert answer.status == 400, (path, answer)
        assert answer.headers["content-type"] == "application/json"
        data = json.loads(answer.body)
        assert_in_protocol(ep.protocol, data)
        error = data["error"]
        code = error["code"] if isinstance(error, dict) else data["code"]
        message = error["message"] if isinstance(error, dict) else error
        assert code == "json_too_deep", (path, data)
        assert f"deeper than {MAX_DEPTH} levels" in message
    assert not tracebacks, _logged(tracebacks)


# --- the bound, exactly, on the paths that re-encode what they read ------------------------------


def _schema(depth: int) -> bytes:
    """A JSON schema nested ``depth`` levels (objects in objects), a lone surrogate inside."""
    return b'{"a":' * (depth - 1) + b'{"description":"cut \\ud83d"}' + b"}" * (depth - 1)


# path, a body whose schema sits at `depth` levels, its own depth around the schema.
AT_THE_BOUND = [
    (
        "v1/chat/completions",
        lambda s: (
            b'{"model":"native","messages":[{"role":"user","content":"hi"}],'
            b'"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":'
            + s
            + b"}}}"
        ),
        3,
    ),
    (
        "v1/messages",
        lambda s: (
            b'{"model":"translated","max_tokens":5,"messages":[{"role":"user",'
            b'"content":"hi"}],"tools":[{"name":"t","input_schema":' + s + b"}]}"
        ),
        3,
    ),
    (
        "v1/responses",
        lambda s: (
            b'{"model":"translated","input":"hi","tools":[{"type":"function",'
            b'"name":"t","parameters":' + s + b"}]}"
        ),
        3,
    ),
    (
        "api/chat",
        lambda s: (
            b'{"model":"translated","stream":false,"messages":[{"role":"user",'
            b'"content":"hi"}],"format":' + s + b"}"
        ),
        1,
    ),
]


def test_a_body_at_the_bound_is_served_and_one_level_more_is_refused(served, tracebacks):
    """At MAX_DEPTH, with a lone surrogate, a request is served — translated ones too, whose
    body hal0web reads, rewrites and encodes again; one level deeper is the 400."""
    for path, body, around in AT_THE_BOUND:
        ep = next(e for e in ENDPOINTS if path in e.paths)
        target, ctype = b"/" + path.encode(), [b"Content-Type: application/json"]
        at = frame(b"POST", target, ctype, body(_schema(MAX_DEPTH - around)), "length", [])[0]
        [answer] = exchange(served.port, at, False, True)
        assert answer.status == 200, (path, answer)
        check(ep, b"POST", target, answer)
        deeper = body(_schema(MAX_DEPTH - around + 1))
        [answer] = exchange(
            served.port, frame(b"POST", target, ctype, deeper, "length", [])[0], False, True
        )
        assert answer.status == 400 and b"json_too_deep" in answer.body, (path, answer)
    assert not tracebacks, _logged(tracebacks)


def test_a_lone_surrogate_in_the_model_is_logged_with_the_rest(served, tracebacks):
    """A model name with a lone surrogate escape (JSON, accepted, and no model's) is a 404;
    its request-log row keeps the escape, and the rows written with it are not lost."""
    for model in (b'"x\\udc00"', b'"\\ud83d"', b'"native"'):
        body = b'{"model":' + model + b',"messages":[{"role":"user","content":"hi"}]}'
        ctype = [b"Content-Type: application/json"]
        raw, _ = frame(b"POST", b"/v1/chat/completions", ctype, body, "length", [])
        [answer] = exchange(served.port, raw, False, True)
        assert answer.status == (200 if model == b'"native"' else 404), answer
    requestlog.writer.flush(5)
    logged = set(RequestLog.objects.values_list("model", flat=True))
    assert logged == {"x\\udc00", "\\ud83d", "native"}
    assert not tracebacks, _logged(tracebacks)


# A chat completion with a field nested past every bound, a lone surrogate inside.
DEEP_ANSWER = (
    b'{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"x_trace":' + b"[" * 1100 + b'"\\ud83d"' + b"]" * 1100 + b"}"
)


def _deep_answer(sock: socket.socket, request: RawRequest) -> bool:
    sock.sendall(http_response(200, DEEP_ANSWER))
    return True


@pytest.fixture
def deep_upstream(served: Served) -> Iterator[RawUpstream]:
    upstream = RawUpstream(_deep_answer)
    add_slot("deep", upstream.url + "/v1", ["deep"], state="ready", endpoints=["chat/completions"])
    yield upstream
    upstream.stop()


def test_an_upstreams_deep_answer_passes_as_it_came_or_is_a_502_to_translate(
    served, deep_upstream, tracebacks
):
    """hal0web reads an answer it only relays no deeper than it needs: a deep one passes as
    the server sent it. One it must translate, it must read: past the bound, a 502 saying
    why, in the client's protocol (it was a 500 with a RecursionError)."""
    ctype = [b"Content-Type: application/json"]
    chat = b'{"model":"deep","messages":[{"role":"user","content":"hi"}]}'
    raw, _ = frame(b"POST", b"/v1/chat/completions", ctype, chat, "length", [])
    [answer] = exchange(served.port, raw, False, True)
    assert answer.status == 200 and answer.body == DEEP_ANSWER, answer
    translated = [
        (
            "v1/messages",
            b'{"model":"deep","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}',
        ),
        ("v1/responses", b'{"model":"deep","input":"hi"}'),
        (
            "api/chat",
            b'{"model":"deep","stream":false,"messages":[{"role":"user","content":"hi"}]}',
        ),
    ]
    for path, body in translated:
        ep = next(e for e in ENDPOINTS if path in e.paths)
        raw, _ = frame(b"POST", b"/" + path.encode(), ctype, body, "length", [])
        [answer] = exchange(served.port, raw, False, True)
        assert answer.status == 502, (path, answer)
        data = json.loads(answer.body)
        assert_in_protocol(ep.protocol, data)
        message = data["error"] if ep.protocol is OLLAMA else data["error"]["message"]
        assert f"deeper than {MAX_DEPTH} levels" in message, (path, message)
    assert not tracebacks, _logged(tracebacks)
