"""Ladder side-tuning on tiny random models: a frozen backbone without autograd graph, switching, detaching,
quantized backbones, the ``ladder`` stage, its artifact and ONNX export, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

import slimtune
from slimtune import arch
from slimtune.compress import quantize_
from slimtune.delta import LadderSideNetwork, add_ladder_, deltas, detach_, disabled
from slimtune.errors import RecipeError, SlimTuneError
from slimtune.tasks import CausalLM
from tests.conftest import recipe_text


@pytest.fixture
def quantized_llama(llama):
    quantize_(llama, bits=4, group_size=32)
    return llama


def _batch(model, shape=(3, 9), seed=1):
    ids = torch.randint(5, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(shape, dtype=torch.long)
    mask[0, shape[1] - 3:] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _perturb(model, std=0.5):
    """Give the ladder a nonzero up-projection (a fresh residual ladder adds exactly zero)."""
    g = torch.Generator().manual_seed(7)
    for _, w in deltas(model):
        if isinstance(w, LadderSideNetwork):
            w.up.weight.data = torch.randn(w.up.weight.shape, generator=g) * std


MODELS = ["bert", "llama", "quantized_llama"]


@pytest.mark.parametrize("which", MODELS)
def test_fresh_ladder_is_identity_and_shows_in_print(which, request):
    model = request.getfixturevalue(which)
    x = _batch(model)
    ref = model(**x).logits
    assert add_ladder_(model, reduction=8) == [model.base_model_prefix]
    assert isinstance(getattr(model, model.base_model_prefix), LadderSideNetwork)
    assert torch.equal(model(**x).logits, ref)  # residual ladder: up starts at zero, so it adds exactly 0
    assert "LadderSideNetwork(" in str(model) and "(base_layer):" in str(model)


@pytest.mark.parametrize("which", MODELS)
def test_backbone_builds_no_graph_and_gets_no_gradient(which, request):
    """Even with every backbone weight requiring grad, the blocks run without autograd and get no gradient."""
    model = request.getfixturevalue(which)
    blocks = list(arch.layers(model))
    seen = []
    for block in blocks:
        block.register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    add_ladder_(model, reduction=4, freeze=False)
    _perturb(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model(**_batch(model)).logits.square().sum().backward()
    assert len(seen) == len(blocks)
    assert all(not h.requires_grad and h.grad_fn is None for h in seen)
    assert all(p.grad is None for block in blocks for p in block.parameters())
    side = getattr(model, model.base_model_prefix)
    assert all(p.grad is not None for _, p in side.delta_parameters())


@pytest.mark.parametrize("which", MODELS)
def test_only_the_side_network_and_head_train(which, request):
    model = request.getfixturevalue(which)
    head = ["classifier.*"] if which == "bert" else []
    add_ladder_(model, reduction=4, train=head)
    _perturb(model)
    model(**_batch(model)).logits.square().sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    prefix = model.base_model_prefix + "."
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert got and all((n.startswith(prefix) and ".base_layer." not in n) or n.startswith("classifier.") for n in got)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_disable_and_detach_restore_the_backbone(which, request):
    model = request.getfixturevalue(which)
    x = _batch(model)
    ref = model(**x).logits
    originals = dict(model.named_modules())
    base = getattr(model, model.base_model_prefix)
    add_ladder_(model, reduction=4, name="side")
    _perturb(model)
    tuned = model(**x).logits
    assert not torch.equal(tuned, ref)
    with disabled(model):
        assert torch.equal(model(**x).logits, ref)
    assert torch.equal(model(**x).logits, tuned)
    detach_(model, "side")
    assert getattr(model, model.base_model_prefix) is base
    assert dict(model.named_modules()).keys() == originals.keys()
    assert all(originals[n] is m for n, m in model.named_modules())
    assert torch.equal(model(**x).logits, ref)


def test_decoder_side_network_is_causal(llama):
    """A prefix's logits do not depend on the tokens after it (the side attention is causal)."""
    add_ladder_(llama, reduction=4)
    _perturb(llama)
    ids = _batch(llama)["input_ids"]
    full = llama(input_ids=ids).logits
    prefix = llama(input_ids=ids[:, :5]).logits
    # Same computation on fewer keys: equal up to float32 rounding of the attention sums (<= 9 terms).
    torch.testing.assert_close(prefix, full[:, :5], rtol=1e-5, atol=1e-5)


def test_generate_needs_no_cache(llama):
    add_ladder_(llama, reduction=4)
    _perturb(llama)
    ids = _batch(llama)["input_ids"][:1, :4]
    out = llama.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
    assert out.shape == (1, 7)
    with pytest.raises(SlimTuneError, match="keeps no key/value cache"):
        llama.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)


def test_ladder_trains_over_a_quantized_backbone(quantized_llama):
    model = quantized_llama
    add_ladder_(model, reduction=2)
    batch = _batch(model, (4, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss, _ = CausalLM().loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert type(arch.layers(detach_(model))[0].self_attn.q_proj).__name__ == "QuantLinear"  # the backbone stayed packed


def test_ladder_stage_trains_saves_reloads_and_exports(tmp_path, write_recipe):
    recipe = write_recipe("- ladder: {reduction: 2, epochs: 4, lr: 0.003, eval_split: none}\n"
                          "- export: {max_examples: 8}\n")
    run = slimtune.run(recipe, out=tmp_path / "run")
    tuned, exported = run.stages[0], run.stages[1]
    history = tuned.metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert tuned.metrics["method"] == "ladder" and tuned.metrics["trainable_parameters"] < tuned.metrics["total_parameters"]
    assert exported.metrics["max_abs_diff"] <= 1e-3  # the export stage's own atol (float32 graph vs eager)
    assert (tuned.path / "deltas" / "ladder.safetensors").is_file()
    art = slimtune.load(tuned.path)
    assert isinstance(art.model.bert, LadderSideNetwork)
    x = _batch(art.model)
    out = art.model(**x).logits
    with disabled(art.model):
        assert not torch.equal(art.model(**x).logits, out)  # the trained side network is in effect
    assert torch.equal(slimtune.load(tuned.path).model(**x).logits, out)
    art.save(tmp_path / "again")
    assert torch.equal(slimtune.load(tmp_path / "again").model(**x).logits, out)


def test_ladder_stage_on_a_decoder(tmp_path, tiny_llama, tiny_csv):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_llama, tiny_csv, "- ladder: {reduction: 2, epochs: 3, lr: 0.01, eval_split: none}\n"
                                  "- export: {max_examples: 8}\n", kind="causal-lm"))
    run = slimtune.run(recipe, out=tmp_path / "run")
    history = run.stages[0].metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert run.stages[1].metrics["max_abs_diff"] <= 1e-3  # the export stage's own atol, on padded batches
    assert isinstance(slimtune.load(run.stages[0].path).model.model, LadderSideNetwork)


def test_bad_input_is_refused_and_changes_nothing(bert, tiny_bert):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    with pytest.raises(SlimTuneError, match="cannot read the hidden states of model type 'gpt2'"):
        add_ladder_(gpt2)
    with pytest.raises(SlimTuneError, match="bare base model"):
        add_ladder_(AutoModel.from_pretrained(tiny_bert))
    with pytest.raises(SlimTuneError, match=r"layer\(s\) \[5\] do not exist"):
        add_ladder_(bert, layers=[5])
    with pytest.raises(SlimTuneError, match="reduction 64 does not fit"):
        add_ladder_(bert, reduction=64)
    with pytest.raises(SlimTuneError, match="heads 3 do not divide"):
        add_ladder_(bert, reduction=2, heads=3)
    assert not deltas(bert) and not isinstance(bert.bert, LadderSideNetwork)
    add_ladder_(bert, name="a")
    with pytest.raises(SlimTuneError, match="already wrapped by delta 'a'"):
        add_ladder_(bert, name="b")


def test_recipe_refusals(write_recipe, tmp_path, capsys):
    from slimtune.cli import main
    from slimtune.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"layers \[7\] do not exist"):
        load_recipe(write_recipe("- ladder: {layers: [0, 7]}\n"))
    with pytest.raises(RecipeError, match="cannot be merged"):
        load_recipe(write_recipe("- ladder: {merge: true}\n"))
    with pytest.raises(RecipeError, match="reduction"):
        load_recipe(write_recipe("- ladder: {reduction: 0}\n"))
    # An embedding task's model is a bare base model: no task head would read the side network.
    out = tmp_path / "run"
    assert main(["run", str(write_recipe("- ladder: {}\n", kind="embedding")), "--out", str(out)]) == 2
    assert "bare base model" in capsys.readouterr().err
    assert not any(p.is_dir() and "ladder" in p.name for p in out.glob("*"))  # nothing written for the stage
