"""A raw HTTP/1.1 upstream on a loopback socket, for faults no framework would commit (the
fault matrix, tests/test_faults.py): unlike the fake upstream (tests/fakes.py), it writes
whatever bytes a test's behaviour says."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which accepted connection carried it (1, 2, ...)
    index: int  # its place on that connection (1 = first request)


# What a raw upstream does with one request: write whatever it likes on the socket; return
# True to keep the connection for the next request, False to close it.
RawBehaviour = Callable[[socket.socket, RawRequest], bool]


def http_response(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    extra: tuple[tuple[str, str], ...] = (),
    length: bool = True,
) -> bytes:
    """One HTTP/1.1 response as bytes; ``length=False`` leaves the body close-delimited."""
    head = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}"]
    if length:
        head.append(f"Content-Length: {len(body)}")
    else:
        head.append("Connection: close")
    head += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN: what a crashed or killed server leaves."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class RawUpstream:
    """An HTTP/1.1 server on a raw loopback socket, for faults no framework would commit:
    a reset mid-event, garbage, a keep-alive connection closed under the next request.

    Each request is parsed (headers and a Content-Length body) and handed to ``behaviour``
    in the connection's own thread. ``open_connections`` counts connections not yet closed
    by either side, so a test can check that nothing leaked.
    """

    def __init__(self, behaviour: RawBehaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[RawRequest] = []
        self.accepted = 0
        self.open_connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open_connections += 1
                number = self.accepted
            t = threading.Thread(target=self._serve, args=(sock, number), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        buf = b""
        index = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])
                }
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                index += 1
                request = RawRequest(method, path, headers, body, number, index)
                with self._lock:
                    self.requests.append(request)
                if not self.behaviour(sock, request):
                    return
        except OSError:
            return
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self.open_connections -= 1

    def completions(self) -> list[RawRequest]:
        return [r for r in self.requests if "/completions" in r.path]

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
