"""A database outage on demand: a TCP proxy in front of the local PostgreSQL that a test cuts.

hal0web's processes reach the database through it. ``cut()`` does to them what a stopped or
restarting server does: every open connection is closed under them and new ones are refused
(the port is not listened on). ``restore()`` listens on the same port again. The shared
server behind it, which other tests use, is never touched.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from tests.fakes import free_port

POSTGRES = ("127.0.0.1", 5432)


class _Pair:
    """One client connection and its connection to the server; the second of its two pumps
    to finish closes both."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.sockets = (client, server)
        self._running = 2
        self._lock = threading.Lock()

    def shut(self) -> None:
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already shut, or never connected

    def pumped(self) -> None:
        self.shut()  # one way ended: so does the other
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            for s in self.sockets:
                s.close()


class CutProxy:
    def __init__(self, target: tuple[str, int] = POSTGRES) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.restore()

    def url(self, database_url: str) -> str:
        """``database_url`` (on the target's host and port) through the proxy."""
        host, port = self.target
        return database_url.replace(f"@{host}:{port}/", f"@127.0.0.1:{self.port}/", 1)

    def restore(self) -> None:
        """Listen (again) on the proxy's port: new connections reach the server."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            assert self._listener is None, "restore() of a proxy that is not cut"
            self._listener = listener
        self._spawn(self._accept, listener)

    def cut(self) -> None:
        """Refuse new connections and close every open one, as a database going down."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, set()
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (Linux)
        for pair in pairs:
            pair.shut()
        self._join()
        if listener is not None:
            listener.close()

    def close(self) -> None:
        self.cut()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _join(self) -> None:
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(5)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = _Pair(client, server)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    pair.pumped()
                    pair.pumped()
                    return
                self._pairs.add(pair)
            self._spawn(self._pump, pair, client, server)
            self._spawn(self._pump, pair, server, client)

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # shut under it (a cut), or the other side went away
        finally:
            with self._lock:
                self._pairs.discard(pair)
            pair.pumped()
