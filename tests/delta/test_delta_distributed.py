"""Every delta method trains to the same result single-process, under DDP and under FSDP (compare_strategies)."""

from __future__ import annotations

import pytest

from slimtune.distributed.testing import compare_strategies

pytestmark = pytest.mark.distributed
TRAIN = {"task.limit": 128, "train.batch_size": 16}  # 8 steps of lr 5e-3 (the tiny recipe's)
METHODS = {
    "lora": "- lora: {rank: 4, targets: [all-linear]}\n",
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_delta_agrees_under_single_ddp_and_fsdp(method, write_recipe, tmp_path):
    # compare_strategies' default atol 1e-5: the runs differ only in summation order; a gradient
    # sums K = 16 x 16 = 256 terms (K * 2^-24 = 1.5e-5 relative, doubled by Adam's m / sqrt(v)),
    # over T = 8 steps of at most lr = 5e-3: 8 * 5e-3 * 3e-5 = 1.2e-6, times 4 for feedback.
    recipe = write_recipe(METHODS[method] + "- evaluate: {split: test, latency: false, onnx: false}\n")
    report = compare_strategies(recipe, tmp_path, overrides=TRAIN)
    assert report.ok, str(report)
    stage = next(iter(METHODS[method][2:].split(":")))
    assert ("fsdp", stage) in report.weight_diff and ("ddp", stage) in report.weight_diff
    for name in ("ddp", "fsdp"):  # the delta file holds the full, gathered tensors (never empty shards)
        saved = report.runs[name].stages[0].path / "deltas"
        assert [p.name for p in saved.iterdir()] == [f"{stage}.safetensors"]
