"""A fault-injecting HTTP proxy in front of the loopback S3 server: real sockets, real retries.

    with FaultProxy(s3_server) as proxy:
        proxy.inject("slowdown", method="PUT", path=r"/part-\\d+\\.parquet$", times=2)
        ...  # the code under test, with storage.endpoint_url=proxy.endpoint
        assert proxy.hits("slowdown") == 2

A fault hits the next `times` requests that match it (method, and a regex searched in the
path), within `within_s` seconds of being injected; every other request passes through
untouched. Kinds:

    slowdown  503 SlowDown, S3's throttling answer
    internal  500 InternalError
    drop      the connection is closed before any response
    stall     the response head goes out at once, its body `stall_s` seconds later

Every request travels upstream on a connection of its own and the client is told to close
its connection after each response (`Connection: close`), so every request is seen and
decided on alone. The faults are bounded in count and time, and `close()` ends stalls, so a
test cannot hang on the proxy.
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

KINDS = ("slowdown", "internal", "drop", "stall")
ERRORS = {"slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
          "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error.")}
HEAD_LIMIT = 64 << 10
IDLE_S = 60.0  # a client connection that sends nothing for this long is dropped: no handler waits forever


@dataclass
class Fault:
    kind: str
    method: str | None
    path: re.Pattern
    left: int
    until: float
    stall_s: float

    def matches(self, method: str, path: str, now: float) -> bool:
        return (self.left > 0 and now < self.until and (self.method is None or self.method == method)
                and self.path.search(path) is not None)


def _read_head(sock: socket.socket, data: bytes = b"") -> tuple[bytes, bytes]:
    """(the message head without its blank line, the bytes read past it), after `data` already read;
    (b"", b"") at EOF."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return b"", b""
        data += chunk
        if len(data) > HEAD_LIMIT:
            raise ValueError("HTTP head too long")
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def _with_close(head: bytes) -> bytes:
    """The head with `Connection: close` in place of any Connection header, blank line included."""
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b""


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy until `source` ends or either socket is closed."""
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client = self.request
        client.settimeout(IDLE_S)
        try:
            head, rest = _read_head(client)
        except (OSError, ValueError):
            return
        if not head:
            return
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        fault = self.server.proxy.take(method, urlsplit(target).path)
        if fault is not None and fault.kind == "drop":
            return  # finish() closes the connection: the client gets no response at all
        if fault is not None and fault.kind in ERRORS:
            self._error(client, head, rest, method, fault.kind)
            return
        self._forward(client, head, rest, fault.stall_s if fault is not None else 0.0)

    def _error(self, client: socket.socket, head: bytes, rest: bytes, method: str, kind: str) -> None:
        status, reason, code, message = ERRORS[kind]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                f"</Message><RequestId>fault-proxy</RequestId></Error>").encode()
        if _header(head, b"expect").lower() != b"100-continue":
            # Read the request body first: answering mid-upload would look like a dropped connection.
            length = int(_header(head, b"content-length") or 0)
            try:
                while len(rest) < length and (chunk := client.recv(65536)):
                    rest += chunk
            except OSError:
                return
        payload = b"" if method == "HEAD" else body
        response = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
        try:
            client.sendall(response)
        except OSError:
            pass

    def _forward(self, client: socket.socket, head: bytes, rest: bytes, stall_s: float) -> None:
        try:
            upstream = socket.create_connection(self.server.proxy.upstream, timeout=60)
        except OSError:
            return
        upstream.settimeout(None)
        try:
            upstream.sendall(_with_close(head) + rest)
            uploader = threading.Thread(target=_pipe, args=(client, upstream), daemon=True)
            uploader.start()
            response, body = _read_head(upstream)
            while response.split(b" ", 2)[1:2] == [b"100"]:  # 100 Continue: the upload goes on
                client.sendall(response + b"\r\n\r\n")
                response, body = _read_head(upstream, body)
            if not response:
                return
            client.sendall(_with_close(response))
            if stall_s:
                self.server.proxy.stopped.wait(stall_s)
            client.sendall(body)
            _pipe(upstream, client)
        except (OSError, ValueError):
            pass
        finally:
            upstream.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` (http://host:port) that injects faults on demand."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.injected: list[tuple[str, str, str]] = []
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()

    def inject(self, kind: str, *, method: str | None = None, path: str = "", times: int = 1,
               within_s: float = 600.0, stall_s: float = 0.0) -> None:
        """Hit the next `times` requests matching `method` and `path` (a regex) in the next `within_s` seconds."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if (kind == "stall") != (stall_s > 0):
            raise ValueError("stall_s is for (and needed by) the stall fault")
        with self.lock:
            self.faults.append(Fault(kind, method, re.compile(path), times, time.monotonic() + within_s, stall_s))

    def clear(self) -> None:
        """Drop the faults not used up; later requests pass through."""
        with self.lock:
            self.faults.clear()

    def take(self, method: str, path: str) -> Fault | None:
        """The first live fault matching this request, counted as used; None lets it through."""
        now = time.monotonic()
        with self.lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.matches(method, path, now):
                    fault.left -= 1
                    self.injected.append((fault.kind, method, path))
                    return fault
        return None

    def hits(self, kind: str | None = None) -> int:
        """How many requests a fault (of `kind`) hit so far."""
        with self.lock:
            return sum(1 for k, _, _ in self.injected if kind is None or k == kind)
