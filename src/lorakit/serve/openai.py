"""The OpenAI API shape: request bodies validated into a :class:`~lorakit.serve.engine.GenerationRequest`,
engine errors mapped to HTTP answers, and the response bodies (whole and streamed).

No sockets here: :mod:`lorakit.serve.http` reads the JSON bodies and writes the dicts built by these functions.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection

from lorakit.errors import AdapterFileError, AdapterMismatchError, LorakitError, TargetModuleError
from lorakit.serve.engine import (
    AdapterConflictError,
    AdapterPathError,
    Completion,
    EngineClosedError,
    GenerationRequest,
    QueueFullError,
    UnknownModelError,
)

_REQUIRED = object()


class HTTPError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------- requests
def body_field(body: dict, name: str, kinds: tuple[type, ...], default=_REQUIRED):
    """``body[name]`` checked against ``kinds`` (a bool is never taken for a number); 400 otherwise."""
    value = body.get(name)
    if value is None:
        if default is _REQUIRED:
            raise HTTPError(400, f"'{name}' is required", name, "missing_required_parameter")
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise HTTPError(
            400, f"'{name}': expected {expected}, got {type(value).__name__}", name, "invalid_type"
        )
    return value


def check_value(ok: bool, name: str, expected: str, value) -> None:
    """400 naming field ``name`` with what was ``expected`` unless ``ok``."""
    if not ok:
        raise HTTPError(400, f"'{name}': expected {expected}, got {_shown(value)}", name, "invalid_value")


def _shown(value) -> str:
    """``repr(value)`` cut short: a request may send megabytes, the answer echoes 80 characters."""
    if isinstance(value, int) and value.bit_length() > 256:
        return "an integer of more than 77 digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def require_body(body: dict | None) -> dict:
    """``body``, or 400 when the request sent none."""
    if body is None:
        raise HTTPError(400, "send a JSON object body (Content-Type: application/json)", None, "missing_body")
    return body


def chat_messages(messages: list) -> list[dict]:
    """Chat messages as ``{"role", "content": str}``; content given as a list of text parts is joined."""
    check_value(len(messages) > 0, "messages", "a non-empty list", messages)
    clean = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        check_value(isinstance(role, str), f"messages[{i}].role", "a string", role)
        content = message.get("content")
        if isinstance(content, list):
            parts = [
                p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content
            ]
            check_value(
                all(isinstance(p, str) for p in parts), f"messages[{i}].content", "text parts", content
            )
            content = "".join(parts)
        check_value(isinstance(content, str), f"messages[{i}].content", "a string", content)
        clean.append({"role": role, "content": content})
    return clean


def generation_request(
    body: dict,
    ids: list[int],
    prompt_field: str,
    default_max_tokens: int | None,
    *,
    base_id: str,
    adapters: Collection[str],
    max_tokens_limit: int,
    context_length: int | None,
) -> GenerationRequest:
    """Validate the request fields shared by both completion routes (400/404 with the field named).

    Args:
        body (dict): The request's JSON object.
        ids (list[int]): The tokenized prompt (or rendered chat).
        prompt_field (str): ``"prompt"`` or ``"messages"``: the field named in prompt-length errors.
        default_max_tokens (int | None): ``max_tokens`` when the body has none; None: all that fits.
        base_id (str): The base model's id; ``model`` must be it or one of ``adapters``.
        adapters (Collection[str]): Names of the loaded adapters.
        max_tokens_limit (int): Largest ``max_tokens`` allowed.
        context_length (int | None): The model's context in tokens; None: unbounded.
    """
    model = body_field(body, "model", (str,))
    if model != base_id and model not in adapters:
        raise HTTPError(404, f"the model {model!r} does not exist; see GET /v1/models", "model",
                        "model_not_found")  # fmt: skip
    limit, context = max_tokens_limit, context_length or 1 << 62
    check_value(0 < len(ids) < context, prompt_field, f"1..{context - 1} tokens", f"{len(ids)} tokens")
    name = "max_tokens" if "max_tokens" in body or prompt_field == "prompt" else "max_completion_tokens"
    fits = min(limit, context - len(ids))
    max_tokens = body_field(body, name, (int,), min(default_max_tokens or fits, fits))
    check_value(1 <= max_tokens <= limit, name, f"1..{limit}", max_tokens)
    if len(ids) + max_tokens > context:
        raise HTTPError(400, f"this model's context is {context} tokens, but the prompt has {len(ids)} and "
                        f"{name} asks for {max_tokens} more; shorten the prompt or lower {name}",
                        prompt_field, "context_length_exceeded")  # fmt: skip
    temperature = body_field(body, "temperature", (int, float), 1.0)
    check_value(0 <= temperature <= 2, "temperature", "0..2", temperature)
    top_p = body_field(body, "top_p", (int, float), 1.0)
    check_value(0 < top_p <= 1, "top_p", "(0, 1]", top_p)
    check_value(body_field(body, "n", (int,), 1) == 1, "n", "1 (one choice per request)", body.get("n"))
    check_value(body.get("stop") in (None, []), "stop", "null (stop sequences are not supported; the "
                "model stops at its end-of-turn token)", body.get("stop"))  # fmt: skip
    seed = body_field(body, "seed", (int,), None)
    check_value(seed is None or -(2**63) <= seed < 2**64, "seed", "a 64-bit integer", seed)
    return GenerationRequest(
        prompt_ids=ids,
        adapter=None if model == base_id else model,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed,
        stream=body_field(body, "stream", (bool,), False),
        ignore_eos=body_field(body, "ignore_eos", (bool,), False),
    )


# ------------------------------------------------------------------------------------------------- errors
def error_for(err: Exception) -> HTTPError:
    """The HTTP answer for an engine error."""
    if isinstance(err, QueueFullError):
        return HTTPError(429, str(err), None, "rate_limit_exceeded", "requests", {"Retry-After": "1"})
    if isinstance(err, EngineClosedError):
        return HTTPError(503, str(err), None, "service_unavailable", "server_error")
    if isinstance(err, UnknownModelError):
        return HTTPError(404, str(err), "model", "model_not_found")
    if isinstance(err, (AdapterConflictError, TimeoutError)):
        return HTTPError(409, str(err), "name", "conflict")
    if isinstance(err, AdapterPathError):
        return HTTPError(400, str(err), "path", "invalid_adapter_path")
    if isinstance(err, (AdapterFileError, AdapterMismatchError, TargetModuleError)):
        return HTTPError(400, str(err), "path", "invalid_adapter")
    if isinstance(err, LorakitError):  # lorakit raises these on bad input only
        return HTTPError(400, str(err), None, "invalid_value")
    return HTTPError(500, f"internal error: {err}", None, None, "server_error")


# ---------------------------------------------------------------------------------------------- responses
def response_head(model: str, chat: bool, stream: bool) -> dict:
    """The fields every answer (or every streamed chunk) of one request shares: id, object, created, model."""
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    prefix = "chatcmpl" if chat else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
    }


def completion_response(head: dict, done: Completion, chat: bool) -> dict:
    """The whole answer of a non-streamed request."""
    choice = {"index": 0, "finish_reason": done.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": done.text}
    else:
        choice.update(text=done.text, logprobs=None)
    return {**head, "choices": [choice], "usage": usage(done)}


def stream_chunk(head: dict, chat: bool, text: str | None, finish: str | None, role: bool = False) -> dict:
    """One server-sent event's payload: a text piece, the finish reason, or (chat) the role opener."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else {}
        delta.update({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {**head, "choices": [choice]}


def usage(done: Completion) -> dict:
    """Token counts of a finished request."""
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


__all__ = [
    "HTTPError",
    "body_field",
    "chat_messages",
    "check_value",
    "completion_response",
    "error_for",
    "generation_request",
    "require_body",
    "response_head",
    "stream_chunk",
    "usage",
]
