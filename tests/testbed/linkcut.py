"""A transparent TCP proxy in front of a plain-HTTP registry that cuts the link on demand.

The node's container runtime, the build pods and the tests reach the registry through it; it forwards
every byte unchanged in both directions and only adds the fault a real link has and a real registry
cannot produce on demand:

- `throttle(rate, path_contains)`: responses to GET requests whose path contains the string are sent
  at most `rate` bytes per second (per connection), so a download lasts long enough to be cut mid-way;
- `cut(down)`: every open connection is reset (TCP RST) and, for `down` seconds, every new connection
  is accepted and reset at once (the attempt is recorded in `refused`); then the proxy forwards again;
- `cut_at(bytes_, down, path_contains)`: the same cut, made by the proxy itself as soon as one response
  to a matching GET has carried `bytes_` bytes of body.

It observes, for each request, its request line, its `Range` header, the response's status and how many
bytes of body came back (`transfers`). HTTP/1.1 clients do not pipeline (Go's net/http, Python's
requests and urllib send a request only after reading the previous response), so the bytes the server
sends on a connection belong to the latest request seen on it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

CHUNK = 16 * 1024
POLL = 0.1  # seconds a pump waits for data before it looks at the link's state again


@dataclass
class Transfer:
    """One HTTP request seen on a connection, and its response so far."""

    connection: int
    method: str
    path: str
    range: str | None  # the request's Range header, verbatim
    started: float  # time.time() when the request's head was seen
    status: int | None = None
    body: int = 0  # response body bytes forwarded to the client
    ended: float | None = None  # when the last body byte was forwarded
    _head: bytearray = field(default_factory=bytearray, repr=False)
    _length: int | None = None  # the response's Content-Length, once its head is read

    @property
    def complete(self) -> bool:
        """Whether the whole body the response announced (Content-Length) reached the client."""
        return self._length is not None and self.body >= self._length


class _RequestReader:
    """Finds the request heads in a client's byte stream, skipping bodies (Content-Length or chunked)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.skip = 0  # body bytes still to pass over
        self.chunked = False

    def feed(self, data: bytes) -> list[tuple[str, str, dict[str, str]]]:
        """The (method, path, headers) of every request head completed by `data`."""
        self.buffer += data
        heads: list[tuple[str, str, dict[str, str]]] = []
        while True:
            if self.skip:
                taken = min(self.skip, len(self.buffer))
                del self.buffer[:taken]
                self.skip -= taken
                if self.skip:
                    return heads
            if self.chunked:
                line_end = self.buffer.find(b"\r\n")
                if line_end < 0:
                    return heads
                size = int(bytes(self.buffer[:line_end]).split(b";")[0].strip() or b"0", 16)
                del self.buffer[: line_end + 2]
                if size == 0:  # last chunk: no trailers from the clients here, then the closing CRLF
                    self.chunked = False
                    self.skip = 2
                else:
                    self.skip = size + 2
                continue
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return heads
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            del self.buffer[: end + 4]
            method, _, rest = lines[0].partition(" ")
            path = rest.rsplit(" ", 1)[0]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            heads.append((method, path, headers))
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self.chunked = True
            else:
                self.skip = int(headers.get("content-length") or 0)


class _Connection:
    def __init__(self, number: int, client: socket.socket, server: socket.socket) -> None:
        self.number, self.client, self.server = number, client, server
        self.current: Transfer | None = None
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def close(self, reset: bool) -> None:
        """Close both sides, with a TCP RST (`reset`) or an orderly FIN."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            for sock in (self.client, self.server):
                with contextlib.suppress(OSError):
                    if reset:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()


class LinkCut:
    """The proxy: listens on `host`:`port` (a free port by default) and forwards to `upstream` (host:port)."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self.host, self.port = host, port
        self.transfers: list[Transfer] = []
        self.refused: list[float] = []  # time.time() of each connection reset while the link was down
        self.cuts: list[tuple[float, float]] = []  # (when, seconds down)
        self._rate: tuple[float, str] | None = None
        self._trigger: tuple[int, float, str, bool] | None = None
        self._counted = 0  # body bytes of matching GET responses since `cut_at(..., total=True)`
        self._down_until = 0.0
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> LinkCut:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name="linkcut", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close(reset=False)

    def throttle(self, rate: float | None, path_contains: str = "/blobs/") -> None:
        """Send the bodies of matching GET responses at most `rate` bytes/s per connection (None: no limit)."""
        self._rate = None if rate is None else (rate, path_contains)

    def cut(self, down: float) -> None:
        """Reset every open connection and reset new ones for `down` seconds."""
        with self._lock:
            self._down_until = time.monotonic() + down
            self.cuts.append((time.time(), down))
            connections = list(self._connections)
        for connection in connections:
            connection.close(reset=True)

    def cut_at(self, bytes_: int, down: float, path_contains: str = "/blobs/", *, total: bool = False) -> None:
        """Cut (see `cut`) once, when a response to a matching GET has carried `bytes_` bytes of body; with
        `total`, when the responses to matching GETs since this call have carried `bytes_` bytes together."""
        with self._lock:
            self._trigger = (bytes_, down, path_contains, total)
            self._counted = 0

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def gets(self, path_contains: str) -> list[Transfer]:
        """The GET requests whose path contains `path_contains`, in the order they were made."""
        with self._lock:
            return [t for t in self.transfers if t.method == "GET" and path_contains in t.path]

    # ------------------------------------------------------------------ forwarding

    def _accept(self) -> None:
        assert self._listener is not None
        number = 0
        while not self._stopped.is_set():
            readable, _, _ = select.select([self._listener], [], [], POLL)
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            if self.down:
                self.refused.append(time.time())
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            host, port = self.upstream.rsplit(":", 1)
            try:
                server = socket.create_connection((host, int(port)), timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            number += 1
            connection = _Connection(number, client, server)
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._requests, args=(connection,), daemon=True).start()
            threading.Thread(target=self._responses, args=(connection,), daemon=True).start()

    def _requests(self, connection: _Connection) -> None:
        reader = _RequestReader()
        while (data := self._receive(connection, connection.client)) is not None:
            for method, path, headers in reader.feed(data):
                transfer = Transfer(connection.number, method, path, headers.get("range"), time.time())
                with self._lock:
                    self.transfers.append(transfer)
                connection.current = transfer
            if not self._send(connection, connection.server, data):
                return
        self._finish(connection)

    def _responses(self, connection: _Connection) -> None:
        sent_at: tuple[Transfer | None, float, int] = (None, 0.0, 0)  # (transfer, its first body byte, bytes)
        while (data := self._receive(connection, connection.server, CHUNK)) is not None:
            transfer = connection.current
            body = len(data)
            if transfer is not None and transfer._length is None:
                transfer._head += data
                end = transfer._head.find(b"\r\n\r\n")
                if end < 0:
                    body = 0
                else:
                    head = bytes(transfer._head[:end]).decode("latin-1").split("\r\n")
                    transfer.status = int(head[0].split()[1])
                    lengths = [line.partition(":")[2] for line in head if line.lower().startswith("content-length:")]
                    no_body = transfer.method == "HEAD" or transfer.status in {204, 304}
                    transfer._length = 0 if no_body else int(lengths[0]) if lengths else 0
                    body = len(transfer._head) - end - 4
                    transfer._head.clear()
            if transfer is not None and body:
                rate = self._rate
                if rate is not None and transfer.method == "GET" and rate[1] in transfer.path:
                    if sent_at[0] is not transfer:
                        sent_at = (transfer, time.monotonic(), 0)
                    _, first, done = sent_at
                    wait = first + done / rate[0] - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    sent_at = (transfer, first, done + body)
            if not self._send(connection, connection.client, data):
                return
            if transfer is not None and body:
                transfer.body += body
                transfer.ended = time.time()
                self._maybe_cut(transfer, body)
        self._finish(connection)

    def _maybe_cut(self, transfer: Transfer, body: int) -> None:
        with self._lock:
            trigger = self._trigger
            if trigger is None or transfer.method != "GET" or trigger[2] not in transfer.path:
                return
            self._counted += body
            if (self._counted if trigger[3] else transfer.body) < trigger[0]:
                return
            self._trigger = None
        self.cut(trigger[1])

    def _receive(self, connection: _Connection, sock: socket.socket, size: int = CHUNK) -> bytes | None:
        """The next bytes from `sock`; None once it closed or the connection was cut."""
        while not connection.closed.is_set() and not self._stopped.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], POLL)
                if readable:
                    data = sock.recv(size)
                    return data or None
            except (OSError, ValueError):
                return None
        return None

    def _send(self, connection: _Connection, sock: socket.socket, data: bytes) -> bool:
        if connection.closed.is_set():
            return False
        try:
            sock.sendall(data)
        except (OSError, ValueError):
            self._finish(connection)
            return False
        return True

    def _finish(self, connection: _Connection) -> None:
        """One side ended: end the other (a FIN, as the proxy's own peer did), unless the link was cut."""
        connection.close(reset=False)
        with self._lock:
            if connection in self._connections:
                self._connections.remove(connection)
