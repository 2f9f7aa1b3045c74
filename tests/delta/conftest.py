"""Fixtures of the delta tests: the tiny BERT (with a fresh 2-label head) and the tiny Llama, in eval mode."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


@pytest.fixture
def bert(tiny_bert):
    torch.manual_seed(0)  # the new head's initialisation
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()


@pytest.fixture
def llama(tiny_llama):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


def token_ids(model, shape=(3, 9), seed=1, low=0):
    """Random token ids in the model's vocabulary (from ``low``: the prefix tests keep clear of special tokens)."""
    return torch.randint(low, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def assert_refused(recipe, out, capsys, *messages: str) -> None:
    """``slimtune run`` exits 2 naming every one of ``messages`` (no traceback) and leaves no stage directory or temporary."""
    from slimtune.cli import main

    code = main(["run", str(recipe), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert all(m in err for m in messages) and "Traceback" not in err
    stages = [p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")] if out.exists() else []
    assert stages == [] and not list(out.glob(".*tmp*"))
