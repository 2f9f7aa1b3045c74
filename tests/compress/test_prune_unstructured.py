"""Unstructured pruning: exact sparsity (layer, global, N:M), Wanda against a reference, masks, schedule, prune_."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from slimtune.errors import SlimTuneError
from slimtune.tasks import Collator
from slimtune import arch
from slimtune.compress import apply_masks_, prune_
from slimtune.compress.prune.calibrate import calibrate
from slimtune.compress.prune.masks import keep_largest, nm_mask, parse_pattern, target_linears
from slimtune.compress.prune.schedule import GradualPruner, cubic_sparsity
from slimtune.compress.prune.magnitude import magnitude_scores
from slimtune.compress.prune.wanda import InputNorms, input_norms, wanda_masks, wanda_scores

from tests.compress import models
from tests.conftest import tiny_texts


def build(kind, request):
    path = request.getfixturevalue(kind)
    cls = AutoModelForCausalLM if kind == "tiny_llama" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    return cls.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def batches(tokenizer, kind="classification", n=3, size=4):
    texts = [{"text": t, "label": y} for t, y in tiny_texts(n * size, seed=1)]
    collate = Collator(tokenizer, 16, kind)
    return [collate(texts[i : i + size]) for i in range(0, len(texts), size)]


def weights(model, masks):
    return {name: model.get_submodule(name).weight.detach() for name in masks}


def zeros(w):
    return int((w == 0).sum())


def check_groups(w: torch.Tensor, n: int, m: int) -> None:
    """Every group of m consecutive inputs of every row has exactly m - n zeros."""
    groups = w.reshape(w.shape[0], -1, m)  # (out, in/m, m)
    assert torch.equal((groups == 0).sum(-1), torch.full(groups.shape[:2], m - n))


MODELS = ["tiny_bert", "tiny_llama"]


# ---------------------------------------------------------------- primitives

def test_keep_largest_is_exact_and_breaks_ties_by_position():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5], [2.0, 0.0, 2.0, 2.0, 2.0]])
    keep = keep_largest(scores, 2)
    assert keep.tolist() == [[True, True, False, False, False], [True, False, True, False, False]]
    assert keep_largest(torch.zeros(7), 3).tolist() == [True] * 3 + [False] * 4
    assert keep_largest(scores, 0).sum() == 0 and keep_largest(scores, 5).all()


@pytest.mark.parametrize("shape, levels", [((1, 1), 0), ((3, 17), 0), ((2, 64), 3), ((1, 1000), 7), ((4, 9), 1)])
def test_keep_largest_equals_a_stable_sort(shape, levels):
    """Against a stable descending sort (equal scores keep their order, so the lower index wins), with and
    without ties (``levels`` > 0 draws scores from that many values)."""
    g = torch.Generator().manual_seed(shape[1] + levels)
    scores = torch.randint(0, levels, shape, generator=g).float() if levels else torch.randn(shape, generator=g)
    for keep in {0, 1, shape[1] // 3, shape[1] // 2, shape[1] - 1, shape[1]}:
        order = torch.sort(-scores, dim=-1, stable=True).indices[..., :keep]
        expected = torch.zeros(shape, dtype=torch.bool).scatter_(-1, order, True)
        assert torch.equal(keep_largest(scores, keep), expected), keep


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "0:4", "2-4", "a:b", ""])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ValueError, match="N:M|N=|N < M"):
        parse_pattern(pattern)


def test_nm_needs_a_width_divisible_by_m():
    with pytest.raises(SlimTuneError, match="pattern"):
        nm_mask(torch.rand(3, 10), 2, 4)


def test_default_targets_are_the_block_linears_and_globs_choose(request):
    model, _ = build("tiny_bert", request)
    names = list(target_linears(model))
    assert len(names) == 2 * 6 and all(n.startswith("bert.encoder.layer.") for n in names)
    assert not any("classifier" in n or "pooler" in n or "embeddings" in n for n in names)
    attention = target_linears(model, include=["*.attention.*"], exclude=["*.output.dense"])
    assert sorted(attention) == sorted(n for n in names if "attention.self" in n)
    assert "classifier" in target_linears(model, include=["classifier"])
    with pytest.raises(SlimTuneError, match="no linear layer"):
        target_linears(model, include=["nothing*"])


# ---------------------------------------------------------------- exact sparsity

@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_magnitude_layerwise_hits_each_layer_exactly_and_keeps_the_largest(kind, sparsity, request):
    model, _ = build(kind, request)
    report = prune_(model, sparsity=sparsity)
    for name, w in weights(model, report["masks"]).items():
        assert zeros(w) == round(sparsity * w.numel()), name
        assert report["modules"][name] == zeros(w) / w.numel()
        assert torch.equal(w != 0, report["masks"][name])
    assert report["overall"] == pytest.approx(sparsity, abs=1e-3)


@pytest.mark.parametrize("kind", MODELS)
def test_magnitude_prunes_the_smallest_weights(kind, request):
    model, _ = build(kind, request)
    before = {n: m.weight.detach().clone() for n, m in target_linears(model).items()}
    masks = prune_(model, sparsity=0.5)["masks"]
    for name, w in before.items():
        assert w.abs()[masks[name]].min() >= w.abs()[~masks[name]].max(), name
        assert torch.equal(model.get_submodule(name).weight, w * masks[name])


@pytest.mark.parametrize("kind", MODELS)
def test_global_magnitude_hits_the_total_exactly_with_one_threshold(kind, request):
    model, _ = build(kind, request)
    before = {n: m.weight.detach().clone() for n, m in target_linears(model).items()}
    report = prune_(model, sparsity=0.6, scope="global")
    total = sum(w.numel() for w in before.values())
    assert report["zeros"] == sum(zeros(model.get_submodule(n).weight) for n in before) == round(0.6 * total)
    kept = torch.cat([w.abs()[report["masks"][n]] for n, w in before.items()])
    pruned = torch.cat([w.abs()[~report["masks"][n]] for n, w in before.items()])
    assert kept.min() >= pruned.max()
    assert len({round(f, 4) for f in report["modules"].values()}) > 1  # layers end up unevenly sparse


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_patterns_hold_group_by_group(kind, method, pattern, request):
    model, tokenizer = build(kind, request)
    data = batches(tokenizer, "causal-lm" if kind == "tiny_llama" else "classification")
    report = prune_(model, method=method, pattern=pattern, batches=data)
    n, m = parse_pattern(pattern)
    for name, w in weights(model, report["masks"]).items():
        check_groups(w, n, m)
    assert report["overall"] == 1 - n / m and report["target"] == 1 - n / m


@pytest.mark.parametrize("kind", MODELS)
def test_wanda_hits_each_output_row_exactly(kind, request):
    model, tokenizer = build(kind, request)
    data = batches(tokenizer, "causal-lm" if kind == "tiny_llama" else "classification")
    report = prune_(model, method="wanda", sparsity=0.5, batches=data)
    for name, w in weights(model, report["masks"]).items():
        assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), round(0.5 * w.shape[1]))), name
    assert report["overall"] == 0.5 and report["scope"] == "row"


# ---------------------------------------------------------------- Wanda against a direct computation

@pytest.mark.parametrize("out_features, in_features, tokens", [(5, 13, 7), (1, 9, 1), (17, 3, 4)])
def test_wanda_scores_and_masks_match_a_reference(out_features, in_features, tokens):
    g = torch.Generator().manual_seed(out_features * 100 + in_features)
    weight = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(3, tokens, in_features, generator=g)
    token_mask = torch.ones(3, tokens, dtype=torch.long)
    token_mask[1, tokens // 2 + 1 :] = 0  # padding must not count
    acc = InputNorms(in_features)
    acc.add_batch(x[:2], token_mask[:2])
    acc.add_batch(x[2:], token_mask[2:])
    real = torch.cat([x[b, : int(token_mask[b].sum())] for b in range(3)])  # (N, in)
    norms = torch.sqrt((real.double() ** 2).sum(0)).float()
    assert torch.allclose(acc.finalize(), norms, rtol=1e-6)
    scores = wanda_scores(weight, acc.finalize())
    reference = weight.abs() * norms[None, :]
    assert torch.allclose(scores, reference, rtol=1e-6)

    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    masks = wanda_masks({"w": linear}, {"w": norms}, sparsity=0.4)
    prune = round(0.4 * in_features)
    for i in range(out_features):
        lowest = set(torch.argsort(reference[i])[:prune].tolist())
        assert {j for j in range(in_features) if not masks["w"][i, j]} == lowest


def reference_sequential_wanda_(model, data, names, sparsity=None, pattern=None) -> dict:
    """The paper's sequential Wanda written out plainly: for block 0, 1, ..., then the targets outside the blocks,
    run the whole model (everything before already pruned) with hooks summing x^2 of each real token, then zero
    the lowest |W| * ||X|| of every row (or of every N:M group) by a full sort."""
    linears = {n: model.get_submodule(n) for n in names}
    groups = [[n for n, m in linears.items() if any(m is b for b in block.modules())] for block in arch.layers(model)]
    groups.append([n for n in names if not any(n in g for g in groups)])
    masks = {}
    for group in groups:
        sums = {n: torch.zeros(linears[n].in_features, dtype=torch.float64) for n in group}
        current = {}

        def hook(module, args, name):
            x = args[0][current["mask"]] if args[0].dim() == 3 else args[0]  # (N, in) real tokens
            sums[name].add_(x.double().square().sum(0))

        handles = [linears[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in group]
        with torch.no_grad():
            for b in data:
                current["mask"] = b["attention_mask"].bool()
                model(**{k: v for k, v in b.items() if k != "labels"})
        for h in handles:
            h.remove()
        for n in group:
            w = linears[n].weight.data
            keep, size = (parse_pattern(pattern)[0], parse_pattern(pattern)[1]) if pattern else (None, w.shape[1])
            drop = size - keep if pattern else round(sparsity * size)
            scores = (w.abs() * sums[n].sqrt().float()[None, :]).reshape(w.shape[0], -1, size)  # (out, groups, size)
            order = torch.argsort(scores, dim=-1)
            mask = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, order[..., :drop], False).reshape(w.shape)
            w.mul_(mask)
            masks[n] = mask
    return masks


SEQUENTIAL_CASES = [("bert", {"sparsity": 0.5}, None), ("llama", {"sparsity": 0.3}, None), ("llama", {"pattern": "2:4"}, None),
                    ("bert", {"sparsity": 0.5}, ["*.attention.self.value", "*.output.dense", "classifier"])]


@pytest.mark.parametrize("kind, target, include", SEQUENTIAL_CASES)
def test_wanda_scores_each_block_on_the_pruned_blocks_before_it(kind, target, include, tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = getattr(models, kind)(layers=3)
    data = batches(tokenizer, "causal-lm" if kind == "llama" else "classification")
    names = list(target_linears(model, include))
    dense, reference = copy.deepcopy(model), copy.deepcopy(model)
    masks = prune_(model, method="wanda", batches=data, include=include, **target)["masks"]
    expected = reference_sequential_wanda_(reference, data, names, **target)
    assert list(masks) == names
    for name in names:
        # Both compute the same fp32 block outputs on the same tokens; a mask could differ only on a score tie at
        # the threshold within float roundoff, which random weights do not produce: the masks must be equal.
        assert torch.equal(masks[name], expected[name]), name
        assert torch.equal(model.get_submodule(name).weight, reference.get_submodule(name).weight), name
        per_row = (~masks[name]).sum(1)
        if "sparsity" in target:
            assert torch.equal(per_row, torch.full_like(per_row, round(target["sparsity"] * masks[name].shape[1]))), name
        else:
            check_groups(model.get_submodule(name).weight, 2, 4)
    # The one-pass version (every norm from the dense model) agrees on block 0 only, so this test can tell them apart.
    modules = {n: dense.get_submodule(n) for n in names}
    one_pass = wanda_masks(modules, input_norms(dense, modules, data), target.get("sparsity"), target.get("pattern"))
    first = [n for n in names if any(modules[n] is m for m in arch.layers(dense)[0].modules())]
    assert first and all(torch.equal(one_pass[n], masks[n]) for n in first)
    assert any(not torch.equal(one_pass[n], masks[n]) for n in names if n not in first)


def test_calibration_hooks_see_the_real_tokens_of_the_first_layer_input(request):
    model, tokenizer = build("tiny_bert", request)
    data = batches(tokenizer)
    name = "bert.encoder.layer.0.attention.self.query"
    norms = input_norms(model, {name: model.get_submodule(name)}, data)[name]
    sum_sq = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for b in data:
            hidden = model.bert.embeddings(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"])  # (B, T, H)
            sum_sq += (hidden[b["attention_mask"].bool()].double() ** 2).sum(0)
    assert torch.allclose(norms, sum_sq.sqrt().float(), rtol=1e-5)
    assert all(not h for h in model.get_submodule(name)._forward_hooks.values())  # hooks removed


def test_calibration_feeds_one_accumulator_from_every_module_sharing_a_weight():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, input_ids, attention_mask):
            return self.b(self.a(input_ids))

    acc = InputNorms(4)
    calibrate(Two(), [{"input_ids": torch.randn(2, 3, 4), "attention_mask": torch.ones(2, 3)}], {"a": acc})
    assert acc.tokens == 12


# ---------------------------------------------------------------- masks and schedule

def test_apply_masks_keeps_pruned_weights_at_zero(request):
    model, _ = build("tiny_llama", request)
    masks = prune_(model, sparsity=0.5)["masks"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    name = next(iter(masks))
    assert zeros(model.get_submodule(name).weight) == 0
    apply_masks_(model, masks)
    assert all(zeros(w) == int((~masks[n]).sum()) for n, w in weights(model, masks).items())


def test_cubic_schedule_endpoints_and_monotonicity():
    values = [cubic_sparsity(t, 0.8, steps=20, initial=0.1, start=5) for t in range(40)]
    assert values[0] == values[5] == 0.1 and values[25] == values[39] == 0.8
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[6] - values[5] > values[25] - values[24]  # fast first, slow last
    assert math.isclose(cubic_sparsity(15, 0.8, 20, 0.1, 5), 0.8 + (0.1 - 0.8) * 0.5 ** 3)


def test_gradual_pruning_during_training_ends_exactly_at_the_target(request):
    model, tokenizer = build("tiny_llama", request)
    names = list(target_linears(model))
    pruner = GradualPruner(names, lambda name, w: magnitude_scores(w), final=0.7, steps=5, every=2, initial=0.1)
    pruner.start_(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(tokenizer, "causal-lm", n=2)
    for step in range(6):
        batch = data[step % 2]
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner(model)
        sparsity = sum(zeros(w) for w in weights(model, pruner.masks).values()) / sum(w.numel() for w in weights(model, pruner.masks).values())
        assert sparsity == pytest.approx(pruner.history[-1][1], abs=2e-3)
    assert [s for s, _ in pruner.history] == [0, 2, 4, 5]
    assert [v for _, v in pruner.history] == sorted(v for _, v in pruner.history) and pruner.history[-1][1] == 0.7
    for name, w in weights(model, pruner.masks).items():
        assert zeros(w) == round(0.7 * w.numel()), name


# ---------------------------------------------------------------- the Python verb

@pytest.mark.parametrize("kwargs, field", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"pattern": "4:2"}, "pattern"),
    ({"method": "random", "sparsity": 0.5}, "method"), ({"sparsity": 0.5, "heads": 0.5}, "heads"),
    ({"method": "structured", "sparsity": 0.5, "heads": 0.5}, "sparsity"), ({}, "sparsity"),
    ({"method": "wanda", "sparsity": 0.5, "scope": "global"}, "scope"), ({"pattern": "2:4", "scope": "global"}, "pattern"),
])
def test_prune_refuses_bad_arguments_naming_the_field(kwargs, field, request):
    model, _ = build("tiny_bert", request)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimTuneError, match=field):
        prune_(model, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_wanda_without_batches_is_refused(request):
    model, _ = build("tiny_bert", request)
    with pytest.raises(SlimTuneError, match="batches"):
        prune_(model, method="wanda", sparsity=0.5)


def test_prune_dispatches_to_structured_removal(request):
    model, _ = build("tiny_llama", request)
    before = sum(p.numel() for p in model.parameters())
    report = prune_(model, method="structured", ffn=0.5, importance="weight")
    assert report["method"] == "structured" and report["parameters_before"] == before
    assert sum(p.numel() for p in model.parameters()) == report["parameters_after"] < before
    assert model.config.intermediate_size == 32


def test_prune_report_prints_its_masks_as_a_summary():
    """Issue 13: printing prune_'s report used to dump every boolean mask tensor."""
    from slimtune.compress import prune_
    from tests.compress.models import bert as tiny_bert_model

    report = prune_(tiny_bert_model(layers=2), sparsity=0.5)
    text = repr(report)
    assert len(text) < 3000 and "tensor(" not in text
    assert "12 masks:" in text and "keeps 50.0%" in text
    assert all(m.dtype == torch.bool for m in report["masks"].values())  # still the masks themselves
