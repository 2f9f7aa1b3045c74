"""Importance scores of attention heads, FFN neurons and whole blocks, for structured pruning.

Three methods, each giving one score per unit (higher = keep):

* ``weight`` - the L2 norm of the weights a unit owns, no data. A query head
  owns its ``q`` rows, its ``o`` columns and the ``k``/``v`` rows of the
  key/value head it reads (shared by its group under grouped-query attention,
  so they shift a whole group equally); a neuron owns its rows of every FFN
  input (gate and up, or the one dense) and its column of the FFN output.
* ``activation`` - the mean over calibration tokens (padding excluded) of the
  L2 norm of a head's context vector (the input of ``o``, one head's slice),
  or of a neuron's absolute activation (the input of the FFN output).
* ``gradient`` - Michel, Levy & Neubig (2019), "Are Sixteen Heads Really
  Better than One?": a gate ``xi`` of ones multiplies each unit's output and
  ``I = sum_examples |dL_x/dxi|``, the absolute value taken per example (so
  examples pulling a gate in opposite directions do not cancel, as they would
  in ``|dL_batch/dxi|``). ``L_x`` is example ``x``'s summed loss: its
  cross-entropy (classification), the sum of its tokens' negative
  log-likelihoods (causal LM). One backward per batch gives every example's
  gradient: the gate has a batch dimension, ``xi`` of shape ``(B, units)``
  with row ``b`` gating example ``b`` only, and the loss differentiated is the
  batch's summed loss ``loss * n``, whose gradient in row ``b`` is
  ``dL_b/dxi_b`` because examples do not interact in a transformer. (A loss
  coupling the examples of a batch, such as the contrastive loss of embedding
  tasks, gets the gradient through each example's own activations.) Neurons
  get the same gate on their activation (a first-order Taylor score,
  Molchanov et al., 2019).

Layers (whole blocks): ``activation`` is the block influence of ShortGPT (Men
et al., 2024), ``mean_tokens(1 - cos(x_in, x_out))`` over the block's input and
output hidden states; ``gradient`` gates the block's residual update,
``x_in + xi (x_out - x_in)``, and scores ``sum_examples |dL_x/dxi|`` as for heads.
``weight`` has no layer score (callers must name the layers instead).

Gates and recorders are forward (pre-)hooks, removed when scoring ends; the
model's parameters, ``requires_grad`` flags and train/eval mode are restored.
All scores come from one pass over the batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slimtune import arch
from slimtune.tasks import model_inputs

METHODS = ("gradient", "weight", "activation")
LAYER_SCORES = {"activation": "block_influence", "gradient": "gradient"}


@dataclass
class Scores:
    """Per block: ``heads[i]`` (query heads,), ``neurons[i]`` (FFN neurons,); ``layers`` (blocks,). None where not asked."""

    heads: list[torch.Tensor] | None = None
    neurons: list[torch.Tensor] | None = None
    layers: torch.Tensor | None = None


# ---------------------------------------------------------------- pure tensor functions

def head_weight_norms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """(heads,) L2 norm of [q rows, k and v rows of its kv head, o columns] of each query head.

    Shapes: q (heads*head_dim, hidden), k and v (kv_heads*head_dim, hidden), o (hidden, heads*head_dim).
    """
    q2 = q.float().view(heads, head_dim, -1).pow(2).sum((1, 2))  # (heads,)
    kv2 = (k.float().view(kv_heads, head_dim, -1).pow(2).sum((1, 2))
           + v.float().view(kv_heads, head_dim, -1).pow(2).sum((1, 2)))  # (kv_heads,)
    o2 = o.float().view(o.shape[0], heads, head_dim).pow(2).sum((0, 2))  # (heads,)
    return (q2 + kv2.repeat_interleave(heads // kv_heads) + o2).sqrt()


def neuron_weight_norms(inputs: Iterable[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """(n,) L2 norm of each neuron's rows of the input weights (n, hidden) and its column of output (hidden, n)."""
    squares = output.float().pow(2).sum(0)  # (n,)
    for w in inputs:
        squares = squares + w.float().pow(2).sum(1)
    return squares.sqrt()


def unit_norms(x: torch.Tensor, units: int) -> torch.Tensor:
    """(N, units*width) -> (N, units): L2 norm of each unit's slice of every token."""
    return x.float().view(x.shape[0], units, -1).norm(dim=-1)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """(N, hidden), (N, hidden) -> (N,): ShortGPT's 1 - cos(x_in, x_out) per token."""
    return 1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)


# ---------------------------------------------------------------- accumulators

class MeanAccumulator:
    """Mean over calibration tokens of a per-token, per-unit score: ``add_batch`` then ``finalize``."""

    def __init__(self):
        self.total = None
        self.tokens = 0

    def add_batch(self, per_token: torch.Tensor) -> None:
        """(N, ...) scores of N tokens."""
        batch_sum = per_token.detach().sum(0)
        self.total = batch_sum if self.total is None else self.total + batch_sum
        self.tokens += per_token.shape[0]

    def finalize(self) -> torch.Tensor:
        return self.total.cpu() / max(self.tokens, 1)


class Calibration:
    """The token mask of the batch being run, shared by the hooks: (B, T) -> selects real tokens."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (N, D) states of unpadded tokens (all tokens when the mask does not fit)."""
        if self.mask is not None and self.mask.shape == x.shape[:2]:
            return x[self.mask.bool()]
        return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------- hook sites

def _block_io(args: tuple, kwargs: dict, output) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states entering and leaving a block (blocks return a tensor or a tuple led by one)."""
    x_in = args[0] if args else kwargs["hidden_states"]
    x_out = output[0] if isinstance(output, tuple) else output
    return x_in, x_out


def _replace_block_output(output, x_out: torch.Tensor):
    return (x_out, *output[1:]) if isinstance(output, tuple) else x_out


def _head_gate(gate: torch.Tensor, head_dim: int):
    def hook(module, args):  # input of o: (B, T, heads*head_dim); gate (B, heads)
        return (args[0] * gate.to(args[0].dtype).repeat_interleave(head_dim, dim=1)[:, None, :], *args[1:])
    return hook


def _neuron_gate(gate: torch.Tensor):
    def hook(module, args):  # input of the FFN output: (B, T, neurons); gate (B, neurons)
        return (args[0] * gate.to(args[0].dtype)[:, None, :], *args[1:])
    return hook


def _layer_gate(gate: torch.Tensor):
    def hook(module, args, kwargs, output):  # hidden states (B, T, hidden); gate (B,)
        x_in, x_out = _block_io(args, kwargs, output)
        return _replace_block_output(output, x_in + gate.to(x_out.dtype)[:, None, None] * (x_out - x_in))
    return hook


def _unit_recorder(calibration: Calibration, accumulator: MeanAccumulator, units: int):
    def hook(module, args):
        accumulator.add_batch(unit_norms(calibration.tokens(args[0]), units))
    return hook


def _influence_recorder(calibration: Calibration, accumulator: MeanAccumulator):
    def hook(module, args, kwargs, output):
        x_in, x_out = _block_io(args, kwargs, output)
        accumulator.add_batch(block_influence(calibration.tokens(x_in), calibration.tokens(x_out)))
    return hook


@contextlib.contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _scoring_mode(model: nn.Module):
    """Eval mode and frozen parameters while scoring; both restored afterwards."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------- drivers

def weight_scores(model: nn.Module, heads: bool = True, neurons: bool = True) -> Scores:
    """Data-free L2 weight norms of every head and neuron."""
    scores = Scores()
    with torch.no_grad():
        if heads:
            scores.heads = [head_weight_norms(a.q.weight, a.k.weight, a.v.weight, a.o.weight, a.heads, a.kv_heads, a.head_dim).cpu()
                            for a in (arch.attention(model, i) for i in range(arch.num_layers(model)))]
        if neurons:
            scores.neurons = [neuron_weight_norms([w.weight for w in f.inputs], f.output.weight).cpu()
                              for f in (arch.ffn(model, i) for i in range(arch.num_layers(model)))]
    return scores


def activation_scores(model: nn.Module, batches: list[dict], heads: bool = True, neurons: bool = True,
                      layers: bool = False) -> Scores:
    """Mean activation norms of heads and neurons, and ShortGPT block influence, over ``batches``."""
    n, calibration = arch.num_layers(model), Calibration()
    acc = {kind: [MeanAccumulator() for _ in range(n)] for kind, asked in
           (("heads", heads), ("neurons", neurons), ("layers", layers)) if asked}
    handles = []
    for i in range(n):
        if heads:
            att = arch.attention(model, i)
            handles.append(att.o.register_forward_pre_hook(_unit_recorder(calibration, acc["heads"][i], att.heads)))
        if neurons:
            out = arch.ffn(model, i).output
            handles.append(out.register_forward_pre_hook(_unit_recorder(calibration, acc["neurons"][i], out.in_features)))
        if layers:
            handles.append(arch.layers(model)[i].register_forward_hook(_influence_recorder(calibration, acc["layers"][i]), with_kwargs=True))
    device = next(model.parameters()).device
    with _hooks(handles), _scoring_mode(model), torch.no_grad():
        for batch in batches:
            batch = _to_device(batch, device)
            calibration.mask = batch.get("attention_mask")
            model(**model_inputs(batch))
    scores = Scores()
    if heads:
        scores.heads = [a.finalize() for a in acc["heads"]]
    if neurons:
        scores.neurons = [a.finalize() for a in acc["neurons"]]
    if layers:
        scores.layers = torch.stack([a.finalize() for a in acc["layers"]])
    return scores


def _add_gates(model: nn.Module, examples: int, heads: bool, neurons: bool, layers: bool,
               device: torch.device) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Per-example gates of ones on every asked-for unit: ``{kind: per block (examples, units)}`` and the hook handles."""
    n = arch.num_layers(model)
    gates: dict[str, list[torch.Tensor]] = {}
    handles = []

    def ones(*shape):
        return torch.ones(examples, *shape, device=device, requires_grad=True)

    if heads:
        atts = [arch.attention(model, i) for i in range(n)]
        gates["heads"] = [ones(a.heads) for a in atts]
        handles += [a.o.register_forward_pre_hook(_head_gate(g, a.head_dim)) for a, g in zip(atts, gates["heads"])]
    if neurons:
        outs = [arch.ffn(model, i).output for i in range(n)]
        gates["neurons"] = [ones(o.in_features) for o in outs]
        handles += [o.register_forward_pre_hook(_neuron_gate(g)) for o, g in zip(outs, gates["neurons"])]
    if layers:
        gates["layers"] = [ones() for _ in range(n)]
        handles += [b.register_forward_hook(_layer_gate(g), with_kwargs=True) for b, g in zip(arch.layers(model), gates["layers"])]
    return gates, handles


def gradient_scores(model: nn.Module, batches: list[dict], loss_fn: Callable, heads: bool = True,
                    neurons: bool = True, layers: bool = False) -> Scores:
    """Michel et al. (2019) gate gradients ``sum_examples |dL_x/dxi|`` of heads, neurons and block updates.

    ``loss_fn(model, batch) -> (loss, n)`` as the task kinds' ``loss`` (the mean over ``n`` examples or tokens;
    ``loss * n`` is the batch's summed loss). One backward per batch (module docstring).
    """
    device = next(model.parameters()).device
    totals: dict[str, list[torch.Tensor]] = {}
    with _scoring_mode(model), torch.enable_grad():
        for batch in batches:
            batch = _to_device(batch, device)
            gates, handles = _add_gates(model, len(batch["input_ids"]), heads, neurons, layers, device)
            with _hooks(handles):
                loss, count = loss_fn(model, batch)
                grads = torch.autograd.grad(loss * count, [g for gs in gates.values() for g in gs], allow_unused=True)
            totals = totals or {kind: [torch.zeros_like(g[0]) for g in gs] for kind, gs in gates.items()}
            for total, grad in zip((t for ts in totals.values() for t in ts), grads):
                if grad is not None:
                    total += grad.abs().sum(0)  # (B, units) -> (units,): |per-example gradient|, summed
    scores = Scores(**{kind: [t.cpu() for t in ts] for kind, ts in totals.items() if kind != "layers"})
    if layers:
        scores.layers = torch.stack(totals["layers"]).cpu()
    return scores


def importance_scores(model: nn.Module, method: str, batches: list[dict] | None = None, loss_fn: Callable | None = None,
                      heads: bool = True, neurons: bool = True, layers: bool = False) -> Scores:
    """Scores of the asked-for units by ``method`` (see the module docstring); inputs are validated by the caller."""
    if method == "weight":
        return weight_scores(model, heads, neurons)
    if method == "activation":
        return activation_scores(model, batches, heads, neurons, layers)
    return gradient_scores(model, batches, loss_fn, heads, neurons, layers)
