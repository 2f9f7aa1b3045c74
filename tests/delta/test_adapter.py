"""Houlsby and parallel adapters on tiny random models: placement, identity at init, switching, detaching, artifacts, ONNX."""

from __future__ import annotations

import pytest
import torch


import slimtune
from slimtune.delta import (HoulsbyAdapter, ParallelAdapter, ResidualParallelAdapter, add_adapters_, deltas, detach_,
                            disabled)
from slimtune.errors import SlimTuneError
from tests.conftest import recipe_text
from tests.delta.conftest import assert_refused, token_ids as _ids

ATOL = 1e-3  # the export stage's default atol, which its own validation enforces
FINETUNE = "- finetune: {max_steps: 1, eval_split: none}\n"
EXPORT = "- export: {max_examples: 8}\n"


def _perturb(model, std=0.5):
    """Give every adapter a nonzero up-projection (fresh adapters add exactly zero)."""
    g = torch.Generator().manual_seed(7)
    for _, w in deltas(model):
        w.adapter.up.weight.data = torch.randn(w.adapter.up.weight.shape, generator=g) * std


def test_placement_per_kind_and_family(bert, llama):
    layer = "bert.encoder.layer"
    assert add_adapters_(bert, "houlsby", size=4, name="h") == (
        [f"{layer}.{i}.attention.output.dense" for i in range(2)] + [f"{layer}.{i}.output.dense" for i in range(2)])
    assert add_adapters_(bert, "parallel", size=4, where="both", name="p") == (
        [f"{layer}.{i}.attention.output" for i in range(2)] + [f"{layer}.{i}.output" for i in range(2)])
    assert isinstance(bert.bert.encoder.layer[0].output, ResidualParallelAdapter)  # BERT's post-LN output takes the residual
    assert isinstance(bert.bert.encoder.layer[0].output.base_layer.dense, HoulsbyAdapter)  # nested inside it
    assert add_adapters_(llama, "parallel", size=4, where="both") == (
        [f"model.layers.{i}.self_attn" for i in range(2)] + [f"model.layers.{i}.mlp" for i in range(2)])
    assert isinstance(llama.model.layers[1].mlp, ParallelAdapter)
    assert "ParallelAdapter(" in repr(llama) and "Bottleneck(" in repr(llama)  # print(model) shows the deltas


def test_wrappers_compute_what_the_papers_define(bert, llama):
    """Each wrapper against the formula written out on the wrapped module's own parts (same ops, same order)."""
    add_adapters_(bert, "houlsby", size=4, name="h")
    add_adapters_(bert, "parallel", size=4, name="p")
    add_adapters_(llama, "parallel", size=4)
    _perturb(bert)
    _perturb(llama)
    g = torch.Generator().manual_seed(3)
    x, h = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 64, generator=g)
    houlsby = bert.bert.encoder.layer[0].attention.output.dense
    y = houlsby.base_layer(x)
    assert torch.equal(houlsby(x), y + houlsby.adapter(y))
    up, down = houlsby.adapter.up, houlsby.adapter.down
    assert torch.equal(houlsby.adapter(x), 1.0 * up(torch.nn.functional.silu(down(x))))  # Houlsby default: swish, scaling 1
    parallel = bert.bert.encoder.layer[0].output  # LayerNorm(dense(h) + x + A(x))
    inner = parallel.base_layer
    assert torch.equal(parallel(h, x), inner.LayerNorm(inner.dropout(inner.dense(h)) + (x + parallel.adapter(x))))
    mlp = llama.model.layers[0].mlp  # f(x) + A(x), A with relu and scaling 4 (He et al.)
    assert torch.equal(mlp(x), mlp.base_layer(x) + mlp.adapter(x))
    assert mlp.adapter.scaling == 4.0 and isinstance(mlp.adapter.act, torch.nn.ReLU)


@pytest.mark.parametrize("kind", ["houlsby", "parallel"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fresh_adapter_is_identity_and_only_it_trains(kind, family, request):
    model = request.getfixturevalue(family)
    x = _ids(model)
    ref = model(input_ids=x).logits
    head = ["classifier.*"] if family == "bert" else []
    add_adapters_(model, kind, size=4, where="both", train=head)
    assert torch.equal(model(input_ids=x).logits, ref)
    _perturb(model)
    model(input_ids=x).logits.sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got and all(".adapter." in n or n.startswith("classifier.") for n in got)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == got
    assert any(n.startswith("classifier.") for n in got) == bool(head)


@pytest.mark.parametrize("kind", ["houlsby", "parallel"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_disable_and_detach_restore_the_backbone(kind, family, request):
    model = request.getfixturevalue(family)
    x = _ids(model)
    ref = model(input_ids=x).logits
    originals = dict(model.named_modules())
    add_adapters_(model, kind, reduction_factor=8, where="both")
    _perturb(model)
    tuned = model(input_ids=x).logits
    assert not torch.equal(tuned, ref)
    with disabled(model):
        assert torch.equal(model(input_ids=x).logits, ref)
    assert torch.equal(model(input_ids=x).logits, tuned)
    detach_(model)
    assert all(originals[n] is m for n, m in model.named_modules()) and originals.keys() == dict(model.named_modules()).keys()
    assert torch.equal(model(input_ids=x).logits, ref)


def test_bad_arguments_are_refused_before_anything_is_wrapped(bert):
    with pytest.raises(SlimTuneError, match="size 0 is not a positive integer"):
        add_adapters_(bert, size=0)
    with pytest.raises(SlimTuneError, match="unknown adapter placement where='middle'"):
        add_adapters_(bert, where="middle")
    with pytest.raises(SlimTuneError, match="not both"):
        add_adapters_(bert, size=4, reduction_factor=4)
    with pytest.raises(SlimTuneError, match="leaves no bottleneck unit of a 32-wide layer"):
        add_adapters_(bert, reduction_factor=64)
    with pytest.raises(SlimTuneError, match="unknown adapter kind"):
        add_adapters_(bert, kind="serial")
    assert not deltas(bert)


@pytest.mark.parametrize("kind", ["houlsby", "parallel"])
def test_adapter_stage_trains_links_reloads_and_exports(kind, tmp_path, write_recipe):
    stage = f"- adapter: {{kind: {kind}, size: 8, where: both, epochs: 3, lr: 0.01, eval_split: none}}\n"
    run = slimtune.run(write_recipe(FINETUNE + stage + EXPORT), out=tmp_path / "run")
    backbone, tuned, exported = (s.path for s in run.stages)
    assert (tuned / "model.safetensors").stat().st_ino == (backbone / "model.safetensors").stat().st_ino  # linked
    assert (tuned / "deltas" / "adapter.safetensors").is_file()
    metrics = run.stages[1].metrics
    assert metrics["adapted_modules"] == 4 and metrics["method"] == "adapter"
    # down and up (with biases) on 4 sublayers, and the trained copy of the (32 -> 2) classifier
    assert metrics["delta_parameters"] == 4 * (32 * 8 + 8 + 8 * 32 + 32) + (32 * 2 + 2)
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learns
    assert run.stages[2].metrics["max_abs_diff"] <= ATOL  # ONNX Runtime agrees with PyTorch

    art = slimtune.load(tuned)
    cls = HoulsbyAdapter if kind == "houlsby" else ResidualParallelAdapter
    assert len([w for _, w in deltas(art.model) if isinstance(w, cls)]) == 4
    x = _ids(art.model)
    out = art.model(input_ids=x).logits
    with disabled(art.model):
        assert not torch.equal(art.model(input_ids=x).logits, out)  # the trained adapters are there
    art.save(tmp_path / "again")
    assert torch.equal(slimtune.load(tmp_path / "again").model(input_ids=x).logits, out)


def test_parallel_adapter_on_llama_runs_as_a_recipe_and_exports(tmp_path, tiny_llama, tiny_csv):
    recipe = tmp_path / "llama.yaml"
    stage = "- adapter: {kind: parallel, size: 4, where: both, epochs: 2, lr: 0.01, eval_split: none}\n"
    recipe.write_text(recipe_text(tiny_llama, tiny_csv, stage + EXPORT, kind="causal-lm"))
    run = slimtune.run(recipe, out=tmp_path / "run", overrides={"task.limit": 96})
    history = run.stages[0].metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert run.stages[1].metrics["max_abs_diff"] <= ATOL
    art = slimtune.load(run.stages[0].path)
    assert isinstance(art.model.model.layers[0].mlp, ParallelAdapter)


@pytest.mark.parametrize("stage, message", [
    ("- adapter: {size: 0}\n", "stages.0.adapter.size"),
    ("- adapter: {where: middle}\n", "stages.0.adapter.where"),
    ("- adapter: {size: 4, reduction_factor: 2}\n", "not both"),
    ("- adapter: {reduction_factor: 64}\n", "leaves no bottleneck unit"),  # found when the model is read
    ("- adapter: {merge: true}\n", "adapter cannot be merged"),
])
def test_bad_adapter_stage_exits_2_and_writes_nothing(stage, message, write_recipe, tmp_path, capsys):
    assert_refused(write_recipe(stage), tmp_path / "run", capsys, message)
