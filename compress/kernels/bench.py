"""Benchmark the quantized matmul kernels: ``python -m slimtune.compress.kernels.bench``.

On a GPU: every kernel (INT4 g128 symmetric, INT4 g128 with zero points, INT4
g32, INT8 per channel; ``x @ W^T`` through each path, and the transposed
product ``dy @ W``) against fp16 cuBLAS (``torch.matmul`` with the same weight
dequantized to fp16), for M in {1, 2, 4, 8, 16, 32, 64, 128, 256} and
(K, N) in {(4096, 4096), (4096, 11008), (8192, 8192)}. Each result is first
checked against reference.py (``err``: largest difference over the largest
reference magnitude); each row gives the median time (``triton.testing.do_bench``),
the speedup over fp16, and the achieved bandwidth (bytes of weights, scales,
zeros, activations and output over the time) as a fraction of the peak
measured with a 1 GiB device-to-device copy. Paths: ``dispatch`` (what
``torch.ops.slimtune`` picks), ``gemv`` (M <= 16), ``gemm``, ``gemm_t`` and
``dequant+cublas``, so the dispatcher's thresholds can be read off the table.
The first call of each shape autotunes (compiles a few configs), so a full run
takes minutes; ``--quick`` runs one shape.

Without CUDA it says so, then times the dispatcher's CPU candidates against
the reference on a few SmolLM2-like shapes (the table behind dispatch.py's CPU
choices), and exits 0.

Options: ``--quick``, ``--csv`` / ``--markdown``, ``--m 1 16 1024`` (other M
values), ``--threads N`` (CPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from slimtune.compress.kernels import dispatch, reference

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHAPES = ((4096, 4096), (4096, 11008), (8192, 8192))
VARIANTS = {"int4-g128": (4, 128, False), "int4-g128-zeros": (4, 128, True), "int4-g32": (4, 32, False),
            "int8": (8, None, False)}
TRANSPOSED = ("int4-g128", "int8")
DEVICE = "cuda"
TOLERANCE = 2e-2  # fp16 output vs the fp32 reference, relative to the largest magnitude
CPU_SHAPES = ((576, 1536, 64), (1536, 576, 64), (2048, 2048, 128))  # (K, N, group)


def random_packed(bits: int, group: int | None, with_zeros: bool, k: int, n: int, device) -> dict:
    """Random codes in the packed format with weight-like scales (|W| ~ 0.02)."""
    group_size = k if group is None else group
    if bits == 4:
        qweight = reference.pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device))
    else:
        qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    groups = reference.num_groups(k, group_size)
    scales = torch.rand(n, groups, device=device) * (0.006 if bits == 4 else 0.0003) + 1e-4
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, device=device) if with_zeros else None
    return {"qweight": qweight, "scales": scales, "zeros": zeros, "bits": bits, "group_size": group_size, "k": k}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# -- GPU ------------------------------------------------------------------------------------------------------


def measure_peak_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * (1 << 30) / (ms * 1e-3)


def forward_paths(p: dict, m: int) -> dict:
    """The callables that compute ``x @ W^T`` for this weight and M."""
    from slimtune.compress.kernels import triton_int4, triton_int8

    kernels = triton_int4 if p["bits"] == 4 else triton_int8
    args = (p["qweight"], p["scales"], p["zeros"], p["group_size"], p["k"])
    paths = {"dispatch": lambda x: torch.ops.slimtune.dequant_matmul(x, *args[:3], p["bits"], *args[3:])}
    if m <= kernels.GEMV_MAX_M:
        paths["gemv"] = lambda x: kernels.gemv(x, *args)
    paths["gemm"] = lambda x: kernels.gemm(x, *args)
    paths["dequant+cublas"] = lambda x: x @ kernels.dequantize(*args, dtype=x.dtype).t()
    return paths


def transposed_paths(p: dict) -> dict:
    from slimtune.compress.kernels import triton_int4, triton_int8

    kernels = triton_int4 if p["bits"] == 4 else triton_int8
    args = (p["qweight"], p["scales"], p["zeros"], p["group_size"], p["k"])
    return {"dispatch": lambda dy: torch.ops.slimtune.dequant_matmul_t(dy, *args[:3], p["bits"], *args[3:]),
            "gemm_t": lambda dy: kernels.gemm_t(dy, *args),
            "dequant+cublas": lambda dy: dy @ kernels.dequantize(*args, dtype=dy.dtype)}


def time_paths(op, name, p, k, n, m, x, w_ref, w16, peak, packed_bytes):
    """Rows for every path of one (variant, op, shape, M)."""
    import triton.testing

    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    if op == "x@W^T":
        ref, fp16_ms, paths = x.float() @ w_ref.t(), bench(lambda: x @ w16.t()), forward_paths(p, m)
    else:
        ref, fp16_ms, paths = x.float() @ w_ref, bench(lambda: x @ w16), transposed_paths(p)
    io_bytes = nbytes(x) + ref.numel() * x.element_size()
    rows = []
    for path, fn in paths.items():
        err = rel_err(fn(x), ref)
        ms = bench(lambda fn=fn: fn(x))
        rows.append({"kernel": name, "op": op, "path": path, "K": k, "N": n, "M": m, "us": ms * 1e3,
                     "fp16_us": fp16_ms * 1e3, "speedup": fp16_ms / ms,
                     "GB/s": (packed_bytes + io_bytes) / (ms * 1e-3) / 1e9,
                     "peak_frac": (packed_bytes + io_bytes) / (ms * 1e-3) / peak, "err": err,
                     "ok": err <= TOLERANCE})
    return rows


def gpu_rows(shapes, m_values, variants, emit) -> list[dict]:
    peak = measure_peak_bandwidth()
    print(f"# {torch.cuda.get_device_name()}: measured peak bandwidth {peak / 1e9:.0f} GB/s (1 GiB copy)", flush=True)
    rows = []
    torch.manual_seed(0)
    for k, n in shapes:
        for name in variants:
            bits, group, with_zeros = VARIANTS[name]
            p = random_packed(bits, group, with_zeros, k, n, DEVICE)
            packed_bytes = nbytes(p["qweight"], p["scales"], p["zeros"])
            w_ref = reference.dequantize(p["qweight"], p["scales"], p["zeros"], bits, p["group_size"], k)  # (N, K) fp32
            w16 = w_ref.half()
            for m in m_values:
                x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
                for row in time_paths("x@W^T", name, p, k, n, m, x, w_ref, w16, peak, packed_bytes):
                    rows.append(emit(row))
                if name in TRANSPOSED:
                    dy = torch.randn(m, n, device=DEVICE, dtype=torch.float16)
                    for row in time_paths("dy@W", name, p, k, n, m, dy, w_ref, w16, peak, packed_bytes):
                        rows.append(emit(row))
            del p, w_ref, w16
            torch.cuda.empty_cache()
    return rows


# -- CPU ------------------------------------------------------------------------------------------------------


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def cpu_candidates(p: dict, case: str) -> dict:
    """name -> (fn(x), chosen by the dispatcher) for one CPU case."""
    q, s, z, bits, g, k = p["qweight"], p["scales"], p["zeros"], p["bits"], p["group_size"], p["k"]
    if case == "w8a8":
        return {"reference": (lambda x: reference.int8_dynamic_matmul(x, q, s), False),
                "dispatch": (lambda x: torch.ops.slimtune.int8_dynamic_matmul(x, q, s), True),
                "torch._int_mm": (lambda x: _int_mm_w8a8(x, q, s), False)}
    cands = {"reference": (lambda x: reference.dequant_matmul(x, q, s, z, bits, g, k), False),
             "dispatch": (lambda x: torch.ops.slimtune.dequant_matmul(x, q, s, z, bits, g, k), True)}
    if bits == 4:
        dtype = torch.bfloat16 if case == "int4-bf16" else torch.float32
        cands[f"int4pack-{str(dtype)[6:]}"] = (lambda x: dispatch.int4pack_matmul(x, q, s, z, g, k, dtype), False)
        cands["dequant_fast"] = (lambda x: dispatch._dequant_then_matmul(x, q, s, z, bits, g, k), False)
    else:
        cands["_weight_int8pack_mm"] = (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, s.reshape(-1)), False)
    return cands


def _int_mm_w8a8(x, q, s):
    codes, x_scale = reference.quantize_per_token_int8(x)
    return (torch._int_mm(codes, q.t()).float() * x_scale * s.reshape(1, -1)).to(x.dtype)


def cpu_rows(m_values, reps, emit) -> list[dict]:
    torch.manual_seed(0)
    cases = {"int4-fp32": (4, torch.float32), "int4-bf16": (4, torch.bfloat16), "int8-fp32": (8, torch.float32),
             "w8a8": (8, torch.float32)}
    rows = []
    for k, n, group in CPU_SHAPES:
        for case, (bits, dtype) in cases.items():
            p = random_packed(bits, group if bits == 4 else None, False, k, n, "cpu")
            for m in m_values:
                x = torch.randn(m, k).to(dtype)
                cands = cpu_candidates(p, case)
                ref = cands["reference"][0](x)
                ref_ms = best_ms(lambda fn=cands["reference"][0], x=x: fn(x), reps)
                for name, (fn, chosen) in cands.items():
                    ms = ref_ms if name == "reference" else best_ms(lambda fn=fn, x=x: fn(x), reps)
                    rows.append(emit({"case": case, "candidate": name, "chosen": "*" if chosen else "", "K": k, "N": n,
                                      "M": m, "ms": ms, "vs_reference": ref_ms / ms, "err": rel_err(fn(x), ref)}))
    return rows


# -- output ---------------------------------------------------------------------------------------------------


def fmt(value) -> str:
    if isinstance(value, bool):
        return "ok" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.1e}" if value and abs(value) < 1e-2 else f"{value:.4g}"
    return str(value)


class Table:
    """Prints rows as they come (a long GPU run shows progress) in text, CSV or markdown."""

    def __init__(self, style: str):
        self.style, self.columns = style, None

    def __call__(self, row: dict) -> dict:
        cells = [fmt(v) for v in row.values()]
        if self.columns is None:
            self.columns = list(row)
            if self.style == "csv":
                print(",".join(self.columns))
            elif self.style == "markdown":
                print("| " + " | ".join(self.columns) + " |\n|" + "---|" * len(self.columns))
            else:
                print("  ".join(f"{c:>14}" for c in self.columns))
        if self.style == "csv":
            print(",".join(cells), flush=True)
        elif self.style == "markdown":
            print("| " + " | ".join(cells) + " |", flush=True)
        else:
            print("  ".join(f"{c:>14}" for c in cells), flush=True)
        return row


def summary(rows: list[dict]) -> None:
    for row in rows:
        if row["kernel"] == "int4-g128" and row["op"] == "x@W^T" and row["path"] == "dispatch" and row["M"] == 1:
            print(f"# INT4 g128 at M=1, K={row['K']}, N={row['N']}: {row['speedup']:.2f}x over fp16 "
                  f"({row['peak_frac']:.0%} of peak bandwidth; goal >= 3x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimtune.compress.kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape and three M values")
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--csv", action="store_true")
    style.add_argument("--markdown", action="store_true")
    parser.add_argument("--m", type=int, nargs="+", help="M values (default: 1 2 4 ... 256; CPU: 1 8 128)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    table = Table("csv" if args.csv else "markdown" if args.markdown else "text")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        print("# CUDA is not available: the Triton kernels need a GPU. Timing the dispatcher's CPU candidates instead "
              f"(best of 15, {torch.get_num_threads()} threads; err is relative to the reference; * = dispatch's choice).")
        m_values = args.m or ((1, 128) if args.quick else (1, 8, 128))
        cpu_rows(m_values, 5 if args.quick else 15, table)
        return 0
    shapes = SHAPES[:1] if args.quick else SHAPES
    m_values = args.m or ((1, 16, 128) if args.quick else M_VALUES)
    variants = ("int4-g128", "int8") if args.quick else tuple(VARIANTS)
    rows = gpu_rows(shapes, m_values, variants, table)
    summary(rows)
    failed = [r for r in rows if not r["ok"]]
    if failed:
        print(f"# {len(failed)} results differ from the reference by more than {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
