"""The packed format (kernels/reference.py) and round-to-nearest (quant/rtn.py): exact packing, error bounds, ragged groups."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtune.errors import SlimTuneError
from slimtune.compress.kernels.reference import (dequant_matmul, dequantize, int8_dynamic_matmul, num_groups, pack_int4, unpack,
                                                 unpack_int4)
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.rtn import QuantScheme, dequantize_codes, group_params, quantize_codes, quantize_rtn
from tests.compress.reference_quant import reference_rtn


@pytest.mark.parametrize("k", [1, 2, 7, 64, 97])
def test_pack_then_unpack_is_exact(k):
    codes = torch.randint(0, 16, (5, k), generator=torch.Generator().manual_seed(k))
    packed = pack_int4(codes)
    assert packed.shape == (5, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, k), codes.to(torch.uint8))
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0].to(torch.uint8))  # even k in the low nibble


SCHEMES = [QuantScheme(4, 32, True), QuantScheme(4, 64, False), QuantScheme(4, 128, True), QuantScheme(4, None, True),
           QuantScheme(4, None, False), QuantScheme(8, None, True)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("k", [96, 160, 576])  # 576 = SmolLM2's width: 4.5 groups of 128
def test_quantize_then_dequantize_error_is_within_the_analytic_bound(scheme, k):
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(k)) * 0.05
    packed = quantize_rtn(w, scheme)
    g = scheme.groups_of(k)
    assert packed["scales"].shape == (24, num_groups(k, g))
    w_hat = dequantize(packed["qweight"], packed["scales"], packed["zeros"], scheme.bits, g, k)  # (N, K)
    step = packed["scales"].repeat_interleave(g, dim=1)[:, :k]
    # Half a step, except that a rounded asymmetric zero point may push a group's extreme by up to one step.
    bound = step * (0.5 if scheme.symmetric else 1.0) + 1e-7
    assert ((w_hat - w).abs() <= bound).all()
    assert ((w_hat - w).abs() <= step * 0.5 + 1e-7).float().mean() > 0.99
    # the dequantized weight is on the grid: quantizing it again changes nothing
    scales, zeros = packed["scales"], packed["zeros"]
    again = dequantize_codes(quantize_codes(w_hat, scales, zeros, scheme.bits, g), scales, zeros, scheme.bits, g)
    assert torch.allclose(again, w_hat, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("k", [96, 160, 576])
def test_rtn_equals_the_reference_quantizer(scheme, k):
    """Codes, scales and zero points are those of GPTQ's reference quantizer (full 4-bit grid), bit for bit."""
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(k + 1)) * 0.05
    packed, g = quantize_rtn(w, scheme), scheme.groups_of(k)
    ref = reference_rtn(w, scheme.bits, g, scheme.symmetric)
    assert torch.equal(unpack(packed["qweight"], scheme.bits, k).long(), ref["codes"])
    assert torch.equal(packed["scales"], ref["scales"])
    assert packed["zeros"] is None if scheme.symmetric else torch.equal(packed["zeros"].float(), ref["zeros"])
    if scheme.bits == 4:  # all 16 levels are used
        assert set(ref["codes"].unique().tolist()) == set(range(16))


def test_defaults_are_asymmetric_4bit_and_symmetric_8bit():
    assert not QuantScheme(4, 128).symmetric and QuantScheme(8, None).symmetric and not QuantScheme().symmetric
    assert QuantLinear(64, 8, 4, 32).zeros is not None and QuantLinear(64, 8, 8, None).zeros is None


def test_int4_rtn_error_on_gaussian_weights_follows_the_grid_steps():
    """Squared error ~ step^2 / 12 per weight (uniform rounding error), so the grids rank by their steps.

    Per group of g = 128: the old symmetric grid (max|w| / 7) has a 15/14 wider
    step than the full one (2 max|w| / 15) and puts the extreme weight exactly
    on the grid (one weight with error 0: factor 1 - 1/g); the full grid puts
    the positive extreme half a step off (one weight with error^2 = step^2 / 4:
    factor 1 + 2/g); asymmetric steps span only the group's own range. Over
    256 x 4096 weights the relative standard error of a mean squared error is
    0.9 / sqrt(1M) ~ 0.1%, so predictions hold to 0.6%. On Gaussian weights
    the old grid's error is ~12% above the full grid's and ~36% above
    asymmetric's (issue 12).
    """
    g, w = 128, torch.randn(256, 4096, generator=torch.Generator().manual_seed(0))

    def mse_and_prediction(weight, scales, extreme):
        step = scales.repeat_interleave(g, dim=1)  # (N, K)
        return float((weight - w).pow(2).mean()), float(step.pow(2).mean() / 12) * (1 + extreme / g)

    old = reference_rtn(w, 4, g, True, old_grid=True)
    full, asym = quantize_rtn(w, QuantScheme(4, g, True)), quantize_rtn(w, QuantScheme(4, g, False))
    results = [mse_and_prediction(old["weight"], old["scales"], -1),
               mse_and_prediction(dequantize(full["qweight"], full["scales"], None, 4, g, 4096), full["scales"], 2),
               mse_and_prediction(dequantize(asym["qweight"], asym["scales"], asym["zeros"], 4, g, 4096), asym["scales"], 0)]
    for mse, predicted in results:
        assert abs(mse / predicted - 1) < 0.006
    (old_mse, _), (full_mse, _), (asym_mse, _) = results
    # old / full: (15/14)^2 (1 - 1/g) / (1 + 2/g) = 1.121
    assert abs(old_mse / full_mse - (15 / 14) ** 2 * (1 - 1 / g) / (1 + 2 / g)) < 0.012
    assert asym_mse < 0.9 * full_mse and old_mse > 1.3 * asym_mse


@pytest.mark.parametrize("symmetric", [True, False])
def test_format_v1_files_from_before_the_full_grid_load_unchanged(symmetric, tmp_path):
    """Files written with the old symmetric grid (codes 1..15 around zero point 8) mean what they meant.

    The stored meaning, (code - zero) * scale, did not change (format v1), so
    a file written per the v1 spec by the old code path loads as is.
    """
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(5))
    ref = reference_rtn(w, 4, 32, symmetric, old_grid=True)
    if symmetric:
        assert int(ref["codes"].min()) >= 1  # the old grid never used code 0
    tensors = {"qweight": pack_int4(ref["codes"]), "scales": ref["scales"]}
    if not symmetric:
        tensors["zeros"] = ref["zeros"].to(torch.uint8)
    save_file(tensors, str(tmp_path / "v1.safetensors"))
    # the config a v1 artifact records for each swap (QuantLinear.config())
    layer = QuantLinear.from_config({"in_features": 80, "out_features": 16, "bits": 4, "group_size": 32,
                                     "symmetric": symmetric, "bias": False, "act_bits": None})
    layer.load_state_dict(load_file(str(tmp_path / "v1.safetensors")))
    assert torch.equal(layer.dequantized_weight(), ref["weight"])


def test_a_short_last_group_is_its_own_group():
    w = torch.randn(3, 80)
    w[:, 64:] *= 100  # the short last group (16 inputs) has its own, larger scale
    scales, _ = group_params(w, QuantScheme(4, 64, True), 64)
    assert scales.shape == (3, 2) and (scales[:, 1] > 20 * scales[:, 0]).all()


def test_reference_matmul_is_x_times_dequantized_weight_transposed():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 96, generator=gen), torch.randn(3, 5, 96, generator=gen)
    p = quantize_rtn(w, QuantScheme(4, 32, False))
    y = dequant_matmul(x, p["qweight"], p["scales"], p["zeros"], 4, 32, 96)
    assert y.shape == (3, 5, 40)
    assert torch.allclose(y, x @ dequantize(p["qweight"], p["scales"], p["zeros"], 4, 32, 96).t(), atol=1e-5)


def test_w8a8_reference_is_close_to_the_float_product():
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 128, generator=gen), torch.randn(7, 128, generator=gen)
    p = quantize_rtn(w, QuantScheme(8, None, True))
    y = int8_dynamic_matmul(x, p["qweight"], p["scales"])
    ref = x @ w.t()
    assert 10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean()) > 30  # SQNR in dB


@pytest.mark.parametrize("fields, message", [
    ({"bits": 3}, "bits=3"), ({"bits": 4, "group_size": 48}, "group_size=48"), ({"bits": 8, "group_size": 32}, "8-bit"),
    ({"bits": 8, "group_size": None, "symmetric": False}, "8-bit"),
])
def test_unsupported_schemes_are_refused(fields, message):
    with pytest.raises(SlimTuneError, match=message):
        QuantScheme(**fields)


def test_float_zero_points_are_format_v2_and_v1_configs_are_unchanged(tmp_path):
    """Format v2's float32 zero points dequantize as fl(fl(code - zero) * scale), computed here independently in
    NumPy float32 (one rounding per operation); a v2 layer records ``zero_dtype`` and rebuilds from its config
    and a safetensors file bit for bit; a v1 layer's config and zeros are what they always were."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    k, n, gs = 80, 12, 32  # three groups, the last 16 wide
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.02 + 1e-3
    zeros = torch.rand(n, 3, generator=g) * 24 - 4  # a merge may move zero points past the code range
    expand = lambda t: np.repeat(t.numpy(), gs, axis=1)[:, :k]  # noqa: E731
    expect = (codes.numpy().astype(np.float32) - expand(zeros)) * expand(scales)
    assert np.array_equal(dequantize(pack_int4(codes), scales, zeros, 4, gs, k).numpy(), expect)

    layer = QuantLinear(k, n, 4, gs, symmetric=False, zero_dtype="float32")
    layer.qweight.copy_(pack_int4(codes))
    layer.scales.copy_(scales)
    layer.zeros.copy_(zeros)
    save_file(layer.state_dict(), str(tmp_path / "v2.safetensors"))
    assert layer.config()["zero_dtype"] == "float32"
    rebuilt = QuantLinear.from_config(layer.config())
    rebuilt.load_state_dict(load_file(str(tmp_path / "v2.safetensors")))
    assert rebuilt.zeros.dtype == torch.float32 and torch.equal(rebuilt.dequantized_weight(), torch.from_numpy(expect))
    v1 = QuantLinear(k, n, 4, gs)
    assert "zero_dtype" not in v1.config() and v1.zeros.dtype == torch.uint8
    with pytest.raises(SlimTuneError, match="zero_dtype='float16'"):
        QuantLinear(k, n, 4, gs, symmetric=False, zero_dtype="float16")
