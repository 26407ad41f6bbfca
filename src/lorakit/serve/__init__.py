"""Serve one base model with many adapters: continuous batching and an OpenAI-compatible HTTP API.

::

    from lorakit.serve import serve

    with serve("models/llama", {"legal": "legal"}, adapter_root="adapters", port=8000) as server:
        ...  # POST {server.url}/v1/chat/completions {"model": "legal", "messages": [...]}

:mod:`lorakit.serve.engine` batches requests across adapters step by step (the running batch, its KV cache
and sampling are in :mod:`lorakit.serve.batch`); :mod:`lorakit.serve.openai` validates OpenAI-shaped requests
and builds the responses; :mod:`lorakit.serve.http` serves them with the standard library's ``http.server``.
See ``docs/serving.md``.
"""

from lorakit.serve.engine import (
    AdapterConflictError,
    AdapterPathError,
    Completion,
    Engine,
    EngineClosedError,
    EngineConfig,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    UnknownModelError,
)
from lorakit.serve.http import ServeConfig, Server, serve

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
    "ServeConfig",
    "Server",
    "UnknownModelError",
    "serve",
]
