"""``slimtune plan``: predict the per-device memory and the communication of a recipe's training, and measure them.

The plan covers one optimizer step of the task's finetune objective (what
the ``finetune`` stage trains) under each strategy, per device: parameters
(and buffers), gradients, optimizer state, activations (made in forward and
saved for backward), temporaries (made in backward: activation gradients,
FSDP gather and reduce buffers) and communication buffers (DDP's buckets),
split the way PyTorch's ``MemTracker`` splits them, so ``--measure`` can put
each beside its measurement.

**Sizes.** From the model's config and a weightless (meta device) copy of
its module tree: ``P`` parameter bytes (``P_pre`` registered before the
blocks, e.g. embeddings; ``P_blk`` per block; ``P_post`` after them, e.g.
pooler and head), ``h`` hidden, ``a`` heads, ``k`` key/value heads, ``i``
intermediate, ``L`` blocks, ``V`` vocabulary; ``b`` rows and ``s`` tokens
of one forward. ``s`` is ``task.max_length``, an upper bound: batches are
padded to their longest example (``--measure`` predicts at the longest
padded batch it drew).

**States** (fused AdamW: two fp32 states per parameter, ``O = 2G``; the
finetune objective trains every parameter, ``G = P``):

* single: ``P + G + O`` (the ``16Φ`` of Rajbhandari et al. 2020, ZeRO, for fp32).
* DDP: the same plus its gradient buckets, ``+G`` all the time (with
  ``gradient_as_bucket_view=False``, DDP's default, the reducer keeps a flat
  copy of every gradient).
* FSDP2 (one unit per block, the root holding the rest, ``R = P_pre + P_post``):
  ``(P + G + O) / N`` sharded, plus unsharded copies while a unit computes.
  ZeRO-3 (``reshard_after_forward: true``; the strategy passes it
  explicitly, so the root reshards after forward too): the root and, in
  backward, the current and the prefetched block. At the start of backward
  the root is gathered again while every activation is alive, and its
  all-gather output (``R``) and unsharded copy (``R``) coexist. At the end
  of backward its unsharded gradients, the reduce-scatter input and output
  (``R + R + R/N``) do. ZeRO-2 keeps all of ``P`` unsharded from forward to
  backward. ``cpu_offload`` moves the sharded ``(P + G + O) / N`` to host
  memory ("host"). bf16 recipes gather bf16 copies (fp16 ones keep fp32
  weights under autocast, as the strategy does).
* pipeline: stage ``r`` holds its contiguous share of the blocks (the first
  stage also ``P_pre``, the last ``P_post``).
* autocast (bf16/fp16, except FSDP bf16, which gathers bf16 weights already)
  saves a 16-bit copy of every ``nn.Linear`` weight for backward: ``+2`` bytes
  per linear weight, counted in activations.

**Activations** per block follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"): ``s b h (34 + 5 a s
/ h)`` bytes at 16 bit with 1-byte dropout masks, recounted for what
PyTorch saves. With ``e`` the bytes of a saved matmul input (4 fp32, 2
under autocast), ``m`` those of a dropout mask element (CUDA's fused dropout
keeps a bool, 1; on the CPU dropout multiplies by a noise tensor of its
input's dtype) and ``n_up`` the up-projections (2 for a gated MLP)::

    b s h [e c_in + e (1 + 2k/a)          block input (c_in copies under autocast: q, k, v cast it each); q, k, v
           + e + m                         attention output (out-projection input); its dropout mask
           + e c_up + 2 e n_up i/h         MLP input; activation input and output (gated: gate, up, act, product)
           + m + 4 n_norm]                 MLP dropout mask; norm inputs (fp32)   + 8 b s per LayerNorm (mean, rstd)
    + b a s² (4 + m + e)                   eager/math attention: fp32 softmax output, dropout mask, dropped probabilities
    | 4 b a s + e b s²                     fused sdpa: log-sum-exp, the padding mask as a bias

For fp32 on the CPU with dropout this is ``s b h (72 + 12 a s / h)``: the
paper's 16-bit terms double, and so do the masks. The CPU runs sdpa fused
only without attention dropout, and its math fallback in fp32 under
autocast. Outside the blocks: token ids, the embedding norm's input and
dropout mask, the last hidden state the head keeps, and for causal LMs
``b s V (e + 8)`` of logits and loss copies. Activation checkpointing keeps
``4 b s h`` per block (its input) plus one recomputed block. DDP/FSDP ranks
see ``b / N`` rows; a pipeline stage keeps its micro-batches in flight: all
``M`` under GPipe, ``min(M, W - r)`` at stage ``r`` under 1F1B.

**Temporaries** in a block's backward: the MLP's two intermediate-sized
gradients, ``2 e b s n_up i``.

**Peak.** The step is evaluated at the end of forward, in the backward of
the last and of the first block (the blocks above have made their
gradients, those below still hold activations; memory is linear in between),
at FSDP's root re-gather and reduce, and at the optimizer step; the largest
is the peak and names its phase.

**Communication** per optimizer step, bytes each rank sends with ring
collectives (Patarasuk & Yuan 2009), for ``A = train.grad_accum`` micro-batches
(both skip the gradient sync before the last micro-batch: DDP's ``no_sync``,
FSDP's ``set_requires_gradient_sync(False)``, which keeps unsharded gradients
meanwhile): DDP all-reduce ``2(N-1)/N · G``; FSDP all-gather ``A · (N-1)/N · P``
in forward and, for ZeRO-3, again in backward, plus one reduce-scatter
``(N-1)/N · G``; pipeline: each micro-batch's activation ``(b/M) s h · 4``
forward and its gradient back over each stage boundary.

**Validation** (``--measure``, measured total / predicted): on the CPU
(MemTracker, gloo), MiniLM on Rotten Tomatoes and on IMDB at s = 128 under
single, DDP x2, FSDP x2 (ZeRO-3, ZeRO-2, cpu offload, bf16), pipeline x2
(1F1B, GPipe), bf16, activation checkpointing and accumulation: 0.95 to
1.05 (accumulation measured before gradient sync was skipped between
micro-batches; since then, on the 2-layer test BERT with A = 2: DDP 0.98,
FSDP ZeRO-2 1.02, ZeRO-3 0.87). On one H200, a MiniLM-sized BERT in one process: 0.97 to 1.01 of
MemTracker, 1.01 to 1.19 of ``torch.cuda.max_memory_allocated``, which also
holds cuBLAS workspaces (about 65 MiB there) and allocator rounding, not
modeled. Not validated: gated MLPs, RMSNorm, rotary embeddings, causal-LM
heads, several GPUs.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from slimtune.distributed.modules import transformer_blocks
from slimtune.errors import LaunchError, RecipeError
from slimtune.recipe import Recipe

STRATEGIES = ("single", "ddp", "fsdp", "pipeline")
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries", "comm buffers")
# MemTracker's reference types -> plan categories.
TRACKED = {"Parameter": "parameters", "Buffer": "parameters", "Gradient": "gradients", "Optstate": "optimizer",
           "Activation": "activations", "Temp": "temporaries", "Other": "temporaries"}
WIRE_BYTES = 4  # pipeline activations travel as fp32
MiB = 2**20


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """What the prediction needs to know about a model (numbers of elements unless named bytes)."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    vocab: int
    input_projections: int  # linear layers reading the block input (q, k, v: 3; fused qkv: 1)
    up_projections: int  # 1: act(x W1) W2; 2: gated, act(x Wg) * (x Wu)
    block_norms: int
    pre_norms: int
    layer_norm: bool  # LayerNorm saves mean and rstd; RMSNorm its normalised input instead
    hidden_dropout: float
    attention_dropout: float
    attention: str  # config._attn_implementation
    pre_params: int  # registered before the blocks (embeddings)
    block_params: int  # one block
    post_params: int  # registered after the blocks (final norm, pooler, head)
    linear_weights: int  # weights of nn.Linear modules (autocast saves a 16-bit copy of each)
    param_tensors: int
    param_bytes: int  # bytes per parameter element
    buffer_bytes: int  # (packed quantized weights are buffers)
    # Parameters that train, as (before the blocks, one block, after them) and in how many tensors; None:
    # all of them (the finetune objective). A delta (LoRA, ...) on a frozen backbone trains only its own.
    trainable: tuple[int, int, int] | None = None
    trainable_tensors: int | None = None

    @property
    def params(self) -> int:
        return self.pre_params + self.layers * self.block_params + self.post_params

    @property
    def grad_params(self) -> tuple[int, int, int]:
        """Gradient elements before the blocks, per block, after them."""
        return self.trainable or (self.pre_params, self.block_params, self.post_params)

    @property
    def grads(self) -> int:
        pre, block, post = self.grad_params
        return pre + self.layers * block + post


def load_shape(recipe: Recipe, num_labels: int | None = None) -> ModelShape:
    """The recipe's model, built on the meta device (no weights are read)."""
    import transformers

    from slimtune.models import resolve_model_dir
    from slimtune.tasks import task_kind

    config = transformers.AutoConfig.from_pretrained(resolve_model_dir(recipe.model))
    if num_labels:
        config.num_labels = num_labels
    dtype = getattr(config, "dtype", None) or torch.float32  # from_pretrained loads the checkpoint's dtype
    with torch.device("meta"):
        model = getattr(transformers, task_kind(recipe.task.kind).auto_class).from_config(config, dtype=dtype)
    return model_shape(model)


def model_shape(model: nn.Module) -> ModelShape:
    """Read a ``transformers`` model's structure from its config and module tree (works on the meta device).

    The layout (projections, norms) is read from the bare backbone (without
    deltas, packed quantized linears counted as linears); parameter counts
    include the deltas, and when some parameters are frozen only those with
    ``requires_grad`` make gradients and optimizer state.
    """
    from slimtune.artifact import bare

    with bare(model):
        layout = _layout(model)
    blocks = transformer_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    regions: dict[str, list] = {"pre": [], "blocks": [], "post": []}
    seen_blocks = False
    for p in model.parameters():
        if id(p) in in_blocks:
            seen_blocks = True
            regions["blocks"].append(p)
        else:
            regions["post" if seen_blocks else "pre"].append(p)
    params = list(model.parameters())
    block_params = sum(p.numel() for p in blocks[0].parameters())
    trainable = None
    if not all(p.requires_grad for p in params):
        per_block = sum(p.numel() for p in blocks[0].parameters() if p.requires_grad)
        trainable = (sum(p.numel() for p in regions["pre"] if p.requires_grad), per_block,
                     sum(p.numel() for p in regions["post"] if p.requires_grad))
    return replace(layout, pre_params=sum(p.numel() for p in regions["pre"]), block_params=block_params,
                   post_params=sum(p.numel() for p in regions["post"]), param_tensors=len(params),
                   param_bytes=params[0].element_size(), buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
                   trainable=trainable, trainable_tensors=sum(p.requires_grad for p in params) if trainable else None)


def _layout(model: nn.Module) -> ModelShape:
    config = model.config
    blocks = transformer_blocks(model)
    blocks_name = next(name for name, m in model.named_modules() if m is blocks)
    in_blocks = {id(p) for p in blocks.parameters()}
    pre = post = 0
    seen_blocks = False
    for p in model.parameters():
        if id(p) in in_blocks:
            seen_blocks = True
        elif seen_blocks:
            post += p.numel()
        else:
            pre += p.numel()
    norms_before = [m for m in _before(model, blocks_name) if _is_norm(m)]
    block = blocks[0]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "QuantLinear"]
    norm_types = [type(m).__name__.lower() for m in block.modules() if _is_norm(m)]
    heads = config.num_attention_heads
    params = list(model.parameters())
    return ModelShape(
        hidden=config.hidden_size, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=config.intermediate_size, layers=len(blocks), vocab=config.vocab_size,
        input_projections=max(1, len([m for m in linears if m.in_features == config.hidden_size
                                      and m.out_features != config.intermediate_size]) - 1),  # less the out-projection
        up_projections=max(1, sum(m.out_features == config.intermediate_size for m in linears)),
        block_norms=len(norm_types), pre_norms=len(norms_before), layer_norm=not any("rms" in t for t in norm_types),
        hidden_dropout=_first_attr(config, ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop")),
        attention_dropout=_first_attr(config, ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")),
        attention=getattr(config, "_attn_implementation", None) or "eager",
        pre_params=pre, block_params=sum(p.numel() for p in block.parameters()), post_params=post,
        linear_weights=sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)),
        param_tensors=len(params), param_bytes=params[0].element_size(),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
    )


def _before(model: nn.Module, blocks_name: str):
    """Modules registered before the block list."""
    for name, m in model.named_modules():
        if name == blocks_name:
            return
        yield m


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False))


def _first_attr(config, names: tuple[str, ...]) -> float:
    return next((float(getattr(config, n)) for n in names if isinstance(getattr(config, n, None), (int, float))), 0.0)


# ---------------------------------------------------------------- activations


@dataclass(frozen=True)
class Compute:
    """How a forward stores its tensors on this device."""

    act: int  # bytes of a saved matmul input (4 fp32, 2 under bf16/fp16 autocast)
    cuda: bool
    fused: bool  # the attention kernel saves no (s, s) probabilities

    @classmethod
    def of(cls, shape: ModelShape, precision: str, device: str) -> "Compute":
        fused = shape.attention == "sdpa" and (device == "cuda" or shape.attention_dropout == 0)
        return cls(act=4 if precision == "fp32" else 2, cuda=device == "cuda", fused=fused)

    def mask(self, dropped: int) -> int:
        """Bytes per dropout-mask element: CUDA's fused dropout keeps a bool, the CPU a noise tensor like its input."""
        return 1 if self.cuda else dropped


def block_activations(shape: ModelShape, rows: int, seq: int, c: Compute) -> int:
    """Bytes one block saves for backward (Korthikanti et al. 2022, recounted for PyTorch; see the module docstring)."""
    h, a, e = shape.hidden, shape.heads, c.act
    casts = lambda n: 1 if e == 4 else n  # under autocast every projection saves its own 16-bit copy of a shared input
    ea = 4 if shape.attention == "sdpa" and not (c.fused or c.cuda) else e  # CPU autocast runs math sdpa in fp32
    hidden_mask = c.mask(e) if shape.hidden_dropout > 0 else 0  # dropout after a projection, on its output
    norm = 4 if shape.layer_norm else 8  # LayerNorm: its fp32 input; RMSNorm: input and normalised input
    per_element = (e * casts(shape.input_projections) + ea * (1 + 2 * shape.kv_heads / a)  # block input; q, k, v
                   + e + hidden_mask  # attention output (out-projection input), its dropout mask
                   + e * casts(shape.up_projections) + e * shape.up_projections * shape.intermediate / h * 2  # MLP in, act in/out
                   + hidden_mask + norm * shape.block_norms)
    tokens = rows * seq
    stats = (8 if shape.layer_norm else 4) * tokens * shape.block_norms
    if c.fused:  # the kernel's log-sum-exp, and the padding mask as an additive bias
        attention = 4 * rows * a * seq + e * rows * seq * seq
    else:  # softmax output (fp32), dropout mask, the dropped (or 16-bit) probabilities the second matmul saves
        dropout = shape.attention_dropout > 0
        attention = rows * a * seq * seq * (4 + (c.mask(4) if dropout else 0) + (ea if dropout or ea < 4 else 0))
    return int(per_element * tokens * h + stats + attention)


def block_temporaries(shape: ModelShape, rows: int, seq: int, c: Compute) -> int:
    """Transient gradients inside one block's backward: the MLP's two intermediate-sized gradients.

    The attention's score gradients (``2 b a s²``) come later in the block's
    backward, after the MLP's activations are freed; measured on MiniLM up
    to s = 256 they never raise the peak above this.
    """
    return int(c.act * rows * seq * 2 * shape.up_projections * shape.intermediate)


def pre_activations(shape: ModelShape, rows: int, seq: int, c: Compute) -> int:
    """Embeddings: token ids, the embedding norm's input and statistics, the dropout mask (on the fp32 norm output)."""
    tokens = rows * seq
    mask = c.mask(4) * tokens * shape.hidden if shape.hidden_dropout > 0 else 0
    return 8 * tokens + shape.pre_norms * (4 * tokens * shape.hidden + 8 * tokens) + mask


def post_activations(shape: ModelShape, rows: int, seq: int, c: Compute, kind: str) -> int:
    """The head: the last hidden state it keeps, and for causal LMs the logits and the loss's copies."""
    kept = 4 * rows * seq * shape.hidden
    if kind == "causal-lm":
        return kept + rows * seq * shape.vocab * (c.act + 8 + (4 if c.act < 4 else 0))
    return kept + 4 * rows * 4 * shape.hidden  # pooled features of a sequence head


@dataclass(frozen=True)
class Activations:
    """Activation sizes of one forward over some blocks (+ embeddings / head)."""

    block: int  # one block's saved tensors
    kept: int  # what a block keeps after its forward: all of it, or its input under checkpointing
    pre: int
    post: int
    temporaries: int
    blocks: int

    @classmethod
    def of(cls, shape: ModelShape, rows: int, seq: int, c: Compute, kind: str, blocks: int, checkpointing: bool,
           pre: bool = True, post: bool = True) -> "Activations":
        one = block_activations(shape, rows, seq, c)
        kept = 4 * rows * seq * shape.hidden if checkpointing else one
        return cls(one, kept, pre_activations(shape, rows, seq, c) if pre else 0,
                   post_activations(shape, rows, seq, c, kind) if post else 0, block_temporaries(shape, rows, seq, c), blocks)

    @property
    def forward_end(self) -> int:
        """Everything saved when forward ends."""
        return self.pre + self.blocks * self.kept + self.post

    def at_block(self, k: int) -> int:
        """Alive during block ``k``'s backward: the blocks below it kept, block ``k`` whole (recomputed), the embeddings."""
        return self.pre + k * self.kept + self.block


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Setup:
    """How the recipe trains: what the prediction depends on besides the model."""

    strategy: str
    world: int
    batch: int  # rows of one (global) batch
    grad_accum: int
    seq: int
    precision: str
    checkpointing: bool
    device: str
    kind: str
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    schedule: str = "1f1b"
    microbatches: int = 2

    @classmethod
    def of(cls, recipe: Recipe, strategy: str | None = None, world: int | None = None, seq: int | None = None,
           device: str | None = None) -> "Setup":
        d = recipe.distributed
        strategy = strategy or d.strategy
        world = 1 if strategy == "single" else world or d.world_size
        if device is None:
            device = "cuda" if recipe.train.device == "cuda" or (recipe.train.device == "auto" and torch.cuda.is_available()) else "cpu"
        return cls(strategy, world, recipe.train.batch_size, recipe.train.grad_accum, seq or recipe.task.max_length,
                   recipe.train.precision, recipe.train.activation_checkpointing, device, recipe.task.kind,
                   d.fsdp.reshard_after_forward, d.fsdp.cpu_offload, d.pipeline.schedule, d.pipeline.microbatches)

    @property
    def label(self) -> str:
        if self.strategy == "fsdp":
            return "fsdp " + ("ZeRO-3" if self.reshard_after_forward else "ZeRO-2") + (" + cpu offload" if self.cpu_offload else "")
        if self.strategy == "pipeline":
            return f"pipeline {self.schedule}, M={self.microbatches}"
        return self.strategy


@dataclass
class Prediction:
    """Predicted memory of one device (or of every rank alike: ``rank`` None) at each phase of a step."""

    strategy: str
    world: int
    rank: int | None
    rows: int  # batch rows of one forward on this rank
    seq: int
    phases: dict[str, dict[str, int]]  # phase -> category -> bytes on the device (and "host": bytes offloaded)
    comm: int = 0  # bytes this rank sends per optimizer step
    comm_formula: str = ""

    @property
    def phase(self) -> str:
        """When the device peak happens."""
        return max(self.phases, key=lambda k: sum(self.phases[k][c] for c in CATEGORIES))

    @property
    def memory(self) -> dict[str, int]:
        """Category -> bytes on the device at the peak."""
        return {c: self.phases[self.phase][c] for c in CATEGORIES}

    @property
    def host(self) -> int:
        return self.phases[self.phase].get("host", 0)

    @property
    def total(self) -> int:
        return sum(self.memory.values())


def check_pipeline(shape: ModelShape, world: int) -> None:
    if world > shape.layers:
        raise RecipeError(f"a pipeline of {world} stages needs at least {world} blocks, but the model has {shape.layers}",
                          f"use at most {shape.layers} processes (--nproc) for strategy pipeline")


def predict(shape: ModelShape, setup: Setup) -> list[Prediction]:
    """Peak memory per device and communication per step; one entry per distinct rank."""
    if setup.strategy not in STRATEGIES:
        raise RecipeError(f"unknown strategy {setup.strategy!r}", f"use one of: {', '.join(STRATEGIES)}")
    if setup.strategy == "pipeline":
        check_pipeline(shape, setup.world)
        return [_pipeline(shape, setup, r) for r in range(setup.world)]
    return [_data_parallel(shape, setup)]


def _states(shape: ModelShape, params: int, tensors: int, grads: int | None = None, grad_tensors: int | None = None) -> tuple[int, int, int]:
    """Bytes of parameters, gradients and AdamW state for ``params`` elements in ``tensors`` tensors
    (``grads`` of them in ``grad_tensors`` tensors train; default: all)."""
    p = params * shape.param_bytes
    g = (params if grads is None else grads) * shape.param_bytes
    return p, g, 2 * g + 4 * (tensors if grad_tensors is None else grad_tensors)


def _phases(phases: dict[str, dict[str, float]], static: dict[str, float]) -> dict[str, dict[str, int]]:
    """Every phase with every category, ``static`` (held all step long) added."""
    return {name: {c: int(static.get(c, 0) + v.get(c, 0)) for c in CATEGORIES} for name, v in phases.items()}


def _backward(shape: ModelShape, s: Setup, acts: Activations, copies: int, grads_sharded: float = 1.0) -> dict[str, dict]:
    """Forward's end, and backward through the last and the first block (memory is linear in the block index).

    At block ``k`` the blocks above it have made their gradients (``grads_sharded``:
    the fraction a rank keeps, 1/N under FSDP) and freed their activations.
    """
    pb = shape.param_bytes
    _, block_grads, post_grads = shape.grad_params
    accumulated = shape.grads * pb * grads_sharded if s.grad_accum > 1 else 0  # earlier micro-batches' gradients
    phases = {"forward end": dict(gradients=accumulated, activations=acts.forward_end + copies)}
    for k, name in ((shape.layers - 1, "backward, last block"), (0, "backward, first block")):
        done = (post_grads + (shape.layers - 1 - k) * block_grads) * pb * grads_sharded
        phases[name] = dict(gradients=max(done, accumulated), activations=acts.at_block(k) + copies * (k + 1) // shape.layers,
                            temporaries=acts.temporaries)
    return phases


def _data_parallel(shape: ModelShape, s: Setup) -> Prediction:
    n = s.world
    rows = math.ceil(s.batch / n)
    c = Compute.of(shape, s.precision, s.device)
    fsdp_dtype = 2 if s.strategy == "fsdp" and s.precision == "bf16" else shape.param_bytes  # build_strategy's param_dtype
    # Autocast's 16-bit weight copies; FSDP with param_dtype gathers 16-bit weights instead.
    copies = 2 * shape.linear_weights if s.precision != "fp32" and fsdp_dtype == shape.param_bytes else 0
    acts = Activations.of(shape, rows, s.seq, c, s.kind, shape.layers, s.checkpointing)
    P, G, O = _states(shape, shape.params, shape.param_tensors, shape.grads, shape.trainable_tensors)
    pre_grads = shape.grad_params[0] * shape.param_bytes
    if s.strategy in ("single", "ddp"):
        static = {"parameters": P + shape.buffer_bytes, "optimizer": O, "comm buffers": G if s.strategy == "ddp" else 0}
        phases = {
            **_backward(shape, s, acts, copies),
            # the embeddings' dense gradient, made last (and added to the earlier micro-batches' gradients)
            "backward end, embedding grads": dict(gradients=G if s.grad_accum > 1 else G - pre_grads, temporaries=pre_grads),
            "optimizer step": dict(gradients=G),
        }
        comm = 2 * (n - 1) / n * G  # once per step: earlier micro-batches run under no_sync
        formula = "all-reduce 2(N-1)/N x grads" if n > 1 else "none"
        return Prediction(s.label, n, None, rows, s.seq, _phases(phases, static), int(comm), formula)
    # FSDP2: sharded states; a unit's unsharded parameters while it computes (ZeRO-2: from forward to backward).
    zero3 = s.reshard_after_forward
    root = (shape.pre_params + shape.post_params) * fsdp_dtype
    root_grads = (shape.pre_params + shape.post_params) * shape.param_bytes
    block = shape.block_params * fsdp_dtype
    gathered = root if zero3 else shape.params * fsdp_dtype
    # Under accumulation the micro-batches before the last keep unsharded gradients (no reduce-scatter until the last).
    accumulating = s.grad_accum > 1
    backward = _backward(shape, s, acts, copies, 1.0 if accumulating else 1 / n)
    forward = {"forward end": backward.pop("forward end")}
    phases = {
        **{k: {**v, "parameters": 0 if zero3 else gathered} for k, v in forward.items()},  # ZeRO-3: the root resharded
        # the root gathered; under ZeRO-3 also this block and the prefetched one, with gather and gradient buffers
        **{k: {**v, "parameters": gathered + zero3 * 2 * block, "temporaries": v["temporaries"] + zero3 * 2 * block}
           for k, v in backward.items()},
        # the root's unsharded gradients, the reduce-scatter input (fp32) and output
        "backward end, root grads reduced": dict(gradients=G if accumulating else (G - root_grads) / n,
                                                 temporaries=root_grads * (2 + 1 / n)),
        "optimizer step": dict(gradients=G / n),
    }
    if zero3:  # the root is gathered again first in backward: its all-gather output and unsharded copy coexist
        phases["backward start, root re-gathered"] = dict(parameters=root, activations=acts.forward_end + copies, temporaries=root)
    phases = _phases(phases, {"parameters": P / n + shape.buffer_bytes, "optimizer": O / n})
    if s.cpu_offload:  # sharded parameters, their gradients and the optimizer state live in host memory
        for v in phases.values():
            v["host"] = int(P / n + v["gradients"] + v["optimizer"])
            v.update(parameters=int(v["parameters"] - P / n), gradients=0, optimizer=0)
    gathers = 2 if zero3 else 1
    comm = (n - 1) / n * (s.grad_accum * gathers * shape.params * fsdp_dtype + G)  # one reduce-scatter per step
    formula = f"({s.grad_accum} x {gathers} all-gather + 1 reduce-scatter) x (N-1)/N x params"
    return Prediction(s.label, n, None, rows, s.seq, phases, int(comm), formula)


def _pipeline(shape: ModelShape, s: Setup, rank: int) -> Prediction:
    from slimtune.distributed.pipeline import chunk_count, split_blocks

    w = s.world
    first, last = rank == 0, rank == w - 1
    blocks = len(split_blocks(shape.layers, w)[rank])
    chunks = chunk_count(s.batch, s.microbatches)
    rows = s.batch // chunks
    gpipe = s.schedule == "gpipe" or chunks < w
    in_flight = chunks if gpipe else min(chunks, w - rank)
    # gradients exist at the peak when earlier batches of the window, or 1F1B's steady state, went backward already
    steady = s.grad_accum > 1 or (not gpipe and chunks > in_flight)
    c = Compute.of(shape, s.precision, s.device)
    params = blocks * shape.block_params + first * shape.pre_params + last * shape.post_params
    P, G, O = _states(shape, params, 1)
    wire = rows * s.seq * shape.hidden * WIRE_BYTES
    acts = Activations.of(shape, rows, s.seq, c, s.kind, blocks, s.checkpointing, pre=first, post=last)
    received = 0 if first else wire  # the activation from the previous stage (its gradient flows back)
    copies = 2 * params * shape.linear_weights // max(shape.params, 1) if s.precision != "fp32" else 0
    static = dict(parameters=P + shape.buffer_bytes, optimizer=O)
    phases = {
        # the oldest micro-batch in backward, the others still holding everything they saved
        f"backward, {in_flight} micro-batch{'es' * (in_flight > 1)} in flight": dict(
            **static, gradients=G if steady else 0, temporaries=acts.temporaries,
            activations=(in_flight - 1) * (acts.forward_end + received) + acts.at_block(blocks - 1) + received + copies),
        "optimizer step": dict(**static, gradients=G),
    }
    if first:  # the embeddings' dense gradient, made last, added to the earlier micro-batches' gradients
        pre_grads = shape.pre_params * shape.param_bytes
        phases["backward end, embedding grads"] = dict(**static, gradients=G if s.grad_accum * chunks > 1 else G - pre_grads,
                                                       temporaries=pre_grads)
    comm = s.grad_accum * chunks * wire * ((not last) + (not first))
    formula = f"{s.grad_accum * chunks} micro-batches x {wire / MiB:.2f} MiB x (activation out + gradient back)"
    return Prediction(s.label, w, rank, rows, s.seq, _phases(phases, {}), int(comm), formula)


def plan(recipe: Recipe, shape: ModelShape, strategy: str | None = None, world: int | None = None,
         seq: int | None = None) -> list[Prediction]:
    """Predictions for ``strategy`` (default: every strategy that fits ``world``)."""
    world = world or recipe.distributed.world_size
    if strategy is not None:
        return predict(shape, Setup.of(recipe, strategy, world, seq))
    out = predict(shape, Setup.of(recipe, "single", 1, seq))
    if world > 1:
        out += predict(shape, Setup.of(recipe, "ddp", world, seq))
        for reshard in (True, False):
            setup = Setup.of(recipe, "fsdp", world, seq)
            out += predict(shape, Setup(**{**asdict(setup), "reshard_after_forward": reshard}))
        if world <= shape.layers:
            out += predict(shape, Setup.of(recipe, "pipeline", world, seq))
    return out


# ---------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """Peak memory one rank measured over ``steps`` optimizer steps."""

    rank: int
    seq: int  # longest padded sequence among the measured batches
    rows: int  # most rows of one batch
    memory: dict[str, int]  # category -> bytes on the training device at MemTracker's peak
    steps: int
    host: int = 0  # peak bytes on the CPU when training on CUDA (FSDP cpu_offload)
    cuda_peak: int | None = None  # torch.cuda.max_memory_allocated

    @property
    def total(self) -> int:
        return sum(self.memory.values()) + self.host


def _step_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class StepTracker(MemTracker):
        """``MemTracker`` for whole training steps.

        Two changes, both in MemTracker's private hooks: the same top-level
        module may run forward several times (micro-batches, pipeline
        schedules; MemTracker keeps per-module statistics for one iteration
        and refuses that, but only the device-wide peak is used here, so a
        module's statistics start afresh), and frozen parameters (a
        pipeline's placeholders) get no gradient hook, which PyTorch refuses.
        """

        def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
            sizes = super()._track_module_params_and_buffers(module, install_grad_hooks=False)

            def track(grad: torch.Tensor) -> None:
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            for p in module.parameters() if install_grad_hooks else ():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (p.register_hook(track),
                                                           p.register_post_accumulate_grad_hook(lambda q: track(q.grad)))
            return sizes

        def restart_peak(self) -> None:
            """Forget the peak so far (MemTracker has no public reset; its peak lives in two attributes)."""
            self._peak_mem_snap = self.get_tracker_snapshot("current")
            self._peak_mem = {dev: snap.get("Total", 0) for dev, snap in self._peak_mem_snap.items()}

    return StepTracker()


def measure(recipe: Recipe, strategy, steps: int, warmup: int = 2) -> Measurement:
    """Peak memory of ``steps`` optimizer steps of the task's finetune objective under ``strategy``.

    The model, the batches and the Trainer are the ones a run of the recipe
    uses (the source model, this rank's first accumulation windows).
    """
    from slimtune.data import load_task_data
    from slimtune.distributed.runner import _source_artifact
    from slimtune.distributed.trainer import Trainer
    from slimtune.tasks import Collator, task_kind

    data = load_task_data(recipe.task)
    artifact = _source_artifact(recipe, data.labels)
    collate = Collator(artifact.tokenizer, recipe.task.max_length, recipe.task.kind)
    trainer = Trainer(artifact.model, task_kind(recipe.task.kind).loss, recipe.train, strategy, collate)
    return measure_steps(trainer, _windows(strategy, data["train"], collate, recipe.train, warmup + steps), warmup)


def measure_steps(trainer, windows: list[list[dict]], warmup: int = 2) -> Measurement:
    """Peak memory of the Trainer's optimizer steps over ``windows`` after the first ``warmup`` of them.

    ``MemTracker`` follows every tensor made inside it plus the model and the
    optimizer it is given. The warm-up steps run inside it too (so it sees
    AdamW's state made and DDP's buckets rebuilt at the second forward),
    then its peak is restarted: the tracked steps are steady state.
    MemTracker files DDP's buckets under "Activation" (they are made in a
    forward); their size, from DDP's own logging data, is moved to "comm
    buffers". On CUDA the allocator's own peak is recorded too.
    """
    from transformers import get_linear_schedule_with_warmup

    strategy, cfg = trainer.strategy, trainer.config
    optimizer = trainer.optimizer(cfg.lr)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, len(windows))
    scaler = strategy.grad_scaler(cfg.precision == "fp16")
    cuda = strategy.device.type == "cuda"
    trainer.model.train()
    tracker = _step_tracker()
    tracker.track_external(trainer.model, optimizer)
    with tracker, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Module is None", UserWarning)  # MemTracker's hooks on modules a pipeline swapped out
        for i, window in enumerate(windows):
            if i == warmup:
                tracker.restart_peak()
                if cuda:
                    torch.cuda.synchronize(strategy.device)
                    torch.cuda.reset_peak_memory_stats(strategy.device)
            trainer._step(window, optimizer, schedule, scaler)
    memory, host = dict.fromkeys(CATEGORIES, 0), 0
    for device, snapshot in tracker.get_tracker_snapshot("peak").items():
        if device.type != strategy.device.type:
            host += snapshot.get("Total", 0)
            continue
        for ref, nbytes in snapshot.items():
            if ref != "Total":
                memory[TRACKED[getattr(ref, "value", ref)]] += nbytes
    buckets = min(ddp_bucket_bytes(trainer.model), memory["activations"])
    memory["activations"] -= buckets
    memory["comm buffers"] += buckets
    batches = [b for w in windows[warmup:] for b in w]
    return Measurement(strategy.rank, max(b["input_ids"].shape[1] for b in batches), max(len(b["input_ids"]) for b in batches),
                       memory, len(windows) - warmup, host, torch.cuda.max_memory_allocated(strategy.device) if cuda else None)


def _windows(strategy, examples: list, collate, cfg, count: int) -> list[list[dict]]:
    """The first ``count`` accumulation windows of this rank, as a real run draws them (epochs repeat if needed)."""
    windows, epoch = [], 0
    while len(windows) < count:
        batches = strategy.batches(examples, cfg.batch_size, True, cfg.seed, cfg.group_by_length, epoch)
        if not batches:
            raise RecipeError("the training split has no batch to measure", "raise task.limit or lower train.batch_size")
        for i in range(0, min(len(batches), (count - len(windows)) * cfg.grad_accum), cfg.grad_accum):
            windows.append([collate([examples[j] for j in batch]) for batch in batches[i : i + cfg.grad_accum]])
        epoch += 1
    return windows


def ddp_bucket_bytes(model: nn.Module) -> int:
    """Bytes of DDP's gradient buckets (0 for other modules), from DDP's logging data."""
    if not hasattr(model, "_get_ddp_logging_data"):
        return 0
    data = model._get_ddp_logging_data()
    sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or ""
    return sum(int(x) for x in str(sizes).split(",") if x.strip())


# ---------------------------------------------------------------- the command


@dataclass
class Report:
    """What ``slimtune plan`` shows: the setup, predictions, and measurements (with ``--measure``)."""

    recipe: str
    model: str
    params: int
    setup: dict
    predictions: list[Prediction]
    measurements: list[Measurement] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        for p, q in zip(out["predictions"], self.predictions):
            p.update(phase=q.phase, memory=q.memory, host=q.host, total=q.total)
        for m, q in zip(out["measurements"], self.measurements):
            m["total"] = q.total
        return out


def plan_command(recipe_ref: str, sets: list[str], nproc: int | None = None, strategy: str | None = None, measure_: bool = False,
                 steps: int = 3, measure_out: str | None = None) -> Report | None:
    """``slimtune plan``: predict (and with ``measure_`` measure); None on torchrun ranks that do not report."""
    from slimtune.distributed import launch
    from slimtune.distributed.runner import check_runtime
    from slimtune.stage import device_of

    validate_args(strategy, nproc, steps)
    recipe, shape, report = _load(recipe_ref, sets, nproc, strategy)
    if not measure_:
        report.predictions = plan(recipe, shape, strategy, recipe.distributed.world_size)
        return report
    check_runtime(recipe, device_of(recipe.train))  # a device or precision this machine lacks
    if launch.in_torchrun():
        return _measure_worker(recipe, steps, measure_out, report, shape)
    if recipe.distributed.world_size > 1:
        return _compare(report, recipe, shape, _launch_measure(recipe_ref, sets, recipe, steps))
    from slimtune.distributed.strategy import SingleDevice

    return _compare(report, recipe, shape, [measure(recipe, SingleDevice(device_of(recipe.train)), steps)])


def _load(recipe_ref: str, sets: list[str], nproc: int | None, strategy: str | None) -> tuple[Recipe, ModelShape, Report]:
    """The recipe with the flags applied, its model's shape, and an empty report."""
    from slimtune.data import load_task_data
    from slimtune.recipe import load_recipe, parse_set

    overrides = parse_set(sets)
    if nproc is not None:
        overrides["distributed.nproc"] = nproc
    if strategy is not None:
        overrides["distributed.strategy"] = strategy
    elif nproc is not None and nproc > 1 and load_recipe(recipe_ref, parse_set(sets)).distributed.strategy == "single":
        overrides["distributed.strategy"] = "ddp"  # as `slimtune run --nproc N` does
    recipe = load_recipe(recipe_ref, overrides)
    labels = load_task_data(recipe.task).labels if recipe.task.kind == "classification" else None
    shape = load_shape(recipe, len(labels) if labels else None)
    if recipe.distributed.strategy == "pipeline":
        check_pipeline(shape, recipe.distributed.world_size)
    train = recipe.train
    info = dict(batch=train.batch_size, seq=recipe.task.max_length, grad_accum=train.grad_accum, precision=train.precision,
                checkpointing=train.activation_checkpointing, device=Setup.of(recipe).device,
                world=recipe.distributed.world_size, attention=shape.attention)
    return recipe, shape, Report(recipe.name, recipe.model, shape.params, info, [])


def validate_args(strategy: str | None, nproc: int | None, steps: int) -> None:
    """Refuse flags that cannot make a plan; each error names the flag and the fix."""
    if strategy is not None and strategy not in STRATEGIES:
        raise RecipeError(f"unknown strategy {strategy!r}", f"use --strategy {' | '.join(STRATEGIES)}")
    if nproc is not None and nproc < 1:
        raise RecipeError(f"--nproc {nproc} must be at least 1", "give the number of processes on this machine, e.g. --nproc 2")
    if steps < 1:
        raise RecipeError(f"--steps {steps} must be at least 1", "measure at least one optimizer step, e.g. --steps 3")


def _compare(report: Report, recipe: Recipe, shape: ModelShape, measurements: list[Measurement]) -> Report:
    """Each rank's prediction at the longest padded sequence it measured (on the CPU, host and device are one)."""
    report.measurements = sorted(measurements, key=lambda m: m.rank)
    for m in report.measurements:
        setup = Setup.of(recipe, seq=m.seq)
        label = setup.label
        if setup.device == "cpu":
            setup = Setup(**{**asdict(setup), "cpu_offload": False})
        predictions = predict(shape, setup)
        prediction = predictions[m.rank] if len(predictions) > 1 else predictions[0]
        prediction.strategy = label
        report.predictions.append(prediction)
    return report


def _launch_measure(recipe_ref: str, sets: list[str], recipe: Recipe, steps: int) -> list[Measurement]:
    """Measure under torchrun on this machine; the ranks write their measurements to a file."""
    import tempfile

    from slimtune.distributed import launch
    from slimtune.stage import device_of

    config = recipe.distributed
    if config.nnodes > 1:
        raise LaunchError("--measure runs on one machine", "set distributed.nnodes to 1 (plan without --measure for several machines)")
    launch.check_launch(config.nproc, 1, device_of(recipe.train))
    with tempfile.TemporaryDirectory(prefix="slimtune-plan-") as tmp:
        out = Path(tmp) / "measurements.json"
        # torchrun's own parser would take `--nproc` for its `--nproc-per-node`: pass both as recipe settings.
        sets = [*sets, f"distributed.nproc={config.nproc}", f"distributed.strategy={config.strategy}"]
        args = ["plan", str(recipe_ref), *[a for s in sets for a in ("--set", s)], "--measure", "--steps", str(steps),
                "--measure-out", str(out), "--quiet"]
        launch.launch(args, config.nproc, run_id=f"plan-{recipe.name}")
        return [Measurement(**m) for m in json.loads(out.read_text())]


def _measure_worker(recipe: Recipe, steps: int, measure_out: str | None, report: Report, shape: ModelShape) -> Report | None:
    """One torchrun rank: join, measure, gather every rank's measurement on rank 0."""
    import torch.distributed as dist

    from slimtune.distributed import launch
    from slimtune.distributed.strategy import build_strategy
    from slimtune.stage import device_of

    device = launch.worker_device(device_of(recipe.train))
    with launch.process_group(device):  # left deliberately: FSDP2's state cycles must not outlive the group
        result = measure(recipe, build_strategy(recipe.distributed, device, recipe.train.precision), steps)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, asdict(result))
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if measure_out:
        Path(measure_out).write_text(json.dumps(gathered))
        return None
    return _compare(report, recipe, shape, [Measurement(**m) for m in gathered])


# ---------------------------------------------------------------- tables


def _unit(report: Report) -> tuple[str, int]:
    """MiB, or KiB when every number is small (tiny test models)."""
    largest = max([p.total + p.host for p in report.predictions] + [m.total for m in report.measurements])
    return ("MiB", MiB) if largest >= 10 * MiB else ("KiB", 2**10)


def _fmt(nbytes: float, unit: int) -> str:
    return f"{nbytes / unit:,.1f}"


def plan_table(report: Report):
    """The predictions as a rich table, one row per strategy (per rank for a pipeline)."""
    from rich.table import Table

    s = report.setup
    name, unit = _unit(report)
    table = Table(title=f"plan: {report.recipe} ({report.model}, {report.params / 1e6:.1f}M params), per device, {name}",
                  caption=_caption(s))
    short = {"parameters": "params", "gradients": "grads", "optimizer": "optimizer", "activations": "activations",
             "temporaries": "temps", "comm buffers": "comm buf"}
    for col in ("strategy", "rank", "rows x seq", *short.values(), "peak", "host", "peak at", "sent/step"):
        table.add_column(col, justify="left" if col in ("strategy", "peak at") else "right")
    for p in report.predictions:
        table.add_row(f"{p.strategy} x{p.world}", "all" if p.rank is None else str(p.rank), f"{p.rows} x {p.seq}",
                      *[_fmt(p.memory[c], unit) for c in CATEGORIES], _fmt(p.total, unit), _fmt(p.host, unit) if p.host else "",
                      p.phase, _fmt(p.comm, unit))
    return table


def _caption(s: dict) -> str:
    extra = ", activation checkpointing" if s["checkpointing"] else ""
    accum = f", grad_accum {s['grad_accum']}" if s["grad_accum"] > 1 else ""
    return (f"batch {s['batch']} (global), seq {s['seq']} = task.max_length (an upper bound: batches pad to their longest "
            f"example){accum}, {s['precision']}{extra}, {s['attention']} attention on {s['device']}")


def compare_table(report: Report):
    """Predicted beside measured peak memory, per category and rank."""
    from rich.table import Table

    pairs = list(zip(report.predictions, report.measurements))
    first, m0 = pairs[0]
    name, unit = _unit(report)
    notes = [f"{m0.steps} steps after 2 warm-up steps, measured by MemTracker",
             "each rank predicted at its longest padded batch: "
             + ", ".join(f"rank {m.rank} {m.rows} x {m.seq}, peak at {p.phase}" for p, m in pairs)]
    if first.strategy == "ddp":
        notes.append("DDP's buckets (size from its logging data) moved from activations to comm buffers")
    if report.setup["device"] == "cpu" and "offload" in first.strategy:
        notes.append("on the CPU host and device memory are one: offloaded states stay in their categories")
    table = Table(title=f"predicted vs measured peak memory, {name}: {first.strategy} x{first.world}, {report.recipe}",
                  caption="; ".join(notes))
    table.add_column("category")
    for m in report.measurements:
        for col in ("predicted", "measured", "meas/pred"):
            table.add_column(f"r{m.rank} {col}", justify="right")
    rows = [(c, [(p.memory[c], m.memory[c]) for p, m in pairs]) for c in CATEGORIES]
    if any(p.host or m.host for p, m in pairs):
        rows.append(("host (offloaded)", [(p.host, m.host) for p, m in pairs]))
    rows.append(("total", [(p.total + p.host, m.total) for p, m in pairs]))
    if any(m.cuda_peak for m in report.measurements):
        rows.append(("cuda max allocated", [(p.total, m.cuda_peak or 0) for p, m in pairs]))
    for row, values in rows:
        cells = []
        for predicted, measured in values:
            cells += [_fmt(predicted, unit), _fmt(measured, unit), f"{measured / predicted:.2f}" if predicted else "-"]
        table.add_row(row, *cells, style="bold" if row == "total" else None)
    return table
