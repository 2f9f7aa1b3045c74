"""LoRA on tiny random models: identity at init, merge/unmerge, switching, detaching, quantized bases, artifacts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

import slimtune
from slimtune.compress import quantize_
from slimtune.delta import (LoraLinear, add_lora_, deltas, detach_, disabled, load_delta_, merge_, merge_and_unload_,
                            save_delta, select_modules, set_active, unmerge_)
from slimtune.errors import ArtifactError, SlimTuneError
from tests.conftest import recipe_text
from tests.delta.conftest import token_ids as _ids


def _perturb(model, std=0.5):
    """Give every LoRA a nonzero B (fresh LoRAs are the identity)."""
    g = torch.Generator().manual_seed(7)
    for _, w in deltas(model):
        if isinstance(w, LoraLinear):
            w.lora_B.weight.data = torch.randn(w.lora_B.weight.shape, generator=g) * std


def test_roles_resolve_per_family(bert, llama):
    assert select_modules(bert, "query") == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert select_modules(bert, "ffn_out") == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    assert select_modules(llama, "ffn_in") == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")]
    every = select_modules(llama, "all-linear")
    assert len(every) == 2 * 7 and "lm_head" not in every  # never the LM head
    assert select_modules(bert, "re:.*layer\\.1\\..*key") == ["bert.encoder.layer.1.attention.self.key"]


def test_bad_targets_name_what_exists(bert):
    with pytest.raises(SlimTuneError, match="unknown target 'querry'") as err:
        select_modules(bert, "querry")
    assert "bert.encoder.layer.0.attention.self.query" in err.value.hint
    with pytest.raises(SlimTuneError, match="matches no linear module"):
        select_modules(bert, "*.nothing")
    with pytest.raises(SlimTuneError, match="rank 64 does not fit"):
        add_lora_(bert, "query", rank=64)
    assert not deltas(bert)  # a bad rank wraps nothing


def test_fresh_lora_is_identity_and_only_the_delta_trains(bert):
    x = _ids(bert)
    ref = bert(input_ids=x).logits
    add_lora_(bert, ["query", "value"], rank=4, train=["classifier.*"])
    assert torch.equal(bert(input_ids=x).logits, ref)
    _perturb(bert)
    bert(input_ids=x).logits.sum().backward()
    got = {n for n, p in bert.named_parameters() if p.grad is not None}
    assert got and all(("lora_" in n) or n.startswith("classifier.") for n in got)
    assert {n for n, p in bert.named_parameters() if p.requires_grad} == got


@pytest.mark.parametrize("dora", [False, True])
def test_merge_then_unmerge_is_the_identity(bert, dora):
    x = _ids(bert)
    add_lora_(bert, "all-linear", rank=4, dora=dora)
    _perturb(bert, 0.1)
    state = {k: v.clone() for k, v in bert.state_dict().items()}
    out = bert(input_ids=x).logits
    merge_(bert)
    # Merged and unmerged compute the same function; only float32 rounding differs: (W + sBA)x against
    # Wx + s B(Ax), each output a dot product of K <= 64 terms, off by at most gamma_64 = 64 u / (1 - 64 u)
    # = 3.8e-6 of the sum of |terms| (Higham, Lemma 3.1). The tiny model's activations and logits are O(1)
    # and its weights (std 0.02) shrink what flows through its two blocks and head, so 1e-5 (~2.6 gamma_64)
    # bounds the logits' difference on any CPU's summation order.
    torch.testing.assert_close(bert(input_ids=x).logits, out, rtol=1e-5, atol=1e-5)
    unmerge_(bert)
    assert all(torch.equal(state[k], v) for k, v in bert.state_dict().items())
    assert torch.equal(bert(input_ids=x).logits, out)


def test_disable_switch_and_detach_restore_the_backbone(bert):
    x = _ids(bert)
    ref = bert(input_ids=x).logits
    originals = {n: m for n, m in bert.named_modules()}
    add_lora_(bert, "query", rank=2, name="a")
    add_lora_(bert, ["query", "value"], rank=3, name="b")  # nests around "a" on the queries
    _perturb(bert)
    both = bert(input_ids=x).logits
    with disabled(bert):
        assert torch.equal(bert(input_ids=x).logits, ref)
    assert torch.equal(bert(input_ids=x).logits, both)
    set_active(bert, "a")
    only_a = bert(input_ids=x).logits
    set_active(bert, None)
    detach_(bert, "b")
    assert torch.equal(bert(input_ids=x).logits, only_a)
    detach_(bert, "a")
    assert torch.equal(bert(input_ids=x).logits, ref)
    assert all(originals[n] is m for n, m in bert.named_modules())  # the very module objects are back
    with pytest.raises(SlimTuneError, match="no delta named 'a'"):
        detach_(bert, "a")


def test_lora_over_quantlinear_matches_lora_over_its_dequantized_weight(llama):
    """Forward and input gradients: the quantized base computes with exactly dequant(W)."""
    import copy

    quantize_(llama, bits=4, group_size=32)
    floaty = copy.deepcopy(llama)
    for name, module in list(floaty.named_modules()):
        if type(module).__name__ == "QuantLinear":
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantized_weight()
            parent, _, child = name.rpartition(".")
            setattr(floaty.get_submodule(parent), child, linear)
    for model in (llama, floaty):
        torch.manual_seed(3)
        add_lora_(model, "all-linear", rank=4)
        _perturb(model, 0.05)
    x = _ids(llama)
    embeds = [m.get_input_embeddings()(x).detach().requires_grad_(True) for m in (llama, floaty)]
    outs = [m(inputs_embeds=e).logits for m, e in zip((llama, floaty), embeds)]
    # Both models compute with bitwise the same weights (the fp32 CPU path at M = 27 dequantizes exactly,
    # as dequantized_weight does); only which float32 matmul sums the K <= 64 products differs, each off by
    # at most gamma_64 = 3.8e-6 of the sum of |terms| (Higham, Lemma 3.1). Through two blocks, their norms
    # and the head (~10 chained matmuls on O(1) activations), 1e-4 leaves a margin of ~2.5 over 10 gamma_64.
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    for o in outs:
        o.square().sum().backward()
    # The input gradients run the same chain backwards (the transposed products, K <= 64 again) through the
    # softmax backward, whose sums cancel: relative error can grow where entries are small, hence rtol 1e-3
    # with atol 1e-4 (the forward's bound) for entries near zero.
    torch.testing.assert_close(embeds[0].grad, embeds[1].grad, rtol=1e-3, atol=1e-4)
    lora_grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (llama, floaty)]
    assert lora_grads[0].keys() == lora_grads[1].keys() and all("lora_" in n for n in lora_grads[0])


def test_merge_into_quantized_base_requantizes_and_reports_the_error(llama):
    quantize_(llama, bits=4, group_size=32)
    add_lora_(llama, "all-linear", rank=4)
    _perturb(llama, 0.02)
    x = _ids(llama)
    unmerged = llama(input_ids=x).logits
    report = merge_and_unload_(llama)
    assert report["requantized"] == report["layers"] == 14
    assert 0 < report["requant_rel_error_mean"] <= report["requant_rel_error_max"] < 0.2
    assert not deltas(llama) and type(llama.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    assert torch.isfinite(llama(input_ids=x).logits).all()
    assert not torch.equal(llama(input_ids=x).logits, unmerged)  # lossy: the reported error is real


def test_dora_over_quantized_base_is_refused(llama):
    quantize_(llama, bits=4, group_size=32)
    with pytest.raises(SlimTuneError, match="DoRA over a quantized weight"):
        add_lora_(llama, "query", rank=2, dora=True)


def test_save_delta_alone_and_refuse_another_backbone(tmp_path, write_recipe, tiny_bert):
    recipe = write_recipe("- finetune: {max_steps: 2, eval_split: none}\n")
    run = slimtune.run(recipe, out=tmp_path / "run")
    art = slimtune.load(run.stages[-1].path)
    add_lora_(art.model, "value", rank=2)
    _perturb(art.model)
    x = _ids(art.model)
    out = art.model(input_ids=x).logits
    save_delta(art, tmp_path / "delta")
    assert not (tmp_path / "delta" / "model.safetensors").exists()  # the delta alone
    fresh = slimtune.load(run.stages[-1].path)
    load_delta_(fresh, tmp_path / "delta")
    assert torch.equal(fresh.model(input_ids=x).logits, out)
    other = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    other_art = slimtune.load(run.stages[-1].path)
    with torch.no_grad():
        other_art.model.classifier.weight.add_(1.0)
    other_art.save(tmp_path / "other")
    other_art = slimtune.load(tmp_path / "other")
    with pytest.raises(ArtifactError, match="was trained on backbone"):
        load_delta_(other_art, tmp_path / "delta")
    load_delta_(other_art, tmp_path / "delta", allow_other_backbone=True)
    assert other is not None


def test_lora_stage_trains_links_its_backbone_and_reloads(tmp_path, write_recipe):
    recipe = write_recipe("- finetune: {max_steps: 2, eval_split: none}\n"
                          "- lora: {rank: 4, targets: [query, value], epochs: 3, lr: 0.01, eval_split: none}\n")
    run = slimtune.run(recipe, out=tmp_path / "run")
    backbone, tuned = run.stages[0].path, run.stages[1].path
    assert (tuned / "model.safetensors").stat().st_ino == (backbone / "model.safetensors").stat().st_ino  # linked
    assert (tuned / "deltas" / "lora.safetensors").is_file()
    metrics = run.stages[1].metrics
    assert metrics["trainable_parameters"] == metrics["delta_parameters"] < metrics["total_parameters"]
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learns
    art = slimtune.load(tuned)
    assert [r["name"] for r in art.attachments["deltas"]] == ["lora"]
    assert isinstance(art.model.bert.encoder.layer[0].attention.self.query, LoraLinear)
    reloaded = slimtune.load(tuned)
    x = _ids(art.model)
    assert torch.equal(art.model(input_ids=x).logits, reloaded.model(input_ids=x).logits)


def test_stages_after_a_delta_are_refused_unless_merged(write_recipe, tmp_path):
    from slimtune.errors import RecipeError
    from slimtune.recipe import load_recipe

    with pytest.raises(RecipeError, match="would change the backbone"):
        load_recipe(write_recipe("- lora: {rank: 2}\n- quantize: {bits: 8}\n"))
    with pytest.raises(RecipeError, match="already attached one of that name"):
        load_recipe(write_recipe("- lora: {rank: 2}\n- lora: {rank: 2}\n"))
    load_recipe(write_recipe("- lora: {rank: 2}\n- lora: {rank: 2, name: second}\n- evaluate: {onnx: false}\n"))
    load_recipe(write_recipe("- lora: {rank: 2, merge: true}\n- quantize: {bits: 8}\n"))


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_and_a_body_wrapping_delta_nest_either_way_and_round_trip(tmp_path, bert, tiny_bert, lora_first):
    """A LoRA inside a prefix-wrapped body (or around it): targets resolve, detached() strips both, saving rebuilds."""
    from slimtune.delta import add_prefix_, detached

    x = _ids(bert)
    ref = bert(input_ids=x).logits
    steps = [lambda: add_lora_(bert, ["query", "value"], rank=2, name="l"), lambda: add_prefix_(bert, 3, name="p")]
    for step in (steps if lora_first else steps[::-1]):
        step()
    assert len(deltas(bert, "l")) == 4  # both layers' query and value, wherever the body sits
    _perturb(bert)
    out = bert(input_ids=x).logits
    with detached(bert):
        assert not deltas(bert) and torch.equal(bert(input_ids=x).logits, ref)
    assert torch.equal(bert(input_ids=x).logits, out)
    save_delta(bert, tmp_path / "both")
    torch.manual_seed(0)  # the fixture's head initialisation
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    assert torch.equal(fresh(input_ids=x).logits, ref)
    assert load_delta_(fresh, tmp_path / "both") == (["l", "p"] if lora_first else ["p", "l"])
    assert torch.equal(fresh(input_ids=x).logits, out)


def test_a_rank_no_layer_can_take_exits_2_with_nothing_written(write_recipe, tmp_path, capsys):
    from slimtune.cli import main

    recipe = write_recipe("- lora: {rank: 64, targets: [query]}\n")  # the tiny BERT's projections are 32 wide
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "LoRA rank 64 does not fit" in err and "use a rank between 1 and 32" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_merging_stage_reports_what_the_merge_changed(write_recipe, tmp_path):
    recipe = write_recipe("- lora: {rank: 4, targets: [all-linear], merge: true, max_steps: 3, eval_split: none}\n"
                          "- evaluate: {split: test, latency: false, onnx: false}\n")
    run = slimtune.run(recipe, out=tmp_path / "run")
    merge = run.stages[0].metrics["merge"]
    assert merge["layers"] == 12 and merge["requantized"] == 0
    # A float merge computes W + sBA once instead of Wx + s B(Ax): the same sums in another order, so the
    # logits agree to float32 rounding of <= 64-term dot products through two blocks (a few 1e-6 relative).
    assert 0 <= merge["output_max_abs_diff"] <= 1e-5 * max(1.0, merge["output_max_abs"])
    assert not (run.stages[0].path / "deltas").exists()  # a plain model, written whole
