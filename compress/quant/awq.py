"""AWQ: activation-aware weight quantization by per-input-channel scaling.

Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (arXiv:2306.00978); reference code
``mit-han-lab/llm-awq``, ``awq/quantize/auto_scale.py`` and ``auto_clip.py``.
A few input channels with large activations matter most; scaling them up in
the weight before round-to-nearest (``W * s``, columns) and down in the input
(``x / s``) cuts their relative rounding error. Per group of linears that
share one input,

    s(alpha) = mean|x|^alpha,  normalised by sqrt(max s * min s),
    alpha* = argmin_alpha  sum_j || x W_j^T - (x / s) Q(W_j * s)^T ||^2

over ``alpha = i / grid`` for ``i = 0 .. grid-1`` (as the reference; alpha = 0
is plain RTN, so on the calibration data the scale never does worse than RTN).
``1 / s`` is then folded into the op producing ``x`` (a norm's weight and
bias, or the rows and bias of a linear whose output reaches ``x`` linearly per
channel), so the float model is unchanged. Then, as the reference's
``auto_clip``, each group of ``W * s`` is clipped to the threshold
``max|W_g * s| * (1 - i / grid)``, ``i < grid / 2``, that minimises the error
of its partial outputs (not the attention query and key). The scaled, clipped
weights are quantized with RTN into ``QuantLinear`` modules. Which ops fold
is architecture knowledge: :func:`slimtune.arch.input_groups`.

Output errors are computed exactly over all calibration tokens from the
input's second-moment matrix ``H = E[x x^T]`` (``(K, K)``, as GPTQ's Hessian):
``E||x D^T||^2 = sum((D H) * D)`` for a weight error ``D``, which is cheaper
than replaying the tokens for every grid point. Calibration runs block by
block (:func:`slimtune.compress.quant.calibrate.walk_blocks`): block ``i`` is
searched on what the already quantized blocks before it produce; memory is
one ``(K, K)`` matrix per input group of one block.

Limits and differences from the reference:

* The scale's loss is the group's own linear outputs, not the output of the
  enclosing attention/MLP module (the reference's ``module2inspect``).
* Groups with no op to fold into (BERT's post-LN inputs, ``GELU`` outputs,
  ``o_proj`` under grouped-query attention), or whose parameters are shared
  with other layers (cross-layer sharing) or already quantized, are not
  scaled (only clipped); linears outside the blocks (LM head, classifier)
  get plain RTN.
* Clipping is symmetric (``[-t, t]``) for asymmetric schemes too, as the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune import arch
from slimtune.compress.prune.calibrate import real_tokens
from slimtune.compress.quant.calibrate import BlockInputs, walk_blocks
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.kernels.reference import code_range, symmetric_zero
from slimtune.compress.quant.rtn import QuantScheme, diagonal_blocks, group_errors, group_params, grouped


# --- pure tensor functions ----------------------------------------------------

def awq_scale(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel scale ``mean|x|^alpha`` normalised by ``sqrt(max * min)``.

    Args:
        x_mean: ``(K,)`` mean absolute input per channel.

    Returns:
        float32 ``(K,)`` positive scales (all ones for ``alpha = 0``).
    """
    s = x_mean.float().pow(alpha).clamp(min=1e-4)  # (K,)
    return s / (s.max() * s.min()).sqrt()


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, group_size: int) -> torch.Tensor:
    """RTN quantize-dequantize of ``w`` ``(N, K)``, bit-identical to :func:`slimtune.compress.quant.rtn.fake_quantize`.

    The searches call this hundreds of times per block; broadcasting over
    ``(N, G, g)`` groups avoids materialising per-column scales.
    """
    n, k = w.shape
    scales, zeros = group_params(w, scheme, group_size)  # (N, G)
    scale = scales[..., None]  # (N, G, 1)
    zero = float(symmetric_zero(scheme.bits)) if zeros is None else zeros.float()[..., None]
    lo, hi = code_range(scheme.bits)
    codes = torch.clamp(torch.round(grouped(w.float(), group_size) / scale) + zero, lo, hi)  # (N, G, g)
    return ((codes - zero) * scale).reshape(n, -1)[:, :k]


def output_error(delta: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Mean squared output error ``E[(x D^T)^2]`` of a weight error ``D`` ``(N, K)``, given ``H = E[x x^T]`` ``(K, K)``."""
    return ((delta @ H) * delta).sum() / delta.shape[0]


def quantized_error(H: torch.Tensor, w: torch.Tensor, scheme: QuantScheme, s: torch.Tensor | None = None,
                    max_val: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared output error of ``w`` quantized after scaling by ``s`` and clipping to ``max_val``.

    Args:
        H: ``(K, K)`` second moment ``E[x x^T]`` of the input.
        w: ``(N, K)`` float weight.
        s: ``(K,)`` scale (None = ones: plain RTN).
        max_val: ``(N, G)`` clipping threshold per group of ``w * s`` (None = no clipping).

    Returns:
        scalar ``E[(x W^T - (x / s) Q(clip(W * s))^T)^2]``.
    """
    w = w.float()
    s = torch.ones(w.shape[1], device=w.device) if s is None else s
    group_size = scheme.groups_of(w.shape[1])
    ws = w * s if max_val is None else clamp_groups(w * s, max_val, group_size)  # (N, K)
    return output_error(fake_quantize(ws, scheme, group_size) / s - w, H)


def search_scale(H: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor], schemes: list[QuantScheme],
                 grid: int = 20) -> tuple[float, torch.Tensor]:
    """AWQ's grid search over ``alpha = i / grid``, ``i = 0 .. grid-1``.

    The objective is the summed squared output error over all weights of the
    group (each weight's mean error times its output width); ties keep the
    smaller alpha.

    Args:
        H: ``(K, K)`` second moment ``E[x x^T]`` of the shared input.
        x_mean: ``(K,)`` mean ``|x|`` per channel.
        weights: float ``(N_j, K)`` weights reading that input, with their ``schemes``.

    Returns:
        ``(alpha, s (K,))``.
    """
    best = None
    for i in range(grid):
        s = awq_scale(x_mean, i / grid)
        total = sum(float(quantized_error(H, w, scheme, s)) * w.shape[0] for w, scheme in zip(weights, schemes))
        if best is None or total < best[0]:
            best = (total, i / grid, s)
    return best[1], best[2]


def clamp_groups(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clip each group of ``w`` ``(N, K)`` to ``[-max_val, max_val]`` (``max_val`` ``(N, G)``; the last group may be short)."""
    limit = max_val.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]  # (N, K)
    return torch.maximum(torch.minimum(w, limit), -limit)


@torch.no_grad()
def clip_search(H: torch.Tensor, w: torch.Tensor, scheme: QuantScheme, grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """AWQ's weight clipping search (the reference's ``auto_clip``): a threshold per group of ``w``.

    Each group's partial output ``x_g . w_g`` is compared with its quantized
    version for thresholds ``max|w_g| * (1 - i / grid)``, ``i < max_shrink * grid``
    (``i = 0``: no clipping); the error of group ``g`` needs only ``H``'s diagonal block ``H_gg``.

    Args:
        H: ``(K, K)`` second moment of the input ``w`` reads (already divided by the AWQ scale).
        w: ``(N, K)`` weight (already multiplied by it).

    Returns:
        float32 ``(N, G)`` thresholds for :func:`clamp_groups`.
    """
    w = w.float()
    group_size = scheme.groups_of(w.shape[1])
    H_gg = diagonal_blocks(H, group_size)  # (G, g, g)
    org_max = grouped(w, group_size).abs().amax(-1)  # (N, G)
    best, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(max(1, int(max_shrink * grid))):
        max_val = org_max * (1 - i / grid)
        delta = grouped(fake_quantize(clamp_groups(w, max_val, group_size), scheme, group_size) - w, group_size)
        err = group_errors(delta, H_gg)  # (N, G)
        better = err < best_err
        best_err[better], best[better] = err[better], max_val[better]
    return best


# --- calibration statistics -----------------------------------------------------

class InputStats:
    """Accumulates one input's mean ``|x|`` per channel and second moment ``H = E[x x^T]``.

    Fed by forward hooks (``add_batch(x, token_mask)``); padding tokens are left out.
    """

    def __init__(self, features: int):
        self.abs_sum: torch.Tensor | None = None  # (K,)
        self.gram: torch.Tensor | None = None  # (K, K): sum of x x^T
        self.features, self.count = features, 0

    def add_batch(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        x = real_tokens(x, token_mask).float()  # (n, K)
        if self.gram is None:
            self.abs_sum = torch.zeros(self.features, device=x.device)
            self.gram = torch.zeros(self.features, self.features, device=x.device)
        self.abs_sum += x.abs().sum(0)
        self.gram.addmm_(x.T, x)
        self.count += x.shape[0]

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean |x| (K,), H (K, K))``, float32."""
        if not self.count:
            raise SlimTuneError("AWQ calibration saw no tokens", "give calibration batches with real (non-padding) tokens")
        return self.abs_sum / self.count, self.gram / self.count


# --- folding (in place) ---------------------------------------------------------

@torch.no_grad()
def fold_scale_(prev: nn.Module, kind: str, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide ``prev``'s output by ``s`` and multiply the columns of ``linears`` by ``s``, in place.

    The float function is unchanged: ``linears`` see ``x / s`` and compute with ``W * s``.

    Args:
        prev: a LayerNorm/RMSNorm (``kind="norm"``: weight and bias divided) or a
            linear (``kind="linear"``: output rows and bias divided).
        linears: every linear that reads ``prev``'s output.
        s: ``(K,)`` positive scale.
    """
    if kind not in ("norm", "linear"):
        raise ValueError(f"cannot fold a scale into an op of kind {kind!r}")
    shape = (-1, 1) if kind == "linear" else (-1,)
    prev.weight.div_(s.to(prev.weight).view(shape))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias))
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight).view(1, -1))


# --- the model surgery ------------------------------------------------------------

def awq_quantize_(model: nn.Module, batches: list[dict], schemes: dict[str, QuantScheme], grid: int = 20,
                  clip: bool = True, device: torch.device | str | None = None) -> dict:
    """Quantize the linears named in ``schemes`` with AWQ, swapping them for ``QuantLinear`` in place.

    Block by block: collect each input group's statistics, search its scale
    and (``clip``) each weight's clipping thresholds on the block's float
    weights, fold the scales, then quantize the block's listed linears with RTN
    on the scaled, clipped weights. Unlisted linears sharing a listed one's
    input are scaled too (the model stays the same function) but stay float.
    Listed linears outside the blocks (LM head, classifier) get plain RTN.

    Args:
        model: a BERT- or Llama-family model (:mod:`slimtune.arch`).
        batches: calibration batches (dicts with ``input_ids``, ``attention_mask``, ...).
        schemes: fully qualified linear name -> its scheme.
        grid: number of alpha values searched (clipping tries ``grid / 2`` thresholds).
        clip: also search clipping thresholds (not for the attention query and key,
            whose product amplifies clipping errors - as the reference).
        device: where each block is calibrated (default: where it is); see :func:`walk_blocks`.

    Returns:
        ``{name: {"method": "awq"|"rtn", "alpha", "loss_rtn", "loss_awq"}}``: ``alpha`` is None
        where no scale was folded; the losses are the mean squared output error of
        plain RTN and of what is stored, over the calibration tokens (None where not measured).

    Raises:
        SlimTuneError: no calibration batches; a name that is not a module or not
            an ``nn.Linear`` (e.g. already quantized).
    """
    _check(model, batches, schemes, grid)
    names = {id(m): name for name, m in model.named_modules()}
    family = arch.family_of(model)
    search = _BlockSearch(grid, {family.q, family.k} if clip else None, _shared_parameters(model))
    report: dict[str, dict] = {}

    def process_block(index: int, block: nn.Module, inputs: BlockInputs) -> None:
        prefix = names[id(block)] + "."
        listed = {name[len(prefix):]: scheme for name, scheme in schemes.items() if name.startswith(prefix)}
        results = search.apply_(block, arch.input_groups(model, index), listed, inputs)
        for rel, scheme in listed.items():
            block.set_submodule(rel, QuantLinear.from_linear(block.get_submodule(rel), scheme, where=prefix + rel))
            report[prefix + rel] = results.get(rel, _rtn_entry())

    walk_blocks(model, batches, process_block, device)
    for name, scheme in schemes.items():
        if name not in report:  # outside the blocks
            model.set_submodule(name, QuantLinear.from_linear(model.get_submodule(name), scheme, where=name))
            report[name] = _rtn_entry()
    return report


class _BlockSearch:
    """AWQ's searches for one block at a time: scales per input group, then clipping per listed weight.

    Args:
        grid: alpha grid size (clipping tries half as many thresholds).
        no_clip: block-relative names never clipped; None: no clipping at all.
        shared: ids of parameters held by several modules (never rescaled).
    """

    def __init__(self, grid: int, no_clip: set[str] | None, shared: set[int]):
        self.grid, self.no_clip, self.shared = grid, no_clip, shared

    @torch.no_grad()
    def apply_(self, block: nn.Module, groups: list[arch.InputGroup], listed: dict[str, QuantScheme],
               inputs: BlockInputs) -> dict[str, dict]:
        """Search on the block's float weights, then clip and fold in place; returns per-linear results."""
        groups = [g for g in groups if any(rel in listed for rel in g.linears)]
        stats = {g.linears[0]: InputStats(block.get_submodule(g.linears[0]).in_features) for g in groups}
        inputs.feed(block, stats)
        results, folds, clips = {}, [], []
        for g in groups:
            members = [rel for rel in g.linears if rel in listed]
            x_mean, H = stats[g.linears[0]].finalize()
            weights = [block.get_submodule(rel).weight.detach().float() for rel in members]
            alpha, s = None, torch.ones_like(x_mean)
            if _foldable(block, g, self.shared):
                alpha, s = search_scale(H, x_mean, weights, [listed[r] for r in members], self.grid)
                folds.append((g, s))
            for rel, w in zip(members, weights):
                results[rel], max_val = self._clip(rel, H, w, listed[rel], alpha, s)
                if max_val is not None:
                    clips.append((block.get_submodule(rel), s, max_val, listed[rel]))
        for linear, s, max_val, scheme in clips:  # in the unscaled coordinates, before the folds multiply by s
            w = linear.weight.float() * s
            linear.weight.copy_(clamp_groups(w, max_val, scheme.groups_of(w.shape[1])) / s)
        for g, s in folds:
            fold_scale_(block.get_submodule(g.prev), g.kind, [block.get_submodule(rel) for rel in g.linears], s)
        return results

    def _clip(self, rel: str, H: torch.Tensor, w: torch.Tensor, scheme: QuantScheme, alpha: float | None,
              s: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """One weight's result entry and clipping thresholds (None: not clipped)."""
        clipped = self.no_clip is not None and rel not in self.no_clip
        max_val = clip_search(H / torch.outer(s, s), w * s, scheme, self.grid) if clipped else None
        searched = alpha is not None or clipped
        entry = {"method": "awq" if searched else "rtn", "alpha": alpha, "loss_rtn": float(quantized_error(H, w, scheme)),
                 "loss_awq": float(quantized_error(H, w, scheme, s, max_val)) if searched else None}
        return entry, max_val


def _foldable(block: nn.Module, group: arch.InputGroup, shared: set[int]) -> bool:
    """A scale folds when there is an op to fold into, all ops are float, and no parameter is shared elsewhere."""
    if group.prev is None:
        return False
    prev = block.get_submodule(group.prev)
    linears = [block.get_submodule(rel) for rel in group.linears]
    if group.kind == "linear" and not isinstance(prev, nn.Linear):
        return False
    if not all(isinstance(m, nn.Linear) for m in linears):
        return False
    params = [p for m in [prev, *linears] for p in m.parameters()]
    return not any(id(p) in shared for p in params)


def _shared_parameters(model: nn.Module) -> set[int]:
    """Ids of parameters that more than one module holds (cross-layer sharing, tied weights)."""
    seen, shared = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared



def _rtn_entry() -> dict:
    return {"method": "rtn", "alpha": None, "loss_rtn": None, "loss_awq": None}


def _check(model: nn.Module, batches: list[dict], schemes: dict[str, QuantScheme], grid: int) -> None:
    """Validate everything before the model is touched."""
    if not batches:
        raise SlimTuneError("AWQ needs calibration data, but no calibration batches were given",
                            "set the quantize stage's calibration data (a few hundred samples)")
    if grid < 1:
        raise SlimTuneError(f"AWQ grid={grid} must be at least 1", "use the default grid of 20")
    for name, scheme in schemes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SlimTuneError(f"AWQ: the model has no module {name!r}", "check the module names (print(model))") from None
        if isinstance(module, QuantLinear):
            raise SlimTuneError(f"AWQ: {name} is already quantized", "quantize a module only once; exclude it")
        if not isinstance(module, nn.Linear):
            raise SlimTuneError(f"AWQ: {name} is a {type(module).__name__}, not a linear layer",
                                "list only nn.Linear modules")
