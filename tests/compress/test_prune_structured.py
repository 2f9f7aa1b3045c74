"""Structured pruning: physically smaller models whose outputs equal the masked original's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import slimtune
from slimtune.artifact import Artifact
from slimtune import arch
from slimtune.compress.prune import importance as imp
from slimtune.compress.prune.structured import heads_to_remove, parameter_count, prune_structured_, removal_count
from slimtune.errors import SlimTuneError
from slimtune.recipe import TaskConfig
from slimtune.tasks import Collator, task_kind
from tests.conftest import tiny_texts

# ---------------------------------------------------------------- models and data


@pytest.fixture
def bert(tiny_bert):
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()


@pytest.fixture
def llama(tiny_llama):
    return transformers.LlamaForCausalLM.from_pretrained(tiny_llama).eval()


@pytest.fixture
def tied_llama(tiny_bert):
    """GQA with groups of 3, an explicit head_dim (heads * head_dim != hidden) and tied embeddings."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return transformers.AutoTokenizer.from_pretrained(tiny_bert)


def batches(tokenizer, kind: str, n: int = 2, size: int = 6) -> list[dict]:
    collate = Collator(tokenizer, max_length=16, kind=kind)
    rows = [{"text": t, "label": y} for t, y in tiny_texts(n * size, seed=3)]
    return [collate(rows[i * size:(i + 1) * size]) for i in range(n)]


def logits(model, batch) -> torch.Tensor:
    kwargs = {"use_cache": False} if model.config.model_type == "llama" else {}
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits


def loss_fn(kind: str):
    return task_kind(kind).loss


# ---------------------------------------------------------------- masked references


def kept_columns(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which columns of ``original`` (out, n) survive in ``pruned`` (out, m), found by exact equality."""
    return [next(i for i in range(original.shape[1]) if torch.equal(original[:, i], pruned[:, j])) for j in range(pruned.shape[1])]


def masked_reference(original, report, pruned) -> torch.nn.Module:
    """A copy of the original with removed heads' o columns and removed neurons' output columns zeroed,
    and removed blocks skipped (a forward hook returning the block's input)."""
    ref = copy.deepcopy(original)
    kept_layers = [i for i in range(arch.num_layers(ref)) if i not in report["layers"]]
    for new, old in enumerate(kept_layers):
        att = arch.attention(ref, old)
        for h in report["heads"].get(str(old), []):
            att.o.weight.data[:, h * att.head_dim:(h + 1) * att.head_dim] = 0
        out = arch.ffn(ref, old).output
        if str(old) in report["ffn"]:
            kept = kept_columns(out.weight.data, arch.ffn(pruned, new).output.weight.data)
            removed = [i for i in range(out.in_features) if i not in kept]
            assert len(removed) == report["ffn"][str(old)]
            out.weight.data[:, removed] = 0
    for i in report["layers"]:
        arch.layers(ref)[i].register_forward_hook(lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
    return ref


def check_prune(model, tokenizer, kind, **kw) -> dict:
    """Prune a copy; assert it is smaller and computes exactly what the masked original computes."""
    original = copy.deepcopy(model)
    report = prune_structured_(model, **kw)
    assert report["parameters_after"] == parameter_count(model) < parameter_count(original) == report["parameters_before"]
    assert report["block_parameters_after"] == parameter_count(arch.layers(model)) < report["block_parameters_before"]
    assert report["parameters_before"] - report["parameters_after"] == report["block_parameters_before"] - report["block_parameters_after"]
    assert json.loads(json.dumps(report)) == report
    ref = masked_reference(original, report, model)
    for batch in batches(tokenizer, kind):
        torch.testing.assert_close(logits(model, batch), logits(ref, batch), atol=1e-5, rtol=1e-5)
    return report


# ---------------------------------------------------------------- rounding and selection


def test_removal_count_floors_and_is_exact_on_products():
    assert removal_count(0.25, 12) == 3
    assert removal_count(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    assert removal_count(0.3, 2) == 0
    assert removal_count(0.99, 2) == 1


def test_heads_to_remove_takes_the_same_count_from_every_group():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0])  # two groups of three
    assert heads_to_remove(scores, kv_heads=2, per_group=1) == [1, 3]
    assert heads_to_remove(scores, kv_heads=1, per_group=2) == [1, 3]  # MHA: lowest in the whole block


# ---------------------------------------------------------------- BERT


def test_bert_heads_ffn_layers_equal_masked_original(bert, tokenizer):
    report = check_prune(bert, tokenizer, "classification", heads=0.5, ffn=0.5, layers=[1], importance="weight")
    assert report["layers"] == [1] and list(report["heads"]) == ["0"] and len(report["heads"]["0"]) == 1
    assert bert.config.num_hidden_layers == 1 and bert.config.intermediate_size == 32
    assert bert.config.num_attention_heads == 2  # the BERT config cannot express fewer heads
    att = arch.attention(bert, 0)
    assert (att.heads, att.kv_heads, att.q.weight.shape, att.o.weight.shape) == (1, 1, (16, 32), (32, 16))
    assert report["module_attrs"] == {"bert.encoder.layer.0.attention.self": {"num_attention_heads": 1, "all_head_size": 16}}


@pytest.mark.parametrize("method", ["gradient", "activation"])
def test_bert_data_driven_pruning_equals_masked_original(bert, tokenizer, method):
    report = check_prune(bert, tokenizer, "classification", heads=0.5, ffn=0.25, layers=1, importance=method,
                         batches=batches(tokenizer, "classification"), loss_fn=loss_fn("classification"))
    assert len(report["layers"]) == 1 and len(report["layer_scores"]) == 2
    assert report["layer_score"] == {"gradient": "gradient", "activation": "block_influence"}[method]


def test_bert_head_pruned_artifact_round_trips_through_slimtune_load(bert, tokenizer, tmp_path):
    report = prune_structured_(bert, heads=0.5, ffn=0.5, importance="weight")
    task = TaskConfig(kind="classification", data="unused.csv")
    Artifact(model=bert, tokenizer=tokenizer, task=task, module_attrs=report["module_attrs"]).save(tmp_path / "a")
    loaded = slimtune.load(tmp_path / "a").model
    assert arch.attention(loaded, 1).heads == 1
    for batch in batches(tokenizer, "classification"):
        torch.testing.assert_close(logits(loaded, batch), logits(bert, batch), atol=0, rtol=0)


def test_bert_ffn_and_layer_pruning_reload_with_plain_transformers(bert, tokenizer, tmp_path):
    report = prune_structured_(bert, ffn=0.5, layers=[0], importance="weight")
    assert report["module_attrs"] == {}
    Artifact(model=bert, tokenizer=tokenizer, task=TaskConfig(kind="classification", data="x.csv")).save(tmp_path / "a")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "a").eval()
    assert plain.config.num_hidden_layers == 1 and plain.config.intermediate_size == 32
    for batch in batches(tokenizer, "classification"):
        torch.testing.assert_close(logits(plain, batch), logits(bert, batch), atol=0, rtol=0)


# ---------------------------------------------------------------- Llama (GQA, tied embeddings)


def test_llama_gqa_heads_ffn_layers_equal_masked_original(llama, tokenizer):
    report = check_prune(llama, tokenizer, "causal-lm", heads=0.5, ffn=0.5, layers=1, importance="gradient",
                         batches=batches(tokenizer, "causal-lm"), loss_fn=loss_fn("causal-lm"))
    kept = str(1 - report["layers"][0])
    assert [h // 2 for h in report["heads"][kept]] == [0, 1]  # one query head from each kv group
    config = llama.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 2, 8)
    assert (config.intermediate_size, config.num_hidden_layers) == (32, 1)
    assert report["module_attrs"] == {}


def test_tied_llama_stays_tied_and_reloads_with_plain_transformers(tied_llama, tokenizer, tmp_path):
    embed = tied_llama.model.embed_tokens.weight
    report = check_prune(tied_llama, tokenizer, "causal-lm", heads=0.34, ffn=0.25, layers=[2], importance="weight")
    assert all(len(r) == 2 for r in report["heads"].values())  # floor(0.34 * 3) = 1 query head per group of 3
    assert (tied_llama.config.num_attention_heads, tied_llama.config.num_key_value_heads) == (4, 2)
    assert tied_llama.lm_head.weight is tied_llama.model.embed_tokens.weight is embed
    Artifact(model=tied_llama, tokenizer=tokenizer, task=TaskConfig(kind="causal-lm", data="x.csv")).save(tmp_path / "a")
    for loaded in (slimtune.load(tmp_path / "a").model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()):
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        for batch in batches(tokenizer, "causal-lm"):
            torch.testing.assert_close(logits(loaded, batch), logits(tied_llama, batch), atol=0, rtol=0)


@pytest.fixture
def mha_llama():
    torch.manual_seed(2)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_mha_llama_removes_heads_with_their_key_value_heads(mha_llama, tokenizer):
    check_prune(mha_llama, tokenizer, "causal-lm", heads=0.5, importance="weight")
    assert (mha_llama.config.num_attention_heads, mha_llama.config.num_key_value_heads) == (2, 2)
    assert arch.attention(mha_llama, 0).k.weight.shape == (16, 32)


def test_a_head_count_the_llama_config_refuses_is_named_before_any_surgery(mha_llama):
    before = parameter_count(mha_llama)
    with pytest.raises(SlimTuneError, match=r"(?s)^heads: keeping 3 of 4.*use heads: 0\.5"):
        prune_structured_(mha_llama, heads=0.25, ffn=0.5, importance="weight")
    assert parameter_count(mha_llama) == before


# ---------------------------------------------------------------- importance scores


def test_weight_importance_matches_direct_norms(llama):
    scores = imp.weight_scores(llama)
    for i in range(arch.num_layers(llama)):
        att, ffn = arch.attention(llama, i), arch.ffn(llama, i)
        d, group = att.head_dim, att.heads // att.kv_heads
        for h in range(att.heads):
            kv = h // group
            parts = [att.q.weight[h * d:(h + 1) * d], att.k.weight[kv * d:(kv + 1) * d],
                     att.v.weight[kv * d:(kv + 1) * d], att.o.weight[:, h * d:(h + 1) * d]]
            torch.testing.assert_close(scores.heads[i][h], torch.linalg.norm(torch.cat([p.flatten() for p in parts])))
        for j in range(ffn.output.in_features):
            parts = [w.weight[j] for w in ffn.inputs] + [ffn.output.weight[:, j]]
            torch.testing.assert_close(scores.neurons[i][j], torch.linalg.norm(torch.cat(parts)))


def test_gradient_importance_ranks_a_silenced_head_lowest(bert, tokenizer):
    att = arch.attention(bert, 0)
    att.o.weight.data[:, att.head_dim:] = 0  # head 1 of block 0 no longer reaches the output
    flags = [p.requires_grad for p in bert.parameters()]
    scores = imp.gradient_scores(bert, batches(tokenizer, "classification"), loss_fn("classification"), layers=True)
    assert all(torch.isfinite(s).all() for s in scores.heads + scores.neurons + [scores.layers])
    assert scores.heads[0][1] == 0 < scores.heads[0][0]
    assert [p.requires_grad for p in bert.parameters()] == flags and all(p.grad is None for p in bert.parameters())
    report = prune_structured_(bert, heads=0.5, batches=batches(tokenizer, "classification"), loss_fn=loss_fn("classification"))
    assert report["heads"]["0"] == [1]


def test_activation_importance_ranks_a_silent_head_and_an_identity_block_lowest(llama, tokenizer):
    att = arch.attention(llama, 1)
    att.v.weight.data[:att.head_dim] = 0  # kv head 0: query heads 0 and 1 of block 1 read zeros
    scores = imp.activation_scores(llama, batches(tokenizer, "causal-lm"), layers=True)
    assert scores.heads[1][0] == scores.heads[1][1] == 0 < scores.heads[1][2:].min()
    arch.attention(llama, 0).o.weight.data.zero_()
    arch.ffn(llama, 0).output.weight.data.zero_()  # block 0 now adds nothing to the residual stream
    for method in ("activation", "gradient"):
        report = prune_structured_(copy.deepcopy(llama), layers=1, importance=method,
                                   batches=batches(tokenizer, "causal-lm"), loss_fn=loss_fn("causal-lm"))
        assert report["layers"] == [0] and report["layer_scores"][0] < 1e-6 < report["layer_scores"][1]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, field", [
    ({"heads": 1.0}, "heads"), ({"heads": -0.1}, "heads"), ({"ffn": 1.5}, "ffn"), ({"ffn": "half"}, "ffn"),
    ({"layers": 2}, "layers"), ({"layers": [0, 1]}, "layers"), ({"layers": [5]}, "layers"), ({"layers": -1}, "layers"),
    ({"importance": "taylor"}, "importance"), ({"heads": 0.5, "importance": "gradient"}, "batches"),
    ({"ffn": 0.5, "importance": "activation"}, "batches"), ({"layers": 1, "importance": "weight"}, "layers"),
])
def test_bad_input_names_the_field_and_changes_nothing(bert, kw, field):
    before = parameter_count(bert)
    with pytest.raises(SlimTuneError, match=f"^{field}:"):
        prune_structured_(bert, **{"importance": "weight", **kw})
    assert parameter_count(bert) == before and bert.config.num_hidden_layers == 2


def test_gradient_without_loss_fn_names_loss_fn(bert, tokenizer):
    with pytest.raises(SlimTuneError, match="^loss_fn:"):
        prune_structured_(bert, heads=0.5, batches=batches(tokenizer, "classification"))


def test_unknown_architecture_is_refused():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20))
    with pytest.raises(arch.UnknownArchitecture, match="gpt2"):
        prune_structured_(model, heads=0.5, importance="weight")


# ---------------------------------------------------------------- gradient importance, per example


def unit_gates(model, examples=None):
    """Gates of ones on every head (input of o), neuron (input of the FFN output) and block update, written
    independently of importance.py: shape (units,) shared by the whole batch. Returns ({kind: [per block]}, handles)."""
    n = arch.num_layers(model)
    atts, outs = [arch.attention(model, i) for i in range(n)], [arch.ffn(model, i).output for i in range(n)]
    gates = {"heads": [torch.ones(a.heads, requires_grad=True) for a in atts],
             "neurons": [torch.ones(o.in_features, requires_grad=True) for o in outs],
             "layers": [torch.ones((), requires_grad=True) for _ in range(n)]}
    handles = [a.o.register_forward_pre_hook(lambda m, args, g=g, d=a.head_dim: (args[0] * torch.repeat_interleave(g, d),))
               for a, g in zip(atts, gates["heads"])]
    handles += [o.register_forward_pre_hook(lambda m, args, g=g: (args[0] * g,)) for o, g in zip(outs, gates["neurons"])]

    def block_hook(g):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            new = x_in + g * (x_out - x_in)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles += [b.register_forward_hook(block_hook(g), with_kwargs=True) for b, g in zip(arch.layers(model), gates["layers"])]
    return gates, handles


def summed_loss_gate_grads(model, batch, kind) -> dict[str, list[torch.Tensor]]:
    """d(summed loss of ``batch``)/d(gate) for every unit-gate: the example's own gradient when the batch has one row."""
    gates, handles = unit_gates(model)
    try:
        loss, n = loss_fn(kind)(model, batch)
        flat = [g for gs in gates.values() for g in gs]
        grads = iter(torch.autograd.grad(loss * n, flat))
    finally:
        for h in handles:
            h.remove()
    return {k: [next(grads) for _ in gs] for k, gs in gates.items()}


def stack(scores: imp.Scores) -> torch.Tensor:
    return torch.cat([*scores.heads, *scores.neurons, scores.layers.reshape(-1)])


@pytest.mark.parametrize("family, kind", [("bert", "classification"), ("llama", "causal-lm")])
def test_gradient_importance_equals_a_loop_over_single_examples(family, kind, tokenizer, request):
    model = request.getfixturevalue(family)
    data = batches(tokenizer, kind, n=2, size=3)
    scores = imp.gradient_scores(model, data, loss_fn(kind), layers=True)
    expected = None
    for batch in data:
        for b in range(len(batch["input_ids"])):
            one = {k: v[b:b + 1] for k, v in batch.items()}  # same padding columns, so the same tokens are seen
            grads = summed_loss_gate_grads(model, one, kind)
            expected = {k: [g.abs() for g in gs] if expected is None else [e + g.abs() for e, g in zip(expected[k], gs)]
                        for k, gs in grads.items()}
    reference = torch.cat([*expected["heads"], *expected["neurons"], torch.stack(expected["layers"])])
    # fp32 throughout; the batched and the one-example runs differ only in GEMM shapes (summation order), ~1e-6
    # relative per op through two tiny blocks and their backward. Summed |grad|s are positive (no cancellation in
    # the final sum), so 1e-4 relative holds with room; atol covers units whose gradient is ~0 against the largest.
    torch.testing.assert_close(stack(scores), reference, rtol=1e-4, atol=1e-5 * float(reference.max()))


def test_gradient_importance_does_not_let_opposite_examples_cancel(bert, tokenizer):
    """One input twice, labelled 0 and 1. For two-class cross-entropy the two examples' gate gradients are
    p1 * (J1 - J0) and -p0 * (J1 - J0) (J_c = d logit_c / d gate), so per example the scores are
    (p0 + p1) |J1 - J0| = |J1 - J0|, while the per-batch |sum| is |p1 - p0| times that: nearly cancelled."""
    one = batches(tokenizer, "classification", n=1, size=1)[0]
    pair = {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in one.items()}
    pair["labels"] = torch.tensor([0, 1])
    scores = stack(imp.gradient_scores(bert, [pair], loss_fn("classification"), layers=True))
    per_batch = summed_loss_gate_grads(bert, pair, "classification")
    per_batch = torch.cat([*per_batch["heads"], *per_batch["neurons"], torch.stack(per_batch["layers"])]).abs()
    p = torch.softmax(logits(bert, one)[0], -1)
    gap = float((p[1] - p[0]).abs())
    assert gap < 0.5  # the untrained classifier is unsure, so the per-batch score loses over half of every unit's score
    # fp32 roundoff as in the loop test above; the identity is exact in real arithmetic.
    torch.testing.assert_close(per_batch, gap * scores, rtol=1e-4, atol=1e-5 * float(scores.max()))
    assert (scores > 0).all() and (per_batch < 0.5 * scores).all()
