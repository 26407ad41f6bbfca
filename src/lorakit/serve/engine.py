"""One base model, many named adapters, continuous batching of decode steps (S-LoRA, arXiv 2311.03285).

Requests wait in a bounded queue. A scheduler thread owns the model and loops:

1. admit waiting requests while the running batch has room: each one's prompt is prefilled alone (batch of
   one, its own adapter) and its first token sampled; it then joins the running batch;
2. run one decode step for the whole running batch in a single forward, each row with its own adapter
   (``lorakit.inject.batch_adapters``: one base GEMM plus gathered low-rank products);
3. sample one token per row; rows that hit a stop token or their ``max_tokens`` leave and their callers are
   answered.

The running batch, its left-padded KV cache and per-row sampling are in :mod:`lorakit.serve.batch`.
"""

from __future__ import annotations

import collections
import inspect
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue

import torch
from torch import nn

from lorakit.data import stop_token_ids
from lorakit.errors import AdapterPathError, ConfigError, LorakitError
from lorakit.files import resolve_adapter_path
from lorakit.inject import adapter_configs, delete_adapter
from lorakit.io import load_adapter, read_adapter_config
from lorakit.serve.batch import Batch, Row, prefill, sample_next

log = logging.getLogger("lorakit.serve")

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class QueueFullError(LorakitError, RuntimeError):
    """The waiting queue is full; retry later (HTTP 429)."""


class EngineClosedError(LorakitError, RuntimeError):
    """The engine is shutting down or stopped; no new work is accepted (HTTP 503)."""


class UnknownModelError(LorakitError, LookupError):
    """No adapter of that name is loaded (HTTP 404)."""


class AdapterConflictError(LorakitError, RuntimeError):
    """An adapter of that name is already loaded, or is being unloaded (HTTP 409)."""


@dataclass(kw_only=True)
class EngineConfig:
    """How much work the engine takes on.

    Args:
        max_batch (int): Most requests decoded together in one forward. Default 16.
        max_queue (int): Most requests waiting for a batch slot; further ones are refused with
            :class:`QueueFullError`. Default 64.
        max_tokens_limit (int): Largest ``max_tokens`` a request may ask for. Default 1024.
        adapter_root (str | None): The directory every adapter path must resolve into (relative paths are
            taken from here). ``None``: adapter paths are used as given and loading at run time over HTTP is
            disabled. Default None.
    """

    max_batch: int = 16
    max_queue: int = 64
    max_tokens_limit: int = 1024
    adapter_root: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_tokens_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise ConfigError(f"adapter_root: {self.adapter_root!r} is not a directory")


@dataclass
class GenerationRequest:
    """One completion to compute (already tokenized; validated by the caller, e.g. the HTTP layer).

    Args:
        prompt_ids (list[int]): The prompt's token ids (at least one).
        adapter (str | None): Adapter name, or ``None`` for the base model.
        max_tokens (int): Most tokens to generate (the stop token included). Default 16.
        temperature (float): 0 means greedy; otherwise softmax temperature. Default 0.
        top_p (float): Nucleus sampling mass in (0, 1]. Default 1.
        seed (int | None): Seed of this request's own generator: the same seed gives the same sample
            whatever else is in the batch. Default None (random).
        stream (bool): Deliver text pieces as they are generated. Default False.
        ignore_eos (bool): Do not stop at stop tokens (benchmarks). Default False.
    """

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    ignore_eos: bool = False


@dataclass
class Completion:
    """A finished request: the new text (cut before the stop token), why it ended, and token counts."""

    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


class RequestHandle:
    """The caller's side of a submitted request: iterate for streamed text, or wait for :meth:`result`."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.cancelled = False
        self.completion: Completion | None = None
        self.answered = False  # set by the engine once its final event is out
        self._events: SimpleQueue = SimpleQueue()

    def cancel(self) -> None:
        """Stop working on this request (e.g. its client went away); it gets no answer."""
        self.cancelled = True

    def __iter__(self):
        """Yield text pieces (only for ``stream=True`` requests) until done; then :attr:`completion` is set.

        Raises:
            EngineClosedError: The engine closed before the request finished.
            RuntimeError: The forward pass failed (the engine goes on with other requests).
        """
        while True:
            kind, value = self._events.get()
            if kind == "delta":
                yield value
            elif kind == "done":
                self.completion = value
                return
            else:
                raise value

    def result(self) -> Completion:
        """Wait for the finished :class:`Completion` (streamed pieces, if any, are skipped)."""
        for _ in self:
            pass
        return self.completion


class Engine:
    """Serve one base model with many adapters, batching concurrent requests step by step.

    Args:
        model (nn.Module): A causal LM in eval mode (wrapped with adapters or not), e.g. from
            :func:`lorakit.load_model`. The engine's thread is the only one that runs it.
        tokenizer: Its tokenizer.
        config (EngineConfig): Batch, queue and token limits, and the adapter root.
    """

    def __init__(self, model: nn.Module, tokenizer, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config or EngineConfig()
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.device = next(model.parameters()).device
        # prefill needs the last position's logits only; most transformers LMs can skip the rest
        accepts = inspect.signature(model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        text_config = model.config.get_text_config(decoder=True)
        self.context_length: int | None = getattr(text_config, "max_position_embeddings", None)
        self._adapters: dict[str, Path] = {name: Path("<in memory>") for name in adapter_configs(model)}
        self._draining: set[str] = set()
        self._inflight = collections.Counter()  # adapter (None: base) -> its queued + running requests
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._cond = threading.Condition()  # guards the fields above and _closing
        self._model_lock = threading.Lock()  # one forward or one adapter change at a time
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share between threads
        self._closing = False
        self._thread: threading.Thread | None = None
        self._batch = Batch()
        # counters for tests and benchmarks: most rows in one decode step, steps, rows over all steps
        self.peak_batch = self.decode_steps = self.decoded_rows = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorakit-serve-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, answer waiting and running ones with :class:`EngineClosedError`, stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():  # else the thread answers its rows itself
            self._fail_all(EngineClosedError("the server is shutting down"))

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closing

    # ---------------------------------------------------------------------------------------- tokenizing
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (thread-safe)."""
        with self._tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def render_chat(self, messages: list[dict]) -> str:
        """``messages`` through the tokenizer's chat template, ending with the assistant's turn opener.

        Raises:
            ConfigError: The tokenizer has no chat template, or the template rejects the messages.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("the model's tokenizer has no chat template; use /v1/completions instead")
        with self._tokenizer_lock:
            try:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception as err:  # jinja's own errors (e.g. a template raising on an unknown role)
                raise ConfigError(f"messages: the chat template rejected them: {err}") from None

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------ adapters
    def adapters(self) -> dict[str, Path]:
        """Adapters that requests may name (name -> directory), in load order."""
        with self._cond:
            return {n: p for n, p in self._adapters.items() if n not in self._draining}

    def load_adapter(self, name: str, path: str) -> Path:
        """Load the adapter at ``path`` (confined to ``adapter_root``) under ``name``; waits for the current
        decode step to end.

        Raises:
            AdapterConflictError: ``name`` is taken.
            ConfigError: ``name`` is not a valid adapter name.
            AdapterPathError, ConfigError, AdapterFileError, AdapterMismatchError: The path or files are bad.
        """
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ConfigError(
                f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        directory = resolve_adapter_path(self.config.adapter_root, path)
        config = read_adapter_config(directory)
        if config.modules_to_save:
            raise ConfigError(
                f"{directory}: adapters with modules_to_save ({config.modules_to_save}) cannot share a "
                "mixed batch; serve a merged model instead (lorakit merge)"
            )
        with self._model_lock:
            with self._cond:
                if name in self._adapters:
                    raise AdapterConflictError(
                        f"an adapter named {name!r} is already loaded; unload it first"
                    )
            load_adapter(self.model, directory, adapter_name=name, activate=False)
            with self._cond:
                self._adapters[name] = directory
        log.info("loaded adapter %r from %s", name, directory)
        return directory

    def unload_adapter(self, name: str, timeout: float = 60.0) -> None:
        """Stop taking requests for ``name``, wait until its queued and running requests finish, free it.

        Raises:
            UnknownModelError: No such adapter.
            AdapterConflictError: It is already being unloaded.
            TimeoutError: Its requests did not finish within ``timeout`` seconds (it stays loaded).
        """
        with self._cond:
            if name not in self._adapters:
                raise UnknownModelError(
                    f"no adapter named {name!r} is loaded; loaded: {sorted(self._adapters)}"
                )
            if name in self._draining:
                raise AdapterConflictError(f"adapter {name!r} is already being unloaded")
            self._draining.add(name)
            drained = self._cond.wait_for(lambda: self._inflight[name] == 0, timeout)
            if not drained:
                self._draining.discard(name)
                raise TimeoutError(f"adapter {name!r} still has requests after {timeout} s; it stays loaded")
        with self._model_lock:
            delete_adapter(self.model, name)
            with self._cond:
                del self._adapters[name]
                self._draining.discard(name)
        log.info("unloaded adapter %r", name)

    # -------------------------------------------------------------------------------------------- submit
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``; returns at once with a handle to wait on.

        Raises:
            EngineClosedError: The engine is shutting down.
            UnknownModelError: ``request.adapter`` is not loaded.
            QueueFullError: ``max_queue`` requests are already waiting.
            ConfigError: The request does not fit the model's context.
        """
        total = len(request.prompt_ids) + request.max_tokens
        if not request.prompt_ids or (self.context_length is not None and total > self.context_length):
            raise ConfigError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) must be in "
                f"1..{self.context_length} (the model's context)"
            )
        handle = RequestHandle(request)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the server is shutting down")
            if request.adapter is not None and (
                request.adapter not in self._adapters or request.adapter in self._draining
            ):
                raise UnknownModelError(f"no adapter named {request.adapter!r} is loaded")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are waiting (max_queue); retry shortly")
            self._queue.append(handle)
            self._inflight[request.adapter] += 1
            self._cond.notify_all()
        return handle

    def generate(self, request: GenerationRequest) -> Completion:
        """Submit ``request`` and wait for its :class:`Completion`."""
        return self.submit(request).result()

    def stats(self) -> dict[str, int]:
        """Batching counters since start: ``decode_steps``, ``decoded_rows`` (rows over all steps; divided by
        the steps, the mean batch), ``peak_batch``; and now: ``running`` rows and ``waiting`` requests."""
        with self._cond:
            waiting = len(self._queue)
        return {
            "decode_steps": self.decode_steps, "decoded_rows": self.decoded_rows, "peak_batch": self.peak_batch,
            "running": len(self._batch.rows), "waiting": waiting,
        }  # fmt: skip

    # ----------------------------------------------------------------------------------------- scheduler
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or self._queue or self._batch.rows)
                if self._closing:
                    break
                room = self.config.max_batch - len(self._batch.rows)
                admitted = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            try:
                with self._model_lock, torch.no_grad():
                    self._admit(admitted)
                    if self._batch.rows:
                        self._decode_step()
            except Exception as err:  # a failed forward must not take the server down: fail its requests
                log.exception("serving step failed")
                failed = [row.handle for row in self._batch.rows] + admitted
                self._batch = Batch()
                for handle in failed:
                    self._answer(handle, "error", RuntimeError(f"generation failed: {err}"))
        self._fail_all(EngineClosedError("the server is shutting down"))

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Prefill each admitted request alone, sample its first token, and join the batch with the rest.

        A request whose prefill fails is answered with the error alone; the running batch is not touched.
        """
        joining = []
        for handle in handles:
            if handle.cancelled:
                self._answer(handle, None, None)
                continue
            row = Row.start(handle, self._decode, self.device)
            try:
                logits, cache = prefill(self.model, handle.request, self.device, **self._last_logits_only)
                if not self._advance(row, logits):
                    joining.append((row, cache))
            except Exception as err:
                log.exception("prefill failed")
                self._answer(handle, "error", RuntimeError(f"prefill failed: {err}"))
        if joining:
            self._batch.join(joining)

    def _decode_step(self) -> None:
        batch = self._batch
        self.peak_batch = max(self.peak_batch, len(batch.rows))
        self.decode_steps, self.decoded_rows = self.decode_steps + 1, self.decoded_rows + len(batch.rows)
        logits = batch.step(self.model)  # [B, vocab]
        greedy = logits.argmax(-1).tolist()
        keep = []
        for i, row in enumerate(batch.rows):
            if row.handle.cancelled:
                self._answer(row.handle, None, None)
            elif not self._advance(row, logits[i], greedy[i]):
                keep.append(i)
        next_tokens = [batch.rows[i].generated[-1] for i in keep]
        if len(keep) < len(batch.rows):
            batch.keep(keep)
        if keep:
            batch.tokens = torch.tensor(next_tokens, device=batch.mask.device)

    def _advance(self, row: Row, logits: torch.Tensor, greedy: int | None = None) -> bool:
        """Choose ``row``'s next token from ``logits`` [vocab]; stream it; answer the row if it is done."""
        request = row.handle.request
        token = row.choose(logits, greedy)
        row.generated.append(token)
        stopped = token in self.stop_ids and not request.ignore_eos
        if row.stream is not None and not stopped:
            piece = row.stream.push(token)
            if piece:
                row.handle._events.put(("delta", piece))
        if not stopped and len(row.generated) < request.max_tokens:
            return False
        text_ids = row.generated[:-1] if stopped else row.generated
        text = self._decode(text_ids)
        if row.stream is not None:
            # the window decoder held back nothing but an incomplete character; finish on the full text
            rest = text[len(row.stream.sent) :] if text.startswith(row.stream.sent) else ""
            text = row.stream.sent + rest
            if rest:
                row.handle._events.put(("delta", rest))
        completion = Completion(
            text, "stop" if stopped else "length", len(request.prompt_ids), len(row.generated), row.generated
        )
        self._answer(row.handle, "done", completion)
        return True

    def _answer(self, handle: RequestHandle, kind: str | None, value) -> None:
        """Deliver the final event (none for a cancelled request) and release its adapter, once."""
        if handle.answered:
            return
        handle.answered = True
        if kind is not None:
            handle._events.put((kind, value))
        with self._cond:
            self._inflight[handle.request.adapter] -= 1
            self._cond.notify_all()

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            waiting, self._queue = list(self._queue), collections.deque()
        running, self._batch = [row.handle for row in self._batch.rows], Batch()
        for handle in waiting + running:
            self._answer(handle, "error", error)


__all__ = [
    "AdapterConflictError",
    "AdapterPathError",
    "Completion",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "GenerationRequest",
    "QueueFullError",
    "RequestHandle",
    "UnknownModelError",
    "resolve_adapter_path",
    "sample_next",
]
