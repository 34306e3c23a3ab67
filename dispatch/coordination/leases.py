"""What only one process may do at a time, and how the others find out.

- The embedded SQLite database serves one server process: a second one is refused at
  start-up with a clear error (`claim_embedded`), since SQLite's file locks would turn every
  write of two servers into a wait, and the in-memory channel layer cannot reach across.
- One watcher probes the slots: every process that may run it (``HAL0_WATCHER=true``, or
  `manage.py watch`) asks for the watcher lease, one holds it, the others stand by and ask
  again every probe interval. The lease dies with its holder: a PostgreSQL session advisory
  lock (released when the holder's connection closes), or on SQLite an ``flock`` on a file
  beside the database (released when the process exits).

Sync code: call it from asgiref's thread (``sync_to_async(thread_sensitive=True)``), which
owns the lease's database connection.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import socket
from pathlib import Path
from typing import IO, Any, Protocol

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections

# pg_advisory_lock's key: any 64-bit number no other program on the database uses.
WATCHER_LOCK_KEY = 0x4841_4C30_5741_5443  # "HAL0WATC"

IDENTITY = f"{socket.gethostname()}:{os.getpid()}"


class Lease(Protocol):
    def try_acquire(self) -> bool: ...
    def held(self) -> bool: ...
    def release(self) -> None: ...


class FileLease:
    """An exclusive ``flock`` on a file: held until released or the process exits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def try_acquire(self) -> bool:
        if self._file is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(IDENTITY + "\n")
        handle.flush()
        self._file = handle
        atexit.register(self.release)  # held for good; closed, not leaked, at exit
        return True

    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class AdvisoryLease:
    """A PostgreSQL session advisory lock on a connection of its own."""

    def __init__(self, key: int) -> None:
        self.key = key
        self._conn: Any = None

    def try_acquire(self) -> bool:
        if self.held():
            return True
        self.release()
        conn = connections.create_connection("default")
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", [self.key])
                got = bool(cursor.fetchone()[0])
        except DatabaseError:
            conn.close()
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def held(self) -> bool:
        """The lock lives as long as its session: a live connection means it is still ours."""
        if self._conn is None:
            return False
        try:
            with self._conn.cursor() as cursor:
                cursor.execute("SELECT 1")
            return True
        except DatabaseError:
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()  # closing the session releases the lock
            except DatabaseError:
                pass
            self._conn = None


def _sqlite_path() -> Path | None:
    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.sqlite3" or db.get("NAME") in ("", ":memory:"):
        return None
    return Path(str(db["NAME"]))


_watcher_leases: dict[str, Lease] = {}


def watcher_lease() -> Lease:
    """This process's one watcher lease for the configured database (one per database: a
    second object would contend with the first)."""
    sqlite = _sqlite_path()
    where = str(sqlite) if sqlite is not None else str(connections["default"].settings_dict)
    lease = _watcher_leases.get(where)
    if lease is None:
        if sqlite is not None:
            lease = FileLease(sqlite.with_name(sqlite.name + ".watcher.lock"))
        elif connections["default"].vendor == "postgresql":
            lease = AdvisoryLease(WATCHER_LOCK_KEY)
        else:
            raise ImproperlyConfigured("hal0web's watcher lease needs SQLite or PostgreSQL")
        _watcher_leases[where] = lease
    return lease


_embedded: FileLease | None = None


def claim_embedded() -> None:
    """On SQLite, make this the one server process on the database (idempotent)."""
    global _embedded
    sqlite = _sqlite_path()
    if sqlite is None or _embedded is not None:
        return
    lease = FileLease(sqlite.with_name(sqlite.name + ".server.lock"))
    if not lease.try_acquire():
        holder = lease.path.read_text().strip() or "another process"
        raise ImproperlyConfigured(
            f"another hal0web server ({holder}) already serves the SQLite database {sqlite}: "
            "SQLite is for one server process. For several workers use PostgreSQL "
            "(DATABASE_URL=postgres://…) and Redis (REDIS_URL=redis://…)."
        )
    _embedded = lease
