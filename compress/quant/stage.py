"""The ``quantize`` stage and ``quantize_``, its Python verb: every weight-quantization method behind one config.

* ``rtn``: round to nearest (rtn.py); ``gptq``: Hessian-guided rounding from
  calibration batches (gptq.py); ``awq``: activation-aware channel scaling
  searched on calibration batches, then RTN (awq.py). Calibration walks the
  model block by block (calibrate.py).
* ``qat: {epochs: N, distill: true}``: train with fake quantization and a
  straight-through estimator through the Trainer (optionally distilling from
  the float model), then convert to the same packed format (qat.py).
* ``activations: 8``: W8A8, dynamic per-token INT8 activations (8-bit weights).
* ``embeddings: 8 | 4``: row-wise quantization of the word embedding (and of
  an LM head tied to it).

Which linears: by default every ``nn.Linear`` inside the transformer blocks;
``include`` chooses among all linears instead (globs, or regexes written
``re:<pattern>``), ``exclude`` drops some, ``lm_head: true`` adds the LM head,
and ``overrides`` (pattern -> bits/group_size/symmetric, first match wins)
changes the scheme of some. Each chosen ``nn.Linear`` is swapped for a
``QuantLinear``; the artifact records the swaps and stores the packed tensors.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.recipe import Strict
from slimtune.registry import MODULE_TYPES, register_stage
from slimtune.stage import CompositionError, ModelState, StageContext, StageResult
from slimtune.compress.prune.masks import matches, target_linears
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.rtn import QuantScheme
from slimtune.compress.recover import RecoverConfig, frozen_copy, recover

log = logging.getLogger(__name__)


class Calibration(Strict):
    """Which batches GPTQ and AWQ calibrate on."""

    batches: int = Field(16, ge=1, description="number of batches (train.eval_batch_size examples each)")
    split: Literal["train", "validation", "test"] = "train"


class Override(Strict):
    """A per-module change of scheme; fields left out keep the stage's value."""

    bits: int | None = None
    group_size: int | Literal["channel"] | None = None
    symmetric: bool | None = None


class QuantizeConfig(Strict):
    """``quantize: {method: gptq, bits: 4, group_size: 128}`` (see the module docstring)."""

    method: Literal["rtn", "gptq", "awq"] = "rtn"
    bits: int = Field(4, description="weight bits: 4 or 8")
    group_size: int | Literal["channel"] | None = Field(
        None, description="32, 64 or 128 inputs per scale, or channel (one scale per output channel); default 128 for 4 bits, channel for 8")
    symmetric: bool | None = Field(None, description="symmetric codes (no zero points); default: false for 4 bits "
                                   "(min/max per group, uint8 zero points), true for 8 bits")
    activations: Literal[8] | None = Field(None, description="8: W8A8 with dynamic per-token INT8 activations")
    include: list[str] | None = Field(None, description="globs or re:regexes over module names, chosen among all linears")
    exclude: list[str] = Field(default_factory=list, description="globs or re:regexes of linears to keep in float")
    lm_head: bool = Field(False, description="also quantize the LM head (opt-in)")
    embeddings: Literal[4, 8] | None = Field(None, description="row-wise quantization of the word embedding (opt-in)")
    overrides: dict[str, Override] = Field(default_factory=dict, description="pattern -> {bits, group_size, symmetric}; first match wins")
    calibration: Calibration = Calibration()
    damp: float = Field(0.01, gt=0, lt=1, description="gptq: Hessian damping, a fraction of its mean diagonal")
    block_size: int = Field(128, ge=1, description="gptq: columns per lazy block update")
    act_order: bool = Field(True, description="gptq: quantize columns by decreasing Hessian diagonal (static groups)")
    clip_search: bool = Field(True, description="gptq: shrink each group's range to minimise its Hessian-weighted rounding error")
    grid: int = Field(20, ge=2, description="awq: points of the scale-exponent (and clipping) search")
    clip: bool = Field(True, description="awq: also search a clipping range per group")
    qat: RecoverConfig | None = Field(None, description="quantization-aware training before converting, e.g. {epochs: 1, distill: true}")

    @model_validator(mode="after")
    def _consistent(self):
        self.scheme()  # unsupported bits / group size
        for pattern, override in self.overrides.items():
            self.scheme(override)
        if self.activations and (self.bits != 8 or any(o.bits not in (None, 8) for o in self.overrides.values())):
            raise ValueError("activations: 8 (W8A8) needs 8-bit weights; set bits: 8")
        if self.qat is not None and self.method != "rtn":
            raise ValueError(f"qat: training converts with round-to-nearest; use method: rtn (not {self.method}) with qat")
        return self

    def scheme(self, override: Override | None = None) -> QuantScheme:
        """The scheme of the stage, or of a module the ``override`` matches.

        An override that changes ``bits`` takes the defaults of its bits for
        the fields it leaves out (8 bits: per channel, symmetric; 4 bits:
        groups of 128, asymmetric).
        """
        bits, group_size, symmetric = self.bits, self.group_size, self.symmetric
        if override is not None:
            if override.bits is not None and override.bits != bits:
                bits, group_size, symmetric = override.bits, None, None
            group_size = override.group_size if override.group_size is not None else group_size
            symmetric = override.symmetric if override.symmetric is not None else symmetric
        if group_size is None:
            group_size = 128 if bits == 4 else "channel"
        try:
            return QuantScheme(bits, None if group_size == "channel" else group_size, symmetric)
        except SlimTuneError as err:
            raise ValueError(f"{err.message} ({err.hint})") from None


def quantize_config(**fields) -> QuantizeConfig:
    """A validated :class:`QuantizeConfig`; bad values raise :class:`SlimTuneError` naming the field."""
    return QuantizeConfig.from_fields(fields, "see help(slimtune.compress.quantize_)")


# ---------------------------------------------------------------- choosing modules

def select_schemes(model: nn.Module, config: QuantizeConfig) -> dict[str, QuantScheme]:
    """``{linear name: scheme}`` of the linears the config quantizes.

    Raises:
        SlimTuneError: a chosen module is already quantized, a group size does
            not divide a chosen linear's inputs, nothing is chosen, or the LM
            head is asked for alone while tied to the embedding.
    """
    _refuse_quantized(model, config)
    chosen = dict(target_linears(model, config.include, config.exclude))
    head = _lm_head_name(model)
    if config.lm_head and head is None:
        raise SlimTuneError("lm_head: this model has no LM head", "remove lm_head: true")
    wanted = config.lm_head or (head in chosen and config.include is not None)
    if head is not None and wanted and _head_is_tied(model):
        if config.embeddings is None:
            raise SlimTuneError(f"lm_head: the LM head ({head}) shares its weight with the word embedding",
                                "quantize both at once with embeddings: 8 (or 4), or exclude it")
        wanted = False  # quantize_embedding_ quantizes the tied head with the table
    chosen.pop(head, None)
    if wanted:
        chosen[head] = model.get_submodule(head)
    schemes = {}
    for name, linear in chosen.items():
        scheme = config.scheme(next((o for p, o in config.overrides.items() if matches(name, [p])), None))
        scheme.groups_of(linear.in_features, name)
        schemes[name] = scheme
    return schemes


def _refuse_quantized(model: nn.Module, config: QuantizeConfig) -> None:
    done = [n for n, m in model.named_modules() if type(m).__name__ in MODULE_TYPES]
    if config.include:
        done = [n for n in done if matches(n, config.include)]
    done = [n for n in done if not matches(n, config.exclude)]
    if done:
        raise SlimTuneError(f"{done[0]} is already quantized ({len(done)} quantized module(s) chosen)",
                            "quantize the float model once, or exclude the quantized modules")


def _lm_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.weight.shape[0] != getattr(model.config, "vocab_size", -1):
        return None
    return next(n for n, m in model.named_modules() if m is head)


def _head_is_tied(model: nn.Module) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight is embedding.weight


# ---------------------------------------------------------------- quantizing (the Python verb)

def quantize_(model: nn.Module, config: QuantizeConfig | None = None, batches: list[dict] | None = None, **fields) -> dict:
    """Quantize ``model`` in place after training (PTQ); returns a JSON-serialisable report.

    Args:
        model: a transformers model (BERT or Llama family for GPTQ/AWQ; any model for RTN).
        config: a :class:`QuantizeConfig`, or its fields as keyword arguments
            (``quantize_(model, method="gptq", bits=4, group_size=128, batches=...)``).
        batches: calibration batches (Collator output) for GPTQ and AWQ.

    Returns:
        ``{"method", "modules": {name: {"bits", "group_size", "symmetric", ...}}, "embedding", "bytes_before", "bytes_after"}``.

    Raises:
        SlimTuneError: a bad field (named), missing calibration batches, or a chosen module already quantized.
    """
    config = config or quantize_config(**fields)
    if config.qat is not None:
        raise SlimTuneError("qat: quantization-aware training runs in the recipe stage",
                            "in Python, call prepare_qat_(model, schemes), train, then convert_qat_(model)")
    schemes = select_schemes(model, config)
    sharers = weight_sharers(model, schemes)
    if config.method != "rtn" and sharers:
        name, others = next(iter(sharers.items()))
        raise SlimTuneError(f"method {config.method}: {name} shares its weight with {others} (cross-layer sharing); "
                            f"{config.method} calibrates each layer on its own inputs",
                            "quantize shared layers with method: rtn (or qat), which quantizes each shared weight once")
    before = weight_bytes(model)
    if config.method != "rtn" and not batches:
        raise SlimTuneError(f"calibration: method {config.method} needs calibration batches",
                            "pass batches=[...] (Collator output), or use method: rtn")
    stats = _quantize_linears_(model, config, schemes, batches)
    schemes, stats = tie_sharers_(model, sharers, schemes, stats)
    embedding = quantize_embedding(model, config)
    set_activation_bits_(model, schemes, config.activations)
    return quantize_report(model, config, config.method, schemes, stats, embedding, before)


def weight_sharers(model: nn.Module, names) -> dict[str, list[str]]:
    """``{name: [other linears holding the same weight]}`` for the named linears whose weight is shared.

    :func:`target_linears` lists a shared weight once, under its first name;
    the others are the rest of its cross-layer sharing group.
    """
    by_weight: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            by_weight.setdefault(id(module.weight), []).append(name)
    sharers = {}
    for name in names:
        others = [o for o in by_weight.get(id(model.get_submodule(name).weight), []) if o != name]
        if others:
            sharers[name] = others
    return sharers


def tie_sharers_(model: nn.Module, sharers: dict[str, list[str]], schemes: dict, stats: dict) -> tuple[dict, dict]:
    """Give every other holder of a quantized shared weight the first one's packed tensors, in place.

    A shared weight is quantized once and stays shared: its other modules
    become :class:`QuantLinear` views of the same ``qweight``/``scales``/``zeros``
    (and bias), so the artifact stores it once. Returns schemes and stats with
    the other modules added (``shared_with`` names the one quantized).
    """
    schemes, stats = dict(schemes), dict(stats)
    for name, others in sharers.items():
        first = model.get_submodule(name)
        for other in others:
            current = model.get_submodule(other)
            if isinstance(current, QuantLinear) and not torch.equal(current.qweight, first.qweight):
                log.warning("warning: %s and %s were trained apart (their sharing was lost); both now hold %s's weights",
                            other, name, name)
            model.set_submodule(other, first.shared_copy())
            schemes[other] = schemes[name]
            stats[other] = {**stats.get(name, {}), "shared_with": name}
    return schemes, stats


def quantize_report(model: nn.Module, config: QuantizeConfig, method: str, schemes: dict, stats: dict,
                    embedding: str | None, bytes_before: int) -> dict:
    """The JSON record of one quantization (``compression["quantize"]`` in the artifact)."""
    return {"method": method, "activations": config.activations, "embedding": embedding,
            "modules": {n: {**describe(s), **stats.get(n, {})} for n, s in schemes.items()},
            "bytes_before": bytes_before, "bytes_after": weight_bytes(model)}


def _quantize_linears_(model: nn.Module, config: QuantizeConfig, schemes: dict, batches) -> dict:
    if config.method == "gptq":
        from slimtune.compress.quant.gptq import gptq_quantize_

        return gptq_quantize_(model, batches, schemes, damp=config.damp, block_size=config.block_size, act_order=config.act_order,
                             clip_search=config.clip_search)
    if config.method == "awq":
        from slimtune.compress.quant.awq import awq_quantize_

        return awq_quantize_(model, batches, schemes, grid=config.grid, clip=config.clip)
    for name, scheme in schemes.items():
        model.set_submodule(name, QuantLinear.from_linear(model.get_submodule(name), scheme, where=name))
    return {name: {"method": "rtn"} for name in schemes}


def quantize_embedding(model: nn.Module, config: QuantizeConfig) -> str | None:
    if config.embeddings is None:
        return None
    from slimtune.compress.quant.embedding import quantize_embedding_

    return quantize_embedding_(model, config.embeddings)


def set_activation_bits_(model: nn.Module, schemes: dict, act_bits: int | None) -> None:
    for name in schemes:
        model.get_submodule(name).act_bits = act_bits



def describe(scheme: QuantScheme) -> dict:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each tensor counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def module_swaps(model: nn.Module) -> list[dict]:
    """The artifact's swap records: every module of a registered type, by name."""
    return [{"module": n, "type": type(m).__name__, "config": m.config()}
            for n, m in model.named_modules() if type(m).__name__ in MODULE_TYPES]


# ---------------------------------------------------------------- the stage

@register_stage("quantize")
class Quantize:
    """Quantize the artifact's model (see the module docstring)."""

    changes_model = True
    main_process_only = False
    Config = QuantizeConfig

    @staticmethod
    def compose(config: QuantizeConfig, state: ModelState, this: str) -> ModelState:
        """Needs float linears; GPTQ and AWQ also need unshared weights. Leaves the model quantized."""
        if state.quantized:
            raise CompositionError(f"{this} needs float linears, but {state.quantized} already quantized the model",
                                   "quantize once: give per-module schemes in overrides (and embeddings:) of one quantize stage")
        if state.shared and config.qat is None and config.method in ("gptq", "awq"):
            raise CompositionError(f"{this} with method {config.method} calibrates each layer's own weights, "
                                   f"but {state.shared} made layers share them",
                                   "after share, use method: rtn (or qat), which quantizes each shared weight once")
        return state.but(quantized=this)

    def run(self, ctx: StageContext, config: QuantizeConfig) -> StageResult:
        art = ctx.artifact
        model = art.model
        metrics: dict = {}
        if config.qat is not None:
            model, report, metrics = quantize_aware_training(ctx, model, config)
        else:
            batches = ctx.batches(config.calibration.split, limit=config.calibration.batches * ctx.train.eval_batch_size) \
                if config.method != "rtn" else None
            report = quantize_(model, config, batches)
        art.model = model
        art.swaps = module_swaps(model)
        art.compression["quantize"] = report
        metrics.update(weight_mb=report["bytes_after"] / 1e6, weight_mb_before=report["bytes_before"] / 1e6,
                       quantized_modules=len(report["modules"]))
        return StageResult(art, metrics)


def quantize_aware_training(ctx: StageContext, model: nn.Module, config: QuantizeConfig) -> tuple[nn.Module, dict, dict]:
    """Fake-quantize, train through the Trainer (distilling from the float model if asked), convert."""
    from slimtune.compress.quant.qat import convert_qat_, prepare_qat_

    schemes = select_schemes(model, config)
    sharers = weight_sharers(model, schemes)
    before = weight_bytes(model)
    teacher = frozen_copy(model) if config.qat.distill else None
    # Every holder of a shared weight trains it through fake quantization; converted, they share one packing again.
    wrapped = {**schemes, **{o: schemes[n] for n, others in sharers.items() for o in others}}
    prepare_qat_(model, wrapped, {n: config.activations for n in wrapped})
    model, metrics = recover(ctx, model, config.qat, teacher)
    convert_qat_(model)
    schemes, stats = tie_sharers_(model, sharers, schemes, {n: {"method": "qat"} for n in schemes})
    embedding = quantize_embedding(model, config)
    report = quantize_report(model, config, "qat", schemes, stats, embedding, before)
    return model, report, metrics
