"""What ``slimtune bench SPEC`` runs: the variants of a sweep, every one validated before any runs.

A SPEC is one of two YAML files (or a shipped recipe name).

(a) A recipe with a ``sweep:`` block: any ``--set`` path with a list of
values. ``mode: cross`` (the default) runs every combination, the first path
varying slowest; ``mode: zip`` pairs the i-th values of every path (all lists
equally long)::

    name: minilm-bits
    model: embedded:minilm
    task: {kind: classification, data: embedded:rotten-tomatoes, max_length: 64}
    stages:
      - finetune: {epochs: 1}
      - quantize: {bits: 4}
    sweep:
      mode: cross                   # or zip; default cross
      values:
        stages.quantize.method: [rtn, gptq]
        stages.quantize.group_size: [128, 32]

runs four variants named ``method=rtn,group_size=128``, ``method=rtn,group_size=32``,
``method=gptq,group_size=128`` and ``method=gptq,group_size=32``. The short form
``sweep: {stages.quantize.bits: [8, 4]}`` (a mapping of paths, as in
DESIGN.md) means ``mode: cross`` over those values. The recipe's own values of
the swept keys are not a variant of their own; list them to include them.

(b) A bench file listing recipes, each a shipped name or a path (relative to
the bench file, else to the working directory), optionally with overrides::

    bench:
      name: minilm-compare
      recipes:
        - minilm-sentiment
        - recipe: minilm-lora.yaml
          set: {stages.lora.rank: 4}

A listed recipe may not carry a ``sweep:`` of its own (list its variants as
entries with ``set:`` instead). Each variant is named by its recipe's name,
followed by its ``set:`` values (``minilm-lora,rank=4``).

Variant names are derived from the swept values (the last path components
that tell the paths apart, ``layers=0_2_4`` for a list), safe as a directory
name, and unique even on a case-insensitive file system: a repeated name gets
``-2``, ``-3``, ... in variant order. Swept values are read as ``--set`` reads
them (a string is parsed as a YAML scalar).

Limits: at most :data:`MAX_VARIANTS` variants; the recipe's ``name`` cannot be
swept (it names the bench). Errors name the spec file, the sweep path or
recipe entry, and the value; nothing is written.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from slimtune.errors import RecipeError
from slimtune.recipe import Recipe, RecipeLoader, _where, apply_override, locate, shipped_recipes, validate, yaml_load

MAX_VARIANTS = 256
"""More variants than this are refused: a bench that large is usually a typo in a value list."""

MODES = ("cross", "zip")
MAX_NAME_LENGTH = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=,+-]")
_BENCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SWEEP_EXAMPLE = "e.g. sweep: {mode: cross, values: {stages.quantize.bits: [8, 4]}}"


@dataclass(frozen=True)
class Variant:
    """One run of a bench.

    Attributes:
        name: directory-safe, unique within the bench, derived from the swept values.
        recipe: where the variant's recipe came from (a shipped name, or a file path).
        overrides: every override applied to that recipe (``--set`` ones and the swept ones).
        config: the validated recipe the variant runs.
    """

    name: str
    recipe: str
    overrides: dict[str, Any]
    config: Recipe


# ---------------------------------------------------------------- entry point


def load_sweep(spec: str | Path, overrides: dict[str, Any] | None = None) -> tuple[str, list[Variant]]:
    """Read a bench spec and validate every one of its variants.

    Args:
        spec: a recipe with a ``sweep:`` block or a ``bench:`` file (a path or a shipped name).
        overrides: ``--set`` overrides applied to every variant, ``{"train.lr": 3e-5}``.

    Returns:
        The bench's name and its variants, in run order.

    Raises:
        RecipeError: naming the spec file, the sweep path or recipe entry, the value and the fix,
            before any variant runs.
    """
    path = locate(spec)
    raw, root = _read(path)
    if "bench" in raw:
        return _load_bench(path, raw, root, dict(overrides or {}))
    return _load_recipe_sweep(path, raw, root, dict(overrides or {}))


def _read(path: Path) -> tuple[dict, yaml.Node]:
    """The YAML mapping in ``path`` and its node tree (for line numbers)."""
    text = path.read_text()
    try:
        raw = yaml_load(text)
        root = yaml.compose(text, Loader=RecipeLoader)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}", "fix the YAML syntax at the position shown") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a bench spec must be a mapping: a recipe with sweep:, or bench: {{name, recipes}}")
    return raw, root


# ---------------------------------------------------------------- (a) a recipe with sweep:


def _load_recipe_sweep(path: Path, raw: dict, root: yaml.Node, overrides: dict) -> tuple[str, list[Variant]]:
    """The variants of a recipe's ``sweep:`` block."""
    if "sweep" not in raw:
        raise RecipeError(f"{path}: has neither a sweep: block nor a bench: list, so there is nothing to compare",
                          f"add a sweep, {_SWEEP_EXAMPLE}, or run a single recipe with slimtune run")
    base = {k: v for k, v in raw.items() if k != "sweep"}
    mode, values, where = _parse_sweep(path, raw["sweep"], root)
    _check_paths(values, overrides, where)
    combos = _combine(mode, values, where)
    names = unique_names([_label(c) for c in combos])
    source = _source(path)
    variants = []
    for i, (name, combo) in enumerate(zip(names, combos)):
        context = f"{path}: sweep variant {i + 1} of {len(combos)} ({_describe(combo)})"
        config = _validate_variant(path, base, root, {**overrides, **combo}, context)
        variants.append(Variant(name, source, {**overrides, **combo}, config))
    _refuse_duplicates(path, variants)
    return variants[0].config.name, variants


def _parse_sweep(path: Path, sweep: Any, root: yaml.Node) -> tuple[str, dict[str, list], Any]:
    """``(mode, {path: values}, where)`` of a ``sweep:`` block, full or short form; ``where(path)`` is ``file:line``."""
    if not sweep:
        raise RecipeError(f"{_where(str(path), root, ('sweep',))}: sweep: has no values", _SWEEP_EXAMPLE)
    if not isinstance(sweep, dict):
        raise RecipeError(f"{_where(str(path), root, ('sweep',))}: sweep: must be a mapping, got {sweep!r}", _SWEEP_EXAMPLE)
    full = "values" in sweep or "mode" in sweep
    if full and set(sweep) - {"mode", "values"}:
        extra = sorted(map(str, set(sweep) - {"mode", "values"}))
        raise RecipeError(f"{_where(str(path), root, ('sweep', extra[0]))}: unknown key(s) {extra} in sweep:; allowed keys: mode, values",
                          "put the swept paths under values:")
    mode, values = (sweep.get("mode", "cross"), sweep.get("values")) if full else ("cross", sweep)
    if mode not in MODES:
        raise RecipeError(f"{_where(str(path), root, ('sweep', 'mode'))}: sweep mode {mode!r} is unknown; allowed: {', '.join(MODES)}",
                          "cross runs every combination; zip pairs the i-th values of every path")
    prefix = ("sweep", "values") if full else ("sweep",)
    if not values:
        raise RecipeError(f"{_where(str(path), root, prefix)}: sweep: has no values", _SWEEP_EXAMPLE)
    if not isinstance(values, dict):
        raise RecipeError(f"{_where(str(path), root, prefix)}: sweep values must map paths to lists, got {values!r}", _SWEEP_EXAMPLE)
    return mode, values, lambda key: _where(str(path), root, prefix + (key,))


def _check_paths(values: dict, overrides: dict, where) -> None:
    """Each swept path is a dotted string other than ``name``, with a non-empty list, not also ``--set``."""
    for key, vals in values.items():
        if not isinstance(key, str) or not key.strip():
            raise RecipeError(f"{where(key)}: sweep path {key!r} is not a dotted key path", "write paths like stages.quantize.bits")
        if key == "name":
            raise RecipeError(f"{where(key)}: sweep path 'name' cannot vary: the recipe's name names the bench",
                              "variants are named by their swept values; remove name from the sweep")
        if not isinstance(vals, list):
            raise RecipeError(f"{where(key)}: sweep path {key}: values must be a list, got {vals!r}", f"write {key}: [{vals!r}] for a single value")
        if not vals:
            raise RecipeError(f"{where(key)}: sweep path {key}: the value list is empty", f"give at least one value, e.g. {key}: [...]")
        if key in overrides:
            raise RecipeError(f"{where(key)}: sweep path {key} is also given by --set {key}={overrides[key]!r}",
                              "drop the --set, or sweep over that value")


def _combine(mode: str, values: dict[str, list], where) -> list[dict[str, Any]]:
    """The swept overrides of every variant, in run order (cross: the first path varies slowest)."""
    paths = list(values)
    if mode == "zip":
        lengths = {p: len(values[p]) for p in paths}
        if len(set(lengths.values())) > 1:
            raise RecipeError(f"{where(paths[0])}: sweep mode zip needs equally long value lists, got lengths {lengths}",
                              "give every path the same number of values, or use mode: cross")
        count = lengths[paths[0]]
    else:
        count = math.prod(len(values[p]) for p in paths)
    if count > MAX_VARIANTS:
        sizes = " x ".join(f"{p} ({len(values[p])})" for p in paths)
        raise RecipeError(f"{where(paths[0])}: the sweep has {count} variants ({mode} of {sizes}), more than {MAX_VARIANTS}",
                          "sweep fewer values, or pair them with mode: zip instead of crossing them")
    rows = zip(*(values[p] for p in paths)) if mode == "zip" else itertools.product(*(values[p] for p in paths))
    return [dict(zip(paths, row)) for row in rows]


# ---------------------------------------------------------------- (b) a bench: list of recipes


def _load_bench(path: Path, raw: dict, root: yaml.Node, overrides: dict) -> tuple[str, list[Variant]]:
    """The variants of a ``bench: {name, recipes}`` file, one per listed recipe."""
    name, entries = _parse_bench(path, raw, root)
    if len(entries) > MAX_VARIANTS:
        raise RecipeError(f"{_where(str(path), root, ('bench', 'recipes'))}: the bench lists {len(entries)} recipes, more than {MAX_VARIANTS}",
                          "split it into several benches")
    loaded = [_load_entry(path, root, i, entry, overrides) for i, entry in enumerate(entries)]
    names = unique_names([config.name + ("," + _label(entry_set) if entry_set else "") for _, entry_set, config in loaded])
    variants = [Variant(n, source, {**overrides, **entry_set}, config) for n, (source, entry_set, config) in zip(names, loaded)]
    _refuse_duplicates(path, variants)
    return name, variants


def _parse_bench(path: Path, raw: dict, root: yaml.Node) -> tuple[str, list]:
    """The bench's name and its raw recipe entries."""
    if set(raw) != {"bench"}:
        extra = sorted(map(str, set(raw) - {"bench"}))
        raise RecipeError(f"{_where(str(path), root, (extra[0],))}: a bench file holds only bench:, found also {extra}",
                          "move recipe keys into a recipe file and list it under bench.recipes")
    bench = raw["bench"]
    where = _where(str(path), root, ("bench",))
    if not isinstance(bench, dict) or set(bench) - {"name", "recipes"}:
        raise RecipeError(f"{where}: bench: must be a mapping with keys name and recipes, got {bench!r}",
                          "e.g. bench: {name: minilm-compare, recipes: [minilm-sentiment, other.yaml]}")
    name = bench.get("name")
    if not isinstance(name, str) or not _BENCH_NAME.match(name):
        raise RecipeError(f"{where}: bench.name must be a name of letters, digits, '_', '.', '-', got {name!r}", "e.g. name: minilm-compare")
    entries = bench.get("recipes")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{where}: bench.recipes must be a non-empty list of recipes, got {entries!r}",
                          "list shipped recipe names or paths, each optionally as {recipe: ..., set: {path: value}}")
    return name, entries


def _load_entry(path: Path, root: yaml.Node, i: int, entry: Any, overrides: dict) -> tuple[str, dict, Recipe]:
    """``(source, set overrides, validated recipe)`` of the i-th listed recipe."""
    where = _where(str(path), root, ("bench", "recipes", i))
    ref, entry_set = _parse_entry(where, i, entry)
    clash = sorted(set(entry_set) & set(overrides))
    if clash:
        raise RecipeError(f"{where}: bench.recipes[{i}] sets {clash[0]}, which --set also gives", "drop one of the two")
    try:
        recipe_path = _resolve(ref, path.parent)
    except RecipeError as err:
        raise RecipeError(f"{where}: bench.recipes[{i}]: {err.message}", err.hint) from None
    recipe_raw, recipe_root = _read(recipe_path)
    if "sweep" in recipe_raw or "bench" in recipe_raw:
        raise RecipeError(f"{where}: bench.recipes[{i}] {ref!r} is itself a bench spec ({recipe_path})",
                          "list its variants as entries with set: {path: value}, or bench it on its own")
    context = f"{path}: bench.recipes[{i}] {ref!r}" + (f" ({_describe(entry_set)})" if entry_set else "")
    config = _validate_variant(recipe_path, recipe_raw, recipe_root, {**overrides, **entry_set}, context)
    return _source(recipe_path, ref), entry_set, config


def _parse_entry(where: str, i: int, entry: Any) -> tuple[str, dict]:
    """A recipe entry's reference and its ``set:`` overrides."""
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, dict) or not isinstance(entry.get("recipe"), str) or set(entry) - {"recipe", "set"}:
        raise RecipeError(f"{where}: bench.recipes[{i}] must be a recipe name or path, or {{recipe: ..., set: {{path: value}}}}, got {entry!r}",
                          "e.g. - recipe: minilm-lora\n         set: {stages.lora.rank: 4}")
    entry_set = entry.get("set") or {}
    if not isinstance(entry_set, dict) or not all(isinstance(k, str) for k in entry_set):
        raise RecipeError(f"{where}: bench.recipes[{i}].set must map dotted paths to values, got {entry_set!r}",
                          "e.g. set: {stages.lora.rank: 4}")
    return entry["recipe"], dict(entry_set)


def _resolve(ref: str, base: Path) -> Path:
    """A listed recipe: a file next to the bench file, else what :func:`locate` finds."""
    beside = base / ref
    return beside if beside.is_file() else locate(ref)


# ---------------------------------------------------------------- validation and names


def _validate_variant(path: Path, raw: dict, root: yaml.Node, overrides: dict, context: str) -> Recipe:
    """Validate ``raw`` with ``overrides`` applied; a refusal is prefixed with ``context`` (which variant)."""
    data = copy.deepcopy(raw)
    try:
        for key, value in overrides.items():
            apply_override(data, key, value)
        return validate(data, source=str(path), node=root, overridden=set(overrides))
    except RecipeError as err:
        raise RecipeError(f"{context}:\n  {err.message}", err.hint) from None


def _refuse_duplicates(path: Path, variants: list[Variant]) -> None:
    """Two variants that resolve to the same recipe would run the same thing twice."""
    seen: dict[str, Variant] = {}
    for v in variants:
        key = json.dumps(v.config.resolved(), sort_keys=True)
        if key in seen:
            raise RecipeError(f"{path}: variants {seen[key].name!r} ({_describe(seen[key].overrides)}) and {v.name!r} "
                              f"({_describe(v.overrides)}) are the same recipe", "remove the repeated value or entry")
        seen[key] = v


def _source(path: Path, ref: str | None = None) -> str:
    """A shipped recipe by its name, anything else by its file path."""
    ref = ref if ref is not None else str(path)
    return ref if shipped_recipes().get(ref) == path else str(path)


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in overrides.items())


def _label(combo: dict[str, Any]) -> str:
    """``bits=4,group_size=32``: the shortest path suffixes that tell the paths apart, and the values."""
    labels = short_labels(list(combo))
    return ",".join(f"{labels[p]}={format_value(v)}" for p, v in combo.items())


def short_labels(paths: Sequence[str]) -> dict[str, str]:
    """Each dotted path's shortest suffix of components that no other path ends with.

    ``["stages.distill.epochs", "stages.finetune.epochs", "train.lr"]`` ->
    ``distill.epochs``, ``finetune.epochs``, ``lr``.
    """
    out = {}
    for path in paths:
        parts = path.split(".")
        others = [p.split(".") for p in paths if p != path]
        k = next((k for k in range(1, len(parts) + 1) if all(o[-k:] != parts[-k:] for o in others)), len(parts))
        out[path] = ".".join(parts[-k:])
    return out


def format_value(value: Any) -> str:
    """A value as it reads in a variant name: ``[0, 3]`` -> ``0_3``, ``True`` -> ``true``, ``5e-05`` as is."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "_".join(format_value(v) for v in value) or "empty"
    if isinstance(value, dict):
        return "_".join(f"{k}-{format_value(v)}" for k, v in value.items()) or "empty"
    return repr(value) if isinstance(value, float) else str(value)


def safe_name(name: str) -> str:
    """``name`` as a directory name: unsafe characters become ``_``, no leading ``.``/``-``, at most MAX_NAME_LENGTH."""
    safe = _UNSAFE.sub("_", name).lstrip(".-") or "variant"
    if len(safe) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        safe = f"{safe[:MAX_NAME_LENGTH - 9]}-{digest}"
    return safe


def unique_names(names: Sequence[str]) -> list[str]:
    """Safe names, unique ignoring case; a repeat gets ``-2``, ``-3``, ... (the first keeps its name)."""
    safe = [safe_name(n) for n in names]
    taken = {s.lower() for s in safe}
    out, used = [], set()
    for s in safe:
        name, n = s, 1
        # A suffixed name must not take a name another variant has by itself.
        while name.lower() in used or (name != s and name.lower() in taken):
            n += 1
            name = f"{s}-{n}"
        used.add(name.lower())
        out.append(name)
    return out


# ---------------------------------------------------------------- stage reuse


def common_stages(a: Recipe, b: Recipe) -> int:
    """How many leading stages ``a`` and ``b`` compute identically.

    Zero unless model, task, train and distributed are equal (a stage's result
    depends on them); then the count of leading stages with the same name and
    the same resolved config.
    """
    include = {"model", "task", "train", "distributed"}
    if a.model_dump(mode="json", include=include) != b.model_dump(mode="json", include=include):
        return 0
    n = 0
    for sa, sb in zip(a.stages, b.stages):
        if sa.name != sb.name or sa.resolved() != sb.resolved():
            break
        n += 1
    return n


def shared_prefix(variants: Sequence[Variant]) -> dict[str, int]:
    """Variant name -> the most leading stages it shares with any other variant (0: none).

    A bench runner can run those stages once and reuse them for every variant
    that shares them.
    """
    return {v.name: max((common_stages(v.config, w.config) for w in variants if w is not v), default=0) for v in variants}
