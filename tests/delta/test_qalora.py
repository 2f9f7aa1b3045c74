"""QA-LoRA (quant_aware LoRA) over INT4 bases: identity at init, only the delta trains, it is a LoRA whose A is
constant per group, and its merge into float zero points (packed format v2) is exact to float32 rounding, on
every CPU path, in ONNX Runtime, and through a recipe that reloads bit for bit.

Tolerances are elementwise bounds derived from what each side computes (Higham's standard model: every float32
operation rounds by a factor ``1 + delta``, ``|delta| <= u = 2^-24``; a result reached through n roundings is
within ``gamma_n = n u / (1 - n u)`` of its exact leaves, in any order), measured against the exact output
``y* = x (W + c*)^T + b`` computed in float64 (``W`` the base's exact weight, ``c*`` the update from the float32
A and B; float64's own rounding, ~2^-53 relative, is negligible).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn


import slimtune
from slimtune.compress import quantize_
from slimtune.compress.kernels import dispatch, reference
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.rtn import QuantScheme
from slimtune.delta import LoraLinear, add_lora_, deltas, load_delta_, merge_and_unload_, save_delta
from slimtune.delta.lora import requantize
from slimtune.delta.qalora import QALoraLinear, expand_groups, group_lengths, merge_error_bound
from slimtune.errors import SlimTuneError
from tests.conftest import recipe_text
from tests.delta.conftest import token_ids as _ids

U = 2.0**-24  # float32's unit roundoff


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _perturb(model, std=0.5, seed=7):
    """Nonzero B everywhere (fresh deltas are the identity); large enough to move zero points past the code range."""
    g = torch.Generator().manual_seed(seed)
    for _, w in deltas(model):
        w.lora_B.weight.data = torch.randn(w.lora_B.weight.shape, generator=g) * std


def _layer(k: int, n: int, scheme: QuantScheme, rank: int = 3, std: float = 3.0, seed: int = 0) -> QALoraLinear:
    torch.manual_seed(seed)
    wrapper = QALoraLinear(QuantLinear.from_linear(nn.Linear(k, n), scheme), rank=rank, alpha=2.0 * rank)
    wrapper.lora_B.weight.data.normal_(0, std)
    return wrapper


# -- bounds ------------------------------------------------------------------------------


def exact_weight(layer: QuantLinear) -> torch.Tensor:
    """``(q - z) s`` in float64 ``(N, K)``: exact (integer codes, float32 zero points and scales)."""
    k, g = layer.in_features, layer.group_size
    zeros = layer.zeros if layer.zeros is not None else torch.full_like(layer.scales, 8.0)
    codes = reference.unpack(layer.qweight, 4, k).double()
    return (codes - expand_groups(zeros.double(), g, k)) * expand_groups(layer.scales.double(), g, k)


def update_magnitude(wrapper: QALoraLinear) -> torch.Tensor:
    """``s |B| |A| / |g|`` expanded ``(N, K)``, float64: the scale of every rounding of the update."""
    quant = wrapper.base_layer
    lengths = group_lengths(quant.in_features, wrapper.group_size).double()
    ba = wrapper.lora_B.weight.detach().double().abs() @ wrapper.lora_A.weight.detach().double().abs()  # (N, G)
    return expand_groups(wrapper.scaling * ba / lengths, wrapper.group_size, quant.in_features)


def exact_output(wrapper: QALoraLinear, x: torch.Tensor) -> torch.Tensor:
    """``y* = x (W + c*)^T + b`` in float64 ``(M, N)``."""
    quant = wrapper.base_layer
    c = wrapper.scaling * (wrapper.lora_B.weight.detach().double() @ wrapper.lora_A.weight.detach().double())  # (N, G)
    c = expand_groups(c / group_lengths(quant.in_features, wrapper.group_size).double(), wrapper.group_size, quant.in_features)
    y = x.detach().double().reshape(-1, quant.in_features) @ (exact_weight(quant) + c).t()
    return y + quant.bias.detach().double() if quant.bias is not None else y


def _rounded_sum(bound: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """One float32 addition per part (the bias, the branch): ``u (|partial result| + bound)`` each."""
    return bound + sum(U * (p.abs() + bound) for p in parts)


def unmerged_bound(wrapper: QALoraLinear, x: torch.Tensor, y_star: torch.Tensor) -> torch.Tensor:
    """``|wrapper(x) - y*|``: the base's dequant-matmul (any CPU path: dispatch's bound against the reference, whose
    own float32 sum is within gamma_{K+1} of x W^T, gamma_{K+2} with float zero points), its bias add, the branch
    (pool: g - 1 sums and a division; A: G; B: r; the scaling: 1, so gamma_{g+G+r+1} of s |B| |A| pool(|x|)),
    and the branch's add."""
    quant = wrapper.base_layer
    k, r, groups = quant.in_features, wrapper.rank, wrapper.groups
    xa = x.detach().double().abs().reshape(-1, k)
    w = exact_weight(quant)
    e = dispatch.cpu_fast_path_error_bound(x, quant.qweight, quant.scales, quant.zeros, 4, quant.group_size, k)
    e = e + gamma(k + (2 if reference.float_zeros(quant.zeros) else 1)) * (xa @ w.abs().t())
    base = x.detach().double().reshape(-1, k) @ w.t()
    e = _rounded_sum(e, [base + quant.bias.detach().double()] if quant.bias is not None else [])
    e = e + gamma(wrapper.group_size + groups + r + 1) * (xa @ update_magnitude(wrapper).t())
    return _rounded_sum(e, [y_star])


def merged_bound(wrapper: QALoraLinear, merged: QuantLinear, x: torch.Tensor, y_star: torch.Tensor) -> torch.Tensor:
    """``|merged(x) - y*|``: the merged layer's dequant-matmul against ``x W'^T`` (as above, float zero points),
    ``W'`` against ``W + c`` (:func:`merge_error_bound`), the merge's float32 ``c`` against ``c*`` (B A: r
    roundings, the scaling and the division by |g|: gamma_{r+2}), and the bias add."""
    k = merged.in_features
    xa = x.detach().double().abs().reshape(-1, k)
    w_merged = exact_weight(merged)
    e = dispatch.cpu_fast_path_error_bound(x, merged.qweight, merged.scales, merged.zeros, 4, merged.group_size, k)
    e = e + gamma(k + 2) * (xa @ w_merged.abs().t())
    dw = merge_error_bound(merged.qweight, merged.scales, merged.zeros, wrapper.group_update(), merged.group_size, k)
    e = e + xa @ (dw + gamma(wrapper.rank + 2) * update_magnitude(wrapper)).t()
    return _rounded_sum(e, [y_star] if merged.bias is not None else [])


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor):
    err = (out.detach().double() - ref.detach().double()).abs().reshape(bound.shape)
    ratio = err / bound.clamp_min(1e-300)
    assert (ratio <= 1).all(), f"error {err.flatten()[ratio.argmax()]:.3g} > bound {bound.flatten()[ratio.argmax()]:.3g}"


# (K, N, scheme): ragged last groups, per channel with odd K, symmetric bases (zero point 8 becomes a float)
LAYERS = [(80, 48, QuantScheme(4, 32, False)), (96, 32, QuantScheme(4, 32, True)), (33, 48, QuantScheme(4, None, False)),
          (576, 16, QuantScheme(4, 128, True)), (160, 40, QuantScheme(4, 64, False))]
LAYER_IDS = ["k80-g32-asym", "k96-g32-sym", "k33-channel", "k576-g128-sym", "k160-g64-asym"]


# -- the module --------------------------------------------------------------------------


def test_fresh_qalora_is_identity_and_only_the_delta_trains(llama):
    quantize_(llama, bits=4, group_size=32)
    x = _ids(llama)
    ref = llama(input_ids=x).logits
    add_lora_(llama, "all-linear", rank=2, quant_aware=True)
    assert torch.equal(llama(input_ids=x).logits, ref)
    down = llama.model.layers[0].mlp.down_proj
    assert isinstance(down, QALoraLinear) and down.lora_A.weight.shape == (2, 2)  # K = 64: two groups of 32
    _perturb(llama)
    llama(input_ids=x).logits.square().mean().backward()
    got = {n for n, p in llama.named_parameters() if p.grad is not None}
    assert got and all("lora_" in n for n in got)
    assert {n for n, p in llama.named_parameters() if p.requires_grad} == got


@pytest.mark.parametrize("k, n, scheme", LAYERS, ids=LAYER_IDS)
def test_qalora_is_lora_with_a_constant_within_each_group(k, n, scheme):
    """QA-LoRA equals a LoraLinear over the dequantized float weight whose A repeats A[:, g] / |g| over group g.
    The float LoRA's error: addmm over K with W rounded once or twice (float zero points) and the bias, gamma_{K+3}
    of |x| |W| + |b|; its branch gamma_{K+r+2} (A / |g| rounded once, K, r, the scaling)."""
    wrapper = _layer(k, n, scheme)
    quant = wrapper.base_layer
    linear = nn.Linear(k, n)
    linear.weight.data, linear.bias.data = quant.dequantized_weight(), quant.bias.data.clone()
    lora = LoraLinear(linear, rank=wrapper.rank, alpha=wrapper.alpha)
    lengths = group_lengths(k, wrapper.group_size)
    lora.lora_A.weight.data = expand_groups(wrapper.lora_A.weight.data / lengths, wrapper.group_size, k)  # (r, K)
    lora.lora_B.weight.data = wrapper.lora_B.weight.data.clone()
    for m in (1, 7):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y_star = exact_output(wrapper, x)
        xa = x.double().abs()
        e_lora = gamma(k + 3) * (xa @ exact_weight(quant).abs().t() + quant.bias.double().abs())
        e_lora = _rounded_sum(e_lora + gamma(k + wrapper.rank + 2) * (xa @ update_magnitude(wrapper).t()), [y_star])
        assert_within(wrapper(x), lora(x), unmerged_bound(wrapper, x, y_star) + e_lora)


@pytest.mark.parametrize("k, n, scheme", LAYERS, ids=LAYER_IDS)
def test_merge_into_float_zero_points_is_exact(k, n, scheme):
    """Weights: |W' - (W + c)| within merge_error_bound, which is below 2^-12 of a step wherever |z'| < 2^10
    (u (|c| + s |z'| + 2 s |q - z'|) < 2^-24 s (3 * 2^10 + 32)); a rounded merge (RTN, the non-QA path) is far off.
    Outputs: the merged layer and the unmerged QA-LoRA agree within the sum of their bounds to y*, at M = 1
    (int4pack where N % 16 == 0 and K is even) and M = 7 (the exact path)."""
    wrapper = _layer(k, n, scheme)
    merged = wrapper.merged_quant_layer()
    assert merged.config()["zero_dtype"] == "float32" and not merged.scheme.symmetric
    assert torch.equal(merged.qweight, wrapper.base_layer.qweight) and torch.equal(merged.scales, wrapper.base_layer.scales)
    c = wrapper.group_update()  # (N, G) float32, what the merge added
    target = exact_weight(wrapper.base_layer) + expand_groups(c.double(), wrapper.group_size, k)
    bound = merge_error_bound(merged.qweight, merged.scales, merged.zeros, c, merged.group_size, k)
    assert ((exact_weight(merged) - target).abs() <= bound).all()
    assert merged.zeros.abs().max() < 2**10 and (bound < 2**-12 * expand_groups(merged.scales.double(), merged.group_size, k)).all()
    assert (merged.zeros < 0).any() or (merged.zeros > 15).any()  # the update moved some zero points past the codes
    rounded, _ = requantize(wrapper.base_layer, wrapper.merged_weight())
    assert ((exact_weight(rounded) - target).abs() > bound).any()  # the bound tells an exact merge from a rounded one
    for m in (1, 7):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(10 + m))
        y_star = exact_output(wrapper, x)
        with torch.no_grad():
            assert_within(merged(x), wrapper(x), merged_bound(wrapper, merged, x, y_star) + unmerged_bound(wrapper, x, y_star))
            assert not ((rounded(x).double() - wrapper(x).double()).abs()
                        <= merged_bound(wrapper, merged, x, y_star) + unmerged_bound(wrapper, x, y_star)).all()


def test_bad_bases_are_refused(llama):
    with pytest.raises(SlimTuneError, match="needs a quantized base"):
        add_lora_(llama, "query", rank=2, quant_aware=True)
    assert not deltas(llama)
    int8 = QuantLinear.from_linear(nn.Linear(32, 16), QuantScheme(8, None, True))
    with pytest.raises(SlimTuneError, match="INT4 weights only") as err:
        QALoraLinear(int8, rank=2)
    assert "bits: 4" in err.value.hint
    int4 = QuantLinear.from_linear(nn.Linear(32, 16), QuantScheme(4, 32, False))
    with pytest.raises(SlimTuneError, match="DoRA"):
        QALoraLinear(int4, rank=2, dora=True)
    with pytest.raises(SlimTuneError, match="rank 40 does not fit"):
        QALoraLinear(int4, rank=40)
    nested = QALoraLinear(QALoraLinear(int4, rank=2, name="inner"), rank=2)
    with pytest.raises(SlimTuneError, match="another delta sits between"):
        nested.merged_quant_layer()


def test_float_zero_config_rebuilds_and_refuses_a_mismatched_file():
    """A merged layer's config records zero_dtype; a config without it (format v1) builds uint8 zeros and
    refuses float ones instead of truncating them."""
    merged = _layer(80, 48, QuantScheme(4, 32, True)).merged_quant_layer()
    rebuilt = QuantLinear.from_config(merged.config())
    rebuilt.load_state_dict(merged.state_dict())
    assert torch.equal(rebuilt.dequantized_weight(), merged.dequantized_weight())
    assert rebuilt.zeros.dtype == torch.float32 and "float32 zeros" in repr(rebuilt)
    assert rebuilt.half().zeros.dtype == torch.float32  # a dtype cast keeps the format
    v1 = QuantLinear.from_config({**merged.config(), "zero_dtype": "uint8"})
    with pytest.raises(SlimTuneError, match="zeros holds torch.float32 zero points"):
        v1.load_state_dict(merged.state_dict())
    with pytest.raises(SlimTuneError, match="float zero points need asymmetric 4-bit"):
        QuantLinear(32, 8, 4, 32, symmetric=True, zero_dtype="float32")


# -- on a model ------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_merge_and_unload_is_exact_on_every_layer(llama, symmetric):
    """Every QA-LoRA of a tiny Llama: the merged layer, fed the input its unmerged form saw, gives that
    form's output within the two bounds."""
    quantize_(llama, bits=4, group_size=32, symmetric=symmetric)
    add_lora_(llama, "all-linear", rank=2, quant_aware=True)
    _perturb(llama, 0.3)
    seen = {}
    wrappers = dict(deltas(llama))
    hooks = [w.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0].detach(), out.detach())))
             for n, w in wrappers.items()]
    with torch.no_grad():
        llama(input_ids=_ids(llama))
    for h in hooks:
        h.remove()
    report = merge_and_unload_(llama, "default")
    assert report["merged_exactly"] == report["layers"] == 14 and report["requantized"] == 0
    for name, wrapper in wrappers.items():
        merged = llama.get_submodule(name)
        assert isinstance(merged, QuantLinear) and merged.zero_dtype == "float32"
        x, out = seen[name]
        x2 = x.reshape(-1, x.shape[-1])
        y_star = exact_output(wrapper, x2)
        with torch.no_grad():
            assert_within(merged(x2), out.reshape(x2.shape[0], -1),
                          merged_bound(wrapper, merged, x2, y_star) + unmerged_bound(wrapper, x2, y_star))


def test_recipe_merges_reloads_bit_exactly_and_exports(tiny_llama, tiny_csv, tmp_path):
    """quantize INT4 g32, then QA-LoRA on every linear merged: the artifact holds float zero points, reloads
    bit for bit, and its ONNX export (MatMulNBits with float zero points) matches PyTorch in ONNX Runtime to
    1e-4 of the logits' scale: both evaluate the same float32 function in different orders, each matmul within
    gamma_K ~ 4e-6 (K <= 64) of |x| |W|, through a dozen such stages of a 2-layer model."""
    import onnx

    from slimtune.export import export_onnx, validate_onnx
    from slimtune.tasks import Collator
    from tests.conftest import tiny_texts

    stages = ("- quantize: {bits: 4, group_size: 32}\n"
              "- lora: {quant_aware: true, merge: true, targets: [all-linear], rank: 2, max_steps: 3, eval_split: none}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_llama, tiny_csv, stages, kind="causal-lm"))
    run = slimtune.run(recipe, out=tmp_path / "run")
    merge = run.stages[1].metrics["merge"]
    assert merge["merged_exactly"] == merge["layers"] == 14 and merge["requantized"] == 0
    art = slimtune.load(run.stages[1].path)
    quant = [m for m in art.model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 14 and all(m.zero_dtype == "float32" and m.zeros.dtype == torch.float32 for m in quant)
    assert not deltas(art.model)
    again = slimtune.load(run.stages[1].path)
    x = _ids(art.model)
    with torch.no_grad():
        logits = art.model(input_ids=x).logits
        assert torch.equal(again.model(input_ids=x).logits, logits)
        assert not torch.equal(slimtune.load(run.stages[0].path).model(input_ids=x).logits, logits)  # it trained

    path = export_onnx(art, tmp_path / "model.onnx")
    ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert ops["MatMulNBits"] == 14, ops
    zero_points = [i for i in onnx.load(path).graph.initializer if "zeros" in i.name]
    assert len(zero_points) == 14 and all(i.data_type == onnx.TensorProto.FLOAT for i in zero_points)
    collate = Collator(art.tokenizer, 16, "causal-lm")
    batches = [collate([{"text": t, "label": y} for t, y in tiny_texts(n, seed=n)]) for n in (1, 5)]
    report = validate_onnx(art, path, batches)
    with torch.no_grad():
        scale = art.model(**{k: v for k, v in batches[1].items() if k != "labels"}).logits.abs().max().item()
    assert report["max_abs_diff"] < 1e-4 * scale, report


def test_unmerged_qalora_saves_and_reloads_bit_exactly(tiny_llama, tiny_csv, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_llama, tiny_csv, "- quantize: {bits: 4, group_size: 32}\n", kind="causal-lm"))
    backbone = slimtune.run(recipe, out=tmp_path / "run").stages[0].path
    art = slimtune.load(backbone)
    add_lora_(art.model, ["ffn_out", "query"], rank=2, quant_aware=True, name="qa")
    _perturb(art.model)
    x = _ids(art.model)
    with torch.no_grad():
        out = art.model(input_ids=x).logits
    save_delta(art, tmp_path / "delta")
    fresh = slimtune.load(backbone)
    load_delta_(fresh, tmp_path / "delta")
    assert isinstance(fresh.model.model.layers[1].mlp.down_proj, QALoraLinear)
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=x).logits, out)
    assert not np.isnan(out.numpy()).any()
