"""The ``prune`` stage: recipes end to end, masks kept through recovery, schedules, info, bad input, strategies."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import slimtune
from slimtune.errors import RecipeError, SlimTuneError
from slimtune.compress.prune.stage import PruneConfig

from tests.conftest import recipe_text
from slimtune.cli import main

SMALL = {"task.limit": 64}  # 4 training steps per epoch at batch size 16


def block_weights(path) -> dict[str, torch.Tensor]:
    """The stored 2-D weights of the transformer blocks' linears."""
    state = load_file(str(path / "model.safetensors"))
    return {k: v for k, v in state.items() if (".layer." in k or ".layers." in k) and k.endswith(".weight") and v.dim() == 2
            and "LayerNorm" not in k and "norm" not in k}


def zeros(w) -> int:
    return int((w == 0).sum())


def stage_dirs(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) if run_dir.exists() else []


def cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    code = main([*map(str, args), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_then_prune_with_recovery_end_to_end(write_recipe, tmp_path, capsys):
    stages = "- finetune: {epochs: 1}\n- prune: {method: magnitude, sparsity: 0.5, recover: {epochs: 1}}\n"
    result = slimtune.run(write_recipe(stages), overrides=SMALL, out=tmp_path / "run")
    finetuned, pruned = (result.stages[i].path for i in (0, 1))
    weights = block_weights(pruned)
    assert len(weights) == 12
    for name, w in weights.items():
        assert zeros(w) == w.numel() // 2, name  # recovery kept every mask: sparsity after == before, exactly
    before = block_weights(finetuned)
    kept_moved = [not torch.equal(w[w != 0], before[n][w != 0]) for n, w in weights.items()]
    assert all(kept_moved)  # recovery did train the kept weights

    metrics = result.stages[1].metrics
    assert metrics["sparsity"] == metrics["sparsity_after_recovery"] == 0.5 and metrics["recover_steps"] == 4 and "accuracy" in metrics
    art = slimtune.load(pruned)
    record = art.compression["prune"]
    assert record["method"] == "magnitude" and record["target"] == 0.5 and record["overall"] == 0.5
    assert set(record["modules"]) == {n.removesuffix(".weight") for n in weights} and set(record["modules"].values()) == {0.5}
    assert [e["stage"] for e in art.lineage] == ["source", "finetune", "prune"]
    for name, value in record["modules"].items():
        w = art.model.get_submodule(name).weight
        assert zeros(w) / w.numel() == value
    plain = AutoModelForSequenceClassification.from_pretrained(pruned)  # unstructured pruning keeps the layout
    assert torch.equal(plain.bert.encoder.layer[0].output.dense.weight, art.model.bert.encoder.layer[0].output.dense.weight)

    code, out, err = cli(capsys, "info", pruned)
    assert code == 0, err
    assert "sparsity" in out and "overall 0.5000 (magnitude, target 0.5, scope layer)" in out
    assert "bert.encoder.layer.1.intermediate.dense  0.5000" in out


def test_wanda_2_4_on_a_decoder_without_recovery(tiny_llama, tiny_csv, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_llama, tiny_csv, "- prune: {method: wanda, pattern: '2:4', calibration: {batches: 2}}\n",
                                  kind="causal-lm"))
    result = slimtune.run(recipe, overrides=SMALL, out=tmp_path / "run")
    path = result.stages[0].path
    weights = block_weights(path)
    assert len(weights) == 14
    for name, w in weights.items():
        groups = w.reshape(w.shape[0], -1, 4)  # (out, in/4, 4)
        assert torch.equal((groups == 0).sum(-1), torch.full(groups.shape[:2], 2)), name
    record = json.loads((path / "slimtune.json").read_text())["compression"]["prune"]
    assert record["pattern"] == "2:4" and record["overall"] == 0.5 and record["scope"] == "row"
    assert "perplexity" not in result.stages[0].metrics  # no recovery, no evaluation


def test_gradual_schedule_ends_exactly_at_the_target(write_recipe, tmp_path):
    stages = "- prune: {sparsity: 0.6, schedule: {steps: 3, every: 2, initial: 0.2}, recover: {epochs: 2, eval_split: none}}\n"
    result = slimtune.run(write_recipe(stages), overrides=SMALL, out=tmp_path / "run")
    schedule = result.stages[0].metrics["schedule"]
    assert [s for s, _ in schedule] == [0, 2, 3] and schedule[0][1] == 0.2 and schedule[-1][1] == 0.6
    assert schedule[1][1] == pytest.approx(0.6 + (0.2 - 0.6) * (1 - 2 / 3) ** 3)
    for name, w in block_weights(result.stages[0].path).items():
        assert zeros(w) == round(0.6 * w.numel()), name


def test_a_ramp_longer_than_recovery_is_refused(write_recipe, tmp_path):
    stages = "- prune: {sparsity: 0.5, schedule: {epochs: 3}, recover: {epochs: 1}}\n"
    with pytest.raises(SlimTuneError, match="schedule: the ramp ends at step 12 but recovery takes only 4 steps"):
        slimtune.run(write_recipe(stages), overrides=SMALL, out=tmp_path / "run")
    assert stage_dirs(tmp_path / "run") == []


def test_structured_pruning_stage_with_distillation_recovery(write_recipe, tmp_path, capsys):
    stages = "- prune: {method: structured, heads: 0.5, ffn: 0.5, importance: weight, recover: {epochs: 1, distill: true}}\n"
    result = slimtune.run(write_recipe(stages), overrides=SMALL, out=tmp_path / "run")
    art = slimtune.load(result.stages[0].path)
    record = art.compression["prune"]
    assert record["method"] == "structured" and "module_attrs" not in record and art.module_attrs
    assert sum(p.numel() for p in art.model.parameters()) == record["parameters_after"] < record["parameters_before"]
    assert art.model.bert.encoder.layer[0].intermediate.dense.out_features == 32
    assert result.stages[0].metrics["recover_steps"] == 4
    code, out, _ = cli(capsys, "info", result.stages[0].path)
    assert code == 0 and "'method': 'structured'" in out


@pytest.mark.parametrize("config", [
    {"sparsity": 0.5}, {"method": "wanda", "pattern": "4:8"}, {"method": "structured", "heads": 0.25, "importance": "weight"},
    {"sparsity": 0.5, "scope": "global", "schedule": {"steps": 3}, "recover": {"epochs": 1}},
])
def test_a_resolved_config_validates_again(config):
    """Ranks under torchrun read the resolved recipe, which spells out every default."""
    resolved = PruneConfig.model_validate(config).model_dump()
    assert PruneConfig.model_validate(resolved).model_dump() == resolved


BAD = [
    ("{sparsity: 1.0}", "sparsity"),
    ("{sparsity: -0.1}", "sparsity"),
    ("{pattern: '4:2'}", "pattern"),
    ("{method: random, sparsity: 0.5}", "method"),
    ("{sparsity: 0.5, heads: 0.25}", "heads"),
    ("{method: structured, heads: 0.25, sparsity: 0.5}", "sparsity"),
    ("{sparsity: 0.5, schedule: {steps: 5}}", "schedule"),
]


@pytest.mark.parametrize("config, field", BAD)
def test_bad_prune_config_is_a_recipe_error_and_writes_nothing(config, field, write_recipe, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=field):
        slimtune.run(write_recipe(f"- prune: {config}\n"), out=out)
    assert stage_dirs(out) == []


@pytest.mark.parametrize("config, field", [BAD[0], BAD[2]])
def test_bad_prune_config_exits_2_from_the_cli(config, field, write_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", write_recipe(f"- prune: {config}\n"), "--out", out)
    assert code == 2, err
    assert f"stages.0.prune.{field}" in err and "Traceback" not in err
    assert stage_dirs(out) == []


@pytest.mark.distributed
def test_prune_with_recovery_agrees_under_single_ddp_and_fsdp(write_recipe, tmp_path):
    from slimtune.distributed.testing import compare_strategies

    recipe = write_recipe("- prune: {method: magnitude, sparsity: 0.5, recover: {epochs: 1}}\n")
    # Only summation order differs: a gradient sums K = 16 x 16 = 256 terms (K * 2^-24 = 1.5e-5
    # relative, doubled by Adam's m / sqrt(v)), over T = 4 steps of at most lr = 5e-3:
    # 4 * 5e-3 * 3e-5 = 6e-7, times 4 for differences fed back through later gradients.
    report = compare_strategies(recipe, tmp_path, overrides=SMALL, atol=2.4e-6)
    assert report.ok, str(report)
    assert ("fsdp", "prune") in report.weight_diff
    for name, run in report.runs.items():
        for key, w in block_weights(run.stages[0].path).items():
            assert zeros(w) == w.numel() // 2, (name, key)  # masks held under every strategy


@pytest.mark.distributed
def test_gradual_wanda_under_fsdp_ends_exactly_at_the_target(write_recipe, tmp_path):
    stages = "- prune: {method: wanda, sparsity: 0.5, calibration: {batches: 2}, schedule: {steps: 3, every: 1}, recover: {epochs: 1}}\n"
    result = slimtune.run(write_recipe(stages), overrides={**SMALL, "distributed.strategy": "fsdp", "distributed.nproc": 2},
                          out=tmp_path / "run")
    metrics = result.stages[0].metrics
    assert [s for s, _ in metrics["schedule"]] == [1, 2, 3] and metrics["sparsity_after_recovery"] == 0.5
    for name, w in block_weights(result.stages[0].path).items():
        assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), w.shape[1] // 2)), name


def test_info_groups_many_modules_across_layers():
    from slimtune.eval.report import sparsity_lines

    modules = {f"model.layers.{i}.mlp.{p}": 0.5 + 0.01 * (i == 3 and p == "up_proj") for i in range(10) for p in ("up_proj", "down_proj", "gate_proj")}
    text = sparsity_lines({"method": "wanda", "target": 0.5, "pattern": None, "scope": "row", "overall": 0.5012, "modules": modules})
    lines = text.splitlines()
    assert lines[0] == "overall 0.5012 (wanda, target 0.5, scope row)"
    assert "model.layers.*.mlp.up_proj  0.5000..0.5100  (10 modules)" in lines
    assert "model.layers.*.mlp.down_proj  0.5000  (10 modules)" in lines and len(lines) == 5
