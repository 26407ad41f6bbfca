"""An HTTP server with the OpenAI API shape over :class:`~lorakit.serve.engine.Engine` (standard library only).

Routes (one table, :attr:`_Handler.ROUTES`)::

    GET    /v1/models               the base model and every loaded adapter
    POST   /v1/completions          {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stream"}
    POST   /v1/chat/completions     {"model", "messages", ...}; "stream": true sends server-sent events
    POST   /v1/adapters             {"name", "path"}: load an adapter (path inside the adapter root)
    DELETE /v1/adapters/{name}      unload an adapter (after its running requests finish)
    GET    /v1/stats                batching counters: decode steps, rows decoded, peak batch, running, waiting
    GET    /health                  {"status": "ok"}

``model`` names an adapter or the base model (its id is the model directory's name unless ``model_name``
is set). Request validation, error mapping and the response bodies are in :mod:`lorakit.serve.openai`; this
module is the transport: routing, bodies, keys, server-sent events, and the :class:`Server` lifecycle.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

from lorakit.errors import ConfigError, LorakitError
from lorakit.gguf_read import is_gguf
from lorakit.hardware import DTYPE_CHOICES
from lorakit.quant import QUANT_TYPES
from lorakit.serve.connections import LimitedHTTPServer, read_json_body, sigterm_as_interrupt
from lorakit.serve.engine import ADAPTER_NAME, Engine, EngineConfig, GenerationRequest, RequestHandle
from lorakit.serve.openai import (
    HTTPError,
    body_field,
    chat_messages,
    check_value,
    completion_response,
    error_for,
    generation_request,
    require_body,
    response_head,
    stream_chunk,
    usage,
)

log = logging.getLogger("lorakit.serve")


@dataclass(kw_only=True)
class ServeConfig(EngineConfig):
    """What :class:`Server` serves and where (plus the :class:`EngineConfig` limits it inherits).

    Args:
        model_dir (str): Local Hugging Face model directory (config, safetensors weights, tokenizer).
        adapters (dict[str, str]): Adapters loaded at start, name -> directory (inside ``adapter_root`` when
            one is set; relative paths are taken from it). Default none.
        host (str): Address to bind. Default ``"127.0.0.1"`` (this machine only; there is no TLS).
        port (int): TCP port; 0 picks a free one (see :attr:`Server.port`). Default 8000.
        quantize (str | None): ``"nf4"`` / ``"fp4"`` loads the base in 4 bits; None keeps it in ``dtype``.
        dtype (str): ``"auto"`` (default: bf16 where the device multiplies bf16 natively, else fp32 on CPU and
            fp16 on an older GPU; :mod:`lorakit.hardware`), ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        device (str): Where the model runs. Default ``"cpu"``.
        model_name (str | None): The base model's id in the API; default the model directory's name.
        api_key (str | None): If set, every request but ``/health`` needs ``Authorization: Bearer <key>``.
        max_body_bytes (int): Largest request body; bigger ones get 413. Default 1 MiB.
        max_connections (int): Most open connections; more get 503 at once. Default 256.
        header_timeout (float): Seconds a connection may take to send a request's headers (idle keep-alive
            time included); then it is closed. Default 20.
        body_timeout (float): Seconds a request may take to send its body; then 408. Default 30.
        shutdown_grace (float): Seconds :meth:`Server.close` waits for in-flight requests to be answered
            (each gets its answer or a 503). Default 10.
    """

    model_dir: str
    adapters: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    quantize: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    model_name: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_connections: int = 256
    header_timeout: float = 20.0
    body_timeout: float = 30.0
    shutdown_grace: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        gguf = is_gguf(self.model_dir) and Path(self.model_dir).is_file()
        if not (Path(self.model_dir) / "config.json").is_file() and not gguf:
            raise ConfigError(
                f"model_dir: {self.model_dir!r} holds no config.json (a Hugging Face model dir) "
                "and is not a .gguf file"
            )
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0..65535, got {self.port!r}")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ConfigError(
                f"quantize: expected one of {', '.join(QUANT_TYPES)} or None, got {self.quantize!r}"
            )
        if self.dtype is None:  # the old spelling of the default
            self.dtype = "auto"
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes: expected >= 1024, got {self.max_body_bytes}")
        if (
            isinstance(self.max_connections, bool)
            or not isinstance(self.max_connections, int)
            or (self.max_connections < 1)
        ):
            raise ConfigError(f"max_connections: expected an integer >= 1, got {self.max_connections!r}")
        for name in ("header_timeout", "body_timeout", "shutdown_grace"):
            if not isinstance(getattr(self, name), (int, float)) or not 0 < getattr(self, name) < 1e6:
                raise ConfigError(f"{name}: expected seconds > 0, got {getattr(self, name)!r}")


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests (HTTP/1.1 keep-alive); ``self.server.app`` is the :class:`Server`."""

    protocol_version = "HTTP/1.1"
    server_version = "lorakit"
    timeout = 60  # seconds an idle keep-alive connection is held open

    def setup(self) -> None:
        super().setup()
        # headers and body go out as separate writes: without NODELAY, Nagle + delayed ACK add ~40 ms each
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def handle_one_request(self) -> None:
        self._reason = None  # why a request was refused: logged on its one access-log line
        self.server.deadlines.arm(self.connection, self.server.app.config.header_timeout, "headers")
        super().handle_one_request()

    def log_error(self, format: str, *args) -> None:
        self._reason = format % args  # http.server's own refusals (bad request line, headers too long ...)

    def log_request(self, code="-", size="-") -> None:
        reason = getattr(self, "_reason", None)
        line = f'"{self.requestline[:200]}" {code}'
        log.info("%s %s%s", self.address_string(), line, f" ({reason[:300]})" if reason else "")

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------------------------------- plumbing
    def _dispatch(self, method: str) -> None:
        app: Server = self.server.app
        path = urlsplit(self.path).path
        arg, self._streaming = None, False
        if path.startswith("/v1/adapters/") and "/" not in path[len("/v1/adapters/") :]:
            path, arg = "/v1/adapters/{name}", unquote(path[len("/v1/adapters/") :])
        app.busy_requests(+1)
        try:
            self.server.deadlines.arm(self.connection, app.config.body_timeout, "body")
            body = read_json_body(self, app.config.max_body_bytes)
            self.server.deadlines.disarm(self.connection)
            routes = self.ROUTES.get(path)
            if routes is None:
                raise HTTPError(404, f"unknown route: {method} {self.path}", None, "unknown_url")
            if method not in routes:
                allow = ", ".join(sorted(routes))
                raise HTTPError(405, f"{method} is not allowed on {path}; use {allow}", None,
                                "method_not_allowed", headers={"Allow": allow})  # fmt: skip
            if app.config.api_key and path != "/health":
                self._check_key(app.config.api_key)
            routes[method](self, app, body, arg)
        except HTTPError as err:
            self._reason = err.message
            self._send_json(err.status, err.body(), err.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # a bug: one log line (the traceback at debug level), a 500 for the client
            self._reason = f"internal error: {type(err).__name__}: {str(err)[:200]}"
            log.debug("request %s %s failed", method, self.path, exc_info=True)
            if self._streaming:  # the status line is out already: all we can do is hang up
                self.close_connection = True
                log.info("%s %s", self.address_string(), self._reason)
                return
            self._send_json(500, HTTPError(500, self._reason, kind="server_error").body())
        finally:
            self.server.deadlines.disarm(self.connection)
            app.busy_requests(-1)

    def _check_key(self, key: str) -> None:
        sent = self.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            raise HTTPError(
                401, "missing or wrong API key (Authorization: Bearer <key>)", None, "invalid_api_key"
            )

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_event(self, payload: dict | str) -> None:
        """One server-sent event as one HTTP/1.1 chunk: ``data: {...}\\n\\n``."""
        data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # ----------------------------------------------------------------------------------------- endpoints
    def _health(self, app: Server, body: dict | None, arg: str | None) -> None:
        self._send_json(200, {"status": "closing" if app.engine.closing else "ok"})

    def _stats(self, app: Server, body: dict | None, arg: str | None) -> None:
        self._send_json(200, app.engine.stats())

    def _models(self, app: Server, body: dict | None, arg: str | None) -> None:
        self._send_json(200, {"object": "list", "data": [app.model_card(n) for n in app.model_ids()]})

    def _load_adapter(self, app: Server, body: dict | None, arg: str | None) -> None:
        body = body or {}
        name, path = body_field(body, "name", (str,)), body_field(body, "path", (str,))
        if app.config.adapter_root is None:
            raise HTTPError(403, "loading adapters at run time is disabled: start the server with an adapter "
                            "root (--adapter-root DIR)", "path", "adapter_loading_disabled")  # fmt: skip
        check_value(ADAPTER_NAME.fullmatch(name) is not None, "name", "1-64 of A-Z a-z 0-9 . _ -", name)
        if name == app.model_id:
            raise HTTPError(409, f"{name!r} is the base model's id; choose another name", "name", "conflict")
        try:
            app.engine.load_adapter(name, path)
        except ConfigError as err:  # the name is valid, so the path is at fault
            raise HTTPError(400, str(err), "path", "invalid_value") from None
        except LorakitError as err:
            raise error_for(err) from None
        self._send_json(201, app.model_card(name))

    def _unload_adapter(self, app: Server, body: dict | None, arg: str | None) -> None:
        try:
            app.engine.unload_adapter(arg)
        except (LorakitError, TimeoutError) as err:
            raise error_for(err) from None
        self._send_json(200, {"id": arg, "object": "model", "deleted": True})

    def _completions(self, app: Server, body: dict | None, arg: str | None) -> None:
        body = require_body(body)
        prompt = body_field(body, "prompt", (str, list))
        if isinstance(prompt, list):  # OpenAI allows a batch of prompts; one per request here
            check_value(len(prompt) == 1 and isinstance(prompt[0], str), "prompt", "a string", prompt)
            prompt = prompt[0]
        ids = app.engine.encode(prompt, add_special_tokens=True)
        request = app.generation_request(body, ids, "prompt", default_max_tokens=16)
        self._answer(app, body, request, chat=False)

    def _chat_completions(self, app: Server, body: dict | None, arg: str | None) -> None:
        body = require_body(body)
        messages = chat_messages(body_field(body, "messages", (list,)))
        try:
            text = app.engine.render_chat(messages)
        except ConfigError as err:
            raise HTTPError(400, str(err), "messages", "invalid_value") from None
        ids = app.engine.encode(text, add_special_tokens=False)  # the template writes its own BOS
        request = app.generation_request(body, ids, "messages", default_max_tokens=None)
        self._answer(app, body, request, chat=True)

    def _answer(self, app: Server, body: dict, request: GenerationRequest, chat: bool) -> None:
        """Submit ``request`` and answer with one JSON body, or with server-sent events when streaming."""
        try:
            handle = app.engine.submit(request)
        except LorakitError as err:
            raise error_for(err) from None
        head = response_head(body["model"], chat, request.stream)
        if not request.stream:
            try:
                done = handle.result()
            except Exception as err:  # the engine closed (503) or the forward failed (500)
                raise error_for(err) from None
            self._send_json(200, completion_response(head, done, chat))
            return
        options = body_field(body, "stream_options", (dict,), {})
        self._stream(handle, head, chat, body_field(options, "include_usage", (bool,), False))

    def _stream(self, handle: RequestHandle, head: dict, chat: bool, include_usage: bool) -> None:
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if chat:
                self._send_event(stream_chunk(head, chat, None, None, role=True))
            try:
                for piece in handle:
                    self._send_event(stream_chunk(head, chat, piece, None))
                done = handle.completion
                self._send_event(stream_chunk(head, chat, None, done.finish_reason))
                if include_usage:
                    self._send_event({**head, "choices": [], "usage": usage(done)})
            except Exception as err:  # the engine closed or the forward failed: say so in the stream
                self._send_event(error_for(err).body())
            self._send_event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            handle.cancel()  # the client went away: free its batch slot
            self.close_connection = True

    ROUTES: ClassVar[dict[str, dict]] = {
        "/v1/models": {"GET": _models},
        "/v1/completions": {"POST": _completions},
        "/v1/chat/completions": {"POST": _chat_completions},
        "/v1/adapters": {"POST": _load_adapter},
        "/v1/adapters/{name}": {"DELETE": _unload_adapter},
        "/v1/stats": {"GET": _stats},
        "/health": {"GET": _health},
    }


class _HTTPServer(LimitedHTTPServer):
    def __init__(self, app: Server) -> None:
        self.app = app
        super().__init__((app.config.host, app.config.port), _Handler, app.config.max_connections)


class Server:
    """A running OpenAI-compatible server: the model, its adapters, the engine and the HTTP listener.

    Binding happens in the constructor (so ``port=0`` is resolved at once); nothing is served before
    :meth:`start` (background thread) or :meth:`serve_forever` (this thread). Use it as a context manager
    for a clean shutdown::

        with Server(ServeConfig(model_dir="base", adapter_root="adapters", port=0)).start() as server:
            httpx.post(f"{server.url}/v1/completions", json={"model": "base", "prompt": "Hi"})

    Args:
        config (ServeConfig): What to serve and how.
        model (nn.Module | None): An already loaded model (then ``tokenizer`` too); default: load
            ``config.model_dir``.
        tokenizer: Its tokenizer.

    Raises:
        ConfigError: A bad setting or adapter name. AdapterFileError / AdapterPathError: A bad adapter.
        OSError: The address is in use.
    """

    def __init__(self, config: ServeConfig, model=None, tokenizer=None) -> None:
        self.config = config
        if model is None:
            model, tokenizer = _load(config)
        self.model_id = config.model_name or Path(config.model_dir).resolve().name
        self.created = int(time.time())
        self.engine = Engine(model, tokenizer, config)
        for name, path in config.adapters.items():
            if name == self.model_id:
                raise ConfigError(f"adapters: {name!r} is the base model's id; choose another name")
            self.engine.load_adapter(name, path)
        self._busy, self._idle = 0, threading.Condition()  # requests being answered (close waits for them)
        self._httpd = _HTTPServer(self)
        self._serving = False  # serve_forever was entered (so shutdown() will return)

    @property
    def host(self) -> str:
        """The bound address."""
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        """The bound port (the real one when started with ``port=0``)."""
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> Server:
        """Serve in a background thread; returns at once."""
        self.engine.start()
        self._serving = True
        threading.Thread(target=self._httpd.serve_forever, name="lorakit-serve-http", daemon=True).start()
        log.info("serving %s with adapters %s on %s", self.model_id, list(self.engine.adapters()), self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C or SIGTERM), then shut down cleanly (:meth:`close`)."""
        self.engine.start()
        self._serving = True
        log.info("serving %s with adapters %s on %s", self.model_id, list(self.engine.adapters()), self.url)
        try:
            with sigterm_as_interrupt():
                self._httpd.serve_forever()
        except KeyboardInterrupt:
            log.info("shutting down: in-flight requests get their answer or a 503")
        finally:
            self.close()

    def busy_requests(self, change: int) -> None:
        """Count a request being answered (+1) or done (-1)."""
        with self._idle:
            self._busy += change
            self._idle.notify_all()

    def close(self) -> None:
        """Refuse new work (503), answer waiting requests (each in-flight request gets its answer or a 503
        within ``shutdown_grace`` seconds), stop listening and the engine."""
        self.engine.close()
        with self._idle:
            self._idle.wait_for(lambda: self._busy <= 0, timeout=self.config.shutdown_grace)
        if self._serving:
            self._httpd.shutdown()  # waits for the serving loop to exit (at once if it already has)
            self._serving = False
        self._httpd.server_close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ helpers for handlers
    def model_ids(self) -> list[str]:
        """The base model's id, then every loaded adapter's name."""
        return [self.model_id, *self.engine.adapters()]

    def model_card(self, name: str) -> dict:
        """One entry of ``/v1/models``."""
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "lorakit"}
        return card if name == self.model_id else {**card, "parent": self.model_id}

    def generation_request(
        self, body: dict, ids: list[int], prompt_field: str, default_max_tokens: int | None
    ) -> GenerationRequest:
        """Validate a completion request against this server's models and limits (see
        :func:`lorakit.serve.openai.generation_request`)."""
        return generation_request(
            body,
            ids,
            prompt_field,
            default_max_tokens,
            base_id=self.model_id,
            adapters=self.engine.adapters(),
            max_tokens_limit=self.config.max_tokens_limit,
            context_length=self.engine.context_length,
        )


def _load(config: ServeConfig):
    from lorakit.loading import check_model_source, load_model, load_tokenizer

    check_model_source(config.model_dir)  # config, model_type and tokenizer before any work
    tokenizer = load_tokenizer(config.model_dir)
    model = load_model(
        config.model_dir, quantize=config.quantize, compute_dtype=config.dtype, device=config.device
    )
    return model, tokenizer


def serve(model_dir: str, adapters: dict[str, str] | None = None, **options) -> Server:
    """Load ``model_dir`` with ``adapters`` and serve it in a background thread.

    Args:
        model_dir (str): Local Hugging Face model directory.
        adapters (dict[str, str] | None): Adapters to load at start, name -> directory.
        **options: Any other :class:`ServeConfig` field: ``adapter_root``, ``host`` ("127.0.0.1"), ``port``
            (8000; 0 for a free one), ``max_batch``, ``max_queue``, ``max_tokens_limit``, ``quantize``, ...

    Returns:
        Server: Started; ``server.url`` is its address; ``server.close()`` (or ``with``) stops it.
    """
    return Server(ServeConfig(model_dir=str(model_dir), adapters=dict(adapters or {}), **options)).start()


__all__ = ["HTTPError", "ServeConfig", "Server", "serve"]
