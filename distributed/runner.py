"""Run a recipe: one artifact directory per stage, finished stages reused.

Stage ``i`` of recipe ``name`` lives in ``runs/<name>/<i:02d>-<stage>/``. Its
key is a hash of its resolved config and its input's key (the first input's
key hashes the model, task and training defaults). A stage is written to a
hidden temporary directory and renamed when complete, so a killed run never
leaves a half-written stage; a re-run reuses every stage whose key is
unchanged and recomputes the rest. ``fresh=True`` ignores finished stages.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from slimtune.artifact import META_FILE, METRICS_FILE, Artifact, file_sha256, load, read_meta, read_metrics, replace_dir, write_json
from slimtune.data import load_task_data
from slimtune.models import load_pretrained, resolve_model_dir
from slimtune.recipe import Recipe, content_key, load_recipe
from slimtune.registry import get_stage
from slimtune.distributed.trainer import seed_everything
from slimtune.stage import StageContext
from slimtune.tasks import task_kind

log = logging.getLogger(__name__)
STAGE_DIR = re.compile(r"^(\d{2})-([\w.-]+)$")


@dataclass
class StageRecord:
    index: int
    name: str
    path: Path
    key: str
    reused: bool
    metrics: dict = field(default_factory=dict)


@dataclass
class RunResult:
    recipe: Recipe
    run_dir: Path
    stages: list[StageRecord]

    @property
    def artifact(self) -> Artifact:
        """The last stage's artifact, loaded from disk."""
        return load(self.stages[-1].path)


def run(recipe: str | Path | Recipe, overrides: dict[str, Any] | None = None, out: str | Path | None = None,
        fresh: bool = False) -> RunResult:
    """Run (or resume) ``recipe``.

    Args:
        recipe: a shipped recipe name, a YAML path, or a validated Recipe.
        overrides: ``{"train.lr": 3e-5, ...}`` applied before validation.
        out: the run directory (default ``runs/<recipe name>``).
        fresh: recompute every stage even if a finished one matches.

    Raises:
        SlimTuneError: bad recipe, model or data; nothing is written then.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    # Check everything the user can get wrong before writing anything.
    resolve_model_dir(recipe.model)
    data = load_task_data(recipe.task)
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)

    run_dir = Path(out) if out else Path("runs") / recipe.name
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(run_dir)
    _write_recipe(run_dir, recipe)

    key, artifact, records = recipe.root_key(), None, []
    prev_path: Path | None = None
    for i, spec in enumerate(recipe.stages, start=1):
        key = content_key([key, spec.name, spec.resolved()])
        path = run_dir / f"{i:02d}-{spec.name}"
        if not fresh and _finished(path, key):
            log.info("stage %02d %s: reusing %s", i, spec.name, path)
            records.append(StageRecord(i, spec.name, path, key, True, read_metrics(path)))
            artifact, prev_path = None, path
            continue
        if artifact is None:
            artifact = load(prev_path) if prev_path else _source_artifact(recipe, data.labels)
        log.info("stage %02d %s: running", i, spec.name)
        artifact, metrics = _run_stage(recipe, spec, artifact, path, key)
        records.append(StageRecord(i, spec.name, path, key, False, metrics))
        prev_path = path
    _remove_stale(run_dir, {r.path.name for r in records})
    return RunResult(recipe, run_dir, records)


def _source_artifact(recipe: Recipe, labels: list | None) -> Artifact:
    seed_everything(recipe.train.seed)  # new heads are initialised randomly
    kind = task_kind(recipe.task.kind)
    num_labels = len(labels) if labels is not None and kind.name == "classification" else None
    model, tokenizer = load_pretrained(recipe.model, kind.auto_class, num_labels=num_labels)
    if labels is not None and kind.name == "classification":
        model.config.id2label = {i: str(v) for i, v in enumerate(labels)}
        model.config.label2id = {str(v): i for i, v in enumerate(labels)}
    weights = Path(resolve_model_dir(recipe.model)) / "model.safetensors"
    source_hash = file_sha256(weights) if weights.is_file() else None  # None: a hub checkpoint
    lineage = [{"stage": "source", "model": recipe.model, "key": recipe.root_key(), "sha256": source_hash}]
    return Artifact(model=model, tokenizer=tokenizer, task=recipe.task, labels=labels, lineage=lineage)


def _run_stage(recipe: Recipe, spec, artifact: Artifact, path: Path, key: str) -> tuple[Artifact, dict]:
    stage = get_stage(spec.name)()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    input_path = artifact.path
    started = time.perf_counter()
    try:
        ctx = StageContext(artifact=artifact, train=recipe.train, out_dir=tmp, recipe=recipe, strategy=recipe.distributed.strategy)
        result = stage.run(ctx, spec.config)
        out = result.artifact
        out.lineage = out.lineage + [{"stage": spec.name, "config": spec.resolved(), "key": key}]
        if stage.changes_model or input_path is None:
            out.write_into(tmp)
        else:
            _link_weights(input_path, tmp)
            out.lineage[-1]["sha256"] = out.lineage[-2].get("sha256")
            write_json(tmp / META_FILE, out.meta())
        metrics = {**result.metrics, "seconds": round(time.perf_counter() - started, 2)}
        write_json(tmp / METRICS_FILE, metrics)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out.path = path
    return out, metrics


def _link_weights(src: Path, dst: Path) -> None:
    """Hard-link (or copy) every file of the input artifact except its metadata."""
    for item in src.iterdir():
        if item.name in (META_FILE, METRICS_FILE) or (dst / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
            continue
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)


def _finished(path: Path, key: str) -> bool:
    if not (path / META_FILE).is_file():
        return False
    lineage = read_meta(path).get("lineage", [])
    return bool(lineage) and lineage[-1].get("key") == key


def _write_recipe(run_dir: Path, recipe: Recipe) -> None:
    tmp = run_dir / ".recipe.yaml.tmp"
    tmp.write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    os.replace(tmp, run_dir / "recipe.yaml")


def _remove_temporaries(run_dir: Path) -> None:
    """Leftovers of a killed run: hidden ``.NN-stage.tmp-PID`` directories."""
    for item in run_dir.iterdir():
        if item.name.startswith(".") and (".tmp-" in item.name or ".old-" in item.name):
            shutil.rmtree(item, ignore_errors=True)


def _remove_stale(run_dir: Path, current: set[str]) -> None:
    """Stage directories the edited recipe no longer has."""
    for item in run_dir.iterdir():
        if STAGE_DIR.match(item.name) and item.is_dir() and item.name not in current:
            shutil.rmtree(item)
