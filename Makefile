# Two entry points: `make demo` and `make test`. Both create .venv at the repo root.
# torch is pinned to 2.13.0 first: on this kind of machine pip takes a local CPU wheel for it,
# so no multi-GB CUDA wheel is downloaded; a GPU machine gets its CUDA build from the index.
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
TEST := $(VENV)/.installed-test

.PHONY: demo test lint bench clean

# The demo needs only lorakit and its core dependencies; the suite adds the test extra (peft, bitsandbytes,
# pytest, ruff ...), about 10 s more of installing that `make demo` does not wait for.
$(CORE): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $(CORE)

$(TEST): $(CORE)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $(TEST)

# The quickstart: QLoRA on the bundled tiny model, before/after on held-out rows (docs/quickstart.md).
# overwrite=true: each demo replaces runs/quickstart, the demo's own output. Precision is `auto` (bf16 only
# where the CPU multiplies it natively) and torch's default threads (one per core): on an idle 2-core machine
# two threads ran the quickstart's steps 1.7x faster than one (docs/quickstart.md).
demo: $(CORE)
	HF_HUB_OFFLINE=1 $(VENV)/bin/lorakit train overwrite=true

test: $(TEST)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
	$(VENV)/bin/ruff check .

lint: $(TEST)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build dist src/*.egg-info
