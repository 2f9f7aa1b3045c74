"""What the Triton dequant-matmul kernels (triton_int4.py, triton_int8.py) share.

Validation of the packed tensors (format v2, see reference.py: uint8 or float32 zero points), autotune
config lists (one config under the Triton interpreter, where autotuning would
need a GPU timer), the launch heuristics (split-K, M buckets), the host
launchers of the GEMV / GEMM / transposed GEMM, and two device helpers (the
program order and the output tile's store).

Kernels are pure tensor code and import nothing of SlimTune, so bad arguments
raise ``ValueError``; the dispatcher checks :func:`supports` first and falls
back to the reference for anything the kernels do not cover.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)  # read once, when the kernels are defined
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GROUP = 256  # grouped formats: a power of two in [32, MAX_GROUP] (a divisor of every GEMV BLOCK_K)
MAX_ELEMENTS = 2**31 - 1  # kernels index with int32 offsets
GEMV_MAX_M = 16  # the GEMV kernels' largest row block (gemv_block_m)


def configs(gpu: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """The autotune list: several configs on a GPU, exactly one under the interpreter."""
    return [interpreted] if INTERPRET else gpu


# every list keeps BLOCK_K=32 configs, the only ones that fit group_size=32 (prune_gemm)
GEMM_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in [(16, 64, 32, 4, 4), (16, 64, 128, 4, 4), (64, 64, 32, 4, 4), (64, 64, 64, 4, 4),
                              (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3)]],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1))

GEMM_T_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in [(16, 64, 32, 4, 4), (16, 64, 64, 4, 4), (64, 64, 32, 4, 4), (64, 64, 64, 4, 4),
                              (128, 64, 64, 8, 3)]],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1))


def group_supported(group_size: int, k: int) -> bool:
    """Per channel (``group_size == k``), or a power-of-two group in [32, MAX_GROUP] (any ``k``: the last of
    the ``cdiv(k, group_size)`` groups may be short, as format v1 allows)."""
    if k < 1:
        return False
    if group_size == k:
        return True
    return 32 <= group_size <= MAX_GROUP and group_size & (group_size - 1) == 0


def group_constexpr(group_size: int, k: int) -> int:
    """The kernels' ``GROUP_SIZE``: the group size, or 0 for per channel (one scale per row)."""
    return 0 if group_size == k else group_size


def check_groups(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                 k: int) -> None:
    """Format v1's group count: ``scales`` (and ``zeros``) must have ``G = ceil(k / group_size)`` columns.

    Raises:
        ValueError: a malformed packed weight (no path computes it), naming the expected shape.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be a positive integer; got {group_size}")
    groups = triton.cdiv(k, group_size)  # reference.num_groups: the last group may be short
    n = qweight.shape[0] if qweight.dim() == 2 else -1
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and tuple(t.shape) != (n, groups):
            raise ValueError(f"{name} must have shape (N, ceil(k / group_size)) = ({n}, {groups}) for k={k}, "
                             f"group_size={group_size}; got {tuple(t.shape)}")


def check_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int, k: int) -> int:
    """Validate the packed tensors of one weight; returns N.

    Raises:
        ValueError: dtype, shape or group size outside what the kernels implement.
    """
    n = qweight.shape[0] if qweight.dim() == 2 else -1
    packed_k = (k + 1) // 2 if bits == 4 else k
    code_dtype = torch.uint8 if bits == 4 else torch.int8
    if bits not in (4, 8) or qweight.dtype != code_dtype or tuple(qweight.shape) != (n, packed_k):
        raise ValueError(f"qweight must be {code_dtype} of shape (N, {packed_k}) for bits={bits}, k={k}; "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if not group_supported(group_size, k):
        raise ValueError(f"group_size={group_size} with k={k}: the Triton kernels take per-channel (group_size == k) "
                         f"or a power of two in [32, {MAX_GROUP}]")
    check_groups(qweight, scales, zeros, group_size, k)
    if not scales.is_floating_point():
        raise ValueError(f"scales must be a float tensor; got {scales.dtype}")
    if bits == 8 and zeros is not None:
        raise ValueError("the INT8 kernels implement symmetric codes only (zeros=None)")
    if zeros is not None and zeros.dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"zeros must be uint8 (format v1), float32 (v2) or None; got {zeros.dtype}")
    if n * k > MAX_ELEMENTS:
        raise ValueError(f"weight ({n}, {k}) is too large for int32 indexing")
    for t in (scales, zeros):
        if t is not None and t.device != qweight.device:
            raise ValueError(f"all packed tensors must be on one device; got {t.device} and {qweight.device}")
    return n


def check_activation(x: torch.Tensor, width: int, name: str, device: torch.device) -> torch.Tensor:
    """``x`` ``(..., width)`` -> a contiguous ``(M, width)`` matrix.

    Raises:
        ValueError: wrong dtype, width or device.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (..., {width})")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the packed weight is on {device}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name} is on {x.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    if x.numel() > MAX_ELEMENTS:
        raise ValueError(f"{name} with {x.numel()} elements is too large for int32 indexing")
    return x.reshape(-1, width).contiguous()


def supports(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             bits: int, group_size: int, k: int, width: int | None = None) -> bool:
    """Whether the Triton kernels implement this call (else the dispatcher uses the reference).

    Any K is covered, a short last group included, for per-channel weights and power-of-two groups in
    [32, MAX_GROUP]. ``width`` is x's expected last dimension: ``k`` for ``x @ W^T`` (default), N for ``dy @ W``.

    Raises:
        ValueError: ``scales``/``zeros`` without ``ceil(k / group_size)`` columns (:func:`check_groups`),
            a malformed weight that no path would compute correctly.
    """
    check_groups(qweight, scales, zeros, group_size, k)
    try:
        n = check_packed(qweight, scales, zeros, bits, group_size, k)
        check_activation(x, k if width is None else n, "x", qweight.device)
    except ValueError:
        return False
    return True


def zeros_or_dummy(zeros: torch.Tensor | None, scales: torch.Tensor) -> torch.Tensor:
    """A pointer argument for ``zeros`` (never read when ``HAS_ZEROS`` is False)."""
    return zeros.contiguous() if zeros is not None else scales


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere, i.e. under the interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_k(programs: int, k: int, device: torch.device, min_k_per_split: int = 1024) -> int:
    """How many programs share one output tile's reduction range.

    Enough programs to fill the GPU twice over (a memory-bound kernel needs
    several resident blocks per SM to keep loads in flight), while each keeps
    at least ``min_k_per_split`` of the reduction. Split-K accumulates with
    fp32 atomics into a zeroed buffer, which costs two extra small launches,
    so it is only used when the output tiles alone leave the GPU idle.
    """
    split = 1
    while programs * split < 2 * sm_count(device) and k // (2 * split) >= min_k_per_split:
        split *= 2
    return split


def output(shape: tuple[int, int], dtype: torch.dtype, split: int, device: torch.device) -> torch.Tensor:
    """The kernel's output buffer: ``dtype`` when written once, zeroed fp32 when split-K atomics add into it."""
    if split == 1:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=torch.float32, device=device)


def gemv_block_m(m: int) -> int:
    """The GEMV's row block: 1, 4 or 16 (three compiled variants; masked rows cost little)."""
    return 1 if m <= 1 else 4 if m <= 4 else 16


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two up to 256, so varying sequence lengths do not retune."""
    return min(triton.next_power_of_2(max(m, 1)), 256)


def prune_gemm(configs_: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep GEMM configs whose K tile lies inside one quantization group (``BLOCK_K`` divides it)."""
    group = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE", 0))
    return [c for c in configs_ if group == 0 or group % c.kwargs["BLOCK_K"] == 0]  # every list has BLOCK_K=32


# -- device helpers -------------------------------------------------------------------------------------------


@triton.jit
def swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped program order (Triton tutorial 03): neighbouring programs share weight tiles in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def store_tile(ptrs, acc, mask, SPLIT_K: tl.constexpr):
    """Write a program's fp32 tile: stored in the output dtype, or atomically added when SPLIT_K programs share it."""
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


# -- host launchers: allocate -> grid -> launch ---------------------------------------------------------------
# ``packed`` are the kernel's weight tensors in argument order (qweight, scales[, zeros]); every kernel takes
# (input, *packed, output, M, N, K, group_size, m_bucket, its strides in the same order, constexprs...).


def _launch(kernel, grid, a2, packed, out, m, n, k, group_size, **constexprs):
    kernel[grid](a2, *packed, out, m, n, k, group_size, m_bucket(m), a2.stride(0), *(t.stride(0) for t in packed),
                 out.stride(0), GROUP_SIZE=group_constexpr(group_size, k), **constexprs)


def launch_gemv(kernel, x: torch.Tensor, x2: torch.Tensor, packed: tuple, n: int, k: int, group_size: int,
                split_k_: int | None, **constexprs) -> torch.Tensor:
    """``x @ W^T`` through a GEMV kernel (at most ``GEMV_MAX_M`` rows of ``x2``), shaped like ``x``."""
    m = x2.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv takes at most {GEMV_MAX_M} rows; got {m} (use gemm)")
    split = split_k_ or split_k(triton.cdiv(n, 8), k, x2.device)
    y = output((m, n), x.dtype, split, x2.device)  # (M, N)
    if m and n:
        _launch(kernel, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split), x2, packed, y, m, n, k, group_size,
                SPLIT_K=split, BLOCK_M=gemv_block_m(m), **constexprs)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def launch_gemm(kernel, x: torch.Tensor, x2: torch.Tensor, packed: tuple, n: int, k: int, group_size: int,
                split_k_: int | None, **constexprs) -> torch.Tensor:
    """``x @ W^T`` through a tiled GEMM kernel, shaped like ``x``."""
    m = x2.shape[0]
    split = split_k_ or split_k(triton.cdiv(m, 64) * triton.cdiv(n, 64), k, x2.device)
    y = output((m, n), x.dtype, split, x2.device)  # (M, N)
    if m and n:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)
        _launch(kernel, grid, x2, packed, y, m, n, k, group_size, SPLIT_K=split, **constexprs)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def launch_gemm_t(kernel, dy: torch.Tensor, dy2: torch.Tensor, packed: tuple, n: int, k: int, group_size: int,
                  split_k_: int | None, **constexprs) -> torch.Tensor:
    """``dy @ W`` through a transposed GEMM kernel (tiles over (M, K), reduces over N), shaped like ``dy``."""
    m = dy2.shape[0]
    split = split_k_ or split_k(triton.cdiv(m, 64) * triton.cdiv(k, 64), n, dy2.device)
    dx = output((m, k), dy.dtype, split, dy2.device)  # (M, K)
    if m and n:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]), split)
        _launch(kernel, grid, dy2, packed, dx, m, n, k, group_size, SPLIT_K=split, **constexprs)
    elif m:
        dx.zero_()
    return dx.to(dy.dtype).reshape(*dy.shape[:-1], k)
