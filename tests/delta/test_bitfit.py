"""BitFit on tiny random models: bias offsets, identity at init, exact merge, switching, detaching, artifacts, ONNX."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


import slimtune
from slimtune.delta import (BiasDelta, add_bitfit_, add_lora_, deltas, detach_, disabled, merge_and_unload_bitfit_,
                            merge_bitfit_, unmerge_bitfit_)
from slimtune.errors import SlimTuneError
from tests.conftest import recipe_text
from tests.delta.conftest import assert_refused, token_ids as _ids

ATOL = 1e-3  # the export stage's default atol, which its own validation enforces
FINETUNE = "- finetune: {max_steps: 1, eval_split: none}\n"
EXPORT = "- export: {max_examples: 8}\n"
BERT_LINEARS = 1 + 2 * 6  # the pooler, and q, k, v, attention output, intermediate, output in each of the 2 layers
BERT_NORMS = 1 + 2 * 2  # the embeddings' LayerNorm, and two per layer


def _perturb(model, std=0.1):
    """Give every offset a nonzero value (fresh offsets are zero)."""
    g = torch.Generator().manual_seed(7)
    for _, w in deltas(model):
        for _, p in w.delta_parameters():
            p.data = torch.randn(p.shape, generator=g) * std


def test_what_trains_per_family(bert, llama):
    names = add_bitfit_(bert)
    assert len(names) == BERT_LINEARS and "bert.pooler.dense" in names and "classifier" not in names  # never the head
    detach_(bert)
    names = add_bitfit_(bert, layernorm=True)
    assert len(names) == BERT_LINEARS + BERT_NORMS and "bert.embeddings.LayerNorm" in names
    assert {n for n, _ in bert.named_parameters() if n.endswith("_offset")} >= {
        "bert.embeddings.LayerNorm.weight_offset", "bert.embeddings.LayerNorm.bias_offset", "bert.pooler.dense.bias_offset"}
    assert add_bitfit_(bert, targets=["query"], name="q") == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    # Llama has no biases: only its RMSNorms (two per layer and the final one) can train, and only their scales.
    assert add_bitfit_(llama, layernorm=True) == [f"model.layers.{i}.{n}" for i in range(2)
                                                  for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]
    assert {n for n, _ in llama.named_parameters() if n.endswith("_offset")} == {
        *(f"model.layers.{i}.{n}.weight_offset" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")),
        "model.norm.weight_offset"}
    assert "BiasDelta(" in repr(llama)  # print(model) shows the delta


def test_offsets_compute_the_module_with_shifted_tensors(bert):
    """The wrapper runs its module with ``b + delta_b`` (and ``w + delta_w``): the same op on the shifted tensors."""
    add_bitfit_(bert, layernorm=True)
    _perturb(bert)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    linear = bert.bert.encoder.layer[0].attention.self.query
    base = linear.base_layer
    assert torch.equal(linear(x), F.linear(x, base.weight, base.bias + linear.bias_offset))
    norm = bert.bert.encoder.layer[0].output.LayerNorm
    base = norm.base_layer
    expected = F.layer_norm(x, base.normalized_shape, base.weight + norm.weight_offset, base.bias + norm.bias_offset, base.eps)
    assert torch.equal(norm(x), expected)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fresh_bitfit_is_identity_and_only_the_offsets_train(family, request):
    model = request.getfixturevalue(family)
    x = _ids(model)
    ref = model(input_ids=x).logits
    head = ["classifier.*"] if family == "bert" else []
    add_bitfit_(model, layernorm=family == "llama", train=head)
    assert torch.equal(model(input_ids=x).logits, ref)
    _perturb(model)
    model(input_ids=x).logits.sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got and all(n.endswith("_offset") or n.startswith("classifier.") for n in got)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == got
    assert any(n.startswith("classifier.") for n in got) == bool(head)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_merge_is_exact_and_disable_detach_restore_the_backbone(family, request):
    model = request.getfixturevalue(family)
    x = _ids(model)
    ref = model(input_ids=x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    originals = dict(model.named_modules())
    add_bitfit_(model, layernorm=True)
    _perturb(model)
    tuned = model(input_ids=x).logits
    assert not torch.equal(tuned, ref)
    with disabled(model):
        assert torch.equal(model(input_ids=x).logits, ref)
    merge_bitfit_(model)
    # Merged, each module computes with the very tensor b + delta_b the unmerged forward builds: bit-exact.
    assert torch.equal(model(input_ids=x).logits, tuned)
    unmerge_bitfit_(model)
    assert torch.equal(model(input_ids=x).logits, tuned)
    merge_bitfit_(model)
    detach_(model)  # unmerges first
    assert all(originals[n] is m for n, m in model.named_modules()) and originals.keys() == dict(model.named_modules()).keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(input_ids=x).logits, ref)


def test_bitfit_nests_with_lora_and_merges_and_unloads(bert):
    x = _ids(bert)
    add_lora_(bert, "query", rank=2, name="lora")
    add_bitfit_(bert, name="bitfit")  # wraps the LoRA on the queries
    _perturb(bert)
    tuned = bert(input_ids=x).logits
    report = merge_and_unload_bitfit_(bert, "bitfit")
    assert report == {"layers": BERT_LINEARS}
    assert not any(isinstance(w, BiasDelta) for _, w in deltas(bert)) and len(deltas(bert, "lora")) == 2
    assert torch.equal(bert(input_ids=x).logits, tuned)
    with pytest.raises(SlimTuneError, match="not a BitFit delta"):
        merge_bitfit_(bert, "lora")


def test_merge_over_shared_biases_is_refused(bert):
    layers = bert.bert.encoder.layer
    layers[1].attention.self.query.bias = layers[0].attention.self.query.bias  # as the share stage ties parameters
    add_bitfit_(bert)
    _perturb(bert)
    with pytest.raises(SlimTuneError, match="share one bias tensor"):
        merge_bitfit_(bert)
    assert not any(w.merged for _, w in deltas(bert))


def test_nothing_to_train_is_refused(llama, bert):
    with pytest.raises(SlimTuneError, match="nothing to train") as err:
        add_bitfit_(llama)
    assert "layernorm" in err.value.hint
    with pytest.raises(SlimTuneError, match="matches no linear module"):
        add_bitfit_(bert, targets=["*.nothing"])
    assert not deltas(llama) and not deltas(bert)


def test_bitfit_stage_trains_links_reloads_exports_and_merges(tmp_path, write_recipe):
    stage = "- bitfit: {{layernorm: true, epochs: 3, lr: 0.05, eval_split: none{}}}\n"
    out = tmp_path / "run"
    run = slimtune.run(write_recipe(FINETUNE + stage.format("") + EXPORT), out=out)
    backbone, tuned, exported = (s.path for s in run.stages)
    assert (tuned / "model.safetensors").stat().st_ino == (backbone / "model.safetensors").stat().st_ino  # linked
    assert (tuned / "deltas" / "bitfit.safetensors").is_file()
    metrics = run.stages[1].metrics
    assert metrics["adapted_modules"] == BERT_LINEARS + BERT_NORMS
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learns
    assert run.stages[2].metrics["max_abs_diff"] <= ATOL  # ONNX Runtime agrees with PyTorch

    art = slimtune.load(tuned)
    assert len([w for _, w in deltas(art.model) if isinstance(w, BiasDelta)]) == BERT_LINEARS + BERT_NORMS
    x = _ids(art.model)
    out_delta = art.model(input_ids=x).logits
    with disabled(art.model):
        assert not torch.equal(art.model(input_ids=x).logits, out_delta)  # the trained offsets are there
    art.save(tmp_path / "again")
    assert torch.equal(slimtune.load(tmp_path / "again").model(input_ids=x).logits, out_delta)

    # The same training (same seed, reused finetune stage), folded in: a plain model with the same outputs.
    merged = slimtune.run(write_recipe(FINETUNE + stage.format(", merge: true"), name="merged.yaml"), out=out)
    assert merged.stages[0].reused and not (merged.stages[1].path / "deltas").exists()
    plain = slimtune.load(merged.stages[1].path).model
    assert not deltas(plain)
    assert torch.equal(plain(input_ids=x).logits, out_delta)


@pytest.mark.parametrize("stage, message", [
    ("- bitfit: {targets: ['*.nothing']}\n", "matches no linear module"),
    ("- bitfit: {layernorm: maybe}\n", "stages.0.bitfit.layernorm"),
    ("- bitfit: {rank: 4}\n", "stages.0.bitfit.rank"),
    ("- share: {groups: [[0, 1]]}\n- bitfit: {merge: true}\n", "made layers share their biases"),
])
def test_bad_bitfit_stage_exits_2_and_writes_nothing(stage, message, write_recipe, tmp_path, capsys):
    assert_refused(write_recipe(stage), tmp_path / "run", capsys, message)


def test_bitfit_on_llama_without_norms_exits_2(tmp_path, tiny_llama, tiny_csv, capsys):
    recipe, out = tmp_path / "llama.yaml", tmp_path / "run"
    recipe.write_text(recipe_text(tiny_llama, tiny_csv, "- bitfit: {}\n", kind="causal-lm"))
    assert_refused(recipe, out, capsys, "BitFit has nothing to train", "layernorm: true")
