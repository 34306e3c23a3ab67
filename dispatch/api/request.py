"""The /v1 request: Django's ``ASGIRequest``, with what every request reads built straight
from the ASGI scope and the rest (``META``) only when something reads it.

Django builds ``META`` (a WSGI-style copy of every header) for each request, then
``request.headers`` parses ``META``'s names back into header names: two passes over the
headers and two dictionaries (~17 µs of a request's CPU here) that a /v1 request, which
reads a few headers by name and forwards the rest, does not need. Here ``headers`` comes
from the scope in one pass, and ``META`` is built by Django's own code the first time
anything reads it (the page's CSRF check, a session), so it is never a different dictionary
from the one Django would have made.
"""

from __future__ import annotations

import io
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, QueryDict
from django.http.cookie import parse_cookie
from django.http.request import HttpHeaders, RawPostDataException
from django.utils.functional import cached_property

from dispatch.conf import conf


class ScopeHeaders(HttpHeaders):
    """``request.headers`` made from the scope's header list: the same names (``Content-Type``,
    ``X-Request-Id``), the same values (repeated headers joined with commas) and the same
    refusal of names with underscores (``X_Forwarded_For`` could otherwise pose as
    ``X-Forwarded-For``) as Django's ``HttpHeaders(META)``."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        store: dict[str, tuple[str, str]] = {}
        for raw_name, raw_value in raw:
            name = raw_name.decode("latin-1")
            if "_" in name:
                continue
            key, value = name.lower(), raw_value.decode("latin-1")
            seen = store.get(key)
            store[key] = (name.title(), value) if seen is None else (seen[0], f"{seen[1]},{value}")
        # CaseInsensitiveMapping's own store ({lower name: (name, value)}), filled directly:
        # its constructor would check and copy each pair once more.
        self._store = store

    def get(self, key: str, default: Any = None) -> Any:
        # One lookup, not the Mapping's three frames (get, HttpHeaders' and the mapping's
        # __getitem__): a request reads its headers this way a dozen times.
        found = self._store.get(key.replace("_", "-").lower())
        return default if found is None else found[1]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.replace("_", "-").lower() in self._store

    def items(self) -> Any:
        # The (name, value) pairs as kept: the Mapping's own items() looks each name up
        # again (a lower-casing and two lookups per header, on every request's forwarding).
        return self._store.values()


# Hosts ``get_host`` found allowed: Django checks ALLOWED_HOSTS anew on every request (~5 µs:
# settings lookups, a regex, a match per pattern), though a server answers to a handful of
# names. Bounded, since any client can send any Host; only allowed ones are kept; cleared
# when the settings it was checked against change (``forget_hosts``, on setting_changed).
_ALLOWED_HOSTS_SEEN: set[str] = set()
_HOSTS_KEPT = 64
_HOST_SETTINGS = frozenset({"ALLOWED_HOSTS", "DEBUG", "USE_X_FORWARDED_HOST"})


def forget_hosts(*, setting: str, **kwargs: Any) -> None:
    if setting in _HOST_SETTINGS:
        _ALLOWED_HOSTS_SEEN.clear()


class ApiRequest(ASGIRequest):
    """An ``ASGIRequest`` for /v1 whose ``META`` is made when first read (see the module)."""

    def __init__(self, scope: dict[str, Any], body_file: io.BytesIO) -> None:
        self.scope = scope
        self._post_parse_error = False
        self._read_started = False
        self.resolver_match = None
        self.path = scope["path"]
        # Django's get_script_prefix(scope), its setting read as the request path reads them.
        self.script_name = conf.FORCE_SCRIPT_NAME or scope.get("root_path", "") or ""
        self.path_info = self.path.removeprefix(self.script_name) if self.script_name else self.path
        self.method = scope["method"].upper()
        query = scope.get("query_string", b"")
        # Decoded now, as Django does: a query string that is not UTF-8 is its 400.
        self.query_string = query.decode() if isinstance(query, bytes) else query
        self.headers = ScopeHeaders(scope.get("headers", []))
        self._set_content_type_params({"CONTENT_TYPE": self.headers.get("Content-Type", "")})  # type: ignore[attr-defined]
        self._stream = body_file

    @cached_property
    def META(self) -> dict[str, Any]:  # type: ignore[override]
        # Django's own, from the same scope: read only by what needs the WSGI view of a
        # request (the CSRF check, a session, Django's host fallback without a Host header).
        return ASGIRequest(self.scope, io.BytesIO()).META

    @cached_property
    def GET(self) -> QueryDict:  # type: ignore[override]
        return QueryDict(self.query_string)

    @cached_property
    def COOKIES(self) -> dict[str, str]:  # type: ignore[override]
        return parse_cookie(self.headers.get("Cookie", ""))

    def _get_raw_host(self) -> str:
        # Django's order (X-Forwarded-Host when trusted, then Host), from the headers.
        headers = self.headers
        if conf.USE_X_FORWARDED_HOST and "X-Forwarded-Host" in headers:
            return str(headers["X-Forwarded-Host"])
        host = headers.get("Host")
        return str(host) if host is not None else str(super()._get_raw_host())  # type: ignore[misc]

    def get_host(self) -> str:
        host = self._get_raw_host()
        if host in _ALLOWED_HOSTS_SEEN:
            return host
        host = str(super().get_host())  # DisallowedHost unless ALLOWED_HOSTS has it
        if len(_ALLOWED_HOSTS_SEEN) < _HOSTS_KEPT:
            _ALLOWED_HOSTS_SEEN.add(host)
        return host

    @property
    def body(self) -> bytes:
        # The runtime read the body into memory bounded by DATA_UPLOAD_MAX_MEMORY_SIZE (a body
        # past it reads as RequestDataTooBig), so Django's checks of the size are done.
        if not hasattr(self, "_body"):
            if self._read_started:
                raise RawPostDataException(
                    "You cannot access body after reading from request's data stream"
                )
            self._body = self._stream.read()
            self._stream = io.BytesIO(self._body)
        return self._body


def query_string(request: HttpRequest) -> str:
    """The request's query string as sent (undecoded), whichever request class it is."""
    if isinstance(request, ApiRequest):
        return request.query_string
    return str(request.META.get("QUERY_STRING", ""))
