"""BitFit (Ben Zaken et al., 2021, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models").

Only the bias terms train. To keep the backbone untouched (so the delta saves
alone and :func:`slimtune.delta.detach_` gives back the original bit for bit),
the trained quantity is an *offset*: a :class:`BiasDelta` wraps a module with
a bias and holds ``delta_b`` (zeros at first); while active, the module runs
its own forward with its bias replaced by ``b + delta_b``
(``torch.func.functional_call``), so a fresh delta computes exactly what the
module did, and any module class with a ``bias`` works (``nn.Linear``,
GPT-2's ``Conv1D``, a packed ``QuantLinear``, a LayerNorm).

With ``layernorm=True`` the backbone's normalisation layers (LayerNorm,
RMSNorm and relatives) train too, weight and bias: their wrappers hold a
weight offset as well. (The paper's BitFit counts LayerNorm biases among
the bias terms; ``layernorm=True`` gives that, plus the norms' scales.)

Merging folds the offsets into the module's own tensors (``b <- b + delta_b``),
the very sum the forward computes, so a merged BitFit gives exactly the
unmerged outputs; the original tensors are kept, so unmerging is bit-exact.
The ``bitfit`` stage's ``merge: true`` folds the delta in and saves a plain
model.

Limits: models whose linears have no biases (Llama, Mistral, Qwen2's MLP,
T5) have nothing to train by default: BitFit there trains only the norms
(``layernorm=True``) and refuses to run otherwise. Over blocks that share
parameters (the ``share`` stage) each block trains its own offsets, so the
delta cannot fold into the one shared bias: merging it is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune import arch
from slimtune.errors import SlimTuneError
from slimtune.registry import register_module_type
from slimtune.delta.inject import (DEFAULT, DeltaLayer, _innermost, _replace, delta_names, freeze_backbone_, select_modules,
                                   unload_heads_, wrap_, wrappers_of)


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer with a learned scale: ``nn.LayerNorm``, ``nn.RMSNorm``, or a model's own (``LlamaRMSNorm``, ...)."""
    named = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    return named and isinstance(getattr(module, "weight", None), nn.Parameter)


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(_innermost(module), "bias", None), torch.Tensor)


@register_module_type
class BiasDelta(DeltaLayer):
    """Trainable offsets to a module's bias (and, with ``scale``, its weight); see the module docstring.

    Parameters: ``bias_offset`` shaped like the bias (when the module has one),
    ``weight_offset`` shaped like the weight (when ``scale``).
    """

    method = "bitfit"

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT, scale: bool = False):
        super().__init__(base_layer, name)
        inner = _innermost(base_layer)
        self.scale = bool(scale)
        self._targets = (["bias"] if _has_bias(base_layer) else []) + (["weight"] if scale else [])
        if not self._targets:
            raise SlimTuneError(f"BitFit: {type(inner).__name__} has no bias to train",
                                "choose modules with a bias, or train a norm's scale (layernorm: true)")
        depth = 0
        module = base_layer
        while isinstance(module, DeltaLayer):
            module, depth = module.base_layer, depth + 1
        self._prefix = "base_layer." * depth  # where the tensors sit relative to base_layer, through inner deltas
        for target in self._targets:
            tensor = getattr(inner, target)
            self.register_parameter(f"{target}_offset", nn.Parameter(torch.zeros_like(tensor)))
        self._original: dict[str, torch.Tensor] | None = None

    def _offsets(self) -> dict[str, nn.Parameter]:
        return {target: getattr(self, f"{target}_offset") for target in self._targets}

    def forward(self, *args, **kwargs):
        if not self.active or self.merged:
            return self.base_layer(*args, **kwargs)
        inner = _innermost(self.base_layer)
        shifted = {self._prefix + t: getattr(inner, t) + off.to(getattr(inner, t).dtype) for t, off in self._offsets().items()}
        return torch.func.functional_call(self.base_layer, shifted, args, kwargs)

    # -- merging -----------------------------------------------------------------
    def merge(self) -> None:
        """Fold the offsets into the module's tensors (``b + delta_b``, as the forward computes it); originals kept."""
        if self.merged:
            return
        inner = _innermost(self.base_layer)
        self._original = {t: getattr(inner, t).data for t in self._targets}
        with torch.no_grad():
            for t, off in self._offsets().items():
                getattr(inner, t).data = self._original[t] + off.detach().to(self._original[t].dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Put the original tensors back, bit for bit."""
        if not self.merged:
            return
        inner = _innermost(self.base_layer)
        for t, original in self._original.items():
            getattr(inner, t).data = original
        self._original = None
        self.merged = False

    # -- artifact protocol -------------------------------------------------------
    def config(self) -> dict:
        return {"scale": self.scale}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, trains={'+'.join(self._targets)}"


def _backbone_pattern(model: nn.Module) -> str:
    """A regex target for every module of the backbone (not a task head or LM head beside it)."""
    body = arch.base_model(model)
    prefix = next((n for n, m in model.named_modules() if m is body), "")
    return f"re:{prefix}\\..+" if prefix else "re:.+"


def add_bitfit_(model: nn.Module, layernorm: bool = False, targets: list[str] | str | None = None, name: str = DEFAULT,
                exclude: list[str] | tuple = (), train: list[str] | tuple = (), freeze: bool = True) -> list[str]:
    """Make the biases of ``model`` (and, with ``layernorm``, its norms) trainable as :class:`BiasDelta` offsets, in place.

    Args:
        layernorm: also train every normalisation layer of the backbone (weight and bias).
        targets: roles, ``all-linear``, globs or ``re:`` regexes choosing the linear-like modules
            whose biases train (default: every one of the backbone; never the task or LM head,
            which ``train`` or the stage's ``head`` handle). Those without a bias are skipped.
        exclude: globs or ``re:`` regexes of modules to leave alone.
        train: parameter-name globs that train besides the delta, when ``freeze``.
        freeze: freeze everything else (the default).

    Returns:
        The qualified names of the wrapped modules.

    Raises:
        SlimTuneError: nothing would train (no chosen module has a bias, e.g. Llama without
            ``layernorm``), a bad target, or a delta ``name`` already attached.
    """
    if name in delta_names(model):
        raise SlimTuneError(f"a delta named {name!r} is already attached", "choose another name or detach_ it first")
    backbone = _backbone_pattern(model)
    linears = select_modules(model, targets if targets else [backbone], exclude=exclude)
    chosen = [(n, False) for n in linears if _has_bias(model.get_submodule(n))]
    if layernorm:
        norms = select_modules(model, [backbone], exclude=exclude, linear_only=False)
        chosen += [(n, True) for n in norms if _is_norm(_innermost(model.get_submodule(n)))]
    if not chosen:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise SlimTuneError(f"BitFit has nothing to train: none of the {len(linears)} chosen linear modules of this "
                            f"{model_type} model has a bias" + ("" if layernorm else ", and layernorm is off"),
                            "set layernorm: true to train the normalisation layers, or target modules that have biases")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    chosen.sort(key=lambda c: order[c[0]])
    for qualified, scale in chosen:
        wrap_(model, qualified, lambda m: BiasDelta(m, name, scale=scale))
    if freeze:
        freeze_backbone_(model, train)
    return [n for n, _ in chosen]


def _bitfit(model: nn.Module, name: str) -> list[tuple[str, BiasDelta]]:
    """The :class:`BiasDelta` wrappers of delta ``name`` (a task head trained with it aside)."""
    return wrappers_of(model, name, BiasDelta, "BitFit")


def _check_unshared(found: list[tuple[str, BiasDelta]]) -> None:
    """Refuse to fold two offsets into one tensor (blocks sharing parameters)."""
    owners: dict[int, str] = {}
    for qualified, wrapper in found:
        inner = _innermost(wrapper.base_layer)
        for t in wrapper._targets:
            other = owners.setdefault(id(getattr(inner, t)), qualified)
            if other != qualified:
                raise SlimTuneError(f"BitFit cannot merge: {qualified} and {other} share one {t} tensor (shared layers), "
                                    "and each trained its own offset", "keep the delta unmerged (merge: false)")


def merge_bitfit_(model: nn.Module, name: str = DEFAULT) -> None:
    """Fold BitFit ``name`` into the biases (reversible with :func:`unmerge_bitfit_`).

    Raises:
        SlimTuneError: ``name`` is not a BitFit delta, or two wrapped modules share a tensor.
    """
    found = _bitfit(model, name)
    _check_unshared(found)
    for _, wrapper in found:
        wrapper.merge()


def unmerge_bitfit_(model: nn.Module, name: str = DEFAULT) -> None:
    for _, wrapper in _bitfit(model, name):
        wrapper.unmerge()


def merge_and_unload_bitfit_(model: nn.Module, name: str = DEFAULT) -> dict:
    """Fold BitFit ``name`` into the biases and remove its wrappers: a plain model computing the same outputs.

    A task head trained with it (a :class:`TrainedCopy` of the same name) is replaced by its trained copy.

    Returns:
        ``{"layers": n}``, the number of modules folded.
    """
    found = _bitfit(model, name)
    _check_unshared(found)
    unload_heads_(model, name)
    for qualified, wrapper in reversed(found):
        wrapper.merge()
        wrapper._original, wrapper.merged = None, False
        _replace(model, qualified, wrapper.base_layer)
    return {"layers": len(found)}


# ---------------------------------------------------------------- the stage
from pydantic import Field  # noqa: E402

from slimtune.registry import register_stage  # noqa: E402
from slimtune.stage import CompositionError, ModelState  # noqa: E402
from slimtune.delta.stage import DeltaConfig, DeltaStage  # noqa: E402


class BitfitConfig(DeltaConfig):
    """``bitfit: {layernorm: false}``: only biases train (``merge: true`` folds them into the model)."""

    layernorm: bool = Field(False, description="also train the normalisation layers (weight and bias)")
    targets: list[str] | None = Field(None, description="roles, all-linear, globs or re:regexes choosing the linears whose "
                                      "biases train (default: every linear of the backbone, not the task head)")
    exclude: list[str] = Field(default_factory=list, description="globs or re:regexes of modules to leave alone")


@register_stage("bitfit")
class Bitfit(DeltaStage):
    """Train only the biases (BitFit) of the artifact's model."""

    Config = BitfitConfig
    mergeable = True

    @classmethod
    def compose(cls, config, state: ModelState, this: str) -> ModelState:
        """Also refuses ``merge`` over shared layers (one shared bias cannot hold each layer's offset)."""
        if config.merge and state.shared:
            raise CompositionError(f"{this}: merge: true, but {state.shared} made layers share their biases, and BitFit "
                                   "trains one offset per layer", "remove merge: true (the delta stays attached)")
        return super().compose(config, state, this)

    def attach(self, ctx, model, config: BitfitConfig, name: str) -> list[str]:
        return add_bitfit_(model, config.layernorm, config.targets, name, config.exclude, freeze=False)

    def merge(self, model, name: str) -> dict:
        return merge_and_unload_bitfit_(model, name)
