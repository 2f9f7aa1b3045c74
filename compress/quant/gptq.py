"""GPTQ: weight quantization that corrects each rounding error with second-order information.

Frantar, Ashkboos, Hoefler & Alistarh, 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers" (arXiv:2210.17323).
For a linear with weight ``W`` ``(N, K)`` and calibration inputs ``X``, GPTQ
minimises ``||W X^T - Q X^T||^2`` one input column at a time: column ``j`` is
rounded to the grid, and its error is spread over the not yet quantized
columns through the inverse Hessian ``H^-1`` of that loss, ``H = 2/n X^T X``
(the Optimal Brain Surgeon update). As in the paper (and its reference code,
github.com/IST-DASLab/gptq):

* ``H`` is damped by ``damp * mean(diag(H))``; dead inputs (``H_jj == 0``)
  get ``H_jj = 1`` and ``W[:, j] = 0``;
* the updates use the upper Cholesky factor of ``H^-1`` and are applied
  lazily, ``block_size`` columns at a time;
* weights that are exactly zero (pruned ones) stay zero: they take the
  zero code, and their whole value is the error the later columns
  compensate, as SparseGPT does when it prunes and quantizes jointly;
* ``act_order`` quantizes columns in order of decreasing ``H_jj`` (most
  activated inputs first). Its groups are *static*: every group's scale and
  zero point come from the original weight before any update, and each column
  uses its own group's, so the codes come out in the original column order
  and the result is a plain packed weight (no ``g_idx`` permutation at run
  time). Without ``act_order`` a group's parameters come from its (already
  updated) columns when its first column is reached, as in the paper. A
  group size that does not divide K leaves a shorter last group.

Output: the packed format of :mod:`slimtune.compress.kernels.reference`
(``qweight``/``scales``/``zeros``) behind a :class:`QuantLinear` swap.

Calibration is sequential across and inside blocks, as the reference's
``--true-sequential``: block ``i`` sees the outputs of the already quantized
blocks before it (:mod:`slimtune.compress.quant.calibrate`), and inside a
block the linears are quantized group by group in the order the block
computes them (:func:`slimtune.arch.input_groups`: q/k/v, then o on
the output of the quantized q/k/v, then the FFN inputs, then the FFN output
on the quantized MLP's activations). The linears of a group read the same
input, so they share one Hessian. Listed linears of a block that no group
names are quantized last, on the otherwise quantized block.

Limits: linears outside the transformer blocks (``lm_head``, a classifier)
have no captured inputs and get round-to-nearest. Weights shared between
linears (cross-layer sharing) are refused. ``H`` is ``K x K`` float32 on the
layer's device, one at a time (that of the input group being quantized).
Feeding group by group replays the block up to each group's input, about
twice the block forwards of calibrating every linear at once.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.arch import input_groups, layers
from slimtune.compress.kernels.reference import code_range, symmetric_zero
from slimtune.compress.prune.calibrate import real_tokens
from slimtune.compress.quant.calibrate import BlockInputs, walk_blocks
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.rtn import QuantScheme, group_params, pack_codes, search_group_params


# --- pure tensor functions ----------------------------------------------------

def prepare_hessian(w: torch.Tensor, h: torch.Tensor) -> int:
    """Dead inputs (``H_jj == 0``): set ``H_jj = 1`` and ``W[:, j] = 0``, in place; returns their count.

    Args:
        w: ``(N, K)`` float32 weight; h: ``(K, K)`` Hessian.
    """
    dead = torch.diag(h) == 0  # (K,)
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return int(dead.sum())


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``), float32.

    Computed in float64 for stability.

    Raises:
        SlimTuneError: the damped Hessian is not positive definite (``damp`` too small).
    """
    h = h.double()
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        lower, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0:
        raise SlimTuneError(f"damp={damp}: the damped Hessian is not positive definite",
                            "raise damp (e.g. 0.1) or calibrate on more tokens")
    return lower.float()  # (K, K) upper


def round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round one column ``(N,)`` to codes with per-row ``scale``/``zero`` ``(N,)``; returns (codes, dequantized values)."""
    lo, hi = code_range(bits)
    codes = torch.clamp(torch.round(w / scale) + zero, lo, hi)  # (N,)
    return codes, (codes - zero) * scale


def gptq_quantize_weight(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, damp: float = 0.01, block_size: int = 128,
                         act_order: bool = True, where: str = "", clip_search: bool = True) -> dict:
    """Quantize one weight with GPTQ.

    Args:
        w: ``(N, K)`` weight.
        h: ``(K, K)`` Hessian ``2/n X^T X`` of its inputs (not modified).
        scheme: bits, group size, symmetry.
        damp: relative dampening of ``diag(H)``.
        block_size: columns per lazy batch update.
        act_order: columns in order of decreasing ``H_jj``, with static groups.
        clip_search: each group's range shrunk to minimise its ``H``-weighted rounding
            error (:func:`search_group_params`) instead of the full min/max range.

    Returns:
        ``{"qweight", "scales", "zeros"}`` (packed format) plus ``"error"`` (the
        Hessian-weighted loss ``sum_j (w_j - q_j)^2 / [H^-1]_jj / 2`` of the
        OBS updates; with ``H = 2/n X^T X`` about ``||(W - Q) X^T||^2 / n``)
        and ``"dead"`` (inputs that were never active).

    Raises:
        SlimTuneError: ``damp`` is too small for the Hessian.
    """
    n, k = w.shape
    group_size = scheme.groups_of(k, where)
    w, h = w.detach().float().clone(), h.detach().float().clone()  # (N, K), (K, K)
    dead = prepare_hessian(w, h)
    static = act_order or group_size == k
    if clip_search:
        scales, zeros = search_group_params(w, h, scheme, group_size)  # (N, G): final when static, filled per group otherwise
    else:
        scales, zeros = group_params(w, scheme, group_size)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)  # (K,)
    hinv = inverse_cholesky(h[perm][:, perm], damp)  # (K, K)
    step = block_size if static else -(-block_size // group_size) * group_size  # dynamic groups never straddle blocks
    codes = torch.zeros(n, k, dtype=torch.int16, device=w.device)  # original column order
    zero_points = zeros.float() if zeros is not None else torch.full_like(scales, float(symmetric_zero(scheme.bits)))
    wp = w[:, perm]  # (N, K) permuted, updated in place
    pruned = wp == 0  # (N, K) zeros (pruning's, and dead inputs) stay zero: the zero code, their error compensated
    any_pruned = bool(pruned.any())
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    order = perm.tolist()  # column indices on the host: no device sync per column
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1, hinv1 = wp[:, i1:i2].clone(), hinv[i1:i2, i1:i2]  # (N, b), (b, b)
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // group_size
            if not static and col % group_size == 0:
                h_g = h[col:col + group_size, col:col + group_size] if clip_search else None
                scales[:, g], zero_points[:, g] = _dynamic_group(w1[:, i:i + group_size], scheme, group_size, h_g)
            c, q = round_column(w1[:, i], scales[:, g], zero_points[:, g], scheme.bits)  # (N,), (N,)
            if any_pruned:
                keep_zero = pruned[:, i1 + i]  # (N,)
                c, q = torch.where(keep_zero, zero_points[:, g], c), torch.where(keep_zero, 0.0, q)
            codes[:, col] = c.to(torch.int16)
            d = hinv1[i, i]
            err1[:, i] = (w1[:, i] - q) / d
            loss += err1[:, i].double().square().sum() / 2
            w1[:, i:] -= err1[:, i:i + 1] @ hinv1[i:i + 1, i:]  # (N, b - i)
        wp[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy update of the later columns
    zeros = zero_points.to(torch.uint8) if zeros is not None else None
    return {"qweight": pack_codes(codes, scheme.bits), "scales": scales, "zeros": zeros,
            "error": loss.item(), "dead": dead}


def _dynamic_group(w: torch.Tensor, scheme: QuantScheme, group_size: int,
                   h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``(N,)`` of one group ``(N, group_size)`` of updated columns (range searched on ``h``, its Hessian block, if given)."""
    group_size = w.shape[1]  # a short last group
    scales, zeros = search_group_params(w, h, scheme, group_size) if h is not None else group_params(w, scheme, group_size)  # (N, 1)
    zero = zeros.float() if zeros is not None else torch.full_like(scales, float(symmetric_zero(scheme.bits)))
    return scales[:, 0], zero[:, 0]


# --- the accumulator ------------------------------------------------------------

class GPTQ:
    """Accumulates the Hessian ``H = 2/n sum_x x x^T`` of one linear's inputs, then quantizes it.

    ``H`` is a running average over real (non-padding) tokens, float32 on the
    linear's device.
    """

    def __init__(self, linear: nn.Linear, where: str = ""):
        self.linear, self.where = linear, where
        self.h = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float32, device=linear.weight.device)  # (K, K)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        rows = real_tokens(x, token_mask).float().to(self.h.device)  # (n, K)
        if rows.shape[0] == 0:
            return
        total = self.tokens + rows.shape[0]
        self.h *= self.tokens / total
        rows = rows * (2.0 / total) ** 0.5
        self.h += rows.t() @ rows
        self.tokens = total

    def finalize(self, scheme: QuantScheme, damp: float = 0.01, block_size: int = 128, act_order: bool = True,
                 linear: nn.Linear | None = None, where: str | None = None, clip_search: bool = True) -> dict:
        """Packed tensors ``{"qweight", "scales", "zeros"}`` plus ``"error"``, ``"dead"`` and ``"tokens"``.

        Args:
            linear: another linear that reads the same inputs (default: the one accumulated for), named ``where``.
        """
        linear = linear if linear is not None else self.linear
        where = where if where is not None else self.where
        packed = gptq_quantize_weight(linear.weight, self.h, scheme, damp, block_size, act_order, where, clip_search)
        packed["tokens"] = self.tokens
        return packed


# --- model surgery -------------------------------------------------------------

def gptq_quantize_(model: nn.Module, batches: list[dict], schemes: dict[str, QuantScheme], damp: float = 0.01,
                   block_size: int = 128, act_order: bool = True, device: torch.device | str | None = None,
                   clip_search: bool = True) -> dict:
    """Quantize ``model``'s listed linears with GPTQ, block by block, in place.

    Each listed ``nn.Linear`` becomes a :class:`QuantLinear`; linears inside a
    transformer block get GPTQ on the inputs the already quantized blocks
    produce, the others (``lm_head``, a classifier) round-to-nearest.

    Args:
        model: a BERT- or Llama-family model (:mod:`slimtune.arch`).
        batches: calibration batches (dicts of model inputs; labels are ignored).
        schemes: ``{fully qualified linear name (as in named_modules()): scheme}``.
        damp, block_size, act_order, clip_search: see :func:`gptq_quantize_weight`.
        device: where blocks are calibrated (each moved there in turn); default where they are.

    Returns:
        ``{name: {"method": "gptq" | "rtn", "bits", "group_size", "symmetric", "error", ...}}``;
        ``error`` is GPTQ's Hessian-weighted loss, None for RTN.

    Raises:
        SlimTuneError: no calibration batches, or a name that is not a float linear
            (unknown, already quantized, another module type, or sharing its weight).
    """
    if not batches:
        raise SlimTuneError("calibration: GPTQ needs calibration batches and got none",
                            "set calibration.batches >= 1 and give the stage a split with examples")
    check_targets(model, schemes)
    inside, outside = split_by_block(model, schemes)
    report: dict[str, dict] = {}

    def process_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        targets = inside[i]
        for group in sequential_groups(model, i, targets):
            acc = GPTQ(block.get_submodule(group[0]), targets[group[0]])
            inputs.feed(block, {group[0]: acc})  # the inputs the already quantized groups produce
            for rel in group:
                name = targets[rel]
                linear = block.get_submodule(rel)
                stats = acc.finalize(schemes[name], damp, block_size, act_order, linear, name, clip_search)
                block.set_submodule(rel, QuantLinear.from_packed(linear, schemes[name], stats))
                report[name] = _entry("gptq", schemes[name], error=stats["error"], dead=stats["dead"], tokens=stats["tokens"])

    if any(inside):
        walk_blocks(model, batches, process_block, device)
    for name in outside:
        model.set_submodule(name, QuantLinear.from_linear(model.get_submodule(name), schemes[name], where=name))
        report[name] = _entry("rtn", schemes[name], error=None, reason="outside the transformer blocks (no captured inputs)")
    return report


def check_targets(model: nn.Module, schemes: dict[str, QuantScheme]) -> None:
    """Every name is a float ``nn.Linear`` of ``model`` whose weight is its own (not shared with another linear).

    Raises:
        SlimTuneError: naming the module and what to do.
    """
    modules = dict(model.named_modules())
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        if isinstance(module, nn.Linear):
            owners.setdefault(id(module.weight), []).append(name)
    for name in schemes:
        module = modules.get(name)
        if module is None:
            raise SlimTuneError(f"{name!r} is not a module of the model", "use names as in model.named_modules()")
        if isinstance(module, QuantLinear):
            raise SlimTuneError(f"{name} is already quantized", "quantize a model once; exclude modules that an earlier stage quantized")
        if not isinstance(module, nn.Linear):
            raise SlimTuneError(f"{name} is a {type(module).__name__}, not an nn.Linear", "list only linear layers")
        sharing = [other for other in owners[id(module.weight)] if other != name]
        if sharing:
            raise SlimTuneError(f"{name} shares its weight with {sharing}", "quantize shared weights without GPTQ, or unshare them first")


def sequential_groups(model: nn.Module, index: int, targets: dict[str, str]) -> list[tuple[str, ...]]:
    """The listed linears of block ``index`` (names relative to it) in true-sequential order.

    Groups of linears reading one input (:func:`slimtune.arch.input_groups`, in
    computation order) keep only their listed members; listed linears no group names come
    last, one group each.
    """
    groups = [tuple(rel for rel in g.linears if rel in targets) for g in input_groups(model, index)]
    groups = [g for g in groups if g]
    named = {rel for g in groups for rel in g}
    return groups + [(rel,) for rel in targets if rel not in named]


def split_by_block(model: nn.Module, schemes: dict[str, QuantScheme]) -> tuple[list[dict[str, str]], list[str]]:
    """``([{name relative to block i: full name}] per block, [names outside every block])``."""
    blocks = layers(model)
    names = {id(module): name for name, module in model.named_modules()}
    prefixes = [names[id(block)] + "." for block in blocks]
    inside: list[dict[str, str]] = [{} for _ in blocks]
    outside = []
    for name in schemes:
        index = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
        if index is None:
            outside.append(name)
        else:
            inside[index][name[len(prefixes[index]):]] = name
    return inside, outside


def _entry(method: str, scheme: QuantScheme, **stats) -> dict:
    return {"method": method, "bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric, **stats}
