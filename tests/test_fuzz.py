"""Everything a fuzzer sends gets an answer a client can parse (issue 14): bodies *and*
headers (any latin-1 text HTTP allows in a field) through the real server on a loopback
socket, by key and by the page's session. Never a 500, never an HTML page."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.models import ApiKey

PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/models/hermes",
    "/v1/nowhere",
]
# A field value: visible ASCII, space, tab and obs-text (0x80-0xff), as RFC 9110 allows;
# a server refuses other bytes (a NUL, a bare CR) itself, before any application.
FIELD_CHARS = st.sampled_from(
    [chr(c) for c in range(0x20, 0x7F)] + [chr(c) for c in range(0x80, 0x100)] + ["\t"]
)
FIELD = st.text(FIELD_CHARS, max_size=40).map(str.strip)
# Headers clients send every day, fuzzed freely: the request still goes upstream.
HEADER_NAMES = st.sampled_from(
    ["X-Title", "User-Agent", "Accept", "X-Request-Id", "OpenAI-Organization", "X-Stainless-Lang"]
)
# Headers that decide whether it may go at all: fuzzed now and then.
GATE_NAMES = st.sampled_from(
    [
        "Authorization",
        "X-Api-Key",
        "Origin",
        "Referer",
        "Host",
        "Content-Type",
        "X-CSRFToken",
        "Cookie",
        "X-Forwarded-Proto",
        "Accept-Encoding",
    ]
)
HEADERS = st.tuples(
    st.dictionaries(HEADER_NAMES, FIELD, min_size=1, max_size=4),
    st.dictionaries(GATE_NAMES, FIELD, max_size=1) | st.just({}),
).map(lambda pair: {**pair[0], **pair[1]})
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json",
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=B",
        "multipart/form-data",
        "application/json; charset=latin-1",
    ]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Mostly a request a model server would take, so the fuzzed headers travel all the way.
ROUTED = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["hermes", "qwen3-coder-40b", "primary", "agent-hermes"]),
        "messages": st.just([{"role": "user", "content": "hi"}]) | JSON_VALUES,
    },
    optional={"stream": st.booleans(), "input": JSON_VALUES, "max_tokens": JSON_VALUES},
).map(lambda d: json.dumps(d).encode())
BODIES = st.one_of(
    ROUTED,
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["nope", ""]) | JSON_VALUES},
        optional={"messages": JSON_VALUES, "stream": JSON_VALUES},
    ).map(lambda d: json.dumps(d).encode()),
    st.just(b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nhermes\r\n--B--\r\n'),
)
BODIES = st.sampled_from([ROUTED] * 4 + [BODIES]).flatmap(lambda strategy: strategy)
REQUESTS = st.tuples(
    st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH"]),
    st.sampled_from(PATHS[:1] * 4 + PATHS),
    HEADERS,
    CONTENT_TYPES,
    BODIES,
)


def check(client: httpx.Client, method: str, path: str, headers: dict, ctype: str, body: bytes):
    sent = {"Content-Type": ctype, **client.headers}
    sent.update(headers)
    raw = {k.encode(): v.encode("latin-1") for k, v in sent.items()}
    r = client.request(method, path, content=body, headers=raw)
    assert r.status_code != 500, r.text
    kind = r.headers.get("content-type", "")
    if r.status_code == 200 and kind.startswith("text/event-stream"):
        return  # a stream the fake upstream answered: its own format
    assert kind.startswith("application/json"), (r.status_code, kind, r.text[:300])
    data = r.json()
    if r.status_code >= 400:
        assert set(data["error"]) >= {"message", "type", "param", "code"}, data


FUZZ = settings(
    max_examples=300,
    deadline=None,
    # The server and its fakes are one per test, not per example: that is the point.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def client(seed_slots, hal0):
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        yield c


@FUZZ
@given(request=REQUESTS)
def test_fuzzed_requests_with_a_key_get_json(client, request):
    if not ApiKey.objects.exists():
        client.headers["Authorization"] = "Bearer " + ApiKey.issue("fuzz")[1]
    check(client, *request)


@FUZZ
@given(request=REQUESTS)
def test_fuzzed_requests_on_the_page_session_get_json(client, django_user_model, request):
    if "X-CSRFToken" not in client.headers:
        django_user_model.objects.create_user("fuzz", password="pw-fuzz-1")
        form = client.get("/accounts/login/")
        found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert found is not None
        client.post(
            "/accounts/login/",
            data={"username": "fuzz", "password": "pw-fuzz-1", "csrfmiddlewaretoken": found[1]},
        )
        client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
        client.headers["Origin"] = f"{client.base_url.scheme}://{client.base_url.netloc.decode()}"
        ApiKey.issue("closed")  # the session path, not an open API
    check(client, *request)
