"""Who may call /v1: an API key (Bearer), or the chat page's logged-in session with CSRF.

Key hashes live in memory, reloaded after any ApiKey change commits, so checking a key costs
one SHA-256 and a set lookup — no database query on the request path. Only a request with
no key (the page) loads its session.
"""

from __future__ import annotations

import threading
from importlib import import_module
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import aget_user
from django.http import HttpRequest, HttpResponseBase
from django.middleware.csrf import CsrfViewMiddleware

from dispatch.errors import ApiError


class KeyRing:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        # key hash -> the key's name (who is asking, for the request log)
        self._hashes: dict[str, str] = {}
        self._any = False
        self._loaded = False
        self.version = -1  # the StateVersion the hashes were read at; -1: never read

    def reload(self) -> None:
        from dispatch.models import ApiKey, StateVersion

        with self._lock:
            # Read first: a change committed during the read shows as a newer number.
            self.version = StateVersion.current()
            self._hashes = dict(ApiKey.objects.filter(enabled=True).values_list("key_hash", "name"))
            # Disabling the last key must not open the API: any key, enabled or not, counts.
            self._any = ApiKey.objects.exists()
            self._loaded = True

    async def ensure_loaded(self) -> None:
        if not self._loaded:
            await sync_to_async(self.reload, thread_sensitive=True)()

    def knows(self, key: str) -> bool:
        return self.name_of(key) is not None

    def name_of(self, key: str) -> str | None:
        """The name of the enabled key ``key``, or None when there is no such key."""
        from dispatch.models import hash_key

        return self._hashes.get(hash_key(key))

    @property
    def any(self) -> bool:
        return self._any


keyring = KeyRing()


def _no_view(request: HttpRequest) -> HttpResponseBase:
    # Never called: the middleware is used for its check alone (process_view).
    raise AssertionError("not a view")


_csrf = CsrfViewMiddleware(_no_view)


async def authorize(request: HttpRequest, key_header: str | None = None) -> str | None:
    """Raise ApiError(401/403) unless the request may use /v1.

    Returns who is asking: ``key:<name>`` for an API key, ``user:<username>`` for the page's
    session, None while the API is open. ``key_header`` is another header that may carry the
    key, bare (``x-api-key``, where the ``anthropic`` SDK sends it: see dispatch.endpoints).
    """
    mode = settings.HAL0_API_AUTH
    if mode == "off":
        return None
    await keyring.ensure_loaded()
    if mode == "auto" and not keyring.any:
        return None
    auth = request.headers.get("Authorization", "")
    if auth:
        scheme, _, key = auth.partition(" ")
        name = keyring.name_of(key.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise ApiError(401, "invalid_api_key", "The API key is not valid.")
        return f"key:{name}"
    bare = request.headers.get(key_header, "") if key_header else ""
    if bare:
        name = keyring.name_of(bare.strip())
        if name is None:
            raise ApiError(401, "invalid_api_key", "The API key is not valid.")
        return f"key:{name}"
    if settings.SESSION_COOKIE_NAME in request.COOKIES:
        engine: Any = import_module(settings.SESSION_ENGINE)
        request.session = engine.SessionStore(request.COOKIES[settings.SESSION_COOKIE_NAME])
        user = await aget_user(request)
        if user.is_authenticated:
            # The page's calls carry the session cookie, so they must prove they come from
            # the page itself: Django's own CSRF check (token header + Origin).
            if _csrf.process_view(request, _no_view, (), {}) is not None:
                raise ApiError(403, "csrf_failed", "CSRF check failed; reload the page.")
            return f"user:{user.get_username()}"
    raise ApiError(
        401,
        "missing_api_key",
        "This hal0web requires an API key: send `Authorization: Bearer <key>` "
        "(create keys in the admin).",
    )
