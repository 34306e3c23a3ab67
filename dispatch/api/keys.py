"""Who may call /v1: an API key (Bearer, or x-api-key), or the page's session with CSRF.

Key hashes live in memory (``dispatch.coordination.keyring``), reloaded after any ApiKey
change commits, so checking a key costs one SHA-256 and a set lookup — no database query on
the request path. Only a request with no key (the page) loads its session.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from django.contrib.auth import aget_user
from django.http import HttpRequest, HttpResponseBase, QueryDict
from django.middleware.csrf import CsrfViewMiddleware

from dispatch.api.responses import unavailable
from dispatch.conf import conf
from dispatch.coordination.keyring import Key, keyring
from dispatch.coordination.outages import DATABASE, Unavailable
from dispatch.observability import keyuse
from dispatch.routing.scopes import EVERYTHING, Scope
from dispatch.wire.errors import ApiError


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking (``key:<name>``, ``user:<username>``, None while the API is open) and
    what they may use."""

    client: str | None
    scope: Scope = EVERYTHING


OPEN = Caller(None)


def _no_view(request: HttpRequest) -> HttpResponseBase:
    # Never called: the middleware is used for its check alone (process_view).
    raise AssertionError("not a view")


_csrf = CsrfViewMiddleware(_no_view)


async def authorize(request: HttpRequest, key_header: str | None = None) -> Caller:
    """Raise ApiError(401/403) unless the request may use /v1; who is asking, and what they
    may use (a key's model allowlist; the page's users and an open API: everything).

    Who is asking: ``key:<name>`` for an API key, ``user:<username>`` for the page's session
    (also while the API is open: a user's page hears only its own decisions), None for
    anyone else while the API is open. ``key_header`` is another header that may carry the
    key, bare (``x-api-key``, where the ``anthropic`` SDK sends it: see dispatch.routing.endpoints).
    """
    mode = conf.HAL0_API_AUTH
    if mode == "required":
        # Loaded before the key is looked up: a request that comes before the process's
        # first version check (which loads the ring) must not find a valid key unknown.
        await keyring.ensure_loaded()
    if mode == "off" or (mode == "auto" and not await _keys_exist()):
        # Open to anyone; the request is still the page user's when it provably comes from
        # their page (the same CSRF check), so their page hears its own decisions.
        user = await _session_user(request, needed=False)
        if user is None or not _from_the_page(request):
            return OPEN
        return Caller(f"user:{user.get_username()}")
    key = presented_key(request, key_header)
    if key is not None:
        return Caller(f"key:{key.name}", key.scope)
    user = await _session_user(request)
    if user is not None:
        # The page's calls carry the session cookie, so they must prove they come from
        # the page itself.
        if not _from_the_page(request):
            raise ApiError(403, "csrf_failed", "CSRF check failed; reload the page.")
        return Caller(f"user:{user.get_username()}")
    raise ApiError(
        401,
        "missing_api_key",
        "This hal0web requires an API key: send `Authorization: Bearer <key>` "
        "(create keys in the admin).",
    )


def presented_key(request: HttpRequest, key_header: str | None = None) -> Key | None:
    """The valid key the request presents (``Authorization: Bearer``, or bare in
    ``key_header``), noted as used; None when it presents none; ApiError(401) for a key that
    is unknown or expired. The key ring must be loaded."""
    auth = request.headers.get("Authorization", "")
    bare = request.headers.get(key_header, "") if key_header else ""
    if not (auth or bare):
        return None
    if auth:
        scheme, _, given = auth.partition(" ")
        key = keyring.find(given.strip()) if scheme.lower() == "bearer" else None
    else:
        key = keyring.find(bare.strip())
    if key is None:
        raise ApiError(401, "invalid_api_key", "The API key is not valid.")
    now = time.time()
    if key.expired(now):
        assert key.expires_at is not None
        raise ApiError(
            401,
            "expired_api_key",
            f"The API key '{key.name}' expired at "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(key.expires_at))}.",
        )
    keyuse.used(key.id, now)
    return key


def _from_the_page(request: HttpRequest) -> bool:
    """Django's own CSRF check (token header + Origin). The token comes in the header only:
    the body is the upstream's, never parsed as a form (a form or multipart body would be
    read as one, and fail, inside the check)."""
    request.POST = QueryDict()
    return _csrf.process_view(request, _no_view, (), {}) is None


async def _keys_exist() -> bool:
    await keyring.ensure_loaded()
    return keyring.any


async def _session_user(request: HttpRequest, needed: bool = True) -> Any:
    """The page's logged-in user from the session cookie, or None (no cookie: no lookup).

    Sessions live in the database. With it away, a caller the session would only name
    (``needed=False``: the API is open) is nobody in particular; one it would admit gets
    503 ``session_unavailable`` (an API key still works: keys are in memory)."""
    if conf.SESSION_COOKIE_NAME not in request.COOKIES:
        return None
    if not DATABASE.available():
        DATABASE.missed()
        return _no_session(needed)
    engine: Any = import_module(conf.SESSION_ENGINE)
    request.session = engine.SessionStore(request.COOKIES[conf.SESSION_COOKIE_NAME])
    try:
        user = await aget_user(request)
    except DATABASE.errors as exc:
        DATABASE.failed("could not read a page's session", exc)
        return _no_session(needed)
    DATABASE.ok()
    return user if user.is_authenticated else None


def _no_session(needed: bool) -> None:
    if needed:
        raise unavailable(
            Unavailable(
                "session_unavailable",
                "Cannot check your session: the database is away. Try again in a few "
                "seconds, or use an API key.",
            )
        )
