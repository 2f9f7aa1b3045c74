"""The quantized matmul kernels against reference.py.

* Every Triton kernel through the Triton interpreter, on fresh random packed
  weights: M in {1, 3, 16, 33}, K and N that are not multiples of the blocks,
  each group size (32/64/128, per channel, odd K per channel), a short last
  group (K = 80 in 32s, 160 in 64s, 576 in 128s, odd K = 95 in 64s, a group
  wider than K), with and without zero points (uint8, and the float32 zero
  points of packed format v2 that an exact QA-LoRA merge writes), fp16 and fp32 (bf16 only on
  the GEMV, which has no ``tl.dot``: the interpreter's bf16 dot is wrong),
  split-K; each element within the error bound derived from what the kernel
  and the reference compute (``dequant_matmul_error_bound``, shown to catch a
  1% scale error and a low-precision accumulator), dequantize bitwise.
* Every kernel compiled for sm_80 and sm_90 without a GPU.
* The dispatcher on CPU (each path against the reference within the bound
  derived from what torch's packed kernels compute, W8A8 against an
  independent int64 computation, autograd, the derived-layout cache, fake
  tensors, ``torch.library.opcheck``). These need no triton: only the
  interpreter and compile tests are skipped without it (a ``slimtune[cpu]``
  install still tests its CPU fast paths), and a subprocess checks that the
  dispatcher imports and runs with triton unimportable.
* ``gpu``: the compiled kernels on CUDA, bf16 included, and QuantLinear
  forward + backward through the dispatcher.

The interpreter needs ``TRITON_INTERPRET=1`` before triton itself is
imported, which another test module's imports may already have done, so the
interpreted kernels run in a fresh subprocess, and the compiles in another
(both started by the first test that needs them, and running side by side);
the tests assert on what they report. This process never imports the kernel
modules on CPU, so on a GPU the dispatcher's lazy import gets compiled kernels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from slimtune.compress.kernels import dispatch, reference

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
U32 = 2.0**-24  # float32's unit roundoff


def packed_weight(bits, n, k, group_size, zeros, seed, device="cpu"):
    """Random codes, scales and zero points (group_size None = per channel); ``zeros``: False (symmetric), True
    (uint8, format v1) or ``"float"`` (float32, format v2: anywhere in [-4, 20), as a QA-LoRA merge may move
    them past the code range)."""
    g = torch.Generator().manual_seed(seed)
    group_size = group_size or k
    if bits == 4:
        qweight = reference.pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    else:
        qweight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    groups = reference.num_groups(k, group_size)  # the last group is short when group_size does not divide k
    scales = torch.rand(n, groups, generator=g) * 0.02 + 1e-3
    zero = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8) if zeros else None
    if zeros == "float":
        zero = torch.rand(n, groups, generator=g) * 24 - 4
    to = lambda t: None if t is None else t.to(device)
    return to(qweight), to(scales), to(zero), group_size


def gamma(n: int, u: float = U32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error of n roundings of unit roundoff u, in any order."""
    return n * u / (1 - n * u)


def cast_error(dtype: torch.dtype, truncates: bool = False) -> tuple[float, float]:
    """(relative, absolute) error of one cast of a float32 value to ``dtype``: half an ulp (``u``) and half the
    subnormal spacing, or a full one of each where the cast truncates; none for float32 (the accumulator is the result)."""
    if dtype == torch.float32:
        return 0.0, 0.0
    info = torch.finfo(dtype)
    ulps = 2.0 if truncates else 1.0
    return ulps * info.eps / 2, ulps * info.smallest_normal * info.eps / 2


def dequant_matmul_error_bound(a, qweight, scales, zero, bits, group_size, k, path, *, interpreted=False, gpu=False,
                               bias=None):
    """Elementwise bound (float64, CPU, ``(rows, out)``) on ``|path(a) - reference|``, from what both compute.

    ``path``: ``gemv``, ``gemm`` (``a = x``: ``x @ W^T``, reduction length ``L = K``), ``gemm_t`` (``a = dy``:
    ``dy @ W``, ``L = N``), ``cublas`` / ``cublas_t`` (the same products on ``W`` dequantized to ``a.dtype``).
    With ``w = (c - z) s`` the weight both sides round from (exact here in float64), ``y* = a w`` and
    ``A = |a| |w|`` (float64; its own rounding, ~L 2^-53 relative, is negligible):

    * A float32 result computed as any tree of roundings equals ``sum(leaf (1 + theta))``, ``|theta| <= gamma_n``
      for n roundings on the leaf's path (Higham, Lemma 3.1 / eq. 3.4), whatever the tiling, split-K atomics or
      FMAs; a sum of L leaves has at most L - 1 additions on a path, and masked exact zeros round nothing.
    * The reference rounds w to float32, multiplies, and sums in BLAS order: ``|ref32 - y*| <= gamma_{L+1} A``;
      with float32 zero points (format v2) ``c - z`` rounds too: ``gamma_{L+2} A``.
    * The kernels: ``gemm`` multiplies a by the exact integer ``c - z`` (exact in fp16/bf16) and the group's
      scale after the tile's dot, L + 1 roundings; the int8 ``gemv`` the same on CUDA cores; the int4 ``gemv``
      computes ``s (sum c a - z sum a)``, one subtraction more and leaves ``s c a`` and ``s z a``, so its
      magnitude is ``A' = |a| ((|c| + |z|) s)`` (the zero point is taken off after the sums), and so does
      ``gemm`` with float zero points (per K tile: the dot of the bare codes, minus ``z`` times the tile's
      sum of a, times s; a leaf's path has at most BK + T + 1 <= L + 2 roundings for T tiles of BK); ``gemm_t`` (and
      cuBLAS on the dequantized weight) rounds w to float32 and then to ``a.dtype`` (``u_t``, ``eta_t``) before
      the dot (float zero points: w's two float32 roundings, the product and L - 1 sums, L + 2 in all).
      So ``|kern32 - y*| <= gamma_{L+2} A' + (1 + gamma_{L+2}) (u_t A + eta_t sum |a|)``.
    * On a GPU, fp16/bf16 dots run on tensor cores, which align each block of p >= 4 products to the largest
      exponent and truncate (Fasi, Higham, Mikaitis, Pranesh 2021): at most 2 (1 + 2/p) u <= 3u per term, so
      those accumulations count 4u per rounding. fp32 (``input_precision="ieee"``) and the GEMV round to nearest.
    * Each side casts its float32 result to the output dtype: ``u_o (|y*| + e) + eta_o`` (none for float32);
      the interpreter truncates float32 -> bf16 (``_convert_float`` without a rounding mode): a full ulp.
    * ``bias`` (in the output dtype) added by both sides afterwards, in float32 then rounded: ``(u_o + u)`` of
      ``2 |y* + b| + 2 bound`` and ``2 eta_o`` more.

    So ``|kernel - ref| <= e_k + e_r + u_k (|y*| + e_k) + eta_k + u_o (|y*| + e_r) + eta_o``.
    """
    transposed = path.endswith("_t")
    codes = reference.unpack(qweight, bits, k).double().cpu()  # (N, K)
    zeros = (zero.double().cpu() if zero is not None
             else torch.full(scales.shape, float(reference.symmetric_zero(bits)), dtype=torch.float64))  # (N, G)
    zeros = zeros.repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    scale = scales.double().cpu().repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    w = (codes - zeros) * scale  # (N, K), exact
    w = w if transposed else w.t()  # (L, out)
    length, dtype = w.shape[0], a.dtype
    a2 = a.detach().double().cpu().reshape(-1, length)  # (rows, L), exact
    y, magnitude = a2 @ w, a2.abs() @ w.abs()  # (rows, out)
    float_zeros = reference.float_zeros(zero)
    zero_after_sums = bits == 4 and (path == "gemv" or path == "gemm" and float_zeros)
    kernel_magnitude = a2.abs() @ ((codes.abs() + zeros.abs()) * scale).t() if zero_after_sums else magnitude
    u = 4 * U32 if gpu and dtype != torch.float32 and path != "gemv" else U32
    truncates = interpreted and dtype == torch.bfloat16
    e_kernel = gamma(length + 2, u) * kernel_magnitude
    if path in ("gemm_t", "cublas", "cublas_t"):
        u_t, eta_t = cast_error(dtype, truncates)
        e_kernel = e_kernel + (1 + gamma(length + 2, u)) * (u_t * magnitude + eta_t * a2.abs().sum(-1, keepdim=True))
    e_ref = gamma(length + (2 if float_zeros else 1)) * magnitude
    (u_k, eta_k), (u_o, eta_o) = cast_error(dtype, truncates), cast_error(dtype)
    bound = e_kernel + e_ref + u_k * (y.abs() + e_kernel) + eta_k + u_o * (y.abs() + e_ref) + eta_o
    if bias is not None:
        u_b = u_o + (U32 if dtype != torch.float32 else 0.0)
        bound = bound + u_b * 2 * ((y + bias.detach().double().cpu()).abs() + bound) + 2 * eta_o
    return bound


def worst_element(out, ref, bound):
    """``{"ratio", "err", "bound"}`` at the element where ``|out - ref| / bound`` is largest (shapes and dtypes must agree)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    err = (out.detach().double().cpu() - ref.detach().double().cpu()).abs().reshape(bound.shape)
    ratio = (err / bound.clamp_min(1e-300)).flatten()  # a zero bound fails any error
    i = int(ratio.argmax())
    return {"ratio": ratio[i].item(), "err": err.flatten()[i].item(), "bound": bound.flatten()[i].item()}


def assert_within_bound(out, ref, bound):
    """``|out - ref| <= bound`` elementwise; the message names the worst element."""
    worst = worst_element(out, ref, bound)
    assert worst["ratio"] <= 1, f"error {worst['err']:.3g} > bound {worst['bound']:.3g} ({worst['ratio']:.3g} x the bound)"


def randn(shape, dtype, seed, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


# -- every Triton kernel through the interpreter --------------------------------------------------------------
#
# TRITON_INTERPRET must be set before triton itself is imported (its jit'd standard library, tl.sum and
# friends, is defined then), and in a full test run transformers imports triton during collection. So the
# interpreted kernels run in one fresh subprocess, started with the first test of this module; the
# tests below assert on its measurements.

# (M, K, N, group_size or None = per channel, zeros, dtype, split_k): together every M, group size,
# zero/no zero, dtype and awkward K / N appear; interpreter blocks: GEMV (16, 256), GEMM (16, 32, 32)
INT4_CASES = [
    (1, 96, 40, 32, False, torch.float32, 1),
    (3, 160, 72, 32, True, torch.float16, 2),
    (16, 128, 40, 64, True, torch.float32, 2),
    (33, 256, 40, 128, False, torch.float16, 1),
    (1, 384, 48, 128, True, torch.float16, 2),
    (3, 95, 72, None, True, torch.float32, 1),  # odd K: the padding nibble
    (33, 96, 40, None, False, torch.float16, 2),
    # a short last group: G = ceil(K / group), the last one K - (G - 1) * group wide
    (1, 80, 40, 32, True, torch.float32, 1),
    (3, 160, 72, 64, False, torch.float16, 2),
    (33, 80, 48, 32, True, torch.float16, 2),
    (3, 576, 24, 128, True, torch.float32, 2),  # SmolLM2: 4.5 groups of 128
    (33, 95, 40, 64, False, torch.float32, 1),  # odd K: the padding nibble in the short group
    (1, 80, 40, 128, True, torch.float16, 1),  # one group, wider than K
    # float32 zero points (format v2): the GEMM's zero-after-the-dot path, ragged groups, odd K
    (1, 80, 40, 32, "float", torch.float32, 1),
    (3, 95, 72, None, "float", torch.float16, 2),
    (16, 576, 24, 128, "float", torch.float32, 2),
    (33, 160, 40, 64, "float", torch.float16, 2),
    (33, 96, 40, 32, "float", torch.float32, 1),
]
INT8_CASES = [
    (1, 95, 40, None, False, torch.float32, 2),
    (3, 160, 72, None, False, torch.float16, 1),
    (16, 96, 40, 32, False, torch.float16, 2),
    (33, 128, 72, 64, False, torch.float32, 1),
    (33, 256, 40, 128, False, torch.float16, 2),
    (1, 80, 40, 32, False, torch.float32, 2),  # a short last group
    (3, 160, 72, 64, False, torch.float16, 1),
    (3, 576, 24, 128, False, torch.float32, 2),
]
CASES = [(4, *c) for c in INT4_CASES] + [(8, *c) for c in INT8_CASES]
IDS = [f"int{b}-m{m}-k{k}-n{n}-g{g or 'pc'}-{'fz' if z == 'float' else 'z' if z else 'sym'}-{str(d)[6:]}-s{s}"
       for b, m, k, n, g, z, d, s in CASES]
BF16_CASES = [(4, 32, True), (4, None, False), (8, None, False), (8, 64, False),
              (4, 128, True), (8, 128, False), (4, 128, "float")]  # K = 192: the last group of 128 is short
DEQUANT_CASES = [(4, 32, True, 160), (4, None, False, 95), (8, None, False, 95), (8, 64, False, 192),
                 (4, 32, True, 80), (4, 64, False, 95), (8, 64, False, 160),
                 (4, 32, "float", 80), (4, None, "float", 95)]  # float zeros: the same two roundings, bitwise


def _forward(kernels, bits, m, k, n, group, zeros, dtype, split):
    qweight, scales, zero, group_size = packed_weight(bits, n, k, group, zeros, seed=m + k + n)
    x = randn((m, k), dtype, seed=1)
    ref = reference.dequant_matmul(x, qweight, scales, zero, bits, group_size, k)  # fp32 math, cast to dtype
    bound = lambda path: dequant_matmul_error_bound(x, qweight, scales, zero, bits, group_size, k, path, interpreted=True)
    rows = [("gemm", kernels.gemm(x, qweight, scales, zero, group_size, k, split_k=split), ref, bound("gemm"))]
    if m <= kernels.GEMV_MAX_M:
        rows.append(("gemv", kernels.gemv(x, qweight, scales, zero, group_size, k, split_k=split), ref, bound("gemv")))
    return rows


def _transposed(kernels, bits, m, k, n, group, zeros, dtype, split):
    qweight, scales, zero, group_size = packed_weight(bits, n, k, group, zeros, seed=m + k + n)
    dy = randn((m, n), dtype, seed=2)
    ref = reference.dequant_matmul_t(dy, qweight, scales, zero, bits, group_size, k)
    bound = dequant_matmul_error_bound(dy, qweight, scales, zero, bits, group_size, k, "gemm_t", interpreted=True)
    return [("gemm_t", kernels.gemm_t(dy, qweight, scales, zero, group_size, k, split_k=split), ref, bound)]


def _gemv_bf16(kernels, bits, group, zeros):
    """bf16 runs on the GEMV (no tl.dot: the interpreter's bf16 dot is wrong); (2, 3, K) activations keep
    their leading dimensions. The interpreter truncates fp32 -> bf16 (a GPU rounds): the bound counts a full ulp."""
    k, n = 192, 40
    qweight, scales, zero, group_size = packed_weight(bits, n, k, group, zeros, seed=3)
    x = randn((2, 3, k), torch.bfloat16, seed=4)
    ref = reference.dequant_matmul(x, qweight, scales, zero, bits, group_size, k)
    bound = dequant_matmul_error_bound(x, qweight, scales, zero, bits, group_size, k, "gemv", interpreted=True)
    return [("gemv", kernels.gemv(x, qweight, scales, zero, group_size, k), ref, bound)]


def _dequantize(kernels, bits, group, zeros, k):
    qweight, scales, zero, group_size = packed_weight(bits, 40, k, group, zeros, seed=5)
    ref = reference.dequantize(qweight, scales, zero, bits, group_size, k)  # (N, K) fp32
    return [(f"dequantize-{dtype}", kernels.dequantize(qweight, scales, zero, group_size, k, dtype=dtype), ref.to(dtype), None)
            for dtype in (torch.float32, torch.float16)]  # no bound: bitwise


def _rejections(kernels_by_bits):
    """(what, error message or None) for inputs the wrappers must refuse; `supports` verdicts as messages too."""
    from slimtune.compress.kernels import triton_common as common

    int4, int8 = kernels_by_bits[4], kernels_by_bits[8]
    qweight, scales, zero, _ = packed_weight(4, 40, 96, 32, True, seed=6)
    q8, s8, _, _ = packed_weight(8, 40, 96, None, False, seed=7)
    x = torch.randn(17, 96)
    calls = {"17 rows": lambda: int4.gemv(x, qweight, scales, zero, 32, 96),
             "group 48": lambda: int4.gemm(x, qweight, scales[:, :2], zero[:, :2], 48, 96),
             "float64": lambda: int4.gemm(x.double(), qweight, scales, zero, 32, 96),
             "width": lambda: int4.gemm(x[:, :64], qweight, scales, zero, 32, 96),
             "int8 zeros": lambda: int8.gemm(x, q8, s8, torch.zeros(40, 1, dtype=torch.uint8), 96, 96),
             "float64 zeros": lambda: int4.gemm(x, qweight, scales, zero.double(), 32, 96)}
    results = []
    for what, call in calls.items():
        try:
            call()
            results.append((what, None))
        except ValueError as err:
            results.append((what, str(err)))
    results += [("supports ok", str(common.supports(x, qweight, scales, zero, 4, 32, 96))),
                ("supports group 48", str(common.supports(x, qweight, scales[:, :2], zero[:, :2], 4, 48, 96))),
                ("supports int8 as bits=4", str(common.supports(x, q8, s8, None, 4, 96, 96)))]
    q80, s80, z80, _ = packed_weight(4, 40, 80, 32, True, seed=6)  # G = 3, the last group 16 wide
    x80 = torch.randn(2, 80)
    results.append(("supports ragged", str(common.supports(x80, q80, s80, z80, 4, 32, 80))))
    for what, call in {"gemm floor groups": lambda: int4.gemm(x80, q80, s80[:, :2], z80[:, :2], 32, 80),
                       "supports floor groups": lambda: common.supports(x80, q80, s80[:, :2], z80[:, :2], 4, 32, 80),
                       "supports zeros columns": lambda: common.supports(x80, q80, s80, z80[:, :2], 4, 32, 80)}.items():
        try:
            results.append((what, f"no error: {call()}"))
        except ValueError as err:
            results.append((what, str(err)))
    return results


def interpreter_worker():
    """Runs in a subprocess with TRITON_INTERPRET=1: every check, one JSON line each."""
    import traceback

    torch.set_num_threads(1)
    from slimtune.compress.kernels import triton_common, triton_int4, triton_int8

    assert triton_common.INTERPRET, "TRITON_INTERPRET=1 was not set before triton was imported"
    kernels = {4: triton_int4, 8: triton_int8}
    checks = {f"forward:{i}": (lambda c=c: _forward(kernels[c[0]], *c)) for i, c in zip(IDS, CASES)}
    checks.update({f"transposed:{i}": (lambda c=c: _transposed(kernels[c[0]], *c)) for i, c in zip(IDS, CASES)})
    checks.update({f"bf16:{c}": (lambda c=c: _gemv_bf16(kernels[c[0]], *c)) for c in BF16_CASES})
    checks.update({f"dequantize:{c}": (lambda c=c: _dequantize(kernels[c[0]], *c)) for c in DEQUANT_CASES})
    for name, check in checks.items():
        try:
            rows = [{"label": label, **({"exact": torch.equal(out, ref)} if bound is None else worst_element(out, ref, bound))}
                    for label, out, ref, bound in check()]
            print(json.dumps({"check": name, "rows": rows}), flush=True)
        except Exception:  # reported to, and failed by, the test that reads this check
            print(json.dumps({"check": name, "error": traceback.format_exc()}), flush=True)
    print(json.dumps({"check": "rejections", "rows": _rejections(kernels)}), flush=True)


def _spawn(code: str, interpret: bool) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


class Job:
    """A subprocess started early whose JSON lines are read once, by the first test that needs them."""

    def __init__(self, process: subprocess.Popen):
        self.process, self._results = process, None

    def results(self) -> dict:
        if self._results is None:
            out, err = self.process.communicate(timeout=900)
            assert self.process.returncode == 0, err[-4000:]
            self._results = {}
            for line in out.splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    self._results.setdefault(row.pop("check", "compile"), []).append(row)
        return self._results

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture(scope="module")
def jobs():
    """Starts the interpreter run and the sm_80 / sm_90 compiles together, with the first test that needs either."""
    started = {"interpreter": Job(_spawn("from tests.compress.test_kernels import interpreter_worker; interpreter_worker()", True)),
               "compile": Job(_spawn(COMPILE_SCRIPT, False))}
    yield started
    for job in started.values():
        job.close()


def checked(jobs, name):
    (result,) = jobs["interpreter"].results()[name]
    assert "error" not in result, result.get("error")
    assert result["rows"]
    for row in result["rows"]:
        if "exact" in row:
            assert row["exact"], row
        else:  # the worst element of the elementwise check |kernel - reference| <= dequant_matmul_error_bound
            assert row["ratio"] <= 1, f"{row['label']}: error {row['err']:.3g} > bound {row['bound']:.3g} ({row['ratio']:.3g} x)"
    return [row["label"] for row in result["rows"]]


@needs_triton
@pytest.mark.parametrize("case", IDS)
def test_triton_dequant_matmul_matches_reference(jobs, case):
    labels = checked(jobs, f"forward:{case}")
    assert ("gemv" in labels) == (int(case.split("-m")[1].split("-")[0]) <= 16)


@needs_triton
@pytest.mark.parametrize("case", IDS)
def test_triton_dequant_matmul_t_matches_reference(jobs, case):
    assert checked(jobs, f"transposed:{case}") == ["gemm_t"]


@needs_triton
@pytest.mark.parametrize("case", BF16_CASES, ids=str)
def test_triton_gemv_bf16_and_leading_dims(jobs, case):
    checked(jobs, f"bf16:{case}")


@needs_triton
@pytest.mark.parametrize("case", DEQUANT_CASES, ids=str)
def test_triton_dequantize_is_exact(jobs, case):
    assert len(checked(jobs, f"dequantize:{case}")) == 2


@needs_triton
def test_triton_wrappers_reject_what_they_do_not_implement(jobs):
    (result,) = jobs["interpreter"].results()["rejections"]
    messages = dict(result["rows"])
    assert "at most 16 rows" in messages["17 rows"]
    assert "group_size=48" in messages["group 48"]
    assert "float16, bfloat16 or float32" in messages["float64"]
    assert "expected (..., 96)" in messages["width"]
    assert "symmetric" in messages["int8 zeros"]
    assert "float32 (v2)" in messages["float64 zeros"]
    assert (messages["supports ok"], messages["supports group 48"], messages["supports int8 as bits=4"]) == ("True", "False", "False")
    assert messages["supports ragged"] == "True"
    for what in ("gemm floor groups", "supports floor groups"):  # 80 / 32 rounds up to 3 groups, not down to 2
        assert "scales must have shape (N, ceil(k / group_size)) = (40, 3)" in messages[what], messages[what]
    assert "zeros must have shape (N, ceil(k / group_size)) = (40, 3)" in messages["supports zeros columns"]


def accumulated_in(dtype, x, w):
    """``x @ w^T`` summed term by term in ``dtype`` (a kernel whose accumulator has the activations' precision)."""
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=dtype)  # (M, N)
    for j in range(x.shape[1]):
        acc = acc + x[:, j:j + 1].to(dtype) * w[:, j].to(dtype)
    return acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_error_bound_catches_real_defects(dtype):
    """The bound the interpreter checks use (the loosest of gemv's and gemm's) is not vacuous: a reference with one
    group's scales 1% off breaks it, and so does a lower-precision computation: weights rounded to bf16 in
    float32 math, or an accumulator in the activations' 16-bit dtype. Pure torch, no triton."""
    k = 576  # SmolLM2's K, 4.5 groups of 128
    qweight, scales, zero, group_size = packed_weight(4, 48, k, 128, True, seed=40)
    x = randn((33, k), dtype, seed=41)
    ref = reference.dequant_matmul(x, qweight, scales, zero, 4, group_size, k)  # (33, 48)
    bound = torch.maximum(*(dequant_matmul_error_bound(x, qweight, scales, zero, 4, group_size, k, path, interpreted=True)
                            for path in ("gemv", "gemm")))
    off = scales.clone()
    off[:, 1] *= 1.01
    w = reference.dequantize(qweight, scales, zero, 4, group_size, k)  # (N, K)
    coarse = (x.float() @ w.bfloat16().float().t()).to(dtype) if dtype == torch.float32 else accumulated_in(dtype, x, w)
    defects = {"scale 1% off": reference.dequant_matmul(x, qweight, off, zero, 4, group_size, k), "coarse": coarse}
    for what, wrong in defects.items():
        assert worst_element(wrong, ref, bound)["ratio"] > 1, what


# -- the dispatcher on CPU ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, m, k, n, group, zeros", [
    (4, 1, 96, 40, 32, True),  # M=1 but N % 16: int4pack does not apply -> exact path
    (4, 5, 128, 48, 64, False),
    (4, 3, 95, 40, None, True),
    (8, 1, 96, 40, None, False),  # M=1 per channel: the int8pack kernel
    (8, 1, 95, 41, None, False),  # int8pack with odd K and N
    (8, 4, 96, 40, None, False),
    (8, 3, 128, 40, 32, False),
    (4, 3, 80, 48, 32, True),  # a short last group: the exact path
    (4, 1, 320, 48, 128, False),  # a short last group on int4pack (fp32, M=1), which runs in groups of 64
    (4, 1, 96, 47, 32, True),  # odd N at M=1: int4pack does not apply
    (8, 5, 160, 40, 64, False),
    (4, 1, 96, 48, 32, "float"),  # float32 zero points (format v2) on int4pack (fp32, M=1)
    (4, 3, 80, 48, 32, "float"),  # ... and on the exact path, a short last group
    (4, 1, 95, 40, None, "float"),  # odd K per channel: the exact path
])
def test_cpu_dispatch_matches_reference(bits, m, k, n, group, zeros):
    qweight, scales, zero, group_size = packed_weight(bits, n, k, group, zeros, seed=8)
    x = torch.randn(m, k)
    out = torch.ops.slimtune.dequant_matmul(x, qweight, scales, zero, bits, group_size, k)
    ref = reference.dequant_matmul(x, qweight, scales, zero, bits, group_size, k)
    assert_within_bound(out, ref, dispatch.cpu_fast_path_error_bound(x, qweight, scales, zero, bits, group_size, k))


def test_cpu_exact_path_is_bitwise_the_reference():
    for bits, group, zeros, k in [(4, 32, True, 96), (4, None, False, 95), (8, None, False, 96), (8, 32, True, 64),
                                  (4, 32, True, 80), (4, 64, False, 95), (8, 128, False, 320),  # short last groups
                                  (4, 32, "float", 80), (4, None, "float", 95)]:  # float32 zero points (format v2)
        qweight, scales, zero, group_size = packed_weight(bits, 48, k, group, zeros, seed=9)
        assert torch.equal(dispatch.dequantize_fast(qweight, scales, zero, bits, group_size, k),
                           reference.dequantize(qweight, scales, zero, bits, group_size, k))
        x = torch.randn(7, k)
        assert torch.equal(torch.ops.slimtune.dequant_matmul(x, qweight, scales, zero, bits, group_size, k),
                           reference.dequant_matmul(x, qweight, scales, zero, bits, group_size, k))


INT4PACK_CASES = [  # (M, K, N, group or None = per channel, zeros): int4pack needs N % 16 == 0 and an even K
    (1, 96, 48, 32, True), (1, 256, 48, 128, False), (1, 96, 48, None, True), (9, 96, 48, None, True),
    (1, 320, 48, 128, True),  # K not a multiple of the group: a short last group, run in groups of 64
    (3, 160, 64, 64, False), (1, 576, 16, 128, True),  # SmolLM2's K: 4.5 groups of 128
    (32, 160, 80, 32, True),  # the largest M the bf16 path takes
    (1, 320, 48, 128, "float"), (32, 160, 80, 32, "float"),  # float32 zero points (format v2)
]


@pytest.mark.parametrize("m, k, n, group, zeros", INT4PACK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_int4pack_paths_within_the_derived_bound(m, k, n, group, zeros, dtype):
    """torch's int4pack kernel (bf16 activations up to 32 rows, fp32/fp16 at M=1) on fresh random operands,
    within the bound derived from what it computes (dispatch.cpu_fast_path_error_bound); other shapes
    take the exact path, which the same check covers."""
    for seed in range(3):
        qweight, scales, zero, group_size = packed_weight(4, n, k, group, zeros, seed=10 + seed)
        x = randn((m, k), dtype, seed=20 + seed)
        int4pack = dtype == torch.bfloat16 and m <= dispatch.CPU_INT4PACK_BF16_MAX_M or m == 1
        compute = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        out = torch.ops.slimtune.dequant_matmul(x, qweight, scales, zero, 4, group_size, k)
        ref = reference.dequant_matmul(x, qweight, scales, zero, 4, group_size, k)
        assert_within_bound(out, ref, dispatch.cpu_fast_path_error_bound(x, qweight, scales, zero, 4, group_size, k, compute))
        assert (qweight in dispatch._DERIVED) == int4pack  # the int4pack layout is cached only when its path ran


def test_cpu_fp32_int4pack_bound_catches_bf16_scales():
    """The fp32 bound is float32-tight: the bf16 kernel (bf16 scales) breaks it, so it can fail."""
    qweight, scales, zero, group_size = packed_weight(4, 48, 256, 128, True, seed=30)
    x = torch.randn(1, 256)
    coarse = dispatch.int4pack_matmul(x.bfloat16(), qweight, scales, zero, group_size, 256).float()
    err = (coarse.double() - reference.dequant_matmul(x, qweight, scales, zero, 4, group_size, 256).double()).abs()
    assert (err > dispatch.cpu_fast_path_error_bound(x, qweight, scales, zero, 4, group_size, 256)).any()


def test_cpu_derived_layout_follows_in_place_updates():
    qweight, scales, zero, group_size = packed_weight(4, 32, 64, 32, True, seed=11)
    x = torch.randn(1, 64).bfloat16()
    before = torch.ops.slimtune.dequant_matmul(x, qweight, scales, zero, 4, group_size, 64)
    new_q, new_s, new_z, _ = packed_weight(4, 32, 64, 32, True, seed=12)
    for old, new in [(qweight, new_q), (scales, new_s), (zero, new_z)]:
        old.copy_(new)  # what load_state_dict does
        out = torch.ops.slimtune.dequant_matmul(x, qweight, scales, zero, 4, group_size, 64)
        bound = dispatch.cpu_fast_path_error_bound(x, qweight, scales, zero, 4, group_size, 64, torch.bfloat16)
        assert_within_bound(out, reference.dequant_matmul(x, qweight, scales, zero, 4, group_size, 64), bound)
    assert not torch.equal(out, before)


@pytest.mark.parametrize("bits, group, zeros, dtype", [(4, 32, True, torch.float32), (4, None, False, torch.bfloat16),
                                                       (8, None, False, torch.float32)])
def test_cpu_autograd_dx_is_dy_times_w(bits, group, zeros, dtype):
    k, n = 96, 48
    qweight, scales, zero, group_size = packed_weight(bits, n, k, group, zeros, seed=13)
    x = torch.randn(3, 5, k).to(dtype).requires_grad_()
    y = torch.ops.slimtune.dequant_matmul(x, qweight, scales, zero, bits, group_size, k)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = reference.dequantize(qweight, scales, zero, bits, group_size, k)  # (N, K)
    assert torch.equal(x.grad, (dy.float() @ w).to(dtype))


def test_cpu_w8a8_backpropagates_through_the_dequantized_weight():
    qweight, scales, _, _ = packed_weight(8, 40, 96, None, False, seed=14)
    x = torch.randn(4, 96, requires_grad=True)
    torch.ops.slimtune.int8_dynamic_matmul(x, qweight, scales).sum().backward()
    w = reference.dequantize(qweight, scales, None, 8, 96, 96)
    assert torch.equal(x.grad, torch.ones(4, 40) @ w)  # the exact dequantize + matmul path, bitwise


def w8a8_by_integers(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W8A8 computed independently in numpy: per-token codes, an int64 matmul of the codes, then the two scales.

    Every float32 operation is the one the format defines (one rounding each, in
    the same order), and the int64 sum is exact, so a correct path equals it bit for bit.
    """
    import numpy as np

    xs = x.detach().reshape(-1, x.shape[-1]).float().numpy()  # (M, K)
    x_scale = np.maximum(np.abs(xs).max(axis=1, keepdims=True), np.float32(1e-8)) / np.float32(127)  # (M, 1)
    codes = np.clip(np.rint(xs / x_scale), -127, 127).astype(np.int64)
    acc = codes @ qweight.numpy().astype(np.int64).T  # (M, N), exact
    y = acc.astype(np.float32) * x_scale * scales.numpy().reshape(1, -1).astype(np.float32)
    return torch.from_numpy(y).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("shape, n", [
    ((1, 96), 7), ((4, 1025), 24), ((15, 2 * 1024 + 333), 7),  # below 16 rows: the int32 reference
    ((16, 1024), 8), ((17, 1025), 7), ((40, 2 * 1024 + 333), 24),  # the float-chunk path: one chunk, a short last one
    ((2, 9, 1100), 9),  # leading dimensions: 18 rows
])
def test_cpu_w8a8_equals_an_independent_integer_computation(shape, n, monkeypatch):
    """Every M and K, with extreme codes: the largest |code| products in every row (127 * 127 * 1024 < 2^24 per
    chunk, sums up to 3.8e7 beyond float32's exact integers, where both sides round the exact sum once)."""
    chunked = []
    monkeypatch.setattr(dispatch, "exact_int8_matmul_fp32",
                        lambda a, b, f=dispatch.exact_int8_matmul_fp32: chunked.append(a.shape) or f(a, b))
    k = shape[-1]
    qweight, scales, _, _ = packed_weight(8, n, k, None, False, seed=k + n)
    qweight[0] = 127  # an extreme row of codes
    qweight[-1, ::2] = -127
    x = torch.randn(shape, generator=torch.Generator().manual_seed(k))
    x.reshape(-1, k)[0] = 3.0  # a token whose codes are all 127
    x.reshape(-1, k)[-1] = torch.where(torch.arange(k) % 3 == 0, -2.0, 2.0)  # all +-127
    y = torch.ops.slimtune.int8_dynamic_matmul(x, qweight, scales)
    assert torch.equal(y, w8a8_by_integers(x, qweight, scales))
    assert bool(chunked) == (x.numel() // k >= dispatch.CPU_W8A8_FLOAT_MIN_M)  # the path the shape selects ran


@pytest.mark.parametrize("m, k, n", [(1, 1024, 8), (16, 1025, 7), (17, 2 * 1024 + 333, 24)])
def test_cpu_w8a8_float_chunks_are_exact(m, k, n):
    """The CPU W8A8 path sums int8 products in float32 chunks of 1024 inputs: exact even where every product is
    the largest one (127 * 127 * 1024 < 2^24), across chunk boundaries and a short last chunk."""
    extreme = torch.full((m, k), 127, dtype=torch.int8), torch.full((n, k), -127, dtype=torch.int8)
    codes = torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    for a, b in (extreme, codes):
        assert torch.equal(dispatch.exact_int8_matmul_fp32(a, b), (a.long() @ b.long().t()).double())


def test_cpu_dispatch_imports_and_runs_without_triton():
    """A ``slimtune[cpu]`` install has no triton: the dispatcher imports and its CPU paths run with triton unimportable."""
    code = textwrap.dedent('''
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        from slimtune.compress.kernels import dispatch, reference
        q = reference.pack_int4(torch.randint(0, 16, (48, 96), dtype=torch.uint8))
        s = torch.rand(48, 3) * 0.02
        for x in (torch.randn(1, 96), torch.randn(5, 96), torch.randn(2, 96).bfloat16()):
            torch.ops.slimtune.dequant_matmul(x, q, s, None, 4, 32, 96)
        torch.ops.slimtune.int8_dynamic_matmul(torch.randn(20, 96), torch.randint(-127, 128, (40, 96), dtype=torch.int8), torch.rand(40, 1))
        assert not any(name.startswith("slimtune.compress.kernels.triton") for name in sys.modules)
        print("ok")
    ''')
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("m, k, n", [(3, 96, 40), (20, 96, 40), (3, 95, 40)])
def test_w8a8_cuda_path_logic_is_exact_on_cpu(m, k, n, monkeypatch):
    """The CUDA W8A8 path (torch._int_mm with M padded to 17 rows, or a float64 matmul when K or N is not a
    multiple of 8) is device-agnostic code: on CPU it must equal the reference bit for bit.

    torch._int_mm stands in as an exact int64 product with its shape checks: on CUDA it accumulates in int32
    exactly, but on a CPU whose oneDNN lacks VNNI (ONEDNN_MAX_CPU_ISA=AVX2) it saturates int16 partial sums
    (vpmaddubsw) and is off by thousands, which is not what this test is about."""
    def int_mm(a, b):
        assert a.shape[0] > 16 and a.dtype == b.dtype == torch.int8, "torch._int_mm needs M > 16 and int8 operands"
        return (a.long() @ b.long()).int()

    calls = []
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or int_mm(a, b))
    qweight, scales, _, _ = packed_weight(8, n, k, None, False, seed=m + k)
    x = torch.randn(m, k)
    assert torch.equal(dispatch._cuda_int8_dynamic_matmul(x, qweight, scales), w8a8_by_integers(x, qweight, scales))
    assert bool(calls) == (k % 8 == 0 and n % 8 == 0)  # _int_mm where its layout allows, float64 elsewhere


def test_ops_under_fake_tensors_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qweight, scales, zero, _ = packed_weight(4, 48, 96, 32, True, seed=15)
    q8, s8, _, _ = packed_weight(8, 48, 96, None, False, seed=16)
    x, dy = torch.randn(2, 3, 96, requires_grad=True), torch.randn(2, 3, 48)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fake = lambda t: mode.from_tensor(t)
        y = torch.ops.slimtune.dequant_matmul(fx, fake(qweight), fake(scales), fake(zero), 4, 32, 96)
        dx = torch.ops.slimtune.dequant_matmul_t(fake(dy), fake(qweight), fake(scales), fake(zero), 4, 32, 96)
        y8 = torch.ops.slimtune.int8_dynamic_matmul(fx, fake(q8), fake(s8))
    assert (y.shape, dx.shape, y8.shape) == ((2, 3, 48), (2, 3, 96), (2, 3, 48))
    torch.library.opcheck(torch.ops.slimtune.dequant_matmul.default, (x, qweight, scales, zero, 4, 32, 96))
    torch.library.opcheck(torch.ops.slimtune.dequant_matmul_t.default, (dy, qweight, scales, zero, 4, 32, 96))
    torch.library.opcheck(torch.ops.slimtune.int8_dynamic_matmul.default, (x, q8, s8))


# -- compiled for sm_80 / sm_90 without a GPU ---------------------------------------------------------------

COMPILE_SCRIPT = textwrap.dedent('''
    import json, re, torch, triton
    torch.set_num_threads(1)
    from triton.backends.compiler import GPUTarget
    from slimtune.compress.kernels import triton_int4, triton_int8
    assert not triton.knobs.runtime.interpret
    PTR = {"s_ptr": "*fp32", "z_ptr": "*u8"}
    def compile_kernel(kernel, cc, q_type, consts, num_warps, num_stages, z_type="*u8"):
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the JITFunction under an autotuner
        ptr = {**PTR, "z_ptr": z_type}
        signature = {a: "constexpr" if a in consts else ptr.get(a, q_type if a == "q_ptr" else "*fp16" if a.endswith("_ptr") else "i32")
                     for a in fn.arg_names}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
        return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    for bits, mod, q_type in ((4, triton_int4, "*u8"), (8, triton_int8, "*i8")):
        zeros = {"HAS_ZEROS": True} if bits == 4 else {}
        int_zeros = {"FLOAT_ZEROS": False} if bits == 4 else {}
        jobs = [(f"_int{bits}_gemv_kernel", {"GROUP_SIZE": 128, "SPLIT_K": 1, "BLOCK_M": 16}, "*u8"),
                (f"_int{bits}_gemm_kernel", {"GROUP_SIZE": 0, "SPLIT_K": 2, **int_zeros}, "*u8"),
                (f"_int{bits}_gemm_t_kernel", {"GROUP_SIZE": 128, "SPLIT_K": 1}, "*u8"),
                (f"_int{bits}_dequantize_kernel", {"BLOCK_N": 32, "BLOCK_K": 128}, "*u8")]
        if bits == 4:  # float32 zero points (format v2): the GEMM's own path, and the float loads of the others
            jobs += [("_int4_gemv_kernel", {"GROUP_SIZE": 128, "SPLIT_K": 1, "BLOCK_M": 4}, "*fp32"),
                     ("_int4_gemm_kernel", {"GROUP_SIZE": 64, "SPLIT_K": 1, "FLOAT_ZEROS": True}, "*fp32"),
                     ("_int4_gemm_t_kernel", {"GROUP_SIZE": 64, "SPLIT_K": 2}, "*fp32")]
        for name, consts, z_type in jobs:
            kernel = getattr(mod, name)
            config = kernel.configs[0] if hasattr(kernel, "configs") else None  # the smallest tiles compile fastest
            meta = {**zeros, **consts, **(config.kwargs if config else {})} if "dequantize" not in name else {**zeros, **consts}
            for cc in (80, 90):
                compiled = compile_kernel(kernel, cc, q_type, meta, config.num_warps if config else 4,
                                          config.num_stages if config else 1, z_type)
                label = name + (" float zeros" if z_type == "*fp32" else "")
                print(json.dumps({"kernel": label, "cc": cc, "arch": compiled.metadata.target.arch,
                                  "ptx_target": re.findall(r"\\.target (sm_\\w+)", compiled.asm["ptx"]),
                                  "cubin_elf": compiled.asm["cubin"][:4] == b"\\x7fELF"}), flush=True)
''')


@needs_triton
def test_every_kernel_compiles_for_sm80_and_sm90(jobs):
    results = jobs["compile"].results()["compile"]
    kernels = {r["kernel"] for r in results}
    assert kernels == ({f"_int{b}_{k}_kernel" for b in (4, 8) for k in ("gemv", "gemm", "gemm_t", "dequantize")}
                       | {f"_int4_{k}_kernel float zeros" for k in ("gemv", "gemm", "gemm_t")})
    for r in results:
        assert r["arch"] == r["cc"] and r["cubin_elf"], r
        assert r["ptx_target"] == [f"sm_{r['cc']}" + ("a" if r["cc"] == 90 else "")], r
    assert len(results) == 2 * len(kernels)


# -- on a GPU -----------------------------------------------------------------------------------------------


def _gpu_kernels(bits):
    from slimtune.compress.kernels import triton_int4, triton_int8

    kernels = triton_int4 if bits == 4 else triton_int8
    assert not kernels.common.INTERPRET, "run the gpu tests without TRITON_INTERPRET"
    return kernels


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("bits, group, zeros", [(4, 128, False), (4, 32, True), (4, None, True), (8, None, False),
                                                (4, 64, "float"), (4, None, "float")])  # float: format v2 zero points
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_kernels_match_reference(bits, group, zeros, dtype):
    kernels = _gpu_kernels(bits)
    for m, k, n in [(1, 4096, 4096), (3, 640, 1000), (16, 256, 72), (33, 512, 11008 // 8), (300, 1024, 520),
                    (5, 576, 1536), (40, 576, 1536)]:  # SmolLM2's K: a short last group of 64 in groups of 128
        qweight, scales, zero, group_size = packed_weight(bits, n, k, group, zeros, seed=m, device="cuda")
        x, dy = randn((m, k), dtype, 1, "cuda"), randn((m, n), dtype, 2, "cuda")
        ref = reference.dequant_matmul(x, qweight, scales, zero, bits, group_size, k)
        ref_t = reference.dequant_matmul_t(dy, qweight, scales, zero, bits, group_size, k)
        bound = lambda a, path: dequant_matmul_error_bound(a, qweight, scales, zero, bits, group_size, k, path, gpu=True)
        if m <= kernels.GEMV_MAX_M:
            assert_within_bound(kernels.gemv(x, qweight, scales, zero, group_size, k), ref, bound(x, "gemv"))
            assert_within_bound(kernels.gemv(x, qweight, scales, zero, group_size, k, split_k=4), ref, bound(x, "gemv"))
        assert_within_bound(kernels.gemm(x, qweight, scales, zero, group_size, k), ref, bound(x, "gemm"))
        assert_within_bound(kernels.gemm_t(dy, qweight, scales, zero, group_size, k), ref_t, bound(dy, "gemm_t"))
        w = reference.dequantize(qweight, scales, zero, bits, group_size, k)
        assert torch.equal(kernels.dequantize(qweight, scales, zero, group_size, k, dtype=dtype), w.to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("bits, group, symmetric", [(4, 64, False), (4, None, True), (8, None, True)])
def test_gpu_quant_linear_forward_backward_through_dispatcher(bits, group, symmetric, monkeypatch):
    """Each path within dequant_matmul_error_bound. cuBLAS may otherwise reduce split-K partial sums in fp16/bf16
    ("reduced precision reduction", an unbounded number of splits): the bound assumes float32 accumulation."""
    from slimtune.compress.quant.linear import QuantLinear
    from slimtune.compress.quant.rtn import QuantScheme

    for flag in ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"):
        monkeypatch.setattr(torch.backends.cuda.matmul, flag, False)
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(512, 384), QuantScheme(bits, group, symmetric)).cuda()
    w = layer.dequantized_weight()  # (N, K) fp32
    packed = (layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, layer.in_features)
    for m in (1, 40, dispatch.CUBLAS_MIN_M + 3):  # the gemv, gemm and dequant + cuBLAS paths
        path = "gemv" if m <= dispatch.GEMV_MAX_M else "cublas" if m >= dispatch.CUBLAS_MIN_M else "gemm"
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, 512, device="cuda", dtype=dtype, requires_grad=True)
            y = layer(x)
            dy = torch.randn_like(y)
            y.backward(dy)
            bias = layer.bias.detach().to(dtype)
            assert_within_bound(y, (x.detach().float() @ w.t()).to(dtype) + bias,
                                dequant_matmul_error_bound(x, *packed, path, gpu=True, bias=bias))
            assert_within_bound(x.grad, (dy.float() @ w).to(dtype),
                                dequant_matmul_error_bound(dy, *packed, "cublas_t" if path == "cublas" else "gemm_t", gpu=True))


def w8a8_cuda_error_bound(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Elementwise bound (float64, ``(M, N)``) on ``|CUDA W8A8 - reference.int8_dynamic_matmul|`` for float32 ``x``.

    Both run quantize_per_token_int8 and the same two float32 products on exact integer sums, but torch's CUDA
    division by the scalar 127 multiplies by its rounded reciprocal: the two x_scales differ by less than 4u
    (u = 2^-24; two roundings against one). A code ``round(x / x_scale)`` then moves by at most 1, and only
    where ``x / x_scale`` lies within ``7u |x / x_scale|`` of a half-integer (the scales' 4u, each side's
    division u, and slack): with F those codes, ``|acc_cuda - acc| <= sum_F |q_w|``. So
    ``|y_cuda - y| <= B0 + gamma_2 (2 |acc| x_scale s + B0)``, ``B0 = s x_scale (|acc_cuda - acc| (1 + 4u) + 4u |acc|)``.
    """
    codes, x_scale = reference.quantize_per_token_int8(x)  # (M, K), (M, 1)
    ratio = x.double() / x_scale.double()  # (M, K)
    flippable = ((ratio - ratio.floor() - 0.5).abs() <= 7 * U32 * ratio.abs()).double()
    q = qweight.double()  # (N, K)
    acc = codes.double() @ q.t()  # (M, N), exact integers
    scale = x_scale.double() * scales.double().reshape(1, -1)  # (M, N)
    b0 = scale * ((flippable @ q.abs().t()) * (1 + 4 * U32) + 4 * U32 * acc.abs())
    return b0 + gamma(2) * (2 * acc.abs() * scale + b0)


@pytest.mark.gpu
def test_gpu_w8a8_matches_cpu_reference():
    qweight, scales, _, _ = packed_weight(8, 72, 96, None, False, seed=17)
    for m in (3, 40):
        x = torch.randn(m, 96)
        y = torch.ops.slimtune.int8_dynamic_matmul(x.cuda(), qweight.cuda(), scales.cuda())
        bound = w8a8_cuda_error_bound(x, qweight, scales)
        assert_within_bound(y.cpu(), reference.int8_dynamic_matmul(x, qweight, scales), bound)
