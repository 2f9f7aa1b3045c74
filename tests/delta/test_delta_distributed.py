"""Every delta method trains to the same result single-process, under DDP and under FSDP (compare_strategies).

Methods whose results barely depend on their input share a recipe (the second delta stacked on the first);
BitFit on the norms, prefix-tuning and the ladder, whose tiny gradients Adam's normalisation would turn
an earlier stage's rounding differences into visible ones, each start from the bare backbone.
"""

from __future__ import annotations

import pytest

from slimtune.distributed.testing import compare_strategies

pytestmark = pytest.mark.distributed
TRAIN = {"task.limit": 128, "train.batch_size": 16}  # 8 steps of lr 5e-3 (the tiny recipe's) per stage
RECIPES = {
    "lora+houlsby": ["lora: {rank: 4, targets: [all-linear]}", "adapter: {kind: houlsby, size: 4}"],
    "dora+parallel": ["lora: {rank: 2, targets: [query, value], dora: true}",
                      "adapter: {kind: parallel, size: 4, where: both}"],
    "bitfit": ["bitfit: {layernorm: true}"],
    "prefix": ["prefix: {num_virtual_tokens: 4}"],
    "ladder": ["ladder: {reduction: 2}"],
    "qalora": ["quantize: {bits: 4, group_size: 32}", "lora: {rank: 2, targets: [all-linear], quant_aware: true}"],
}


@pytest.mark.parametrize("which", sorted(RECIPES))
def test_every_delta_agrees_under_single_ddp_and_fsdp(which, write_recipe, tmp_path):
    # compare_strategies' default atol 1e-5: the runs differ only in summation order; a gradient
    # sums K = 16 x 16 = 256 terms (K * 2^-24 = 1.5e-5 relative, doubled by Adam's m / sqrt(v)),
    # over T = 8 steps of at most lr = 5e-3: 8 * 5e-3 * 3e-5 = 1.2e-6, times 4 for feedback; each
    # stage starts from the previous stage's saved (agreeing) result.
    stages = RECIPES[which]
    recipe = write_recipe("".join(f"- {s}\n" for s in stages) + "- evaluate: {split: test, latency: false, onnx: false}\n")
    report = compare_strategies(recipe, tmp_path, overrides=TRAIN)
    assert report.ok, str(report)
    deltas = []
    for i, stage in enumerate(stages):
        method = stage.split(":")[0]
        if method == "quantize":
            continue
        name = stage.split("name: ")[1].rstrip("}") if "name: " in stage else method
        deltas.append(f"{name}.safetensors")
        assert ("fsdp", method) in report.weight_diff and ("ddp", method) in report.weight_diff
        for strategy in ("ddp", "fsdp"):  # every delta so far, with the full gathered tensors (never empty shards)
            saved = report.runs[strategy].stages[i].path / "deltas"
            assert sorted(p.name for p in saved.iterdir()) == sorted(deltas)
