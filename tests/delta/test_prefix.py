"""Prefix-tuning on tiny random models: against reference computations, in generate, switching, saving, training, export."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (AutoModel, AutoModelForSequenceClassification, DistilBertConfig, 
                          DistilBertForSequenceClassification)

import slimtune
from slimtune.delta import deltas, detach_, disabled, load_delta_, save_delta
from slimtune.delta.prefix import PrefixTuning, add_prefix_, finalize_, widen_mask
from slimtune.errors import RecipeError, SlimTuneError
from tests.conftest import recipe_text
from tests.delta.conftest import token_ids

P = 4  # virtual tokens


def _ids(model, shape=(3, 9), seed=1):
    return token_ids(model, shape, seed, low=5)


def _padded_mask(shape=(3, 9)):
    mask = torch.ones(shape, dtype=torch.long)
    mask[0, -3:] = 0  # one padded row
    return mask


def _flat_prefix(key_values) -> torch.Tensor:
    """Per layer ``(keys, values)`` of shape (1, kv, P, d) -> the (P, width) layout :func:`split_prefix` reads."""
    return torch.cat([torch.stack([k[0], v[0]]).permute(2, 0, 1, 3).reshape(k.shape[2], -1) for k, v in key_values], dim=1)


def _bert_reference(model, prefix_kv, input_ids, mask):
    """BERT with prefix keys/values by hand: each layer's own projections, attention over [prefix; tokens]."""
    body = model.bert.base_layer
    h = body.embeddings(input_ids=input_ids)  # (B, T, H)
    visible = torch.cat([torch.ones(len(mask), P, dtype=torch.bool), mask.bool()], 1)  # (B, P + T)
    for layer, (pk, pv) in zip(body.encoder.layer, prefix_kv):
        sa = layer.attention.self
        heads = lambda t: t.view(*t.shape[:2], -1, sa.attention_head_size).transpose(1, 2)  # noqa: E731 (B, nh, T, d)
        q, k, v = heads(sa.query(h)), torch.cat([pk, heads(sa.key(h))], 2), torch.cat([pv, heads(sa.value(h))], 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(sa.attention_head_size)  # (B, nh, T, P + T)
        ctx = scores.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1) @ v  # (B, nh, T, d)
        attn = layer.attention.output(ctx.transpose(1, 2).flatten(2), h)
        h = layer.output(layer.intermediate(attn), attn)
    return h  # (B, T, H)


def test_bert_prefix_matches_attention_over_prefix_and_tokens(bert):
    x, mask = _ids(bert), _padded_mask()
    add_prefix_(bert, P)
    kv = bert.bert.key_values(len(x))
    with torch.no_grad():
        got, ref = bert.bert(input_ids=x, attention_mask=mask).last_hidden_state, _bert_reference(bert, kv, x, mask)
        with disabled(bert):
            base = bert.bert(input_ids=x, attention_mask=mask).last_hidden_state
    # SDPA against the hand-written attention: float32 sums over at most P + T = 13 keys and 32-64
    # channels, two layers deep: well under 1e-5 of LayerNorm outputs of order 1.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the prefix takes part (N(0, 1) embeddings through the MLP)


@pytest.mark.parametrize("p", [1, P])
def test_llama_prefix_equals_virtual_tokens_in_front(llama, p):
    """A prefix holding the keys/values that real tokens z produce at positions -p..-1 gives the model's output on [z; x]."""
    z, x = _ids(llama, (1, p), seed=2), _ids(llama, (1, 7), seed=3)
    with torch.no_grad():
        cache = llama.model(input_ids=z, position_ids=torch.arange(-p, 0)[None], use_cache=True).cache
        whole = llama(input_ids=torch.cat([z, x], 1), position_ids=torch.arange(-p, 7)[None]).logits[:, p:]
        kv = [(layer.keys, layer.values) for layer in cache.layers]
    add_prefix_(llama, p, projection=False)
    with torch.no_grad():
        llama.model.prefix.copy_(_flat_prefix(kv))
        got = llama(input_ids=x).logits
    # Same computation in another order (the cache concatenation): float32 rounding of sums over <= 11 keys
    # and 64 channels, two layers deep, on logits of order 1.
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)


def test_widen_mask_puts_visible_prefix_columns_in_front():
    pad = torch.tensor([[1, 1, 0]])
    assert torch.equal(widen_mask(pad, 2, 1, 3, "cpu"), torch.tensor([[1, 1, 1, 1, 0]]))
    assert torch.equal(widen_mask(None, 2, 2, 3, "cpu"), torch.ones(2, 5, dtype=torch.long))
    allowed = torch.tensor([True, False]).view(1, 1, 1, 2).expand(2, 1, 3, 2)  # (B, 1, Q, K)
    assert torch.equal(widen_mask(allowed, 1, 2, 2, "cpu")[..., 0], torch.ones(2, 1, 3, dtype=torch.bool))
    additive = torch.tensor([0.0, float("-inf")]).view(1, 1, 1, 2)
    assert torch.equal(widen_mask(additive, 3, 1, 2, "cpu"), torch.tensor([0.0, 0, 0, 0, float("-inf")]).view(1, 1, 1, 5))


def test_only_the_prefix_and_head_train_and_finalize_keeps_outputs(bert):
    x, mask = _ids(bert), _padded_mask()
    assert add_prefix_(bert, P, hidden=16, train=["classifier.*"]) == ["bert"]
    assert "PrefixTuning" in repr(bert) and "num_virtual_tokens=4" in repr(bert)
    out = bert(input_ids=x, attention_mask=mask).logits
    out.square().sum().backward()
    got = {n for n, p in bert.named_parameters() if p.grad is not None}
    assert got == {n for n, p in bert.named_parameters() if p.requires_grad}
    assert got == {"bert.embedding.weight", "bert.mlp.0.weight", "bert.mlp.0.bias", "bert.mlp.2.weight", "bert.mlp.2.bias",
                   "classifier.weight", "classifier.bias"}
    assert finalize_(bert) == 1
    wrapper = bert.bert
    assert [n for n, _ in wrapper.delta_parameters()] == ["prefix"] and wrapper.prefix.requires_grad
    assert wrapper.prefix.shape == (P, 2 * 2 * 2 * 16)  # layers x (k, v) x heads x head_dim
    assert wrapper.config() == {"num_virtual_tokens": P, "projection": False, "hidden": None}
    # The stored prefix is the MLP's output computed once more, without autograd: the same float32 ops.
    torch.testing.assert_close(bert(input_ids=x, attention_mask=mask).logits, out, rtol=1e-6, atol=1e-7)
    assert finalize_(bert) == 0  # already final


def test_disable_and_detach_restore_the_backbone(bert, llama):
    for model in (bert, llama):
        x = _ids(model)
        ref = model(input_ids=x).logits
        body = model.base_model
        add_prefix_(model, P)
        assert not torch.equal(model(input_ids=x).logits, ref)
        with disabled(model):
            assert torch.equal(model(input_ids=x).logits, ref)
        detach_(model)
        assert model.base_model is body and not deltas(model)
        assert torch.equal(model(input_ids=x).logits, ref)


def test_generate_equals_greedy_steps_without_cache(llama):
    prompt = _ids(llama, (2, 5), seed=4)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding, as generate wants it
    with torch.no_grad():
        plain = llama.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
    add_prefix_(llama, P, projection=False)
    with torch.no_grad():
        llama.model.prefix.mul_(4.0)  # a strong prefix, so that it changes what is generated
        out = llama.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
        seq, m = prompt, mask
        for _ in range(6):  # the whole sequence each step, no cache; positions as generate derives them from the mask
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            logits = llama(input_ids=seq, attention_mask=m, position_ids=positions, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(out, seq)
    assert not torch.equal(out, plain)


def test_cache_passed_on_by_hand_and_foreign_caches(llama):
    from transformers import DynamicCache

    x = _ids(llama, (2, 8), seed=5)
    add_prefix_(llama, P)
    with torch.no_grad():
        whole = llama(input_ids=x, use_cache=False)
        assert whole.cache is None  # none asked for, none returned
        first = llama(input_ids=x[:, :5], use_cache=True)
        assert first.cache.get_seq_length() == 5  # the prefix counts as no tokens
        rest = llama(input_ids=x[:, 5:], cache=first.cache, attention_mask=torch.ones(2, 8, dtype=torch.long)).logits
        # Incremental against whole-sequence attention: float32 rounding of the same sums (<= 12 keys).
        torch.testing.assert_close(rest, whole.logits[:, 5:], rtol=1e-5, atol=1e-5)
        with disabled(llama):
            foreign = llama(input_ids=x[:, :5], use_cache=True).cache
        with pytest.raises(SlimTuneError, match="filled without the prefix"):
            llama(input_ids=x[:, 5:], cache=foreign)
        with pytest.raises(SlimTuneError, match="cache passed holds none"):
            llama(input_ids=x[:, 5:], cache=DynamicCache(), attention_mask=torch.ones(2, 8, dtype=torch.long))


def test_bad_input_is_refused(bert, tiny_bert):
    for bad in (0, -2, 1.5):
        with pytest.raises(SlimTuneError, match="num_virtual_tokens"):
            add_prefix_(bert, bad)
    with pytest.raises(SlimTuneError, match="hidden=0"):
        add_prefix_(bert, P, hidden=0)
    assert not deltas(bert)
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(SlimTuneError, match="model type 'distilbert' has no key/value cache path"):
        add_prefix_(distil, P)
    add_prefix_(bert, P)
    with pytest.raises(SlimTuneError, match="a prefix is already attached"):
        add_prefix_(bert, P, name="second")
    with pytest.raises(SlimTuneError, match="bare body"):
        add_prefix_(AutoModel.from_pretrained(tiny_bert), P)
    bert.train()
    bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # would drop the cache
    with pytest.raises(SlimTuneError, match="gradient checkpointing"):
        bert(input_ids=_ids(bert))


def test_save_delta_alone_round_trips(bert, tiny_bert, tmp_path):
    x, mask = _ids(bert), _padded_mask()
    add_prefix_(bert, P, name="p")
    out = bert(input_ids=x, attention_mask=mask).logits
    save_delta(bert, tmp_path / "delta")  # unfinalized: the MLP form saves and loads too
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    fresh.classifier.load_state_dict(bert.classifier.state_dict())
    load_delta_(fresh, tmp_path / "delta")
    assert isinstance(fresh.bert, PrefixTuning) and fresh.bert.projection
    assert torch.equal(fresh(input_ids=x, attention_mask=mask).logits, out)


def test_classification_stage_saves_final_prefixes_that_reload_and_export(tmp_path, write_recipe):
    from safetensors.torch import load_file

    from slimtune.export import ort_feed, ort_session

    recipe = write_recipe("- prefix: {num_virtual_tokens: 4, epochs: 3, lr: 0.01, eval_split: none}\n"
                          "- export: {max_examples: 8}\n")
    run = slimtune.run(recipe, out=tmp_path / "run")
    tuned, exported = run.stages
    history = tuned.metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learns
    # trained: embedding + MLP + head; saved: the (P, 2 layers x (k, v) x 32) prefix + the head's copy
    assert tuned.metrics["trainable_parameters"] > tuned.metrics["delta_parameters"] == P * 2 * 2 * 32 + 2 * 32 + 2
    saved = load_file(tuned.path / "deltas" / "prefix.safetensors")
    assert set(saved) == {"bert.prefix", "classifier.copy.weight", "classifier.copy.bias"}  # no MLP: the final prefixes
    art = slimtune.load(tuned.path)
    assert isinstance(art.model.bert, PrefixTuning) and not art.model.bert.projection
    batch = dict(art.tokenizer(["a great film and fun", "the plot was dull", "boring"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        logits = art.model(**batch).logits
        with disabled(art.model, "prefix"):  # the head's copy stays: only the prefix's own effect
            art.model.classifier.active = True
            without = art.model(**batch).logits
    art.save(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(slimtune.load(tmp_path / "again").model(**batch).logits, logits)
    # The ONNX graph was exported from the model in memory after training; the reloaded one must agree
    # to float32 rounding of the same ops (the export stage itself measured its graph against PyTorch).
    session = ort_session(exported.path / "model.onnx")
    onnx = torch.from_numpy(session.run(None, ort_feed(session, batch))[0])
    assert (onnx - logits).abs().max() <= 1e-6 < (logits - without).abs().max() / 100
    assert exported.metrics["max_abs_diff"] <= 1e-3


def test_causal_lm_stage_learns_and_the_decoder_exports(tmp_path, tiny_llama, tiny_csv):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_llama, tiny_csv, "- prefix: {num_virtual_tokens: 4, epochs: 3, lr: 0.05, eval_split: none}\n"
                                  "- export: {max_examples: 8}\n", kind="causal-lm"))
    run = slimtune.run(recipe, out=tmp_path / "run")
    losses = [h["train_loss"] for h in run.stages[0].metrics["history"]]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]  # the prefix alone (no head) learns
    assert run.stages[0].metrics["delta_parameters"] == P * 2 * 2 * 2 * 8  # layers x (k, v) x kv heads x head_dim
    assert run.stages[1].metrics["max_abs_diff"] <= 1e-3  # ONNX Runtime against PyTorch, prefix inside the graph
    model = slimtune.load(run.stages[0].path).model
    prompt = _ids(model, (1, 4))
    assert model.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_stage_refuses_a_model_without_a_cache_at_validation(tmp_path, tiny_bert, tiny_csv):
    from transformers import AutoTokenizer

    distil = tmp_path / "distil"
    config = DistilBertConfig(vocab_size=43, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertForSequenceClassification(config).save_pretrained(distil)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(distil)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(distil, tiny_csv, "- prefix: {num_virtual_tokens: 4}\n"))
    with pytest.raises(RecipeError, match="model type 'distilbert' has none") as err:  # a SlimTuneError: the CLI exits 2
        slimtune.run(recipe, out=tmp_path / "run")
    assert "stages[0] prefix" in err.value.message and "key/value cache" in err.value.message
    assert not (tmp_path / "run").exists()  # refused at validation: nothing written
    for stage, field in (("- prefix: {num_virtual_tokens: 0}\n", "num_virtual_tokens"), ("- prefix: {merge: true}\n", "cannot be merged"),
                         ("- prefix: {}\n- prefix: {name: again}\n", "already attached a prefix")):
        recipe.write_text(recipe_text(tiny_bert, tiny_csv, stage))
        with pytest.raises(RecipeError, match=field):
            slimtune.run(recipe, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
