"""Which pages may open the live feed's WebSocket: its own origin, and CSRF_TRUSTED_ORIGINS.

Channels' ``AllowedHostsOriginValidator`` compares only the Origin's host with ALLOWED_HOSTS:
a page on another port of the same machine (``http://127.0.0.1:9999`` against a server on
``:8000``) passed, and since it is the same *site* the browser sends the Lax session cookie
along, so that page could read the feed. Browsers do not apply the same-origin policy to
WebSockets; the Origin check is the only thing standing in for it. So this asks what Django's
CSRF check asks of a form post: the Origin must be the server's own scheme, host and port —
the Host the browser connected to, ``ws``/``wss`` read as ``http``/``https`` (or the proxy's
``SECURE_PROXY_SSL_HEADER`` when set) — or one named in ``CSRF_TRUSTED_ORIGINS``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import SplitResult, urlsplit

from channels.security.websocket import OriginValidator, WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin1")
    return None


def request_scheme(scope: dict[str, Any]) -> str:
    """``http`` or ``https`` as Django's ``HttpRequest.scheme`` would say for this socket."""
    proxy_header = settings.SECURE_PROXY_SSL_HEADER
    if proxy_header:
        meta_name, secure_value = proxy_header
        # Django's META name (HTTP_X_FORWARDED_PROTO) as the ASGI header it came from.
        name = meta_name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin1")
        value = _header(scope.get("headers", ()), name)
        if value is not None:
            # As Django does: a proxy chain's first value is what the client used.
            return "https" if value.split(",", 1)[0].strip() == secure_value else "http"
    return "https" if scope.get("scheme") == "wss" else "http"


def _key(scheme: str, host: str, port: int | None) -> tuple[str, str, int | None]:
    return (scheme, host.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme))


def own_origin(scope: dict[str, Any]) -> tuple[str, str, int | None] | None:
    """The socket's own (scheme, host, port), or None when its Host is not one we serve."""
    host = _header(scope.get("headers", ()), b"host")
    if not host:
        return None
    domain, port = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = ["localhost", "127.0.0.1", "[::1]"]  # what Django itself allows then
    # A Host outside ALLOWED_HOSTS is refused as Django refuses it on HTTP (DNS rebinding: a
    # name the attacker controls, pointed at this machine, would be its own origin).
    if not domain or not validate_host(domain, allowed):
        return None
    try:
        return _key(request_scheme(scope), domain, int(port) if port else None)
    except ValueError:
        return None


def _origin_key(origin: SplitResult) -> tuple[str, str, int | None] | None:
    try:
        port = origin.port
    except ValueError:  # a port that is not a number, or out of range
        return None
    if origin.scheme not in _DEFAULT_PORTS or not origin.hostname:
        return None
    # SplitResult.hostname drops an IPv6 address's brackets; the Host header keeps them.
    host = f"[{origin.hostname}]" if ":" in origin.hostname else origin.hostname
    return _key(origin.scheme, host, port)


class SameOriginValidator(OriginValidator):
    """Accept a WebSocket only from the server's own origin or a CSRF-trusted one.

    ``OriginValidator`` holds a fixed list of patterns; here one of them, the server's own
    origin, comes from each connection's Host header, so the check runs per scope. Trusted
    origins use Channels' own matching (scheme, host, port; ``.example.com`` for subdomains).
    """

    def __init__(self, application: Any) -> None:
        super().__init__(application, [])

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            raise ValueError("SameOriginValidator only guards WebSocket connections")
        raw = _header(scope.get("headers", ()), b"origin")
        if raw is not None and self.allowed(scope, raw):
            return await self.application(scope, receive, send)
        # No Origin at all is refused too: every browser sends one on a WebSocket.
        return await WebsocketDenier()(scope, receive, send)

    def allowed(self, scope: dict[str, Any], raw_origin: str) -> bool:
        try:
            origin = urlsplit(raw_origin.strip())
        except ValueError:
            return False
        key = _origin_key(origin)
        if key is None:
            return False
        if key == own_origin(scope):
            return True
        # Django's CSRF_TRUSTED_ORIGINS spell subdomains `https://*.example.com`; Channels'
        # patterns spell them `https://.example.com`.
        return any(
            self.match_allowed_origin(origin, trusted.replace("://*.", "://.", 1))
            for trusted in settings.CSRF_TRUSTED_ORIGINS
        )
