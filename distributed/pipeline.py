"""Pipeline parallelism: the transformer blocks split over ranks, micro-batches flowing through them.

GPipe (Huang et al., 2019) and 1F1B (PipeDream-Flush; Narayanan et al., 2021)
schedules from ``torch.distributed.pipelining``. The world is the pipeline:
rank ``r`` of ``W`` is stage ``r`` and there is no data-parallel dimension.
Every rank reads the same global batch; each batch of an accumulation window
is cut into ``microbatches`` equal chunks along dim 0 that flow through the
stages.

How the model is split, without naming any architecture:

* ``transformer_blocks(model)`` is divided into ``W`` contiguous, near-equal
  ranges. Rank 0 also owns every parameter registered before the blocks
  (embeddings), the last rank every parameter registered after them (final
  norm, pooler, head). A parameter registered in both places (a tied input
  embedding / LM head) is owned by both ranks; its gradients are summed over
  its owners before the optimizer step, so the copies stay identical.
* A stage calls the *whole* model through the task's own ``loss_fn`` (so the
  Trainer's autocast, the task's call and its loss apply unchanged) while the
  model's block list is temporarily swapped for its stage view: blocks it
  does not own become ``Skip`` (pass the hidden state through), the first
  owned block of a later stage is wrapped in ``Inject`` (replaces its hidden
  state input with the activation received from the previous stage) and the
  last owned block of an earlier stage in ``Stop`` (ends the call with its
  output, which is sent on). Attention masks and rotary position embeddings
  are recomputed by the model's own forward on every stage, from the same
  micro-batch. Only the last stage runs the head and the loss; the schedule
  backpropagates ``scale(loss * units)`` with ``scale_grads=False``, so
  gradients are sums over units like every other strategy's.
* Parameters a rank does not own are shape-only placeholders (one element,
  expanded): the embeddings a later stage runs before its first block see
  zeros, whose output ``Inject`` discards. ``unwrap`` broadcasts every
  parameter from its owner so each rank can evaluate the full model;
  training drops the copies again.

Activations travel as ``(rows, seq, config.hidden_size)`` fp32 tensors
(lossless for bf16/fp16; ``Inject`` casts back to the dtype the block saw).

Distillation: a frozen teacher runs outside the pipeline. Either the
teacher's outputs are computed before the step and travel in the batch (any
tensor in the batch, rows first, is chunked with it and reaches the loss on
the last stage), or the loss function calls the teacher itself *after* the student;
earlier stages stop inside the student call, so only the last stage runs it
(and only it needs the teacher's weights).

Every rank builds the full model on the CPU before ``prepare`` releases
what it does not own (peak host memory: one model per rank).

Limits: the loss function must call the model exactly once; blocks must take
and return the hidden state as a tensor (the transformers 5 convention; a
mismatch raises); the sequence length of the hidden state must be that of
``input_ids`` (no prepended virtual tokens); dropout draws different masks
than one process would; a batch whose rows do not divide by ``microbatches``
is cut into fewer chunks (the largest divisor), run with GPipe if that is
fewer than the stages 1F1B needs; losses that couple the examples of a batch
(contrastive) see micro-batches, as under gradient accumulation; every
stage needs a trainable parameter (the Trainer refuses an empty optimizer);
a checkpoint resumes on the same number of stages only. Evaluation runs the
full model on every rank. Built on the static-shape ``PipelineStage`` of
torch 2.13.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from slimtune.distributed.modules import blocks_share_parameters, transformer_blocks
from slimtune.distributed.strategy import AgreedGradScaler, Strategy
from slimtune.errors import SlimTuneError

SCHEDULES = ("gpipe", "1f1b")


def split_blocks(n_blocks: int, stages: int) -> list[range]:
    """Contiguous, near-equal block ranges, one per stage (earlier stages take the remainder)."""
    if n_blocks < stages:
        raise SlimTuneError(f"the model has {n_blocks} blocks, fewer than the {stages} pipeline stages",
                            "run the pipeline on at most as many processes as the model has blocks")
    size, extra = divmod(n_blocks, stages)
    bounds = [0]
    for r in range(stages):
        bounds.append(bounds[-1] + size + (r < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def parameter_owners(model: nn.Module, blocks: nn.ModuleList, ranges: list[range]) -> dict[str, frozenset[int]]:
    """The stages that use each parameter, by every name it has (a tied parameter: all its users).

    Block parameters belong to the stage of their block; the others to the
    first stage if registered before the blocks, to the last if after.
    """
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    stage_of_block = {i: r for r, blocks_range in enumerate(ranges) for i in blocks_range}
    by_param: dict[int, frozenset[int]] = {}
    names, seen_blocks, last = [], False, len(ranges) - 1
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in block_of:
            seen_blocks, stage = True, stage_of_block[block_of[id(p)]]
        else:
            stage = last if seen_blocks else 0
        by_param[id(p)] = by_param.get(id(p), frozenset()) | {stage}
        names.append((name, id(p)))
    return {name: by_param[key] for name, key in names}


def placeholder(p: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A zero tensor of ``p``'s shape and dtype holding one element."""
    return torch.zeros((), dtype=p.dtype, device=device).expand(p.shape)


class _StageEnd(BaseException):
    """Raised by ``Stop`` to end a stage's forward with its last block's output.

    A ``BaseException``, so no ``except Exception`` in the model or the loss
    function swallows it.
    """

    def __init__(self, hidden: torch.Tensor):
        super().__init__("pipeline stage ends here")
        self.hidden = hidden


def _hidden_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


class Skip(nn.Module):
    """A block another stage runs: passes the hidden state through."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]


class Inject(nn.Module):
    """The first block of a later stage: runs on the received activation instead of its input."""

    def __init__(self, block: nn.Module, activation: torch.Tensor):
        super().__init__()
        self.block = block
        self.activation = activation  # (rows, T, H), from the previous stage

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if hidden.shape != self.activation.shape:
            raise RuntimeError(f"pipeline: the block input has shape {tuple(hidden.shape)}, the received activation "
                               f"{tuple(self.activation.shape)}; the blocks must take and return the hidden state tensor")
        # A view, never the received leaf itself: autocast caches its cast of a leaf that requires grad
        # (as for weights), which would sum the block's input gradients in bf16/fp16.
        return self.block(self.activation.to(hidden.dtype).view_as(hidden), *args[1:], **kwargs)


class Stop(nn.Module):
    """The last block of an earlier stage: ends the model call with its hidden state."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        raise _StageEnd(_hidden_of(self.block(*args, **kwargs)))


class PipelineModel(nn.Module):
    """One rank's view of the model: the full module tree, only this stage's parameters materialized.

    ``model`` is the caller's module (its parameters' storage is replaced, the
    objects stay). ``gather_`` fetches every parameter from its owner,
    ``release_`` drops the others again.
    """

    def __init__(self, model: nn.Module, rank: int, world_size: int, device: torch.device):
        super().__init__()
        self.model = model
        self.rank, self.world_size, self.device = rank, world_size, device
        blocks = transformer_blocks(model)
        self.blocks_name = next(name for name, m in model.named_modules() if m is blocks)
        if blocks_share_parameters(blocks):
            raise SlimTuneError(f"{type(model).__name__} shares parameters across blocks, which a pipeline cannot split",
                                "use the ddp or fsdp strategy for this model")
        hidden_size = getattr(model.config, "hidden_size", None) if hasattr(model, "config") else None
        if hidden_size is None:
            raise SlimTuneError(f"{type(model).__name__} has no config.hidden_size (the width of the activations "
                                "between stages)", "use the ddp or fsdp strategy for this model")
        self.hidden_size = hidden_size
        self.ranges = split_blocks(len(blocks), world_size)
        self.stage_range = self.ranges[rank]
        self.owners = parameter_owners(model, blocks, self.ranges)
        self.param_owners = {id(p): self.owners[name] for name, p in model.named_parameters(remove_duplicate=False)}
        self.trainable = {id(p): p.requires_grad for p in model.parameters()}
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.wire_dtype = torch.promote_types(dtype, torch.float32)
        self.full = True
        for b in model.buffers():
            b.data = b.data.to(device)
        for p in model.parameters():
            if self.owns(p):
                p.data = p.data.to(device)
        self.release_()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_name)

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def owns(self, p: torch.Tensor) -> bool:
        return self.rank in self.param_owners[id(p)]

    def owner(self, p: torch.Tensor) -> int:
        return min(self.param_owners[id(p)])

    def shared(self) -> list[tuple[nn.Parameter, frozenset[int]]]:
        """Parameters used by several stages, with their owners."""
        return [(p, self.param_owners[id(p)]) for p in self.model.parameters() if len(self.param_owners[id(p)]) > 1]

    def release_(self) -> None:
        """Drop the parameters this stage does not use (placeholders, no gradient)."""
        if not self.full:
            return
        for p in self.model.parameters():
            if not self.owns(p):
                p.data = placeholder(p, self.device)
            p.requires_grad_(self.owns(p) and self.trainable[id(p)])
        self.full = False

    @torch.no_grad()
    def gather_(self) -> None:
        """Give every rank every parameter's current value, broadcast from its owner (collective)."""
        if self.full:
            return
        for p in self.model.parameters():
            value = p.data.contiguous() if self.owns(p) else torch.empty(p.shape, dtype=p.dtype, device=self.device)
            dist.broadcast(value, src=self.owner(p))
            p.data = value
        self.full = True

    def full_tensor(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The owner's value of state-dict entry ``name`` (collective for parameters)."""
        if name not in self.owners:
            return value.detach()
        owners = self.owners[name]
        full = value.detach().contiguous() if self.rank in owners else torch.empty(value.shape, dtype=value.dtype, device=self.device)
        dist.broadcast(full, src=min(owners))
        return full

    def owned_state(self) -> dict[str, torch.Tensor]:
        """The state-dict entries this rank holds real values for (its parameters, all buffers)."""
        return {k: v for k, v in self.model.state_dict().items() if k not in self.owners or self.rank in self.owners[k]}

    @contextlib.contextmanager
    def stage_view(self, received: torch.Tensor | None):
        """Swap the block list for this stage's view: Skip / Inject / Stop around the owned blocks."""
        blocks = self.blocks
        original = list(blocks)
        first, last = self.stage_range[0], self.stage_range[-1]
        skip = Skip()
        try:
            for i in range(len(blocks)):
                if i not in self.stage_range:
                    blocks[i] = skip
            if received is not None:
                blocks[first] = Inject(blocks[first], received)
            if not self.is_last:
                blocks[last] = Stop(blocks[last])
            yield
        finally:
            for i, block in enumerate(original):
                blocks[i] = block

    def stage_forward(self, received: tuple[torch.Tensor, ...], batch: dict, loss_fn) -> torch.Tensor | tuple[torch.Tensor, int]:
        """This stage's part of ``loss_fn(model, batch)``: the activation to send on, or (loss, units) on the last stage."""
        rows, seq = batch["input_ids"].shape
        with self.stage_view(received[0] if received else None):
            try:
                out = loss_fn(self.model, batch)
            except _StageEnd as end:
                expected = (rows, seq, self.hidden_size)
                if tuple(end.hidden.shape) != expected:
                    raise RuntimeError(f"pipeline: stage {self.rank} produced an activation of shape {tuple(end.hidden.shape)}, "
                                       f"expected {expected} (batch rows, input_ids length, config.hidden_size)") from None
                return end.hidden.to(self.wire_dtype)
        if not self.is_last:
            raise RuntimeError("pipeline: the loss function returned without calling the model")
        return out

    def forward(self, *args, **kwargs):
        raise RuntimeError("a PipelineModel runs through Pipeline.forward_backward; call Pipeline.unwrap(model) for the full model")


class StageStep(nn.Module):
    """The module a ``PipelineStage`` runs for one step: the stage's part of ``loss_fn``.

    The last stage returns each micro-batch's summed loss ``loss * units``
    and records it (and ``units``) for the report.
    """

    def __init__(self, pipeline: PipelineModel, loss_fn):
        super().__init__()
        self.pipeline = pipeline
        self.loss_fn = loss_fn
        self.records: list[tuple[torch.Tensor, int]] = []

    def forward(self, *received: torch.Tensor, batch: dict) -> torch.Tensor:
        out = self.pipeline.stage_forward(received, batch, self.loss_fn)
        if not self.pipeline.is_last:
            return out
        loss, n = out
        summed = loss.float() * n
        self.records.append((summed.detach(), n))
        return summed


def chunk_count(rows: int, microbatches: int) -> int:
    """The most equal chunks (at most ``microbatches``) ``rows`` divides into."""
    return max(d for d in range(1, min(rows, microbatches) + 1) if rows % d == 0)


@dataclass
class Pipeline(Strategy):
    """Pipeline parallelism over the default process group: one stage per rank.

    Args:
        schedule: ``"gpipe"`` (all forwards, then all backwards) or ``"1f1b"``
            (one forward, one backward in the steady state: activations of at
            most ``stages`` micro-batches alive).
        microbatches: chunks each batch of a window is cut into along dim 0.
    """

    name = "pipeline"
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    schedule: str = "1f1b"
    microbatches: int = 2

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise SlimTuneError(f"unknown pipeline schedule {self.schedule!r}",
                                f"set distributed.pipeline.schedule to one of {', '.join(SCHEDULES)}")
        if self.microbatches < 1:
            raise SlimTuneError(f"distributed.pipeline.microbatches={self.microbatches} must be at least 1")
        if self.schedule == "1f1b" and self.microbatches < self.world_size:
            raise SlimTuneError(f"1f1b needs at least one micro-batch per stage: distributed.pipeline.microbatches="
                                f"{self.microbatches} < {self.world_size} stages",
                                f"set distributed.pipeline.microbatches >= {self.world_size} or schedule: gpipe")

    @classmethod
    def from_process_group(cls, device: torch.device, **options) -> "Pipeline":
        if not dist.is_initialized():
            raise RuntimeError(f"{cls.__name__} needs torch.distributed.init_process_group() first")
        return cls(device, dist.get_rank(), dist.get_world_size(), **options)

    @property
    def last(self) -> int:
        return self.world_size - 1

    def prepare(self, model: nn.Module) -> PipelineModel:
        pipeline = self._model = PipelineModel(model, self.rank, self.world_size, self.device)
        # One process group per set of ranks sharing a parameter (created on every rank, in the same order).
        self._groups = {}
        for owners in sorted({tuple(sorted(o)) for _, o in pipeline.shared()}):
            self._groups[owners] = None if len(owners) == self.world_size else dist.new_group(list(owners))
        return pipeline

    def unwrap(self, model: PipelineModel) -> nn.Module:
        model.gather_()
        return model.model

    def finalize(self, model: PipelineModel) -> nn.Module:
        model.gather_()
        for p in model.model.parameters():
            p.requires_grad_(model.trainable[id(p)])
        return model.model.cpu()

    def full_state_dict(self, model: PipelineModel, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        """Each selected entry broadcast from its owner; ``keep`` must select the same keys on every rank."""
        return {k: model.full_tensor(k, v).cpu() for k, v in model.model.state_dict().items() if keep is None or keep(k)}

    def forward_backward(self, model: PipelineModel, window: list[dict], loss_fn, scale) -> tuple[float, int]:
        """Every batch of ``window`` through the pipeline; (summed loss, units) of the window, on every rank."""
        model.release_()
        scale(torch.zeros((), device=self.device))  # the scaler starts lazily; earlier stages never scale a loss
        step = StageStep(model, loss_fn)
        for batch in window:
            self._run_batch(step, self.to_device(batch), scale)
        self._sum_shared_grads(model)
        report = torch.zeros(2, dtype=torch.float64, device=self.device)
        if model.is_last:
            report[0] = torch.stack([s for s, _ in step.records]).sum().item() if step.records else 0.0
            report[1] = sum(n for _, n in step.records)
        dist.broadcast(report, src=self.last)
        return report[0].item(), int(report[1].item())

    def _run_batch(self, step: StageStep, batch: dict, scale) -> None:
        """One batch through the pipeline, in equal chunks.

        Shapes change from batch to batch (length grouping, a short last
        batch), so each batch gets a stage with its static shapes; left to
        infer them, the schedule would run an extra forward and backward.
        """
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        rows, seq = batch["input_ids"].shape
        chunks = chunk_count(rows, self.microbatches)
        activation = torch.empty(rows // chunks, seq, step.pipeline.hidden_size, dtype=step.pipeline.wire_dtype, device=self.device,
                                 requires_grad=True)  # its gradient travels back
        stage = PipelineStage(step, self.rank, self.world_size, self.device,
                              input_args=activation if self.rank > 0 else (),
                              output_args=torch.empty((), device=self.device) if step.pipeline.is_last else activation)
        kind = Schedule1F1B if self.schedule == "1f1b" and chunks >= self.world_size else ScheduleGPipe
        # The stage output on the last rank already is the summed loss; the schedule only scales it.
        schedule = kind(stage, n_microbatches=chunks, loss_fn=lambda summed, _rows: scale(summed), scale_grads=False)
        target = torch.arange(rows, device=self.device) if step.pipeline.is_last else None  # required by the schedule, unused
        schedule.step(batch=batch, target=target, return_outputs=False)

    def _sum_shared_grads(self, model: PipelineModel) -> None:
        """Sum the gradients of parameters several stages use over those stages."""
        for p, owners in model.shared():
            if not (p.requires_grad and model.owns(p)):
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self._groups[tuple(sorted(owners))])

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip by the global norm over every rank's gradients, each shared parameter counted once."""
        grads = [p.grad for p in params if p.grad is not None and self._model.owner(p) == self.rank]
        local = torch.stack([g.detach().float().norm() ** 2 for g in grads]).sum() if grads else torch.zeros((), device=self.device)
        dist.all_reduce(local)
        total = local.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def grad_scaler(self, enabled: bool) -> AgreedGradScaler:
        return AgreedGradScaler(self.device.type, enabled=enabled)

    def reduce(self, value: float) -> float:
        """Every rank already has the same losses (broadcast from the last stage)."""
        return value

    def checkpoint_state(self, model: PipelineModel, optimizer: torch.optim.Optimizer) -> dict:
        """Each rank's own parameters and optimizer state under their names (shared ones identical on their owners).

        The optimizer's parameter groups list this rank's names, so they are
        kept per rank; a checkpoint resumes on the same number of stages.
        """
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        model.release_()
        optim = get_optimizer_state_dict(model, optimizer)
        groups = {f"stage{self.rank}": optim["param_groups"]}
        return {"model": model.owned_state(), "optim": {"state": optim["state"], "param_groups": groups}}

    def load_checkpoint_state(self, model: PipelineModel, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        self.restore(model, state["model"])
        optim = {"state": state["optim"]["state"], "param_groups": state["optim"]["param_groups"][f"stage{self.rank}"]}
        set_optimizer_state_dict(model, optimizer, optim)

    def snapshot(self, model: PipelineModel) -> dict:
        return {k: v.detach().clone() for k, v in model.owned_state().items()}

    @torch.no_grad()
    def restore(self, model: PipelineModel, snapshot: dict) -> None:
        model.release_()  # other stages' copies would be stale
        for k, v in model.owned_state().items():
            if v.data_ptr() != snapshot[k].data_ptr():
                v.copy_(snapshot[k])
