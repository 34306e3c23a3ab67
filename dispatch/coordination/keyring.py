"""The API keys as each process holds them: hashes in memory, so checking a key on the
request path costs one SHA-256 and a set lookup, never a database query.

Reloaded from the database with the routing table whenever the state version moves
(``dispatch.coordination.sync``); ``dispatch.api.keys`` checks requests against it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from asgiref.sync import sync_to_async

from dispatch.coordination import outages
from dispatch.routing.scopes import Scope


@dataclass(frozen=True, slots=True)
class Key:
    """An enabled key as the ring holds it: who it is and what it may do."""

    id: int
    name: str
    scope: Scope
    expires_at: float | None  # epoch seconds; None: never

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class KeyRing:
    """The enabled keys by hash, and whether any key exists at all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        # key hash -> the key (who is asking, for the request log, and its scope)
        self._hashes: dict[str, Key] = {}
        self._any = False
        self._loaded = False
        self.version = -1  # the StateVersion the hashes were read at; -1: never read

    def reload(self) -> None:
        from dispatch.models import ApiKey, StateVersion

        with self._lock:
            # Read first: a change committed during the read shows as a newer number.
            self.version = StateVersion.current()
            self._hashes = {
                key_hash: Key(
                    pk,
                    name,
                    Scope(tuple(patterns or ())),
                    expires_at.timestamp() if expires_at else None,
                )
                for pk, key_hash, name, patterns, expires_at in ApiKey.objects.filter(
                    enabled=True
                ).values_list("pk", "key_hash", "name", "allowed_models", "expires_at")
            }
            # Disabling the last key must not open the API: any key, enabled or not, counts.
            self._any = ApiKey.objects.exists()
            self._loaded = True

    async def ensure_loaded(self) -> None:
        """The keys, read first if this process has none yet. With none and the database
        away: ``Unavailable`` (503 ``keys_unavailable``): who may call is not known, and
        guessing either way would be wrong (open to all, or every key refused)."""
        if not self._loaded:
            if not outages.DATABASE.available():
                raise _no_keys()
            try:
                await sync_to_async(self.reload, thread_sensitive=True)()
            except outages.DATABASE.errors as exc:
                outages.DATABASE.failed("reading the API keys", exc)
                raise _no_keys() from exc

    def knows(self, key: str) -> bool:
        return self.find(key) is not None

    def find(self, key: str) -> Key | None:
        """The enabled key ``key``, or None when there is no such key."""
        from dispatch.models import hash_key

        return self._hashes.get(hash_key(key))

    @property
    def any(self) -> bool:
        return self._any


keyring = KeyRing()


def _no_keys() -> outages.Unavailable:
    return outages.Unavailable(
        "keys_unavailable",
        "hal0web has not read its API keys yet: the database is away. Try again shortly.",
    )
