"""Shared fixtures: a tiny random BERT with a real WordPiece tokenizer, tiny data, recipes.

Everything is built from HF config classes in a temporary directory: no hub.
"""

from __future__ import annotations

import os
import random
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SLIMTUNE_QUIET", "1")

import pytest
import torch

from slimtune.distributed.launch import cpu_cores


def pytest_collection_modifyitems(config, items):
    """Skip, saying why, what this machine cannot run.

    ``gpu`` tests where torch sees no CUDA device (``pytest -m gpu`` on a CPU
    box); ``distributed`` tests (2 worker processes, which ``--nproc 2``
    refuses on fewer cores) on a 1-core machine.
    """
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    if cpu_cores() < 2:
        skips["distributed"] = pytest.mark.skip(reason=f"starts 2 worker processes; this machine has {cpu_cores()} CPU core")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "a", "really", "story", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_texts(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Sentences whose label is given by a sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i % 7}", label))
    return rows


def write_bert(path: Path, seed: int = 0, num_layers: int = 2, dropout: float = 0.0) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER)) + [str(d) for d in range(10)] + ["an", "example", "sentence", "for", "export", "short"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(path / "vocab.txt"))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_llama(path: Path, bert_dir: Path, num_layers: int = 2) -> Path:
    """A tiny random Llama sharing the BERT fixture's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_bert_6_layers(tmp_path_factory) -> Path:
    """The tiny BERT with six layers, like MiniLM (recipes that pick layers 0, 2, 4 run on it)."""
    return write_bert(tmp_path_factory.mktemp("tiny-bert-6"), num_layers=6)


@pytest.fixture(scope="session")
def tiny_bert_dropout(tmp_path_factory) -> Path:
    """The tiny BERT with dropout 0.1 (as BERT ships): training draws random masks every step."""
    return write_bert(tmp_path_factory.mktemp("tiny-bert-dropout"), dropout=0.1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_bert) -> Path:
    return write_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_bert)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    import pandas as pd

    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    pd.DataFrame(tiny_texts(300), columns=["review", "sentiment"]).to_csv(path, index=False)
    return path


def recipe_text(model: Path, data: Path, stages: str, kind: str = "classification", extra: str = "") -> str:
    head = [
        "name: tiny",
        "description: tiny test recipe",
        f"model: {model}",
        f"task: {{kind: {kind}, data: {data}, text: review, label: sentiment, max_length: 16}}",
        "train: {batch_size: 16, lr: 5.0e-3, seed: 0, warmup_ratio: 0.0}",
    ]
    return "\n".join(head) + "\n" + extra + "stages:\n" + textwrap.indent(textwrap.dedent(stages), "  ")


@pytest.fixture
def write_recipe(tmp_path, tiny_bert, tiny_csv):
    """write_recipe(stages_yaml, **kw) -> path of a recipe on the tiny BERT + CSV."""

    def write(stages: str = "- finetune: {epochs: 2}\n", name: str = "recipe.yaml", **kw) -> Path:
        path = tmp_path / name
        path.write_text(recipe_text(kw.pop("model", tiny_bert), kw.pop("data", tiny_csv), stages, **kw))
        return path

    return write
