"""AWQ (slimtune.compress.quant.awq): scale folding keeps the float model, the scale and clipping
searches beat RTN where activations have salient channels, and awq_quantize_ swaps exactly the
requested linears.

On tiny *random* models (no outlier channels) AWQ and RTN tie within noise
(about +-0.6 dB end to end, either way), so the end-to-end comparisons give
the models a few salient channels, as real LLM activations have (the premise
of the AWQ paper): a few norm weights (Llama) or value rows (BERT) x20.
"""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune.errors import SlimTuneError
from slimtune import arch
from slimtune.compress.quant import awq as awq_module
from slimtune.compress.quant.awq import (InputStats, awq_quantize_, awq_scale, clip_search, fold_scale_, quantized_error,
                                        search_scale)
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.rtn import QuantScheme, fake_quantize
from tests.compress.models import bert, llama

G32 = QuantScheme(4, 32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add overhead (and oversubscribe a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama_mha(layers: int = 2, seed: int = 0) -> nn.Module:
    """A tiny Llama without grouped-query attention, so v_proj -> o_proj folds."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def batches(seed: int, n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 40, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 11:] = 0  # some padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@torch.no_grad()
def outputs(model: nn.Module, data: list[dict]) -> torch.Tensor:
    """Llama: the logits; BERT: the encoder's last hidden state (a random 2-class head's 32 logits are too few to compare)."""
    if arch.family_of(model).name == "bert":
        return torch.cat([model.base_model(**b).last_hidden_state.flatten() for b in data])
    return torch.cat([model(**b).logits.flatten() for b in data])


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()))


def block_linears(model: nn.Module) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(b)]}.{rel}" for b in arch.layers(model) for rel, m in b.named_modules() if isinstance(m, nn.Linear)]


def rtn_(model: nn.Module, schemes: dict) -> None:
    for name, scheme in schemes.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, QuantLinear.from_linear(getattr(owner, attr), scheme))


@torch.no_grad()
def salient_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Two salient input channels per norm (Llama) or per value output (BERT), x20."""
    g = torch.Generator().manual_seed(100 + seed)
    for name, module in model.named_modules():
        if name.endswith(("input_layernorm", "post_attention_layernorm")):
            module.weight[torch.randperm(module.weight.numel(), generator=g)[:2]] *= 20
        if name.endswith("attention.self.value"):
            rows = torch.randperm(module.out_features, generator=g)[:2]
            module.weight[rows] *= 20
            module.bias[rows] *= 20
    return model


@torch.no_grad()
def perturb_(model: nn.Module) -> nn.Module:
    """Non-trivial biases and norm weights (a fresh model has zero biases and unit norm weights)."""
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name.lower():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


# --- folding ---------------------------------------------------------------------

@pytest.mark.parametrize("make, foldable", [(bert, 1), (llama, 3), (llama_mha, 4)])
def test_folding_keeps_the_float_model(make, foldable):
    model = perturb_(make(2))
    data = batches(0)
    before = outputs(model, data)
    g = torch.Generator().manual_seed(1)
    for i, block in enumerate(arch.layers(model)):
        groups = [grp for grp in arch.input_groups(model, i) if grp.prev is not None]
        assert len(groups) == foldable
        for grp in groups:
            k = block.get_submodule(grp.linears[0]).in_features
            s = torch.exp(torch.randn(k, generator=g))  # (K,) scales over ~e^+-3
            fold_scale_(block.get_submodule(grp.prev), grp.kind, [block.get_submodule(r) for r in grp.linears], s)
    after = outputs(model, data)
    assert (after - before).abs().max() <= 1e-5 * max(1.0, before.abs().max())


def test_bert_layernorm_is_not_foldable():
    """BERT is post-LN: a LayerNorm's output is also the residual, so folding into it would change the model."""
    model = bert(2)
    data = batches(0)
    before = outputs(model, data)
    block = arch.layers(model)[0]
    s = torch.exp(torch.randn(32, generator=torch.Generator().manual_seed(1)))
    fold_scale_(block.get_submodule("attention.output.LayerNorm"), "norm", [block.get_submodule("intermediate.dense")], s)
    assert (outputs(model, data) - before).abs().max() > 1e-2
    assert [g.prev for g in arch.input_groups(model, 0)] == [None, "attention.self.value", None, None]


# --- the search on one linear -------------------------------------------------------

@pytest.mark.parametrize("scheme, k", [(G32, 80), (QuantScheme(4, 64, symmetric=False), 128), (QuantScheme(8, None), 50),
                                       (QuantScheme(4, None, symmetric=False), 33)])
def test_fast_fake_quantize_is_rtn(scheme, k):
    w = torch.randn(17, k, generator=torch.Generator().manual_seed(k)) * 0.05
    group_size = scheme.groups_of(k)
    assert torch.equal(awq_module.fake_quantize(w, scheme, group_size), fake_quantize(w, scheme, group_size))


def test_alpha_zero_is_rtn():
    x_mean = torch.rand(64) * 5
    assert torch.equal(awq_scale(x_mean, 0.0), torch.ones(64))
    s = awq_scale(x_mean, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))


def direct_error(x, w, scheme, s=None, max_val=None):
    """Reference: the mean squared output error replayed on the rows of ``x``, group by group."""
    s = torch.ones(w.shape[1]) if s is None else s
    ws = w * s
    if max_val is not None:
        size = scheme.group_size
        ws = torch.cat([ws[:, j * size:(j + 1) * size].clamp(-m[:, None], m[:, None]) for j, m in enumerate(max_val.T)], 1)
    wq = fake_quantize(ws, scheme, scheme.group_size)
    return float((x @ w.T - (x / s) @ wq.T).pow(2).mean())


def gram(x: torch.Tensor) -> torch.Tensor:
    stats = InputStats(x.shape[1])
    stats.add_batch(x)
    return stats.finalize()[1]


def test_gram_error_matches_replayed_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 150, 80, generator=g)  # (B, T, K): K = 80 leaves a short last group of 16
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 100:] = 0
    stats = InputStats(80)
    stats.add_batch(x, mask)
    x_mean, H = stats.finalize()
    rows = x[mask.bool()]  # (n, K)
    assert torch.allclose(x_mean, rows.abs().mean(0), atol=1e-6) and torch.allclose(H, rows.T @ rows / len(rows), atol=1e-5)
    w = torch.randn(24, 80, generator=g) * 0.02
    s = torch.exp(torch.randn(80, generator=g))
    max_val = 0.8 * (w * s).abs().amax(1, keepdim=True).expand(24, 3)
    for args in ((None, None), (s, None), (s, max_val)):
        assert float(quantized_error(H, w, G32, *args)) == pytest.approx(direct_error(rows, w, G32, *args), rel=1e-4)


def test_search_beats_rtn_on_salient_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=g)  # (n, K)
    x[:, torch.randperm(128, generator=g)[:4]] *= 30  # salient input channels
    w = torch.randn(96, 128, generator=g) * 0.02  # (N, K)
    calib, held_out = x[:512], x[512:]
    alpha, s = search_scale(gram(calib), calib.abs().mean(0), [w], [G32])
    assert alpha > 0
    # on held-out rows: the rounding error on the salient channels dominates RTN's error
    assert direct_error(held_out, w, G32, s) < 0.5 * direct_error(held_out, w, G32)


def test_clip_search_never_worse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 96, generator=g)  # (n, K): 96 = 3 groups of 32
    w = torch.randn(8, 96, generator=g) * 0.02
    w[torch.arange(8), torch.randint(0, 96, (8,), generator=g)] *= 8  # an outlier weight per row
    max_val = clip_search(gram(x), w, G32)  # (N, G)
    org_max = w.abs().reshape(8, 3, 32).amax(-1)
    assert max_val.shape == (8, 3) and (max_val <= org_max).all() and (max_val > 0.5 * org_max).all()
    assert (max_val < org_max).any()
    assert direct_error(x, w, G32, max_val=max_val) < direct_error(x, w, G32)


# --- awq_quantize_ ------------------------------------------------------------------

@pytest.mark.parametrize("listed, unlisted", [("self_attn.q_proj", ("self_attn.k_proj", "self_attn.v_proj")),
                                               ("mlp.gate_proj", ("mlp.up_proj",))])
def test_swaps_exactly_the_listed_linears_and_folds_the_unlisted(listed, unlisted):
    """One linear of an input group of block 0 is listed: the others share its input, are scaled but
    stay float, and still compute the float model's outputs."""
    model = llama(2)
    schemes = {f"model.layers.0.{listed}": G32, "model.layers.1.mlp.down_proj": QuantScheme(8, None), "lm_head": G32}
    float_model = copy.deepcopy(model)
    report = awq_quantize_(model, batches(0), schemes)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(schemes) and set(report) == set(schemes)
    assert report["lm_head"]["method"] == "rtn" and report["lm_head"]["alpha"] is None
    assert report[f"model.layers.0.{listed}"]["method"] == "awq" and report[f"model.layers.0.{listed}"]["alpha"] is not None
    assert model.get_submodule("model.layers.1.mlp.down_proj").bits == 8
    unlisted = [f"model.layers.0.{u}" for u in unlisted]
    assert any(not torch.equal(model.get_submodule(n).weight, float_model.get_submodule(n).weight) for n in unlisted)
    for name in unlisted:
        assert torch.allclose(_output_of(model, name), _output_of(float_model, name), atol=1e-5), name


def _output_of(model: nn.Module, name: str) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out))
    outputs(model, batches(1))
    handle.remove()
    return torch.cat([t.flatten() for t in seen])


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("make", [bert, llama, llama_mha])
def test_awq_beats_rtn(make, clip):
    model = salient_(make(2))
    schemes = {name: G32 for name in block_linears(model)}
    calib, held_out = batches(0), batches(1)
    awq, rtn = copy.deepcopy(model), copy.deepcopy(model)
    report = awq_quantize_(awq, calib, schemes, clip=clip)
    rtn_(rtn, schemes)
    assert {n for n, m in awq.named_modules() if isinstance(m, QuantLinear)} == set(schemes)
    for data in (calib, held_out):
        ref = outputs(model, data)
        assert sqnr(ref, outputs(awq, data)) > sqnr(ref, outputs(rtn, data))
    names = {id(m): n for n, m in model.named_modules()}
    foldable = {f"{names[id(b)]}.{rel}" for i, b in enumerate(arch.layers(model))
                for g in arch.input_groups(model, i) if g.prev is not None for rel in g.linears}
    assert {n for n, r in report.items() if r["alpha"] is not None} == foldable
    searched = [r for r in report.values() if r["method"] == "awq"]
    assert searched and all(r["loss_rtn"] is not None for r in report.values())
    assert sum(r["loss_awq"] for r in searched) < sum(r["loss_rtn"] for r in searched)


def test_shared_parameters_are_not_rescaled():
    """Cross-layer sharing: a norm two blocks hold must not absorb one block's scale."""
    model = llama(2)
    blocks = arch.layers(model)
    blocks[1].input_layernorm.weight = blocks[0].input_layernorm.weight
    report = awq_quantize_(model, batches(0), {name: G32 for name in block_linears(model)}, clip=False)
    for i in (0, 1):
        assert report[f"model.layers.{i}.self_attn.q_proj"]["alpha"] is None
        assert report[f"model.layers.{i}.mlp.gate_proj"]["alpha"] is not None
    assert blocks[1].input_layernorm.weight is blocks[0].input_layernorm.weight
    assert torch.equal(blocks[0].input_layernorm.weight, torch.ones(32))  # untouched


# --- bad input --------------------------------------------------------------------------

def test_bad_input():
    model = llama(1)
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(SlimTuneError, match="calibration"):
        awq_quantize_(model, [], {name: G32})
    with pytest.raises(SlimTuneError, match="not a linear"):
        awq_quantize_(model, batches(0), {"model.layers.0.input_layernorm": G32})
    with pytest.raises(SlimTuneError, match="no module"):
        awq_quantize_(model, batches(0), {"model.layers.0.nope": G32})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SlimTuneError, match="not a linear"):  # checked before the model is touched
        awq_quantize_(model, batches(0), {name: G32, "model.layers.0.mlp": G32})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    awq_quantize_(model, batches(0), {name: G32})
    with pytest.raises(SlimTuneError, match="already quantized"):
        awq_quantize_(model, batches(0), {name: G32})
