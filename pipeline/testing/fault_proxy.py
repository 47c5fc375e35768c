"""An HTTP proxy in front of an S3-compatible server that fails requests the way object stores do.

Point a job's `storage.endpoint_url` at it. A set fraction of requests is answered with 503 SlowDown
or 500 InternalError (S3's own XML error bodies, so clients classify them as they would AWS's), and
a set fraction of GETs sends the status, the headers and half the body, then drops the connection.
Requests for paths containing one of `forbidden` get 403 AccessDenied, every time, as a bucket
policy would. Everything else is forwarded unchanged, Host header included (S3 signs it), after
`latency_s` (a remote store's round trip, which a local server does not have; concurrent requests wait
side by side, as they would on the network).
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade"}
)
_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
}


@dataclass
class FaultProxy:
    upstream: str
    error_rate: float = 0.1
    drop_rate: float = 0.05
    seed: int = 0
    forbidden: tuple[str, ...] = ()
    latency_s: float = 0.0
    counts: Counter = field(default_factory=Counter)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._seen: Counter = Counter()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def decide(self, method: str, path: str = "") -> str:
        with self._lock:
            if any(fragment in path for fragment in self.forbidden):
                self.counts["error_403"] += 1
                return "error_403"
            # Each request's fate follows from the seed, its method, its object key (the path without the
            # bucket, which tests name at random, and without the query) and how often that was asked before,
            # not from the order concurrent clients happen to send requests in: reruns fail alike.
            key = (method, path.split("?", 1)[0].lstrip("/").partition("/")[2])
            attempt = self._seen[key]
            self._seen[key] += 1
            rng = random.Random(f"{self.seed}:{key[0]}:{key[1]}:{attempt}")
            roll = rng.random()
            if roll < self.error_rate:
                action = "error_503" if rng.random() < 0.5 else "error_500"
            elif roll < self.error_rate + self.drop_rate and method == "GET":
                action = "drop_mid_body"
            else:
                action = "forward"
            self.counts[action] += 1
            return action

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = bytearray()
            while True:
                size_line = self.rfile.readline()
                raw += size_line
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the blank line
                        line = self.rfile.readline()
                        raw += line
                        if line in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        if self.owner.latency_s:
            time.sleep(self.owner.latency_s)
        action = self.owner.decide(self.command, self.path)
        if action.startswith("error_"):
            self._send_error(int(action.removeprefix("error_")))
            return
        status, reason, headers, payload = self._forward(body)
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if action == "drop_mid_body" and len(payload) > 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        target = urlsplit(self.owner.upstream)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    connection.putheader(name, value)
            connection.endheaders(body or None)
            response = connection.getresponse()
            payload = response.read()
            headers = [
                (name, value)
                for name, value in response.getheaders()
                if name.lower() not in _HOP_BY_HOP and name.lower() not in ("transfer-encoding", "content-length")
            ]
            if self.command == "HEAD":
                length = response.getheader("Content-Length")
                if length is not None:
                    headers.append(("Content-Length", length))
            else:
                headers.append(("Content-Length", str(len(payload))))
            return response.status, response.reason, headers, payload
        finally:
            connection.close()

    def _send_error(self, status: int) -> None:
        code, message = _ERRORS[status]
        payload = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
