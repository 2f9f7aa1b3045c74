"""Straightforward reference quantizers the tests compare SlimTune's against.

* :func:`group_quantizer` / :func:`reference_rtn`: GPTQ's reference
  ``Quantizer`` (github.com/IST-DASLab/gptq, ``quant.py``: ``find_params`` /
  ``quantize``), one group at a time in a Python loop. 4-bit symmetric uses
  its full grid (scale ``2 max|w| / 15``, zero point 8, codes 0..15);
  ``old_grid=True`` is SlimTune's grid before issue 12 (scale ``max|w| / 7``).
  8-bit is SlimTune's format (scale ``max|w| / 127``, codes -127..127).
* :func:`naive_gptq`: GPTQ column by column (the paper's Algorithm 1 with
  block size 1; the reference ``gptq.py`` inner loop without lazy batches),
  in float64, with a running bound on how far a float32 implementation of
  the same algorithm may be from it (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

U32 = 2.0 ** -24  # unit roundoff of float32


def group_quantizer(w: torch.Tensor, bits: int, symmetric: bool, old_grid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``(N,)`` (float32) of one group ``(N, g)``, as the reference ``find_params``."""
    w = w.float()
    if bits == 8:
        return w.abs().amax(1) / 127, torch.zeros(w.shape[0])
    maxq = 15
    xmin = torch.minimum(w.amin(1), torch.zeros(1))
    xmax = torch.maximum(w.amax(1), torch.zeros(1))
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        if old_grid:
            return xmax / 7, torch.full_like(xmax, 8.0)
        xmin = -xmax
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-xmin / scale)
    return scale, zero


def code_limits(bits: int) -> tuple[int, int]:
    return (-127, 127) if bits == 8 else (0, 15)


def reference_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, old_grid: bool = False) -> dict:
    """Round-to-nearest of ``w`` ``(N, K)`` group by group.

    Returns:
        ``{"codes"}`` stored codes ``(N, K)`` (int64), ``{"scales", "zeros"}`` ``(N, G)``, ``{"weight"}`` the
        dequantized float32 weight.
    """
    n, k = w.shape
    lo, hi = code_limits(bits)
    codes, weight, scales, zeros = torch.zeros(n, k, dtype=torch.int64), torch.zeros(n, k), [], []
    for start in range(0, k, group_size):
        group = w[:, start:start + group_size].float()
        scale, zero = group_quantizer(group, bits, symmetric, old_grid)
        c = torch.clamp(torch.round(group / scale[:, None]) + zero[:, None], lo, hi)
        codes[:, start:start + group_size] = c.long()
        weight[:, start:start + group_size] = (c - zero[:, None]) * scale[:, None]
        scales.append(scale)
        zeros.append(zero)
    return {"codes": codes, "scales": torch.stack(scales, 1), "zeros": torch.stack(zeros, 1), "weight": weight}


@dataclass
class NaiveGPTQ:
    """What :func:`naive_gptq` returns.

    Attributes:
        codes: stored codes ``(N, K)`` in the original column order.
        scales, zeros: ``(N, G)`` group parameters (float32 scales, as the format stores them).
        scale_bound: ``(N, G)`` bound on ``|scale_impl - scale|`` (0 for static groups).
        loss, loss_bound: the OBS loss ``sum e^2 / 2`` and a bound on a float32 run's deviation from it.
        followed: how many codes and zero points sat within the float32 bound of a rounding tie and
            were taken from the implementation.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    scale_bound: torch.Tensor
    loss: float
    loss_bound: float
    followed: int


def _round_following(v: torch.Tensor, tol: torch.Tensor, lo: int, hi: int, follow: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``clamp(round(v))``, except where ``v`` is within ``tol`` of a tie: there ``follow`` (if it is one of the two
    candidates), the implementation's choice, which is as right as ours within float32 roundoff."""
    code = torch.clamp(torch.round(v), lo, hi)
    if follow is None:
        return code, 0
    down, up = torch.clamp(torch.floor(v), lo, hi), torch.clamp(torch.ceil(v), lo, hi)
    tie = ((v - torch.floor(v) - 0.5).abs() <= tol) & (down != up) & ((follow == down) | (follow == up))
    return torch.where(tie, follow.to(code.dtype), code), int((tie & (follow != code)).sum())


def naive_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, symmetric: bool, damp: float, act_order: bool,
               follow_codes: torch.Tensor | None = None, follow_zeros: torch.Tensor | None = None,
               static_params: tuple[torch.Tensor, torch.Tensor] | None = None) -> NaiveGPTQ:
    """GPTQ one column at a time in float64, plus a first-order bound on a float32 run's deviation.

    The algorithm (the paper's Algorithm 1, SlimTune's group semantics): dead
    inputs zeroed; columns in order of decreasing ``H_jj`` with ``act_order``;
    ``U`` the upper Cholesky factor of ``(H + damp mean(diag H) I)^-1``; for
    each column ``j``: ``q_j = Q(w_j)``, ``e_j = (w_j - q_j) / U_jj``,
    ``w_{j+1:} -= e_j U_{j, j+1:}``. Groups are static (parameters from the
    original weight) with ``act_order`` or one group per row, else taken from
    the updated columns when a group's first column is reached.

    The float32 bound. With the codes fixed, the ``e`` of a row solve the
    triangular system ``e U = w0 - q`` by forward substitution, and column
    ``j`` before rounding is ``w0_j - sum_{i<j} e_i U_ij``. Forward
    substitution is backward stable in any order and blocking (Higham,
    *Accuracy and Stability of Numerical Algorithms*, Thm 8.5): the float32 run
    solves ``e (U + dU) = w0 - q`` with ``|dU| <= gamma |U|``, ``gamma = (K+4) u
    / (1 - (K+4) u)`` (K additions, the product, e's subtraction and division,
    U's float32 cast), so to first order ``|de| <= (gamma |e| |U| + |dq|)
    |U^-1|`` (``dq``: a dynamic group's scale deviation times ``|code - zero|``),
    and column ``j`` deviates by at most ``b_j = gamma a_j + sum_{i<j} |de_i|
    |U_ij|`` with ``a_j = |w0_j| + sum_{i<j} |e_i| |U_ij|`` (its own sum's
    rounding plus the earlier deviations). A dynamic group's scale moves by
    at most ``ds``: twice the largest ``b`` of its columns (its range) plus the
    float32 roundings of the range and the division, over the levels. Where
    ``v = w_j / s + z`` lies within ``(b_j + |w_j| ds / s) / s + 2 u |v|`` of
    a rounding tie, the implementation's code is as valid as ours: it is
    followed (counted in ``followed``).

    Args:
        w: ``(N, K)`` float32 weight; h: ``(K, K)`` SPD Hessian.
        follow_codes: the implementation's stored codes ``(N, K)`` (original order), to break near-ties.
        follow_zeros: its zero points ``(N, G)``, likewise.
        static_params: float32 scales and zero points ``(N, G)`` of static groups, instead of each group's range.
    """
    n, k = w.shape
    lo, hi = code_limits(bits)
    levels = 15 if bits == 4 else 127
    W, H = w.double().clone(), h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    start_w = W.clone()
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # (K, K), U^T U = H^-1
    U_abs, Uinv_abs = U.abs(), torch.linalg.solve_triangular(U, torch.eye(k, dtype=U.dtype), upper=True).abs()
    gamma = (k + 4) * U32 / (1 - (k + 4) * U32)
    groups = -(-k // group_size)
    static = act_order or group_size >= k
    scales, zeros = torch.zeros(n, groups), torch.zeros(n, groups)
    scale_bound = torch.zeros(n, groups, dtype=torch.float64)
    if static and static_params is not None:
        scales, zeros = static_params[0].float().clone(), static_params[1].float().clone()
    elif static:
        for g in range(groups):
            scales[:, g], zeros[:, g] = group_quantizer(start_w[:, g * group_size:(g + 1) * group_size], bits, symmetric)
    A = W.abs()  # (N, K) a_j
    G = torch.zeros_like(W)  # (N, K) (|e| |U|)_j, the e's so far
    V = torch.zeros_like(W)  # (N, K) ((gamma |e| |U| + |dq|) |U^-1|)_j, the e's so far
    P = torch.zeros_like(W)  # (N, K) sum_{i<j} |de_i| |U_ij|
    codes = torch.zeros(n, k, dtype=torch.int64)
    loss = loss_bound = 0.0
    followed = 0
    for j in range(k):
        col = int(perm[j])
        g = col // group_size
        b = gamma * A[:, j] + P[:, j]  # (N,) bound on the float32 run's deviation of column j
        if not static and col % group_size == 0:
            block = W[:, j:j + group_size]
            bmax = (gamma * A[:, j:j + group_size] + P[:, j:j + group_size]).amax(1)  # later columns: the bound so far
            scales[:, g], zero = group_quantizer(block, bits, symmetric)
            s = scales[:, g].double()
            scale_bound[:, g] = (2 * bmax + 4 * U32 * block.abs().amax(1)) / levels + 4 * U32 * s
            zeros[:, g] = zero
            if not symmetric and bits == 4:
                xmin = torch.minimum(block.float().amin(1), torch.zeros(1)).double()
                tol = (bmax + xmin.abs() * scale_bound[:, g] / s) / s + 4 * U32 * xmin.abs() / s
                follow = follow_zeros[:, g].double() if follow_zeros is not None else None
                z, f = _round_following(-xmin / s, tol, 0, 15, follow)
                zeros[:, g], followed = z.float(), followed + f
        s, z, ds = scales[:, g].double(), zeros[:, g].double(), scale_bound[:, g]
        x = W[:, j]
        v = x / s + z
        tol = (b + x.abs() * ds / s) / s + 2 * U32 * v.abs()
        c, f = _round_following(v, tol, lo, hi, follow_codes[:, col].double() if follow_codes is not None else None)
        followed += f
        codes[:, col] = c.long()
        e = (x - (c - z) * s) / U[j, j]
        G[:, j:] += e.abs()[:, None] * U_abs[j, j:][None, :]
        V[:, j:] += (gamma * G[:, j] + (c - z).abs() * ds)[:, None] * Uinv_abs[j, j:][None, :]
        de = V[:, j]  # (N,) bound on the float32 run's deviation of e_j
        loss += float(e.square().sum()) / 2
        loss_bound += float((e.abs() * de).sum() + de.square().sum() / 2)
        W[:, j + 1:] -= e[:, None] * U[j, j + 1:][None, :]
        A[:, j + 1:] += e.abs()[:, None] * U_abs[j, j + 1:][None, :]
        P[:, j + 1:] += de[:, None] * U_abs[j, j + 1:][None, :]
    return NaiveGPTQ(codes, scales, zeros, scale_bound.float(), loss, loss_bound, followed)
