"""The /v1 request (dispatch/api/request.py) reads as Django's own ``ASGIRequest`` would.

``ApiRequest`` builds its headers straight from the scope and ``META`` only when read; every
attribute a view, the CSRF check or a session reads must come out as Django's does for any
scope a server can hand over: the same header names and joined values, the same refusals
(underscored names, a host not in ALLOWED_HOSTS, a query string that is not UTF-8).
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from django.test import override_settings
from hypothesis import example, given
from hypothesis import strategies as st

from dispatch.api.request import ApiRequest, query_string
from dispatch.api.runtime import BareASGIHandler

NAMES = st.sampled_from(
    [
        b"host",
        b"content-type",
        b"content-length",
        b"authorization",
        b"x-api-key",
        b"cookie",
        b"origin",
        b"x-forwarded-host",
        b"x-forwarded-for",
        b"x_forwarded_for",  # underscored: Django drops it (it could pose as the hyphened one)
        b"x-title",
        b"accept",
        b"x-b3-traceid",
        b"user-agent",
    ]
)
# Any byte a server hands over in a value (latin-1 decodes them all, as Django does).
VALUES = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
HOSTS = st.sampled_from(
    [b"localhost", b"127.0.0.1:8000", b"[::1]:9", b"evil.example", b"localhost:80", b""]
)


def _scope(headers: list[tuple[bytes, bytes]], query: bytes = b"", root: str = "") -> dict[str, Any]:  # fmt: skip
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "method": "post",
        "root_path": root,
        "path": f"{root}/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": query,
        "headers": headers,
    }


def _both(scope: dict[str, Any], body: bytes = b"{}") -> tuple[ASGIRequest, ApiRequest]:
    return ASGIRequest(scope, io.BytesIO(body)), ApiRequest(scope, io.BytesIO(body))


def _host(request: ASGIRequest) -> str | type[DisallowedHost]:
    try:
        return str(request.get_host())
    except DisallowedHost:
        return DisallowedHost


@given(
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=10),
    host=HOSTS,
    query=st.sampled_from([b"", b"api-version=2024-06-01", b"a=1&a=2&b=%C3%A9", b"x"]),
    root=st.sampled_from(["", "/hal0"]),
)
@example(  # a repeated header is one value, joined with commas, as Django joins it
    headers=[(b"accept", b"a/b"), (b"accept", b"c/d"), (b"x-title", "café".encode())],
    host=b"localhost",
    query=b"",
    root="",
)
@example(headers=[], host=b"", query=b"", root="")  # no Host at all: Django's fallback
@override_settings(ALLOWED_HOSTS=["localhost", "127.0.0.1"])
def test_reads_as_djangos_request(
    headers: list[tuple[bytes, bytes]], host: bytes, query: bytes, root: str
) -> None:
    if host:
        headers = [(b"host", host), *headers]
    django_request, ours = _both(_scope(headers, query, root))
    assert list(ours.headers.items()) == list(django_request.headers.items())
    for name in ("Content-Type", "authorization", "X-Forwarded-For", "x_forwarded_for"):
        assert ours.headers.get(name) == django_request.headers.get(name)
    assert ours.META == django_request.META
    assert ours.GET == django_request.GET
    assert ours.COOKIES == django_request.COOKIES
    assert _host(ours) == _host(django_request)
    assert _host(ours) == _host(ours)  # the second time, from what the first found
    assert (ours.method, ours.path, ours.path_info, ours.script_name) == (
        django_request.method,
        django_request.path,
        django_request.path_info,
        django_request.script_name,
    )
    assert (ours.content_type, ours.content_params, ours.encoding) == (
        django_request.content_type,
        django_request.content_params,
        django_request.encoding,
    )
    assert query_string(ours) == query_string(django_request) == query.decode()
    # (Django's own also checks Content-Length against the limit, and fails on a malformed
    # one: the runtime bounded the body while reading it, and the view checks the header.)
    assert ours.body == b"{}"


def test_meta_is_made_only_when_read() -> None:
    _, ours = _both(_scope([(b"host", b"localhost"), (b"origin", b"http://localhost")]))
    ours.headers.get("Origin")
    ours.get_host()
    assert "META" not in ours.__dict__
    assert ours.META["HTTP_ORIGIN"] == "http://localhost"


@override_settings(USE_X_FORWARDED_HOST=True, ALLOWED_HOSTS=["proxy.example"])
def test_forwarded_host_when_trusted() -> None:
    scope = _scope([(b"host", b"127.0.0.1"), (b"x-forwarded-host", b"proxy.example")])
    django_request, ours = _both(scope)
    assert ours.get_host() == django_request.get_host() == "proxy.example"


def test_a_host_allowed_once_is_refused_once_the_settings_refuse_it() -> None:
    scope = _scope([(b"host", b"kept.example")])
    with override_settings(ALLOWED_HOSTS=["kept.example"]):
        assert ApiRequest(scope, io.BytesIO()).get_host() == "kept.example"
    with override_settings(ALLOWED_HOSTS=["other.example"]), pytest.raises(DisallowedHost):
        ApiRequest(scope, io.BytesIO()).get_host()


def test_a_query_string_that_is_not_utf8_is_a_400_as_in_django() -> None:
    handler = BareASGIHandler()
    request, response = handler.create_request(_scope([], query=b"q=\xff"), io.BytesIO())
    assert request is None and response is not None and response.status_code == 400


def test_the_handler_makes_api_requests() -> None:
    handler = BareASGIHandler()
    request, _ = handler.create_request(_scope([(b"host", b"localhost")]), io.BytesIO(b"{}"))
    assert isinstance(request, ApiRequest)


def test_headers_are_read_by_any_spelling_as_djangos() -> None:
    scope = _scope([(b"x-title", b"a"), (b"content-type", b"text/plain")])
    django_request, ours = _both(scope)
    for name in ("X-Title", "x-title", "X_TITLE", "Content-Type", "content_type", "missing"):
        assert ours.headers.get(name) == django_request.headers.get(name)
        assert ours.headers.get(name, "none") == django_request.headers.get(name, "none")
        assert (name in ours.headers) == (name in django_request.headers)


@pytest.mark.parametrize("forced", [None, "/forced"])
def test_the_script_name_is_djangos_with_or_without_force_script_name(forced: str | None) -> None:
    """The script prefix is read as the request path reads its settings (dispatch.conf):
    FORCE_SCRIPT_NAME, set after the first request, still wins as it does in Django."""
    _both(_scope([(b"host", b"localhost")], root="/root"))  # a first request: settings kept
    with override_settings(FORCE_SCRIPT_NAME=forced, ALLOWED_HOSTS=["localhost"]):
        django_request, ours = _both(_scope([(b"host", b"localhost")], root="/root"))
        assert (ours.script_name, ours.path_info) == (
            django_request.script_name,
            django_request.path_info,
        )
