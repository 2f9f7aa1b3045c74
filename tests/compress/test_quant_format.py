"""The packed format (kernels/reference.py) and round-to-nearest (quant/rtn.py): exact packing, error bounds, ragged groups."""

import pytest
import torch

from slimtune.errors import SlimTuneError
from slimtune.compress.kernels.reference import dequant_matmul, dequantize, int8_dynamic_matmul, num_groups, pack_int4, unpack_int4
from slimtune.compress.quant.rtn import QuantScheme, dequantize_codes, group_params, quantize_codes, quantize_rtn


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
