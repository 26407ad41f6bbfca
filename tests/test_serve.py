"""lorakit.serve over loopback with a real HTTP client (httpx): batching parity, streaming, adapter
management, validation, back-pressure and binding."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import lorakit
from lorakit.generate import SamplingConfig, generate_text, render_prompt
from lorakit.serve import ServeConfig, Server, serve

from tiny_models import write_causal_lm_dir
from tokenizer_factory import build_tokenizer

ADAPTERS = ["a0", "a1", "a2", "a3"]
MODELS = ["base", *ADAPTERS]
LIMIT = 64  # max_tokens_limit of the shared server
PROMPTS = [
    "Hello, how are you?",
    "What is the capital of France?",
    "Translate to German: good morning.",
    "The quick brown fox",
    "Add the numbers 12 and 30.",
    "Tell me a joke.",
    "Reverse the word cat:",
    "0123",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base model dir, four random adapters under an adapter root, and a decoy outside the root."""
    tmp = tmp_path_factory.mktemp("serve")
    base = write_causal_lm_dir(tmp / "base", build_tokenizer())
    root = tmp / "adapters"
    model = lorakit.load_model(base, quantize=None, compute_dtype=torch.float32)
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        lorakit.wrap(model, cfg, adapter_name=name)
        lorakit.save_adapter(model, root / name, adapter_name=name)
    lorakit.save_adapter(model, tmp / "outside", adapter_name="a0")
    other = lorakit.load_model(
        write_causal_lm_dir(tmp / "other", build_tokenizer(), hidden=48), quantize=None
    )
    lorakit.wrap(other, lorakit.LoraConfig(r=4, target_modules="all-linear"), adapter_name="other")
    lorakit.save_adapter(other, root / "other", adapter_name="other")  # for another base model
    os.symlink(tmp / "outside", root / "escape")
    return tmp


@pytest.fixture(scope="module")
def server(workspace):
    adapters = {name: name for name in ADAPTERS}
    # fp32, not auto: "batched answers equal answers served alone" is exact only in fp32 (in bf16 a row's
    # rounding depends on what it is batched with, as in any bf16 server).
    with serve(workspace / "base", adapters, adapter_root=str(workspace / "adapters"), port=0, max_batch=8,
               max_queue=64, max_tokens_limit=LIMIT, max_body_bytes=4096, dtype="float32") as running:  # fmt: skip
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def _complete(http: httpx.Client, model: str, prompt: str, max_tokens: int, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _request(i: int) -> tuple[str, str, int]:
    return MODELS[i % len(MODELS)], PROMPTS[i % len(PROMPTS)], 3 + (i * 5) % 11


# --------------------------------------------------------------------------------------- (a) batching
def test_32_concurrent_clients_on_4_adapters_equal_requests_served_alone(server, client):
    requests = [_request(i) for i in range(32)]
    alone = [_complete(client, *r) for r in requests]  # one at a time: every batch has one row
    server.engine.peak_batch = 0
    barrier = threading.Barrier(32)

    def one(request):
        with httpx.Client(base_url=server.url, timeout=60) as http:
            barrier.wait()
            return _complete(http, *request)

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(one, requests))
    assert server.engine.peak_batch > 1, "the requests were never batched together"
    stats = client.get("/v1/stats").json()
    assert stats["peak_batch"] == server.engine.peak_batch and stats["decoded_rows"] > stats["decode_steps"]
    assert (stats["running"], stats["waiting"]) == (0, 0)
    assert len({r[0] for r in requests}) == 5
    for request, a, b in zip(requests, alone, together):
        assert b["model"] == request[0]
        assert b["choices"][0]["text"] == a["choices"][0]["text"], request
        assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
        assert b["usage"] == a["usage"]
    assert len({a["choices"][0]["text"] for a in alone[:5]}) == 5, "the adapters should answer differently"


def test_chat_answers_equal_transformers_generate_with_that_adapter(workspace, client):
    tokenizer = build_tokenizer()
    for name in MODELS:
        model = lorakit.load_model(workspace / "base", quantize=None, compute_dtype=torch.float32)
        if name != "base":
            lorakit.load_adapter(model, workspace / "adapters" / name, adapter_name=name)
        prompt = render_prompt("Tell me a joke.", "chat", tokenizer)
        expected = generate_text(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=10))[0]
        body = {"model": name, "messages": [{"role": "user", "content": "Tell me a joke."}], "max_tokens": 10,
                "temperature": 0}  # fmt: skip
        answer = client.post("/v1/chat/completions", json=body).json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": expected}, name


def test_seeded_sampling_is_reproducible_inside_a_batch(server):
    body = {"model": "a1", "prompt": "Tell me a joke.", "max_tokens": 12, "temperature": 1.5, "top_p": 0.9}

    def one(seed):
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return http.post("/v1/completions", json={**body, "seed": seed}).json()["choices"][0]["text"]

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(one, [7, 7, 7, 8, 9, 10]))
    assert texts[0] == texts[1] == texts[2]
    assert len(set(texts[2:])) > 1


# -------------------------------------------------------------------------------------- (b) streaming
def _events(http: httpx.Client, route: str, body: dict) -> list:
    with http.stream("POST", route, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


@pytest.mark.parametrize("model", ["base", "a2"])
def test_streamed_chunks_concatenate_to_the_non_streamed_answer(client, model):
    body = {"model": model, "prompt": "What is the capital of France?", "max_tokens": 20, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    events = _events(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["usage"] == whole["usage"] and events[-1]["choices"] == []

    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 20,
        "temperature": 0,
    }
    whole = client.post("/v1/chat/completions", json=chat).json()
    events = _events(client, "/v1/chat/completions", chat)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


# ---------------------------------------------------------------------------------- (c) adapters
def test_models_lists_base_and_adapters_and_adapters_load_and_unload(server, client, workspace):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == MODELS
    assert all(m["parent"] == "base" for m in listed["data"][1:])

    loaded = client.post("/v1/adapters", json={"name": "copy", "path": "a1"})
    assert loaded.status_code == 201 and loaded.json()["id"] == "copy"
    assert "copy" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    copied, original = (_complete(client, name, PROMPTS[0], 8)["choices"] for name in ("copy", "a1"))
    assert copied == original
    absolute = client.post("/v1/adapters", json={"name": "abs", "path": str(workspace / "adapters" / "a2")})
    assert absolute.status_code == 201  # an absolute path inside the root is fine
    assert client.post("/v1/adapters", json={"name": "copy", "path": "a2"}).status_code == 409

    # unloading waits for the adapter's running request, which finishes whole
    body = {"model": "copy", "prompt": "Hi", "max_tokens": LIMIT, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: httpx.post(f"{server.url}/v1/completions", json=body, timeout=60))
        while server.engine._inflight["copy"] == 0 and not running.done():
            time.sleep(0.002)
        deleted = client.delete("/v1/adapters/copy")
        answer = running.result()
    assert deleted.status_code == 200 and deleted.json() == {"id": "copy", "object": "model", "deleted": True}
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == LIMIT
    assert client.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 404
    assert client.delete("/v1/adapters/copy").status_code == 404
    assert client.delete("/v1/adapters/abs").status_code == 200
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == MODELS


# -------------------------------------------------------------------------------------- (d) 4xx
CHAT = {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}
BAD_REQUESTS = [
    ("POST", "/v1/completions", {"model": "nope", "prompt": "Hi"}, 404, "model"),
    ("POST", "/v1/completions", {"prompt": "Hi"}, 400, "model"),
    ("POST", "/v1/completions", {"model": "base"}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "base", "prompt": 3}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    (
        "POST",
        "/v1/completions",
        {"model": "base", "prompt": "Hi", "max_tokens": LIMIT + 1},
        400,
        "max_tokens",
    ),
    ("POST", "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": True}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "Hi " * 300}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "Hi " * 65, "max_tokens": LIMIT}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "Hi", "temperature": 3}, 400, "temperature"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "Hi", "n": 2}, 400, "n"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "Hi", "stop": ["\n"]}, 400, "stop"),
    ("POST", "/v1/completions", {"model": "base", "prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", "/v1/chat/completions", {"model": "base"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "base", "messages": [{"content": "Hi"}]},
        400,
        "messages[0].role",
    ),
    ("POST", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 999}, 400, "max_completion_tokens"),
    ("POST", "/v1/adapters", {"name": "x", "path": "../base"}, 400, "path"),
    ("POST", "/v1/adapters", {"name": "x", "path": "escape"}, 400, "path"),  # a symlink out of the root
    ("POST", "/v1/adapters", {"name": "x", "path": "a0/../../outside"}, 400, "path"),
    ("POST", "/v1/adapters", {"name": "x", "path": "nowhere"}, 400, "path"),
    ("POST", "/v1/adapters", {"name": "x", "path": "other"}, 400, "path"),  # trained on another base
    ("POST", "/v1/adapters", {"name": "x"}, 400, "path"),
    ("POST", "/v1/adapters", {"name": "a/b", "path": "a0"}, 400, "name"),
    ("POST", "/v1/adapters", {"name": "base", "path": "a0"}, 409, "name"),
    ("DELETE", "/v1/adapters/nope", None, 404, "model"),
    ("GET", "/v1/nothing", None, 404, None),
    ("POST", "/v2/completions", {}, 404, None),
    ("GET", "/v1/completions", None, 405, None),
    ("DELETE", "/v1/models", None, 405, None),
]


@pytest.mark.parametrize(("method", "route", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_clear_openai_errors(client, method, route, body, status, param):
    response = client.request(method, route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if status == 405:
        assert response.headers["allow"] in ("POST", "GET")


def test_absolute_adapter_path_outside_the_root_is_refused(client, workspace):
    response = client.post("/v1/adapters", json={"name": "x", "path": str(workspace / "outside")})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_adapter_path"


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [(b"{not json", 400, "invalid_json"), (b"[1, 2]", 400, "invalid_json"), (b"{}" + b" " * 5000, 413, "request_too_large")],
)  # fmt: skip
def test_malformed_bodies(client, content, status, code):
    response = client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status and response.json()["error"]["code"] == code


def test_a_failing_forward_answers_500_and_the_server_goes_on(server, client, monkeypatch):
    forward = server.engine.model.forward
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device error")
        return forward(*args, **kwargs)

    monkeypatch.setattr(server.engine.model, "forward", fail_once)
    failed = client.post("/v1/completions", json={"model": "a3", "prompt": "Hi", "max_tokens": 4})
    assert failed.status_code == 500 and "simulated device error" in failed.json()["error"]["message"]
    assert failed.json()["error"]["type"] == "server_error"
    assert _complete(client, "a3", "Hi", 4)["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------- (e) back-pressure, (f) binding
def test_full_queue_answers_429_and_shutdown_answers_503(workspace):
    config = ServeConfig(
        model_dir=str(workspace / "base"), port=0, max_batch=1, max_queue=1, max_tokens_limit=200
    )
    assert config.host == "127.0.0.1"
    server = Server(config).start()
    assert server.host == "127.0.0.1"
    body = {"model": "base", "prompt": "Hi", "max_tokens": 200, "temperature": 0, "ignore_eos": True}

    def one(_):
        return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)

    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(one, range(6)))
        refused = [a for a in answers if a.status_code == 429]
        assert refused and all(a.headers["retry-after"] == "1" for a in refused)
        assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
        assert {a.status_code for a in answers} == {200, 429}

        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(one, 0)
            while not server.engine._batch.rows:
                time.sleep(0.002)
            server.engine.close()
            closed = running.result()
        assert closed.status_code == 503 and closed.json()["error"]["code"] == "service_unavailable"
    finally:
        server.close()


def test_api_key_is_required_when_set(workspace):
    with Server(ServeConfig(model_dir=str(workspace / "base"), port=0, api_key="sekrit")).start() as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/v1/stats").status_code == 401
        ok = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "base"


def test_engine_config_is_validated_at_the_boundary(workspace):
    with pytest.raises(lorakit.ConfigError, match="max_batch"):
        ServeConfig(model_dir=str(workspace / "base"), max_batch=0)
    with pytest.raises(lorakit.ConfigError, match=r"config\.json"):
        ServeConfig(model_dir=str(workspace / "adapters"))
