"""PEFT interoperability: our LoRA deltas in PEFT's format, and PEFT LoRA directories as our deltas.

PEFT (Hugging Face, https://github.com/huggingface/peft) saves a LoRA as a directory of two files:

* ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
  ``use_rslora``, ``use_dora``, ``fan_in_fan_out`` (True for GPT-2's ``Conv1D``), ``bias: "none"``,
  ``modules_to_save`` (task heads trained whole), ``rank_pattern`` / ``alpha_pattern`` (per-module
  exceptions to ``r`` / ``lora_alpha``), ``task_type`` and ``inference_mode``;
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``(r, in)``,
  ``...lora_B.weight`` ``(out, r)``, ``...lora_magnitude_vector`` ``(out,)`` with DoRA, and
  ``base_model.model.<head>.<tensor>`` for each module to save.

:func:`save_peft` writes one of our LoRA deltas so that ``peft.PeftModel.from_pretrained(base, directory)``
rebuilds it on the bare backbone (``target_modules`` and ``modules_to_save`` are chosen so that PEFT's own
matching rules select exactly our modules); :func:`load_peft_` reads such a directory (written by PEFT or
by us) into :class:`~slimtune.delta.lora.LoraLinear` wrappers and :class:`~slimtune.delta.inject.TrainedCopy`
heads. A LoRA stage's artifact carries the PEFT copy of its delta in ``peft/``
(:func:`write_peft_copy`, called when a delta artifact is saved). Neither direction imports ``peft``.

Limits: PEFT's LoRA over SlimTune's packed ``QuantLinear`` cannot be expressed (PEFT does not read our
packed format): such deltas are refused, as are LoRAs nested in other deltas, merged ones, and QA-LoRA.
Reading refuses other PEFT methods and LoRA options we do not compute (trained biases, LoRA on
embeddings or convolutions, layer replication, aLoRA, trainable tokens, ...), naming the field.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.artifact import Artifact, replace_dir
from slimtune.errors import SlimTuneError
from slimtune.delta.inject import (DEFAULT, DeltaLayer, TrainedCopy, _require, delta_names, detached, in_out_features, linear_like,
                                   wrap_)
from slimtune.delta.lora import LoraLinear, _is_conv1d, _is_quant

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_DIR = "peft"  # inside a delta artifact
PREFIX = "base_model.model."  # PeftModel's prefix of every saved key
# transformers class-name suffix -> PEFT task type, and the heads PEFT then saves whole by itself (peft_model.py).
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}
# adapter_config.json keys that change nothing the tensors do not already say (metadata, initialisation recipes,
# which modules are adapted and their ranks: the saved factors tell, and are checked against r / rank_pattern).
IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
           "peft_version", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
           "ensure_weight_tying", "qalora_group_size", "megatron_core", "layers_to_transform", "layers_pattern",
           "exclude_modules", "target_modules", "rank_pattern", "r", "runtime_config",
           "fan_in_fan_out"}  # PEFT itself sets it per layer: True for Conv1D, False for nn.Linear
# keys we interpret.
INTERPRETED = {"lora_alpha", "alpha_pattern", "lora_dropout", "use_rslora", "use_dora", "modules_to_save"}
REQUIRED = {"bias": ("none",), "lora_bias": (False, None)}


# ------------------------------------------------------------------ PEFT's matching rules (peft 0.17 - 0.21)
def _peft_targets(target_modules, names: list[str], saved: list[str]) -> set[str]:
    """The modules PEFT wraps for ``target_modules`` (``check_target_module_exists``): a string is a regex
    fully matched against each name; a list entry matches a name equal to it or ending in ``.<entry>``;
    nothing inside a module to save is ever targeted."""
    def excluded(n):
        return any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in saved)

    if isinstance(target_modules, str):
        return {n for n in names if n and re.fullmatch(target_modules, n) and not excluded(n)}
    return {n for n in names if n and (n in target_modules or any(n.endswith(f".{t}") for t in target_modules))
            and not excluded(n)}


def _peft_saved(modules_to_save: list[str], names: list[str]) -> set[str]:
    """The modules PEFT saves whole for ``modules_to_save`` (``_set_trainable``: a name ending in an entry)."""
    return {n for n in names if n and any(n.endswith(m) for m in modules_to_save)}


def _pattern_key(patterns, name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key of ``rank_pattern`` / ``alpha_pattern`` that ends ``name`` as a regex."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)


# ------------------------------------------------------------------ writing
def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (None: a plain ``PeftModel``)."""
    cls = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if cls.endswith(suffix)), None)


def _backbone_name(model: nn.Module, qualified: str) -> str:
    """``qualified`` as named in the bare backbone: every hop through another delta's ``base_layer`` removed."""
    parts, module, kept = qualified.split("."), model, []
    for part in parts:
        if not (isinstance(module, DeltaLayer) and part == "base_layer"):
            kept.append(part)
        module = getattr(module, part)
    return ".".join(kept)


def _first_exact(forms: list, select, wanted: set[str]):
    """The first of ``forms`` that PEFT's rule ``select`` resolves to exactly ``wanted`` (None if none does)."""
    return next((f for f in forms if select(f) == wanted), None)


def _short_forms(names) -> list:
    """Ways to name ``names`` in a PEFT list, shortest first: their last components, then the full names."""
    return [sorted({n.rpartition(".")[2] for n in names}), sorted(names)]


def peft_adapter(model: nn.Module, name: str = DEFAULT, base_model_name_or_path: str | None = None
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` and the tensors of LoRA delta ``name`` in PEFT's format.

    Raises:
        SlimTuneError: ``name`` is not a LoRA PEFT can rebuild on the bare backbone (see the module docstring).
    """
    found = _require(model, name)
    other = [(n, w) for n, w in found if type(w) not in (LoraLinear, TrainedCopy)]
    if other or not any(type(w) is LoraLinear for _, w in found):
        n, w = other[0] if other else found[0]
        raise SlimTuneError(f"delta {name!r} is not a LoRA PEFT can load ({type(w).__name__} at {n})",
                            "PEFT's LoRA format holds LoRA/DoRA wrappers over float linears (and trained task heads) only")
    for n, w in found:
        if type(w) is LoraLinear:
            _check_writable(n, w)
    with detached(model):
        bare = [n for n, _ in model.named_modules()]
    targets = {_backbone_name(model, n): w for n, w in found if type(w) is LoraLinear}
    heads = {_backbone_name(model, n): w for n, w in found if type(w) is TrainedCopy}
    task = task_type(model)
    to_save = _modules_to_save(heads, bare, name)
    saved = sorted(_peft_saved((to_save or []) + TASK_HEADS.get(task, []), bare))
    first = _uniform(targets, name)
    r, rank_pattern = _patterned({t: w.rank for t, w in targets.items()})
    alpha, alpha_pattern = _patterned({t: _number(w.alpha) for t, w in targets.items()})
    config = {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "inference_mode": True, "r": r, "lora_alpha": alpha, "lora_dropout": first.dropout_p,
        "target_modules": _target_modules(targets, bare, saved), "exclude_modules": None,
        "fan_in_fan_out": _is_conv1d(first.base_layer), "bias": "none", "lora_bias": False,
        "use_rslora": first.rslora, "use_dora": first.dora, "modules_to_save": to_save, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    }
    return config, _adapter_state(model, targets, heads, saved)


def _modules_to_save(heads: dict[str, TrainedCopy], bare: list[str], name: str) -> list[str] | None:
    """``modules_to_save`` naming exactly the trained heads (None when there are none)."""
    if not heads:
        return None
    to_save = _first_exact(_short_forms(heads), lambda f: _peft_saved(f, bare), set(heads))
    if to_save is None:
        raise SlimTuneError(f"the heads trained with delta {name!r} ({sorted(heads)}) cannot be named exactly in PEFT's "
                            "modules_to_save (another module's name ends like theirs)", "save the delta with save_delta")
    return to_save


def _target_modules(targets: dict[str, LoraLinear], bare: list[str], saved: list[str]) -> list[str] | str:
    """``target_modules`` selecting exactly ``targets`` by PEFT's rule: suffixes, full names, or a regex of them."""
    forms = _short_forms(targets) + ["(?:" + "|".join(re.escape(t) for t in sorted(targets)) + ")"]
    chosen = _first_exact(forms, lambda f: _peft_targets(f, bare, saved), set(targets))
    if chosen is None:
        inside = sorted(set(targets) - _peft_targets(sorted(targets), bare, saved))
        raise SlimTuneError(f"PEFT cannot put LoRA on {inside[:3]}: it never adapts a module inside one it saves whole "
                            f"({saved})", "target modules outside the task head")
    return chosen


def _uniform(targets: dict[str, LoraLinear], name: str) -> LoraLinear:
    """A wrapper of ``targets`` after checking they share what PEFT's config holds once (dropout, rslora, dora)."""
    first = next(iter(targets.values()))
    for field in ("dropout_p", "rslora", "dora"):
        odd = [t for t, w in targets.items() if getattr(w, field) != getattr(first, field)]
        if odd:
            raise SlimTuneError(f"delta {name!r} mixes LoRA settings ({field} differs at {odd[0]}); PEFT's config has one",
                                "save LoRAs with different dropout / rslora / dora as separate deltas")
    return first


def _check_writable(qualified: str, wrapper: LoraLinear) -> None:
    base = wrapper.base_layer
    if wrapper.merged:
        raise SlimTuneError(f"LoRA at {qualified} is merged into its weight", "unmerge_ it before saving it for PEFT")
    if isinstance(base, DeltaLayer):
        raise SlimTuneError(f"LoRA at {qualified} wraps another delta ({type(base).__name__}): "
                            "PEFT cannot rebuild the nesting", "save it with save_delta, or detach the inner delta first")
    if _is_quant(base):
        raise SlimTuneError(f"LoRA at {qualified} is over a quantized weight (QuantLinear): "
                            "PEFT cannot load SlimTune's packed format",
                            "save it with save_delta (slimtune.load reattaches it), or merge_and_unload_ it and export ONNX")
    if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
        raise SlimTuneError(f"LoRA at {qualified} adapts a {type(base).__name__}: "
                            "PEFT's format is written for nn.Linear and Conv1D", "save it with save_delta")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _patterned(values: dict[str, int | float]) -> tuple[int | float, dict]:
    """The most common value, and PEFT patterns for the modules that differ, each selecting exactly its module.

    A pattern key is the module's name without its first component: PEFT matches keys as regexes ending the
    name, after ``(.*\\.)?`` (older versions: after ``.*\\.``, so a key must not start the name). It is
    escaped where the plain name would also match another targeted module.
    """
    common = Counter(values.values()).most_common(1)[0][0]
    pattern = {}
    for name, value in values.items():
        if value != common:
            key = name.split(".", 1)[-1]
            if [n for n in values if _pattern_key([key], n)] != [name]:
                key = re.escape(key)
            pattern[key] = value
    for name, value in values.items():  # PEFT takes the first matching key: check the whole resolution
        key = _pattern_key(pattern, name)
        if (pattern[key] if key is not None else common) != value:
            raise SlimTuneError(f"per-module LoRA settings cannot be written as PEFT patterns (at {name})",
                                "save the delta with save_delta")
    return common, pattern


def _adapter_state(model: nn.Module, targets: dict[str, LoraLinear], heads: dict[str, TrainedCopy], saved: list[str]
                   ) -> dict[str, torch.Tensor]:
    state = {}
    for name, w in targets.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = w.lora_A.weight
        state[f"{PREFIX}{name}.lora_B.weight"] = w.lora_B.weight
        if w.dora:
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = w.lora_magnitude_vector
    with detached(model):  # heads PEFT saves by itself (a task's classifier) hold the backbone's own values when not trained
        for name in saved:
            module = heads[name].copy if name in heads else model.get_submodule(name)
            for key, tensor in module.state_dict().items():
                state[f"{PREFIX}{name}.{key}"] = tensor
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_peft(model: nn.Module | Artifact, directory: str | Path, name: str = DEFAULT,
              base_model_name_or_path: str | None = None) -> Path:
    """Write LoRA delta ``name`` in PEFT's format into ``directory`` (replaced if it exists).

    ``peft.PeftModel.from_pretrained(base, directory)`` then computes what ``model`` computes, ``base``
    being the bare backbone (e.g. ``AutoModelFor...from_pretrained`` of the artifact directory).

    Args:
        model: a model carrying the delta, or an artifact (its directory becomes ``base_model_name_or_path``).
        name: the delta to write (only it: other deltas on the model are not part of the PEFT copy).
        base_model_name_or_path: recorded for ``AutoPeftModel``; default: the artifact's directory, else None.

    Raises:
        SlimTuneError: a delta PEFT cannot rebuild (quantized base, nested or merged, not a LoRA, ...).
    """
    if isinstance(model, Artifact):
        base_model_name_or_path = base_model_name_or_path or (str(model.path) if model.path is not None else None)
        model = model.model
    config, state = peft_adapter(model, name, base_model_name_or_path)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        _write(tmp, config, state)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _write(directory: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def write_peft_copy(model: nn.Module, directory: Path) -> bool:
    """Write ``directory/peft`` when ``model`` carries exactly one delta and it is a LoRA PEFT can load.

    Called when a delta artifact is saved; other deltas (several, non-LoRA, over quantized weights) get no
    PEFT copy, which is logged, not an error. Returns whether it wrote one.
    """
    names = delta_names(model)
    if len(names) != 1:
        log.info("no PEFT copy: %d deltas attached (PEFT's copy holds one LoRA alone)", len(names))
        return False
    try:
        config, state = peft_adapter(model, names[0])
    except SlimTuneError as err:
        log.info("no PEFT copy of delta %r: %s", names[0], err.message)
        return False
    _write(Path(directory) / PEFT_DIR, config, state)
    return True


# ------------------------------------------------------------------ reading
def load_peft_(model: nn.Module | Artifact, directory: str | Path, name: str = DEFAULT) -> list[str]:
    """Attach the PEFT LoRA saved in ``directory`` to ``model`` as our delta ``name``.

    Each ``lora_A``/``lora_B`` pair becomes a :class:`LoraLinear` (DoRA with its magnitude, rank from the
    tensors, alpha from ``lora_alpha``/``alpha_pattern``); each module saved whole becomes a
    :class:`TrainedCopy` holding the saved tensors. Everything is checked before anything is wrapped.

    Returns:
        The qualified names of the wrapped modules.

    Raises:
        SlimTuneError: not a PEFT LoRA directory, a PEFT option we do not compute, or tensors that do not
            fit ``model``; the message names the field or tensor.
    """
    if isinstance(model, Artifact):
        model = model.model
    directory = Path(directory)
    config, state = _read(directory)
    if name in delta_names(model):
        raise SlimTuneError(f"a delta named {name!r} is already attached", "load under another name (name=...)")
    loras, heads = _plan(model, config, state, directory)
    rslora, dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    dropout = float(config.get("lora_dropout") or 0.0)
    base_alpha, alpha_pattern = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
    for module, rank in loras.items():
        key = _pattern_key(alpha_pattern, module)
        alpha = alpha_pattern[key] if key is not None else base_alpha
        wrap_(model, module, lambda m, rank=rank, alpha=alpha: LoraLinear(m, name, rank, alpha, dropout, rslora, dora))
    for module in heads:
        wrap_(model, module, lambda m: TrainedCopy(m, name))
    with torch.no_grad():
        for module in loras:
            w = model.get_submodule(module)
            w.lora_A.weight.copy_(state[f"{PREFIX}{module}.lora_A.weight"])
            w.lora_B.weight.copy_(state[f"{PREFIX}{module}.lora_B.weight"])
            if dora:
                w.lora_magnitude_vector.copy_(state[f"{PREFIX}{module}.lora_magnitude_vector"])
        for module, keys in heads.items():
            model.get_submodule(module).copy.load_state_dict({k: state[f"{PREFIX}{module}.{k}"] for k in keys})
    return list(loras) + list(heads)


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not (directory / CONFIG_FILE).is_file():
        raise SlimTuneError(f"{directory} is not a PEFT adapter directory (no {CONFIG_FILE})",
                            "pass the directory PeftModel.save_pretrained wrote (or a delta artifact's peft/)")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (ValueError, OSError) as err:
        raise SlimTuneError(f"{directory / CONFIG_FILE} is not valid JSON: {err}", "save the adapter again") from None
    if config.get("peft_type") != "LORA":
        raise SlimTuneError(f"{directory} holds a PEFT {config.get('peft_type')!r} adapter; only LORA reads in as our delta",
                            "save the adapter as a LoRA (peft_type LORA)")
    for key, allowed in REQUIRED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise SlimTuneError(f"{CONFIG_FILE}: {key}={config[key]!r} is not supported (trained biases are not part of our LoRA)",
                                f"train the PEFT LoRA with {key}={allowed[0]!r}")
    known = IGNORED | INTERPRETED | set(REQUIRED)
    unknown = sorted(k for k, v in config.items() if k not in known and v not in (None, False, {}, [], ""))
    if unknown:
        raise SlimTuneError(f"{CONFIG_FILE} sets PEFT options SlimTune's LoRA does not compute: "
                            + ", ".join(f"{k}={config[k]!r}" for k in unknown), "train the PEFT LoRA without them")
    if not (directory / WEIGHTS_FILE).is_file():
        raise SlimTuneError(f"{directory} has no {WEIGHTS_FILE}", "save the adapter with safetensors (PEFT's default)")
    return config, load_file(directory / WEIGHTS_FILE)


def _plan(model: nn.Module, config: dict, state: dict[str, torch.Tensor], directory: Path
          ) -> tuple[dict[str, int], dict[str, list[str]]]:
    """``{module: rank}`` of the LoRAs and ``{module: [tensor names]}`` of the modules saved whole, all checked."""
    bad = [k for k in state if not k.startswith(PREFIX)] or [k for k in state if ".lora_embedding_" in k]
    if bad:
        raise SlimTuneError(f"{WEIGHTS_FILE}: tensor {bad[0]!r} is not a PeftModel LoRA key (base_model.model.<linear>.lora_...)",
                            "SlimTune reads LoRAs on linear layers saved by PeftModel.save_pretrained")
    modules = dict(model.named_modules())
    lora_keys = [k for k in state if re.search(r"\.lora_(A|B|magnitude_vector)(\.|$)", k)]
    loras = {k[len(PREFIX):-len(".lora_A.weight")]: None for k in lora_keys if k.endswith(".lora_A.weight")}
    for module in loras:
        loras[module] = _check_lora(modules, module, config, state)
    stray = [k for k in lora_keys if k[len(PREFIX):].rsplit(".lora_", 1)[0] not in loras]
    if stray:
        raise SlimTuneError(f"{WEIGHTS_FILE}: {stray[0]!r} has no lora_A beside it", "the adapter file is damaged; save it again")
    if not loras:
        raise SlimTuneError(f"{directory}: the adapter holds no LoRA factors", "pass a PEFT LoRA directory")
    return loras, _heads(modules, config, {k: v for k, v in state.items() if k not in lora_keys})


def _heads(modules: dict[str, nn.Module], config: dict, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """``{module: [tensor names]}`` of the modules saved whole (``modules_to_save``, a task's head), checked against the model."""
    to_save = (config.get("modules_to_save") or []) + TASK_HEADS.get(config.get("task_type"), [])
    saved = sorted(_peft_saved(to_save, list(modules)), key=len, reverse=True)
    heads: dict[str, list[str]] = {}
    for key in state:
        rest = key[len(PREFIX):]
        owner = next((m for m in saved if rest.startswith(m + ".")), None)
        if owner is None:
            raise SlimTuneError(f"{WEIGHTS_FILE}: tensor {key!r} is neither a LoRA factor nor part of a module to save "
                                f"(modules_to_save: {to_save or 'none'})", "load the adapter onto the model it was trained on")
        heads.setdefault(owner, []).append(rest[len(owner) + 1:])
    for module, keys in heads.items():
        expected = modules[module].state_dict()
        if sorted(keys) != sorted(expected) or any(state[f"{PREFIX}{module}.{k}"].shape != expected[k].shape for k in keys):
            raise SlimTuneError(f"{WEIGHTS_FILE}: the saved {module} ({sorted(keys)}) does not fit this model's",
                                "load the adapter onto the model it was trained on")
    return heads


def _check_lora(modules: dict[str, nn.Module], module: str, config: dict, state: dict) -> int:
    """The rank of the LoRA on ``module``, after checking it fits the model and the config."""
    target = modules.get(module)
    if target is None:
        raise SlimTuneError(f"the adapter adapts {module}, which this model does not have",
                            "load the adapter onto the model it was trained on")
    if not linear_like(target):
        raise SlimTuneError(f"the adapter adapts {module}, a {type(target).__name__}; SlimTune's LoRA adapts linear layers only",
                            "target nn.Linear / Conv1D layers only")
    if _is_quant(target) or (isinstance(target, DeltaLayer) and _is_quant(target.base_layer)):
        raise SlimTuneError(f"{module} is quantized: a PEFT LoRA trained on float weights would not compute what it did",
                            "load it onto the float backbone, then quantize with merge_and_unload_ if needed")
    a, b = state[f"{PREFIX}{module}.lora_A.weight"], state.get(f"{PREFIX}{module}.lora_B.weight")
    i, o = in_out_features(target)
    rank = a.shape[0]
    if b is None or a.shape != (rank, i) or b.shape != (o, rank):
        raise SlimTuneError(f"{WEIGHTS_FILE}: the LoRA factors of {module} have shapes {tuple(a.shape)}, "
                            f"{None if b is None else tuple(b.shape)}; this {i} -> {o} layer needs (r, {i}), ({o}, r)",
                            "load the adapter onto the model it was trained on")
    patterns = config.get("rank_pattern") or {}
    key = _pattern_key(patterns, module)
    declared = patterns[key] if key is not None else config.get("r", rank)
    if declared != rank:
        raise SlimTuneError(f"{CONFIG_FILE} gives {module} rank {declared}, its tensors have rank {rank}",
                            "the adapter is inconsistent; save it again")
    if config.get("use_dora"):
        magnitude = state.get(f"{PREFIX}{module}.lora_magnitude_vector")
        if magnitude is None:
            raise SlimTuneError(f"{CONFIG_FILE}: use_dora=true but {module} has no lora_magnitude_vector",
                                "the adapter is damaged; save it again")
        if magnitude.shape != (o,):
            raise SlimTuneError(f"{WEIGHTS_FILE}: the DoRA magnitude of {module} has shape {tuple(magnitude.shape)}, not ({o},)",
                                "load the adapter onto the model it was trained on")
    return rank
