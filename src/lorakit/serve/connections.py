"""The server's connection limits: a cap on open connections, deadlines on reading a request's headers and
body, request bodies read within both, one log line (never a traceback) per refused connection, and SIGTERM
handled as SIGINT.

Why a deadline per phase and not only a socket timeout: a socket timeout bounds each ``recv``, so a client
sending one byte every 20 s (slowloris) holds a thread forever. Here one reaper thread shuts down the reading
side of any connection whose current phase ran past its deadline; the blocked read then returns at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lorakit.serve.openai import HTTPError

log = logging.getLogger("lorakit.serve")

MAX_JSON_DEPTH = 64  # an OpenAI request nests 4 levels (messages, a message, content parts, a part)


class Deadlines:
    """Deadlines on sockets, enforced by one daemon thread: an overdue socket's reading side is shut down."""

    def __init__(self, tick: float = 0.25) -> None:
        self._due: dict[socket.socket, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._tick = tick
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="lorakit-serve-deadlines", daemon=True).start()

    def arm(self, sock: socket.socket, seconds: float, phase: str) -> None:
        """``sock`` must finish ``phase`` (``"headers"``, ``"body"``) within ``seconds``."""
        with self._lock:
            self._due[sock] = (time.monotonic() + seconds, phase)

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                overdue = [(s, phase) for s, (due, phase) in self._due.items() if due <= now]
                for sock, _ in overdue:
                    del self._due[sock]
            for sock, phase in overdue:
                with contextlib.suppress(OSError):
                    peer = sock.getpeername()
                    log.info("%s closed: request %s not received in time", peer[0], phase)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)  # the blocked read returns b"" at once


class LimitedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with at most ``max_connections`` open connections (more get a 503 at once),
    the :class:`Deadlines` of its handlers, and one log line instead of a traceback when a handler fails."""

    daemon_threads = True  # a stuck client never blocks shutdown
    request_queue_size = 128  # listen backlog: socketserver's 5 resets bursts of concurrent clients

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        self.deadlines = Deadlines()
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.deadlines.disarm(request)
            self.slots.release()

    def _refuse(self, request: socket.socket, client_address) -> None:
        body = json.dumps(HTTPError(503, f"too many open connections (the limit is {self.max_connections}); "
                                    "retry later", None, "too_many_connections", "server_error").body())  # fmt: skip
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                f"{len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")  # fmt: skip
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            request.sendall(head.encode() + body.encode())
        log.info("%s refused: %d connections open (the limit)", client_address[0], self.max_connections)
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """One line, no traceback: a handler failed outside a request (a reset, a timeout)."""
        import sys

        err = sys.exc_info()[1]
        log.info("%s connection ended: %s: %s", client_address[0], type(err).__name__, err)

    def server_close(self) -> None:
        self.deadlines.stop()
        super().server_close()


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping past ``limit`` (iterative: no recursion)."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def read_json_body(handler: BaseHTTPRequestHandler, limit: int) -> dict | None:
    """The JSON object a request sent (None without a body), read within the handler's body deadline.

    Raises:
        HTTPError: 411 chunked, 400 bad Content-Length or JSON (NaN/Infinity, nesting past
            :data:`MAX_JSON_DEPTH` and >4300-digit numbers included), 413 too large, 408 body not received
            in time.
    """
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        handler.close_connection = True
        raise HTTPError(411, "send the body with a Content-Length header (chunked is not supported)")
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        handler.close_connection = True
        raise HTTPError(400, "Content-Length is not a number", None, "invalid_header") from None
    if length > limit:
        handler.close_connection = True  # the unread body would be taken for the next request
        raise HTTPError(
            413, f"request body is {length} bytes; the limit is {limit}", None, "request_too_large"
        )
    if length <= 0:
        return None
    raw = handler.rfile.read(length)
    if len(raw) < length:
        handler.close_connection = True
        raise HTTPError(408, f"request body incomplete: {len(raw)} of {length} bytes arrived in time", None,
                        "request_timeout")  # fmt: skip
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as err:  # JSON, UTF-8, NaN, numbers past 4300 digits, deep nesting
        raise HTTPError(
            400, f"request body is not valid JSON: {str(err)[:200]}", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise HTTPError(
            400, f"request body must be a JSON object, got {type(body).__name__}", None, "invalid_json"
        )
    if _depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise HTTPError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPError(400, "request body holds a lone surrogate (\\ud800-\\udfff): not valid Unicode", None,
                        "invalid_json") from None  # fmt: skip
    return body


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread: SIGTERM (how containers and systemd stop a service) raises KeyboardInterrupt, so it
    shuts the server down exactly as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["MAX_JSON_DEPTH", "Deadlines", "LimitedHTTPServer", "read_json_body", "sigterm_as_interrupt"]
