"""A fault-injecting HTTP reverse proxy for S3 tests (stdlib only).

``FaultProxy`` listens on ``127.0.0.1:<free port>`` and forwards every request
to an upstream (normally a moto ``S3Server``), optionally replacing it by a
fault.  Faults can be changed at runtime from the test thread::

    with S3Server() as s3, FaultProxy(s3.endpoint_url, seed=0) as proxy:
        fs = s3fs.S3FileSystem(skip_instance_cache=True,
                               **storage_options_for(proxy.endpoint_url))
        proxy.set_faults(rate=0.3, kinds=("slowdown",), methods=("PUT",))
        fs.pipe_file("bucket/key", b"data")
        print(proxy.stats)

Fault kinds (``FAULT_KINDS``):

``slowdown``     503 ``SlowDown`` S3 error (throttling; retried by botocore and s3fs).
``error500``     500 ``InternalError`` (retried by botocore only).
``forbidden``    403 ``AccessDenied`` (permanent; nobody retries it).
``notfound``     404 ``NoSuchKey``.
``reset``        read the request, then abort the TCP connection with RST and
                 no response; the upstream never sees the request.
``disconnect``   read the request, then close the connection gracefully (FIN)
                 without a response; the upstream never sees the request.
``reset_after``  forward the request (it takes effect upstream!), then RST
                 instead of relaying the response: the "lost acknowledgement"
                 case.
``stall``        sleep ``stall_seconds`` (capped at ``MAX_STALL_SECONDS``;
                 interrupted by ``close()``), then forward normally.

Decisions come from ``random.Random(seed)`` drawn once per matching request,
under a lock, so the *sequence* of decisions is deterministic; which request
gets which decision depends on arrival order when a client sends
concurrently.  ``count`` limits how many faults are injected in total, which
makes "fail exactly the first matching request" tests fully deterministic.

Request bodies are read completely (``Content-Length`` or de-chunked
``Transfer-Encoding: chunked``) and forwarded with a ``Content-Length``;
``Content-Encoding: aws-chunked`` payloads pass through untouched.  Responses
are streamed back in 1 MiB pieces.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import logging
import random
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable

logger = logging.getLogger(__name__)

FAULT_KINDS = (
    "slowdown",
    "reset",
    "reset_after",
    "disconnect",
    "stall",
    "error500",
    "forbidden",
    "notfound",
)
MAX_STALL_SECONDS = 60.0
_COPY_CHUNK = 1 << 20
_MAX_CHUNK_LINE = 4096
_MAX_HEADER_LINES = 1000
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

_ERRORS = {
    # kind: (status, reason, S3 code, message)
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "error500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "forbidden": (403, "Forbidden", "AccessDenied", "Access Denied"),
    "notfound": (404, "Not Found", "NoSuchKey", "The specified key does not exist."),
}


def s3_error_body(code: str, message: str, resource: str = "", request_id: str = "fault-proxy") -> bytes:
    """Return an S3-style XML error document."""
    from xml.sax.saxutils import escape

    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{escape(request_id)}</RequestId></Error>"
    ).encode()


@dataclass
class FaultConfig:
    """Current fault settings of a ``FaultProxy`` (see ``FaultProxy.set_faults``)."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ("slowdown",)
    methods: tuple[str, ...] | None = None
    path_contains: str | None = None
    permanent: bool = False
    count: int | None = None
    stall_seconds: float = 2.0

    def matches(self, method: str, target: str) -> bool:
        """True when a request with ``method`` and raw ``target`` is eligible for a fault."""
        if self.methods is not None and method.upper() not in self.methods:
            return False
        if self.path_contains is not None and self.path_contains not in target:
            return False
        return True


@dataclass
class _Stats:
    requests: int = 0
    forwarded: int = 0
    faults: int = 0
    upstream_errors: int = 0
    by_kind: collections.Counter = field(default_factory=collections.Counter)
    by_method: collections.Counter = field(default_factory=collections.Counter)


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, proxy: "FaultProxy") -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("proxy: unhandled error for %s", client_address, exc_info=True)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint
    server: _ProxyServer

    # idle keep-alive connections are dropped after this long (bounds threads)
    timeout = 120

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("proxy %s - " + format, self.address_string(), *args)

    def setup(self) -> None:
        super().setup()
        self.server.proxy._register(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.proxy._unregister(self.connection)

    # every method goes through the same path
    def do_GET(self) -> None:  # noqa: N802
        try:
            self._handle()
        except (ConnectionError, TimeoutError, OSError) as exc:
            # client went away mid-response (or our own reset): just drop the connection
            logger.debug("proxy: connection error on %s %s: %s", self.command, self.path, exc)
            self.close_connection = True

    do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = do_GET

    # ------------------------------------------------------------------ body
    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        parts = []
        for _ in range(10_000_000):  # bounded; each iteration consumes one chunk
            line = self.rfile.readline(_MAX_CHUNK_LINE)
            if not line:
                raise ConnectionError("EOF inside chunked body")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                for _ in range(_MAX_HEADER_LINES):  # trailers until blank line
                    trailer = self.rfile.readline(_MAX_CHUNK_LINE)
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                break
            parts.append(self.rfile.read(size))
            self.rfile.readline(_MAX_CHUNK_LINE)  # CRLF after the chunk
        return b"".join(parts)

    # ---------------------------------------------------------------- faults
    def _reset_connection(self) -> None:
        """Abort the client connection with a TCP RST and send nothing."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass

    def _send_error_response(self, kind: str) -> None:
        status, reason, code, message = _ERRORS[kind]
        body = s3_error_body(code, message, resource=urllib.parse.urlsplit(self.path).path)
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", "fault-proxy")
        if kind == "slowdown":
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # --------------------------------------------------------------- forward
    def _handle(self) -> None:
        proxy = self.server.proxy
        method = self.command
        try:
            body = self._read_body()
        except (OSError, ValueError) as exc:
            logger.debug("proxy: bad request body for %s %s: %s", method, self.path, exc)
            self.close_connection = True
            return
        fault = proxy._decide(method, self.path)
        if fault is not None:
            logger.debug("proxy: injecting %s into %s %s", fault, method, self.path)
        if fault == "reset":
            self._reset_connection()
            return
        if fault == "disconnect":
            self.close_connection = True  # the server closes the socket: FIN, no response
            return
        if fault in _ERRORS:
            self._send_error_response(fault)
            return
        if fault == "stall":
            proxy._stall()
        try:
            status, reason, headers, upstream_resp, conn = self._forward(method, body)
        except (OSError, http.client.HTTPException) as exc:
            proxy._count_upstream_error()
            logger.warning("proxy: upstream failed for %s %s: %s", method, self.path, exc)
            self._send_bad_gateway(str(exc))
            return
        try:
            if fault == "reset_after":
                upstream_resp.read()  # let the upstream finish; drop its answer
                self._reset_connection()
                return
            self._relay(status, reason, headers, upstream_resp)
        finally:
            conn.close()

    def _forward(self, method: str, body: bytes):
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy._up_host, proxy._up_port, timeout=proxy.upstream_timeout)
        conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
        if "Host" not in self.headers:
            conn.putheader("Host", f"{proxy._up_host}:{proxy._up_port}")
        for name, value in self.headers.items():
            lname = name.lower()
            if lname in _HOP_BY_HOP or lname == "content-length" or lname in proxy.drop_request_headers:
                continue
            conn.putheader(name, value)
        if body or method in ("PUT", "POST", "PATCH") or "Content-Length" in self.headers:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        proxy._count_forwarded()
        return resp.status, resp.reason, resp.getheaders(), resp, conn

    def _relay(self, status: int, reason: str, headers: list[tuple[str, str]], resp: http.client.HTTPResponse) -> None:
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        length = resp.getheader("Content-Length")
        chunked = "chunked" in (resp.getheader("Transfer-Encoding") or "").lower()
        data = None
        if not no_body and (length is None or chunked):
            data = resp.read()  # unknown length: buffer so we can send Content-Length
            length = str(len(data))
        self.send_response(status, reason)
        for name, value in headers:
            lname = name.lower()
            if lname in _HOP_BY_HOP or lname in ("content-length", "server", "date"):
                continue
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", length)
        elif no_body and self.command != "HEAD":
            self.send_header("Content-Length", "0")
        self.end_headers()
        if no_body:
            return
        if data is not None:
            self.wfile.write(data)
            return
        remaining = int(length)
        while remaining > 0:  # bounded by the declared length
            chunk = resp.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                self.close_connection = True  # upstream short read: client sees truncation
                break
            self.wfile.write(chunk)
            remaining -= len(chunk)

    def _send_bad_gateway(self, message: str) -> None:
        body = s3_error_body("BadGateway", message)
        self.send_response(502, "Bad Gateway")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class FaultProxy:
    """Fault-injecting reverse proxy in front of an S3 endpoint.

    Args:
        upstream_url: ``http://host:port`` of the real endpoint (moto).
        seed: Seed of the fault decision RNG.
        upstream_timeout: Socket timeout (s) for the upstream connection.
        drop_request_headers: Request headers never forwarded (case-insensitive), e.g.
            ``("If-None-Match",)`` to play a store that ignores conditional writes.

    The proxy starts serving in the constructor; stop it with ``close()`` or
    by leaving the ``with`` block.  No faults are injected until
    ``set_faults`` is called.
    """

    def __init__(self, upstream_url: str, seed: int | None = 0, upstream_timeout: float = 60.0,
                 drop_request_headers: Iterable[str] = ()) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream_url must be http://host:port, got {upstream_url!r}")
        self.upstream_url = upstream_url
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self.upstream_timeout = float(upstream_timeout)
        self.drop_request_headers = frozenset(h.lower() for h in drop_request_headers)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._config = FaultConfig()
        self._stats = _Stats()
        self._events: collections.deque[tuple[str, str, str | None]] = collections.deque(maxlen=10_000)
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server = _ProxyServer(self)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"FaultProxy:{self.port}", daemon=True
        )
        self._thread.start()
        logger.info("FaultProxy %s -> %s", self.endpoint_url, upstream_url)

    # ------------------------------------------------------------------- API
    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` to give clients instead of the upstream URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> FaultConfig:
        """A copy of the current fault configuration."""
        with self._lock:
            return FaultConfig(**vars(self._config))

    def set_faults(
        self,
        rate: float = 0.0,
        kinds: Iterable[str] = ("slowdown",),
        methods: Iterable[str] | None = None,
        path_contains: str | None = None,
        permanent: bool = False,
        count: int | None = None,
        stall_seconds: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Replace the fault configuration (takes effect for the next request).

        Args:
            rate: Probability in [0, 1] that a matching request gets a fault.
            kinds: Fault kinds to choose from uniformly (see ``FAULT_KINDS``).
            methods: HTTP methods eligible for faults (``None``: all).
            path_contains: Only requests whose raw target (path + query)
                contains this substring are eligible, e.g. ``"uploadId="`` or
                a key name.
            permanent: Every matching request fails (overrides ``rate``).
            count: Inject at most this many faults, then pass through.
            stall_seconds: Delay for the ``stall`` kind (capped at
                ``MAX_STALL_SECONDS``); unchanged when ``None``.
            seed: Re-seed the decision RNG when given.
        """
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in FAULT_KINDS]
        if unknown or not kinds:
            raise ValueError(f"unknown/empty fault kinds {kinds!r}; choose from {FAULT_KINDS}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate}")
        with self._lock:
            stall = self._config.stall_seconds if stall_seconds is None else float(stall_seconds)
            self._config = FaultConfig(
                rate=float(rate),
                kinds=kinds,
                methods=None if methods is None else tuple(m.upper() for m in methods),
                path_contains=path_contains,
                permanent=bool(permanent),
                count=count,
                stall_seconds=min(max(0.0, stall), MAX_STALL_SECONDS),
            )
            if seed is not None:
                self._rng = random.Random(seed)
        logger.info("FaultProxy %s faults: %s", self.port, self._config)

    def clear_faults(self) -> None:
        """Stop injecting faults (pass everything through)."""
        with self._lock:
            self._config = FaultConfig(stall_seconds=self._config.stall_seconds)

    @property
    def stats(self) -> dict[str, Any]:
        """Snapshot of counters.

        Keys: ``requests`` (seen), ``forwarded`` (answered by upstream),
        ``faults`` (injected), ``upstream_errors``, ``by_kind`` and
        ``by_method`` (plain dicts).
        """
        with self._lock:
            s = self._stats
            return {
                "requests": s.requests,
                "forwarded": s.forwarded,
                "faults": s.faults,
                "upstream_errors": s.upstream_errors,
                "by_kind": dict(s.by_kind),
                "by_method": dict(s.by_method),
            }

    @property
    def events(self) -> list[tuple[str, str, str | None]]:
        """The last (up to 10 000) requests as ``(method, target, fault_or_None)``."""
        with self._lock:
            return list(self._events)

    def reset_stats(self) -> None:
        """Zero all counters and forget recorded events."""
        with self._lock:
            self._stats = _Stats()
            self._events.clear()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, abort open client connections and join the server thread; idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()  # wakes stalled handlers
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:  # unblock handler threads waiting on idle keep-alive sockets
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded wait for handler threads to finish
            with self._lock:
                if not self._conns:
                    break
            time.sleep(0.01)
        logger.info("FaultProxy %s closed; stats %s", self.port, self.stats)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --------------------------------------------------- handler callbacks
    def _decide(self, method: str, target: str) -> str | None:
        with self._lock:
            cfg = self._config
            self._stats.requests += 1
            self._stats.by_method[method] += 1
            fault = None
            if cfg.matches(method, target) and (cfg.count is None or cfg.count > 0):
                hit = cfg.permanent or (cfg.rate > 0 and self._rng.random() < cfg.rate)
                if hit:
                    fault = cfg.kinds[0] if len(cfg.kinds) == 1 else self._rng.choice(cfg.kinds)
                    if cfg.count is not None:
                        cfg.count -= 1
                    self._stats.faults += 1
                    self._stats.by_kind[fault] += 1
            self._events.append((method, target, fault))
            return fault

    def _stall(self) -> None:
        with self._lock:
            seconds = self._config.stall_seconds
        self._closing.wait(min(seconds, MAX_STALL_SECONDS))

    def _count_forwarded(self) -> None:
        with self._lock:
            self._stats.forwarded += 1

    def _count_upstream_error(self) -> None:
        with self._lock:
            self._stats.upstream_errors += 1

    def _register(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.add(sock)

    def _unregister(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)
