"""A bounded, seeded fuzz of every input boundary (docs/reliability.md): malformed recipes, dotted overrides, data
rows and HTTP bodies (generators in tests/fuzz_inputs.py). Each input must end in a result or a clear
:class:`~lorakit.errors.LorakitError` (an HTTP 4xx for the server), within a time limit, with bounded memory,
and a refused training start must leave no output behind."""

from __future__ import annotations

import contextlib
import io
import random
import signal
import tracemalloc

import httpx
import pytest

from fuzz_inputs import malformed_data_row, malformed_http_body, malformed_override, malformed_recipe
from lorakit.cli import main
from lorakit.data import DataConfig, load_dataset
from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe
from lorakit.serve import ServeConfig, Server

from tiny_models import write_causal_lm_dir
from tokenizer_factory import build_tokenizer

SEED = 18
CASE_SECONDS = 10  # one input taking longer is a hang
MEMORY_LIMIT = 64 << 20  # traced Python allocations of one phase

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused_cleanly(call) -> bool:
    """True when ``call()`` raised a LorakitError, False when it returned; anything else fails the test."""
    try:
        with time_limit(CASE_SECONDS):
            call()
    except LorakitError as err:
        assert len(str(err)) < 5000, str(err)[:300]
        return True
    return False


@contextlib.contextmanager
def bounded_memory():
    tracemalloc.start()
    try:
        yield
        assert tracemalloc.get_traced_memory()[1] < MEMORY_LIMIT
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_causal_lm_dir(tmp_path_factory.mktemp("fuzz") / "model", build_tokenizer())


def test_malformed_recipes_and_overrides(tmp_path):
    rng = random.Random(SEED)
    refused = 0
    with bounded_memory():
        for i in range(150):
            recipe = tmp_path / f"r{i}.yaml"
            recipe.write_bytes(malformed_recipe(rng))
            refused += refused_cleanly(lambda: load_recipe(recipe))  # noqa: B023 - called at once
        for _ in range(150):
            override = malformed_override(rng)
            refused += refused_cleanly(lambda: load_recipe(None, [override]))  # noqa: B023 - called at once
    assert refused >= 250  # almost all are refused; the rest are valid values (e.g. train.seed=0)


def test_malformed_data_rows(model_dir, tmp_path):
    rng, tokenizer = random.Random(SEED), build_tokenizer()
    good = '{"text": "a good row to detect the format"}'
    with bounded_memory():
        for i in range(80):
            data = tmp_path / f"d{i}.jsonl"
            data.write_text("\n".join([good, *(malformed_data_row(rng) for _ in range(3))]) + "\n")
            refused_cleanly(lambda: load_dataset(DataConfig(path=str(data), format="text"), tokenizer))  # noqa: B023


def test_malformed_http_bodies(model_dir):
    rng = random.Random(SEED)
    config = ServeConfig(model_dir=str(model_dir), port=0, dtype="float32", max_tokens_limit=2,
                         max_body_bytes=1 << 20, adapter_root=str(model_dir.parent))  # fmt: skip
    statuses = []
    with Server(config).start() as server, httpx.Client(base_url=server.url, timeout=CASE_SECONDS) as http:
        for _ in range(100):
            path, body = malformed_http_body(rng)
            answer = http.post(path, content=body, headers={"Content-Type": "application/json"})
            statuses.append(answer.status_code)
            assert answer.status_code in (200, 201, 400, 403, 404, 409, 413, 422), (
                path,
                body[:200],
                answer.text,
            )
        assert http.get("/health").json() == {"status": "ok"}
    assert statuses.count(400) >= 50


def test_refused_starts_leave_no_output_and_no_traceback(model_dir, tmp_path):
    rng = random.Random(SEED)
    for i in range(6):
        data = tmp_path / f"bad{i}.jsonl"
        data.write_text(malformed_data_row(rng) + "\n")
        out = tmp_path / f"out{i}"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), time_limit(120):
            status = main(["train", f"model.path={model_dir}", f"data.path={data}", "model.quantize=null",
                           f"output_dir={out}", "train.max_steps=1", "--no-progress"])  # fmt: skip
        assert status == 2 and "Traceback" not in stderr.getvalue(), stderr.getvalue()
        assert not out.exists()
